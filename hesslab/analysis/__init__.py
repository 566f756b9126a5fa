"""Analyses: results in, findings out (power laws, ranks, gradient concentration, outliers,
eigenspace overlaps and low-rank eigenvectors), and the one measurement pipeline
(:func:`measure_spectrum`) that ``hesslab demo``, ``hesslab analyze`` and the tracker call.

    powerlaw        power_law_fit (Xie et al.), as_float64_vector
    rank            numerical_rank, linear_network_rank (Singh et al.)
    rank_report     rank_report: measured ranks of H_L, H_O, H_F against the formulas
    concentration   gradient_concentration, outliers (Ghorbani et al.)
    overlap         eigenspace overlaps, low-rank eigenvectors, dominant eigenvalues (Wu et al.)
    block_spectra   block_spectra: per-block densities and their heterogeneity (Zhang et al. 2024)
    pipeline        measure_spectrum: loss → top-k → power law → concentration → density → trace
"""

from .block_spectra import BlockSpectra, block_spectra
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
from .pipeline import Measurements, measure_spectrum
from .powerlaw import PowerLawFit, power_law_fit
from .rank import LinearRankPrediction, RankResult, linear_network_rank, numerical_rank
from .rank_report import RankReport, rank_report

__all__ = [
    "PowerLawFit", "power_law_fit", "RankResult", "numerical_rank", "LinearRankPrediction", "linear_network_rank",
    "RankReport", "rank_report", "ConcentrationResult", "gradient_concentration", "OutlierResult", "outliers",
    "eigenspace_overlap", "overlap_curve", "OverlapCurve", "eigenvector_low_rank", "LowRank", "dominant_eigenvalues",
    "DominantEigenvalues", "kfac_overlap", "measure_spectrum", "Measurements",
    "block_spectra", "BlockSpectra",
]
