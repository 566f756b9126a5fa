"""bench_peers' worker: one tool's tasks on one workload in its own process; rows as JSON."""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from _common import sync
from _peers_adapters import ADAPTERS, PeakMemory, _measure

# ----------------------------------------------------------------------------- worker
def _accuracy(task: str, out: dict, exact: dict | None) -> float | None:
    """The task's error against the reference; None where the workload has none for it."""
    need = {"top10": "top", "trace": "trace", "slq": "eigenvalues"}[task]
    if exact is None or need not in exact:
        return None
    if task == "top10":
        ref = np.asarray(exact["top"], dtype=np.float64)
        got = np.asarray(out["eigenvalues"], dtype=np.float64)
        k = min(len(ref), len(got))
        return float(np.max(np.abs(got[:k] - ref[:k]) / np.abs(ref[:k]))) if k else None
    if task == "trace":
        return abs(out["value"] - exact["trace"]) / abs(exact["trace"])
    from scipy.stats import wasserstein_distance

    x, w = _measure(out["nodes"], out["weights"])
    return float(wasserstein_distance(x, np.asarray(exact["eigenvalues"]), u_weights=w))


def in_run_figures(seconds: float, products: int, product_s: float, hvp_ms: float | None) -> dict:
    """A row's per-product figures from its wall time, product count and time inside products.

    ms_per_product = wall time / products; floor_ratio = wall time / (products x the single
    product timed after warm-up); product_s = seconds inside the product entry point in the
    same run, ms_per_product_in_run = its mean per product, solver_overhead = wall time /
    product_s (what the solver adds on top of its own products; 1.00 = nothing).
    """
    out: dict = {"product_s": product_s}
    if products:
        out["ms_per_product"] = 1e3 * seconds / products
        out["ms_per_product_in_run"] = 1e3 * product_s / products
        if hvp_ms:
            out["floor_ratio"] = seconds / (products * hvp_ms / 1e3)
    if product_s > 0:
        out["solver_overhead"] = seconds / product_s
    return out


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per measurement from several rounds of the same workers, run in alternating
    tool order (ABC, then CBA): a linear drift of the machine's speed then weighs on every
    tool alike. A row's wall time, time inside products and single-product time are the
    means over the rounds that measured it (``round_seconds`` keeps each round's time);
    its outputs (eigenvalues, error, products, memory) are the first round's.
    """
    def key(r: dict) -> tuple:
        return r["workload"], r["tool"], r["task"], r.get("settings"), r.get("threads")

    later = [{key(r): r for r in rows} for rows in rounds[1:]]
    merged = []
    for row in rounds[0]:
        same = [row] + [d[key(row)] for d in later if key(row) in d and "seconds" in d[key(row)]]
        if "seconds" not in row or len(same) == 1:
            merged.append(row)
            continue
        mean = lambda f: sum(r[f] for r in same) / len(same)  # noqa: E731
        hvps = [r["hvp_ms"] for r in same if r.get("hvp_ms")]
        out = dict(row, seconds=mean("seconds"), product_s=mean("product_s"),
                   round_seconds=[r["seconds"] for r in same],
                   hvp_ms=sum(hvps) / len(hvps) if hvps else row.get("hvp_ms"))
        out.update(in_run_figures(out["seconds"], row["products"], out["product_s"], out["hvp_ms"]))
        merged.append(out)
    return merged


def _median_index(times: list[float]) -> int:
    return sorted(range(len(times)), key=times.__getitem__)[(len(times) - 1) // 2]


def worker(spec_path: str) -> None:
    """Runs one tool's tasks on one workload for every thread count; writes a JSON list of rows."""
    spec = json.loads(Path(spec_path).read_text())
    warnings.filterwarnings("ignore")
    device = spec["device"]
    payload = torch.load(spec["payload"], weights_only=False)
    w = payload[spec["workload"]]
    model = w["model"].to(device).eval()
    X, y = w["data"]
    data = (X.to(device), y.to(device))
    exact = w.get("exact")
    adapter = ADAPTERS[spec["tool"]](model, nn.CrossEntropyLoss(), data, device)
    adapter.settings = spec.get("settings", "matched")
    resettable = spec["resettable"]
    rows = []
    for threads in spec["threads"]:
        torch.set_num_threads(threads)
        hvp_ms = None
        try:
            fn = adapter.hvp_fn()
            fn()
            times = []
            for _ in range(5):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - t0)
            hvp_ms = statistics.median(times) * 1e3
            del fn
        except Exception as err:  # noqa: BLE001 - reported in the row
            adapter.notes.append(f"single product: {type(err).__name__}: {err}")
        model.zero_grad(set_to_none=True)
        for task in spec["tasks"]:
            cfg = spec["config"]
            steps = spec.get("krylov_steps")

            def call(small: bool) -> dict:
                adapter.reset_counter()  # products and the time inside them: this call's only
                if task == "top10":
                    return adapter.top_k(cfg["k"], steps, small)
                if task == "slq":
                    return adapter.slq(3, 1, True) if small else adapter.slq(cfg["slq_steps"], cfg["slq_probes"], False)
                return adapter.trace(3 if small else cfg["trace_products"])

            row = dict(workload=spec["workload"], n=w["n"], dtype=w["dtype"], device=device, tool=adapter.name,
                       task=task, threads=threads if not device.startswith("cuda") else None,
                       settings=adapter.settings)
            try:
                call(spec["warmup"] == "small")  # warm-up
                times, outs, mems, inside = [], [], [], []
                for _ in range(spec["repeats"]):
                    adapter.notes.clear()
                    with PeakMemory(device, resettable) as mem:
                        sync(device)
                        t0 = time.perf_counter()
                        out = call(False)
                        sync(device)
                        times.append(time.perf_counter() - t0)
                    inside.append(adapter.counter["s"])
                    outs.append(out)
                    mems.append(mem.mb)
                i = _median_index(times)
                out = outs[i]
                row.update(seconds=times[i], times=times, products=out["products"], hvp_ms=hvp_ms,
                           peak_mb=max(mems), mem_method="cuda" if device.startswith("cuda") else
                           ("vmhwm-reset" if resettable else "ru_maxrss-delta"))
                row.update(in_run_figures(times[i], out["products"], inside[i], hvp_ms))
                row["error"] = _accuracy(task, out, exact)
                if task == "top10":
                    row["eigenvalues"] = [float(v) for v in out["eigenvalues"]]
                    row["steps"] = out.get("steps")
                    if "converged" in out:
                        row["converged"] = out["converged"]
                elif task == "trace":
                    row["value"] = out["value"]
                if adapter.notes:
                    row["note"] = "; ".join(adapter.notes)
            except Exception as err:  # noqa: BLE001 - a failing peer must not stop the others
                row["failed"] = f"{type(err).__name__}: {str(err)[:300]}"
            model.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("times", "eigenvalues")}), flush=True)
    Path(spec["result"]).write_text(json.dumps(rows))
