"""Tests of the Kronecker-factored layer Hessians (hesslab.linops.kfac) and the overlap
analyses (hesslab.analysis.overlap), in float64 against dense oracles from torch.func.

The oracle for a layer block is ``torch.func.hessian`` of the full-data mean loss as a
function of that layer's flattened parameters (weight then bias, the operator layout);
per-sample output Hessians come from ``torch.func.hessian`` of the loss of one sample as
a function of the layer's output.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hesslab.analysis.overlap import (
    DominantEigenvalues,
    OverlapCurve,
    dominant_eigenvalues,
    eigenspace_overlap,
    eigenvector_low_rank,
    kfac_overlap,
    overlap_curve,
)
from hesslab.errors import HesslabError
from hesslab.linops import Hessian, LinearOperator
from hesslab.linops import KFAC, KronFactors, layer_hessian
from tests.models import classification_data, mlp, regression_data

CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()
RTOL = 1e-12



# ----------------------------------------------------------------------------- oracles
def exact_block(model: nn.Module, loss_fn, X: Tensor, y: Tensor, names: list[str]) -> Tensor:
    """∇² of loss_fn(model(X), y) w.r.t. the named parameters, flattened in order; (n, n)."""
    params = dict(model.named_parameters())
    shapes = [params[k].shape for k in names]
    flat0 = torch.cat([params[k].detach().reshape(-1) for k in names])
    fixed = {k: v.detach() for k, v in params.items()}

    def loss(flat: Tensor) -> Tensor:
        parts = torch.split(flat, [math.prod(s) for s in shapes])
        sub = {k: p.reshape(s) for k, p, s in zip(names, parts, shapes)}
        return loss_fn(functional_call(model, {**fixed, **sub}, (X,)), y)

    return torch.func.hessian(loss)(flat0)


def to_model_layout(D: Tensor, out: int, inp: int, bias: bool = True) -> Tensor:
    """Permute a matrix over the augmented row-major (out, in+1) layout to [weight, bias]."""
    r = torch.arange(out)[:, None]
    idx = r * inp + torch.arange(inp)[None, :]
    if bias:
        idx = torch.cat([idx, out * inp + r], dim=1)
    perm = idx.reshape(-1)  # kron position -> model position
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return D[inv][:, inv]


def assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL) -> None:
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * max(scale, 1e-300), f"max error {err:.3g} vs scale {scale:.3g}"


def layer_dims(model: nn.Module, name: str) -> tuple[int, int]:
    w = dict(model.named_modules())[name].weight
    return w.shape[0], w[0].numel()


class TwoLayer(nn.Module):
    """x -> tanh(W1 x + b1) -> W2 h + b2 (names fc1, fc2)."""

    def __init__(self, d: int = 4, h: int = 5, c: int = 3, act=torch.tanh):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, c)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def two_layer(seed: int = 0, act=torch.tanh) -> TwoLayer:
    torch.manual_seed(seed)
    return TwoLayer(act=act).double().eval()


class TinyConv(nn.Module):
    """Conv2d(2 -> 3, k=3, stride 2, padding 1) -> act -> Linear (names conv, fc)."""

    def __init__(self, act=torch.tanh, padding_mode: str = "zeros", kernel: int = 3, padding: int = 1, stride: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding, padding_mode=padding_mode)
        side = (5 + 2 * padding - kernel) // stride + 1
        self.fc = nn.Linear(3 * side * side, 4)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1))


# ------------------------------------------------ the layer block from per-sample terms
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mean_of_sample_krons_is_the_exact_layer_block(activation):
    model = mlp(4, (6, 5), 3, activation=activation)
    X, y = classification_data(16, 4, 3)
    K = KFAC(model, CE, (X, y))
    assert K.exact_layers == ([] if activation == "relu" else ["0", "2"])
    terms = K.sample_terms((X, y))
    for name in K.layer_names:
        M, Xa = terms[name]
        assert M.shape[1] == 1 and Xa.shape[1] == 1  # P = 1
        mean = torch.einsum("jab,jcd->acbd", M[:, 0], torch.einsum("jc,jd->jcd", Xa[:, 0], Xa[:, 0]))
        out, inp = layer_dims(model, name)
        mean = mean.reshape(out * (inp + 1), out * (inp + 1)) / X.shape[0]  # E[M ⊗ x̃x̃ᵀ]
        names = [f"{name}.weight", f"{name}.bias"]
        assert_close(to_model_layout(mean, out, inp), exact_block(model, CE, X, y, names))
        # the factors are the means of the same terms
        A, B = K.factors[name]
        assert_close(A, torch.einsum("jc,jd->cd", Xa[:, 0], Xa[:, 0]) / 16)
        assert_close(B, M[:, 0].sum(0) / 16)


def test_per_sample_M_matches_torch_func_at_every_layer():
    model = mlp(4, (6,), 3, activation="tanh")
    X, y = classification_data(5, 4, 3)
    K = KFAC(model, CE, (X, y))
    M0 = K.sample_terms((X, y))["0"].M[:, 0]  # (n, 6, 6)
    W2, b2 = model[2].weight, model[2].bias
    for j in range(5):
        z = model[0](X[j : j + 1]).detach()
        Mj = torch.func.hessian(lambda zz: F.cross_entropy(F.linear(torch.tanh(zz), W2, b2), y[j : j + 1]))(z)
        assert_close(M0[j], Mj.reshape(6, 6))


def test_mse_blocks_and_the_two_over_D_scaling():
    model = mlp(4, (6,), 3, activation="tanh")
    X, Y = regression_data(12, 4, 3)
    K = KFAC(model, MSE, (X, Y))
    _, B = K.factors["2"]
    assert_close(B, (2.0 / 3) * torch.eye(3, dtype=torch.float64))  # M = (2/D) I at the output
    terms = K.sample_terms((X, Y))
    for name in K.layer_names:
        M, Xa = terms[name]
        out, inp = layer_dims(model, name)
        mean = torch.einsum("jab,jc,jd->acbd", M[:, 0], Xa[:, 0], Xa[:, 0]).reshape(out * (inp + 1), -1) / 12
        assert_close(to_model_layout(mean, out, inp), exact_block(model, MSE, X, Y, [f"{name}.weight", f"{name}.bias"]))
    K1 = KFAC(model, F.mse_loss, (X[:1], Y[:1]))  # functional form, one sample: exact
    for name in K1.layer_names:
        assert_close(K1.block_dense(name), exact_block(model, MSE, X[:1], Y[:1], [f"{name}.weight", f"{name}.bias"]))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_one_sample_or_a_shared_input_makes_the_product_exact(activation):
    model = mlp(4, (6, 5), 3, activation=activation)
    X, y = classification_data(8, 4, 3)
    shared = X[:1].expand(8, 4).contiguous()  # one input, different labels
    for data in [(X[:1], y[:1]), (shared, y)]:
        K = KFAC(model, CE, data)
        for name in K.layer_names:
            names = [f"{name}.weight", f"{name}.bias"]
            assert_close(K.block_dense(name), exact_block(model, CE, *data, names))
        # the whole operator against the exact Hessian's block diagonal, as operators
        H = Hessian(model, CE, data, params=K.param_names)
        diff = (K - H).to_dense()
        scale = K.to_dense().abs().max()
        assert scale > 0
        for name in K.layer_names:
            s = K.layer_slice(name)
            assert diff[s, s].abs().max() <= 1e-12 * scale


# ------------------------------------------------------------ hand-computed factors
@pytest.mark.parametrize("curvature", ["exact", "ggn"])
def test_factors_equal_hand_computed_ones_for_a_two_layer_network(curvature):
    model = two_layer()
    X, y = classification_data(10, 4, 3)
    K = KFAC(model, CE, (X, y), curvature=curvature)
    W2 = model.fc2.weight.detach()
    z1 = model.fc1(X).detach()
    h = torch.tanh(z1)
    p = torch.softmax(model.fc2(h).detach(), dim=1)
    ones = torch.ones(10, 1, dtype=torch.float64)
    xt = torch.cat([X, ones], 1)
    ht = torch.cat([h, ones], 1)
    H_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, c, c)
    D = 1 - h**2  # tanh'
    M1 = D[:, :, None] * (W2.T @ H_out @ W2) * D[:, None, :]
    if curvature == "exact":  # + diag(tanh''(z1) ⊙ ∂ℓ/∂h) with ∂ℓ/∂h = W2ᵀ(p − e_y)
        g_h = (p - F.one_hot(y, 3).double()) @ W2
        M1 = M1 + torch.diag_embed(-2 * h * (1 - h**2) * g_h)
    expected = {
        "fc1": KronFactors(xt.T @ xt / 10, M1.mean(0)),
        "fc2": KronFactors(ht.T @ ht / 10, H_out.mean(0)),
    }
    assert K.layer_names == ["fc1", "fc2"]
    assert K.exact_layers == (["fc1"] if curvature == "exact" else [])
    for name, (A, B) in expected.items():
        assert_close(K.factors[name].A, A)
        assert_close(K.factors[name].B, B)
    assert K.num_data == 10


def test_M_at_the_logits_has_rank_c_minus_one():
    model = mlp(4, (6,), 5, activation="relu")
    X, y = classification_data(12, 4, 5)
    K = KFAC(model, CE, (X, y))
    M = K.sample_terms((X, y))["2"].M[:, 0]  # (n, 5, 5)
    ranks = torch.linalg.matrix_rank(M, hermitian=True)
    assert bool((ranks <= 4).all()) and bool((ranks == 4).all())
    B = K.factors["2"].B
    assert int(torch.linalg.matrix_rank(B, hermitian=True)) == 4
    assert torch.allclose(B @ torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), atol=1e-14)
    dom = dominant_eigenvalues(B, num_classes=5)
    assert isinstance(dom, DominantEigenvalues) and dom.count == 4 and dom.matches_classes


# ------------------------------------------------------------------- products
def test_grouped_product_matches_dense_kron_and_handles_missing_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False), nn.ReLU(), nn.Linear(2, 3)).double()
    X, y = classification_data(9, 3, 3)
    K = KFAC(model, CE, (X, y))
    assert K.param_names == ["0.weight", "0.bias", "2.weight", "4.weight", "4.bias"]
    blocks = []
    for name, (A, B) in K.factors.items():
        out, inp = layer_dims(model, name)
        bias = dict(model.named_modules())[name].bias is not None
        blocks.append(to_model_layout(torch.kron(B, A), out, inp, bias))
    D = torch.block_diag(*blocks)
    V = torch.randn(K.shape[0], 4, dtype=torch.float64)
    assert_close(K @ V, D @ V)
    assert_close(K @ V[:, 0], D @ V[:, 0])
    assert_close(K.to_dense(), D)
    assert_close(LinearOperator.to_dense(K), D)  # through products
    assert K.trace() == pytest.approx(float(torch.trace(D)), rel=1e-12)


def test_linear_layer_with_positions_uses_the_expand_convention():
    torch.manual_seed(1)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.head = nn.Linear(8, 3)

        def forward(self, x):  # x: (n, 4, 3)
            return self.head(torch.tanh(self.lin(x)).flatten(1))

    model = Seq().double().eval()
    X = torch.randn(6, 4, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    K = KFAC(model, CE, (X, y))
    A, B = K.factors["lin"]
    xt = torch.cat([X, torch.ones(6, 4, 1, dtype=torch.float64)], -1)
    assert_close(A, torch.einsum("jtc,jtd->cd", xt, xt) / (6 * 4))
    Bref = torch.zeros(2, 2, dtype=torch.float64)
    for j in range(6):
        z = model.lin(X[j : j + 1]).detach()  # (1, 4, 2)
        Mj = torch.func.hessian(lambda zz: F.cross_entropy(model.head(torch.tanh(zz).flatten(1)), y[j : j + 1]))(z)
        Mj = Mj.reshape(4, 2, 4, 2)
        Bref += sum(Mj[t, :, t, :] for t in range(4))
    assert_close(B, Bref / 6)


# --------------------------------------------------------------------- Conv2d
def _dense_conv_factors(model: TinyConv, X: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Both conventions from explicit patches and per-sample Hessians w.r.t. the whole
    output map: expand A = mean_j (1/P) Σ_t ũũᵀ, B = mean_j Σ_t M_j[t, t]; reduce
    A = mean_j ūūᵀ (mean patch ū), B = mean_j Σ_{t,t'} M_j[t, t']."""
    conv = model.conv
    k, s, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    N, C, K = X.shape[0], conv.out_channels, X.shape[1] * k * k + 1
    Ae, Be = torch.zeros(K, K, dtype=torch.float64), torch.zeros(C, C, dtype=torch.float64)
    Ar, Br = torch.zeros(K, K, dtype=torch.float64), torch.zeros(C, C, dtype=torch.float64)
    for j in range(N):
        xp = F.pad(X[j : j + 1], (pad,) * 4, mode=mode) if pad else X[j : j + 1]
        z = conv(X[j : j + 1]).detach()
        side = z.shape[-1]
        P = side * side
        Mj = torch.func.hessian(lambda zz: F.cross_entropy(model.fc(model.act(zz).flatten(1)), y[j : j + 1]))(z)
        Mj = Mj.reshape(C, P, C, P)
        ubar = torch.zeros(K, dtype=torch.float64)
        for a in range(side):
            for b in range(side):
                patch = xp[0, :, s * a : s * a + k, s * b : s * b + k].reshape(-1)
                u = torch.cat([patch, torch.ones(1, dtype=torch.float64)])
                Ae += torch.outer(u, u) / P
                Be += Mj[:, a * side + b, :, a * side + b]
                ubar += u / P
        Ar += torch.outer(ubar, ubar)
        Br += Mj.sum(dim=(1, 3))
    return {"expand": (Ae / N, Be / N), "reduce": (Ar / N, Br / N)}


@pytest.mark.parametrize("act, padding_mode", [(torch.tanh, "zeros"), (torch.relu, "reflect")])
def test_conv2d_factors_match_a_dense_computation(act, padding_mode):
    torch.manual_seed(0)
    model = TinyConv(act=act, padding_mode=padding_mode).double().eval()
    X = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (4,))
    dense = _dense_conv_factors(model, X, y)
    for approx in ["expand", "reduce"]:
        K = KFAC(model, CE, (X, y), kfac_approx=approx)
        assert K.exact_layers == (["conv"] if act is torch.tanh else [])
        A, B = dense[approx]
        assert_close(K.factors["conv"].A, A)
        assert_close(K.factors["conv"].B, B)
        assert K.layer_shape("conv") == (3, 2 * 9 + 1)
        if approx == "reduce":  # the bias block of B ⊗ A is the exact one
            Hb = exact_block(model, CE, X, y, ["conv.bias"])
            assert_close(K.block_dense("conv")[-3:, -3:], Hb)
        if act is torch.tanh:  # the exact M one direction at a time equals the batched one
            K._computer._exact.batched = False
            K.update()
            assert_close(K.factors["conv"].B, B)


def test_reduce_is_exact_when_each_samples_patches_are_equal():
    torch.manual_seed(3)
    model = TinyConv(padding=0, stride=1).double().eval()  # 3x3 output, 9 positions
    X = torch.randn(1, 2, 1, 1, dtype=torch.float64).expand(1, 2, 5, 5).contiguous()  # constant image
    y = torch.tensor([2])
    K = KFAC(model, CE, (X, y), kfac_approx="reduce")
    assert_close(K.block_dense("conv"), exact_block(model, CE, X, y, ["conv.weight", "conv.bias"]))
    Ke = KFAC(model, CE, (X, y))  # expand drops the cross-position terms here
    assert (Ke.block_dense("conv") - K.block_dense("conv")).abs().max() > 1e-6


def test_conv2d_with_one_position_and_one_sample_is_exact():
    torch.manual_seed(2)
    model = TinyConv(kernel=5, padding=0, stride=1).double().eval()  # output 1x1: a Linear in disguise
    X = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    y = torch.tensor([1])
    K = KFAC(model, CE, (X, y))
    for name in ["conv", "fc"]:
        assert_close(K.block_dense(name), exact_block(model, CE, X, y, [f"{name}.weight", f"{name}.bias"]))


# ------------------------------------------------------------ spectra and functions
def _dense_and_K():
    model = mlp(4, (6,), 3, activation="relu")
    X, y = classification_data(20, 4, 3)
    K = KFAC(model, CE, (X, y))
    return K, K.to_dense()


def test_eigenvalues_topk_and_power_against_dense():
    K, D = _dense_and_K()
    lam_dense = torch.linalg.eigvalsh(D).flip(0)
    assert_close(K.eigenvalues(), lam_dense, 1e-10)
    per = K.eigenvalues(per_layer=True)
    assert set(per) == set(K.layer_names)
    for name in K.layer_names:
        s = K.layer_slice(name)
        blk = D[s, s]
        assert_close(per[name], torch.linalg.eigvalsh(blk).flip(0), 1e-10)
        values, vecs = K.topk(name, 4)
        assert_close(values, torch.linalg.eigvalsh(blk).flip(0)[:4], 1e-10)
        assert_close(vecs.T @ vecs, torch.eye(4, dtype=torch.float64), 1e-12)
        assert_close(blk @ vecs, vecs * values, 1e-10)  # eigenpairs of the block
        # rank one when reshaped to the augmented weight
        out, inp = layer_dims(K.model, name)
        lr = eigenvector_low_rank(vecs, (out, inp))
        np.testing.assert_allclose(lr.top_share, 1.0, atol=1e-12)
        np.testing.assert_allclose(lr.stable_rank, 1.0, atol=1e-12)
    damping = 1e-2
    n = D.shape[0]
    I = torch.eye(n, dtype=torch.float64)
    V = torch.randn(n, 3, dtype=torch.float64)
    inv = K.power(-1, damping=damping)
    assert_close(inv @ V, torch.linalg.solve(D + damping * I, V), 1e-9)
    assert_close(K.inverse(damping) @ ((D + damping * I) @ V), V, 1e-9)
    lam, U = torch.linalg.eigh(D)
    sqrt = (U * (lam.clamp_min(0) + 0.1).sqrt()) @ U.T
    assert_close(K.power(0.5, damping=0.1).to_dense(), sqrt, 1e-10)
    half = K.power(0.5)
    assert_close(half @ (half @ V), D @ V, 1e-10)
    assert_close(K.power(2.0) @ V, D @ (D @ V), 1e-10)


def test_kfac_and_exact_top_eigenspaces_coincide_when_exact():
    model = mlp(4, (6,), 3, activation="relu")
    X, y = classification_data(1, 4, 3)
    K = KFAC(model, CE, (X, y))
    for name in K.layer_names:
        _, U = K.topk(name, 2)
        Hd = layer_hessian(model, CE, (X, y), name).to_dense()
        lam, V = torch.linalg.eigh(Hd)
        assert eigenspace_overlap(U, V[:, -2:]) == pytest.approx(1.0, abs=1e-9)


def test_layer_hessian_is_the_exact_block():
    model = mlp(4, (6,), 3, activation="tanh")
    X, y = classification_data(10, 4, 3)
    H = layer_hessian(model, CE, (X, y), "0")
    assert isinstance(H, Hessian) and H.param_names == ["0.weight", "0.bias"]
    assert_close(H.to_dense(), exact_block(model, CE, X, y, ["0.weight", "0.bias"]), 1e-10)
    H2 = layer_hessian(model, CE, (X, y), model[2])
    assert H2.shape == (3 * 7, 3 * 7)


# ------------------------------------------------------------- data and layers
def test_batches_are_weighted_by_size_and_dtype_casts():
    model = mlp(4, (6,), 3, activation="tanh", dtype=torch.float32)
    X, y = classification_data(13, 4, 3)
    full = KFAC(model, CE, (X, y), dtype=torch.float64)
    parts = KFAC(model, CE, [(X[:5], y[:5]), (X[5:12], y[5:12]), (X[12:], y[12:])], dtype=torch.float64)
    assert full.dtype == torch.float64 and parts.num_data == 13
    for name in full.layer_names:
        assert_close(parts.factors[name].A, full.factors[name].A)
        assert_close(parts.factors[name].B, full.factors[name].B)
    K32 = KFAC(model, CE, (X.float(), y))
    assert K32.dtype == torch.float32
    v = torch.randn(K32.shape[0])
    assert torch.allclose((K32 @ v).double(), full @ v.double(), rtol=1e-4, atol=1e-5)


def test_layer_selection_by_name_module_and_glob():
    model = mlp(4, (6, 5), 3, activation="relu")
    X, y = classification_data(6, 4, 3)
    K = KFAC(model, CE, (X, y), layers="2")
    assert K.layer_names == ["2"] and K.param_names == ["2.weight", "2.bias"] and K.shape == (35, 35)
    assert KFAC(model, CE, (X, y), layers=[model[4], "0"]).layer_names == ["0", "4"]
    assert KFAC(model, CE, (X, y), layers="[24]").layer_names == ["2", "4"]
    full = KFAC(model, CE, (X, y))
    sub = KFAC(model, CE, (X, y), layers="4")
    assert_close(sub.factors["4"].B, full.factors["4"].B)
    assert full.layer_slice("4") == slice(30 + 35, 30 + 35 + 18)


def test_unsupported_layers_are_skipped_with_one_warning():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.norm = nn.LayerNorm(6)
            self.attn = nn.MultiheadAttention(3, 1, batch_first=True)
            self.shared = nn.Linear(3, 3)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            h = self.norm(torch.relu(self.fc(x))).reshape(-1, 2, 3)
            h = self.attn(h, h, h, need_weights=False)[0]
            h = self.shared(torch.relu(self.shared(h)))  # called twice
            return self.head(h.reshape(-1, 6))

    torch.manual_seed(0)
    model = Mixed().double().eval()
    X, y = classification_data(5, 4, 3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        K = KFAC(model, CE, (X, y))
    msgs = [str(w.message) for w in rec if "KFAC: skipped" in str(w.message)]
    assert len(msgs) == 1
    for name in ["norm", "attn", "attn.out_proj", "shared"]:
        assert repr(name) in msgs[0]
    assert K.layer_names == ["fc", "head"]
    assert set(K.skipped) == {"norm", "attn", "attn.out_proj", "shared"}
    with pytest.raises(HesslabError, match="norm"):
        KFAC(model, CE, (X, y), layers="norm")


def test_model_with_batchnorm_in_eval_mode_skips_bn_and_stays_exact_for_one_sample():
    model = mlp(4, (6,), 3, batchnorm=True, activation="relu")
    X, y = classification_data(1, 4, 3)
    with pytest.warns(UserWarning, match="BatchNorm1d"):
        K = KFAC(model, CE, (X, y))
    assert K.param_names == ["0.weight", "0.bias", "3.weight", "3.bias"]
    for name in K.layer_names:
        assert_close(K.block_dense(name), exact_block(model, CE, X, y, [f"{name}.weight", f"{name}.bias"]))


def test_bad_input_raises_hesslab_errors():
    model = mlp(4, (6,), 3)
    X, y = classification_data(6, 4, 3)
    with pytest.raises(HesslabError, match="loss_type"):
        KFAC(model, lambda o, t: F.cross_entropy(o, t), (X, y))
    with pytest.raises(HesslabError, match="loss_fn"):  # claimed cross-entropy, computes something else
        KFAC(model, lambda o, t: 2 * F.cross_entropy(o, t), (X, y), loss_type="cross_entropy")
    KFAC(model, lambda o, t: F.cross_entropy(o, t), (X, y), loss_type="cross_entropy")  # accepted
    with pytest.raises(HesslabError, match="reduction"):
        KFAC(model, nn.MSELoss(reduction="sum"), regression_data(6, 4, 3))
    with pytest.raises(HesslabError, match="weight"):
        KFAC(model, nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64)), (X, y))
    with pytest.raises(HesslabError, match="ignore_index"):
        KFAC(model, CE, (X, torch.tensor([0, 1, -100, 2, 0, 1])))
    with pytest.raises(HesslabError, match="layers"):
        KFAC(model, CE, (X, y), layers="nope")
    with pytest.raises(HesslabError, match="curvature"):
        KFAC(model, CE, (X, y), curvature="fisher")
    with pytest.raises(HesslabError, match="shape"):
        KFAC(model, MSE, (X, torch.zeros(6, 2, dtype=torch.float64)))
    K = KFAC(model, CE, (X, y))
    with pytest.raises(HesslabError, match="k"):
        K.topk("0", 0)
    with pytest.raises(HesslabError, match="layer"):
        K.topk("1", 2)
    with pytest.raises(HesslabError, match="damping"):
        K.power(-1)  # B of the logits has rank c - 1: singular without damping
    with pytest.raises(HesslabError):
        K @ torch.zeros(3)
    with pytest.raises(HesslabError, match="layer"):
        layer_hessian(model, CE, (X, y), None)


# ------------------------------------------------------------------- overlaps
def test_overlap_is_one_for_the_same_space_and_symmetric():
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(30, 6, generator=g, dtype=torch.float64)).Q
    R = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64)).Q
    assert eigenspace_overlap(Q, Q @ R) == pytest.approx(1.0, abs=1e-12)  # another basis, same space
    U = torch.linalg.qr(torch.randn(30, 6, generator=g, dtype=torch.float64)).Q
    assert eigenspace_overlap(Q, U) == pytest.approx(eigenspace_overlap(U, Q), abs=1e-15)
    assert eigenspace_overlap(Q[:, :2], U) == pytest.approx(eigenspace_overlap(U, Q[:, :2]), abs=1e-15)
    assert eigenspace_overlap(Q[:, :2], Q) == pytest.approx(1.0, abs=1e-12)  # contained
    E = torch.eye(30, dtype=torch.float64)
    assert eigenspace_overlap(E[:, :3], E[:, 3:6]) == 0.0
    R3 = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64)).Q
    Q2 = Q @ torch.block_diag(R3, torch.eye(3, dtype=torch.float64))  # rotates within the top 3
    curve = overlap_curve(Q, Q2)
    assert isinstance(curve, OverlapCurve) and curve.ks.tolist() == [1, 2, 3, 4, 5, 6]
    direct = [eigenspace_overlap(Q[:, :k], Q2[:, :k]) for k in range(1, 7)]
    np.testing.assert_allclose(curve.overlaps, direct, atol=1e-14)
    np.testing.assert_allclose(curve.overlaps[2:], 1.0, atol=1e-12)
    assert curve.overlaps[0] < 1 - 1e-6
    c2 = overlap_curve(Q, U, ks=[2, 4])
    assert c2.at(4) == pytest.approx(eigenspace_overlap(Q[:, :4], U[:, :4]), abs=1e-14)
    np.testing.assert_allclose(c2.random_baseline, [2 / 30, 4 / 30])


def test_overlap_of_random_spaces_is_k_over_n_in_expectation():
    n, k, trials = 40, 4, 400
    g = torch.Generator().manual_seed(3)
    vals = []
    for _ in range(trials):
        U = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
        vals.append(eigenspace_overlap(U, V))
    vals = np.array(vals)
    se = vals.std(ddof=1) / math.sqrt(trials)
    assert abs(vals.mean() - k / n) < 4 * se, (vals.mean(), k / n, se)


def test_overlap_and_low_rank_inputs_are_checked():
    with pytest.raises(HesslabError, match="orthonormal"):
        eigenspace_overlap(torch.ones(5, 2), torch.eye(5)[:, :2])
    with pytest.raises(HesslabError, match="dimensions"):
        eigenspace_overlap(torch.eye(5)[:, :2], torch.eye(4)[:, :2])
    with pytest.raises(HesslabError, match="ks"):
        overlap_curve(torch.eye(5)[:, :2], torch.eye(5)[:, :2], ks=[3])
    with pytest.raises(HesslabError, match="length"):
        eigenvector_low_rank(torch.ones(7), (2, 3))
    # weight-then-bias layout: the bias is the last column
    W = torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0]])
    b = torch.tensor([3.0, 6.0])
    v = torch.cat([W.reshape(-1), b])
    lr = eigenvector_low_rank(v, (2, 3))
    assert lr.shape == (2, 4) and lr.top_share == pytest.approx(1.0) and lr.stable_rank == pytest.approx(1.0)
    lr2 = eigenvector_low_rank(v, (2, 3), layout="augmented")
    assert lr2.top_share < 1.0 and lr2.stable_rank > 1.0
    M = torch.eye(3)
    lr3 = eigenvector_low_rank(M.reshape(-1), (3, 3))
    assert lr3.top_share == pytest.approx(1 / 3) and lr3.stable_rank == pytest.approx(3.0)
    conv = eigenvector_low_rank(torch.randn(4 * 2 * 3 * 3 + 4, 2), (4, 2, 3, 3))
    assert conv.shape == (4, 19) and conv.singular_values.shape == (2, 4)


def test_dominant_eigenvalues_rule():
    lam = np.array([10.0, 9.0, 8.0, 0.5, 0.4, 0.3, 1e-20])
    d = dominant_eigenvalues(lam, num_classes=3)
    assert d.count == 6  # 0.3 / (1e-12 · 10): the gap to the numerical zero is the largest
    d = dominant_eigenvalues(lam, num_classes=3, max_count=5)
    assert d.count == 3 and d.matches_classes
    d2 = dominant_eigenvalues(np.array([10.0, 9.0, 8.0, 0.5, 0.4, 0.3, 0.0]), max_count=5)
    assert d2.count == 3
    with pytest.raises(HesslabError, match="positive"):
        dominant_eigenvalues(-np.eye(3))


def test_kfac_overlap_between_two_seeds_and_result_roundtrip(tmp_path):
    X, y = classification_data(20, 4, 3)
    K1 = KFAC(mlp(4, (6,), 3, activation="relu", seed=0), CE, (X, y))
    K2 = KFAC(mlp(4, (6,), 3, activation="relu", seed=1), CE, (X, y))
    curves = kfac_overlap(K1, K2, 3)
    assert set(curves) == {"0", "2"}
    for c in curves.values():
        assert c.overlaps.shape == (3,) and np.all((c.overlaps >= -1e-12) & (c.overlaps <= 1 + 1e-12))
    same = kfac_overlap(K1, K1, 3)
    np.testing.assert_allclose(same["0"].overlaps, 1.0, atol=1e-10)
    path = curves["0"].save(tmp_path / "c.json")
    back = OverlapCurve.load(path)
    np.testing.assert_allclose(back.overlaps, curves["0"].overlaps)
    import matplotlib

    matplotlib.use("Agg")
    curves["0"].plot()
    dominant_eigenvalues(K1.factors["2"].B, num_classes=3).plot()


# ------------------------------------------------- the parts KFAC is composed of
def test_kronecker_block_diagonal_operator_on_its_own():
    from hesslab.linops.kfac._kronecker import KroneckerBlockDiagonal

    g = torch.Generator().manual_seed(8)

    def spd(m: int) -> Tensor:
        R = torch.randn(m, m, generator=g, dtype=torch.float64)
        return R @ R.T + 0.1 * torch.eye(m, dtype=torch.float64)

    A, B = [spd(3), spd(2)], [spd(4), spd(5)]
    K = KroneckerBlockDiagonal(A, B, psd_B=[True, True], names=["a", "b"])
    D = torch.block_diag(torch.kron(B[0], A[0]), torch.kron(B[1], A[1]))
    assert K.shape == (22, 22)
    V = torch.randn(22, 3, generator=g, dtype=torch.float64)
    assert_close(K @ V, D @ V)
    assert_close(K.to_dense(), D)
    assert K.trace() == pytest.approx(float(torch.trace(D)), rel=1e-12)
    lam = torch.linalg.eigvalsh(D)
    assert_close(torch.cat(K.eigenvalues()).sort().values, lam, 1e-10)
    values, vecs = K.topk(1, 3)
    assert_close(vecs.T @ torch.kron(B[1], A[1]) @ vecs, torch.diag(values), 1e-10)
    inv = K.function(-1.0, 0.5)
    assert_close(inv @ ((D + 0.5 * torch.eye(22, dtype=torch.float64)) @ V), V, 1e-9)
    with pytest.raises(HesslabError, match="finite"):
        K.function(float("nan"), 0.0)


def test_layer_rules_and_layout_permutation():
    from hesslab.linops.kfac._layers import layer_perm
    from hesslab.linops.kfac._math import RULES, augment

    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    rows = RULES["conv2d"].input_rows(conv, x)  # (n, P, C_in·kh·kw)
    assert rows.shape == (4, 25, 18)
    out = conv(x)
    z = rows @ conv.weight.reshape(3, -1).T + conv.bias  # the conv as a Linear on patches
    assert_close(RULES["conv2d"].output_rows(out), z)
    assert_close(RULES["conv2d"].rows_to_output(z, out.shape), out)
    aug = augment(rows, bias=True, reduce=True)
    assert aug.shape == (4, 1, 19) and torch.all(aug[..., -1] == 1)
    perm = layer_perm(2, 3, True)  # W̃ (2, 4) row-major -> [W (2·3), b (2)]
    assert perm.tolist() == [0, 1, 2, 6, 3, 4, 5, 7]


def test_kfac_first_batch_mistakes():
    model = mlp(4, (6,), 3)
    X, y = classification_data(6, 4, 3)
    with pytest.raises(HesslabError, match=r"data.*\(6, 5\).*4 input features"):
        KFAC(model, CE, (torch.randn(6, 5, dtype=torch.float64), y))
    with pytest.raises(HesslabError, match="data.*float16"):
        KFAC(model, CE, (X.half(), y))
    with pytest.raises(HesslabError, match="loss_fn.*differentiabl"):
        KFAC(model, lambda o, t: F.cross_entropy(o.detach(), t), (X, y), loss_type="cross_entropy")


def test_topk_returns_a_result_that_unpacks_and_saves(tmp_path):
    """K.topk gives a result object like every solver (issue 18): named fields, save/load,
    and it still unpacks as (values, vectors)."""
    from hesslab.linops import KronEigenpairs

    model = mlp()
    X, y = classification_data(20)
    K = KFAC(model, CE, (X, y), dtype=torch.float64)
    name = K.layer_names[0]
    res = K.topk(name, 3)
    assert isinstance(res, KronEigenpairs) and res.layer == name
    values, vecs = res
    assert torch.equal(values, res.eigenvalues) and torch.equal(vecs, res.eigenvectors)
    block = K.block_dense(name)
    assert torch.allclose(block @ vecs, vecs * values, atol=1e-10)
    back = KronEigenpairs.load(res.save(tmp_path / "top.npz"))
    assert back.layer == name
    np.testing.assert_array_equal(np.asarray(back.eigenvalues), values.numpy())
