"""hesslab: Hessian spectra of PyTorch models.

A model, a loss and data become a linear operator over the parameters (``Hessian``,
``GGN``); solvers turn an operator into spectral results (``lanczos``,
``spectral_density``, ``trace``, ``eigh_exact``); analyses turn results into findings
(``power_law_fit``, ``numerical_rank``, ``linear_network_rank``). Every result is a
dataclass with ``save``/``load`` and, where a picture helps, ``plot``.

    import hesslab as hl
    H = hl.Hessian(model, torch.nn.CrossEntropyLoss(), (inputs, targets))
    top = hl.lanczos(H, k=10)
    density = hl.spectral_density(H, num_steps=90, num_probes=8)
"""

from __future__ import annotations

from ._build import build_info
from ._version import __version__
from .analysis import (
    BlockSpectra,
    block_spectra,
    ConcentrationResult,
    OverlapCurve,
    eigenspace_overlap,
    eigenvector_low_rank,
    overlap_curve,
    LinearRankPrediction,
    OutlierResult,
    PowerLawFit,
    RankReport,
    RankResult,
    gradient_concentration,
    linear_network_rank,
    numerical_rank,
    outliers,
    power_law_fit,
    rank_report,
)
from .errors import HesslabError
from .linops import GGN, KFAC, DenseOperator, Hessian, LinearOperator, layer_hessian
from .solvers import EigenResult, SpectralDensity, TraceEstimate, eigh_exact, lanczos, spectral_density, trace
from .solvers import gather_shards
from .tracking import SpectrumTracker, TrackingHistory

__all__ = [
    "__version__", "build_info", "HesslabError",
    # operators
    "LinearOperator", "DenseOperator", "Hessian", "GGN", "KFAC", "layer_hessian",
    # solvers
    "lanczos", "eigh_exact", "spectral_density", "trace", "EigenResult", "SpectralDensity", "TraceEstimate",
    "gather_shards",
    # analyses
    "power_law_fit", "PowerLawFit", "numerical_rank", "RankResult", "linear_network_rank", "LinearRankPrediction",
    "rank_report", "RankReport", "gradient_concentration", "ConcentrationResult", "outliers", "OutlierResult",
    "eigenspace_overlap", "overlap_curve", "OverlapCurve", "eigenvector_low_rank",
    "block_spectra", "BlockSpectra",
    # through training
    "SpectrumTracker", "TrackingHistory",
]
