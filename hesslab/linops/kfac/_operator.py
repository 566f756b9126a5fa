"""``KFAC``: a short composition of the factor computer, the Kronecker operator and a layout.

KFAC = P ∘ K ∘ Pᵀ, with K the :class:`~hesslab.linops.kfac._kronecker.KroneckerBlockDiagonal`
over the factors from :class:`~hesslab.linops.kfac._computer.KFACComputer` (Kronecker,
i.e. augmented row-major, layout) and P the :class:`~hesslab.linops._base.PermutationOperator`
that moves vectors into the model's parameter layout. See the package docstring for the
math.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from hesslab._results import Result
from hesslab.errors import HesslabError
from hesslab.linops._base import ChainOperator, LinearOperator, PermutationOperator
from hesslab.linops._hessian import Hessian
from hesslab.linops._model import ModelData
from hesslab.linops._params import ParamSpec, select_parameters
from hesslab.linops._sharded import fsdp_setup
from hesslab.linops._wrapped import unwrap_model
from hesslab.linops.kfac._computer import KFACComputer, KronFactors, SampleTerms
from hesslab.linops.kfac._kronecker import KroneckerBlockDiagonal
from hesslab.linops.kfac._layers import KronLayer, LayerSpec, display, layer_perm, resolve_layers
from hesslab.linops.kfac._loss import resolve_loss

__all__ = ["KFAC", "KFACFunction", "KronEigenpairs", "layer_hessian"]


@dataclasses.dataclass
class KronEigenpairs(Result):
    """The top eigenpairs of one KFAC layer block B ⊗ A, from its factors (:meth:`KFAC.topk`).

    Unpacks as ``values, vectors = K.topk(layer, k)``.

    Attributes:
        layer: The layer's name.
        eigenvalues: (k,) descending, products λ_B,i λ_A,j of the factors' eigenvalues.
        eigenvectors: (n_l, k) orthonormal columns u_B,i ⊗ u_A,j in the layer's flat layout
            (weight, then bias): the entries ``K.layer_slice(layer)`` of the operator's vectors.
    """

    layer: str
    eigenvalues: Tensor
    eigenvectors: Tensor

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.eigenvalues, self.eigenvectors))

_CURVATURES = ("exact", "ggn")
_APPROX = ("expand", "reduce")


class KFAC(LinearOperator):
    """Block-diagonal Kronecker-factored layer Hessians: one block B ⊗ A per layer.

    For every ``nn.Linear`` and ``nn.Conv2d`` layer (bias included as the last column of
    the augmented weight), A = E[x̃ x̃ᵀ] and B = E[M] with M the per-sample Hessian of the
    loss w.r.t. the layer's pre-activation output; see the package docstring for the exact
    definitions, the convolution convention and the scaling. The factors are built in one
    pass over the data at construction; products then cost two small GEMMs per layer
    through the compiled grouped op :func:`hesslab._ops.kron_matmul`.

    Layers that own parameters but have no Kronecker form here (BatchNorm, LayerNorm,
    Embedding, MultiheadAttention, grouped convolutions, layers called several times per
    forward pass or not called as modules, ...) are skipped with ONE warning listing them;
    their parameters are not part of the operator.

    Args:
        model: The network. Never modified (evaluated in eval mode with its parameters
            substituted functionally; modes are restored).
        loss_fn: ``nn.CrossEntropyLoss()``, ``nn.MSELoss()`` (reduction "mean"),
            ``F.cross_entropy`` or ``F.mse_loss``. Another callable needs ``loss_type``.
            Cross-entropy expects outputs (n, c) and class-index or probability targets.
        data: One ``(inputs, targets)`` batch or a re-iterable iterable of batches.
        layers: ``None``: every supported layer with a parameter that requires grad.
            Otherwise a module name (``"fc1"``; a container selects the layers inside it),
            a glob over module names (``"features.*"``), an ``nn.Module`` of the model, or
            a list of these.
        dtype: Build and apply in this floating dtype (e.g. ``torch.float64``); ``None``
            keeps the parameters' dtype.
        progress: A tqdm bar over batches while building.
        curvature: ``"exact"`` (default) or ``"ggn"``; see the package docstring.
        kfac_approx: ``"expand"`` (default) or ``"reduce"``: how layers whose weight is
            shared over positions (Conv2d, Linear on (n, *, in)) are factored; see the
            package docstring. Prefer ``"reduce"`` for networks that pool over positions.
        loss_type: ``"cross_entropy"`` or ``"mse"`` for a loss callable that KFAC does not
            recognise; its value is compared with the formula on the first batch.

    Transformers: ``nn.Linear`` on (B, T, C) and transformers' ``Conv1D`` (GPT-2) are
    Kronecker layers whose weight is shared over the T tokens, factored by ``kfac_approx``
    ("expand", the default: every token a sample; "reduce": the mean token), the choice
    recorded in ``notes``; ``loss_fn=None`` with a causal LM and dict batches uses the
    token cross-entropy (``-100`` ignored; B over the predicted tokens, A over the
    sequences). Tied weights (GPT-2's ``lm_head`` = ``wte``), Embedding and LayerNorm are
    skipped, each named in the warning and in ``skipped``.

    Attributes:
        notes: What was decided for this model (math attention backend, loss, approximation).
        layer_names: The Kronecker layers, in layout order.
        param_names: Their parameters in layout order (``Hessian(..., params=K.param_names)``
            is the matching exact operator).
        skipped: ``{module name: reason}`` of the layers left out.
        exact_layers: Layers whose M has a non-Gauss-Newton part, computed exactly.
        ggn_fallback: ``{layer: reason}`` where ``curvature="exact"`` could not get second
            derivatives (an op without a double backward after the layer, e.g. fused
            attention kernels): those layers use the Gauss-Newton M, with a warning.
        num_data: N, the number of samples.

    Raises:
        HesslabError: an unrecognised loss (see ``loss_type``), a non-mean reduction, class
            weights, targets equal to ``ignore_index``, ``layers`` matching nothing (or
            naming an unsupported layer), outputs of the wrong shape, empty data.

    Example:
        >>> K = KFAC(model, nn.CrossEntropyLoss(), (X, y), dtype=torch.float64)
        >>> A, B = K.factors["fc1"]
        >>> K @ v                                  # (n,) in the model's parameter layout
        >>> K.topk("fc1", 10)                      # eigenpairs of B ⊗ A from the factors
        >>> K.power(-1, damping=1e-3) @ g          # damped inverse
        >>> H = Hessian(model, nn.CrossEntropyLoss(), (X, y), params=K.param_names)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        data: Any,
        layers: LayerSpec = None,
        *,
        dtype: torch.dtype | None = None,
        progress: bool = False,
        curvature: str = "exact",
        kfac_approx: str = "expand",
        loss_type: str | None = None,
    ):
        model, layers = unwrap_model(model, layers)  # DistributedDataParallel: its .module
        fsdp_setup(model, type(self))  # FSDP2-sharded models: refused, naming Hessian instead
        md = ModelData(model, loss_fn, data, dtype=dtype, progress=progress, name="KFAC")
        if curvature not in _CURVATURES:
            raise HesslabError(f"curvature: expected one of {_CURVATURES}, got {curvature!r}")
        if kfac_approx not in _APPROX:
            raise HesslabError(f"kfac_approx: expected one of {_APPROX}, got {kfac_approx!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.curvature = curvature
        self.kfac_approx = kfac_approx
        self.progress = md.progress
        self._md = md
        loss = resolve_loss(loss_fn, loss_type, md.head.kind)
        candidates, warn = resolve_layers(model, layers)
        md.check_parameters(
            [p for lay in candidates for p in lay.module.parameters(recurse=False)], what="model"
        )
        self._computer = KFACComputer(md, candidates, loss, curvature=curvature, kfac_approx=kfac_approx)
        self.skipped: dict[str, str] = self._computer.probe(warn)
        perm = self._set_layout(self._computer.layers)
        n = perm.numel()
        super().__init__((n, n), md.dtype, md.device)
        self._layout = PermutationOperator(perm, md.dtype)  # Kronecker layout -> model layout
        self.exact_layers: list[str] = []
        self.ggn_fallback: dict[str, str] = {}
        self.num_data = 0
        self.notes: list[str] = list(md.notes)  # the math attention backend, the loss used
        self.update()
        shared = [lay.name for lay in self._layers if lay.positions > 1]
        if shared:
            self.notes.append(
                f"kfac_approx={kfac_approx!r}: {len(shared)} layer(s) share their weight over "
                f"positions/tokens (e.g. {display(shared[0])!r}); "
                + ("each token counted as a sample (A averaged, B summed over tokens)"
                   if kfac_approx == "expand" else "one mean input and summed output per sample")
            )

    def _set_layout(self, layers: list[KronLayer]) -> Tensor:
        """Order the layers as the model's parameters; offsets; the layout permutation.

        Returns:
            (n,): Kronecker position -> flat position in the model layout.
        """
        names = [p for lay in layers for p in lay.param_names]
        ordered, tensors = select_parameters(self.model, names)
        numel = dict(zip(ordered, (t.numel() for t in tensors)))
        pos = {name: i for i, name in enumerate(ordered)}
        layers = sorted(layers, key=lambda lay: pos[lay.param_names[0]])
        offset = 0
        perms = []
        for lay in layers:
            lay.offset = offset
            lay.numel = sum(numel[p] for p in lay.param_names)
            perms.append(
                layer_perm(lay.out_dim, lay.in_dim, lay.bias, lay.transposed).to(self._md.device) + offset
            )
            offset += lay.numel
        self._computer.layers = layers
        self._layers = layers
        self._by_name = {lay.name: lay for lay in layers}
        self.layer_names: list[str] = [lay.name for lay in layers]
        self.param_names: list[str] = [p for lay in layers for p in lay.param_names]
        return torch.cat(perms)

    def update(self) -> None:
        """(Re)build the factors from the model's current parameters (one pass over the data)."""
        res = self._computer.compute()
        self.num_data = res.num_data
        self.exact_layers = res.exact_layers
        self.ggn_fallback = res.ggn_fallback
        self._kron = KroneckerBlockDiagonal(
            res.A, res.B, psd_B=[lay.name not in res.exact_layers for lay in self._layers],
            names=[display(lay.name) for lay in self._layers],
        )
        self._chain = ChainOperator([self._layout, self._kron, self._layout.T])

    def sample_terms(self, batch: tuple[Any, Tensor]) -> dict[str, SampleTerms]:
        """Per-sample output Hessians and inputs of every layer on one batch (analyses, tests).

        "expand": M_j[t, t] and x̃_{j,t} for every position t; with N samples in all,
        ``B = (1/N) Σ_j Σ_t M_j[t,t]`` and ``A = (1/N) Σ_j (1/P) Σ_t x̃ x̃ᵀ``. "reduce": one
        entry per sample (P = 1 in the shapes below), Σ_{t,t'} M_j[t,t'] and the mean patch
        x̄_j. For P = 1 the exact layer Hessian is ``(1/N) Σ_j M_j ⊗ x̃_j x̃_jᵀ``. Uses the
        layers flagged for exact M when the operator was built (``curvature="exact"``).

        Args:
            batch: One ``(inputs, targets)`` pair (on the model's device).

        Returns:
            ``{layer name: SampleTerms(M (n, P, out, out), X (n, P, in+1))}``.
        """
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor)):
            raise HesslabError("batch: expected one (inputs, targets) pair")
        inputs, targets = self._md.prepare(batch[0], batch[1], 0)
        terms = self._computer.sample_terms(inputs, targets, self.exact_layers)
        return dict(zip(self.layer_names, terms))

    # ===================================================================== access
    def _index(self, layer: str | nn.Module) -> int:
        """The position of a KFAC layer (name or module)."""
        if isinstance(layer, nn.Module):
            for l, lay in enumerate(self._layers):
                if lay.module is layer:
                    return l
            raise HesslabError(
                f"layer: the given {type(layer).__name__} is not one of the KFAC layers {self.layer_names}"
            )
        if isinstance(layer, str) and layer in self._by_name:
            return self._layers.index(self._by_name[layer])
        skipped = isinstance(layer, str) and layer in self.skipped
        raise HesslabError(
            f"layer: {layer!r} is not one of the KFAC layers {self.layer_names}"
            + (f" (it was skipped: {self.skipped[layer]})" if skipped else "")
        )

    @property
    def factors(self) -> dict[str, KronFactors]:
        """``{layer name: KronFactors(A, B)}``, A (in+1, in+1), B (out, out); block = kron(B, A)."""
        return {name: KronFactors(a, b) for name, a, b in zip(self.layer_names, self._kron.A, self._kron.B)}

    def layer_slice(self, layer: str | nn.Module) -> slice:
        """The entries of ``layer`` in the operator's flat vectors (its weight, then its bias)."""
        return self._layers[self._index(layer)].slice

    def layer_shape(self, layer: str | nn.Module) -> tuple[int, int]:
        """(out, in + 1) (or (out, in) without bias): the augmented weight matrix's shape."""
        lay = self._layers[self._index(layer)]
        return lay.out_dim, lay.in_aug

    def _local_perm(self, l: int) -> Tensor:
        """Layer l's Kronecker position -> its position in the layer's [weight, bias] block."""
        lay = self._layers[l]
        return self._layout.perm[lay.slice] - lay.offset

    # ===================================================================== products
    def _matmat(self, V: Tensor) -> Tensor:
        return self._chain.matmat(V)  # P K Pᵀ V

    def block_dense(self, layer: str | nn.Module) -> Tensor:
        """The dense block B ⊗ A of one layer in the model layout (weight, then bias).

        Returns:
            (n_l, n_l) with n_l = out·(in + 1) (out·in without bias); compare with
            ``layer_hessian(model, loss_fn, data, layer).to_dense()``.
        """
        l = self._index(layer)
        perm = self._local_perm(l)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return self._kron.block_dense(l)[inv][:, inv]

    def to_dense(self, max_size: int = 4096, chunk_size: int = 256) -> Tensor:
        """The dense block-diagonal matrix (n, n) in the model layout (exact, no products)."""
        if self.shape[0] > max_size:
            return super().to_dense(max_size, chunk_size)  # raises with the message
        return torch.block_diag(*[self.block_dense(name) for name in self.layer_names])

    def trace(self) -> float:
        """tr(K) = Σ_l tr(B_l) tr(A_l), exactly."""
        return self._kron.trace()

    # ===================================================================== spectra
    def eigenvalues(self, per_layer: bool = False) -> Tensor | dict[str, Tensor]:
        """All eigenvalues of the operator, products λ_B[i] λ_A[j] of the factors'.

        Args:
            per_layer: Return ``{layer: (n_l,)}`` instead of one list.

        Returns:
            (n,) sorted descending, or per layer (n_l,) sorted descending.
        """
        per = dict(zip(self.layer_names, self._kron.eigenvalues()))
        if per_layer:
            return per
        return torch.cat(list(per.values())).sort(descending=True).values

    def topk(self, layer: str | nn.Module, k: int) -> KronEigenpairs:
        """The k largest eigenpairs of one layer's block B ⊗ A, from the factors (``kron_topk``).

        The eigenvector of the pair (i, j) is u_B,i ⊗ u_A,j: reshaped to the augmented
        weight (out, in+1) it is the rank-one matrix u_B,i u_A,jᵀ.

        Args:
            layer: A KFAC layer (name or module).
            k: 1 ≤ k ≤ n_l.

        Returns:
            A :class:`KronEigenpairs` (values (k,) descending, vectors (n_l, k) with
            orthonormal columns in the layer's flat layout, weight then bias, i.e. the
            entries ``layer_slice(layer)`` of the operator's vectors); it unpacks as
            ``values, vectors``.
        """
        l = self._index(layer)
        size = self._layers[l].numel
        if not (isinstance(k, int) and 1 <= k <= size):
            raise HesslabError(f"k: must be an integer with 1 <= k <= {size} (the layer's size), got {k!r}")
        values, vecs = self._kron.topk(l, k)  # Kronecker layout
        out = torch.empty_like(vecs)
        out[self._local_perm(l)] = vecs
        return KronEigenpairs(layer=self._layers[l].name, eigenvalues=values, eigenvectors=out)

    def power(self, p: float, damping: float = 0.0) -> KFACFunction:
        """The operator (B ⊗ A + damping·I)^p per block, through the factors' eigenbases.

        Args:
            p: The power: -1 with ``damping > 0`` is the damped inverse, 0.5 the square root.
            damping: Added to every eigenvalue λ_B λ_A before the power.

        Returns:
            A :class:`KFACFunction` operator with the same layout.

        Raises:
            HesslabError: p < 0 with some λ_B λ_A + damping ≤ 0 (singular: raise damping),
                or a non-integer p with some λ_B λ_A + damping < 0 (an indefinite exact B).
        """
        return KFACFunction(self, p, damping)

    def inverse(self, damping: float) -> KFACFunction:
        """(B ⊗ A + damping·I)⁻¹ per block: ``power(-1, damping)``."""
        return self.power(-1.0, damping)

    def __repr__(self) -> str:
        return (
            f"KFAC(layers={self.layer_names}, shape={self.shape}, curvature={self.curvature!r}, "
            f"num_data={self.num_data}, dtype={self.dtype})"
        )


class KFACFunction(ChainOperator):
    """f(B ⊗ A) = (B ⊗ A + damping)^p per block of a :class:`KFAC`: P ∘ f(K) ∘ Pᵀ.

    Shares the parent's layout (the model's parameter order) and its cached
    eigendecompositions of the factors (applied by ``kron_eig_apply``). Build with
    :meth:`KFAC.power` or :meth:`KFAC.inverse`.

    Raises:
        HesslabError: see :meth:`KFAC.power`.
    """

    def __init__(self, parent: KFAC, p: float, damping: float):
        inner = parent._kron.function(p, damping)
        super().__init__([parent._layout, inner, parent._layout.T])
        self.parent = parent
        self.p = inner.p
        self.damping = inner.damping

    def __repr__(self) -> str:
        return f"KFACFunction(power={self.p:g}, damping={self.damping:g}, shape={self.shape})"


def layer_hessian(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    data: Any,
    layer: ParamSpec,
    *,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> Hessian:
    """The exact Hessian block of one layer's parameters, as an operator.

    A thin wrapper over :class:`hesslab.linops.Hessian` with ``params=layer``: its flat
    layout is the layer's parameters in ``named_parameters()`` order (weight, then bias),
    the same as the layer's entries of :class:`KFAC`. Use ``.to_dense()`` for the dense
    block when it is small, ``hesslab.lanczos(op, k)`` for its top eigenpairs.

    Args:
        model, loss_fn, data: As for :class:`~hesslab.linops.Hessian`.
        layer: A module name (``"fc1"``), an ``nn.Module``, a glob pattern or parameter
            names (anything ``params=`` accepts).
        dtype: Evaluate in this dtype (e.g. ``torch.float64``).
        **kwargs: Passed on to :class:`~hesslab.linops.Hessian` (``method``, ``progress``, ...).

    Returns:
        The :class:`~hesslab.linops.Hessian` operator of shape (n_l, n_l).

    Raises:
        HesslabError: ``layer`` matches no parameter, or the Hessian's own checks.
    """
    if layer is None:
        raise HesslabError(
            "layer: pass the layer (a module name, a module, or parameter names); use Hessian() for all"
        )
    return Hessian(model, loss_fn, data, params=layer, dtype=dtype, **kwargs)
