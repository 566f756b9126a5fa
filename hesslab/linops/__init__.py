"""Linear operators over a model's parameters: Hessian, GGN, dense matrices and sums.

Every operator acts on flat parameter vectors (n,) and blocks (n, b) (columns are
vectors; parameters flattened row-major in ``named_parameters()`` order) and supports
``@``, ``matmat``, ``to_scipy()``, ``to_dense()`` (small n), ``+``, ``-`` and scaling.

Modules:
    _base       LinearOperator, DenseOperator, sums and multiples, and the building blocks
                PermutationOperator (a change of layout), ChainOperator (A_1 ... A_m) and
                SubblockOperator (Sᵀ A S, the block of some flat entries).
    _attention  the math SDPA backend every model call runs under; fused attention refused.
    _lmloss     the loss from the output: loss_fn, the model's own, a causal LM's token CE
                (weights by predicted tokens), the closed-form cross-entropy curvature.
    _data       the batch format: (inputs, targets) pairs with tensor, tuple or dict
                inputs, and dict batches (model(**batch)); the re-iterable data source.
    _params     parameter selection and the flat-vector layout.
    _model      ModelData, the one model/data base every curvature operator stands on
                (constructor checks, batches and weights, model calls, modes, casting,
                progress, the determinism check, first-batch data checks) and every
                torch.distributed collective (one helper, one device rule).
    _curvature  CurvatureOperator: the data loop, product paths chosen by rule.
    _hessian    Hessian and GGN: their per-batch block products.
    _fdcheck    the once-per-operator check of second derivatives by finite differences.
    _finite_difference  Hessian products by central differences of gradients (no double
                backward): method="finite_difference", the step rule and its error.
    _wrapped    DistributedDataParallel-wrapped models, unwrapped to their .module.
    kfac/       KFAC composed: layers | losses | pure math per layer type | the factor
                computer | the Kronecker block-diagonal operator; KFAC = P K Pᵀ.
"""

from __future__ import annotations

from hesslab.linops._base import DenseOperator, LinearOperator, SubblockOperator
from hesslab.linops._data import call_model, input_tensors, is_single_batch, map_inputs
from hesslab.linops._curvature import CurvatureOperator
from hesslab.linops._hessian import GGN, Hessian
from hesslab.linops.kfac import KFAC, KFACFunction, KronEigenpairs, KronFactors, SampleTerms, layer_hessian
from hesslab.linops._params import select_parameters

__all__ = [
    # base and algebra
    "LinearOperator",
    "DenseOperator",
    "SubblockOperator",
    # curvature of a model's loss
    "CurvatureOperator",
    "Hessian",
    "GGN",
    # Kronecker-factored layer blocks
    "KFAC",
    "KFACFunction",
    "KronEigenpairs",
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
