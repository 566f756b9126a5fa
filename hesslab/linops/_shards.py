"""Vectors split over ranks: the layout the vectors of a sharded operator live in.

A sharded operator (a model whose parameters are FSDP2 ``fully_shard`` DTensors) acts on
the rank's local shard of every vector: its ``shape`` is the local (n_r, n_r), and the
vector it stands for has n = Σ_r n_r entries. Whatever combines entries across a vector
(inner products, norms, Gram matrices) is a local partial sum followed by one all-reduce,
:meth:`Shards.reduce_`; random vectors are drawn on every rank from its own stream
(:meth:`Shards.seed`), so the shards of a random vector are independent. An operator that
is not sharded has ``shards = None`` and the solvers skip all of this.

The global vector is the rank-major concatenation of the local shards, or, when the
operator's own order is another one (FSDP2: parameter by parameter, each parameter's rows
split over the ranks), the order given by ``index``: for this rank's entries, their
positions in the global vector. ``index`` is a function, called only by :meth:`Shards.gather`,
so no rank ever holds O(n) layout data (8n bytes would be 56 GB for a 7B model); checkpoints
identify the layout by ``signature``, a short description of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from hesslab.errors import HesslabError
from hesslab.linops._model import all_reduce_sum_, collective_device, distributed_active, gather_rows

__all__ = ["Shards"]


@dataclass(frozen=True)
class Shards:
    """How the vectors of a sharded operator are split over the ranks of the default group.

    Attributes:
        rank: This rank.
        world: The number of ranks.
        local_sizes: n_r for every rank (the local length of a vector).
        index: None when the global vector is the rank-major concatenation of the
            shards; else a function returning, for each of this rank's n_r entries, its
            position in the global vector (int64, (n_r,)); over the ranks these tile
            range(n). Called only when vectors are gathered.
        signature: A short description of the layout (equal for equal layouts), used
            to compare operators and to identify checkpoints.
    """

    rank: int
    world: int
    local_sizes: tuple[int, ...]
    index: Callable[[], Tensor] | None = field(default=None, compare=False, repr=False)
    signature: str = ""

    @property
    def global_size(self) -> int:
        """n = Σ_r n_r."""
        return sum(self.local_sizes)

    @classmethod
    def from_local(cls, local_size: int, index: Callable[[], Tensor] | None = None, signature: str = "") -> Shards:
        """The layout of vectors with ``local_size`` entries on this rank (one all-reduce)."""
        if not distributed_active():
            raise HesslabError("sharded vectors need torch.distributed: call init_process_group first")
        sizes = gather_rows(torch.tensor([float(local_size)]))[:, 0]
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                   tuple(int(s) for s in sizes.tolist()), index, signature)

    def reduce_(self, t: Tensor) -> Tensor:
        """Sum the local partial sums ``t`` over the ranks, in place; returns ``t``."""
        return all_reduce_sum_(t)

    def gather_rows(self, local: Tensor) -> Tensor:
        """(world, k) float64, the same bits on every rank: row r is rank r's ``local`` (k,)."""
        return gather_rows(local)

    def seed(self, seed: int) -> int:
        """The seed of this rank's stream for a solver seeded with ``seed``."""
        return (int(seed) * 1_000_003 + self.rank) % (2**63 - 1)

    def gather(self, V: Tensor, dst: int = 0) -> Tensor | None:
        """The global (n, ...) tensor on rank ``dst`` from every rank's local (n_r, ...) ``V``.

        Every rank must call it (one all-gather, two with an ``index``); ranks other than
        ``dst`` get None.
        Meant for small models: rank ``dst`` holds n × ... entries.
        """
        if V.shape[0] != self.local_sizes[self.rank]:
            raise HesslabError(
                f"V: expected the local shard with {self.local_sizes[self.rank]} rows, got {tuple(V.shape)}"
            )
        index = None if self.index is None else self.index().to(torch.int64)
        if not distributed_active():  # one rank in process (Shards(0, 1, (n,))): nothing to gather
            return V.clone() if index is None else V.new_empty(V.shape).index_copy_(0, index.to(V.device), V)
        dev = collective_device()
        width = max(self.local_sizes)
        parts = _all_gather_padded(V.to(dev), width, self.world)
        if index is not None:
            positions = _all_gather_padded(index.to(dev), width, self.world)
        if self.rank != dst:
            return None
        flat = torch.cat([p[:s] for p, s in zip(parts, self.local_sizes)]).to(V.device)
        if index is None:
            return flat
        where = torch.cat([p[:s] for p, s in zip(positions, self.local_sizes)]).to(V.device)
        return torch.empty_like(flat).index_copy_(0, where, flat)


def _all_gather_padded(t: Tensor, width: int, world: int) -> list[Tensor]:
    """Every rank's ``t`` (first dimension at most ``width``), padded to ``width`` rows."""
    buf = t.new_zeros((width, *t.shape[1:]))
    buf[: t.shape[0]] = t
    parts = [torch.empty_like(buf) for _ in range(world)]
    torch.distributed.all_gather(parts, buf)
    return parts
