"""Compatibility alias: the Kronecker-factored operators live in :mod:`hesslab.linops.kfac`.

Kept because ``hesslab.demo`` imports ``hesslab.linops._kfac`` by name; new code imports
from :mod:`hesslab.linops` (``from hesslab.linops import KFAC``).
"""

from __future__ import annotations

from hesslab.linops.kfac import KFAC, KFACFunction, KronFactors, SampleTerms, layer_hessian

__all__ = ["KFAC", "KFACFunction", "KronFactors", "SampleTerms", "layer_hessian"]
