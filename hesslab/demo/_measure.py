"""The spectrum of one model, shared by the demo and ``hesslab analyze``: the pipeline's
results saved to the run folder, its headline numbers in the summary."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hesslab._results import jsonable
from hesslab.analysis import measure_spectrum

from ._config import Budget
from ._stages import Stages, log_failure

__all__ = ["ModelAnalysis", "measure_model", "record_model", "summary_rows"]


@dataclasses.dataclass
class ModelAnalysis:
    """What :func:`measure_model` found for one model.

    Attributes:
        label: Name of the model in files and the report.
        num_params: n.
        num_samples: N, the samples the Hessian is taken over.
        results: ``{measure: Result}``: "top_k" (EigenResult), "power_law", "concentration",
            "density" (SpectralDensity), "outliers" (from the density), "outliers_top"
            (from the top eigenvalues), "trace".
        numbers: Headline numbers (plain JSON).
        errors: ``{measure: message}`` for measures that failed.
        unavailable: ``{measure: reason}`` for measures whose module is missing.
    """

    label: str
    num_params: int
    num_samples: int
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    numbers: dict[str, Any] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)


def measure_model(
    label: str,
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    measures: Sequence[str],
    *,
    k: int = 10,
    k_top: int | None = None,
    seed: int = 0,
    budget: Budget | None = None,
    store: Any = None,
    stages: Stages | None = None,
    hessian_options: dict[str, Any] | None = None,
    outliers: bool = True,
    cost_log: Any = None,
    on_progress: Callable[[ModelAnalysis], None] | None = None,
) -> ModelAnalysis:
    """Top eigenvalues, density, trace, power law, concentration and outliers of one model,
    by :func:`hesslab.analysis.measure_spectrum` on its Hessian.

    Args:
        label: Name used for files (``results/<label>/...``) and the report.
        model, loss_fn, data: As for :class:`hesslab.Hessian`.
        measures: Any of :data:`hesslab.analysis.pipeline.MEASURES` (``"kfac"`` is
            :func:`kfac_analysis`).
        k: Eigenvectors for the gradient concentration (and eigenvalues when k_top is None).
        k_top: Top eigenvalues computed by Lanczos (the power law is fitted to them).
        seed: Seed of every random vector.
        budget: Steps, probes and products per measure.
        store: A :class:`hesslab.report.ResultStore` to save every result to.
        stages: Progress and logging.
        hessian_options: Keyword arguments for :class:`hesslab.Hessian`.
        outliers: Look for outliers (in the top eigenvalues and the density).
        cost_log: A :class:`hesslab.demo._cost.CostLog` that says what each measure will
            cost before it starts.
        on_progress: Called with the analysis so far after each measure.
    """
    from hesslab.linops import Hessian

    budget = budget or Budget()
    stages = stages or Stages(0, progress=False, verbose=False)
    H = Hessian(model, loss_fn, data, progress=False, **(hessian_options or {}))
    saved: set[str] = set()

    def snapshot(found: Any) -> ModelAnalysis:
        if store is not None:
            for name, result in found.results.items():
                if name not in saved:
                    light = dataclasses.replace(result, eigenvectors=None) if name == "top_k" else None
                    store.save(f"{label}/{name}", result, json_copy=light)
                    saved.add(name)
        return ModelAnalysis(label, found.num_params, found.num_samples, results=dict(found.results),
                             numbers=found.numbers(),
                             errors={k: stages.translate(k, v) for k, v in found.errors.items()})

    found = measure_spectrum(
        H, measures, k=k, k_top=k_top, seed=seed, progress=stages.inner_progress, **budget.pipeline_options(),
        stage=lambda what: stages.stage(f"{label}: {what}"),
        on_error=lambda name, exc: log_failure(stages, name, exc), outliers=outliers,
        on_start=None if cost_log is None else (lambda name, cost: cost_log.start(H, f"{label}: {name}", cost)),
        on_progress=None if on_progress is None else (lambda found: on_progress(snapshot(found))),
        on_record=None if cost_log is None else (lambda name, record, result: cost_log.done(f"{label}: {name}",
                                                                                            record)),
    )
    return snapshot(found)


def record_model(summary: dict, label: str, a: ModelAnalysis, requested: Sequence[str] | None = None) -> None:
    """A model's headline numbers, errors and unavailable sections into the summary.

    With ``requested`` (the measures asked for), failures of the other parts (measures
    only needed by a requested one) go to ``summary["derived_errors"]``, not
    ``summary["errors"]``: they are reported but do not fail the run."""
    summary["models"][label] = jsonable(a.numbers)
    asked = {k: v for k, v in a.errors.items() if requested is None or _measure_of(k) in requested}
    derived = {k: v for k, v in a.errors.items() if k not in asked}
    summary["errors"].pop(label, None)
    summary.get("derived_errors", {}).pop(label, None)
    if asked:
        summary["errors"][label] = asked
    if derived:
        summary.setdefault("derived_errors", {})[label] = derived
    if a.unavailable:
        summary["unavailable"][label] = a.unavailable


def _measure_of(part: str) -> str:
    """The measure a part belongs to ("outliers_top" is the outliers among the top-k)."""
    return "outliers" if part.startswith("outliers") else part


def summary_rows(models: dict[str, ModelAnalysis], training: dict[str, dict[str, Any]]) -> tuple[list[str], list]:
    """The headline table (one row per model); without test accuracy when nothing was trained."""
    headers = ["model", "params", "test acc", "λ₁", "max rel. residual", "trace", "± s.e.", "outliers",
               "grad. conc.", "power-law ŝ", "d_ks / d_c", "power law? (KS, K, λ₁)"]
    rows = []
    for label, a in models.items():
        nb = a.numbers
        ks = nb.get("ks_distance")
        rows.append([
            label, a.num_params, training.get(label, {}).get("test_accuracy"), nb.get("lambda_1"),
            nb.get("max_relative_residual"), nb.get("trace"), nb.get("trace_std_error"),
            nb.get("outliers_top_k", nb.get("outliers")), nb.get("concentration"), nb.get("power_law_s"),
            None if ks is None else f"{ks:.3f} / {nb.get('ks_critical'):.3f}", nb.get("power_law_verdict"),
        ])
    if not training:  # analyze: no accuracy to show
        headers = headers[:2] + headers[3:]
        rows = [r[:2] + r[3:] for r in rows]
    return headers, rows
