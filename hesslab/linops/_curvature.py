"""Curvature operators of a model's loss: the Hessian and the generalized Gauss-Newton.

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
    ``reuse_graph``: with a single batch in memory the first-order graph is kept across
        products, so a product costs only the backward-of-backward; it is rebuilt when a
        parameter or buffer of the model changes in place (version counters are watched;
        writes through ``.data`` are not seen).

    Measured on a 2-core CPU shared with other jobs (small CNN: two 3x3 convolutions
    with max-pooling and two linear layers, 38k parameters, 256 16x16 images, one
    thread, medians of 7 interleaved runs; compare ratios, not absolute times). Hessian,
    one product with b = 1: func 104 ms, autograd with a fresh graph 96-104 ms, kept
    graph 43 ms. Per column with b = 8: func 133 ms, fresh graph batched 86 ms or
    column by column 62 ms, kept graph batched 83 ms or column by column 49 ms. With
    BatchNorm (eval) per column: func 172 ms, kept graph batched 129 ms, column by
    column 84 ms; the GGN behaves alike (kept graph 25 ms per product). So on this CPU
    the batched (vmap) variants lose to a loop over columns. For tiny models (tens of
    parameters) it is the other way round: Python and dispatch overhead dominate and
    one batched call beats a loop by 10-50x. Hence the defaults: autograd, the graph
    kept for a single batch, and ``batched_columns="auto"``, which times both ways at
    the first block of >= 5 columns (on columns it must compute anyway) and keeps the
    faster; a model without batching rules falls back on columns one at a time.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from hesslab.errors import HesslabError
from hesslab.linops._base import LinearOperator
from hesslab.linops._data import (
    DataSource,
    call_model,
    cast_batch,
    check_devices,
    input_tensors,
)
from hesslab.linops._params import (
    ParamSpec,
    columns_to_params,
    flatten_tensors,
    params_to_columns,
    select_parameters,
    unflatten_vector,
)

__all__ = ["CurvatureOperator", "Hessian", "GGN"]

_METHODS = ("auto", "func", "autograd")


def distributed_active() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum_(t: Tensor) -> Tensor:
    if distributed_active():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


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
    of samples, all-reduces across ranks and checks the result.

    Args:
        model: The network, called as ``model(inputs)`` (or ``model(*inputs)``,
            ``model(**inputs)`` for tuple or dict inputs). Never modified: its mode and
            ``requires_grad`` flags are restored after every use, and parameters are
            substituted functionally (``torch.func.functional_call``).
        loss_fn: ``loss_fn(output, targets) -> scalar``, the MEAN loss over the batch
            (e.g. ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()`` with the default
            ``reduction="mean"``). A summed loss would weight batches wrongly.
        data: One ``(inputs, targets)`` batch, or a re-iterable iterable of them (a list,
            a ``DataLoader``), iterated once per product.
        params: Which parameters θ are: ``None`` for all with ``requires_grad=True``, or
            names, submodule names, glob patterns, modules or parameter tensors (see
            :func:`hesslab.linops._params.select_parameters`). The operator is then the
            block for those parameters.
        dtype: Run in this floating dtype (e.g. ``torch.float64`` for small models): the
            parameters, buffers and floating data are cast copies; the model itself is
            untouched. ``None`` keeps the parameters' dtype.
        train_mode: Evaluate the model in train mode (BatchNorm batch statistics,
            dropout). Default: eval mode. BatchNorm running statistics are never updated.
        check_deterministic: At construction, apply the operator twice to one random
            vector and raise unless the results agree (done in train mode and when
            ``data`` is an iterable of batches, which may shuffle or augment).
        progress: Show a tqdm bar over batches during products (quiet when not on a
            terminal).
        reuse_graph: ``"auto"``: keep the first-order autograd graph across products when
            ``data`` is a single batch; ``True``: require it (single batch only);
            ``False``: rebuild per product.
        method: ``"auto"`` (= ``"autograd"``, the faster path measured on the CPU),
            ``"autograd"`` or ``"func"`` (see the module docstring).
        batched_columns: ``"auto"``: measure, at the first block of >= 5 columns, whether
            one batched backward (``is_grads_batched``) or one column at a time over the
            same graph is faster for this model and keep the winner (before that: one at
            a time on the CPU, batched on GPUs); ``True`` / ``False`` force either.
            Autograd path only.
        batch_size_fn: ``(inputs, targets) -> int``, the number of samples of a batch
            (its weight). Default: ``targets.shape[0]``.

    Attributes:
        param_names: The selected parameter names, in layout order.
        param_shapes: Their shapes.
        hvp_path: ``"graph"`` (kept autograd graph), ``"autograd"`` or ``"func"``: the
            path products take now.

    Raises:
        HesslabError: for bad arguments, each naming the argument: a loss that is not a
            scalar or is NaN/Inf, no parameter requiring grad or ``params`` matching
            nothing, empty data, data on another device than the model, integer inputs
            to a model that needs floats, a non-deterministic operator.
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
        batched_columns: bool | str = "auto",
        batch_size_fn: Callable[[Any, Tensor], int] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise HesslabError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise HesslabError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        if getattr(loss_fn, "reduction", "mean") == "sum":
            raise HesslabError(
                "loss_fn: has reduction='sum'; hesslab operators need the batch MEAN (they weight "
                "each batch by its size to get the Hessian of the mean loss over all the data). "
                "Use reduction='mean' and multiply the operator by N if you want the summed loss."
            )
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise HesslabError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
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

        self.model = model
        self.loss_fn = loss_fn
        self.train_mode = bool(train_mode)
        self.progress = bool(progress)
        names, tensors = select_parameters(model, params)
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise HesslabError(
                "params: the selected parameters live on several devices "
                f"{sorted(map(str, devices))}; hesslab operators need them on one device"
            )
        if dtype is None:
            dtypes = {t.dtype for t in tensors}
            if len(dtypes) > 1:
                raise HesslabError(
                    "dtype: the selected parameters have several dtypes "
                    f"{sorted(map(str, dtypes))}; pass dtype= to run in one"
                )
            (op_dtype,) = dtypes
            if not op_dtype.is_floating_point:
                raise HesslabError(
                    f"params: the selected parameters have non-floating dtype {op_dtype}"
                )
        else:
            op_dtype = dtype
        self._cast_dtype = dtype
        self.param_names: list[str] = names
        self.param_shapes: list[torch.Size] = [t.shape for t in tensors]
        n = sum(t.numel() for t in tensors)
        super().__init__((n, n), op_dtype, next(iter(devices)))

        self._data = DataSource(data, batch_size_fn)
        if reuse_graph is True and method == "func":
            raise HesslabError(
                "reuse_graph: True keeps an autograd graph; it needs method='autograd'"
            )
        if reuse_graph is True and not self._data.single:
            raise HesslabError(
                "reuse_graph: True needs data to be a single (inputs, targets) batch in memory; "
                "with an iterable of batches use reuse_graph='auto' or False"
            )
        self._reuse = self._data.single and reuse_graph in ("auto", True) and method != "func"
        self._path = "func" if method == "func" else "autograd"
        # columns through one batched backward (is_grads_batched) or one at a time
        self._column_mode = {"auto": "auto", True: "batched", False: "loop"}[batched_columns]
        self.column_timings: dict[str, float] = {}
        self._single_cache: tuple[Any, Tensor] | None = None
        self._cast_cache: tuple[tuple, dict[str, Tensor]] | None = None
        self._state: _State | None = None
        self._state_key: tuple | None = None
        self._num_data: int | None = None

        self._validate_first_batch()
        if check_deterministic:
            needed = self.train_mode or not self._data.single
            if distributed_active():  # every rank must take the same decision
                flag = torch.tensor([float(needed)], device=self._collective_device())
                needed = bool(_all_reduce_sum_(flag).item() > 0)
            if needed:
                self._check_determinism()

    # ----------------------------------------------------------------- layout
    @property
    def hvp_path(self) -> str:
        """The path products take now: ``"graph"``, ``"autograd"`` or ``"func"``."""
        return "graph" if self._reuse else self._path

    @property
    def column_mode(self) -> str:
        """How the autograd path applies b columns: ``"batched"``, ``"loop"`` or ``"auto"``
        (not decided yet; decided by timing at the first block of >= 5 columns)."""
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
        if self._num_data is None:
            local = sum(size for _, _, _, size in self._data.batches())
            self._num_data = self._global_count(local)
        return self._num_data

    # ------------------------------------------------------------ model access
    @contextlib.contextmanager
    def _model_mode(self) -> Iterator[None]:
        """Put the model in the requested mode; restore every module's own flag after."""
        modes = [(m, m.training) for m in self.model.modules()]
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.train(self.train_mode)
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training
            for p, requires_grad in flags:
                if p.requires_grad != requires_grad:
                    p.requires_grad_(requires_grad)

    def _version_key(self) -> tuple:
        return tuple(
            (id(t), t._version)
            for t in (*self.model.parameters(), *self.model.buffers())
        )

    def _tensors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The selected parameters and everything else (other parameters, buffers).

        Returns:
            ``(selected, others)``: detached tensors (cast copies with ``dtype=``) keyed
            by name. In train mode the buffers are fresh clones, so BatchNorm's running
            statistics of the model are never updated.
        """
        if self._cast_dtype is None:
            full = {k: v.detach() for k, v in self.model.named_parameters()}
            full.update(self.model.named_buffers())
        else:
            key = self._version_key()
            if self._cast_cache is None or self._cast_cache[0] != key:
                full = {
                    k: _cast(v.detach(), self._cast_dtype) for k, v in self.model.named_parameters()
                }
                full.update({k: _cast(v, self._cast_dtype) for k, v in self.model.named_buffers()})
                self._cast_cache = (key, full)
            full = dict(self._cast_cache[1])
        if self.train_mode:
            for k, _ in self.model.named_buffers():
                full[k] = full[k].clone()
        selected = {k: full.pop(k) for k in self.param_names}
        return selected, full

    def _forward(self, tensors: dict[str, Tensor], inputs: Any) -> Any:
        """The model's output with ``tensors`` substituted for its parameters and buffers."""
        try:
            return call_model(
                lambda *a, **k: functional_call(self.model, tensors, a, k), inputs
            )
        except RuntimeError as err:
            ints = [
                t.dtype
                for t in input_tensors(inputs)
                if not (t.is_floating_point() or t.is_complex())
            ]
            if ints:
                raise HesslabError(
                    f"data: the model failed on inputs of dtype {ints[0]}; if it expects floating "
                    "inputs (e.g. a Linear or Conv layer first), convert them, e.g. "
                    f"inputs.float() or inputs.to({self.dtype}). Original error: {err}"
                ) from err
            raise

    def _check_output(self, out: Any) -> Any:
        """Validate the model's output (subclasses that need a tensor check here)."""
        return out

    def _loss(self, output: Any, targets: Tensor) -> Tensor:
        loss = self.loss_fn(output, targets)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise HesslabError(
                f"loss_fn: must return a scalar tensor, the mean loss over the batch; got {got}. "
                "Use reduction='mean' (e.g. nn.CrossEntropyLoss())."
            )
        return loss.reshape(())

    # --------------------------------------------------------------- batches
    def _batches(self, progress: bool | None = None) -> Iterator[tuple[int, Any, Tensor, int]]:
        """Yield ``(index, inputs, targets, num_samples)``, checked and cast."""
        progress = self.progress if progress is None else progress
        source: Any = self._data.batches()
        if progress and not self._data.single:
            from tqdm.auto import tqdm

            source = tqdm(
                source, total=len(self._data) or None, desc=type(self).__name__, leave=False,
                disable=None, unit="batch",
            )
        for index, inputs, targets, size in source:
            if self._data.single and self._single_cache is not None:
                inputs, targets = self._single_cache
            else:
                check_devices(inputs, targets, self.device, index)
                inputs, targets = cast_batch(inputs, targets, self._cast_dtype)
                if self._data.single:
                    self._single_cache = (inputs, targets)
            yield index, inputs, targets, size

    def _collective_device(self) -> torch.device:
        """Where collectives run: the current CUDA device for NCCL, else the CPU."""
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _global_count(self, local: int) -> int:
        if not distributed_active():
            return local
        t = torch.tensor([float(local)], dtype=torch.float64, device=self._collective_device())
        return int(round(_all_reduce_sum_(t).item()))

    def _reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks (no-op without torch.distributed)."""
        if not distributed_active():
            return t
        dev = self._collective_device()
        if dev != t.device:
            return _all_reduce_sum_(t.to(dev)).to(t.device)
        return _all_reduce_sum_(t)

    def _validate_first_batch(self) -> None:
        """One forward pass on the first batch: devices, input dtypes, a finite scalar loss."""
        for index, inputs, targets, _ in self._batches(progress=False):
            with torch.no_grad(), self._model_mode():
                selected, others = self._tensors()
                out = self._check_output(self._forward({**others, **selected}, inputs))
                loss = self._loss(out, targets)
            if not loss.is_floating_point():
                raise HesslabError(
                    f"loss_fn: returned a {loss.dtype} loss; expected a floating scalar"
                )
            if not bool(torch.isfinite(loss)):
                raise HesslabError(
                    f"loss_fn: the loss is {loss.item()} on batch {index} of data; check the inputs "
                    "and targets for NaN/Inf and the model's parameters"
                )
            return

    # -------------------------------------------------------------- products
    def _matmat(self, V: Tensor) -> Tensor:
        return self._product(V, reuse=self._reuse)

    def _product(self, V: Tensor, reuse: bool) -> Tensor:
        """(1/N) Σ_k n_k A_k V over all batches (and ranks); V (n, b) -> (n, b)."""
        n, b = V.shape
        Vs = columns_to_params(V, self.param_shapes)  # [(b, *s_i)]
        acc = None
        count = 0
        with torch.enable_grad(), self._model_mode():
            for _, inputs, targets, size in self._batches():
                parts = self._batch_product(inputs, targets, Vs, reuse)  # [(b, *s_i)]
                cols = params_to_columns(parts)  # (n, b), a fresh tensor
                acc = cols.mul_(size) if acc is None else acc.add_(cols, alpha=size)
                count += size
        if acc is None:
            acc = torch.zeros(n, b, dtype=self.dtype, device=self.device)
        if self._num_data is None:
            self._num_data = self._global_count(count)
        acc = self._reduce(acc)
        acc.div_(self._num_data)
        if not bool(torch.isfinite(acc).all()):
            self._diagnose_nonfinite(V, "product")
        return acc

    def _batch_product(
        self, inputs: Any, targets: Tensor, Vs: list[Tensor], reuse: bool
    ) -> list[Tensor]:
        """One batch's block product [(b, *s_i)], by the kept graph, torch.func or autograd."""
        if reuse:
            key = self._version_key()
            if self._state is None or self._state_key != key:
                self._state = None  # free the old graph first
                selected, others = self._tensors()
                self._state = self._build_state(selected, others, inputs, targets)
                self._state_key = key
            return self._apply_state(self._state, Vs)
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

        In ``"auto"`` column mode, the first call with b >= 5 columns measures both ways
        on the columns it has to compute anyway (one column to warm up, a few one at a
        time, the rest batched), keeps the faster for the operator's lifetime and wastes
        nothing; smaller blocks use the device's default until then.

        Args:
            outputs: Tensors o_i (all requiring grad).
            inputs: Leaves x_j.
            grad_outputs: Shapes (b, *o_i.shape).

        Returns:
            Per input x_j: shape (b, *x_j.shape), or None where unused.
        """
        b = grad_outputs[0].shape[0]
        mode = self._column_mode
        if mode == "auto":
            if b >= 5:
                return self._tune_columns(outputs, inputs, grad_outputs)
            mode = "loop" if self.device.type == "cpu" else "batched"
        if mode == "batched":
            try:
                return self._grad_batched(outputs, inputs, grad_outputs)
            except RuntimeError:
                self._column_mode = "loop"  # no batching rule for some op of the model
        return self._grad_loop(outputs, inputs, grad_outputs)

    @staticmethod
    def _grad_batched(outputs, inputs, grad_outputs) -> list[Tensor | None]:
        return list(
            torch.autograd.grad(
                outputs, inputs, grad_outputs, retain_graph=True, is_grads_batched=True,
                allow_unused=True,
            )
        )

    @staticmethod
    def _grad_loop(outputs, inputs, grad_outputs) -> list[Tensor | None]:
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

    def _tune_columns(self, outputs, inputs, grad_outputs) -> list[Tensor | None]:
        b = grad_outputs[0].shape[0]
        k = min(4, (b - 1) // 2)

        def timed(fn, lo: int, hi: int) -> tuple[list[Tensor | None], float]:
            self._sync()
            t0 = time.perf_counter()
            out = fn(outputs, inputs, [g[lo:hi] for g in grad_outputs])
            self._sync()
            return out, (time.perf_counter() - t0) / (hi - lo)

        parts = [self._grad_loop(outputs, inputs, [g[:1] for g in grad_outputs])]  # warm-up
        loop_part, t_loop = timed(self._grad_loop, 1, 1 + k)
        parts.append(loop_part)
        try:
            batched_part, t_batched = timed(self._grad_batched, 1 + k, b)
        except RuntimeError:
            t_batched = math.inf
            batched_part = self._grad_loop(outputs, inputs, [g[1 + k :] for g in grad_outputs])
        parts.append(batched_part)
        self._column_mode = "batched" if t_batched < t_loop else "loop"
        self.column_timings = {"loop": t_loop, "batched": t_batched}
        return [
            None if parts[0][i] is None else torch.cat([p[i] for p in parts])
            for i in range(len(inputs))
        ]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _leaves(self, selected: dict[str, Tensor]) -> list[Tensor]:
        return [selected[k].detach().requires_grad_(True) for k in self.param_names]

    def _zeros(self, b: int) -> list[Tensor]:
        return [torch.zeros(b, *s, dtype=self.dtype, device=self.device) for s in self.param_shapes]

    # Subclass hooks ---------------------------------------------------------
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

    # ------------------------------------------------------------------ checks
    def _check_determinism(self) -> None:
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(self.shape[0], 1, generator=gen, dtype=torch.float64)
        v = v.to(device=self.device, dtype=self.dtype)
        p1 = self._product(v, reuse=False)
        p2 = self._product(v, reuse=False)
        diff = float((p1 - p2).norm())
        scale = max(float(p1.norm()), float(p2.norm()))
        tol = 10 * math.sqrt(torch.finfo(self.dtype).eps)
        if diff > tol * scale:
            raise HesslabError(
                f"check_deterministic: two products of {type(self).__name__} with the same vector "
                f"differ (relative difference {diff / scale:.3g} > {tol:.1e}), so the operator is "
                "not a fixed matrix. "
                + (
                    "In train mode (train_mode=True) dropout draws new masks on every forward pass "
                    "and BatchNorm normalizes with the statistics of each batch, which change when "
                    "the data is shuffled or augmented. "
                    if self.train_mode
                    else "The data changes between passes (shuffling with BatchNorm in train mode, "
                    "random augmentation) or the model is random. "
                )
                + "Use eval mode (train_mode=False, the default), remove dropout, fix the batches "
                "(a list of tensors, no augmentation), or pass check_deterministic=False to "
                "accept a random operator."
            )

    def _diagnose_nonfinite(self, V: Tensor | None, what: str) -> None:
        if V is not None and not bool(torch.isfinite(V).all()):
            raise HesslabError("V: the block of vectors holds NaN or Inf entries")
        with torch.no_grad(), self._model_mode():
            for index, inputs, targets, _ in self._batches(progress=False):
                selected, others = self._tensors()
                loss = self._loss(self._forward({**others, **selected}, inputs), targets)
                if not bool(torch.isfinite(loss)):
                    raise HesslabError(
                        f"loss_fn: the loss is {loss.item()} on batch {index} of data; check the "
                        "inputs and targets for NaN/Inf and the model's parameters"
                    )
        raise HesslabError(
            f"model: the {what} of {type(self).__name__} holds NaN or Inf although the loss is "
            "finite on every batch: the derivatives overflow or are undefined (a non-smooth loss "
            "or activation at a kink, overflow in low precision). Try dtype=torch.float64."
        )

    # -------------------------------------------------------- loss, gradient
    def loss(self) -> float:
        """The mean loss L(θ) over all of the data (and ranks)."""
        return self._loss_and_gradient(need_grad=False)[0]

    def gradient(self) -> Tensor:
        """∇L(θ), the gradient of the mean loss over all of the data (and ranks); shape (n,)."""
        return self._loss_and_gradient(need_grad=True)[1]

    def _loss_and_gradient(self, need_grad: bool) -> tuple[float, Tensor | None]:
        n = self.shape[0]
        g_acc = torch.zeros(n, dtype=self.dtype, device=self.device) if need_grad else None
        l_acc = torch.zeros(1, dtype=torch.float64, device=self.device)
        count = 0
        ctx = torch.enable_grad() if need_grad else torch.no_grad()
        with ctx, self._model_mode():
            for _, inputs, targets, size in self._batches():
                selected, others = self._tensors()
                if need_grad:
                    leaves = self._leaves(selected)
                    tensors = {**others, **dict(zip(self.param_names, leaves))}
                    loss = self._loss(self._forward(tensors, inputs), targets)
                    grads = (
                        torch.autograd.grad(loss, leaves, allow_unused=True)
                        if loss.requires_grad
                        else [None] * len(leaves)
                    )
                    flat = torch.cat([
                        (torch.zeros_like(x) if g is None else g).reshape(-1)
                        for g, x in zip(grads, leaves)
                    ])
                    g_acc.add_(flat, alpha=size)
                else:
                    loss = self._loss(self._forward({**others, **selected}, inputs), targets)
                l_acc.add_(loss.detach().to(torch.float64), alpha=size)
                count += size
        if self._num_data is None:
            self._num_data = self._global_count(count)
        l_acc = self._reduce(l_acc) / self._num_data
        value = float(l_acc.item())
        if not math.isfinite(value):
            self._diagnose_nonfinite(None, "loss")
        if g_acc is not None:
            g_acc = self._reduce(g_acc).div_(self._num_data)
            if not bool(torch.isfinite(g_acc).all()):
                self._diagnose_nonfinite(None, "gradient")
        return value, g_acc


def _jvp_with_targets(
    fn: Callable[[Any, Tensor], Any], primal: Any, tangent: Any, targets: Tensor
) -> Any:
    """The jvp of ``x -> fn(x, targets)`` at ``primal`` in direction ``tangent``.

    Floating targets get an explicit zero tangent: without one, forward-mode AD through
    the backward of some losses (``mse_loss``) writes into an immutable ZeroTensor
    (torch 2.x: "ZeroTensors are immutable").
    """
    if targets.is_floating_point():
        return torch.func.jvp(fn, (primal, targets), (tangent, torch.zeros_like(targets)))[1]
    return torch.func.jvp(lambda x: fn(x, targets), (primal,), (tangent,))[1]


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() else t


class Hessian(CurvatureOperator):
    """The Hessian H = ∇²L(θ) of the sample-mean loss over all of the data.

    H = (1/N) Σ_k n_k ∇²_θ L_k with L_k the mean loss of batch k (see the module
    docstring for the notation). Products are exact; b columns share one pass over the
    data. See :class:`CurvatureOperator` for the arguments.

    Example:
        >>> H = Hessian(model, nn.CrossEntropyLoss(), (X, y), dtype=torch.float64)
        >>> Hv = H @ v              # (n,) -> (n,)
        >>> HV = H @ V              # (n, b) -> (n, b), one data pass
        >>> H_block = Hessian(model, loss_fn, loader, params="fc2.*")
    """

    def _func_product(self, selected, others, inputs, targets, Vs):
        def loss_of(p: dict[str, Tensor], t: Tensor) -> Tensor:
            return self._loss(self._forward({**others, **p}, inputs), t)

        grad_fn = torch.func.grad(loss_of)  # ∇_θ L_k, argnums=0

        def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
            return _jvp_with_targets(grad_fn, selected, v, targets)

        V_dict = dict(zip(self.param_names, Vs))  # {name: (b, *s)}
        randomness = "same" if self.train_mode else "error"
        return torch.func.vmap(hvp, randomness=randomness)(V_dict)

    def _build_state(self, selected, others, inputs, targets):
        leaves = self._leaves(selected)
        out = self._forward({**others, **dict(zip(self.param_names, leaves))}, inputs)
        loss = self._loss(out, targets)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        return _State(leaves=leaves, tensors={"grads": grads}, loss=loss.detach())

    def _apply_state(self, state, Vs):
        grads = state.tensors["grads"]
        b = Vs[0].shape[0]
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not used:
            return self._zeros(b)
        # H V = ∂/∂θ ⟨g(θ), V⟩, for all b columns at once
        out = self._batched_grad([grads[i] for i in used], state.leaves, [Vs[i] for i in used])
        zeros = self._zeros(b)
        return [zeros[i] if o is None else o.detach() for i, o in enumerate(out)]


class GGN(CurvatureOperator):
    """The generalized Gauss-Newton matrix G = (1/N) Σ_k n_k J_kᵀ (∇²_z L_k) J_k.

    The outer-product part H_O of the Hessian (Singh et al.): exact for any loss of the
    outputs, e.g. cross-entropy and MSE; positive semi-definite when the loss is convex
    in the outputs. ``Hessian(...) - GGN(...)`` is the functional part H_F.
    Products: J V by forward mode (``jvp``), the loss Hessian on the outputs by
    forward-over-reverse, Jᵀ by ``vjp``, each batched over the b columns (the autograd
    path obtains J V by differentiating Jᵀu with respect to u). The model must return
    one tensor. See :class:`CurvatureOperator` for the arguments.
    """

    def _func_product(self, selected, others, inputs, targets, Vs):
        def f(p: dict[str, Tensor]) -> Tensor:
            return self._check_output(self._forward({**others, **p}, inputs))

        randomness = "same" if self.train_mode else "error"
        out, vjp_fn = torch.func.vjp(f, selected)  # out: (*z)
        V_dict = dict(zip(self.param_names, Vs))
        def jvp_f(v: dict[str, Tensor]) -> Tensor:
            return torch.func.jvp(f, (selected,), (v,))[1]

        JV = torch.func.vmap(jvp_f, randomness=randomness)(V_dict)  # (b, *z)
        z = out.detach()
        grad_z = torch.func.grad(self._loss)  # ∇_z L_k(z, targets)
        HJV = torch.func.vmap(lambda u: _jvp_with_targets(grad_z, z, u, targets))(JV)  # (b, *z)
        return torch.func.vmap(vjp_fn)(HJV)[0]

    def _check_output(self, out: Any) -> Tensor:
        if not isinstance(out, Tensor):
            raise HesslabError(
                f"model: the GGN needs a model returning one tensor, got {type(out).__name__}"
            )
        return out

    def _build_state(self, selected, others, inputs, targets):
        leaves = self._leaves(selected)
        out = self._check_output(
            self._forward({**others, **dict(zip(self.param_names, leaves))}, inputs)
        )
        z = out.detach().requires_grad_(True)
        loss = self._loss(z, targets)
        (grad_z,) = torch.autograd.grad(loss, z, create_graph=True)
        tensors: dict[str, Any] = {"out": out, "z": z, "grad_z": grad_z}
        if out.requires_grad:
            u = torch.zeros_like(out, requires_grad=True)
            # Jᵀu, linear in u: its derivative with respect to u in direction V is J V
            jtu = torch.autograd.grad(out, leaves, u, create_graph=True, allow_unused=True)
            tensors.update(u=u, jtu=jtu)
        return _State(leaves=leaves, tensors=tensors, loss=loss.detach())

    def _apply_state(self, state, Vs):
        t = state.tensors
        b = Vs[0].shape[0]
        if "u" not in t:
            return self._zeros(b)
        used = [i for i, g in enumerate(t["jtu"]) if g is not None and g.requires_grad]
        if not used:
            return self._zeros(b)
        (JV,) = self._batched_grad([t["jtu"][i] for i in used], [t["u"]], [Vs[i] for i in used])
        if JV is None or not t["grad_z"].requires_grad:
            return self._zeros(b)
        (HJV,) = self._batched_grad([t["grad_z"]], [t["z"]], [JV])  # (b, *z)
        if HJV is None:
            return self._zeros(b)
        out = self._batched_grad([t["out"]], state.leaves, [HJV])
        zeros = self._zeros(b)
        return [zeros[i] if o is None else o.detach() for i, o in enumerate(out)]
