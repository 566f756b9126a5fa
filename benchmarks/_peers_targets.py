"""bench_peers' ratios and the table of issue 15's targets (measured value, met or not).

Ratios compare rows of the same run: ``vs_hesslab`` (a tool's time ÷ hesslab's, same
workload, threads, task and settings) and, on hesslab's rows, ``vs_best_peer`` (the fastest
equally accurate peer's time ÷ hesslab's; > 1: hesslab is faster). The targets:

    ratio ≥ 1.0    every task of the product-dominated workloads, matched settings
    SLQ ≥ 1.3      the SLQ rows among them
    overhead ≤ 1.05  hesslab's total / (products × its kept-graph product) for SLQ and
                     trace on the ResNet (the issue's definition: the single product is
                     timed in a burst after warm-up, so machine drift over the run lands in it)
    solver overhead ≤ 1.05  the same rows' total / time inside their own products in the
                     same run (what the solver adds on top of its products, drift cancelled)
    compiled vs eager  the kept-graph product against the compiled one per model
                     (benchmarks/bench_compiled.py's JSON, when it ran before)
"""

from __future__ import annotations

import json
from pathlib import Path

from _common import table
from _peers_config import ACCURACY_FACTOR, ERROR_FLOOR, PRODUCT_WORKLOADS, TASK_LABEL

PEERS = ("pyhessian", "hessian-eigenthings", "curvlinops")
# The overhead rows of hesslab's ResNet SLQ and trace: (row key, target), goal <= 1.05 each.
OVERHEAD_TARGETS = (("floor_ratio", "overhead: total / (products x kept-graph product)"),
                    ("solver_overhead", "solver overhead: total / time inside products (same run)"))


def _key(r: dict) -> tuple:
    return r["workload"], r.get("threads"), r["task"], r.get("settings", "matched")


def equally_accurate(peer: dict, ours: dict) -> bool:
    """A peer's row is as accurate as hesslab's: error ≤ 10x ours, or both under the dtype's floor.

    Without a reference (error None on either side) every peer on the same budget counts.
    """
    e, h = peer.get("error"), ours.get("error")
    if e is None or h is None:
        return True
    floor = ERROR_FLOOR.get(ours.get("dtype", "float32"), 1e-5)
    return e <= max(ACCURACY_FACTOR * h, floor)


def add_ratios(rows: list[dict]) -> None:
    """Add ``vs_hesslab`` to every row and ``vs_best_peer`` / ``best_peer`` to hesslab's."""
    ref = {_key(r): r for r in rows if r["tool"] == "hesslab" and "seconds" in r}
    for r in rows:
        h = ref.get(_key(r))
        if h is not None and r.get("seconds"):
            r["vs_hesslab"] = r["seconds"] / h["seconds"]
            if r.get("peak_mb") is not None and h.get("peak_mb"):
                r["mem_vs_hesslab"] = r["peak_mb"] / h["peak_mb"]
    for key, h in ref.items():
        peers = [r for r in rows if _key(r) == key and r["tool"] in PEERS and r.get("seconds")
                 and equally_accurate(r, h)]
        if peers:
            best = min(peers, key=lambda r: r["seconds"])
            h["vs_best_peer"], h["best_peer"] = best["seconds"] / h["seconds"], best["tool"]


def targets(rows: list[dict], compiled: dict | None) -> list[dict]:
    """One row per target and measurement: what, the measured value, the goal, met or not."""
    out = []
    for r in rows:
        if (r["tool"] != "hesslab" or r["workload"] not in PRODUCT_WORKLOADS
                or r.get("settings", "matched") != "matched" or r.get("threads") not in (1, None)):
            continue
        where = f"{r['workload']}, {TASK_LABEL[r['task']]}"
        if "vs_best_peer" in r:
            goal = 1.3 if r["task"] == "slq" else 1.0
            out.append(dict(target=f"ratio vs fastest equally accurate peer ({r['best_peer']})", where=where,
                            value=r["vs_best_peer"], goal=f">= {goal}", met=r["vs_best_peer"] >= goal))
        if r["workload"] == "resnet128" and r["task"] in ("slq", "trace"):
            for key, target in OVERHEAD_TARGETS:
                if r.get(key):
                    out.append(dict(target=target, where=where, value=r[key], goal="<= 1.05", met=r[key] <= 1.05))
    for c in (compiled or {}).get("rows", []):
        if c.get("eager_ms") and c.get("compiled_ms"):
            ratio = c["eager_ms"] / c["compiled_ms"]
            out.append(dict(target=f"compiled vs eager kept-graph product ({c['operator']})",
                            where=f"{c['model']}, {c['device']}", value=ratio, goal="measured (> 1: compiled faster)",
                            met=None))
    return out


def load_compiled(out_dir: Path, name: str = "compiled") -> dict | None:
    """bench_compiled.py's JSON from the same output folder, if it ran."""
    path = out_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def render_targets(rows: list[dict]) -> str:
    shown = [dict(r, met={True: "yes", False: "**no**", None: "–"}[r["met"]]) for r in rows]
    return table(shown, [("target", "target", "s"), ("where", "where", "s"), ("value", "measured", ".2f"),
                         ("goal", "goal", "s"), ("met", "met", "s")])
