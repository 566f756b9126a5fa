"""Helpers shared by the benchmark scripts: timing, environment record, JSON and tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

OUT = Path(__file__).resolve().parent / "out"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", default="1,2", help="CPU thread counts to measure, comma separated")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up (median reported)")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    return p


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        import hesslab

        env["hesslab"] = hesslab.__version__
        env["hesslab_build"] = hesslab.build_info()["build"]
    except ImportError:  # pragma: no cover
        pass
    return env


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], repeats: int, device: str = "cpu", setup: Callable[[], object] | None = None) -> float:
    """Median wall time in seconds of ``fn`` over ``repeats`` runs after one warm-up.

    ``setup`` (untimed) runs before each call, e.g. to restore state that ``fn`` mutates.
    """
    times = []
    for i in range(repeats + 1):
        if setup is not None:
            setup()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_json(name: str, payload: dict, path: Path | None = None) -> Path:
    path = path or OUT / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) if r.get(k) is not None else "–" for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
