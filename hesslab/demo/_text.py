"""Shared pieces of the demo's report sections: citations, display names, number
formatting, and figures that fail without losing the report."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from hesslab.report import Section

__all__ = ["CITE_GHORBANI", "CITE_WU", "CITE_XIE", "CITE_SINGH", "PRETTY", "pretty", "fmt", "curve_indices", "safe",
           "missing"]

CITE_GHORBANI = ("B. Ghorbani, S. Krishnan, Y. Xiao. An Investigation into Neural Net Optimization via Hessian "
                 "Eigenvalue Density. ICML 2019.")
CITE_WU = ("Y. Wu, X. Zhu, C. Wu, A. Wang, R. Ge. Dissecting Hessian: Understanding Common Structure of Hessian in "
           "Neural Networks. 2020.")
CITE_XIE = ("Z. Xie, Q.-Y. Tang, Y. Cai, M. Sun, P. Li. On the Power-Law Hessian Spectrums in Deep Learning. 2022.")
CITE_SINGH = ("S. P. Singh, G. Bachmann, T. Hofmann. Analytic Insights into Structure and Rank of Neural Network "
              "Hessian Maps. NeurIPS 2021.")

PRETTY = {"mlp": "MLP", "mlp_bn": "MLP + BatchNorm", "cnn": "CNN", "cnn_bn": "CNN + BatchNorm"}


def pretty(label: str) -> str:
    return PRETTY.get(label, label)


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if x != x:
        return "n/a"
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.{digits}g}"
    return f"{x:.2e}"


def curve_indices(curve: Any) -> list[int]:
    """Indices of k = 1, 10 and the last k of an overlap curve (without repeats)."""
    return sorted({0, min(10, len(curve.ks)) - 1, len(curve.ks) - 1})


def safe(section: Section, what: str, fn: Any, log: Any = None) -> None:
    """Run one figure builder; a failure becomes an explicit "not available" line."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - one broken plot must not lose the report
        section.unavailable(what, f"{type(exc).__name__}: {exc}")
        if log is not None:
            log(f"  report: {what} failed: {type(exc).__name__}: {exc}")


def missing(section: Section, analyses: Mapping[str, Any], key: str, what: str) -> None:
    """Say which models lack a result, and why."""
    for label, a in analyses.items():
        if key in a.results:
            continue
        if key in a.unavailable:
            section.unavailable(f"{what} of {pretty(label)}", a.unavailable[key])
        elif key in a.errors:
            section.unavailable(f"{what} of {pretty(label)}", f"failed: {a.errors[key]}")
