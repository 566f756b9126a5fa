"""The demo's and analyze's report pages: the overview, the paper sections, the files."""

from __future__ import annotations

from typing import Any, Mapping

from hesslab.report import Report, plots

from ._text import fmt, pretty, safe
from .sections import ghorbani_section, singh_section, wu_section, xie_section

__all__ = ["build_demo_report", "build_analysis_report", "overview_section", "files_section"]


def overview_section(rep: Report, summary: Mapping[str, Any], log: Any = None) -> None:
    sec = rep.section(
        "Overview",
        intro=("hesslab turns a model, a loss and data into a linear operator over the parameters (the Hessian of "
               "the mean loss) and measures its spectrum with Lanczos (top eigenpairs, with their residuals "
               "‖Hv − λv‖), stochastic Lanczos quadrature (the eigenvalue density) and Hutch++ (the trace). "
               "The sections below reproduce the central measurements of four papers on small networks trained "
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
        sec.table(["result", "type", "JSON", "NPZ"], rows)
    ck = (summary.get("files") or {}).get("checkpoints")
    if ck:
        sec.text("Checkpoints (state_dict, torch.save): " + ", ".join(ck))


def _meta(summary: Mapping[str, Any]) -> dict[str, Any]:
    meta = {"hesslab": summary.get("hesslab"), "torch": summary.get("torch"), "seed": summary.get("seed"),
            "CPU threads": summary.get("threads")}
    if "quick" in summary:
        meta["preset"] = "quick" if summary["quick"] else "full"
    return meta


def build_demo_report(summary: Mapping[str, Any], analyses: Mapping[str, Any], kfacs: Mapping[str, Any],
                      seeds: Mapping[str, Any], rank: Mapping[str, Any], histories: Mapping[str, Any] | None,
                      stages: Any = None) -> Report:
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
    files_section(rep, summary)
    return rep


def build_analysis_report(summary: Mapping[str, Any], analyses: Mapping[str, Any], kfacs: Mapping[str, Any],
                          stages: Any = None) -> Report:
    log = getattr(stages, "log", None)
    src = summary.get("source") or {}
    rep = Report(f"hesslab analyze: {src.get('model', 'model')}",
                 subtitle=" · ".join(f"{k}: {v}" for k, v in src.items() if v),
                 meta=_meta(summary))
    sec = rep.section("Summary")
    table = summary.get("table")
    if table:
        sec.table(table["headers"], table["rows"])
    measures = set(summary.get("measures") or [])
    if measures & {"density", "concentration", "trace", "top_k"}:
        ghorbani_section(rep, analyses, {}, summary, log, demo=False)
    if "kfac" in measures:
        wu_section(rep, kfacs, None, summary, log, demo=False)
    if measures & {"top_k", "power_law"}:
        xie_section(rep, analyses, log)
    files_section(rep, summary)
    return rep
