"""hesslab: Hessian spectra of PyTorch models.

Operators turn a model, a loss and data into a linear operator over the parameters;
solvers turn operators into spectral results; analyses turn results into findings.
See README.md for a quickstart and DESIGN notes.
"""

from __future__ import annotations

from ._build import build_info
from ._version import __version__
from .errors import HesslabError

__all__ = ["__version__", "build_info", "HesslabError"]
