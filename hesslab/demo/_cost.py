"""What a measure will cost, said before it starts: products with the operator, the memory
of its basis against what is free, and a time from one product timed on the operator."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..solvers import available_bytes
from ._stages import Stages

__all__ = ["CostLog", "format_bytes", "format_seconds"]


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.3g} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class CostLog:
    """Logs, before each measure, its products, memory and a time estimate.

    The time of one product is measured once per operator (one product with a seeded
    random vector, counted among the operator's products) the first time a measure with
    products starts on it; every estimate is that time multiplied by the products.
    Each line is also kept in :attr:`lines` (for the summary).
    """

    def __init__(self, stages: Stages, seed: int = 0):
        self.stages = stages
        self.seed = seed
        self.product_seconds: dict[int, float] = {}
        self.lines: list[str] = []

    def time_product(self, op: Any) -> float:
        key = id(op)
        if key not in self.product_seconds:
            gen = torch.Generator(device="cpu").manual_seed(self.seed + 12345)
            v = torch.randn(int(op.shape[0]), generator=gen, dtype=torch.float64).to(dtype=op.dtype,
                                                                                      device=op.device)
            t0 = time.perf_counter()
            op @ v
            self.product_seconds[key] = time.perf_counter() - t0
        return self.product_seconds[key]

    def start(self, op: Any, what: str, cost: dict[str, Any]) -> None:
        """Log ``what``'s cost (``cost`` as given by the pipeline's ``on_start``)."""
        products, mem = int(cost.get("products") or 0), int(cost.get("memory_bytes") or 0)
        parts = []
        if products:
            per = self.time_product(op)
            parts.append(f"≤ {products} products, ≈ {format_seconds(products * per)} "
                         f"(one product took {format_seconds(per)})")
        else:
            parts.append("no Hessian products")
        if mem:
            free = available_bytes(op.device)
            parts.append(f"basis {format_bytes(mem)}" + (f" of {format_bytes(free)} free on {op.device}"
                                                          if free else ""))
        line = f"{what}: will cost {', '.join(parts)}"
        self.lines.append(line)
        self.stages.log(f"  {line}")

    def done(self, what: str, record: dict[str, Any]) -> None:
        """Log what a finished measure took (its pipeline record), beside the estimate."""
        if record.get("seconds") is None or what.endswith(": loss"):
            return
        status = "failed" if "error" in record else "done"
        line = f"{what}: {status}: {record.get('num_matvecs', 0)} products in {format_seconds(record['seconds'])}"
        self.lines.append(line)
        self.stages.log(f"  {line}")
