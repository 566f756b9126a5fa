"""Per-block spectra (Zhang et al. 2024, "Why Transformers Need Adam: A Hessian
Perspective"), as a measure of ``hesslab analyze`` (``--measures blocks``) and of the demo's
transformer: the cost said before it starts, the result saved, its numbers in the summary
(heterogeneity, per-block λ_max estimates) and its report section."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from hesslab._results import jsonable
from hesslab.report import Report, plots

from ._cost import CostLog
from ._stages import Stages, guard
from ._text import fmt, pretty, safe

__all__ = ["BlocksAnalysis", "blocks_analysis", "record_blocks", "blocks_numbers", "blocks_section",
           "blocks_sentence"]

#: Blocks listed by name in the report's table (the plot shows them all).
TABLE_BLOCKS = 40


@dataclasses.dataclass
class BlocksAnalysis:
    """The per-block spectra of one model: the result (None when it failed) and errors."""

    label: str
    result: Any = None
    errors: dict[str, str] = dataclasses.field(default_factory=dict)


def _block_sizes(model: nn.Module, params: Any = None) -> list[int]:
    from hesslab.analysis.block_spectra import default_blocks

    named = dict(model.named_parameters())
    return [int(b.index.numel()) if b.index is not None else sum(named[p].numel() for p in b.params)
            for b in default_blocks(model, params)]


def blocks_analysis(label: str, model: nn.Module, loss_fn: Callable[..., torch.Tensor] | None, data: Any, *,
                    num_steps: int, num_probes: int, seed: int, store: Any, stages: Stages, cost_log: CostLog,
                    hessian_options: dict[str, Any] | None = None, params: Any = None) -> BlocksAnalysis:
    """:func:`hesslab.block_spectra` over the default blocks (those over ``params`` only,
    when given: ``analyze --params``), its cost logged first (one product of the whole
    Hessian is timed: a block product costs about as much), saved to ``store`` as
    ``<label>/block_spectra``; a failure is recorded, not raised."""
    import hesslab as hl

    ba = BlocksAnalysis(label)
    options = {k: v for k, v in (hessian_options or {}).items() if k != "params"}
    with guard(ba.errors, "blocks", stages):
        sizes = _block_sizes(model, params)
        steps = [max(1, min(num_steps, n)) for n in sizes]
        op = hl.Hessian(model, loss_fn, data, **options)
        itemsize = torch.empty((), dtype=op.dtype).element_size()
        cost_log.start(op, f"{label}: blocks ({len(sizes)} blocks)",
                       {"products": sum(steps) * num_probes,
                        "memory_bytes": max(s * n for s, n in zip(steps, sizes)) * itemsize})
        with stages.stage(f"{label}: per-block spectra ({len(sizes)} blocks, {num_probes} probes × "
                          f"{num_steps} steps)"):
            ba.result = hl.block_spectra(model, loss_fn, data, num_steps=num_steps, num_probes=num_probes,
                                         seed=seed, params=params, **options)
        store.save(f"{label}/block_spectra", ba.result)
        stages.log(f"  {label}: blocks: heterogeneity {ba.result.heterogeneity:.3f} over {len(sizes)} blocks")
    return ba


def blocks_numbers(result: Any) -> dict[str, Any]:
    """Heterogeneity, and per block its size and λ_max estimate (the largest Ritz value of
    its SLQ probes: a lower bound, close to λ_max after enough steps)."""
    per = {}
    for name, size in zip(result.names, result.sizes):
        nodes = np.asarray(result.spectra[name]["nodes"], dtype=float)
        finite = nodes[np.isfinite(nodes)]
        per[name] = {"size": int(size), "lambda_max": float(finite.max()) if finite.size else None}
    return {"heterogeneity": float(result.heterogeneity), "num_blocks": len(result.names), "blocks": per}


def record_blocks(summary: dict, ba: BlocksAnalysis) -> None:
    """The per-block numbers (or the failure) into ``summary["block_spectra"]``."""
    summary.setdefault("block_spectra", {})
    summary["errors"].pop(f"blocks {ba.label}", None)
    if ba.result is not None:
        summary["block_spectra"][ba.label] = jsonable(blocks_numbers(ba.result))
    if ba.errors:
        summary["errors"][f"blocks {ba.label}"] = ba.errors


def blocks_sentence(label: str, result: Any) -> str:
    """One sentence from the measured numbers: heterogeneity, the blocks of the largest and
    smallest λ_max estimates and their ratio."""
    nb = blocks_numbers(result)
    lam = {k: v["lambda_max"] for k, v in nb["blocks"].items() if v["lambda_max"] is not None}
    text = (f"{pretty(label)}: {nb['num_blocks']} blocks, mean pairwise Jensen–Shannon distance of their "
            f"densities (heterogeneity) {nb['heterogeneity']:.3f} (0: identical spectra, 1: disjoint).")
    if len(lam) >= 2:
        hi, lo = max(lam, key=lam.get), min(lam, key=lam.get)
        ratio = f", {lam[hi] / lam[lo]:.3g} times" if lam[lo] > 0 else ""
        text += (f" The largest λ_max estimate is that of {hi} ({fmt(lam[hi])}{ratio} the smallest, that of {lo}: "
                 f"{fmt(lam[lo])}).")
    return text


def blocks_section(rep: Report, blocks: Mapping[str, BlocksAnalysis], log: Any = None, intro: str = "") -> None:
    """The report section: per model, all block densities on one plot, the heterogeneity,
    a sentence from the numbers and a table of the blocks."""
    sec = rep.section(
        "Per-block spectra", cite="Zhang et al. 2024, \"Why Transformers Need Adam: A Hessian Perspective\"",
        intro=intro or ("The Hessian's diagonal blocks (one per attention projection, with fused query/key/value "
                        "split, attention output, each MLP layer, embeddings, norms; for other models one per "
                        "module) each get an SLQ density. Zhang et al. find these spectra similar across the blocks "
                        "of a CNN and very different across those of a transformer (block heterogeneity), which "
                        "they link to SGD's weakness there."))
    for label, ba in blocks.items():
        if ba.result is None:
            sec.unavailable(f"per-block spectra of {pretty(label)}", f"failed: {ba.errors.get('blocks', '')}")
            continue
        res = ba.result

        def fig(label: str = label, res: Any = res) -> None:
            f, ax = plots.new_figure(7.0, 4.5)
            res.plot(ax=ax)
            ax.set_title(f"{pretty(label)}: per-block densities (heterogeneity {res.heterogeneity:.3f})")
            sec.figure(f"block_spectra_{label}", f, caption=blocks_sentence(label, res),
                       numbers=[("heterogeneity", fmt(res.heterogeneity)), ("blocks", len(res.names))])
        safe(sec, f"per-block spectra of {pretty(label)}", fig, log)
        nb = blocks_numbers(res)["blocks"]
        sec.table(["block", "entries", "λ_max estimate"],
                  [[name, v["size"], v["lambda_max"]] for name, v in list(nb.items())[:TABLE_BLOCKS]],
                  caption=(f"λ_max estimate: the largest Ritz value of the block's SLQ probes."
                           + (f" First {TABLE_BLOCKS} of {len(nb)} blocks." if len(nb) > TABLE_BLOCKS else "")))
