"""Hessian products by central differences of gradients (method="finite_difference").

Against exact products (autograd, float64 oracle of the same parameters): the relative
error per column is within the documented bound K·δ^{2/3} (δ the machine epsilon of the
dtype the gradients are computed in, K = 300 for these models; measured K: MLP ~4, MLP
with BatchNorm in train mode ~110, CNN ~1), plus the rounding of the result to the
operator's dtype. Parameters and BatchNorm statistics stay bitwise as they were.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesslab as hl
from hesslab.errors import HesslabError
from hesslab.linops import GGN, Hessian
from hesslab.linops._finite_difference import fd_step
from tests.models import classification_data, cnn, image_data, mlp

CE = nn.CrossEntropyLoss()
K = 300.0

CASES = {
    # name: (model factory, data factory, train_mode)
    "mlp": (lambda dt: mlp(dtype=dt), lambda dt: classification_data(20, dtype=dt), False),
    "mlp-bn-train": (
        lambda dt: mlp(hidden=(6, 5), batchnorm=True, dtype=dt),
        lambda dt: classification_data(20, dtype=dt), True,
    ),
    "cnn": (lambda dt: cnn(dtype=dt), lambda dt: image_data(20, dtype=dt), False),
}
# (case, operator dtype, fd_dtype). A float32 ReLU CNN is left out on purpose: its step
# (∛δ(1+‖θ‖) ≈ 0.02) crosses a ReLU kink, see the module docstring of _finite_difference.
RUNS = [
    ("mlp", torch.float32, None), ("mlp", torch.float64, None),
    ("mlp", torch.float32, torch.float64),
    ("mlp-bn-train", torch.float32, None), ("mlp-bn-train", torch.float64, None),
    ("mlp-bn-train", torch.float32, torch.float64),
    ("cnn", torch.float64, None), ("cnn", torch.float32, torch.float64),
]


def _block(n: int, b: int = 4) -> torch.Tensor:
    return torch.randn(n, b, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("case,dtype,fd_dtype", RUNS, ids=lambda x: str(x).replace("torch.", ""))
def test_error_against_exact_products_is_within_the_documented_bound(case, dtype, fd_dtype):
    make_model, make_data, train = CASES[case]
    model, data = make_model(dtype), make_data(dtype)
    n = sum(p.numel() for p in model.parameters())
    V = _block(n)
    exact = Hessian(model, CE, data, train_mode=train, dtype=torch.float64) @ V
    H = Hessian(model, CE, data, train_mode=train, method="finite_difference", fd_dtype=fd_dtype)
    assert H.hvp_path == "finite_difference" and H.dtype == dtype
    got = H @ V.to(dtype)
    assert got.dtype == dtype
    rel = ((got.double() - exact).norm(dim=0) / exact.norm(dim=0)).max().item()
    delta = torch.finfo(fd_dtype or dtype).eps
    bound = K * delta ** (2 / 3) + 4 * torch.finfo(dtype).eps
    assert rel <= bound, (case, dtype, fd_dtype, rel, bound)


def test_step_rule():
    eps = torch.finfo(torch.float64).eps ** (1 / 3)
    assert fd_step(3.0, 2.0, torch.float64) == pytest.approx(eps * 4.0 / 2.0)
    eps32 = torch.finfo(torch.float32).eps ** (1 / 3)
    assert fd_step(0.0, 1.0, torch.float32) == pytest.approx(eps32)


def test_parameters_and_batchnorm_statistics_stay_bitwise_after_1000_products():
    model = mlp(hidden=(6, 5), batchnorm=True, dtype=torch.float32)
    X, y = classification_data(20, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    H = Hessian(model, CE, (X, y), train_mode=True, method="finite_difference")
    V = _block(H.shape[0], 1).float()
    for _ in range(1000):
        out = H @ V
    assert torch.isfinite(out).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training  # the mode is restored


def test_batches_are_weighted_like_the_exact_paths():
    model = mlp()
    X, y = classification_data(20)
    loader = [(X[:7], y[:7]), (X[7:15], y[7:15]), (X[15:], y[15:])]
    V = _block(sum(p.numel() for p in model.parameters()), 2)
    exact = Hessian(model, CE, (X, y)) @ V
    got = Hessian(model, CE, loader, method="finite_difference") @ V
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel <= K * torch.finfo(torch.float64).eps ** (2 / 3)


def test_lanczos_on_finite_difference_products():
    model = mlp()
    data = classification_data(20)
    exact = hl.lanczos(Hessian(model, CE, data), k=2, seed=0).eigenvalues
    got = hl.lanczos(Hessian(model, CE, data, method="finite_difference"), k=2, seed=0).eigenvalues
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(exact), rtol=1e-8, atol=1e-10)


def test_zero_column_gives_zero_and_parameter_subsets_work():
    model = mlp()
    data = classification_data(20)
    H = Hessian(model, CE, data, params="2.*", method="finite_difference")
    V = _block(H.shape[0], 2)
    V[:, 1] = 0
    out = H @ V
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    exact = Hessian(model, CE, data, params="2.*") @ V[:, :1]
    assert ((out[:, :1] - exact).norm() / exact.norm()).item() <= 1e-7


def test_bad_options_are_refused():
    model = mlp()
    data = classification_data(20)
    with pytest.raises(HesslabError, match="'finite_difference' is available for Hessian only"):
        GGN(model, CE, data, method="finite_difference")
    with pytest.raises(HesslabError, match="fd_dtype: only used with method='finite_difference'"):
        Hessian(model, CE, data, fd_dtype=torch.float64)
    with pytest.raises(HesslabError, match="fd_dtype: expected a floating"):
        Hessian(model, CE, data, method="finite_difference", fd_dtype=torch.int64)
    with pytest.raises(HesslabError, match="reuse_graph: True keeps an autograd graph"):
        Hessian(model, CE, data, method="finite_difference", reuse_graph=True)


def test_dropout_in_train_mode_sees_the_same_masks_in_both_gradients():
    model = mlp(dropout=0.5)
    data = classification_data(20)
    torch.manual_seed(3)
    H = Hessian(model, CE, data, train_mode=True, method="finite_difference",
                check_deterministic=False)
    V = _block(H.shape[0], 2)
    out = H @ V
    # with different masks the quotient would be O(1/ε) ≈ 1e5 times too large
    assert out.abs().max() < 100
