"""``hesslab analyze``: the demo's analyses on one given model, measured only as asked, with
each measure's cost said before it starts and the run folder rewritten after each one."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hesslab._results import jsonable

from ._blocks import BlocksAnalysis, blocks_analysis, record_blocks
from ._config import ANALYZE_MEASURES, Budget, required_measures
from ._cost import CostLog
from ._kfac import KfacAnalysis, kfac_analysis, record_kfac
from ._measure import ModelAnalysis, measure_model, record_model, summary_rows
from ._output import summary_header, write_outputs
from ._stages import Stages

__all__ = ["run_analysis", "REWRITE_SECONDS"]

#: The report is rewritten after a measure when the measures since its last rewrite took
#: at least this long (summary.json is rewritten after every measure).
REWRITE_SECONDS = 5.0


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
    blocks: Mapping[str, Any] | None = None,
    hessian_options: dict[str, Any] | None = None,
    kfac_layers: Any = None,
    translate: Callable[[str, str], str] | None = None,
) -> dict[str, Any]:
    """The demo's analyses on one given model; writes results, ``report.html`` and
    ``summary.json`` to ``out`` (rewritten after every measure) and returns the summary.

    Args:
        model, loss_fn, data: As for :class:`hesslab.Hessian`.
        measures: The measures asked for, any of :data:`ANALYZE_MEASURES`; the ones they
            need are added (:func:`required_measures`), and a failure of an added one is
            recorded under ``summary["derived_errors"]``, not ``summary["errors"]``.
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
        blocks: ``{name: params}``: one result set per parameter block (``params`` as for
            :class:`hesslab.Hessian`); None: one set over all parameters, named ``label``.
            The ``blocks`` measure takes the default blocks over the union of these.
        hessian_options: More keyword arguments for :class:`hesslab.Hessian` (``dtype``,
            ``train_mode``).
        kfac_layers: The layers whose exact block the Kronecker factors are compared with
            (see :func:`hesslab.demo._kfac.choose_layers`; None: the largest and the last).
        translate: ``translate(part, message)``, applied to every failure message.
    """
    requested = list(dict.fromkeys(measures))
    run_set = required_measures(requested)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = budget or Budget(layer_k=k)
    torch.manual_seed(seed)
    blocks = dict(blocks) if blocks else {label: None}
    spectral = [m for m in run_set if m not in ("kfac", "outliers", "blocks")]
    num_stages = (len(blocks) * len([m for m in spectral if m != "power_law"]) + (3 if "kfac" in run_set else 0)
                  + ("blocks" in run_set) + 1)
    stages = Stages(num_stages, progress=progress, verbose=verbose, desc="hesslab analyze", translate=translate)
    run = _AnalysisRun(out, stages, label, requested, seed)
    run.summary.update(source=source or {}, measures=requested, measures_run=run_set, k=k,
                       blocks={b: (list(p) if isinstance(p, (list, tuple)) else p) for b, p in blocks.items()},
                       options={key: str(v) for key, v in (hessian_options or {}).items()})
    if run_set != requested:
        stages.log(f"measures asked for: {', '.join(requested)}; also run, as they need them: "
                   f"{', '.join(m for m in run_set if m not in requested)}")
    try:
        _measure(run, model, loss_fn, data, blocks, spectral, run_set, k, seed, budget, hessian_options, loss_name,
                 kfac_layers)
    except KeyboardInterrupt:  # keep what was finished: the report and summary.json as far as they got
        run.write(final=False)
        raise
    return run.write(final=True)


def _measure(run: _AnalysisRun, model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any,
             blocks: dict[str, Any], spectral: list[str], run_set: list[str], k: int, seed: int, budget: Budget,
             hessian_options: dict[str, Any] | None, loss_name: str | None, kfac_layers: Any) -> None:
    """Every block's spectrum, then the Kronecker comparison, into ``run``."""
    stages, label = run.stages, run.label
    for block, params in blocks.items():
        run.analyses[block] = measure_model(
            block, model, loss_fn, data, spectral, k=k, seed=seed, budget=budget, store=run.store, stages=stages,
            hessian_options={**(hessian_options or {}), **({"params": params} if params is not None else {})},
            outliers="outliers" in run_set, cost_log=run.costs,
            on_progress=lambda a, block=block: run.update(block, a))
        run.update(block, run.analyses[block])
    if "kfac" in run_set:
        loss_type = loss_name if loss_name in ("cross_entropy", "mse") else None
        ka = kfac_analysis(
            label, model, loss_fn, data, k=budget.layer_k, seed=seed, store=run.store, stages=stages,
            loss_type=loss_type if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss)) else None,
            layers=kfac_layers, max_steps=budget.layer_max_steps, cost_log=run.costs, on_layer=run.update_kfac)
        run.update_kfac(ka)
    if "blocks" in run_set:
        ba = blocks_analysis(label, model, loss_fn, data, num_steps=budget.blocks_steps,
                             num_probes=budget.blocks_probes, seed=seed, store=run.store, stages=stages,
                             cost_log=run.costs, hessian_options=hessian_options, params=_union(blocks))
        run.update_blocks(ba)


def _union(blocks: dict[str, Any]) -> list[Any] | None:
    """Every item of the parameter blocks (None when one of them is the whole model)."""
    if any(p is None for p in blocks.values()):
        return None
    items: list[Any] = []
    for p in blocks.values():
        items.extend(p if isinstance(p, (list, tuple)) else [p])
    return items


class _AnalysisRun:
    """The state of one ``hesslab analyze`` run: its summary, results so far and output."""

    def __init__(self, out: Path, stages: Stages, label: str, requested: Sequence[str], seed: int):
        from hesslab.report import ResultStore

        self.out, self.stages, self.label, self.requested = out, stages, label, list(requested)
        self.store = ResultStore(out)
        self.costs = CostLog(stages)
        self.report_done, self.report_seconds = time.perf_counter(), 0.0
        self.analyses: dict[str, ModelAnalysis] = {}
        self.kfacs: dict[str, KfacAnalysis] = {}
        self.block_spectra: dict[str, BlocksAnalysis] = {}
        self.summary: dict[str, Any] = {
            **summary_header("analyze", seed), "models": {}, "kfac": {}, "unavailable": {}, "errors": {},
            "derived_errors": {},
        }

    def update(self, block: str, analysis: ModelAnalysis) -> None:
        """A measure finished: record it and rewrite the run folder with everything so far:
        ``summary.json`` always, the report when the measures since its last rewrite took
        at least :data:`REWRITE_SECONDS` and as long as that rewrite did (so at most half
        the run goes to rewriting it; on a model whose measures take minutes, it is
        rewritten after every one). An interrupt (Ctrl-C) writes both before it stops."""
        self.analyses[block] = analysis
        record_model(self.summary, block, analysis, self.requested)
        self._rewrite()

    def update_kfac(self, ka: KfacAnalysis) -> None:
        """A layer of the Kronecker comparison finished: as :meth:`update`."""
        self.kfacs[ka.label] = ka
        record_kfac(self.summary, ka.label, ka)
        self._rewrite()

    def update_blocks(self, ba: BlocksAnalysis) -> None:
        """The per-block spectra finished: as :meth:`update`."""
        self.block_spectra[ba.label] = ba
        record_blocks(self.summary, ba)
        self._rewrite()

    def _rewrite(self) -> None:
        since = time.perf_counter() - self.report_done
        self.write(final=False, report=since >= max(REWRITE_SECONDS, self.report_seconds))

    def write(self, final: bool, report: bool = True) -> dict[str, Any]:
        from ._report import build_analysis_report

        summary = self.summary
        summary["results"] = self.store.entries
        summary["costs"] = list(self.costs.lines)
        headers, rows = summary_rows(self.analyses, {})
        summary["table"] = {"headers": headers, "rows": jsonable(rows)}
        t0 = time.perf_counter()
        build = (lambda: build_analysis_report(summary, self.analyses, self.kfacs, self.stages,
                                                       self.block_spectra)) if report else None
        written = write_outputs(self.out, summary, build, self.stages, final=final)
        if report:
            self.report_done = time.perf_counter()
            self.report_seconds = self.report_done - t0
        return written
