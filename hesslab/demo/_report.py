"""The demo's and analyze's report pages: the overview, the paper sections, the files."""

from __future__ import annotations

from typing import Any, Mapping

from hesslab.report import Report, plots

from ._blocks import blocks_section
from ._text import fmt, pretty, safe
from .sections import ghorbani_section, singh_section, wu_section, xie_section

__all__ = ["build_demo_report", "build_analysis_report", "overview_section", "files_section", "FOLD_ROWS"]

#: Tables of files longer than this are folded (HTML ``<details>``).
FOLD_ROWS = 12


def overview_section(rep: Report, summary: Mapping[str, Any], log: Any = None) -> None:
    sec = rep.section(
        "Overview",
        intro=("hesslab turns a model, a loss and data into a linear operator over the parameters (the Hessian of "
               "the mean loss) and measures its spectrum with Lanczos (top eigenpairs, with their residuals "
               "‖Hv − λv‖), stochastic Lanczos quadrature (the eigenvalue density) and Hutch++ (the trace). "
               "The sections below reproduce the central measurements of five papers on small networks (and a tiny "
               "transformer) trained "
               "on scikit-learn's bundled 8×8 digits (no download)."),
    )
    training = summary.get("training") or {}
    if training:
        def fig() -> None:
            sec.figure(
                "training_curves", plots.training_curves({pretty(k): v for k, v in training.items()}),
                caption=("Mean training loss per epoch of the four networks (log scale); dots mark the epochs at "
                         "which a checkpoint was kept and, for the MLPs, the spectrum was measured."),
                numbers=[(f"{pretty(k)} test accuracy", fmt(v["test_accuracy"])) for k, v in training.items()],
            )
        safe(sec, "training curves", fig, log)
        sec.table(["model", "parameters", "BatchNorm", "epochs", "final train loss", "train accuracy",
                   "test accuracy", "checkpoints"],
                  [[pretty(k), v["num_params"], v["batchnorm"], v["epochs"], v["train_loss"][-1],
                    v["train_accuracy"], v["test_accuracy"], len(v["checkpoints"])] for k, v in training.items()])
    table = summary.get("table")
    if table:
        sec.table(table["headers"], table["rows"],
                  caption=(f"Headline numbers (Hessian over {summary.get('data', {}).get('hessian_samples', 'all')} "
                           "training samples, eval mode). Outliers: eigenvalues separated from the bulk by "
                           "hesslab.outliers on the top eigenvalues; gradient concentration: share of ‖g‖² in the "
                           "top-10 eigenspace."))


def files_section(rep: Report, summary: Mapping[str, Any]) -> None:
    sec = rep.section("Files", intro=(
        "Every result is saved by its dataclass's save() as JSON and NPZ under results/ (large eigenvector "
        "matrices only in the NPZ); summary.json lists them with their types, and "
        "hesslab.report.load_results(folder) reads them all back. Plots are also saved as PNG under plots/."))
    rows = [[e["name"], e["type"], e.get("json", e.get("jsonl", "")), e.get("npz", "")]
            for e in summary.get("results", [])]
    if rows:
        sec.table(["result", "type", "JSON", "NPZ"], rows,
                  fold=f"{len(rows)} result files (click to show the list)" if len(rows) > FOLD_ROWS else "")
    ck = (summary.get("files") or {}).get("checkpoints")
    if ck:
        sec.folded(f"{len(ck)} checkpoints (state_dict, torch.save) under checkpoints/", ", ".join(ck))


def _meta(summary: Mapping[str, Any]) -> dict[str, Any]:
    meta = {"hesslab": summary.get("hesslab"), "torch": summary.get("torch"), "seed": summary.get("seed"),
            "CPU threads": summary.get("threads")}
    if "quick" in summary:
        meta["preset"] = "quick" if summary["quick"] else "full"
    return meta


def build_demo_report(summary: Mapping[str, Any], analyses: Mapping[str, Any], kfacs: Mapping[str, Any],
                      seeds: Mapping[str, Any], rank: Mapping[str, Any], histories: Mapping[str, Any] | None,
                      stages: Any = None, block_spectra: Mapping[str, Any] | None = None) -> Report:
    log = getattr(stages, "log", None)
    rep = Report("hesslab demo: Hessian spectra of small networks on the digits data",
                 subtitle=("An MLP and a small CNN, each with and without BatchNorm, trained on scikit-learn's 8×8 "
                           "digits; everything below was computed by `hesslab demo`."),
                 meta=_meta(summary))
    overview_section(rep, summary, log)
    ghorbani_section(rep, analyses, histories if histories or "tracking" not in summary.get("unavailable", {})
                     else None, summary, log)
    wu_section(rep, kfacs, seeds, summary, log)
    xie_section(rep, analyses, log)
    singh_section(rep, rank, log)
    if block_spectra:
        blocks_section(rep, block_spectra, log, intro=_transformer_intro(summary))
    files_section(rep, summary)
    return rep


def _transformer_intro(summary: Mapping[str, Any]) -> str:
    """The demo's per-block section: the transformer and the comparison, from the numbers."""
    tr = summary.get("transformer") or {}
    het = {k: v["heterogeneity"] for k, v in (summary.get("block_spectra") or {}).items()}
    text = ("Zhang et al. (2024) compare the spectra of the Hessian's diagonal blocks: similar across the blocks "
            "of a CNN or MLP, very different across those of a transformer (block heterogeneity). The demo trains "
            "a tiny transformer on the digits, each 8×8 image a sequence of its 8 rows (a linear embedding of the "
            "8 pixels plus a position embedding, one encoder layer of width 16 with 2 heads, mean over the rows, "
            "a linear head")
    if tr:
        text += (f"; {tr['num_params']} parameters, {tr['epochs']} epochs, test accuracy {fmt(tr['test_accuracy'])}")
    text += "), and measures one SLQ density per block (query, key and value split from the fused projection)."
    if "transformer" in het and "mlp" in het:
        more = "more" if het["transformer"] > het["mlp"] else "less"
        text += (f" Measured: heterogeneity (mean pairwise Jensen–Shannon distance) {het['transformer']:.3f} for "
                 f"the transformer against {het['mlp']:.3f} for the MLP: the transformer's blocks are {more} "
                 f"heterogeneous" + (", as Zhang et al. report." if more == "more" else
                                     ", unlike what Zhang et al. report for larger models."))
    return text


def build_analysis_report(summary: Mapping[str, Any], analyses: Mapping[str, Any], kfacs: Mapping[str, Any],
                          stages: Any = None, block_spectra: Mapping[str, Any] | None = None) -> Report:
    """The report of ``hesslab analyze``: what was measured on this one model, as far as
    the run got (it is rewritten after every measure)."""
    log = getattr(stages, "log", None)
    src = summary.get("source") or {}
    rep = Report(f"hesslab analyze: {src.get('model', 'model')}",
                 subtitle=" · ".join(f"{k}: {v}" for k, v in src.items() if v and k != "data_used"),
                 meta=_meta(summary))
    _analysis_overview(rep, summary, analyses)
    measures = set(summary.get("measures_run") or summary.get("measures") or [])
    if measures & {"density", "concentration", "trace", "top_k", "outliers"} and analyses:
        ghorbani_section(rep, analyses, {}, summary, log, demo=False)
    if "kfac" in measures and kfacs:
        wu_section(rep, kfacs, None, summary, log, demo=False)
    if measures & {"top_k", "power_law"} and any("top_k" in a.results for a in analyses.values()):
        xie_section(rep, analyses, log)
    if "blocks" in measures and block_spectra:
        blocks_section(rep, block_spectra, log)
    files_section(rep, summary)
    return rep


def _analysis_overview(rep: Report, summary: Mapping[str, Any], analyses: Mapping[str, Any]) -> None:
    src = summary.get("source") or {}
    asked, run = list(summary.get("measures") or []), list(summary.get("measures_run") or [])
    sec = rep.section("Summary", intro=(
        f"The Hessian of the mean loss ({src.get('loss', 'the loss')}) of {src.get('model', 'the model')} over "
        f"{src.get('data_used') or 'the data given'}, in {src.get('mode', 'eval')} mode, dtype "
        f"{src.get('dtype', 'of the model')}. Measures asked for: {', '.join(asked) or 'none'}"
        + (f"; also run because they are needed: {', '.join(m for m in run if m not in asked)}"
           if [m for m in run if m not in asked] else "") + "."))
    if not summary.get("finished", True):
        sec.note("This run has not finished (or was interrupted): the sections below hold the measures finished "
                 "so far.")
    for label, a in analyses.items():
        sec.text(f"{label}: n = {a.num_params} parameters, N = {a.num_samples} samples, "
                 f"{a.numbers.get('hessian_matvecs', 0)} Hessian-vector products.")
    table = summary.get("table")
    if table and analyses:
        sec.table(table["headers"], table["rows"])
    for label, errs in (summary.get("derived_errors") or {}).items():
        for part, message in errs.items():
            sec.note(f"{label}: {part} (not asked for; needed by a measure that was) failed: {message}")
    for label, errs in (summary.get("errors") or {}).items():
        for part, message in (errs.items() if isinstance(errs, Mapping) else [("", errs)]):
            sec.unavailable(f"{label}: {part}", f"failed: {message}")
    costs = summary.get("costs") or []
    if costs:
        sec.folded(f"What each measure was estimated to cost before it started ({len(costs)} lines)",
                   " · ".join(costs))
