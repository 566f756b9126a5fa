"""Analyses: results in, findings out (power laws, ranks)."""

from .powerlaw import PowerLawFit, power_law_fit
from .rank import LinearRankPrediction, RankResult, linear_network_rank, numerical_rank

__all__ = ["PowerLawFit", "power_law_fit", "RankResult", "numerical_rank", "LinearRankPrediction", "linear_network_rank"]
