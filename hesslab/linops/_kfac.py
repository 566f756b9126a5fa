"""Kronecker-factored layer Hessians (Wu et al., "Dissecting Hessian"): ``KFAC`` and ``layer_hessian``.

Notation (per layer; see also :mod:`hesslab.linops._curvature`):
    W: the weight, viewed as a matrix of shape (out, in): ``nn.Linear`` as it is,
        ``nn.Conv2d`` as (C_out, C_in·kh·kw) (its row-major flattening).
    W̃ = [W | b]: the augmented matrix (out, in + 1) when the layer has a bias; the bias
        is its last column and every input x gets a constant 1 appended: x̃ = [x; 1].
    z = W̃ x̃: the layer's pre-activation output for one input vector.
    ℓ_j: the loss of sample j, defined by ``loss_fn(output, targets) = (1/n) Σ_j ℓ_j``
        (``loss_fn`` returns the batch MEAN); L = (1/N) Σ_j ℓ_j over all N samples.
    M_j = ∂²ℓ_j/∂z∂z: the per-sample Hessian of the loss with respect to the layer's
        output (out × out), everything else held fixed.
    P: positions sharing the weight within one sample: the spatial positions of a
        convolution's output (H_out·W_out), or the extra leading dimensions of a Linear
        layer's input (n, *, in) (P = 1 for the usual (n, in)). x̃_{j,t} and M_j[t, t] are
        the input (patch) and the output Hessian block at position t.

The factors (one pass over the data, each batch weighted by its number of samples; for
P > 1 this is the default "expand" form, see ``kfac_approx`` below for "reduce"):

    A = (1/N) Σ_j (1/P) Σ_t x̃_{j,t} x̃_{j,t}ᵀ          ((in+1) × (in+1), input second moment)
    B = (1/N) Σ_j Σ_t M_j[t, t]                        (out × out, output Hessian)

and the layer's block of the operator is B ⊗ A. For P = 1 the exact layer Hessian is
H_W = (1/N) Σ_j M_j ⊗ x̃_j x̃_jᵀ (z is linear in W̃, so ∂²ℓ/∂W̃² = Jᵀ M J exactly), and
B ⊗ A = E[M] ⊗ E[x̃x̃ᵀ] is Wu et al.'s decoupling approximation of it; it is exact for one
sample, or when all samples share one input x̃.

Factor order and layout:
    PyTorch flattens W̃ row-major, vec(W̃)[r·(in+1) + s] = W̃[r, s], so the block is
    B ⊗ A (``torch.kron(B, A)``) with (B ⊗ A) vec(V) = vec(B V Aᵀ); texts that use the
    column-major vec (Martens & Grosse, BackPACK's and curvlinops' documentation) write the
    same matrix as A ⊗ B. The *operator's* flat vectors, however, use the model's own
    parameter layout, as every hesslab operator does: the selected parameters in
    ``named_parameters()`` order, each flattened row-major, so a layer contributes its
    weight (out·in entries) and then its bias (out entries). ``KFAC`` and
    ``Hessian(model, loss_fn, data, params=K.param_names)`` act on the same vectors and can
    be compared or subtracted. Index permutations, precomputed once, move vectors between
    this layout and the augmented row-major layout the compiled Kronecker ops use
    (:func:`hesslab._ops.kron_matmul`, ``kron_eig_apply``, ``kron_topk``).

Scaling conventions (where libraries differ):
    * Mean, not sum: A and B are means over all N samples, so B ⊗ A approximates the
      Hessian of the mean loss L, the same matrix ``hesslab.Hessian`` applies. BackPACK's
      KFAC/KFLR return the factors of one mini-batch's loss (its reduction applied);
      curvlinops normalises by the number of data points like hesslab.
    * Cross-entropy (``nn.CrossEntropyLoss()``, ``F.cross_entropy``): at the logits
      M = diag(p) − p pᵀ with p = softmax(z) (rank c − 1; label smoothing does not change
      it; soft-label targets q scale it by Σ_i q_i). Its square root used for the
      propagation has columns √p_k (e_k − p), k = 1..c. Same as BackPACK and curvlinops.
    * Mean squared error: ``nn.MSELoss()`` with reduction="mean" averages over the batch
      AND over the D = numel(output)/n output entries of a sample, so
      ℓ_j = (1/D) ‖z_j − y_j‖² and M = (2/D) I_D at the output, square root √(2/D) I_D.
      The 2 is kept because hesslab's operators are Hessians of exactly the loss the user
      passed (``Hessian`` and ``KFAC`` must agree on one ``loss_fn``). BackPACK (since its
      fix of the "mean" scaling, PR #56) and curvlinops use the same 2/D; texts that model
      regression as a unit-variance Gaussian, ½‖z − y‖², (Martens & Grosse's K-FAC and
      many optimizers) get M = I, a factor 2/D apart.
    * Convolutions (and Linear layers with positions), ``kfac_approx=``: the exact block is
      E_j[Σ_{t,t'} M_j[t,t'] ⊗ x̃_{j,t} x̃_{j,t'}ᵀ]; Eschenhagen et al. (2023) name the two
      Kronecker approximations of it, and both are offered:
      "expand" (default; Grosse & Martens 2016, curvlinops' default): every position is
      treated like a sample, A = E_j[(1/P) Σ_t x̃_{j,t} x̃_{j,t}ᵀ] (AVERAGED over positions)
      and B = E_j[Σ_t M_j[t,t]] (SUMMED over positions), dropping the cross-position
      terms t ≠ t'. Exact when the patches do not depend on (j, t) and M is block diagonal
      over positions, i.e. for weight sharing "expanded" into separate outputs (flatten
      then Linear, per-position losses).
      "reduce": A = E_j[x̄_j x̄_jᵀ] with x̄_j = (1/P) Σ_t x̃_{j,t} the mean patch, and
      B = E_j[Σ_{t,t'} M_j[t,t']] (the output Hessian of a perturbation shared by all
      positions). Exact when every sample's patches are equal (whatever M is), and its
      bias block is always the exact one; suited to networks that pool over positions
      before the loss (global average pooling, ResNets).
      Why the 1/P sits in A: A stays the second moment of one input vector, comparable
      with a Linear layer's E[x̃x̃ᵀ] (its bias entry A[-1, -1] is exactly 1, and the
      E[x̃]E[x̃]ᵀ-dominance of Wu et al. reads the same), while B carries the sum over
      positions that the layer's Hessian does. With P = 1 (Linear on (n, in), a kernel as
      large as its input) both are the Linear case. Measured on hesslab.zoo's trained
      models (benchmarks/bench_kfac.py, the top eigenvalue of each conv block against the
      exact layer Hessian's): on the digits CNN (flatten → Linear) "expand" is within 2%
      after 3 epochs and both conventions are ~2x low after 10; on the ResNet (global
      average pooling) "expand" is 4-22x low and "reduce" 1.1-3.3x low, with higher
      top-eigenspace overlaps in most layers.
    * The split of scale between A and B is a convention: only B ⊗ A is meaningful.

The output Hessian M (``curvature=``):
    "ggn": the Gauss-Newton part M = Jᵀ (∇²_out ℓ) J, J = ∂out/∂z, propagated backward for
        all layers at once by vector-Jacobian products of the columns of the square root of
        ∇²_out ℓ (c products per batch for c outputs; no Monte Carlo). Always PSD.
    "exact" (default): the exact M = ∂²ℓ/∂z². It differs from the Gauss-Newton part by
        Σ_k (∂ℓ/∂out_k) ∂²out_k/∂z², which vanishes for networks that are piecewise linear
        between the layer and the output (ReLU, max-pooling, BatchNorm in eval mode, the
        last layer itself). On the first batch each layer is checked with one random
        Hessian-vector product w.r.t. its output (flagged where ‖(H − G)v‖ > √eps·‖Hv‖);
        the flagged layers (``K.exact_layers``; e.g. tanh networks) get M from out ("reduce")
        or P·out ("expand") exact Hessian-vector products per batch instead (double
        backward). Their B may be indefinite.

Assumptions: the model is evaluated in eval mode (BatchNorm uses running statistics,
dropout is off) and treats samples independently; each KFAC layer is called once per
forward pass as a module (``register_forward_hook``) and its parameters are used only
there (layers called several times, or not at all, are detected and skipped; a weight
that is also read directly, e.g. ``F.linear(x, self.fc.weight)``, is not); the factors
are a snapshot of the model when ``KFAC`` (or :meth:`KFAC.update`) ran.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hesslab import _ops
from hesslab.errors import HesslabError
from hesslab.linops._base import LinearOperator
from hesslab.linops._curvature import Hessian
from hesslab.linops._data import DataSource, call_model, cast_batch, check_devices, input_tensors
from hesslab.linops._params import ParamSpec, select_parameters

__all__ = ["KFAC", "KFACFunction", "KronFactors", "SampleTerms", "layer_hessian"]

LayerSpec = Union[None, str, nn.Module, Iterable[Union[str, nn.Module]]]

_SUPPORTED = (nn.Linear, nn.Conv2d)
_CURVATURES = ("exact", "ggn")
_APPROX = ("expand", "reduce")
_LOSS_TYPES = ("cross_entropy", "mse")
_GLOB_CHARS = set("*?[")


class KronFactors(NamedTuple):
    """The Kronecker factors of one layer: the block is ``torch.kron(B, A)``.

    Attributes:
        A: (in+1, in+1) (or (in, in) without bias), the input second moment E[x̃ x̃ᵀ].
        B: (out, out), the output Hessian E[M].
    """

    A: Tensor
    B: Tensor


class SampleTerms(NamedTuple):
    """Per-sample terms of one layer on one batch (see :meth:`KFAC.sample_terms`).

    Attributes:
        M: (n, P, out, out), the position-diagonal blocks M_j[t, t] of the per-sample
            output Hessians ("expand"), or (n, 1, out, out) holding Σ_{t,t'} M_j[t, t']
            ("reduce").
        X: (n, P, in+1) (or in without bias), the (augmented) inputs x̃_{j,t} ("expand"),
            or (n, 1, in+1) the mean patches ("reduce").
    """

    M: Tensor
    X: Tensor


@dataclass
class _Layer:
    """Bookkeeping of one Kronecker layer."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv2d"
    out_dim: int
    in_dim: int  # without the bias column
    bias: bool
    param_names: list[str]
    offset: int = 0  # start in the operator's flat layout
    numel: int = 0
    perm: Tensor | None = None  # (numel,) kron (augmented row-major) position -> local layout position
    positions: int = 1  # P of the first batch (informational)
    out_shape: tuple[int, ...] = ()  # per-sample output shape seen on the first batch

    @property
    def in_aug(self) -> int:
        return self.in_dim + int(self.bias)

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)

    # ---------------------------------------------------------------- rows views
    def input_rows(self, x: Tensor) -> Tensor:
        """The layer's input as (n, P, in) patches (x̃ without the 1)."""
        if self.kind == "linear":
            return x.reshape(x.shape[0], -1, x.shape[-1])
        m = self.module
        if isinstance(m.padding, str) or any(p != 0 for p in _pair(m.padding)):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=0, stride=m.stride)  # (n, K, P)
        return cols.transpose(1, 2)

    def output_rows(self, g: Tensor) -> Tensor:
        """An output-shaped tensor (n, *z) as (n, P, out)."""
        if self.kind == "linear":
            return g.reshape(g.shape[0], -1, g.shape[-1])
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)

    def rows_to_output(self, r: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of :meth:`output_rows` for an output of shape ``shape`` (n, *z)."""
        if self.kind == "linear":
            return r.reshape(shape)
        return r.transpose(1, 2).reshape(shape)


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _layer_perm(out_dim: int, in_dim: int, bias: bool) -> Tensor:
    """Kron position r·(in+1) + s -> position in the layer's [weight, bias] layout."""
    r = torch.arange(out_dim)[:, None]
    idx = r * in_dim + torch.arange(in_dim)[None, :]  # (out, in): weight entries
    if bias:
        idx = torch.cat([idx, out_dim * in_dim + r], dim=1)  # bias as the last column
    return idx.reshape(-1)


def _display(name: str) -> str:
    return name if name else "<root>"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_(t: Tensor) -> Tensor:
    if _distributed():
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        buf = t.to(dev)
        torch.distributed.all_reduce(buf)
        t.copy_(buf.to(t.device))
    return t


class _LossSpec(NamedTuple):
    kind: str  # "cross_entropy" | "mse"
    label_smoothing: float


def _resolve_loss(loss_fn: Any, loss_type: str | None) -> _LossSpec:
    """Recognise the loss, or trust ``loss_type`` (checked numerically on the first batch)."""
    if loss_type is not None:
        if loss_type not in _LOSS_TYPES:
            raise HesslabError(f"loss_type: expected one of {_LOSS_TYPES} or None, got {loss_type!r}")
        return _LossSpec(loss_type, 0.0)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.reduction != "mean":
            raise HesslabError(
                f"loss_fn: CrossEntropyLoss(reduction={loss_fn.reduction!r}); hesslab operators need the "
                "batch mean, reduction='mean' (the default)"
            )
        if loss_fn.weight is not None:
            raise HesslabError(
                "loss_fn: CrossEntropyLoss with class weights is a weighted mean, not a sample mean; "
                "KFAC supports weight=None only"
            )
        return _LossSpec("cross_entropy", float(loss_fn.label_smoothing))
    if isinstance(loss_fn, nn.MSELoss):
        if loss_fn.reduction != "mean":
            raise HesslabError(
                f"loss_fn: MSELoss(reduction={loss_fn.reduction!r}); hesslab operators need the batch "
                "mean, reduction='mean' (the default)"
            )
        return _LossSpec("mse", 0.0)
    if loss_fn is F.cross_entropy:
        return _LossSpec("cross_entropy", 0.0)
    if loss_fn is F.mse_loss:
        return _LossSpec("mse", 0.0)
    raise HesslabError(
        f"loss_fn: KFAC needs the loss's Hessian with respect to the model output and recognises "
        f"nn.CrossEntropyLoss(), nn.MSELoss(), F.cross_entropy and F.mse_loss; got "
        f"{getattr(loss_fn, '__name__', type(loss_fn).__name__)}. If it computes one of these (mean "
        "reduction), pass loss_type='cross_entropy' or 'mse' (its value is checked on the first batch)."
    )


# ---------------------------------------------------------------------------------------
class KFAC(LinearOperator):
    """Block-diagonal Kronecker-factored layer Hessians: one block B ⊗ A per layer.

    For every ``nn.Linear`` and ``nn.Conv2d`` layer (bias included as the last column of
    the augmented weight), A = E[x̃ x̃ᵀ] and B = E[M] with M the per-sample Hessian of the
    loss w.r.t. the layer's pre-activation output; see the module docstring for the exact
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
        curvature: ``"exact"`` (default) or ``"ggn"``; see the module docstring.
        kfac_approx: ``"expand"`` (default) or ``"reduce"``: how layers whose weight is
            shared over positions (Conv2d, Linear on (n, *, in)) are factored; see the
            module docstring. Prefer ``"reduce"`` for networks that pool over positions.
        loss_type: ``"cross_entropy"`` or ``"mse"`` for a loss callable that KFAC does not
            recognise; its value is compared with the formula on the first batch.

    Attributes:
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
        if not isinstance(model, nn.Module):
            raise HesslabError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise HesslabError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise HesslabError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        if curvature not in _CURVATURES:
            raise HesslabError(f"curvature: expected one of {_CURVATURES}, got {curvature!r}")
        if kfac_approx not in _APPROX:
            raise HesslabError(f"kfac_approx: expected one of {_APPROX}, got {kfac_approx!r}")
        self.kfac_approx = kfac_approx
        self.model = model
        self.loss_fn = loss_fn
        self.curvature = curvature
        self.progress = bool(progress)
        self._loss = _resolve_loss(loss_fn, loss_type)
        self._cast_dtype = dtype
        self._data = DataSource(data)
        self.skipped: dict[str, str] = {}
        explicit, warn_skips = self._resolve_layers(layers)

        params = [p for lay in explicit for p in lay.module.parameters(recurse=False)]
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise HesslabError(
                f"model: the selected layers' parameters live on several devices {sorted(map(str, devices))}; "
                "KFAC needs them on one device"
            )
        if dtype is None:
            dtypes = {p.dtype for p in params}
            if len(dtypes) > 1:
                raise HesslabError(
                    f"dtype: the selected layers have parameters of several dtypes {sorted(map(str, dtypes))}; "
                    "pass dtype= to build in one"
                )
            (op_dtype,) = dtypes
        else:
            op_dtype = dtype
        self._device = next(iter(devices))
        self._op_dtype = op_dtype

        # probe: which layers are called exactly once per forward pass
        layers_ok = self._probe(explicit, warn_skips)
        self._set_layout(layers_ok)
        n = sum(lay.numel for lay in self._layers)
        super().__init__((n, n), op_dtype, self._device)
        self.exact_layers: list[str] = []
        self.ggn_fallback: dict[str, str] = {}
        self._eig_cache: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None
        self.num_data = 0
        self._A: list[Tensor] = []
        self._B: list[Tensor] = []
        self.update()

    # ================================================================ layer selection
    def _resolve_layers(self, layers: LayerSpec) -> tuple[list[_Layer], dict[str, str]]:
        """The candidate Kronecker layers, and the unsupported ones to warn about."""
        model = self.model
        modules = dict(model.named_modules())
        owners = {name: m for name, m in modules.items() if any(True for _ in m.parameters(recurse=False))}
        counts: dict[int, int] = {}
        for m in modules.values():
            for p in m.parameters(recurse=False):
                counts[id(p)] = counts.get(id(p), 0) + 1
        by_module = {id(m): name for name, m in modules.items()}

        explicit_names: set[str] = set()
        if layers is None:
            chosen = [name for name, m in owners.items() if any(p.requires_grad for p in m.parameters(recurse=False))]
        else:
            items: list[Any]
            if isinstance(layers, (str, nn.Module)):
                items = [layers]
            else:
                try:
                    items = list(layers)
                except TypeError:
                    raise HesslabError(
                        "layers: expected None, a module name, a glob pattern, an nn.Module or a list of "
                        f"these; got {type(layers).__name__}"
                    ) from None
            if not items:
                raise HesslabError("layers: the list is empty; pass None for every supported layer")
            selected: set[str] = set()
            for item in items:
                if isinstance(item, nn.Module):
                    if id(item) not in by_module:
                        raise HesslabError(f"layers: the given {type(item).__name__} is not a submodule of the model")
                    roots = [by_module[id(item)]]
                    exact = True
                elif isinstance(item, str):
                    if item in modules:
                        roots, exact = [item], True
                    elif _GLOB_CHARS & set(item):
                        roots, exact = fnmatch.filter([k for k in modules if k], item), False
                    else:
                        roots, exact = [], True
                else:
                    raise HesslabError(
                        f"layers: item {item!r} of type {type(item).__name__} is not a module name, glob "
                        "pattern or nn.Module"
                    )
                matched = set()
                for root in roots:
                    if root in owners:
                        matched.add(root)
                        if exact:
                            explicit_names.add(root)
                    prefix = root + "." if root else ""
                    matched |= {k for k in owners if k.startswith(prefix) and k != root}
                if not matched:
                    supported = [k for k, m in owners.items() if isinstance(m, _SUPPORTED)]
                    raise HesslabError(
                        f"layers: {item!r} matches no layer with parameters. Kronecker layers of the model: "
                        + (", ".join(repr(_display(k)) for k in supported[:12]) or "(none)")
                    )
                selected |= matched
            chosen = [k for k in owners if k in selected]

        out: list[_Layer] = []
        warn: dict[str, str] = {}
        for name in chosen:
            m = owners[name]
            reason = None
            if not isinstance(m, _SUPPORTED):
                reason = f"{type(m).__name__}: no Kronecker-factored form"
            elif isinstance(m, nn.Conv2d) and m.groups != 1:
                reason = f"Conv2d with groups={m.groups}: not supported"
            elif set(dict(m.named_parameters(recurse=False))) - {"weight", "bias"}:
                reason = f"{type(m).__name__} with extra parameters"
            elif any(counts[id(p)] > 1 for p in m.parameters(recurse=False)):
                reason = "shares a parameter with another module (tied weights)"
            if reason is not None:
                if name in explicit_names:
                    raise HesslabError(
                        f"layers: {_display(name)!r} ({reason}) cannot be a KFAC layer; KFAC supports "
                        "nn.Linear and nn.Conv2d (groups=1). Use layer_hessian() for its exact block."
                    )
                warn[name] = reason
                continue
            w = m.weight
            out_dim = w.shape[0]
            in_dim = int(w[0].numel())
            prefix = name + "." if name else ""
            pnames = [prefix + "weight"] + ([prefix + "bias"] if m.bias is not None else [])
            out.append(
                _Layer(name=name, module=m, kind="linear" if isinstance(m, nn.Linear) else "conv2d",
                       out_dim=out_dim, in_dim=in_dim, bias=m.bias is not None, param_names=pnames)
            )
        if not out:
            raise HesslabError(
                "layers: no supported layer selected (KFAC handles nn.Linear and nn.Conv2d); "
                + (f"unsupported: {', '.join(f'{_display(k)} ({r})' for k, r in warn.items())}" if warn else
                   "the model has no layer with trainable parameters")
            )
        return out, warn

    def _probe(self, layers: list[_Layer], warn: dict[str, str]) -> list[_Layer]:
        """One forward pass on the first batch: keep the layers called exactly once."""
        calls = {lay.name: 0 for lay in layers}
        shapes: dict[str, tuple[int, ...]] = {}

        def make_hook(lay: _Layer):
            def hook(module, args, kwargs, output):
                calls[lay.name] += 1
                if isinstance(output, Tensor):
                    shapes[lay.name] = tuple(output.shape)
                return None

            return hook

        inputs, targets, _ = self._first_batch()
        handles = [lay.module.register_forward_hook(make_hook(lay), with_kwargs=True) for lay in layers]
        try:
            with torch.no_grad(), self._eval_mode():
                out = self._forward(inputs)
        finally:
            for h in handles:
                h.remove()
        self._check_output(out, targets, first=True)
        kept = []
        for lay in layers:
            c = calls[lay.name]
            if c == 1:
                lay.out_shape = shapes[lay.name][1:]
                kept.append(lay)
            elif c == 0:
                warn[lay.name] = "not called as a module in the forward pass (e.g. used through F.linear)"
            else:
                warn[lay.name] = f"called {c} times per forward pass (weight sharing across calls)"
        self.skipped = dict(warn)
        if warn:
            listed = ", ".join(f"{_display(k)!r} ({r})" for k, r in warn.items())
            warnings.warn(
                f"KFAC: skipped {len(warn)} layer(s) with parameters: {listed}. Their parameters are not "
                "part of the operator; compare with Hessian(..., params=K.param_names).",
                UserWarning,
                stacklevel=3,
            )
        if not kept:
            raise HesslabError(
                "layers: none of the selected Kronecker layers is called exactly once as a module in the "
                "model's forward pass; see the warning for each"
            )
        return kept

    def _set_layout(self, layers: list[_Layer]) -> None:
        """Offsets and permutations in the model's parameter order."""
        names = [p for lay in layers for p in lay.param_names]
        ordered, tensors = select_parameters(self.model, names)
        numel = dict(zip(ordered, (t.numel() for t in tensors)))
        pos = {n: i for i, n in enumerate(ordered)}
        layers = sorted(layers, key=lambda lay: pos[lay.param_names[0]])
        offset = 0
        perms = []
        for lay in layers:
            if [pos[p] for p in lay.param_names] != list(range(pos[lay.param_names[0]], pos[lay.param_names[0]] + len(lay.param_names))):
                raise HesslabError(  # pragma: no cover - named_parameters lists a module's own parameters together
                    f"model: the parameters of layer {_display(lay.name)!r} are not adjacent in named_parameters()"
                )
            lay.offset = offset
            lay.numel = sum(numel[p] for p in lay.param_names)
            lay.perm = _layer_perm(lay.out_dim, lay.in_dim, lay.bias).to(self._device)
            perms.append(lay.perm + offset)
            offset += lay.numel
        self._layers = layers
        self._by_name = {lay.name: lay for lay in layers}
        self.layer_names: list[str] = [lay.name for lay in layers]
        self.param_names: list[str] = [p for lay in layers for p in lay.param_names]
        self._perm = torch.cat(perms)  # kron position -> flat position
        self._identity_layout = bool(torch.equal(self._perm, torch.arange(offset, device=self._device)))

    # ===================================================================== model access
    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training

    def _tensors(self) -> dict[str, Tensor]:
        """Detached (cast) parameters and buffers for ``functional_call``."""
        out = {k: v.detach() for k, v in self.model.named_parameters()}
        out.update({k: v for k, v in self.model.named_buffers()})
        if self._cast_dtype is not None:
            out = {k: v.to(self._cast_dtype) if v.is_floating_point() else v for k, v in out.items()}
        return out

    def _forward(self, inputs: Any, tensors: dict[str, Tensor] | None = None) -> Any:
        tensors = self._tensors() if tensors is None else tensors
        try:
            return call_model(lambda *a, **k: functional_call(self.model, tensors, a, k), inputs)
        except RuntimeError as err:
            ints = [t.dtype for t in input_tensors(inputs) if not t.is_floating_point()]
            if ints:
                raise HesslabError(
                    f"data: the model failed on inputs of dtype {ints[0]}; convert them to floats, e.g. "
                    f"inputs.to({self._op_dtype}). Original error: {err}"
                ) from err
            raise

    def _batches(self, progress: bool = False) -> Iterator[tuple[Any, Tensor, int]]:
        source: Any = self._data.batches()
        if progress and not self._data.single:
            from tqdm.auto import tqdm

            source = tqdm(source, total=len(self._data) or None, desc="KFAC", leave=False, disable=None, unit="batch")
        for index, inputs, targets, size in source:
            check_devices(inputs, targets, self._device, index)
            inputs, targets = cast_batch(inputs, targets, self._cast_dtype)
            yield inputs, targets, size

    def _first_batch(self) -> tuple[Any, Tensor, int]:
        for batch in self._batches():
            return batch
        raise HesslabError("data: holds no samples")  # pragma: no cover - DataSource raises first

    # ===================================================================== loss
    def _check_output(self, out: Any, targets: Tensor, first: bool = False) -> Tensor:
        if not isinstance(out, Tensor):
            raise HesslabError(f"model: KFAC needs a model returning one tensor, got {type(out).__name__}")
        if out.dim() < 1 or (targets.dim() >= 1 and out.shape[0] != targets.shape[0]):
            raise HesslabError(
                f"data: the model's output has shape {tuple(out.shape)} but the targets {tuple(targets.shape)}; "
                "their first dimensions (the batch) must agree"
            )
        if self._loss.kind == "cross_entropy":
            if out.dim() != 2:
                raise HesslabError(
                    f"model: cross-entropy KFAC needs outputs of shape (n, c), got {tuple(out.shape)}; flatten "
                    "extra dimensions into the batch (per-position losses are not supported)"
                )
            if targets.is_floating_point():
                if targets.shape != out.shape:
                    raise HesslabError(
                        f"data: probability targets must have the output's shape {tuple(out.shape)}, got "
                        f"{tuple(targets.shape)}"
                    )
            else:
                if targets.shape != out.shape[:1]:
                    raise HesslabError(
                        f"data: class-index targets must have shape ({out.shape[0]},), got {tuple(targets.shape)}"
                    )
                ignore = getattr(self.loss_fn, "ignore_index", -100)
                if bool((targets == ignore).any()):
                    raise HesslabError(
                        f"data: some targets equal ignore_index={ignore}; the mean then runs over fewer samples "
                        "than the batch holds. Drop those samples from the data."
                    )
                if bool(((targets < 0) | (targets >= out.shape[1])).any()):
                    raise HesslabError(f"data: class-index targets must lie in [0, {out.shape[1]})")
        else:
            if targets.shape != out.shape:
                raise HesslabError(
                    f"data: MSE targets must have the output's shape {tuple(out.shape)}, got {tuple(targets.shape)} "
                    "(broadcasting would change the loss)"
                )
        if first:
            value = self.loss_fn(out, targets)
            if not isinstance(value, Tensor) or value.numel() != 1:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise HesslabError(f"loss_fn: must return a scalar tensor, the mean loss over the batch; got {got}")
            value = float(value)
            if self._loss.kind == "cross_entropy":
                ref = float(F.cross_entropy(out, targets, label_smoothing=self._loss.label_smoothing))
                what = "cross-entropy (mean over the batch)"
            else:
                ref = float(F.mse_loss(out, targets))
                what = "mean squared error (mean over all entries)"
            tol = math.sqrt(torch.finfo(out.dtype).eps) * max(1.0, abs(ref))
            if not abs(value - ref) <= tol:
                raise HesslabError(
                    f"loss_fn: on the first batch it returns {value:.6g} but the {what} is {ref:.6g}; KFAC's "
                    "output Hessian would not match this loss. Pass a loss KFAC supports (loss_type= only for "
                    "callables that compute exactly that loss)."
                )
        return out

    def _sqrt_columns(self, out: Tensor, targets: Tensor) -> Tensor:
        """Columns s_k of a square root of each sample's output Hessian: Σ_k s_k s_kᵀ = ∇²_out ℓ_j.

        Returns:
            (K, n, *out) with K = c (cross-entropy) or D = numel per sample (MSE).
        """
        n = out.shape[0]
        if self._loss.kind == "cross_entropy":
            p = torch.softmax(out.detach(), dim=1)  # (n, c)
            c = p.shape[1]
            w = targets.sum(1, keepdim=True) if targets.is_floating_point() else torch.ones_like(p[:, :1])
            if bool((w < 0).any()):
                raise HesslabError("data: probability targets must be non-negative")
            sp = (p * w).sqrt()  # (n, c)
            eye = torch.eye(c, dtype=p.dtype, device=p.device)
            return sp.T[:, :, None] * (eye[:, None, :] - p[None, :, :])  # (c, n, c)
        D = out[0].numel()
        eye = torch.eye(D, dtype=out.dtype, device=out.device) * math.sqrt(2.0 / D)
        return eye[:, None, :].expand(D, n, D).reshape(D, n, *out.shape[1:])

    # ===================================================================== building
    def update(self) -> None:
        """(Re)build the factors from the model's current parameters (one pass over the data)."""
        L = len(self._layers)
        A = [torch.zeros(lay.in_aug, lay.in_aug, dtype=self.dtype, device=self.device) for lay in self._layers]
        B = [torch.zeros(lay.out_dim, lay.out_dim, dtype=self.dtype, device=self.device) for lay in self._layers]
        count = 0
        flagged: set[str] | None = None if self.curvature == "exact" else set()
        self.ggn_fallback = {}
        tensors = self._tensors()
        for inputs, targets, size in self._batches(progress=self.progress):
            sums, n, flagged = self._batch_terms(inputs, targets, tensors, flagged=flagged, per_sample=False)
            if n != size:
                raise HesslabError(
                    f"data: a batch has {size} targets but the model saw {n} samples; the first dimensions "
                    "of inputs, outputs and targets must be the batch"
                )
            for l in range(L):
                A[l] += sums[l][0]
                B[l] += sums[l][1]
            count += n
        if _distributed():
            for t in A + B:
                _all_reduce_(t)
            c = torch.tensor([float(count)], dtype=torch.float64)
            count = int(round(_all_reduce_(c).item()))
        self.num_data = count
        self._A = [((a + a.T) / (2 * count)) for a in A]
        self._B = [((b + b.T) / (2 * count)) for b in B]
        self.exact_layers = [lay.name for lay in self._layers if flagged and lay.name in flagged]
        self._eig_cache = None
        if self.ggn_fallback:
            reason = next(iter(self.ggn_fallback.values()))
            warnings.warn(
                "KFAC: curvature='exact' needs second derivatives through the network, which autograd "
                f"cannot give after layer(s) {', '.join(repr(_display(k)) for k in self.ggn_fallback)} "
                f"({reason}). Their B uses the Gauss-Newton M, exact only where the network after them is "
                "piecewise linear; pass curvature='ggn' to use it everywhere without this warning.",
                UserWarning,
                stacklevel=3,
            )
        bad = [lay.name for lay, a, b in zip(self._layers, self._A, self._B)
               if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()))]
        if bad:
            raise HesslabError(
                f"model: the Kronecker factors of {', '.join(map(repr, bad))} hold NaN or Inf; check the data "
                "and parameters for NaN/Inf, or build in float64 (dtype=torch.float64)"
            )

    def _batch_terms(
        self, inputs: Any, targets: Tensor, tensors: dict[str, Tensor], *, flagged: set[str] | None,
        per_sample: bool,
    ) -> tuple[list[Any], int, set[str]]:
        """One batch's contribution to every layer's factors.

        Args:
            flagged: layers whose M is computed by exact Hessian-vector products; ``None``
                means "not decided yet": decide on this batch (``curvature="exact"``).
            per_sample: return :class:`SampleTerms` per layer instead of the sums.

        Returns:
            ``(terms, n, flagged)``: per layer ``(Σ_j (1/P) Σ_t x̃x̃ᵀ, Σ_j Σ_t M_j[t,t])`` or
            ``SampleTerms``; the batch size; the flagged layers.
        """
        layers = self._layers
        reduce = self.kfac_approx == "reduce"
        xs: dict[str, Tensor] = {}
        deltas: dict[str, Tensor] = {}

        def make_hook(lay: _Layer):
            def hook(module, args, kwargs, output):
                x = args[0] if args else next(iter(kwargs.values()))
                xs[lay.name] = x.detach()
                delta = torch.zeros_like(output, requires_grad=True)
                deltas[lay.name] = delta
                return output + delta

            return hook

        handles = [lay.module.register_forward_hook(make_hook(lay), with_kwargs=True) for lay in layers]
        try:
            with torch.enable_grad(), self._eval_mode():
                out = self._forward(inputs, tensors)
        finally:
            for h in handles:
                h.remove()
        out = self._check_output(out, targets)
        n = out.shape[0]
        missing = [lay.name for lay in layers if lay.name not in deltas]
        if missing:
            raise HesslabError(f"model: layer(s) {missing} were not called on this batch; KFAC needs a fixed forward graph")

        # ---- inputs: A terms (computed at once: later in-place ops cannot alter them)
        X: list[Tensor] = []
        A_terms: list[Tensor | None] = []
        for lay in layers:
            rows = lay.input_rows(xs[lay.name].to(self.dtype))  # (n, P, in)
            if lay.bias:
                rows = torch.cat([rows, torch.ones_like(rows[..., :1])], dim=-1)
            lay.positions = rows.shape[1]
            if reduce:
                rows = rows.mean(dim=1, keepdim=True)  # the mean patch ū_j (bias entry 1)
            if per_sample:
                X.append(rows)
                A_terms.append(None)
            else:
                flat = rows.reshape(-1, rows.shape[-1])
                A_terms.append(flat.T @ flat / rows.shape[1])
        xs.clear()

        # ---- outputs: the Gauss-Newton part through the square-root columns
        delta_list = [deltas[lay.name] for lay in layers]
        S = self._sqrt_columns(out, targets)  # (K, n, *out)
        deciding = flagged is None
        ggn_layers = [l for l, lay in enumerate(layers) if deciding or lay.name not in flagged]
        B_terms: list[Tensor | None] = [None] * len(layers)
        M_ps: list[Tensor | None] = [None] * len(layers)
        probes: dict[int, Tensor] = {}
        Gv: dict[int, Tensor] = {}  # G_ll v_l, the diagonal blocks
        Gv_joint: dict[int, Tensor] = {}  # (G v)_l over all layers jointly
        if deciding:
            gen = torch.Generator(device="cpu").manual_seed(1234)
            for l in ggn_layers:
                d = delta_list[l]
                probes[l] = torch.randn(d.shape, generator=gen, dtype=torch.float64).to(d)
                Gv[l] = torch.zeros_like(d)
                Gv_joint[l] = torch.zeros_like(d)
        if ggn_layers:
            for k in range(S.shape[0]):
                grads = torch.autograd.grad(
                    out, [delta_list[l] for l in ggn_layers], S[k], retain_graph=True, allow_unused=True
                )
                if deciding:
                    coefs = {
                        l: (g * probes[l]).reshape(n, -1).sum(1) for l, g in zip(ggn_layers, grads) if g is not None
                    }  # (n,) per layer: ⟨s_k, v_l⟩ per sample
                    total = sum(coefs.values()) if coefs else None
                for l, g in zip(ggn_layers, grads):
                    if g is None:
                        continue
                    lay = layers[l]
                    s = lay.output_rows(g)  # (n, P, out)
                    if reduce:
                        s = s.sum(dim=1, keepdim=True)  # Σ_t: the sum over positions
                    if per_sample:
                        term = torch.einsum("npo,npq->npoq", s, s)
                        M_ps[l] = term if M_ps[l] is None else M_ps[l] + term
                    else:
                        flat = s.reshape(-1, s.shape[-1])
                        term = flat.T @ flat
                        B_terms[l] = term if B_terms[l] is None else B_terms[l] + term
                    if deciding:
                        shape = (n, *([1] * (g.dim() - 1)))
                        Gv[l] += g * coefs[l].reshape(shape)
                        Gv_joint[l] += g * total.reshape(shape)

        # ---- the exact part: decide which layers need it, then Hessian-vector products
        need_hvp = deciding or bool(flagged)
        first: tuple[Tensor | None, ...] = (None,) * len(layers)
        if need_hvp:
            loss_sum = self.loss_fn(out, targets).reshape(()) * n  # Σ_j ℓ_j
            try:
                first = torch.autograd.grad(loss_sum, delta_list, create_graph=True, allow_unused=True)
            except RuntimeError as err:
                if not deciding:
                    raise
                for lay in layers:
                    self.ggn_fallback[lay.name] = str(err).split("\n")[0]
        if deciding:
            flagged = set()
            tol = math.sqrt(torch.finfo(self.dtype).eps)

            def differs(hv: Tensor, gv: Tensor) -> bool:
                return float((hv - gv).norm()) > tol * max(float(hv.norm()), float(gv.norm()))

            # One joint product H v over all layers first: where (H − G)v vanishes in a
            # layer's block (always, for piecewise-linear networks) nothing is flagged there.
            usable = [l for l in ggn_layers if first[l] is not None and first[l].requires_grad]
            suspects = usable
            if usable:
                try:
                    joint = torch.autograd.grad(
                        [first[l] for l in usable], [delta_list[l] for l in usable], [probes[l] for l in usable],
                        retain_graph=True, allow_unused=True,
                    )
                    suspects = [
                        l for l, hv in zip(usable, joint)
                        if differs(torch.zeros_like(Gv_joint[l]) if hv is None else hv, Gv_joint[l])
                    ]
                except RuntimeError:
                    suspects = usable  # find the layers affected one by one below
            for l in suspects:
                g1 = first[l]
                if g1 is None or not g1.requires_grad:
                    continue
                try:
                    (hv,) = torch.autograd.grad(g1, delta_list[l], probes[l], retain_graph=True, allow_unused=True)
                except RuntimeError as err:  # an op without a second derivative after this layer
                    self.ggn_fallback[layers[l].name] = str(err).split("\n")[0]
                    continue
                if differs(torch.zeros_like(Gv[l]) if hv is None else hv, Gv[l]):
                    flagged.add(layers[l].name)
            flagged_now = flagged
        else:
            flagged_now = flagged
        for l, lay in enumerate(layers):
            if lay.name not in flagged_now:
                continue
            g1 = first[l]
            d = delta_list[l]
            rows_shape = lay.output_rows(d).shape  # (n, P, C)
            P, C = rows_shape[1], rows_shape[2]
            # expand: M_j[t, t] column by column, one position at a time (P·C products);
            # reduce: Σ_{t,t'} M_j[t, t'] from one direction per channel at all positions (C)
            spots: list[int | None] = [None] if reduce else list(range(P))
            M_l = torch.zeros(n, len(spots), C, C, dtype=self.dtype, device=self.device)
            if g1 is not None and g1.requires_grad:
                for i, t in enumerate(spots):
                    for c in range(C):
                        E = torch.zeros(rows_shape, dtype=d.dtype, device=d.device)
                        if t is None:
                            E[:, :, c] = 1
                        else:
                            E[:, t, c] = 1
                        (hv,) = torch.autograd.grad(
                            g1, d, lay.rows_to_output(E, d.shape), retain_graph=True, allow_unused=True
                        )
                        if hv is not None:
                            r = lay.output_rows(hv)
                            M_l[:, i, :, c] = r.sum(1) if t is None else r[:, t, :]
            M_l = (M_l + M_l.transpose(-1, -2)) / 2
            if per_sample:
                M_ps[l] = M_l
            else:
                B_terms[l] = M_l.sum(dim=(0, 1))

        terms: list[Any] = []
        for l, lay in enumerate(layers):
            if per_sample:
                M = M_ps[l] if M_ps[l] is not None else torch.zeros(
                    n, X[l].shape[1], lay.out_dim, lay.out_dim, dtype=self.dtype, device=self.device
                )
                terms.append(SampleTerms(M=M, X=X[l]))
            else:
                Bt = B_terms[l] if B_terms[l] is not None else torch.zeros(
                    lay.out_dim, lay.out_dim, dtype=self.dtype, device=self.device
                )
                terms.append((A_terms[l], Bt))
        return terms, n, flagged_now

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
        inputs, targets = batch
        check_devices(inputs, targets, self._device, 0)
        inputs, targets = cast_batch(inputs, targets, self._cast_dtype)
        flagged = set(self.exact_layers) if self.curvature == "exact" else set()
        terms, _, _ = self._batch_terms(inputs, targets, self._tensors(), flagged=flagged, per_sample=True)
        return dict(zip(self.layer_names, terms))

    # ===================================================================== access
    def _layer(self, layer: str | nn.Module) -> _Layer:
        if isinstance(layer, nn.Module):
            for lay in self._layers:
                if lay.module is layer:
                    return lay
            raise HesslabError(f"layer: the given {type(layer).__name__} is not one of the KFAC layers {self.layer_names}")
        if isinstance(layer, str) and layer in self._by_name:
            return self._by_name[layer]
        raise HesslabError(
            f"layer: {layer!r} is not one of the KFAC layers {self.layer_names}"
            + (f" (it was skipped: {self.skipped[layer]})" if isinstance(layer, str) and layer in self.skipped else "")
        )

    @property
    def factors(self) -> dict[str, KronFactors]:
        """``{layer name: KronFactors(A, B)}``, A (in+1, in+1), B (out, out); block = kron(B, A)."""
        return {lay.name: KronFactors(a, b) for lay, a, b in zip(self._layers, self._A, self._B)}

    def layer_slice(self, layer: str | nn.Module) -> slice:
        """The entries of ``layer`` in the operator's flat vectors (its weight, then its bias)."""
        return self._layer(layer).slice

    def layer_shape(self, layer: str | nn.Module) -> tuple[int, int]:
        """(out, in + 1) (or (out, in) without bias): the augmented weight matrix's shape."""
        lay = self._layer(layer)
        return lay.out_dim, lay.in_aug

    # ===================================================================== products
    def _to_kron(self, V: Tensor) -> Tensor:
        """(n, b) in the model layout -> (b, n) in the augmented row-major layout."""
        if self._identity_layout:
            return V.T.contiguous()
        return V.index_select(0, self._perm).T.contiguous()

    def _from_kron(self, R: Tensor) -> Tensor:
        """(b, n) augmented row-major -> (n, b) model layout."""
        if self._identity_layout:
            return R.T.contiguous()
        out = torch.empty(R.shape[1], R.shape[0], dtype=R.dtype, device=R.device)
        return out.index_copy_(0, self._perm, R.T)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._from_kron(_ops.kron_matmul(self._A, self._B, self._to_kron(V)))

    def block_dense(self, layer: str | nn.Module) -> Tensor:
        """The dense block B ⊗ A of one layer in the model layout (weight, then bias).

        Returns:
            (n_l, n_l) with n_l = out·(in + 1) (out·in without bias); compare with
            ``layer_hessian(model, loss_fn, data, layer).to_dense()``.
        """
        lay = self._layer(layer)
        l = self._layers.index(lay)
        K = torch.kron(self._B[l], self._A[l])  # kron layout
        inv = torch.empty_like(lay.perm)
        inv[lay.perm] = torch.arange(lay.numel, device=lay.perm.device)
        return K[inv][:, inv]

    def to_dense(self, max_size: int = 4096, chunk_size: int = 256) -> Tensor:
        """The dense block-diagonal matrix (n, n) in the model layout (exact, no products)."""
        n = self.shape[0]
        if n > max_size:
            return super().to_dense(max_size, chunk_size)  # raises with the message
        return torch.block_diag(*[self.block_dense(lay.name) for lay in self._layers])

    def trace(self) -> float:
        """tr(K) = Σ_l tr(B_l) tr(A_l), exactly."""
        return float(sum(torch.trace(a) * torch.trace(b) for a, b in zip(self._A, self._B)))

    # ===================================================================== spectra
    def _eig(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per layer (U_A, λ_A, U_B, λ_B), eigenvalues ascending; A (and a PSD B) clamped at 0.

        The factors are decomposed in float64 and cast back: besides the accuracy, MKL's
        multi-threaded float32 ``syevd`` (torch 2.14 on CPU) was seen to return NaN
        eigenvectors for factors with exactly-zero rows (dead ReLU inputs).
        """
        if self._eig_cache is None:
            cache = []
            for lay, a, b in zip(self._layers, self._A, self._B):
                lam_a, U_a = _eigh64(a, f"A of layer {_display(lay.name)!r}")
                lam_b, U_b = _eigh64(b, f"B of layer {_display(lay.name)!r}")
                lam_a = lam_a.clamp_min(0)  # a Gram matrix: negatives are rounding
                if lay.name not in self.exact_layers:  # Gauss-Newton B is PSD too
                    lam_b = lam_b.clamp_min(0)
                cache.append((U_a, lam_a, U_b, lam_b))
            self._eig_cache = cache
        return self._eig_cache

    def eigenvalues(self, per_layer: bool = False) -> Tensor | dict[str, Tensor]:
        """All eigenvalues of the operator, products λ_B[i] λ_A[j] of the factors'.

        Args:
            per_layer: Return ``{layer: (n_l,)}`` instead of one list.

        Returns:
            (n,) sorted descending, or per layer (n_l,) sorted descending.
        """
        per = {}
        for lay, (_, lam_a, _, lam_b) in zip(self._layers, self._eig()):
            per[lay.name] = torch.outer(lam_b, lam_a).reshape(-1).sort(descending=True).values
        if per_layer:
            return per
        return torch.cat(list(per.values())).sort(descending=True).values

    def topk(self, layer: str | nn.Module, k: int) -> tuple[Tensor, Tensor]:
        """The k largest eigenpairs of one layer's block B ⊗ A, from the factors (``kron_topk``).

        The eigenvector of the pair (i, j) is u_B,i ⊗ u_A,j: reshaped to the augmented
        weight (out, in+1) it is the rank-one matrix u_B,i u_A,jᵀ.

        Args:
            layer: A KFAC layer (name or module).
            k: 1 ≤ k ≤ n_l.

        Returns:
            ``(values (k,) descending, vectors (n_l, k))`` with orthonormal columns in the
            layer's flat layout (weight, then bias), i.e. the entries ``layer_slice(layer)``
            of the operator's vectors.
        """
        lay = self._layer(layer)
        if not (isinstance(k, int) and 1 <= k <= lay.numel):
            raise HesslabError(f"k: must be an integer with 1 <= k <= {lay.numel} (the layer's size), got {k!r}")
        U_a, lam_a, U_b, lam_b = self._eig()[self._layers.index(lay)]
        values, ib, ia = _ops.kron_topk(lam_b.contiguous(), lam_a.contiguous(), k)
        vec = (U_b[:, ib][:, None, :] * U_a[:, ia][None, :, :]).reshape(lay.numel, k)  # kron layout
        out = torch.empty_like(vec)
        out[lay.perm] = vec
        return values, out

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
        p = float(p)
        damping = float(damping)
        if not (math.isfinite(p) and math.isfinite(damping)):
            raise HesslabError(f"p, damping: must be finite, got {p}, {damping}")
        low = min(float(v.min()) for v in self.eigenvalues(per_layer=True).values()) + damping
        if p < 0 and low <= 0:
            raise HesslabError(
                f"damping: (B ⊗ A + damping)^{p:g} is singular: the smallest eigenvalue plus damping is "
                f"{low:.3g}. Pass damping > {-low + 0.0:.3g} (e.g. 1e-3 times the largest eigenvalue)."
            )
        if p != int(p) and low < 0:
            raise HesslabError(
                f"p: a non-integer power of an indefinite operator (smallest eigenvalue plus damping {low:.3g}, "
                "from an exact, indefinite B) is not real; raise damping or use curvature='ggn'"
            )
        return KFACFunction(self, p, damping)

    def inverse(self, damping: float) -> KFACFunction:
        """(B ⊗ A + damping·I)⁻¹ per block: ``power(-1, damping)``."""
        return self.power(-1.0, damping)

    def __repr__(self) -> str:
        return (
            f"KFAC(layers={self.layer_names}, shape={self.shape}, curvature={self.curvature!r}, "
            f"num_data={self.num_data}, dtype={self.dtype})"
        )


def _eigh64(M: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` in float64, cast back to M's dtype; raises on non-finite output."""
    lam, U = torch.linalg.eigh(M.to(torch.float64))
    if not (bool(torch.isfinite(lam).all()) and bool(torch.isfinite(U).all())):
        raise HesslabError(f"model: the eigendecomposition of the factor {what} failed (NaN/Inf)")
    return lam.to(M.dtype), U.to(M.dtype)


class KFACFunction(LinearOperator):
    """f(B ⊗ A) = (B ⊗ A + damping)^p per block of a :class:`KFAC`, via ``kron_eig_apply``.

    Shares the parent's layout (the model's parameter order) and its cached
    eigendecompositions of the factors. Build with :meth:`KFAC.power` or
    :meth:`KFAC.inverse`.
    """

    def __init__(self, parent: KFAC, p: float, damping: float):
        super().__init__(parent.shape, parent.dtype, parent.device)
        self.parent = parent
        self.p = p
        self.damping = damping

    def _matmat(self, V: Tensor) -> Tensor:
        K = self.parent
        eig = K._eig()
        UA = [e[0] for e in eig]
        lamA = [e[1] for e in eig]
        UB = [e[2] for e in eig]
        lamB = [e[3] for e in eig]
        R = _ops.kron_eig_apply(UA, lamA, UB, lamB, K._to_kron(V), power=self.p, damping=self.damping)
        return K._from_kron(R)

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
        raise HesslabError("layer: pass the layer (a module name, a module, or parameter names); use Hessian() for all")
    return Hessian(model, loss_fn, data, params=layer, dtype=dtype, **kwargs)
