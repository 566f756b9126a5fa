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
    """
    from hesslab.linops import Hessian

    budget = budget or Budget()
    stages = stages or Stages(0, progress=False, verbose=False)
    H = Hessian(model, loss_fn, data, progress=False, **(hessian_options or {}))
    found = measure_spectrum(
        H, measures, k=k, k_top=k_top, seed=seed, progress=stages.inner_progress, **budget.pipeline_options(),
        stage=lambda what: stages.stage(f"{label}: {what}"),
        on_error=lambda name, exc: log_failure(stages, name, exc),
    )
    if store is not None:
        for name, result in found.results.items():
            light = dataclasses.replace(result, eigenvectors=None) if name == "top_k" else None
            store.save(f"{label}/{name}", result, json_copy=light)
    return ModelAnalysis(label, found.num_params, found.num_samples, results=dict(found.results),
                         numbers=found.numbers(), errors=dict(found.errors))


def record_model(summary: dict, label: str, a: ModelAnalysis) -> None:
    """A model's headline numbers, errors and unavailable sections into the summary."""
    summary["models"][label] = jsonable(a.numbers)
    if a.errors:
        summary["errors"][label] = a.errors
    if a.unavailable:
        summary["unavailable"][label] = a.unavailable


def summary_rows(models: dict[str, ModelAnalysis], training: dict[str, dict[str, Any]]) -> tuple[list[str], list]:
    """The headline table (one row per model); without test accuracy when nothing was trained."""
    headers = ["model", "params", "test acc", "λ₁", "max rel. residual", "trace", "± s.e.", "outliers",
               "grad. conc.", "power-law ŝ", "d_ks / d_c", "power law?"]
    rows = []
    for label, a in models.items():
        nb = a.numbers
        ks = nb.get("ks_distance")
        rows.append([
            label, a.num_params, training.get(label, {}).get("test_accuracy"), nb.get("lambda_1"),
            nb.get("max_relative_residual"), nb.get("trace"), nb.get("trace_std_error"),
            nb.get("outliers_top_k", nb.get("outliers")), nb.get("concentration"), nb.get("power_law_s"),
            None if ks is None else f"{ks:.3f} / {nb.get('ks_critical'):.3f}", nb.get("is_power_law"),
        ])
    if not training:  # analyze: no accuracy to show
        headers = headers[:2] + headers[3:]
        rows = [r[:2] + r[3:] for r in rows]
    return headers, rows
