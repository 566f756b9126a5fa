"""Tests of hesslab.linops against dense oracles built here with torch.func (float64).

The oracle for the Hessian is ``torch.func.hessian`` of the full-data mean loss as a
function of the flattened parameters; the GGN oracle is Jᵀ (∇²_z L) J with J and ∇²_z L
built explicitly; the functional-part oracle is the Hessian of ⟨stopgrad(∇_z L), f(θ)⟩.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from hesslab.errors import HesslabError
from hesslab.linops import GGN, DenseOperator, Hessian, LinearOperator, SubblockOperator
from tests.models import classification_data, cnn, image_data, linear_net, mlp, regression_data

RTOL = 1e-10
CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()


# ----------------------------------------------------------------------------- oracles
def _selected(model: nn.Module, names: list[str] | None) -> tuple[list[str], list[torch.Size], Tensor]:
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    shapes = [params[k].shape for k in names]
    flat0 = torch.cat([params[k].detach().reshape(-1) for k in names])
    return names, shapes, flat0


def _as_dict(flat: Tensor, names: list[str], shapes: list[torch.Size]) -> dict[str, Tensor]:
    parts = torch.split(flat, [math.prod(s) for s in shapes])
    return {k: p.reshape(s) for k, p, s in zip(names, parts, shapes)}


def _output_fn(model: nn.Module, X: Tensor, names: list[str] | None = None):
    names, shapes, flat0 = _selected(model, names)
    fixed = {k: v.detach() for k, v in model.named_parameters()}

    def f(flat: Tensor) -> Tensor:
        return functional_call(model, {**fixed, **_as_dict(flat, names, shapes)}, (X,))

    return f, flat0


def dense_hessian(model, loss_fn, X, y, names=None) -> Tensor:
    """∇²_θ loss_fn(model(X), y) over the selected parameters; (n, n)."""
    f, flat0 = _output_fn(model, X, names)
    return torch.func.hessian(lambda flat: loss_fn(f(flat), y))(flat0)


def dense_ggn(model, loss_fn, X, y) -> Tensor:
    """Jᵀ (∇²_z L) J with z = model(X) flattened; (n, n)."""
    f, flat0 = _output_fn(model, X)
    z0 = f(flat0).detach()
    J = torch.func.jacrev(f)(flat0).reshape(z0.numel(), -1)  # (N*C, n)
    Hz = torch.func.hessian(lambda z: loss_fn(z.reshape(z0.shape), y))(z0.reshape(-1))  # (NC, NC)
    return J.T @ Hz @ J


def dense_functional(model, loss_fn, X, y) -> Tensor:
    """Σ_k (∂L/∂z_k) ∇²_θ z_k, the functional part H_F; (n, n)."""
    f, flat0 = _output_fn(model, X)
    z0 = f(flat0).detach().requires_grad_(True)
    (gz,) = torch.autograd.grad(loss_fn(z0, y), z0)
    return torch.func.hessian(lambda flat: (gz * f(flat)).sum())(flat0)


def assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL) -> None:
    """Entrywise agreement relative to the largest entry of ``expected``."""
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * max(scale, 1e-300), f"max error {err:.3g} vs scale {scale:.3g}"


CASES = {
    "mlp": (lambda: mlp(), lambda: classification_data(20, 4, 3)),
    "mlp_bn": (lambda: mlp(batchnorm=True, hidden=(6, 5)), lambda: classification_data(20, 4, 3)),
    "cnn": (lambda: cnn(), lambda: image_data(12)),
    "cnn_bn": (lambda: cnn(batchnorm=True), lambda: image_data(12)),
}


# ------------------------------------------------------------------ Hessian products
@pytest.mark.parametrize("case", list(CASES))
def test_hessian_products_match_dense(case):
    make_model, make_data = CASES[case]
    model = make_model()
    X, y = make_data()
    H_ref = dense_hessian(model, CE, X, y)
    n = H_ref.shape[0]
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    for method, reuse in [("auto", "auto"), ("autograd", False), ("func", False)]:
        H = Hessian(model, CE, (X, y), method=method, reuse_graph=reuse)
        assert H.shape == (n, n) and H.dtype == torch.float64
        assert_close(H @ V[:, 0], H_ref @ V[:, 0])  # b = 1, vector in, vector out
        assert_close(H @ V, H_ref @ V)  # b = 4
        assert_close(H.matmat(V[:, :1]), H_ref @ V[:, :1])
        assert H.num_matvecs == 6
    assert_close(H.to_dense(), H_ref)


def test_hessian_column_modes_agree():
    model = cnn()
    X, y = image_data(12)
    H_ref = dense_hessian(model, CE, X, y)
    V = torch.randn(H_ref.shape[0], 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for batched in (True, False, "auto"):
        H = Hessian(model, CE, (X, y), batched_columns=batched)
        assert_close(H @ V, H_ref @ V)
        assert H.column_mode in ("batched", "loop")
        assert_close(H @ V, H_ref @ V)  # second product: graph kept, mode decided


def test_column_mode_is_a_rule_and_identical_calls_give_identical_bits():
    """``batched_columns="auto"`` is decided at construction by the device, never by a
    timing: on the CPU the loop over the kept graph. Two identical operators applied to
    the same block (as spectral_density's probes are) give the same bits."""
    model = cnn()
    X, y = image_data(12)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 8,
                    generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    H1 = Hessian(model, CE, (X, y))
    assert H1.column_mode == "loop" and H1.column_fallback is None  # CPU rule, before any product
    assert Hessian(model, CE, (X, y), batched_columns=True).column_mode == "batched"
    H2 = Hessian(model, CE, (X, y))
    first = H1 @ V
    assert H1.column_mode == "loop"
    assert torch.equal(first, H2 @ V)
    assert torch.equal(first, H1 @ V)
    G1, G2 = GGN(model, CE, (X, y)), GGN(model, CE, (X, y))
    assert torch.equal(G1 @ V, G2 @ V)
    from hesslab import spectral_density

    d1, d2 = (spectral_density(Hessian(model, CE, (X, y)), 12, 6, seed=1, grid_size=50) for _ in range(2))
    assert np.array_equal(np.asarray(d1.nodes), np.asarray(d2.nodes))
    assert np.array_equal(np.asarray(d1.weights), np.asarray(d2.weights))


class _NoBatchingRule(torch.autograd.Function):
    """x ↦ x³ with a custom backward and no vmap rule: is_grads_batched cannot run it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if bool(torch.isnan(g).any()):  # data-dependent control flow: vmap refuses it
            raise ValueError("NaN cotangent")
        return 3 * x * x * g


def test_batched_columns_fall_back_on_the_loop_once_and_say_why():
    class Cubic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3).double()

        def forward(self, x: Tensor) -> Tensor:
            return _NoBatchingRule.apply(self.lin(x))

    model = Cubic()
    X, y = _data()
    ref = Hessian(model, CE, (X, y), batched_columns=False)
    H = Hessian(model, CE, (X, y), batched_columns=True)
    assert H.column_mode == "batched"
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert_close(H @ V, ref @ V)
    assert H.column_mode == "loop" and H.column_fallback


def test_to_dense_and_hvp_path():
    model = mlp()
    X, y = classification_data(20)
    H = Hessian(model, CE, (X, y))
    assert H.hvp_path == "graph"
    assert Hessian(model, CE, [(X, y)]).hvp_path == "autograd"
    assert Hessian(model, CE, (X, y), method="func").hvp_path == "func"
    assert_close(H.to_dense(chunk_size=7), dense_hessian(model, CE, X, y))


@pytest.mark.parametrize("case", ["mlp", "cnn_bn"])
def test_loader_with_uneven_last_batch_gives_full_batch_hessian(case):
    make_model, make_data = CASES[case]
    model = make_model()
    X, y = make_data()
    N = X.shape[0]
    loader = DataLoader(TensorDataset(X, y), batch_size=5 if N == 12 else 7)  # 5+5+2 / 7+7+6
    assert N % loader.batch_size != 0
    H_ref = dense_hessian(model, CE, X, y)
    for method in ("autograd", "func"):
        H = Hessian(model, CE, loader, method=method, progress=True)
        assert_close(H.to_dense(), H_ref)
        assert H.num_data == N
    # a list of uneven batches too, with its gradient and loss
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    H = Hessian(model, CE, batches)
    assert_close(H.to_dense(), H_ref)
    full = Hessian(model, CE, (X, y))
    assert_close(H.gradient(), full.gradient())
    assert abs(H.loss() - full.loss()) <= 1e-12 * abs(full.loss())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(1, 19), max_size=3, unique=True), b=st.integers(1, 4))
def test_products_over_any_split_of_the_data_match_the_dense_hessian(cuts, b):
    """One batch (its product is the mean as it is) and any uneven split (weighted by n_k)."""
    model = mlp()
    X, y = _data()  # 20 samples
    edges = [0, *sorted(cuts), 20]
    batches = [(X[a:c], y[a:c]) for a, c in zip(edges, edges[1:])]
    data = batches[0] if len(batches) == 1 else batches
    H = Hessian(model, CE, data, check_deterministic=False)
    V = torch.randn(H.shape[0], b, dtype=torch.float64, generator=torch.Generator().manual_seed(len(edges)))
    assert_close(H @ V, dense_hessian(model, CE, X, y) @ V)
    assert H.num_data == 20


def test_gradient_and_loss_match_autograd():
    model = mlp()
    X, y = classification_data(20)
    loss = CE(model(X), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    H = Hessian(model, CE, (X, y))
    assert_close(H.gradient(), torch.cat([g.reshape(-1) for g in grads]))
    assert abs(H.loss() - loss.item()) <= 1e-14
    assert H.gradient().shape == (H.shape[0],)


# ---------------------------------------------------------------- parameter subsets
def _block_index(model: nn.Module, names: list[str]) -> Tensor:
    idx, offset = [], 0
    for name, p in model.named_parameters():
        if name in names:
            idx.extend(range(offset, offset + p.numel()))
        offset += p.numel()
    return torch.tensor(idx)


@pytest.mark.parametrize(
    "spec, names",
    [
        (["0.weight"], ["0.weight"]),
        ("2.bias", ["2.bias"]),
        ("*.bias", ["0.bias", "2.bias"]),
        ("2", ["2.weight", "2.bias"]),  # a submodule by name
        ("module", ["0.weight", "0.bias"]),  # an nn.Module object
        (["2.bias", "0.*"], ["0.weight", "0.bias", "2.bias"]),  # layout follows the model
    ],
)
def test_params_subsets_give_dense_blocks(spec, names):
    model = mlp()
    X, y = classification_data(20)
    if spec == "module":
        spec = model[0]
    H_full = dense_hessian(model, CE, X, y)
    idx = _block_index(model, names)
    H = Hessian(model, CE, (X, y), params=spec)
    assert H.param_names == names
    assert_close(H.to_dense(), H_full[idx][:, idx])
    assert_close(H.to_dense(), dense_hessian(model, CE, X, y, names))
    assert_close(H.gradient(), Hessian(model, CE, (X, y)).gradient()[idx])
    assert_close(GGN(model, CE, (X, y), params=spec).to_dense(), dense_ggn(model, CE, X, y)[idx][:, idx])


def test_params_default_skips_frozen_and_flags_untouched():
    model = mlp()
    model[0].weight.requires_grad_(False)
    X, y = classification_data(20)
    H = Hessian(model, CE, (X, y))
    assert H.param_names == ["0.bias", "2.weight", "2.bias"]
    idx = _block_index(model, H.param_names)
    assert_close(H.to_dense(), dense_hessian(model, CE, X, y)[idx][:, idx])
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True]
    # an explicit selection may include the frozen parameter
    assert Hessian(model, CE, (X, y), params="0.*").param_names == ["0.weight", "0.bias"]


def test_flatten_unflatten_roundtrip():
    model = cnn()
    X, y = image_data(4)
    H = Hessian(model, CE, (X, y), params=["0.weight", "3.bias"])
    assert [tuple(s) for s in H.param_shapes] == [(3, 1, 3, 3), (3,)]
    v = torch.arange(H.shape[0], dtype=torch.float64)
    parts = H.unflatten(v)
    assert [tuple(p.shape) for p in parts] == [(3, 1, 3, 3), (3,)]
    assert torch.equal(parts[0].reshape(-1), v[:27])  # row-major layout
    assert torch.equal(H.flatten(parts), v)
    V = torch.stack([v, 2 * v], dim=1)  # (n, 2)
    parts = H.unflatten(V)
    assert tuple(parts[0].shape) == (3, 1, 3, 3, 2)
    assert torch.equal(H.flatten(parts), V)
    with pytest.raises(HesslabError, match="vec"):
        H.unflatten(torch.zeros(H.shape[0] + 1))
    with pytest.raises(HesslabError, match="tensors"):
        H.flatten([torch.zeros(3)])


# ---------------------------------------------------------------- GGN and H - GGN
@pytest.mark.parametrize(
    "make_model, make_data, loss_fn",
    [
        (lambda: mlp(), lambda: classification_data(20), CE),
        (lambda: mlp(), lambda: regression_data(20), MSE),
        (lambda: cnn(batchnorm=True), lambda: image_data(12), CE),
        (lambda: linear_net(), lambda: regression_data(20, 4, 3), MSE),
    ],
)
def test_ggn_and_functional_part_match_dense(make_model, make_data, loss_fn):
    model = make_model()
    X, y = make_data()
    G_ref = dense_ggn(model, loss_fn, X, y)
    F_ref = dense_functional(model, loss_fn, X, y)
    H_ref = dense_hessian(model, loss_fn, X, y)
    assert_close(G_ref + F_ref, H_ref, 1e-12)  # the oracles agree among themselves
    V = torch.randn(H_ref.shape[0], 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for method, reuse in [("auto", "auto"), ("autograd", False), ("func", False)]:
        G = GGN(model, loss_fn, (X, y), method=method, reuse_graph=reuse)
        assert_close(G @ V, G_ref @ V)
        assert_close(G @ V[:, 0], G_ref @ V[:, 0])
    assert_close(G.to_dense(), G_ref)
    H = Hessian(model, loss_fn, (X, y))
    assert_close((H - G).to_dense(), F_ref, 1e-9)
    # the GGN of a convex loss is positive semi-definite
    assert torch.linalg.eigvalsh(G.to_dense()).min() > -1e-10 * G_ref.abs().max()


def test_ggn_over_loader_with_uneven_last_batch():
    model = mlp()
    X, y = classification_data(20)
    loader = DataLoader(TensorDataset(X, y), batch_size=6)  # 6+6+6+2
    assert_close(GGN(model, CE, loader).to_dense(), dense_ggn(model, CE, X, y))


# ---------------------------------------------------------------------- scipy, algebra
def test_to_scipy_works_with_eigsh():
    from scipy.sparse.linalg import eigsh

    model = cnn()
    X, y = image_data(12)
    H = Hessian(model, CE, (X, y))
    A = H.to_scipy()
    assert A.shape == H.shape and A.dtype == np.float64
    evals = eigsh(A, k=4, which="LA", return_eigenvectors=False, tol=1e-12)
    ref = np.linalg.eigvalsh(dense_hessian(model, CE, X, y).numpy())
    np.testing.assert_allclose(np.sort(evals), ref[-4:], rtol=1e-8)
    x = np.random.default_rng(0).standard_normal(H.shape[0])
    np.testing.assert_allclose(A @ x, (H @ torch.from_numpy(x)).numpy(), rtol=1e-12)
    X2 = np.random.default_rng(1).standard_normal((H.shape[0], 2))
    np.testing.assert_allclose(A.matmat(X2), (H @ torch.from_numpy(X2)).numpy(), rtol=1e-12)


def test_operator_algebra_and_counting():
    model = mlp()
    X, y = classification_data(20)
    H = Hessian(model, CE, (X, y))
    G = GGN(model, CE, (X, y))
    Hd, Gd = dense_hessian(model, CE, X, y), dense_ggn(model, CE, X, y)
    V = torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    combo = 2 * H - G / 4 + (-H) + H * 0.5 - G
    assert isinstance(combo, LinearOperator) and combo.shape == H.shape
    assert_close(combo @ V, (1.5 * Hd - 1.25 * Gd) @ V)
    assert_close(sum([H, G]) @ V, (Hd + Gd) @ V)
    D = DenseOperator(Hd)
    assert ((D - H) @ V).abs().max() < 1e-14
    assert_close(D.to_dense(), Hd)
    H.num_matvecs = 0
    H @ V
    H @ V[:, 0]
    assert H.num_matvecs == 3
    # a float32 block is converted to the operator's dtype
    assert (H @ V.float()).dtype == torch.float64
    with pytest.raises(HesslabError, match="other"):
        H + DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(HesslabError, match="other"):
        H - DenseOperator(torch.eye(H.shape[0], dtype=torch.float32))
    with pytest.raises(HesslabError, match="zero"):
        H / 0
    with pytest.raises(HesslabError, match="matrix"):
        DenseOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))


def test_to_dense_refuses_large_operators():
    H = Hessian(mlp(), CE, classification_data(20))
    with pytest.raises(HesslabError, match=r"max_size = 10.*lanczos"):
        H.to_dense(max_size=10)


# --------------------------------------------------------------- modes and the model
def test_model_mode_flags_and_buffers_restored():
    model = mlp(batchnorm=True, dropout=0.3)
    model.train()
    model[2].eval()  # a mixed mode must survive too
    model[0].bias.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    state = copy.deepcopy(model.state_dict())
    X, y = classification_data(20)
    H = Hessian(model, CE, (X, y), params=["0.*", "4.weight"])
    H @ torch.ones(H.shape[0])
    H.gradient(), H.loss()
    G = GGN(model, CE, [(X[:8], y[:8]), (X[8:], y[8:])])
    G @ torch.ones(G.shape[0], 2)
    Ht = Hessian(model[:3], CE, (X, y % 6), train_mode=True)  # BatchNorm, no dropout
    Ht @ torch.ones(Ht.shape[0])
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for k, v in model.state_dict().items():  # running statistics untouched
        assert torch.equal(v, state[k]), k


def test_eval_mode_is_default_and_train_mode_batchnorm_matches_oracle():
    model = mlp(batchnorm=True)
    X, y = classification_data(20)
    model.train()
    H_eval = Hessian(model, CE, (X, y))
    model.eval()
    assert_close(H_eval.to_dense(), dense_hessian(model, CE, X, y))
    # Train mode: BatchNorm normalizes with the batch statistics. The oracle is a copy
    # without running statistics, differentiated by torch.autograd.functional (plain
    # double backward): torch.func.hessian (jacfwd of jacrev) is wrong here in torch 2.x
    # (second-order batch_norm with batch statistics under vmap; cf. pytorch#196699),
    # so one product is also checked against central differences of the gradient.
    oracle = copy.deepcopy(model)
    torch.func.replace_all_batch_norm_modules_(oracle)
    oracle.train()
    f, flat0 = _output_fn(oracle, X)
    H_ref = torch.autograd.functional.hessian(lambda flat: CE(f(flat), y), flat0)
    H_train = Hessian(model, CE, (X, y), train_mode=True)
    assert_close(H_train.to_dense(), H_ref)
    grad = torch.func.grad(lambda flat: CE(f(flat), y))
    v = torch.randn(flat0.numel(), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    eps = 1e-5
    fd = (grad(flat0 + eps * v) - grad(flat0 - eps * v)) / (2 * eps)
    assert_close(H_train @ v, fd, 1e-7)
    assert (H_train.to_dense() - H_eval.to_dense()).abs().max() > 1e-3  # the modes differ
    G_train = GGN(model, CE, (X, y), train_mode=True)
    assert_close(G_train.to_dense(), dense_ggn(oracle, CE, X, y))
    assert not model.training
    with pytest.raises(HesslabError, match="method"):
        Hessian(model, CE, (X, y), train_mode=True, method="func")


class _Reshuffled:
    """A re-iterable that deals the samples into new batches on every pass (like shuffle=True)."""

    def __init__(self, X, y, size):
        self.X, self.y, self.size, self.passes = X, y, size, 0

    def __iter__(self):
        self.passes += 1
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.passes))
        for i in range(0, len(order), self.size):
            idx = order[i : i + self.size]
            yield self.X[idx], self.y[idx]


def test_train_mode_determinism_check_fires_when_the_batches_change():
    X, y = classification_data(20)
    model = mlp(batchnorm=True)
    with pytest.raises(HesslabError, match=r"(?s)check_deterministic.*dropout.*BatchNorm"):
        Hessian(model, CE, _Reshuffled(X, y, 5), train_mode=True)
    # eval mode uses the running statistics: the same matrix however the data is dealt
    Hessian(model, CE, _Reshuffled(X, y, 5))
    H = Hessian(model, CE, _Reshuffled(X, y, 5), train_mode=True, check_deterministic=False)
    assert torch.isfinite(H @ torch.ones(H.shape[0])).all()
    assert not model.training


def test_dropout_in_train_mode_is_seeded_and_leaves_the_global_rng_alone():
    model = mlp(dropout=0.5)
    X, y = classification_data(20)
    v = torch.randn(sum(p.numel() for p in model.parameters()), 2, generator=torch.Generator().manual_seed(3))
    for data in [(X, y), [(X[:10], y[:10]), (X[10:], y[10:])]]:
        before = torch.get_rng_state()
        H = Hessian(model, CE, data, train_mode=True)  # the determinism check passes: fixed masks
        first, second = H @ v, H @ v
        assert torch.equal(torch.get_rng_state(), before)
        assert torch.equal(first, second)
        assert torch.equal(Hessian(model, CE, data, train_mode=True) @ v, first)  # same seed, same bits
        other = Hessian(model, CE, data, train_mode=True, seed=1) @ v
        assert not torch.allclose(other, first)  # another seed, other masks
        assert not torch.allclose(Hessian(model, CE, data) @ v, first)  # eval mode: no dropout


def test_dtype_option_runs_a_float64_copy():
    model32 = mlp(dtype=torch.float32)
    X32, y = classification_data(20, dtype=torch.float32)
    before = [p.detach().clone() for p in model32.parameters()]
    H = Hessian(model32, CE, (X32, y), dtype=torch.float64)
    assert H.dtype == torch.float64
    model64 = copy.deepcopy(model32).double()
    assert_close(H.to_dense(), dense_hessian(model64, CE, X32.double(), y))
    assert_close(GGN(model32, CE, [(X32, y)], dtype=torch.float64).to_dense(),
                 dense_ggn(model64, CE, X32.double(), y))
    assert all(p.dtype == torch.float32 for p in model32.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model32.parameters(), before))
    # float32 operator without the option
    assert Hessian(model32, CE, (X32, y)).dtype == torch.float32


def test_kept_graph_follows_in_place_parameter_updates():
    model = mlp()
    X, y = classification_data(20)
    H = Hessian(model, CE, (X, y))
    v = torch.ones(H.shape[0], dtype=torch.float64)
    H @ v
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    assert_close(H @ v, dense_hessian(model, CE, X, y) @ v)


# ------------------------------------------------------------------------ bad input
def _data():
    return classification_data(20)


def test_loss_that_is_not_a_scalar():
    with pytest.raises(HesslabError, match="loss_fn.*scalar"):
        Hessian(mlp(), nn.CrossEntropyLoss(reduction="none"), _data())
    with pytest.raises(HesslabError, match="loss_fn.*sum.*MEAN"):
        GGN(mlp(), nn.CrossEntropyLoss(reduction="sum"), _data())
    with pytest.raises(HesslabError, match="loss_fn.*callable"):
        Hessian(mlp(), "cross_entropy", _data())


def test_no_parameter_requiring_grad_and_params_matching_nothing():
    model = mlp().requires_grad_(False)
    with pytest.raises(HesslabError, match="params.*requires_grad"):
        Hessian(model, CE, _data())
    for spec in ["nope.*", "fc1.weight", ["0.weight", "zzz"], nn.Linear(2, 2), []]:
        with pytest.raises(HesslabError, match="params"):
            Hessian(mlp(), CE, _data(), params=spec)


def test_empty_data():
    X, y = _data()
    for data in [[], (X[:0], y[:0]), [(X[:0], y[:0])], DataLoader(TensorDataset(X[:0], y[:0]))]:
        with pytest.raises(HesslabError, match="data"):
            Hessian(mlp(), CE, data)
    with pytest.raises(HesslabError, match="data.*one-shot"):
        Hessian(mlp(), CE, ((X, y) for _ in range(2)))
    with pytest.raises(HesslabError, match="data"):
        Hessian(mlp(), CE, X)
    with pytest.raises(HesslabError, match="data.*batch 1"):
        Hessian(mlp(), CE, [(X, y), (X,)], check_deterministic=False) @ torch.ones(51)


def test_nan_in_loss():
    X, y = _data()
    X = X.clone()
    X[3, 1] = float("nan")
    with pytest.raises(HesslabError, match="loss_fn.*nan"):
        Hessian(mlp(), CE, (X, y))
    # NaN appearing after construction (in a later batch, or in the parameters)
    with pytest.raises(HesslabError, match="loss_fn.*nan.*batch 1"):
        H = Hessian(mlp(), CE, [(X[5:], y[5:]), (X[:5], y[:5])], check_deterministic=False)
        H @ torch.ones(H.shape[0])
    model = mlp()
    H = Hessian(model, CE, _data())
    with torch.no_grad():
        model[2].bias[1] = float("inf")
    with pytest.raises(HesslabError, match="loss_fn"):
        H @ torch.ones(H.shape[0])
    with pytest.raises(HesslabError, match="loss_fn"):
        H.gradient()


def test_nan_in_product():
    model = mlp()
    X, _ = _data()
    Y = model(X).detach()  # an exact fit: |r|^1.5 has an infinite second derivative at 0

    def loss_fn(out, target):
        return (out - target).abs().pow(1.5).mean()

    H = Hessian(model, loss_fn, (X, Y))
    with pytest.raises(HesslabError, match="model.*NaN or Inf.*float64"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)
    H = Hessian(mlp(), CE, _data())
    v = torch.ones(H.shape[0], dtype=torch.float64)
    v[0] = float("nan")
    with pytest.raises(HesslabError, match="V.*NaN"):
        H @ v


def test_model_and_data_on_different_devices():
    X, y = _data()
    with pytest.raises(HesslabError, match="data.*device"):
        Hessian(mlp(), CE, (X.to("meta"), y))
    with pytest.raises(HesslabError, match="data.*device"):
        Hessian(mlp(), CE, [(X, y.to("meta"))])


def test_integer_inputs_where_floats_are_needed():
    X, y = _data()
    with pytest.raises(HesslabError, match=r"data.*torch\.int64.*float"):
        Hessian(mlp(), CE, (X.long(), y))


def test_wrong_shapes_given_to_products():
    H = Hessian(mlp(), CE, _data())
    n = H.shape[0]
    with pytest.raises(HesslabError, match=rf"V.*\({n}, b\)"):
        H.matmat(torch.zeros(n + 1, 2, dtype=torch.float64))
    with pytest.raises(HesslabError, match="V"):
        H.matmat(torch.zeros(n, dtype=torch.float64))
    with pytest.raises(HesslabError, match=rf"\({n},\)"):
        H @ torch.zeros(n - 1, dtype=torch.float64)
    with pytest.raises(HesslabError, match="x"):
        H @ torch.zeros(n, 1, 1, dtype=torch.float64)
    with pytest.raises(HesslabError, match="V.*floating"):
        H.matmat(torch.zeros(n, 1, dtype=torch.long))


def test_bad_options():
    for kwargs, name in [
        (dict(method="magic"), "method"),
        (dict(reuse_graph="yes"), "reuse_graph"),
        (dict(batched_columns=2), "batched_columns"),
        (dict(dtype=torch.int32), "dtype"),
    ]:
        with pytest.raises(HesslabError, match=name):
            Hessian(mlp(), CE, _data(), **kwargs)
    X, y = _data()
    with pytest.raises(HesslabError, match="reuse_graph"):
        Hessian(mlp(), CE, [(X, y)], reuse_graph=True)
    with pytest.raises(HesslabError, match="model"):
        Hessian(lambda x: x, CE, _data())
    with pytest.raises(HesslabError, match="model.*one tensor"):
        GGN(_TupleOut(), CE, _data())


class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.lin(x)
        return out, out


def test_tuple_and_dict_inputs():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3).double()
            self.b = nn.Linear(2, 3).double()

        def forward(self, x: Tensor, z: Tensor) -> Tensor:
            return torch.tanh(self.a(x)) * self.b(z)

    model = TwoInputs()
    X, y = _data()
    Z = torch.randn(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = Hessian(model, CE, ((X, Z), y)).to_dense()
    assert_close(Hessian(model, CE, ({"x": X, "z": Z}, y)).to_dense(), ref)
    assert_close(Hessian(model, CE, [((X[:7], Z[:7]), y[:7]), ((X[7:], Z[7:]), y[7:])]).to_dense(), ref)
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    shapes = [params[k].shape for k in names]
    flat0 = torch.cat([params[k].reshape(-1) for k in names])
    dense = torch.func.hessian(
        lambda flat: CE(functional_call(model, _as_dict(flat, names, shapes), (X, Z)), y)
    )(flat0)
    assert_close(ref, dense)


def test_numpy_scalars_scale_operators_and_empty_blocks():
    H = Hessian(mlp(), CE, _data())
    v = torch.ones(H.shape[0], dtype=torch.float64)
    assert_close((np.float64(2.0) * H) @ v, 2 * (H @ v))
    assert_close((H * torch.tensor(3.0)) @ v, 3 * (H @ v))
    assert (H @ torch.zeros(H.shape[0], 0)).shape == (H.shape[0], 0)


def test_permutation_and_chain_operators_compose_p_k_pt():
    from hesslab.linops._base import ChainOperator, PermutationOperator

    g = torch.Generator().manual_seed(6)
    n = 7
    perm = torch.randperm(n, generator=g)
    P = PermutationOperator(perm, torch.float64)
    Pd = torch.zeros(n, n, dtype=torch.float64)
    Pd[perm, torch.arange(n)] = 1  # (P v)[perm[i]] = v[i]
    assert_close(P.to_dense(), Pd)
    assert_close(P.T.to_dense(), Pd.T)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    K = DenseOperator(M + M.T)
    chain = ChainOperator([P, K, P.T])
    assert_close(chain.to_dense(), Pd @ (M + M.T) @ Pd.T)
    assert torch.equal(PermutationOperator(torch.arange(n), torch.float64).to_dense(),
                       torch.eye(n, dtype=torch.float64))
    with pytest.raises(HesslabError, match="ops"):
        ChainOperator([])
    with pytest.raises(HesslabError, match="shape"):
        ChainOperator([K, PermutationOperator(torch.arange(n + 1), torch.float64)])


def test_collectives_without_a_process_group_are_local():
    from hesslab.linops._model import all_reduce_sum_, any_rank, distributed_active, global_count

    assert not distributed_active()
    t = torch.ones(3)
    assert all_reduce_sum_(t) is t and torch.equal(t, torch.ones(3))
    assert global_count(5) == 5 and any_rank(True) and not any_rank(False)


# ------------------------------------------------ data mistakes caught at the first batch
def test_first_batch_data_mistakes_name_the_argument_and_the_fix():
    X, y = _data()  # 20 samples, 4 features, float64
    with pytest.raises(HesslabError, match=r"data.*first batch.*\(20, 5\).*'0' expects 4 input features"):
        Hessian(mlp(), CE, (torch.randn(20, 5, dtype=torch.float64), y))
    for half in (torch.float16, torch.bfloat16):
        with pytest.raises(HesslabError, match=rf"data.*inputs.*{str(half).split('.')[1]}.*dtype=torch.float32"):
            Hessian(mlp(), CE, (X.to(half), y))
    assert Hessian(mlp(), CE, (X.float(), y), dtype=torch.float64).dtype == torch.float64  # cast data
    with pytest.raises(HesslabError, match=r"data.*cross-entropy.*targets.long\(\)"):
        GGN(mlp(), CE, (X, y.double()))
    with pytest.raises(HesslabError, match="data.*20 outputs.*19 targets"):
        Hessian(mlp(), CE, (X, y[:19]))
    with pytest.raises(HesslabError, match="data.*MSE.*broadcasting"):
        Hessian(mlp(), nn.MSELoss(), (X, torch.zeros(20, dtype=torch.float64)))


def test_a_loss_without_derivatives_gets_a_hesslab_message():
    X, y = _data()

    def detached(out, t):
        return CE(out.detach(), t)

    def accuracy(out, t):
        return (out.argmax(1) == t).double().mean()

    for loss_fn in (detached, accuracy):
        for op in (Hessian, GGN):
            with pytest.raises(HesslabError, match="loss_fn.*differentiabl"):
                op(mlp(), loss_fn, (X, y))


class _OnceDifferentiableSquare(torch.autograd.Function):
    """x ↦ x² whose backward detaches x: first derivatives right, second ones wrong."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x.detach() * g


def test_wrong_second_derivatives_are_caught_at_the_first_product():
    X, y = _data()

    def loss_fn(out, t):
        return CE(_OnceDifferentiableSquare.apply(out), t)

    for op in (Hessian, GGN):
        for data in ((X, y), [(X[:7], y[:7]), (X[7:], y[7:])]):
            A = op(mlp(), loss_fn, data)
            v = torch.randn(A.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(9))
            with pytest.raises(HesslabError, match="loss_fn/model.*finite differences.*loss_fn"):
                A @ v
            A @ v  # checked once: later products are not re-checked
            assert isinstance(op(mlp(), loss_fn, data, check_derivatives=False) @ v, Tensor)
    # a correct operator passes, in train mode with dropout and BatchNorm too
    for op in (Hessian, GGN):
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3),
                              nn.Linear(6, 3)).double()
        A = op(model, CE, (X, y), train_mode=True, check_deterministic=False)
        A @ torch.ones(A.shape[0], dtype=torch.float64)


class _Recording(nn.Module):
    """An MLP that records the batch sizes it sees in float64 and, with ``fixed``, only
    runs on batches of exactly that size (a batch size built into the model)."""

    def __init__(self, fixed: int | None = None):
        super().__init__()
        self.net, self.fixed, self.sizes64 = mlp(), fixed, []

    def forward(self, x):
        if x.dtype == torch.float64:
            self.sizes64.append(x.shape[0])
        if self.fixed is not None:
            x = x.reshape(self.fixed, -1)  # fails on any other batch size
        return self.net(x)


def _wrong_loss(out, t):
    return CE(_OnceDifferentiableSquare.apply(out), t)


@pytest.mark.parametrize("op", [Hessian, GGN])
def test_the_derivative_check_runs_on_a_cut_of_the_first_batch_or_on_all_of_it(op):
    X, y = _data()  # 20 samples
    X = X.float()  # a float32 model: the check's float64 passes are the ones recorded
    for fixed, seen in ((None, {8}), (20, {20})):
        for loss_fn in (CE, _wrong_loss):
            model = _Recording(fixed).float()
            A = op(model, loss_fn, (X, y))
            model.sizes64.clear()
            v = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(3))
            if loss_fn is _wrong_loss:  # caught on the cut and on the whole batch alike
                with pytest.raises(HesslabError, match="finite differences"):
                    A @ v
            else:
                A @ v
            assert set(model.sizes64) == seen, (fixed, model.sizes64)
    model = _Recording().float()  # a batch no bigger than the cut is checked whole
    A = op(model, _wrong_loss, (X[:6], y[:6]))
    model.sizes64.clear()
    with pytest.raises(HesslabError, match="finite differences"):
        A @ torch.ones(A.shape[0])
    assert set(model.sizes64) == {6}


def test_ggn_cross_entropy_closed_form_equals_double_backward():
    model = mlp()
    X, y = _data()
    y = y.clone()
    y[:3] = -100  # ignored samples: the mean runs over the others
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    for loss_fn in (CE, nn.CrossEntropyLoss(label_smoothing=0.1), torch.nn.functional.cross_entropy):
        ref = GGN(model, loss_fn, (X, y), output_curvature="autograd") @ V
        assert_close(GGN(model, loss_fn, (X, y), output_curvature="analytic") @ V, ref)
        assert_close(GGN(model, loss_fn, (X, y), method="func", output_curvature="analytic") @ V, ref)
    with pytest.raises(HesslabError, match="output_curvature"):
        G = GGN(mlp(), MSE, regression_data(), output_curvature="analytic")
        G @ torch.ones(G.shape[0], dtype=torch.float64)


def test_a_sharded_operator_refuses_local_matrices_and_subblocks():
    from hesslab.linops._shards import Shards

    A = DenseOperator(torch.eye(4, dtype=torch.float64))
    A.shards = Shards(0, 2, (4, 3))  # this rank's 4 of 7 entries
    for build in (A.to_dense, A.to_scipy, lambda: SubblockOperator(A, torch.arange(2))):
        with pytest.raises(HesslabError, match="sharded over 2 ranks"):
            build()
    with pytest.raises(HesslabError, match="sharded differently"):
        A + DenseOperator(torch.eye(4, dtype=torch.float64))
