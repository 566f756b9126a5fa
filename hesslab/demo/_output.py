"""The end of a run of ``hesslab demo`` or ``hesslab analyze``: the summary's header, the
report (HTML and PNGs) and ``summary.json``."""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hesslab._results import jsonable

from ._stages import Stages

__all__ = ["summary_header", "write_outputs"]


def summary_header(command: str, seed: int) -> dict[str, Any]:
    """What every summary starts with: the command, the seed and the versions."""
    from hesslab._version import __version__

    return {"command": command, "seed": seed, "hesslab": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def write_outputs(out: Path, summary: dict[str, Any], build_report: Callable[[], Any] | None, stages: Stages,
                  final: bool = True) -> dict:
    """Build and write the report (``report.html``, ``plots/*.png``), then ``summary.json``;
    return the summary. ``final``: the end of the run (a stage of its own, then the
    progress bar closes); otherwise a rewrite with what is finished so far
    (``summary["finished"]`` is False), so that an interrupted run keeps it.
    ``build_report`` None: ``summary.json`` only."""
    summary["finished"] = bool(final)
    if build_report is not None:
        with stages.stage("report: plots and HTML") if final else contextlib.nullcontext():
            rep = build_report()
            rep.write(out / "report.html", plots_dir=out / "plots")
        summary.setdefault("files", {}).update(report="report.html",
                                               plots=sorted(f"plots/{n}.png" for n in rep.figure_names))
    summary["seconds"] = {"total": stages.elapsed, "stages": stages.seconds}
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(jsonable(summary), indent=1, allow_nan=False))
    tmp.replace(out / "summary.json")
    if final:
        stages.close()
    return summary
