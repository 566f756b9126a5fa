"""Tests for hesslab.analysis.rank: numerical rank and the deep-linear-network rank formulas.

The formulas are checked against the numerical rank of dense float64 Hessians of random
deep linear networks built with torch.func: H = ∇²L of the sample-mean loss, the
outer-product part H_O = (1/N) Σ_j J_jᵀ ∇²ℓ_j J_j and the functional part H_F = H − H_O.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.func import hessian, jacrev

from hesslab.analysis.rank import LinearRankPrediction, RankResult, linear_network_rank, numerical_rank
from hesslab.errors import HesslabError



# --------------------------------------------------------------------------------------
# Dense Hessians of deep linear networks
# --------------------------------------------------------------------------------------


@dataclass
class Hessians:
    H: torch.Tensor  # (P, P) Hessian of the sample-mean loss
    H_O: torch.Tensor  # (P, P) outer-product (Gauss–Newton) part
    H_F: torch.Tensor  # (P, P) H − H_O
    H_F_direct: torch.Tensor  # (P, P) (1/N) Σ_j Σ_k ∂ℓ_j/∂f_k ∇²f_k(x_j), built on its own


def linear_network_hessians(
    widths: list[int], num_samples: int, loss: str, bias: bool, seed: int, input_rank: int | None = None
) -> Hessians:
    """Float64 Hessians of ``f(x) = W_L(⋯(W_1 x + b_1)⋯) + b_L`` at a random point.

    Parameters are flattened as ``[vec(W_1), b_1, vec(W_2), b_2, …]`` (biases only when
    ``bias``); inputs are Gaussian (rank ``input_rank`` when given), MSE targets Gaussian,
    cross-entropy labels uniform.
    """
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    d, k_out = widths[0], widths[-1]
    shapes: list[tuple[int, ...]] = []
    for i in range(len(widths) - 1):
        shapes.append((widths[i + 1], widths[i]))
        if bias:
            shapes.append((widths[i + 1],))
    sizes = [int(np.prod(s)) for s in shapes]
    theta = torch.cat(
        [torch.randn(n, generator=g, dtype=dt) / (s[1] ** 0.5 if len(s) == 2 else 1.0) for s, n in zip(shapes, sizes)]
    )
    if input_rank is None:
        x = torch.randn(num_samples, d, generator=g, dtype=dt)
    else:
        x = torch.randn(num_samples, input_rank, generator=g, dtype=dt) @ torch.randn(
            input_rank, d, generator=g, dtype=dt
        )

    def f(th: torch.Tensor) -> torch.Tensor:  # (N, K)
        parts = torch.split(th, sizes)
        h, i = x, 0
        while i < len(parts):
            h = h @ parts[i].reshape(shapes[i]).T
            i += 1
            if bias:
                h = h + parts[i]
                i += 1
        return h

    out = f(theta).detach()
    if loss == "mse":
        y = torch.randn(num_samples, k_out, generator=g, dtype=dt)

        def total(th: torch.Tensor) -> torch.Tensor:
            return 0.5 * ((f(th) - y) ** 2).sum(1).mean()

        q = torch.eye(k_out, dtype=dt).expand(num_samples, k_out, k_out)
        delta = out - y
    else:
        labels = torch.randint(0, k_out, (num_samples,), generator=g)

        def total(th: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(f(th), labels)

        p = out.softmax(1)
        q = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # softmax Hessian in the logits
        delta = p - torch.nn.functional.one_hot(labels, k_out).to(dt)

    H = hessian(total)(theta)
    J = jacrev(f)(theta)  # (N, K, P)
    H_O = torch.einsum("nkp,nkl,nlq->pq", J, q, J) / num_samples
    H_F_direct = hessian(lambda th: (delta * f(th)).sum() / num_samples)(theta)
    return Hessians(H=H, H_O=H_O, H_F=H - H_O, H_F_direct=H_F_direct)


# Widths [d, M_1, ..., M_{L-1}, K]: wide layers, bottlenecks narrower than both d and K,
# bottlenecks in the middle and at the end, K > d and K < d.
NO_BIAS_WIDTHS = [
    [5, 2, 4],  # L=2, bottleneck < K < d
    [4, 6, 3],  # L=2, wide
    [3, 4, 5],  # L=2, K > d
    [6, 2, 3, 4],  # L=3, bottleneck first
    [5, 4, 3, 2],  # L=3, narrowing
    [4, 6, 5, 3],  # L=3, wide
    [7, 3, 6, 2, 5],  # L=4, bottleneck before the output
    [5, 6, 2, 6, 4],  # L=4, bottleneck in the middle
    [8, 3, 4, 3, 3],  # L=4
]


def _cases(widths_list: list[list[int]]):
    for widths in widths_list:
        d = widths[0]
        for n in (2, d - 1, d + 3):  # N below and above d
            for loss in ("mse", "cross_entropy"):
                yield widths, n, loss, None
        yield widths, 2 * d, "mse", 2  # low-rank inputs, N > d
        yield widths, 2 * d, "cross_entropy", 2


NO_BIAS_CASES = list(_cases(NO_BIAS_WIDTHS))


def _assert_rank(matrix: torch.Tensor, expected: int, what: str) -> None:
    res = numerical_rank(matrix)
    assert res.rank == expected, (
        f"{what}: numerical rank {res.rank}, formula {expected}; singular values near the threshold "
        f"{res.near_threshold} (threshold {res.threshold:.3g})"
    )
    if 0 < res.rank < res.singular_values.size:
        assert res.gap > 1e6, f"{what}: no clear gap at the threshold: {res.near_threshold}"


@pytest.mark.parametrize("widths,n,loss,input_rank", NO_BIAS_CASES, ids=lambda v: str(v))
def test_linear_network_rank_matches_dense_hessian(widths, n, loss, input_rank):
    seed = NO_BIAS_CASES.index((widths, n, loss, input_rank))
    hs = linear_network_hessians(widths, n, loss, bias=False, seed=seed, input_rank=input_rank)
    scale = hs.H.abs().max()
    torch.testing.assert_close(hs.H_F, hs.H_F_direct, atol=1e-12 * scale, rtol=0)
    pred = linear_network_rank(widths, n, input_rank=input_rank, loss=loss)
    assert pred.num_params == hs.H.shape[0]
    _assert_rank(hs.H, pred.rank_H_L, "H_L")
    _assert_rank(hs.H_O, pred.rank_H_O, "H_O")
    _assert_rank(hs.H_F, pred.rank_H_F, "H_F = H - H_O")
    _assert_rank(hs.H_F_direct, pred.rank_H_F, "H_F (direct)")


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("n", [3, 9])
def test_single_layer_has_no_functional_part(n, loss):
    widths = [5, 4]
    hs = linear_network_hessians(widths, n, loss, bias=False, seed=n)
    pred = linear_network_rank(widths, n, loss=loss)
    assert pred.rank_H_F == 0 and pred.rank_H_L == pred.rank_H_O
    assert hs.H_F_direct.abs().max() == 0
    assert hs.H_F.abs().max() < 1e-12 * hs.H.abs().max()
    _assert_rank(hs.H, pred.rank_H_L, "H_L")
    _assert_rank(hs.H_O, pred.rank_H_O, "H_O")


def test_paper_special_cases():
    # L = 2: rank H_F = 2 s M_1, whatever the bottleneck.
    for d, m1, k, n in itertools.product([3, 6], [1, 2, 5], [2, 4], [2, 10]):
        for loss in ("mse", "cross_entropy"):
            p = linear_network_rank([d, m1, k], n, loss=loss)
            assert p.rank_H_F == 2 * p.s * m1
    # rank H_L <= rank H_O + rank H_F, and everything within the parameter count.
    p = linear_network_rank([8, 6, 6, 5], 100)
    assert p.r == 8 and p.k_eff == 5 and p.s == 5 and p.q == 5
    assert p.rank_H_O == 5 * (8 + 5 - 5)
    assert p.rank_H_F == 2 * 5 * 12 + 2 * 5 * 5 - 3 * 25
    assert p.rank_H_L <= p.rank_H_O + p.rank_H_F <= 2 * p.num_params
    assert p.num_params == 8 * 6 + 6 * 6 + 6 * 5
    assert linear_network_rank([8, 6, 6, 5], 100, loss="cross_entropy").k_eff == 4


# --------------------------------------------------------------------------------------
# With biases: H_O for every depth, H_F and H_L for L <= 2
# --------------------------------------------------------------------------------------

BIAS_WIDTHS = [
    [4, 3],  # L=1
    [5, 2, 4],
    [4, 6, 3],
    [3, 4, 5],
    [6, 2, 3, 4],
    [4, 6, 5, 3],
    [7, 3, 6, 2, 5],
    [5, 6, 2, 6, 4],
]


def _bias_cases():
    for widths in BIAS_WIDTHS:
        d = widths[0]
        for n in (2, d, d + 1, 2 * d + 3):  # r = N (ones in the row space of X) and r < N
            for loss in ("mse", "cross_entropy"):
                yield widths, n, loss, None
        yield widths, 2 * d, "mse", 2
        yield widths, 2 * d, "cross_entropy", 2


BIAS_CASES = list(_bias_cases())


@pytest.mark.parametrize("widths,n,loss,input_rank", BIAS_CASES, ids=lambda v: str(v))
def test_linear_network_rank_with_bias(widths, n, loss, input_rank):
    seed = 1000 + BIAS_CASES.index((widths, n, loss, input_rank))
    hs = linear_network_hessians(widths, n, loss, bias=True, seed=seed, input_rank=input_rank)
    num_layers = len(widths) - 1
    parts = ("H_O", "H_F", "H_L") if num_layers <= 2 else ("H_O",)
    pred = linear_network_rank(widths, n, input_rank=input_rank, loss=loss, bias=True, parts=parts)
    assert pred.num_params == hs.H.shape[0]
    _assert_rank(hs.H_O, pred.rank_H_O, "H_O (bias)")
    if num_layers == 1:
        assert pred.rank_H_F == 0 and pred.rank_H_L == pred.rank_H_O
        assert hs.H_F_direct.abs().max() == 0
        _assert_rank(hs.H, pred.rank_H_L, "H_L (bias)")
    elif num_layers == 2:
        _assert_rank(hs.H, pred.rank_H_L, "H_L (bias)")
        _assert_rank(hs.H_F, pred.rank_H_F, "H_F (bias)")
        _assert_rank(hs.H_F_direct, pred.rank_H_F, "H_F direct (bias)")
    else:
        assert pred.rank_H_F is None and pred.rank_H_L is None


def test_bias_conjecture_for_n_greater_than_d():
    # SCIENCE.md: for N > d, rank H_O = q (r + K' - q) + K'.
    for widths in ([5, 2, 4], [4, 6, 5, 3], [6, 3, 2, 3, 4]):
        for loss in ("mse", "cross_entropy"):
            p = linear_network_rank(widths, widths[0] + 4, loss=loss, bias=True, parts=("H_O",))
            assert p.rank_H_O == p.q * (p.r + p.k_eff - p.q) + p.k_eff


def test_bias_unsupported_parts_raise():
    with pytest.raises(HesslabError, match="H_F and rank H_L"):
        linear_network_rank([4, 3, 3, 2], 10, bias=True)
    with pytest.raises(HesslabError, match="parts=\\('H_O',\\)"):
        linear_network_rank([4, 3, 3, 2], 10, bias=True, parts=("H_O", "H_L"))
    p = linear_network_rank([4, 3, 3, 2], 10, bias=True, parts="H_O")
    assert p.rank_H_O is not None and p.rank_H_F is None and p.rank_H_L is None


# --------------------------------------------------------------------------------------
# Argument checks and serialisation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(widths=[4], num_samples=3), "widths"),
        (dict(widths=[], num_samples=3), "widths"),
        (dict(widths=[4, 0, 2], num_samples=3), r"widths\[1\]"),
        (dict(widths=[4, 2.5, 2], num_samples=3), r"widths\[1\]"),
        (dict(widths="42", num_samples=3), "widths"),
        (dict(widths=[4, True, 2], num_samples=3), r"widths\[1\]"),
        (dict(widths=[4, 2], num_samples=0), "num_samples"),
        (dict(widths=[4, 2], num_samples=3, loss="hinge"), "loss"),
        (dict(widths=[4, 1], num_samples=3, loss="cross_entropy"), "K >= 2"),
        (dict(widths=[4, 2], num_samples=3, input_rank=4), "input_rank"),
        (dict(widths=[4, 2], num_samples=3, input_rank=0), "input_rank"),
        (dict(widths=[4, 2], num_samples=3, bias="yes"), "bias"),
        (dict(widths=[4, 2], num_samples=3, parts=("H",)), "parts"),
        (dict(widths=[4, 2], num_samples=3, parts=()), "parts"),
    ],
)
def test_linear_network_rank_validation(kwargs, match):
    with pytest.raises(HesslabError, match=match):
        linear_network_rank(**kwargs)


def test_linear_rank_prediction_roundtrip(tmp_path):
    p = linear_network_rank([6, 3, 4, 5], 20, loss="cross_entropy")
    for name in ("p.json", "p.npz"):
        back = LinearRankPrediction.load(p.save(tmp_path / name))
        assert back == p
    q = linear_network_rank([6, 3, 4, 5], 20, bias=True, parts=("H_O",))
    assert LinearRankPrediction.load(q.save(tmp_path / "q.json")) == q


# --------------------------------------------------------------------------------------
# numerical_rank
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,n,k", [(30, 30, 7), (40, 25, 25), (25, 40, 12), (50, 50, 0), (1, 10, 1), (60, 20, 19)])
def test_numerical_rank_matches_numpy(m, n, k):
    rng = np.random.default_rng(m * 100 + n + k)
    a = rng.standard_normal((m, k)) @ rng.standard_normal((k, n)) * 10.0 ** rng.uniform(-3, 3)
    res = numerical_rank(a)
    assert res.rank == np.linalg.matrix_rank(a) == k
    assert res.shape == (m, n)
    sv = np.linalg.svd(a, compute_uv=False)
    np.testing.assert_allclose(res.singular_values, sv, rtol=0, atol=1e-12 * sv[0] if sv.size else 0)
    assert np.all(np.diff(res.singular_values) <= 0)
    assert res.threshold == pytest.approx(sv[0] * max(m, n) * np.finfo(np.float64).eps, rel=1e-12)
    # The neighbourhood of the threshold: up to 10 kept and 10 dropped values.
    start = max(0, k - 10)
    assert res.near_threshold_start == start
    np.testing.assert_array_equal(res.near_threshold, res.singular_values[start : k + 10])
    assert np.sum(res.near_threshold > res.threshold) == min(k, 10)


def test_numerical_rank_symmetric_and_torch():
    rng = np.random.default_rng(0)
    b = rng.standard_normal((40, 9))
    h = b @ np.diag(rng.uniform(-2, 2, 9)) @ b.T  # indefinite, rank 9
    res = numerical_rank(torch.from_numpy(h))
    assert res.rank == 9 == np.linalg.matrix_rank(h, hermitian=True)
    assert res.gap > 1e10
    assert numerical_rank(torch.from_numpy(h).T.contiguous().T).rank == 9  # non-contiguous view
    assert numerical_rank(torch.from_numpy(h).to_sparse()).rank == 9


def test_numerical_rank_tol():
    a = np.diag([10.0, 1.0, 1e-3, 1e-6, 1e-9, 0.0])
    assert numerical_rank(a).rank == 5
    assert numerical_rank(a, tol=1e-4).rank == 3
    assert numerical_rank(a, tol=1e-3).rank == 2  # strictly above the threshold
    assert numerical_rank(a, tol=0).rank == 5
    assert numerical_rank(a, tol=100).rank == 0
    r = numerical_rank(a, tol=1e-4)
    assert r.threshold == 1e-4
    assert r.gap == pytest.approx(1e3)
    np.testing.assert_array_equal(r.near_threshold, [10.0, 1.0, 1e-3, 1e-6, 1e-9, 0.0])
    for bad in (-1.0, float("nan"), float("inf"), "1e-3", True):
        with pytest.raises(HesslabError, match="tol"):
            numerical_rank(a, tol=bad)


def test_numerical_rank_float32_is_computed_in_float64():
    # Singular values 1 and 1e-6 (both held exactly enough in float32): a float32
    # computation's threshold, 50 * eps32 ≈ 6e-6, would drop the second.
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    d = np.zeros((50, 50), dtype=np.float32)
    d[0, 0], d[1, 1] = 1.0, 1e-6
    assert np.linalg.matrix_rank(d) == 1  # numpy in float32
    for x in (d, torch.from_numpy(d)):
        res = numerical_rank(x)
        assert res.rank == 2
        assert res.singular_values.dtype == np.float64
    # A rotated float32 matrix: our singular values are float64 ones of the stored values.
    a32 = (u[:, :3] * [1.0, 1e-3, 1e-6]) @ u[:, 3:6].T
    a32 = a32.astype(np.float32)
    res = numerical_rank(torch.from_numpy(a32))
    np.testing.assert_allclose(
        res.singular_values, np.linalg.svd(a32.astype(np.float64), compute_uv=False), rtol=0, atol=1e-15
    )
    assert res.rank == np.linalg.matrix_rank(a32.astype(np.float64)) > np.linalg.matrix_rank(a32)


class _DenseOperator:
    """Stand-in for a hesslab linear operator: only ``to_dense()``."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix

    def to_dense(self) -> torch.Tensor:
        return self.matrix


def test_numerical_rank_operator():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(20, 4, generator=g, dtype=torch.float64)
    res = numerical_rank(_DenseOperator(b @ b.T))
    assert res.rank == 4
    assert res.singular_values.dtype == np.float64


def test_numerical_rank_edge_cases(tmp_path):
    assert numerical_rank(np.zeros((4, 4))).rank == 0
    assert numerical_rank(np.zeros((0, 3))).rank == 0
    assert numerical_rank(np.eye(1)).rank == 1
    r = numerical_rank(np.ones((3, 5)))
    assert r.rank == 1 and r.gap > 1e10
    for name in ("r.json", "r.npz"):
        back = RankResult.load(r.save(tmp_path / name))
        assert back.rank == r.rank and back.shape == r.shape and back.threshold == r.threshold
        np.testing.assert_array_equal(back.singular_values, r.singular_values)
        np.testing.assert_array_equal(back.near_threshold, r.near_threshold)


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.ones(3), "2-D"),
        (np.ones((2, 2, 2)), "2-D"),
        (np.array([[1.0, np.nan]]), "NaN"),
        (np.array([[1.0, np.inf]]), "NaN or infinite"),
        (np.ones((2, 2), dtype=complex), "complex"),
        (torch.ones(2, 2, dtype=torch.complex64), "complex"),
        ("matrix", "numeric"),
        (object(), "numeric"),
    ],
)
def test_numerical_rank_bad_input(bad, match):
    with pytest.raises(HesslabError, match=match):
        numerical_rank(bad)


def test_rank_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 6)) @ rng.standard_normal((6, 30))
    ax = numerical_rank(a).plot()
    assert ax.get_xlabel() == "index i"
    ax.figure.savefig(tmp_path / "rank.png")
    plt.close(ax.figure)
