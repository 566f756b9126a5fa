"""Spectral solvers: operators in, results (dataclasses with save/load/plot) out."""

from ._krylov import available_bytes
from ._lanczos import EigenResult, eigh_exact, lanczos
from ._sharded import gather_shards
from ._slq import SpectralDensity, gauss_quadrature, smooth_density, spectral_density
from ._trace import TraceEstimate, trace

__all__ = [
    "EigenResult", "lanczos", "eigh_exact",
    "SpectralDensity", "spectral_density", "gauss_quadrature", "smooth_density",
    "TraceEstimate", "trace",
    "available_bytes", "gather_shards",
]
