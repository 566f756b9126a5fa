"""Analyses: results in, findings out (power laws, ranks, gradient concentration, outliers,
eigenspace overlaps and low-rank eigenvectors)."""

from .concentration import ConcentrationResult, OutlierResult, gradient_concentration, outliers
from .overlap import (
    DominantEigenvalues,
    LowRank,
    OverlapCurve,
    dominant_eigenvalues,
    eigenspace_overlap,
    eigenvector_low_rank,
    kfac_overlap,
    overlap_curve,
)
from .powerlaw import PowerLawFit, power_law_fit
from .rank import LinearRankPrediction, RankResult, linear_network_rank, numerical_rank
from .rank_report import RankReport, rank_report

__all__ = [
    "PowerLawFit", "power_law_fit", "RankResult", "numerical_rank", "LinearRankPrediction", "linear_network_rank",
    "RankReport", "rank_report", "ConcentrationResult", "gradient_concentration", "OutlierResult", "outliers",
    "eigenspace_overlap", "overlap_curve", "OverlapCurve", "eigenvector_low_rank", "LowRank", "dominant_eigenvalues",
    "DominantEigenvalues", "kfac_overlap",
]
