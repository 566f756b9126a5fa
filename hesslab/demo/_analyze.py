"""``hesslab analyze``: the demo's analyses on one given model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hesslab._results import jsonable

from ._config import ANALYZE_MEASURES, Budget
from ._kfac import KfacAnalysis, kfac_analysis, record_kfac
from ._measure import measure_model, record_model, summary_rows
from ._output import summary_header, write_outputs
from ._stages import Stages

__all__ = ["run_analysis"]


def run_analysis(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    measures: Sequence[str] = ANALYZE_MEASURES,
    out: str | Path = "hesslab-analysis",
    k: int = 10,
    seed: int = 0,
    label: str = "model",
    loss_name: str | None = None,
    source: dict[str, Any] | None = None,
    progress: bool | None = None,
    verbose: bool = True,
    budget: Budget | None = None,
) -> dict[str, Any]:
    """The demo's analyses on one given model; writes results, ``report.html`` and
    ``summary.json`` to ``out`` and returns the summary.

    Args:
        model, loss_fn, data: As for :class:`hesslab.Hessian`.
        measures: Any of :data:`ANALYZE_MEASURES` (the pipeline's and ``"kfac"``).
        out: The output folder.
        k: Top eigenpairs (Lanczos, concentration) and the per-layer k of the Kronecker
            comparison when ``budget`` is None.
        seed: Seed of every random vector.
        label: The model's name in files and the report.
        loss_name: ``"cross_entropy"`` or ``"mse"`` for a loss the Kronecker factors do
            not recognise by its type.
        source: Where model, checkpoint and data came from (shown in the report).
        progress, verbose: Progress bars and log lines on stderr.
        budget: Steps, probes and products per measure.
    """
    from hesslab.report import ResultStore

    from ._report import build_analysis_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out)
    budget = budget or Budget(layer_k=k)
    torch.manual_seed(seed)
    num_stages = len([m for m in measures if m != "power_law"]) + (6 if "kfac" in measures else 0) + 1
    stages = Stages(num_stages, progress=progress, verbose=verbose, desc="hesslab analyze")
    summary: dict[str, Any] = {
        **summary_header("analyze", seed), "source": source or {}, "measures": list(measures), "k": k,
        "models": {}, "kfac": {}, "unavailable": {}, "errors": {},
    }
    analyses = {label: measure_model(label, model, loss_fn, data, [m for m in measures if m != "kfac"], k=k,
                                     seed=seed, budget=budget, store=store, stages=stages)}
    record_model(summary, label, analyses[label])
    kfacs: dict[str, KfacAnalysis] = {}
    if "kfac" in measures:
        loss_type = loss_name if loss_name in ("cross_entropy", "mse") else None
        kfacs[label] = kfac_analysis(
            label, model, loss_fn, data, k=budget.layer_k, seed=seed, store=store, stages=stages,
            loss_type=loss_type if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss)) else None)
        record_kfac(summary, label, kfacs[label])
    summary["results"] = store.entries
    headers, rows = summary_rows(analyses, {})
    summary["table"] = {"headers": headers, "rows": jsonable(rows)}
    return write_outputs(out, summary, lambda: build_analysis_report(summary, analyses, kfacs, stages), stages)
