"""Analyses: results in, findings out (power laws, ranks, gradient concentration, outliers)."""

from .concentration import ConcentrationResult, OutlierResult, gradient_concentration, outliers
from .powerlaw import PowerLawFit, power_law_fit
from .rank import LinearRankPrediction, RankResult, linear_network_rank, numerical_rank
from .rank_report import RankReport, rank_report

__all__ = [
    "PowerLawFit", "power_law_fit", "RankResult", "numerical_rank", "LinearRankPrediction", "linear_network_rank",
    "RankReport", "rank_report", "ConcentrationResult", "gradient_concentration", "OutlierResult", "outliers",
]
