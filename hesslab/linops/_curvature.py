"""The curvature-operator base: per-batch block products accumulated over the data.

:class:`CurvatureOperator` turns a per-batch block product (defined by a subclass, see
:mod:`hesslab.linops._hessian` for the Hessian and the generalized Gauss-Newton) into
the operator of the sample-mean loss over all of the data.

Notation:
    θ ∈ R^n: the selected parameters (flattened row-major, in ``named_parameters()``
        order; see :mod:`hesslab.linops._params`). The others are held fixed.
    Batches B_1, ..., B_K with n_k samples each, N = Σ_k n_k (over all ranks when
        torch.distributed is initialized).
    L_k(θ) = loss_fn(f(X_k; θ), y_k): the batch MEAN loss that ``loss_fn`` returns.
    L(θ) = (1/N) Σ_k n_k L_k(θ): the sample-mean loss over all of the data. When every
        L_k is a mean of per-sample losses ℓ_j, L = (1/N) Σ_j ℓ_j exactly, however the
        data is split into batches (an uneven last batch included).
    z = f(X; θ): the model's outputs on a batch; J = ∂z/∂θ; ∇²_z L_k the loss Hessian
        with respect to the outputs.
    V ∈ R^{n×b}: a block of b columns, all served by one pass over the data.

Operators:
    Hessian:  H = ∇²L = (1/N) Σ_k n_k ∇²_θ L_k.
    GGN:      G = (1/N) Σ_k n_k J_kᵀ (∇²_z L_k) J_k, the Gauss-Newton / outer-product part
              H_O of Singh et al.; H − G is the functional part H_F.

Product paths (``method=``):
    ``"autograd"`` (the default): double backward. Per batch, one forward pass and the
        first-order graph g = ∇_θ L_k (``create_graph=True``); then the b columns go
        through backward-of-backward, H v = ∂⟨g, v⟩/∂θ: all at once with
        ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap) or one column at a
        time over the same graph (``batched_columns``). Either way the b columns share
        one pass over the data. Works for anything autograd differentiates twice,
        BatchNorm in train mode and dropout included.
    ``"func"``: torch.func forward-over-reverse, ``vmap(jvp(grad(L_k)))`` over the b
        columns (GGN: ``vmap(jvp(f))``, ``vmap(jvp(grad(loss)))`` on the outputs,
        ``vmap(vjp(f))``). Eval mode only (refused with ``train_mode=True``: BatchNorm's
        running-statistics update breaks vmap, and torch's second-order forward mode
        through batch_norm with batch statistics is unreliable).
    ``"finite_difference"`` (Hessian only): central differences of two gradients per
        column, no double backward; see :mod:`hesslab.linops._finite_difference`. The
        one path of FSDP2-sharded models (vectors are local shards, ``shards`` says how
        they fit together; see :mod:`hesslab.linops._sharded`).
    ``reuse_graph``: with a single batch in memory the first-order graph is kept across
        products, so a product costs only the backward-of-backward; it is rebuilt when a
        parameter or buffer of the model changes in place (version counters are watched;
        writes through ``.data`` are not seen).

    Columns (``batched_columns="auto"``) follow a rule, never a timing, so two identical
    calls take the same path and give the same bits: on the CPU one column at a time over
    the kept graph ("loop"; the batched vmap variants lose to a loop there for models of
    realistic size), on other devices (CUDA) one batched backward ("batched"), falling
    back on the loop, once and recorded in :attr:`CurvatureOperator.column_fallback`, when
    an op of the model has no batching rule. The graph is kept for a single batch. The
    measurements behind these defaults are in benchmarks/RESULTS.md ("Design measurements
    (moved from docstrings)").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hesslab.errors import HesslabError
from hesslab.linops._base import LinearOperator
from hesslab.linops._compiled import COMPILED, compile_setup, compiled_batch_product
from hesslab.linops._fdcheck import Difference, check_first_product
from hesslab.linops._finite_difference import METHOD as _FD, fd_batch_product, fd_setup
from hesslab.linops._model import ModelData, all_reduce_sum_, check_targets, distributed_active
from hesslab.linops._sharded import ShardedParameters, fsdp_setup, local_shapes
from hesslab.linops._params import (
    ParamSpec,
    columns_to_params,
    flatten_grads,
    flatten_tensors,
    params_to_columns,
    select_parameters,
    unflatten_vector,
)
from hesslab.linops._wrapped import unwrap_model

__all__ = ["CurvatureOperator"]

_METHODS = ("auto", "func", "autograd", _FD)


@dataclass
class _State:
    """The autograd graph of one batch, kept between products when reused."""

    leaves: list[Tensor]
    tensors: dict[str, Any]
    loss: Tensor


class CurvatureOperator(LinearOperator):
    """Shared machinery of curvature operators over a model, a loss and data.

    Subclasses define one per-batch block product in two forms: ``_func_product``
    (torch.func) and ``_build_state`` / ``_apply_state`` (autograd, with a graph that
    can be kept). The base iterates over the data, weights each batch by its number
    of samples, all-reduces across ranks and checks the result; everything about the
    model and the data (calls, modes, casting, batches, collectives, the determinism
    check) is its :class:`~hesslab.linops._model.ModelData`.

    Args:
        model: The network, called as ``model(inputs)`` (or ``model(*inputs)``,
            ``model(**inputs)`` for tuple or dict inputs). Never modified: its mode and
            ``requires_grad`` flags are restored after every use, and parameters are
            substituted functionally (``torch.func.functional_call``).
        loss_fn: ``loss_fn(output, targets) -> scalar``, the MEAN loss over the batch
            (e.g. ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()`` with the default
            ``reduction="mean"``). A summed loss would weight batches wrongly. ``None``:
            the model's output carries the loss (``.loss`` or ``["loss"]``, transformers
            style); for a causal LM (``*ForCausalLM``) the operator is then the Hessian of
            the mean token cross-entropy over ALL predicted tokens of the data (labels
            shifted by one, ``-100`` ignored), each batch weighted by its number of
            predicted tokens (see :mod:`hesslab.linops._lmloss`).
        data: One ``(inputs, targets)`` batch, or a re-iterable iterable of them (a list,
            a ``DataLoader``), iterated once per product. A batch may also be a dict
            (``BatchEncoding``, any mapping): ``model(**batch)``, its ``labels`` the targets.
        params: Which parameters θ are: ``None`` for all with ``requires_grad=True`` (a
            frozen base with trainable adapters, LoRA/PEFT style, gives the adapters'), or
            names, submodule names, glob patterns, modules or parameter tensors (see
            :func:`hesslab.linops._params.select_parameters`). The operator is then the
            block for those parameters.
        dtype: Run in this floating dtype (e.g. ``torch.float64`` for small models): the
            parameters, buffers and floating data are cast copies; the model itself is
            untouched. ``None`` keeps the parameters' dtype.
        train_mode: Evaluate the model in train mode (BatchNorm batch statistics,
            dropout). Default: eval mode. BatchNorm running statistics are never updated;
            dropout masks come from a forked RNG seeded by (``seed``, batch index), so every
            product sees the same masks and the global RNG is untouched.
        check_deterministic: At construction, apply the operator twice to one random
            vector and raise unless the results agree (done in train mode and when
            ``data`` is an iterable of batches, which may shuffle or augment).
        progress: Show a tqdm bar over batches during products (quiet when not on a
            terminal).
        reuse_graph: ``"auto"``: keep the first-order autograd graph across products when
            ``data`` is a single batch; ``True``: require it (single batch only);
            ``False``: rebuild per product.
        method: ``"auto"`` (= ``"autograd"``, the faster path measured on the CPU; for an
            FSDP2-sharded model ``"finite_difference"``, the only one it allows, see
            :mod:`hesslab.linops._sharded`), ``"autograd"``, ``"func"`` or ``"finite_difference"``.
        fd_dtype: The dtype of the finite-difference gradients (None: the operator's).
        batched_columns: ``"auto"``: by rule, one column at a time over the graph on the
            CPU, one batched backward (``is_grads_batched``) elsewhere (CUDA); ``True`` /
            ``False`` force either. A model without batching rules falls back on the
            loop (once, recorded in ``column_fallback``). Autograd path only.
        batch_size_fn: ``(inputs, targets) -> int``, the number of samples of a batch
            (its weight). Default: ``targets.shape[0]``.
        check_derivatives: At the first product, compare its first column on the first
            batch with central finite differences of first derivatives (float64) and raise
            when autograd's second derivatives are wrong (a backward that is not itself
            differentiable); see :mod:`hesslab.linops._fdcheck`. Costs about two gradient
            passes over one batch, once.
        compile: ``"auto"`` (by rule: eager), ``True`` (inductor), ``False`` or a
            ``torch.compile`` backend: the batch product compiled, see ``_compiled``.

    Attributes:
        notes: What hesslab decided for this model, e.g. that products run under the math
            SDPA backend (attention models; logged once per model).
        param_names: The selected parameter names, in layout order.
        param_shapes: Their shapes.
        hvp_path: ``"graph"`` (kept autograd graph), ``"autograd"`` or ``"func"``: the
            path products take now.
        column_mode: ``"loop"`` or ``"batched"``, resolved at construction.
        column_fallback: ``None``, or why the batched columns fell back on the loop.

    Raises:
        HesslabError: for bad arguments, each naming the argument: a loss that is not a
            scalar or is NaN/Inf, no parameter requiring grad or ``params`` matching
            nothing, empty data, data on another device than the model, integer inputs
            to a model that needs floats, half-precision data, inputs of the wrong width,
            outputs and targets of different lengths, float class indices with
            cross-entropy, MSE targets that would broadcast, a loss without derivatives,
            a non-deterministic operator; at the first product, second derivatives that
            disagree with finite differences (``check_derivatives``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        data: Any,
        params: ParamSpec = None,
        *,
        dtype: torch.dtype | None = None,
        train_mode: bool = False,
        check_deterministic: bool = True,
        progress: bool = False,
        reuse_graph: bool | str = "auto",
        method: str = "auto",
        fd_dtype: torch.dtype | None = None,
        batched_columns: bool | str = "auto",
        batch_size_fn: Callable[[Any, Tensor], int] | None = None,
        check_derivatives: bool = True,
        seed: int = 0,
        compile: bool | str = "auto",
    ):
        model, params = unwrap_model(model, params)
        method = fsdp_setup(model, type(self), method, dtype, fd_dtype)  # FSDP2: finite differences
        _check_options(method, batched_columns, reuse_graph, train_mode)
        md = ModelData(
            model, loss_fn, data, dtype=dtype, train_mode=train_mode, progress=progress,
            batch_size_fn=batch_size_fn, name=type(self).__name__, seed=seed,
        )
        self._md = md
        self.notes: list[str] = md.notes  # the math attention backend, the loss used
        self.model = model
        self.loss_fn = loss_fn
        self.train_mode = md.train_mode
        self.progress = md.progress
        names, tensors = select_parameters(model, params)
        md.check_parameters(tensors)
        self.param_names: list[str] = names
        self.param_shapes: list[torch.Size] = local_shapes(tensors)  # FSDP2: the local shards
        n = sum(math.prod(s) for s in self.param_shapes)
        super().__init__((n, n), md.dtype, md.device)
        self._sharded = ShardedParameters.attach(self, tensors)  # None unless FSDP2; sets shards

        if reuse_graph is True and method in ("func", _FD):
            raise HesslabError(
                "reuse_graph: True keeps an autograd graph; it needs method='autograd'"
            )
        if reuse_graph is True and not md.single:
            raise HesslabError(
                "reuse_graph: True needs data to be a single (inputs, targets) batch in memory; "
                "with an iterable of batches use reuse_graph='auto' or False"
            )
        self._reuse = md.single and reuse_graph in ("auto", True) and method not in ("func", _FD)
        self._path = method if method in ("func", _FD) else "autograd"
        fd_setup(self, method, fd_dtype)
        compile_setup(self, compile, method, reuse_graph)
        self._column_mode = _column_rule(batched_columns, self.device)
        self.column_fallback: str | None = None
        self._state: _State | None = None
        self._state_key: tuple | None = None
        self._check_derivatives = bool(check_derivatives) and method != _FD

        self._validate_first_batch()
        if check_deterministic:
            md.check_determinism(lambda v: self._product(v, reuse=False), n)

    # ----------------------------------------------------------------- layout
    @property
    def hvp_path(self) -> str:
        """The path products take now: ``"graph"``, ``"autograd"`` or ``"func"``."""
        return "graph" if self._reuse else self._path

    @property
    def column_mode(self) -> str:
        """How the autograd path applies b columns: ``"batched"`` or ``"loop"``.

        Resolved at construction by rule (see ``batched_columns``); it turns to
        ``"loop"`` once if the model has no batching rule (``column_fallback`` says why).
        """
        return self._column_mode

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Per-parameter tensors -> a flat vector.

        Shapes ``param_shapes`` give (n,); the same with a trailing b give (n, b).
        """
        return flatten_tensors(tensors, self.param_shapes)

    def unflatten(self, vec: Tensor) -> list[Tensor]:
        """A flat vector -> per-parameter views.

        (n,) gives shapes ``param_shapes``; (n, b) gives those shapes with a trailing b.
        """
        return unflatten_vector(vec, self.param_shapes)

    @property
    def num_data(self) -> int:
        """N, the number of samples the mean loss runs over (all ranks together)."""
        return self._md.count()

    # ------------------------------------------------------------ model access
    def _tensors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(selected, others)``: the selected parameters and everything else, by name."""
        full = self._md.tensors()
        selected = {k: full.pop(k) for k in self.param_names}
        return selected, full

    def _forward(self, tensors: dict[str, Tensor], inputs: Any) -> Any:
        """The model's output with ``tensors`` substituted (see ``ModelData.forward``)."""
        return self._md.forward(tensors, inputs)

    def _check_output(self, out: Any) -> Any:
        """Validate the model's output (subclasses that need a tensor check here)."""
        return out

    def _loss(self, output: Any, targets: Tensor) -> Tensor:
        return self._md.loss(output, targets)

    def _validate_first_batch(self) -> None:
        """One forward pass on the first batch: devices, input dtypes, a finite scalar loss."""
        index, inputs, targets, _ = self._md.first_batch()
        with torch.no_grad(), self._md.model_mode(), self._md.batch_rng(index):
            selected, others = self._tensors()
            out = self._check_output(self._md.forward({**others, **selected}, inputs, first=True))
            check_targets(self._md.loss_fn, out, targets, index)
            loss = self._loss(out, targets)
            self._md.check_loss_head({**others, **selected}, inputs, targets)
        self._md.check_differentiable(out, targets)
        if not loss.is_floating_point():
            raise HesslabError(f"loss_fn: returned a {loss.dtype} loss; expected a floating scalar")
        if not bool(torch.isfinite(loss)):
            raise HesslabError(
                f"loss_fn: the loss is {loss.item()} on batch {index} of data; check the inputs "
                "and targets for NaN/Inf and the model's parameters"
            )

    # -------------------------------------------------------------- products
    def _matmat(self, V: Tensor) -> Tensor:
        out = self._product(V, reuse=self._reuse)
        if self._check_derivatives and type(self)._difference is not None:
            self._check_derivatives = False  # once, at the first product
            own = self._md.single and not self.train_mode and not distributed_active()
            check_first_product(self, V[:, 0], out[:, 0] if own else None, type(self)._difference)
        return out

    def _product(self, V: Tensor, reuse: bool) -> Tensor:
        """(1/N) Σ_k n_k A_k V over all batches (and ranks); V (n, b) -> (n, b)."""
        if self._sharded is not None:
            return self._sharded.product(V)
        n, b = V.shape
        Vs = columns_to_params(V, self.param_shapes)  # [(b, *s_i)]
        one = self._md.single and not distributed_active()  # one batch: A_1 V is the mean as it is
        acc, count = None, 0
        with torch.enable_grad(), self._md.model_mode():
            for _, inputs, targets, size in self._md.batches():
                parts = self._batch_product(inputs, targets, Vs, reuse)  # [(b, *s_i)]
                cols = params_to_columns(parts)  # (n, b), a fresh tensor
                if one:
                    acc = cols
                else:
                    acc = cols.mul_(size) if acc is None else acc.add_(cols, alpha=size)
                count += size
        if acc is None:
            acc = torch.zeros(n, b, dtype=self.dtype, device=self.device)
        num_data = self._md.set_count(count)
        if not one:  # Σ_k n_k A_k V over all batches and ranks, over N
            acc = all_reduce_sum_(acc).div_(num_data)
        # a sum is finite only if every entry is: one reduction instead of an (n, b) mask
        if not bool(torch.isfinite(acc.sum())) and not bool(torch.isfinite(acc).all()):
            _diagnose_nonfinite(self, V, "product")
        return acc

    def _batch_product(
        self, inputs: Any, targets: Tensor, Vs: list[Tensor], reuse: bool
    ) -> list[Tensor]:
        """One batch's block product [(b, *s_i)], by the kept graph, torch.func or autograd."""
        if reuse:
            key = self._md.version_key()
            if self._state is None or self._state_key != key:
                self._state = None  # free the old graph first
                selected, others = self._tensors()
                self._state = self._build_state(selected, others, inputs, targets)
                self._state_key = key
            return self._apply_state(self._state, Vs)
        if self._path == _FD:
            return fd_batch_product(self, inputs, targets, Vs)
        if self._path == COMPILED:
            return compiled_batch_product(self, inputs, targets, Vs)
        selected, others = self._tensors()
        if self._path == "func":
            out = self._func_product(selected, others, inputs, targets, Vs)
            return [out[k].detach() for k in self.param_names]
        state = self._build_state(selected, others, inputs, targets)
        return self._apply_state(state, Vs)

    def _batched_grad(
        self, outputs: Sequence[Tensor], inputs: Sequence[Tensor], grad_outputs: Sequence[Tensor]
    ) -> list[Tensor | None]:
        """Vector-Jacobian products of ``outputs`` w.r.t. ``inputs`` for b stacked cotangents.

        Batched (``is_grads_batched``) or one column at a time, by :attr:`column_mode`;
        a batched call that fails for want of a batching rule switches the operator to
        the loop for good and records why in ``column_fallback``.

        Args:
            outputs: Tensors o_i (all requiring grad).
            inputs: Leaves x_j.
            grad_outputs: Shapes (b, *o_i.shape).

        Returns:
            Per input x_j: shape (b, *x_j.shape), or None where unused.
        """
        if self._column_mode == "batched":
            try:
                return _grad_batched(outputs, inputs, grad_outputs)
            except RuntimeError as err:  # no batching rule for some op of the model
                self._column_mode = "loop"
                self.column_fallback = str(err).split("\n")[0]
        return _grad_loop(outputs, inputs, grad_outputs)

    def _leaves(self, selected: dict[str, Tensor]) -> list[Tensor]:
        return [selected[k].detach().requires_grad_(True) for k in self.param_names]

    def _zeros(self, b: int) -> list[Tensor]:
        return [torch.zeros(b, *s, dtype=self.dtype, device=self.device) for s in self.param_shapes]

    # Subclass hooks ---------------------------------------------------------
    #: The difference quotient checking the first product (None: no check).
    _difference: Difference | None = None

    def _func_product(
        self, selected: dict[str, Tensor], others: dict[str, Tensor], inputs: Any, targets: Tensor,
        Vs: list[Tensor],
    ) -> dict[str, Tensor]:
        """One batch's block product through torch.func: {name: (b, *s)}."""
        raise NotImplementedError

    def _build_state(
        self, selected: dict[str, Tensor], others: dict[str, Tensor], inputs: Any, targets: Tensor
    ) -> _State:
        """One batch's autograd graph for :meth:`_apply_state`."""
        raise NotImplementedError

    def _apply_state(self, state: _State, Vs: list[Tensor]) -> list[Tensor]:
        """One batch's block product from its graph: [(b, *s_i)]."""
        raise NotImplementedError

    # -------------------------------------------------------- loss, gradient
    def loss(self) -> float:
        """The mean loss L(θ) over all of the data (and ranks)."""
        return self._loss_and_gradient(need_grad=False)[0]

    def gradient(self) -> Tensor:
        """∇L(θ), the gradient of the mean loss over all of the data (and ranks); shape (n,)."""
        return self._loss_and_gradient(need_grad=True)[1]

    def _batch_gradient(
        self, inputs: Any, targets: Tensor, full: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(L_k, ∇L_k)`` of one batch; shapes () and (n,).

        Args:
            full: Parameters and buffers by name to evaluate at (default: the model's).
        """
        if full is None:
            selected, others = self._tensors()
        else:
            others = dict(full)
            selected = {k: others.pop(k) for k in self.param_names}
        leaves = self._leaves(selected)
        tensors = {**others, **dict(zip(self.param_names, leaves))}
        loss = self._loss(self._forward(tensors, inputs), targets)
        grads = (
            torch.autograd.grad(loss, leaves, allow_unused=True)
            if loss.requires_grad
            else [None] * len(leaves)
        )
        return loss, flatten_grads(grads, leaves)

    def _loss_and_gradient(self, need_grad: bool) -> tuple[float, Tensor | None]:
        if self._sharded is not None:
            return self._sharded.loss_and_gradient(need_grad)
        n = self.shape[0]
        g_acc = torch.zeros(n, dtype=self.dtype, device=self.device) if need_grad else None
        l_acc = torch.zeros(1, dtype=torch.float64, device=self.device)
        count = 0
        ctx = torch.enable_grad() if need_grad else torch.no_grad()
        with ctx, self._md.model_mode():
            for _, inputs, targets, size in self._md.batches():
                if need_grad:
                    loss, flat = self._batch_gradient(inputs, targets)
                    g_acc.add_(flat, alpha=size)
                else:
                    selected, others = self._tensors()
                    loss = self._loss(self._forward({**others, **selected}, inputs), targets)
                l_acc.add_(loss.detach().to(torch.float64), alpha=size)
                count += size
        num_data = self._md.set_count(count)
        value = float((all_reduce_sum_(l_acc) / num_data).item())
        if not math.isfinite(value):
            _diagnose_nonfinite(self, None, "loss")
        if g_acc is not None:
            g_acc = all_reduce_sum_(g_acc).div_(num_data)
            if not bool(torch.isfinite(g_acc).all()):
                _diagnose_nonfinite(self, None, "gradient")
        return value, g_acc


def _diagnose_nonfinite(op: CurvatureOperator, V: Tensor | None, what: str) -> None:
    """Raise the HesslabError that says why ``op``'s ``what`` holds NaN or Inf."""
    if V is not None and not bool(torch.isfinite(V).all()):
        raise HesslabError("V: the block of vectors holds NaN or Inf entries")
    with torch.no_grad(), op._md.model_mode():
        for index, inputs, targets, _ in op._md.batches(progress=False):
            selected, others = op._tensors()
            loss = op._loss(op._forward({**others, **selected}, inputs), targets)
            if not bool(torch.isfinite(loss)):
                raise HesslabError(
                    f"loss_fn: the loss is {loss.item()} on batch {index} of data; check the "
                    "inputs and targets for NaN/Inf and the model's parameters"
                )
    raise HesslabError(
        f"model: the {what} of {type(op).__name__} holds NaN or Inf although the loss is "
        "finite on every batch: the derivatives overflow or are undefined (a non-smooth loss "
        "or activation at a kink, overflow in low precision). Try dtype=torch.float64."
    )


def _check_options(method: str, batched_columns: Any, reuse_graph: Any, train_mode: bool) -> None:
    """Refuse product options that do not exist or do not go together, naming them."""
    if method not in _METHODS:
        raise HesslabError(f"method: expected one of {_METHODS}, got {method!r}")
    if batched_columns not in ("auto", True, False):
        raise HesslabError(
            f"batched_columns: expected 'auto', True or False, got {batched_columns!r}"
        )
    if method == "func" and train_mode:
        raise HesslabError(
            "method: 'func' does not support train_mode=True (BatchNorm's running-statistics "
            "update breaks torch.func, and second-order forward mode through batch_norm with "
            "batch statistics is unreliable in torch); use method='autograd' (the default)"
        )
    if reuse_graph not in ("auto", True, False):
        raise HesslabError(f"reuse_graph: expected 'auto', True or False, got {reuse_graph!r}")


def _column_rule(batched_columns: bool | str, device: torch.device) -> str:
    """The column mode by rule: forced, or ``"loop"`` on the CPU and ``"batched"`` elsewhere."""
    if batched_columns == "auto":
        return "loop" if device.type == "cpu" else "batched"
    return "batched" if batched_columns else "loop"


def _grad_batched(outputs, inputs, grad_outputs) -> list[Tensor | None]:
    """All b cotangents through one batched backward (``is_grads_batched``, vmap)."""
    return list(
        torch.autograd.grad(
            outputs, inputs, grad_outputs, retain_graph=True, is_grads_batched=True,
            allow_unused=True,
        )
    )


def _grad_loop(outputs, inputs, grad_outputs) -> list[Tensor | None]:
    """The b cotangents one at a time over the same graph, stacked batch first."""
    b = grad_outputs[0].shape[0]
    cols = [
        torch.autograd.grad(
            outputs, inputs, [g[j] for g in grad_outputs], retain_graph=True, allow_unused=True
        )
        for j in range(b)
    ]
    return [
        None if cols[0][i] is None else torch.stack([c[i] for c in cols])
        for i in range(len(inputs))
    ]
