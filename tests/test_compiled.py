"""Compiled block products (``compile=``): the same products as eager, compiled once.

Oracles: dense Hessians and GGNs by torch.func in float64 (tests/test_linops.py) and the
eager operator. The backend is ``aot_eager`` (torch.compile's tracing, functionalization
and AOTAutograd without inductor's C++ code generation, which takes tens of seconds per
graph on this CPU); the inductor timings are in benchmarks/bench_compiled.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hesslab as hl
from hesslab.errors import HesslabError
from tests.models import classification_data, image_data, cnn, mlp
from tests.test_linops import dense_ggn, dense_hessian

BACKEND = "aot_eager"
CE = nn.CrossEntropyLoss()


def _block(n: int, b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("kind, cls", [
    ("mlp", hl.Hessian), ("mlp", hl.GGN), ("cnn", hl.Hessian),
    pytest.param("cnn", hl.GGN, marks=pytest.mark.slow),
])
def test_compiled_products_match_dense_float64(kind, cls):
    model = mlp() if kind == "mlp" else cnn()
    X, y = classification_data() if kind == "mlp" else image_data()
    op = cls(model, CE, (X, y), compile=BACKEND)
    assert op.hvp_path == "compiled" and op.compiled.backend == BACKEND
    dense = (dense_hessian if cls is hl.Hessian else dense_ggn)(model, CE, X, y)
    V = _block(op.shape[0], 3)
    out = op @ V
    assert torch.allclose(out, dense @ V, rtol=1e-10, atol=1e-10)
    assert torch.allclose(op @ (2 * V), 2 * (dense @ V), rtol=1e-10, atol=1e-10)
    assert op.compiled.compiles == 1 and op.compiled.fallback is None and op.hvp_path == "compiled"


def test_compiled_equals_eager_on_mse_and_a_parameter_block():
    model = mlp(hidden=(5, 4))
    X = torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    Y = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kw = dict(params="2.*")  # the middle Linear only
    eager = hl.Hessian(model, nn.MSELoss(), (X, Y), compile=False, **kw)
    comp = hl.Hessian(model, nn.MSELoss(), (X, Y), compile=BACKEND, **kw)
    assert eager.hvp_path == "graph" and eager.compiled is None
    V = _block(comp.shape[0], 2, seed=5)
    dense = dense_hessian(model, nn.MSELoss(), X, Y, names=comp.param_names)
    assert torch.allclose(comp @ V, dense @ V, rtol=1e-10, atol=1e-12)
    assert torch.allclose(comp @ V, eager @ V, rtol=1e-10, atol=1e-12)


def test_the_cache_is_not_rebuilt_and_the_uneven_last_batch_is_a_second_graph():
    model = mlp()
    X, y = classification_data(num_samples=25)
    batches = [(X[:10], y[:10]), (X[10:20], y[10:20]), (X[20:], y[20:])]  # 10, 10, 5
    op = hl.Hessian(model, CE, batches, compile=BACKEND, check_deterministic=False,
                    check_derivatives=False)  # its one-column check would add b = 1 graphs
    V = _block(op.shape[0], 2)
    dense = dense_hessian(model, CE, X, y)
    assert torch.allclose(op @ V, dense @ V, rtol=1e-10, atol=1e-10)
    assert op.compiled.compiles == 2  # batch shapes 10 and 5
    for seed in (1, 2):
        assert torch.allclose(op @ _block(op.shape[0], 2, seed), dense @ _block(op.shape[0], 2, seed),
                              rtol=1e-10, atol=1e-10)
    assert op.compiled.compiles == 2  # nothing recompiled for shapes already seen
    op @ V[:, 0]
    assert op.compiled.compiles == 4  # b = 1 is a new column count: one graph per batch shape


def test_operators_do_not_share_a_cache():
    X, y = classification_data()
    ops = [hl.Hessian(mlp(seed=s), CE, (X, y), compile=BACKEND) for s in range(2)]
    V = _block(ops[0].shape[0], 1)
    outs = [op @ V for op in ops]
    for s, (op, out) in enumerate(zip(ops, outs)):
        assert op.compiled.compiles == 1
        assert torch.allclose(out, dense_hessian(mlp(seed=s), CE, X, y) @ V, rtol=1e-10, atol=1e-10)


class _Breaks(nn.Module):
    """A model whose forward has a graph break (a host read of a tensor value)."""

    def __init__(self):
        super().__init__()
        self.body = mlp()

    def forward(self, x):
        out = self.body(x)
        if float(out.sum()) > 1e30:  # data-dependent Python control flow: breaks fullgraph tracing
            out = out * 2
        return out


def test_a_graph_break_falls_back_on_eager_with_one_warning_and_stays_correct():
    model = _Breaks().double()
    X, y = classification_data()
    op = hl.Hessian(model, CE, (X, y), compile=BACKEND)
    V = _block(op.shape[0], 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = op @ V
        out2 = op @ V
    msgs = [str(w.message) for w in caught if "fell back on the eager" in str(w.message)]
    assert len(msgs) == 1 and "Hessian" in msgs[0], msgs
    assert op.compiled.fallback is not None and op.compiled.fallback in msgs[0]
    assert op.hvp_path == "graph"  # the kept graph it would have used without compile
    dense = dense_hessian(model, CE, X, y)
    assert torch.allclose(out, dense @ V, rtol=1e-10, atol=1e-10) and torch.equal(out, out2)


def test_auto_is_eager_on_the_cpu_and_options_are_checked():
    X, y = classification_data()
    op = hl.Hessian(mlp(), CE, (X, y))
    assert op.compiled is None and op.hvp_path == "graph"
    assert hl.GGN(mlp(), CE, (X, y), compile="auto").compiled is None
    for bad, kw in [("maybe", {}), (1, {}), (True, {"method": "autograd"}),
                    (True, {"method": "finite_difference"}), (True, {"reuse_graph": True}),
                    (True, {"train_mode": True})]:
        with pytest.raises(HesslabError, match="compile"):
            hl.Hessian(mlp(), CE, (X, y), compile=bad, **kw)
    # eager paths that compile cannot serve are simply kept under "auto"
    assert hl.Hessian(mlp(), CE, (X, y), method="autograd").compiled is None


def test_compiled_lanczos_agrees_with_exact_eigenvalues():
    model = mlp()
    X, y = classification_data()
    op = hl.Hessian(model, CE, (X, y), compile=BACKEND)
    r = hl.lanczos(op, k=3, which="LA")
    exact = torch.linalg.eigvalsh(dense_hessian(model, CE, X, y)).flip(0)[:3]
    assert torch.allclose(torch.as_tensor(r.eigenvalues, dtype=torch.float64), exact, rtol=1e-8, atol=1e-10)
