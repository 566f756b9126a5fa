"""The model/data base under every curvature operator: one model, one loss, the data.

Every operator over a model's loss (:class:`~hesslab.linops.Hessian`,
:class:`~hesslab.linops.GGN`, :class:`~hesslab.linops.KFAC`) holds one
:class:`ModelData` (composition, like curvlinops' ``_EmpiricalRiskMixin``) and leaves to
it everything that is about the model and the data rather than about the curvature:

* the constructor checks shared by every operator (a ``nn.Module``, a callable loss
  without ``reduction='sum'``, a floating ``dtype``, parameters on one device and of
  one dtype);
* the data source (one batch or a re-iterable iterable, see :mod:`hesslab.linops._data`)
  and the per-batch weights n_k (the number of samples of batch k), with a tqdm bar over
  batches on request;
* calling the model on tuple and dict inputs (and dict batches, ``model(**batch)``) with
  the parameters and buffers substituted functionally (``torch.func.functional_call``),
  cast to ``dtype`` and checked for the device of the data, always under the math SDPA
  backend (:mod:`hesslab.linops._attention`: fused attention has no double backward);
* the loss from the output (:class:`~hesslab.linops._lmloss.LossHead`): ``loss_fn``, the
  model's own ``.loss`` (``loss_fn=None``), or a causal LM's token cross-entropy, with
  each batch's weight (samples, or predicted tokens for a causal LM);
* the model's mode (eval by default, train on request; every module's own flag and the
  parameters' ``requires_grad`` are restored after each use) and the determinism check;
* the first-batch data checks: half-precision data, inputs the model cannot take (their
  width), outputs and targets of different lengths, float class indices with
  cross-entropy, MSE targets that would broadcast, a loss without derivatives;
* every torch.distributed collective, through :func:`all_reduce_sum_` with one device
  rule (:func:`collective_device`).

Notation: batches B_1, ..., B_K with n_k samples each, N = Σ_k n_k over all ranks;
``loss_fn`` returns the batch MEAN L_k, so the sample-mean loss is L = (1/N) Σ_k n_k L_k.
For a causal LM with ``loss_fn=None``, n_k is the batch's number of predicted tokens and
L the mean over all predicted tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hesslab.errors import HesslabError
from hesslab.linops._attention import attention_notes, math_attention
from hesslab.linops._data import (
    DataSource,
    call_model,
    cast_batch,
    cast_floating,
    check_devices,
    input_tensors,
)
from hesslab.linops._lmloss import LossHead

__all__ = [
    "ModelData",
    "all_reduce_sum_",
    "check_targets",
    "any_rank",
    "collective_device",
    "distributed_active",
    "failed_ranks",
    "gather_rows",
    "global_count",
]

_HALF = (torch.float16, torch.bfloat16)  # data in these is refused (see ModelData.prepare)


# ------------------------------------------------------------------ collectives
def distributed_active() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def collective_device() -> torch.device:
    """The one device rule of hesslab's collectives.

    NCCL reduces CUDA tensors only: collectives run on the current CUDA device. Every
    other backend (gloo, ...) runs them on the CPU. Tensors elsewhere are copied there
    and back.
    """
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place and return it (a no-op without torch.distributed)."""
    if not distributed_active():
        return t
    dev = collective_device()
    if t.device == dev:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t
    buf = t.to(dev)
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    return t.copy_(buf.to(t.device))


def global_count(local: int) -> int:
    """Σ over ranks of an integer count (``local`` without torch.distributed)."""
    if not distributed_active():
        return int(local)
    t = torch.tensor([float(local)], dtype=torch.float64)
    return int(round(all_reduce_sum_(t).item()))


def gather_rows(local: Tensor) -> Tensor:
    """(world, k) float64 on every rank: row r is rank r's ``local`` (k,), bitwise.

    One all-reduce of a matrix in which each entry is nonzero on one rank only, so the
    sums are exact and every rank holds the same bits. Without torch.distributed: one row.
    """
    row = local.detach().to("cpu", torch.float64).reshape(-1)
    if not distributed_active():
        return row[None]
    rows = torch.zeros(torch.distributed.get_world_size(), row.numel(), dtype=torch.float64)
    rows[torch.distributed.get_rank()] = row
    return all_reduce_sum_(rows)


def failed_ranks(failed: bool) -> list[int]:
    """The ranks where ``failed`` holds (one collective; [] without torch.distributed)."""
    if not distributed_active():
        return []
    flags = gather_rows(torch.tensor([float(failed)]))[:, 0]
    return [r for r, f in enumerate(flags.tolist()) if f > 0]


def any_rank(flag: bool) -> bool:
    """True when ``flag`` holds on some rank, so every rank takes the same decision."""
    if not distributed_active():
        return bool(flag)
    return bool(all_reduce_sum_(torch.tensor([float(flag)])).item() > 0)


# ------------------------------------------------------------------ the base
class ModelData:
    """A model, its loss and its data, as every curvature operator needs them.

    Args:
        model: The network, called as ``model(inputs)`` (``model(*inputs)``,
            ``model(**inputs)`` for tuple or dict inputs). Never modified: its mode and
            ``requires_grad`` flags are restored after every use, and parameters are
            substituted functionally.
        loss_fn: ``loss_fn(output, targets) -> scalar``, the MEAN loss over the batch, or
            ``None``: the model's output carries the loss (``.loss`` / ``["loss"]``; a
            causal LM's token cross-entropy, see :mod:`hesslab.linops._lmloss`).
        data: One ``(inputs, targets)`` batch or dict batch (``model(**batch)``, its
            ``labels`` the targets), or a re-iterable iterable of them.
        dtype: Run in this floating dtype (cast copies of parameters, buffers and
            floating data); ``None`` keeps the parameters' dtype.
        train_mode: Evaluate the model in train mode (BatchNorm batch statistics,
            dropout); BatchNorm running statistics are never updated (buffers are
            cloned). Default: eval mode.
        seed: In train mode, batch k draws its dropout masks on a forked RNG seeded with
            (seed, k) (:meth:`batches`): every pass over the data sees the same masks, so
            the operator is a fixed matrix, and the global RNG is left as it was.
        progress: Show a tqdm bar over batches (quiet when not on a terminal).
        batch_size_fn: ``(inputs, targets) -> int``, the weight n_k of a batch.
        name: The operator's name, for the progress bar and messages.

    Attributes:
        head: The :class:`~hesslab.linops._lmloss.LossHead` (how the loss comes from the output).
        notes: What hesslab decided for this model (the math attention backend, the loss).
        device, dtype: Set by :meth:`check_parameters` (the operator's).
        own_call: True for an FSDP2-sharded model (set by :mod:`hesslab.linops._sharded`):
            it is called as it is, its parameters being its own shards (under
            ``functional_call`` FSDP2 would adopt the substituted tensors), and
            :meth:`model_mode` restores its buffers (a train-mode forward writes them).
        num_data: N over all ranks, once a full pass counted it (else ``None``).

    Raises:
        HesslabError: ``model`` is not a Module, ``loss_fn`` is not callable or sums,
            ``dtype`` is not a floating dtype, ``data`` is not a batch or re-iterable.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        data: Any,
        *,
        dtype: torch.dtype | None = None,
        train_mode: bool = False,
        progress: bool = False,
        batch_size_fn: Callable[[Any, Tensor], int] | None = None,
        name: str = "operator",
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise HesslabError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise HesslabError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        if getattr(loss_fn, "reduction", "mean") == "sum":
            raise HesslabError(
                "loss_fn: has reduction='sum'; hesslab operators need the batch MEAN (they weight "
                "each batch by its size to get the Hessian of the mean loss over all the data). "
                "Use reduction='mean' and multiply the operator by N if you want the summed loss."
            )
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise HesslabError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.cast_dtype = dtype
        self.train_mode = bool(train_mode)
        self.seed = int(seed)
        self.progress = bool(progress)
        self.name = name
        self.head = LossHead(model, loss_fn)
        self.notes: list[str] = attention_notes(model) + self.head.notes
        if batch_size_fn is None and self.head.kind == "causal_lm":
            batch_size_fn = self.head.count
        self.source = DataSource(data, batch_size_fn)
        self.device: torch.device = torch.device("cpu")
        self.dtype: torch.dtype = dtype or torch.get_default_dtype()
        self.num_data: int | None = None
        self.own_call = False
        self._single_cache: tuple[Any, Tensor] | None = None
        self._cast_cache: tuple[tuple, dict[str, Tensor]] | None = None

    @property
    def single(self) -> bool:
        """True when the data is one batch in memory."""
        return self.source.single

    def check_parameters(self, tensors: Sequence[Tensor], what: str = "params") -> None:
        """Set :attr:`device` and :attr:`dtype` from the parameters the operator acts on.

        Raises:
            HesslabError: the tensors live on several devices, have several dtypes
                (without ``dtype=``) or a non-floating dtype.
        """
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise HesslabError(
                f"{what}: the selected parameters live on several devices "
                f"{sorted(map(str, devices))}; hesslab operators need them on one device"
            )
        if self.cast_dtype is None:
            dtypes = {t.dtype for t in tensors}
            if len(dtypes) > 1:
                raise HesslabError(
                    "dtype: the selected parameters have several dtypes "
                    f"{sorted(map(str, dtypes))}; pass dtype= to run in one"
                )
            (dtype,) = dtypes
            if not dtype.is_floating_point:
                raise HesslabError(f"{what}: the selected parameters have non-floating dtype {dtype}")
            self.dtype = dtype
        else:
            self.dtype = self.cast_dtype
        self.device = next(iter(devices))

    # ------------------------------------------------------------ model access
    @contextlib.contextmanager
    def model_mode(self) -> Iterator[None]:
        """Put the model in the requested mode; restore every module's own flag after."""
        modes = [(m, m.training) for m in self.model.modules()]
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        buffers = [(b, b.clone()) for b in self.model.buffers()] if self.own_call else []
        self.model.train(self.train_mode)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, training in modes:
                m.training = training
            for p, requires_grad in flags:
                if p.requires_grad != requires_grad:
                    p.requires_grad_(requires_grad)

    def version_key(self) -> tuple:
        """The version counters of every parameter and buffer (in-place changes bump them)."""
        return tuple((id(t), t._version) for t in (*self.model.parameters(), *self.model.buffers()))

    def tensors(self) -> dict[str, Tensor]:
        """Every parameter (detached) and buffer by name, cast to ``dtype=`` when given.

        Cast copies are cached until a parameter or buffer changes in place. In train
        mode the buffers are fresh clones, so the model's running statistics never move.
        """
        if self.cast_dtype is None:
            full = {k: v.detach() for k, v in self.model.named_parameters()}
            full.update(self.model.named_buffers())
        else:
            key = self.version_key()
            if self._cast_cache is None or self._cast_cache[0] != key:
                dt = self.cast_dtype
                cast = {k: cast_floating(v.detach(), dt) for k, v in self.model.named_parameters()}
                cast.update({k: cast_floating(v, dt) for k, v in self.model.named_buffers()})
                self._cast_cache = (key, cast)
            full = dict(self._cast_cache[1])
        if self.train_mode:
            for k, _ in self.model.named_buffers():
                full[k] = full[k].clone()
        return full

    def forward(self, tensors: dict[str, Tensor], inputs: Any, first: bool = False) -> Any:
        """The model's output with ``tensors`` substituted for its parameters and buffers.

        Args:
            tensors: Parameters and buffers by name (see :meth:`tensors`).
            inputs: A batch's inputs.
            first: This is the first batch: a failure of the model becomes a
                :class:`HesslabError` about the data's shapes (the usual cause).
        """
        try:
            with math_attention():
                return call_model(self._caller(tensors), self.head.model_inputs(inputs))
        except RuntimeError as err:
            ints = [
                t.dtype for t in input_tensors(inputs) if not (t.is_floating_point() or t.is_complex())
            ]
            if ints:
                raise HesslabError(
                    f"data: the model failed on inputs of dtype {ints[0]}; if it expects floating "
                    "inputs (e.g. a Linear or Conv layer first), convert them, e.g. "
                    f"inputs.float() or inputs.to({self.dtype}). Original error: {err}"
                ) from err
            if first:
                shapes = ", ".join(str(tuple(t.shape)) for t in input_tensors(inputs))
                raise HesslabError(
                    f"data: the model fails on the first batch's inputs of shape {shapes}"
                    f"{_first_layer_hint(self.model)}; check that the inputs have the width (and "
                    f"layout) the model expects. Original error: {str(err).splitlines()[0]}"
                ) from err
            raise

    def _caller(self, tensors: dict[str, Tensor]) -> Callable[..., Any]:
        """The model with ``tensors`` substituted; with :attr:`own_call`, the model as it is."""
        if self.own_call:
            return self.model
        return lambda *a, **k: functional_call(self.model, tensors, a, k)

    def check_differentiable(self, out: Any, targets: Tensor) -> None:
        """Raise unless ``loss_fn`` is differentiable in the output (one tensor output only).

        A loss computed through ``.detach()``, ``.item()``, ``argmax`` or an integer cast
        has no derivative for hesslab to take; autograd would only say "element 0 of
        tensors does not require grad".
        """
        if not isinstance(out, Tensor) or not out.is_floating_point():
            return
        with torch.enable_grad():
            z = out.detach().requires_grad_(True)
            loss = self.loss(z, targets)
        if not loss.requires_grad:
            name = getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)
            raise HesslabError(
                f"loss_fn: {name} does not depend differentiably on the model's output (it is "
                "computed through .detach(), .item(), argmax, an integer cast or torch.no_grad), "
                "so it has no derivatives to take. hesslab differentiates loss_fn(output, "
                "targets) twice: compute the loss from the output with differentiable torch ops."
            )

    def check_loss_head(self, tensors: dict[str, Tensor], inputs: Any, targets: Tensor) -> None:
        """A causal LM's token cross-entropy against the model's own loss, on one batch."""
        if self.head.kind != "causal_lm":
            return
        full = dict(inputs) if isinstance(inputs, dict) else None
        if full is None:
            return
        full["labels"] = targets
        with torch.no_grad(), math_attention():
            out = call_model(self._caller(tensors), full)
        self.head.check_first(out, targets)

    def logits(self, output: Any) -> Tensor:
        """The tensor the loss is a function of (GGN, KFAC): the output, or a causal LM's logits."""
        return self.head.logits(output)

    def loss(self, output: Any, targets: Tensor) -> Tensor:
        """The batch's mean loss (``loss_fn``, the model's, or the causal-LM one); shape ()."""
        loss = self.head.value(output, targets)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise HesslabError(
                f"loss_fn: must return a scalar tensor, the mean loss over the batch; got {got}. "
                "Use reduction='mean' (e.g. nn.CrossEntropyLoss())."
            )
        return loss.reshape(())

    # ------------------------------------------------------------------ batches
    def batches(
        self, progress: bool | None = None, seeded: bool = True
    ) -> Iterator[tuple[int, Any, Tensor, int]]:
        """Yield ``(index, inputs, targets, n_k)``, checked for the device and cast.

        In train mode the consumer's work on each batch runs inside :meth:`batch_rng`
        (``seeded=False``: not, for a caller that takes one batch and seeds it itself).
        """
        progress = self.progress if progress is None else progress
        source: Any = self.source.batches()
        if progress and not self.single:
            from tqdm.auto import tqdm

            source = tqdm(
                source, total=len(self.source) or None, desc=self.name, leave=False,
                disable=None, unit="batch",
            )
        for index, inputs, targets, size in source:
            if self.single and self._single_cache is not None:
                inputs, targets = self._single_cache
            else:
                inputs, targets = self.prepare(inputs, targets, index)
                if self.single:
                    self._single_cache = (inputs, targets)
            with self.batch_rng(index) if seeded else contextlib.nullcontext():
                yield index, inputs, targets, size

    def batch_rng(self, index: int) -> contextlib.AbstractContextManager:
        """Train mode: a forked RNG seeded with (seed, index) around batch ``index``'s use."""
        if not self.train_mode:
            return contextlib.nullcontext()
        return _seeded_rng(self.seed * 1_000_003 + index, self.device)

    def prepare(self, inputs: Any, targets: Tensor, index: int) -> tuple[Any, Tensor]:
        """Check that batch ``index`` is on the operator's device; cast it to ``dtype=``.

        Raises:
            HesslabError: a tensor on another device, or half-precision data left uncast.
        """
        check_devices(inputs, targets, self.device, index)
        inputs, targets = cast_batch(inputs, targets, self.cast_dtype)
        for what, tensors in (("inputs", input_tensors(inputs)), ("targets", [targets])):
            low = [t.dtype for t in tensors if t.dtype in _HALF]
            if low:
                raise HesslabError(
                    f"data: the {what} of batch {index} are {low[0]}; second derivatives in half "
                    "precision keep too few digits to be trusted (and with parameters of another "
                    "dtype the model fails). Pass dtype=torch.float32 (or torch.float64), which "
                    "casts the data and a copy of the parameters, or convert the data with "
                    f"{what}.float()."
                )
        return inputs, targets

    def first_batch(self) -> tuple[int, Any, Tensor, int]:
        """``(index, inputs, targets, n_k)`` of the first non-empty batch.

        Under torch.distributed the ranks agree (one collective) before any of them
        fails, so a rank with an empty shard or a bad first batch makes every rank raise
        the same error instead of leaving the others in a collective that never ends.

        Raises:
            HesslabError: no sample, or a bad first batch (on any rank).
        """
        batch, failed = None, None
        try:
            batch = next(iter(self.batches(progress=False, seeded=False)), None)
            if batch is None:  # pragma: no cover - DataSource raises first
                raise HesslabError("data: holds no samples")
        except HesslabError as err:
            if not distributed_active():
                raise
            failed = err
        bad = failed_ranks(failed is not None)
        if bad:
            here = f"on this rank: {failed}" if failed is not None else "see the error on those ranks"
            raise HesslabError(
                f"data: rank(s) {bad} of {torch.distributed.get_world_size()} cannot use their "
                f"first batch ({here}). Every rank needs at least one valid sample: shard the data "
                "so that each rank gets some (e.g. DistributedSampler, drop_last=False)."
            ) from failed
        return batch

    def count(self) -> int:
        """N over all ranks (one pass over the data the first time)."""
        if self.num_data is None:
            self.num_data = global_count(sum(size for _, _, _, size in self.source.batches()))
        return self.num_data

    def set_count(self, local: int) -> int:
        """Record N from a pass that counted ``local`` samples on this rank; returns N."""
        if self.num_data is None:
            self.num_data = global_count(local)
        return self.num_data

    # ------------------------------------------------------------ determinism
    def check_determinism(self, apply: Callable[[Tensor], Tensor], n: int) -> None:
        """Apply ``apply`` twice to one random (n, 1) block; raise unless they agree.

        Done only where a product can change between passes (train mode, or an
        iterable of batches that may shuffle or augment); every rank decides alike.

        Raises:
            HesslabError: the two products differ beyond 10·√eps relatively.
        """
        if not any_rank(self.train_mode or not self.single):
            return
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(n, 1, generator=gen, dtype=torch.float64).to(device=self.device, dtype=self.dtype)
        p1, p2 = apply(v), apply(v)
        diff = float((p1 - p2).norm())
        scale = max(float(p1.norm()), float(p2.norm()))
        tol = 10 * math.sqrt(torch.finfo(self.dtype).eps)
        if diff <= tol * scale:
            return
        why = (
            "In train mode (train_mode=True) dropout draws new masks on every forward pass and "
            "BatchNorm normalizes with the statistics of each batch, which change when the data "
            "is shuffled or augmented. "
            if self.train_mode
            else "The data changes between passes (shuffling with BatchNorm in train mode, random "
            "augmentation) or the model is random. "
        )
        raise HesslabError(
            f"check_deterministic: two products of {self.name} with the same vector differ "
            f"(relative difference {diff / scale:.3g} > {tol:.1e}), so the operator is not a "
            f"fixed matrix. {why}Use eval mode (train_mode=False, the default), remove dropout, "
            "fix the batches (a list of tensors, no augmentation), or pass "
            "check_deterministic=False to accept a random operator."
        )


def check_targets(loss_fn: Any, out: Any, targets: Tensor, index: int) -> None:
    """Catch data mistakes ``loss_fn`` would hide or report obscurely, on one batch.

    Raises:
        HesslabError: outputs and targets of different lengths; float targets of
            class-index shape with cross-entropy; MSE targets of another shape than
            the outputs (broadcasting would compare every output with every target).
    """
    if not isinstance(out, Tensor) or out.dim() < 1:
        return
    if targets.dim() >= 1 and out.shape[0] != targets.shape[0]:
        raise HesslabError(
            f"data: batch {index} gives {out.shape[0]} outputs (shape {tuple(out.shape)}) but "
            f"has {targets.shape[0]} targets (shape {tuple(targets.shape)}); inputs and "
            "targets must hold the same samples along their first dimension"
        )
    fn = loss_fn
    if isinstance(fn, nn.CrossEntropyLoss) or fn is F.cross_entropy:
        if targets.is_floating_point() and targets.dim() == out.dim() - 1:
            raise HesslabError(
                f"data: cross-entropy got floating targets of shape {tuple(targets.shape)} "
                "(class indices); class indices must be integers: pass targets.long() "
                "(floating targets must be class probabilities of the output's shape)"
            )
    elif (isinstance(fn, nn.MSELoss) or fn is F.mse_loss) and targets.shape != out.shape:
        raise HesslabError(
            f"data: MSE targets of shape {tuple(targets.shape)} against outputs of shape "
            f"{tuple(out.shape)}: broadcasting would compare every output with every target. "
            "Give the targets the outputs' shape (e.g. targets.view_as(outputs))."
        )


def _first_layer_hint(model: nn.Module) -> str:
    """A hint naming the model's first Linear or convolution and the width it expects, or ""."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            return f" (its first Linear layer {name!r} expects {m.in_features} input features)"
        if isinstance(m, nn.modules.conv._ConvNd):
            return f" (its first convolution {name!r} expects {m.in_channels} input channels)"
    return ""


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device | None) -> Iterator[None]:
    """Run the body on a forked RNG (CPU, and ``device`` when CUDA) seeded with ``seed``."""
    cuda = device is not None and device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
