"""Linear operators over a model's parameters: Hessian, GGN, dense matrices and sums.

Every operator acts on flat parameter vectors (n,) and blocks (n, b) (columns are
vectors; parameters flattened row-major in ``named_parameters()`` order) and supports
``@``, ``matmat``, ``to_scipy()``, ``to_dense()`` (small n), ``+``, ``-`` and scaling.
"""

from __future__ import annotations

from hesslab.linops._base import DenseOperator, LinearOperator
from hesslab.linops._data import call_model, input_tensors, is_single_batch, map_inputs
from hesslab.linops._curvature import GGN, CurvatureOperator, Hessian
from hesslab.linops.kfac import KFAC, KFACFunction, KronFactors, SampleTerms, layer_hessian
from hesslab.linops._params import select_parameters

__all__ = [
    # base and algebra
    "LinearOperator",
    "DenseOperator",
    # curvature of a model's loss
    "CurvatureOperator",
    "Hessian",
    "GGN",
    # Kronecker-factored layer blocks
    "KFAC",
    "KFACFunction",
    "KronFactors",
    "SampleTerms",
    "layer_hessian",
    # parameter selection
    "select_parameters",
    # batches: (inputs, targets) pairs with tensor, tuple or dict inputs
    "is_single_batch",
    "input_tensors",
    "map_inputs",
    "call_model",
]
