"""FSDP2-sharded models: Hessian products on the ranks' local shards, by finite differences.

A model wrapped with ``torch.distributed.fsdp.fully_shard`` holds every parameter as a
DTensor whose rows (Shard(d): slices along dim d) are split over the ranks of the
default group. ``Hessian(model, loss_fn, local_data)`` on such a model is sharded:

* a vector is this rank's part of every selected parameter: the concatenation, in
  ``named_parameters()`` order, of ``p.to_local()`` flattened row-major; the operator's
  ``shape`` is the local (n_r, n_r) and ``param_shapes`` are the local shard shapes;
* ``shards`` (:class:`~hesslab.linops._shards.Shards`) carries the local sizes of every
  rank and ``index``: for each of this rank's entries, its position in the unsharded
  model's flat vector (parameter by parameter, each flattened whole), computed only when
  vectors are gathered, so ``shards.gather(v)`` is the vector of the unsharded model;
* the product is H v of the global mean loss L = (1/N) Σ_r Σ_k n_k L_k over every
  rank's batches (N all ranks' samples, uneven shards weighted by their sizes).

Products are central differences of gradients (a double backward through FSDP2 fails):
for each column v, with ε = ∛δ (1 + ‖θ‖) / ‖v‖ (``fd_step`` of
:mod:`hesslab.linops._finite_difference`; the norms over all ranks, summed in rank order,
so ε has the same bits on every rank),

    H v ≈ (∇L(θ + εv) − ∇L(θ − εv)) / (2ε).

Each gradient is the model's own forward and ``loss.backward()`` over this rank's
batches, the loss of batch k scaled by W n_k / N (W ranks): FSDP2 reduce-scatters the
gradients and divides by W, which leaves each rank the local shard of ∇L. The ranks step
through their batches together (one flag per step: a rank whose batches are spent runs
its first batch again with weight 0), since every forward and backward is collective.
The local shards are written in place (θ ± εv from a saved copy) and restored bitwise
from that copy after the product, whatever happens; the ``.grad`` of every parameter and
the buffers (BatchNorm running statistics, also written by a train-mode forward) are
restored too, and FSDP's gradient divide factor and gradient sync are set for the pass
and restored. The error of the difference is that of the unsharded finite-difference
path (see :mod:`hesslab.linops._finite_difference`).

Refused with a :class:`HesslabError`: GGN and KFAC (use Hessian), ``method`` other than
``"auto"``/``"finite_difference"``, ``dtype``/``fd_dtype`` other than the parameters'
dtype (the perturbed shards are the model's own), mixed precision policies that change
the dtype of the forward or of the gradient reduction, CPU offloading, meshes other than
one dimension over every rank, selected parameters that are not all DTensors, and ranks
that select different parameters (the same message on every rank).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import zlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hesslab.errors import HesslabError
from hesslab.linops._finite_difference import METHOD as FD, fd_step
from hesslab.linops._model import any_rank, distributed_active, gather_rows
from hesslab.linops._params import columns_to_params
from hesslab.linops._shards import Shards

if TYPE_CHECKING:  # pragma: no cover
    from hesslab.linops._curvature import CurvatureOperator

__all__ = ["ShardedParameters", "block_indices", "fsdp_setup", "local_shapes"]


# ------------------------------------------------------------------ detection
def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` wrapped (FSDP2), outermost first."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is wrapped
    if fsdp is None or not isinstance(model, nn.Module):  # not a module: ModelData says so
        return []
    return [m for m in model.modules() if isinstance(m, fsdp.FSDPModule)]


def _is_dtensor(t: Tensor) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def _reshard(modules: Sequence[nn.Module]) -> None:
    """Free every unsharded parameter, so that the next forward all-gathers the local shards.

    FSDP2 keeps the root's parameters unsharded after a forward without backward (and
    any module's with ``reshard_after_forward=False``/``reshard_after_backward=False``);
    a forward would then not see shards written in place.
    """
    for m in modules:
        m.reshard()


def _param_groups(modules: Sequence[nn.Module]) -> list[Any]:
    """FSDP2's parameter groups (their mixed precision, offload and reduction settings)."""
    groups: list[Any] = []
    for m in modules:
        groups.extend(getattr(m._get_fsdp_state(), "_fsdp_param_groups", None) or [])
    return groups


def fsdp_setup(model: nn.Module, op_cls: type, method: str = "auto",
               dtype: torch.dtype | None = None, fd_dtype: torch.dtype | None = None) -> str:
    """The product method for ``model``: ``method`` itself unless the model is FSDP2-sharded.

    For a model with ``fully_shard`` modules: refuses what the sharded path cannot do,
    reshards the model (so ``named_parameters()`` yields the DTensors) and returns
    ``"finite_difference"``.

    Raises:
        HesslabError: the operator is not a Hessian, ``method`` needs a double backward,
            ``dtype``/``fd_dtype`` differ from the parameters' dtype, or a mixed
            precision or offload policy that the sharded path does not support.
    """
    modules = _fsdp_modules(model)
    if not modules:
        return method
    if not distributed_active():
        raise HesslabError(
            "model: is FSDP2-sharded (fully_shard) but torch.distributed has no process group; "
            "build the operator under torchrun, after init_process_group, on every rank"
        )
    name = op_cls.__name__
    if not getattr(op_cls, "finite_difference_supported", False):
        raise HesslabError(
            f"model: {name} of an FSDP2-sharded model (fully_shard) is not supported: it needs "
            "second derivatives through FSDP's collectives. Use hl.Hessian(model, loss_fn, data) "
            f"(products by method='{FD}', the default for sharded models)."
        )
    if method not in ("auto", FD):
        raise HesslabError(
            f"method: {method!r} needs second derivatives through autograd (a double backward or "
            "forward-over-reverse), which FSDP2-sharded models (fully_shard) cannot run; use "
            f"method='{FD}' (the default for sharded models)"
        )
    own = next(iter(model.parameters())).dtype  # several dtypes: check_parameters refuses them
    for arg, value in (("dtype", dtype), ("fd_dtype", fd_dtype)):
        if value is not None and value != own:
            raise HesslabError(
                f"{arg}: {value} differs from the sharded parameters' dtype {own}; a sharded "
                "model's products perturb its own shards, in their dtype. Cast the model before "
                f"fully_shard (e.g. model.to({value})) and pass {arg}=None."
            )
    for group in _param_groups(modules):
        _check_policies(group, own)
    _reshard(modules)
    return FD


def _check_policies(group: Any, dtype: torch.dtype) -> None:
    """Refuse mixed precision that changes the products' dtype, and CPU offloading."""
    mp = getattr(group, "mp_policy", None)
    for field in ("param_dtype", "reduce_dtype"):
        value = getattr(mp, field, None)
        if value is not None and value != dtype:
            raise HesslabError(
                f"model: its FSDP2 MixedPrecisionPolicy has {field}={value} against parameters in "
                f"{dtype}; finite-difference products need the forward and the gradient reduction "
                f"in the parameters' dtype. Shard it with MixedPrecisionPolicy({field}=None)."
            )
    offload = getattr(group, "offload_policy", None)
    if offload is not None and type(offload).__name__ == "CPUOffloadPolicy":
        raise HesslabError(
            "model: FSDP2 CPU offloading (CPUOffloadPolicy) is not supported by hesslab's "
            "sharded products; shard the model without offload_policy"
        )


def local_shapes(tensors: Sequence[Tensor]) -> list[torch.Size]:
    """The shapes a flat vector's parts have: a DTensor's local shard, else the tensor's own."""
    return [t.to_local().shape if _is_dtensor(t) else t.shape for t in tensors]


# ------------------------------------------------------------------ agreement
def _global_sum(local: Tensor) -> Tensor:
    """Σ over ranks of ``local`` (k,), float64, added in rank order: the same bits everywhere."""
    return gather_rows(local).sum(0)


def _fingerprint(names: Sequence[str], tensors: Sequence[Tensor]) -> float:
    """A checksum of the selection: names, global shapes, dtypes, placements."""
    desc = [
        (k, tuple(t.shape), str(t.dtype), _is_dtensor(t),
         str(t.placements) if _is_dtensor(t) else "", t.device_mesh.size() if _is_dtensor(t) else 0)
        for k, t in zip(names, tensors)
    ]
    return float(zlib.crc32(repr(desc).encode()))


def _check_selection(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    """Every rank selects the same DTensors, sharded over all ranks along one mesh dim.

    Raises (on every rank alike):
        HesslabError: the ranks' selections differ, plain tensors are selected, or a
            placement the layout does not cover (2-D meshes, HSDP, strided shards).
    """
    n = sum(t.numel() for t in tensors)
    rows = gather_rows(torch.tensor([_fingerprint(names, tensors), len(names), n]))
    if not bool((rows == rows[0]).all()):
        per_rank = "; ".join(
            f"rank {r}: {int(c)} tensors, {int(m)} entries"
            for r, (_, c, m) in enumerate(rows.tolist())
        )
        raise HesslabError(
            f"params: the ranks select different parameters ({per_rank}, or other names/shapes). "
            "A sharded operator needs the same params= and the same fully_shard-wrapped model on "
            "every rank."
        )
    plain = [k for k, t in zip(names, tensors) if not _is_dtensor(t)]
    if plain:
        raise HesslabError(
            f"params: selects FSDP2-sharded (DTensor) parameters and plain ones ({plain[:4]}"
            f"{' ...' if len(plain) > 4 else ''}); a sharded operator needs every selected "
            "parameter sharded: apply fully_shard to the modules that own them (and to the root, "
            "fully_shard(model)), or select only sharded parameters"
        )
    from torch.distributed.tensor import Shard

    world = torch.distributed.get_world_size()
    for k, t in zip(names, tensors):
        mesh = t.device_mesh
        if mesh.ndim != 1 or mesh.size() != world or type(t.placements[0]) is not Shard:
            raise HesslabError(
                f"params: {k!r} is placed {t.placements} on a mesh of shape "
                f"{tuple(t.device_mesh.shape)}; hesslab's sharded operators support FSDP2 over one "
                f"mesh dimension spanning all {world} ranks (plain fully_shard), not HSDP/2-D meshes"
            )


def block_indices(shape: Sequence[int], block: Sequence[int], start: Sequence[int]) -> Tensor:
    """The row-major flat indices, in a tensor of ``shape``, of its block of shape ``block``
    starting at ``start`` (one offset per dim), in the block's own row-major order.

    Returns:
        (prod(block),) int64: entry i of the flattened block is entry ``out[i]`` of the
        flattened tensor. Built from one arange per dim (memory: the block's size).
    """
    idx = torch.zeros((), dtype=torch.int64)
    for d, (size, first) in enumerate(zip(block, start)):
        view = [1] * len(block)
        view[d] = size
        idx = idx + ((torch.arange(size) + first) * math.prod(shape[d + 1:])).view(view)
    return idx.reshape(-1)


def _placement(tensors: Sequence[Tensor], shapes: Sequence[torch.Size]) -> list[tuple]:
    """Per selected parameter: (global shape, local shape, global offset of the local block).

    The global vector is the unsharded model's flat layout: the selected parameters in
    order, each flattened row-major; a rank's entries are its local blocks, in order.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    out = []
    for t, shape in zip(tensors, shapes):
        local, start = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        if tuple(local) != tuple(shape):  # pragma: no cover - FSDP2 and DTensor chunk alike
            raise HesslabError(f"params: a shard of shape {tuple(shape)} where DTensor says {local}")
        out.append((tuple(t.shape), tuple(shape), tuple(start)))
    return out


def _global_index(placement: list[tuple]) -> Tensor:
    """For each of this rank's entries, its position in the global vector ((n_r,) int64)."""
    parts, offset = [], 0
    for full, shape, start in placement:
        parts.append(block_indices(torch.Size(full), torch.Size(shape), start) + offset)
        offset += math.prod(full)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


# ------------------------------------------------------------------ the operator's part
class ShardedParameters:
    """The selected parameters of an FSDP2 model as local shards: layout, gradients, products.

    Built by :meth:`attach` for a :class:`CurvatureOperator` whose model is sharded; the
    operator hands it its products (:meth:`product`) and its loss and gradient
    (:meth:`loss_and_gradient`). See the module docstring for the conventions.
    """

    def __init__(self, op: CurvatureOperator, tensors: Sequence[Tensor]):
        self.op = op
        self.modules = _fsdp_modules(op.model)
        op._md.own_call = True  # the model's own forward (and its buffers restored after each use)
        _check_selection(op.param_names, tensors)
        placement = _placement(tensors, op.param_shapes)
        op.shards = Shards.from_local(op.shape[0], index=functools.partial(_global_index, placement),
                                      signature=repr(placement))
        if op.shards.global_size != sum(math.prod(full) for full, _, _ in placement):
            raise HesslabError("params: the ranks' shards do not tile the parameters (unsupported placement)")

    @classmethod
    def attach(cls, op: CurvatureOperator, tensors: Sequence[Tensor]) -> ShardedParameters | None:
        """The sharded part of ``op`` (setting ``op.shards``), or None for an unsharded model."""
        if not _fsdp_modules(op.model):  # fsdp_setup saw the same and checked the rest
            return None
        return cls(op, tensors)

    # -------------------------------------------------------------- state
    def _local(self) -> list[Tensor]:
        """The local shards of the selected parameters, as the next forward reads them."""
        _reshard(self.modules)
        params = dict(self.op.model.named_parameters())
        with torch.no_grad():
            return [params[k].to_local() for k in self.op.param_names]

    @contextlib.contextmanager
    def _kept(self) -> Iterator[None]:
        """Restore every .grad and FSDP reduction setting after the body.

        The body runs under the operator's model mode, which restores the buffers.
        """
        model = self.op.model
        _reshard(self.modules)  # the parameters are the sharded DTensors from here on
        params = list(model.parameters())
        grads = [p.grad for p in params]
        groups = _param_groups(self.modules)
        settings = [(g.gradient_divide_factor, g.reduce_grads, g.all_reduce_grads) for g in groups]
        try:
            for g in groups:  # FSDP's default: gradients summed over the ranks and divided by W
                g.gradient_divide_factor, g.reduce_grads, g.all_reduce_grads = None, True, True
            with torch.enable_grad(), self.op._md.model_mode():
                yield
        finally:
            _reshard(self.modules)
            for p, g in zip(params, grads):
                p.grad = g
            for g, saved in zip(groups, settings):
                g.gradient_divide_factor, g.reduce_grads, g.all_reduce_grads = saved

    # -------------------------------------------------------------- one pass
    def _pass(self, backward: bool) -> tuple[Tensor, Tensor | None]:
        """One pass over this rank's batches: (Σ_k n_k L_k here, (1,) float64, and with
        ``backward`` this rank's shard of ∇L, (n_r,)).

        The ranks step through their batches together, one ``any_rank`` flag per step; a
        rank whose batches are spent runs its first batch again with weight 0.
        """
        md, model = self.op._md, self.op.model
        for p in model.parameters():
            p.grad = None
        scale = torch.distributed.get_world_size() / md.count()  # FSDP divides by W
        batches = md.batches()
        first, total = None, torch.zeros(1, dtype=torch.float64)
        while True:
            item = next(batches, None)
            first = first or item
            if not any_rank(item is not None):
                break
            index, inputs, targets, size = item or first
            weight = size if item is not None else 0
            # a rerun batch draws its own dropout masks, the global RNG untouched
            rng = md.batch_rng(index) if item is None else contextlib.nullcontext()
            with rng, torch.enable_grad() if backward else torch.no_grad():
                loss = self.op._loss(md.forward({}, inputs), targets)  # own_call: the model itself
                if backward:
                    (loss * (weight * scale)).backward()
            total += weight * loss.detach().double().cpu()
        if not backward:
            return total, None
        _reshard(self.modules)  # with reshard_after_backward=False the module holds unsharded ones
        params = dict(model.named_parameters())
        flat = [
            torch.zeros(math.prod(s), dtype=self.op.dtype, device=self.op.device)
            if params[k].grad is None else params[k].grad.to_local().reshape(-1)
            for k, s in zip(self.op.param_names, self.op.param_shapes)
        ]
        return total, torch.cat(flat)

    def loss_and_gradient(self, need_grad: bool) -> tuple[float, Tensor | None]:
        """L(θ) over all ranks' data and (``need_grad``) this rank's shard of ∇L(θ), (n_r,)."""
        with self._kept():
            total, grad = self._pass(backward=need_grad)
        loss = float(_global_sum(total)[0]) / self.op._md.count()
        if not math.isfinite(loss):
            raise HesslabError(self._nonfinite("loss", bad_loss=True))
        if grad is not None and any_rank(not bool(torch.isfinite(grad).all())):
            raise HesslabError(self._nonfinite("gradient"))
        return loss, grad

    # -------------------------------------------------------------- products
    def product(self, V: Tensor) -> Tensor:
        """H V by central differences on the local shards; V (n_r, b) -> (n_r, b).

        Column j: (∇L(θ + ε_j v_j) − ∇L(θ − ε_j v_j)) / (2ε_j), ε_j by ``fd_step`` from the
        global ‖θ‖ and ‖v_j‖. A zero column gives zeros, a NaN/Inf column NaN (diagnosed).
        """
        op = self.op
        cols, finite = [], True
        with self._kept():
            saved = [t.detach().clone() for t in self._local()]
            theta = torch.cat([t.reshape(-1) for t in saved]).double()
            sq = torch.cat([theta.pow(2).sum().reshape(1), V.double().pow(2).sum(0)])
            norms = _global_sum(sq).sqrt().tolist()  # ‖θ‖, ‖v_1‖, ..., ‖v_b‖, equal on all ranks
            Vs = columns_to_params(V, op.param_shapes)  # [(b, *s_i)]
            try:
                for j, v_norm in enumerate(norms[1:]):
                    if v_norm == 0.0 or not math.isfinite(v_norm):
                        fill = 0.0 if v_norm == 0.0 else math.nan
                        cols.append(V.new_full((op.shape[0],), fill))
                        continue
                    eps = fd_step(norms[0], v_norm, op.dtype)
                    grads = []
                    for sign in (1.0, -1.0):
                        with torch.no_grad():
                            for t, s, part in zip(self._local(), saved, Vs):
                                t.copy_(s).add_(part[j], alpha=sign * eps)  # θ ± εv from the copy
                        total, grad = self._pass(backward=True)
                        finite = finite and bool(torch.isfinite(total).all())
                        grads.append(grad)
                    cols.append((grads[0] - grads[1]).div_(2 * eps))
            finally:
                with torch.no_grad():
                    for t, s in zip(self._local(), saved):
                        t.copy_(s)  # bitwise the parameters as they were
        out = torch.stack(cols, dim=1)  # (n_r, b)
        if any_rank(not bool(torch.isfinite(out).all())):
            bad_v = any(not math.isfinite(x) for x in norms[1:])
            bad_loss = any_rank(not finite)
            raise HesslabError(self._nonfinite("product", bad_v=bad_v, bad_loss=bad_loss))
        return out

    @staticmethod
    def _nonfinite(what: str, bad_v: bool = False, bad_loss: bool = False) -> str:
        """The message for a NaN/Inf ``what``, from facts every rank shares."""
        if bad_v:
            return "V: the block of vectors holds NaN or Inf entries"
        if bad_loss:
            return (
                "loss_fn: the loss is NaN or Inf on some rank's data; check every rank's inputs "
                "and targets for NaN/Inf and the model's parameters"
            )
        return (
            f"model: the {what} of the sharded Hessian holds NaN or Inf although the loss is finite "
            "on every rank: the derivatives overflow or are undefined (a non-smooth loss or "
            "activation at a kink, overflow in low precision). Try a float64 model."
        )
