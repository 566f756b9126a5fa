"""``hesslab analyze`` under ``torchrun``: ``--shard none|ddp|fsdp``.

With ``WORLD_SIZE`` > 1 in the environment (``torchrun --nproc-per-node N -m hesslab
analyze ...``) the command starts the default process group itself when none exists
(gloo on the CPU, nccl with ``--device cuda``; ``--dist-timeout`` seconds on every
collective), takes ``cuda:LOCAL_RANK`` for ``--device cuda``, and gives rank r the
batches r, r + W, r + 2W, ... of the first ``--max-batches`` batches of the loader. The
Hessian is that of the mean loss over all those batches, as in one process.

* ``none``: every rank holds the whole model; products are all-reduced (data parallel).
* ``ddp``: the model wrapped in ``DistributedDataParallel`` (hesslab bypasses its hooks).
* ``fsdp``: FSDP2 ``fully_shard`` on every direct child module that has parameters, then
  on the root (which takes the root's own parameters); vectors are the ranks' local
  shards and products are finite differences of gradients. With ``--dtype`` the model and
  the floating-point data are cast to it before sharding (the sharded operator runs in
  the parameters' dtype).

The measures each mode allows: :func:`measures_for` (fsdp: top_k, density, trace,
power_law, outliers; ddp: all but kfac; none: all, equal to one process's).

Errors found while loading (on one rank or all) reach every rank before any other
collective: every rank exits with the same status and rank 0 prints the message.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
from collections.abc import Callable
from typing import Any

from hesslab.errors import HesslabError

__all__ = ["SHARD_MODES", "SHARDED_MEASURES", "DEFAULT_DIST_TIMEOUT", "Launch", "world_size_from_env",
           "is_rank_zero", "start", "agree", "agree_status", "share_batches", "shard_model", "measures_for",
           "usable_measures",
           "cast_data"]

SHARD_MODES = ("none", "ddp", "fsdp")
#: The measures that run on FSDP-sharded operators (``outliers`` are read off their results).
SHARDED_MEASURES = ("top_k", "density", "trace", "power_law", "outliers")
#: Seconds before a collective gives up (``--dist-timeout``).
DEFAULT_DIST_TIMEOUT = 600


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_rank_zero() -> bool:
    """Whether this process prints: rank 0 of torchrun, or a lone process."""
    return os.environ.get("RANK", "0") == "0"


@dataclasses.dataclass
class Launch:
    """This process's place: ``rank`` of ``world``, the ``shard`` mode, the device, and
    whether this command started the process group (and so ends it)."""

    rank: int = 0
    world: int = 1
    shard: str = "none"
    device: Any = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def start(args: argparse.Namespace, device: Any) -> Launch:
    """Check ``--shard`` against the launch and start the process group under torchrun."""
    import torch
    import torch.distributed as dist

    world = world_size_from_env()
    if args.dist_timeout <= 0:
        raise HesslabError(f"--dist-timeout: expected a positive number of seconds, got {args.dist_timeout}")
    if world <= 1:
        if args.shard != "none":
            raise HesslabError(f"--shard {args.shard}: needs several processes; launch with torchrun, e.g. "
                               f"`torchrun --nproc-per-node 2 -m hesslab analyze ... --shard {args.shard}` "
                               "(or drop --shard for one process)")
        return Launch(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise HesslabError(f"--device cuda: LOCAL_RANK {device.index} but only {torch.cuda.device_count()} "
                               "CUDA device(s) here; start at most that many processes per node")
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=args.dist_timeout))
    return Launch(rank=dist.get_rank(), world=dist.get_world_size(), shard=args.shard, device=device,
                  owns_group=owns)


def agree(launch: Launch, step: Callable[[], Any]) -> Any:
    """``step()`` on every rank, then one exchange of failures: when it raised on some
    rank, every rank raises a HesslabError with the message of the first failing rank
    (prefixed with that rank when the others did not fail), so no rank waits for one
    that gave up. Without torchrun ``step()``'s own error propagates."""
    import torch.distributed as dist

    if not launch.distributed:
        return step()
    result, error = None, None
    try:
        result = step()
    except HesslabError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it
        error = f"{type(exc).__name__}: {exc}"
    errors: list[Any] = [None] * launch.world
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        if len(failed) < launch.world or any(e != message for _, e in failed):
            message = f"(on rank {rank} of {launch.world}) {message}"
        raise HesslabError(message)
    return result


def agree_status(launch: Launch, status: int) -> int:
    """The largest exit status over the ranks (every rank exits with it)."""
    if not launch.distributed:
        return status
    import torch

    from hesslab.linops._model import all_reduce_sum_

    flags = torch.zeros(launch.world, dtype=torch.float64)
    flags[launch.rank] = float(status)
    return int(all_reduce_sum_(flags).max().item())


def share_batches(data: Any, used: dict[str, Any], launch: Launch, max_batches: int) -> Any:
    """Rank r's batches of the loaded ones: r, r + W, ... (the whole data in one process)."""
    from hesslab.linops import is_single_batch

    if not launch.distributed:
        return data
    batches = [data] if is_single_batch(data) else list(data)
    if len(batches) < launch.world:
        raise HesslabError(f"--data: {len(batches)} batch(es) for {launch.world} ranks (batch i goes to rank "
                           f"i % {launch.world}; --max-batches {max_batches}): a rank would have no data. Give "
                           f"at least {launch.world} batches (a larger --max-batches or smaller batches in the "
                           "loader) or start fewer processes")
    mine = batches[launch.rank::launch.world]
    return mine[0] if len(mine) == 1 else mine


def shard_model(model: Any, launch: Launch) -> Any:
    """The model as ``--shard`` asks: as is (``none``), in DistributedDataParallel, or
    ``fully_shard`` on each direct child with parameters and then on the root (``fsdp``).
    Collective: every rank calls it."""
    if launch.shard == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [launch.device.index] if launch.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if launch.shard == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child)
        fully_shard(model)
    return model


def measures_for(shard: str) -> tuple[str, ...]:
    """The measures ``--shard`` allows under torchrun: fsdp :data:`SHARDED_MEASURES`;
    ddp all but kfac (its layer walk sees DDP's wrapper); none all."""
    from hesslab.demo import ANALYZE_MEASURES

    if shard == "fsdp":
        return SHARDED_MEASURES
    return tuple(m for m in ANALYZE_MEASURES if shard != "ddp" or m != "kfac")


_WHY = {"fsdp": "sharded parameters: finite-difference products of the Hessian only",
        "ddp": "the Kronecker factors walk the unwrapped model's layers; --shard none measures the same Hessian"}


def usable_measures(measures: list[str], explicit: bool, launch: Launch, log: Callable[[str], None]) -> list[str]:
    """The measures that run with this ``--shard`` (:func:`measures_for`): others named in
    ``--measures`` are an error; dropped from ``all`` with a log line."""
    if not launch.distributed:
        return measures
    allowed = measures_for(launch.shard)
    refused = [m for m in measures if m not in allowed]
    if refused and explicit:
        raise HesslabError(f"--measures: {', '.join(refused)} cannot run with --shard {launch.shard} "
                           f"({_WHY[launch.shard]}); choose among {','.join(allowed)}")
    if refused:
        log(f"hesslab: --shard {launch.shard}: not measured ({_WHY[launch.shard]}): {', '.join(refused)}")
    return [m for m in measures if m not in refused]


def cast_data(x: Any, dtype: Any) -> Any:
    """``x`` (a batch, a list of batches) with its floating-point tensors in ``dtype``."""
    from collections.abc import Mapping

    import torch

    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, Mapping):
        return {k: cast_data(v, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(cast_data(v, dtype) for v in x)
    return x
