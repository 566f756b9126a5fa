"""Gradient concentration and outliers (hesslab.analysis.concentration).

Oracles: dense float64 Hessians and gradients built with torch.autograd on a flat
parameter vector (independent of hesslab's operators) and their numpy ``eigh`` eigenvectors;
synthetic spectra (a Marchenko–Pastur bulk plus c planted outliers) whose outliers are
known; Gauss quadratures computed here by a plain numpy Lanczos for the negative-mass
bounds.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from hesslab.analysis.concentration import (
    ConcentrationResult,
    OutlierResult,
    _negative_mass_bounds,
    gradient_concentration,
    outliers,
    separation_scores,
)
from hesslab.errors import HesslabError
from hesslab.linops import DenseOperator, Hessian
from hesslab.solvers import eigh_exact, gauss_quadrature, lanczos, spectral_density
from tests import models

CE = nn.CrossEntropyLoss()



# --------------------------------------------------------------------------------------
# Dense references
# --------------------------------------------------------------------------------------


def dense_loss_hessian_gradient(model: nn.Module, loss_fn, X, y) -> tuple[np.ndarray, np.ndarray]:
    """(H, g) of the mean loss over (X, y), float64, by plain autograd on a flat vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return loss_fn(functional_call(model, {**params, **buffers}, (X,)), y)

    was_training = model.training
    model.eval()
    H = torch.autograd.functional.hessian(loss_of, theta)
    g = torch.autograd.functional.jacobian(loss_of, theta)
    model.train(was_training)
    return H.numpy(), g.numpy()


@pytest.fixture(scope="module")
def problem():
    """A tanh MLP (51 parameters) at a random point: operator, dense H, g, eigh."""
    model = models.mlp(hidden=(6,), seed=0)
    X, y = models.classification_data(30, 4, 3, seed=0)
    H_dense, g = dense_loss_hessian_gradient(model, CE, X, y)
    lam, U = np.linalg.eigh(H_dense)
    lam, U = lam[::-1], U[:, ::-1]  # descending
    return Hessian(model, CE, (X, y)), H_dense, g, lam, U


def _reference(g: np.ndarray, U: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    shares = (U[:, :k].T @ g) ** 2 / (g @ g)
    return float(shares.sum()), shares


# --------------------------------------------------------------------------------------
# Gradient concentration
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 6])
def test_concentration_against_dense_eigh(problem, k):
    H, H_dense, g, lam, U = problem
    assert lam[k - 1] / lam[k] > 1.05  # the top-k eigenspace is well defined
    ref, ref_shares = _reference(g, U, k)
    res = gradient_concentration(H, k=k, lanczos_options={"tol": 1e-10})
    assert isinstance(res, ConcentrationResult)
    assert res.k == k and res.num_params == 51
    assert res.concentration == pytest.approx(ref, rel=1e-7, abs=1e-10)
    np.testing.assert_allclose(res.eigenvalues, lam[:k], rtol=1e-8)
    np.testing.assert_allclose(res.gradient_norm, np.linalg.norm(g), rtol=1e-10)
    # per-eigenvector shares: the eigenvalues here are simple, so each share is defined
    simple = np.all(np.abs(np.diff(lam[: k + 1])) > 1e-3 * abs(lam[0]))
    if simple:
        np.testing.assert_allclose(res.shares, ref_shares, rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(res.cumulative[-1], res.concentration, rtol=1e-12)
    assert res.random_baseline == pytest.approx(k / 51)


def test_concentration_with_given_eigenvectors(problem):
    H, H_dense, g, lam, U = problem
    ref, ref_shares = _reference(g, U, 5)
    # numpy array, the first k of more columns
    res = gradient_concentration(H, k=5, eigenvectors=U[:, :12])  # a negative-stride view
    assert res.concentration == pytest.approx(ref, rel=1e-10)
    np.testing.assert_allclose(res.shares, ref_shares, rtol=1e-8, atol=1e-14)
    assert np.all(np.isnan(res.eigenvalues))  # raw vectors: eigenvalues unknown
    # an EigenResult (eigh_exact): eigenvalues reported, k defaults to all given columns
    full = eigh_exact(H)
    res_all = gradient_concentration(H, eigenvectors=full)
    assert res_all.k == 51
    assert res_all.concentration == pytest.approx(1.0, abs=1e-10)  # the full space holds all of g
    res5 = gradient_concentration(H, k=5, eigenvectors=full)
    np.testing.assert_allclose(res5.eigenvalues, lam[:5], rtol=1e-8)
    assert res5.concentration == pytest.approx(ref, rel=1e-7)
    # a plain operator with gradient= (float32 gradient accepted)
    dense = DenseOperator(torch.from_numpy(H_dense.copy()), check_symmetric=False)
    res_dense = gradient_concentration(dense, k=5, gradient=torch.from_numpy(g).float())
    assert res_dense.concentration == pytest.approx(ref, rel=1e-5)


def test_concentration_bad_input(problem):
    H, H_dense, g, lam, U = problem
    dense = DenseOperator(torch.from_numpy(H_dense.copy()), check_symmetric=False)
    with pytest.raises(HesslabError, match="gradient"):
        gradient_concentration(dense, k=3)  # no gradient() and no gradient=
    with pytest.raises(HesslabError, match="gradient"):
        gradient_concentration(H, k=3, gradient=torch.zeros(50))
    with pytest.raises(HesslabError, match="k"):
        gradient_concentration(H, k=51)
    with pytest.raises(HesslabError, match="k"):
        gradient_concentration(H, k=0)
    with pytest.raises(HesslabError, match="orthonormal"):
        gradient_concentration(H, eigenvectors=2 * U[:, :3].copy())
    with pytest.raises(HesslabError, match="eigenvectors"):
        gradient_concentration(H, eigenvectors=U[:40, :3].copy())
    with pytest.raises(HesslabError, match="k"):
        gradient_concentration(H, k=4, eigenvectors=U[:, :3].copy())
    no_vectors = lanczos(H, k=3, return_eigenvectors=False, compute_residuals=False)
    with pytest.raises(HesslabError, match="return_eigenvectors"):
        gradient_concentration(H, eigenvectors=no_vectors)
    with pytest.raises(HesslabError, match="op"):
        gradient_concentration(torch.eye(3))


def test_concentration_zero_gradient(problem):
    H, H_dense, g, lam, U = problem
    res = gradient_concentration(H, eigenvectors=U[:, :3].copy(), gradient=np.zeros(51))
    assert res.gradient_norm == 0 and math.isnan(res.concentration) and np.all(np.isnan(res.shares))


def test_concentration_save_load_plot(problem, tmp_path):
    H, H_dense, g, lam, U = problem
    res = gradient_concentration(H, k=4)
    for name in ("c.json", "c.npz"):
        back = ConcentrationResult.load(res.save(tmp_path / name))
        assert back.concentration == pytest.approx(res.concentration)
        np.testing.assert_allclose(back.shares, res.shares)
        assert back.k == 4
    ax = res.plot()
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    ax.figure.savefig(tmp_path / "concentration.png")
    plt.close("all")


# --------------------------------------------------------------------------------------
# Outliers on synthetic spectra
# --------------------------------------------------------------------------------------


def mp_bulk(n: int, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    """Eigenvalues of a Wishart matrix X Xᵀ/(2n), X n×2n Gaussian (a Marchenko–Pastur bulk)."""
    X = rng.standard_normal((n, 2 * n))
    return np.linalg.eigvalsh(X @ X.T / (2 * n)) + shift


def planted(n: int, c: int, seed: int, shift: float = -0.3, low: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """A bulk of n − c eigenvalues plus c outliers at geomspace(low, 30) × the bulk edge."""
    rng = np.random.default_rng(seed)
    ev = mp_bulk(n, rng, shift)
    out = ev.max() * np.geomspace(low, 30, c) if c else np.zeros(0)
    return np.concatenate([ev[: n - c], out]), np.sort(out)[::-1]


def rotated(ev: np.ndarray, seed: int) -> DenseOperator:
    rng = np.random.default_rng(seed + 100)
    Q, _ = np.linalg.qr(rng.standard_normal((ev.size, ev.size)))
    A = torch.from_numpy((Q * ev) @ Q.T)
    return DenseOperator((A + A.T) / 2)


@pytest.mark.parametrize("c", [0, 1, 3, 10])
@pytest.mark.parametrize("low", [1.5, 3.0])
def test_outliers_planted_list(c, low):
    for seed in range(2):
        ev, out = planted(300, c, seed, low=low)
        top = np.sort(ev)[::-1][: c + 30]
        res = outliers(np.random.default_rng(seed).permutation(top))  # any order
        assert res.count == c
        np.testing.assert_allclose(res.positions, out, rtol=1e-12)
        assert res.bulk_edge == pytest.approx(np.sort(ev)[::-1][c])
        if c:
            assert res.separation >= res.min_separation
        # a torch tensor and the whole spectrum give the same answer
        assert outliers(torch.from_numpy(top.copy())).count == c
        full = outliers(ev)
        assert full.count == c
        assert math.isnan(full.negative_mass)  # a plain list is not known to be the full spectrum


@pytest.mark.parametrize("c", [0, 1, 3, 10])
def test_outliers_planted_density(c):
    n = 300
    ev, out = planted(n, c, seed=c)
    op = rotated(ev, seed=c)
    d = spectral_density(op, num_steps=80, num_probes=4, seed=1)
    res = outliers(d)
    assert res.source == "density"
    assert res.count == c
    assert res.counts_per_probe.tolist() == [c] * 4
    np.testing.assert_allclose(res.positions, out, rtol=1e-8)
    # each outlier carries a quadrature weight (vᵀu)² of mean 1/n
    assert res.masses.shape == (c,)
    if c:
        assert 0.1 < res.outlier_mass * n / c < 5
    # the negative mass: ≈ the fraction of negative eigenvalues; its bounds bracket the estimate
    exact = np.mean(ev < -res.zero_tol)
    assert res.negative_mass == pytest.approx(exact, abs=0.06)
    lo, hi = res.negative_mass_bounds
    assert lo <= res.negative_mass_strict <= hi
    assert res.negative_mass_strict == pytest.approx(d.negative_mass(tol=0))


def test_outliers_null_spectra():
    """A pure power law (any exponent) and a random bulk have no separated outliers."""
    for s in (0.3, 1.0, 2.5):
        res = outliers(np.arange(1.0, 61.0) ** -s)
        assert res.count == 0
        assert res.scores.max() == pytest.approx(math.log(2) / math.log(6), rel=1e-9)
    for seed in range(10):
        top = np.sort(mp_bulk(200, np.random.default_rng(seed)))[::-1][:40]
        assert outliers(top).count == 0
    # scaling the spectrum changes nothing
    ev, _ = planted(300, 4, seed=7)
    top = np.sort(ev)[::-1][:40]
    np.testing.assert_allclose(outliers(1e-3 * top).scores, outliers(top).scores, rtol=1e-9)


def test_outliers_full_spectrum_negative_mass():
    ev, out = planted(300, 3, seed=5)
    op = DenseOperator(torch.diag(torch.from_numpy(ev)))
    res = outliers(eigh_exact(op))
    assert res.count == 3
    np.testing.assert_allclose(res.positions, out, rtol=1e-10)
    assert res.negative_mass == pytest.approx(np.mean(ev < -res.zero_tol))
    assert res.negative_mass_strict == pytest.approx(np.mean(ev < 0))


def test_separation_scores_formula():
    lam = np.array([100.0, 50.0, 10.0, 9.0, 8.5, 8.0, 7.9])
    s = separation_scores(lam, window=2, max_outliers=10, floor=0.0)
    ell = np.log(lam)
    expected = [(ell[c - 1] - ell[c]) / (ell[c] - ell[c + 2]) for c in range(1, 5)]
    np.testing.assert_allclose(s, expected)
    # candidates beyond max_outliers or reaching below the floor score 0
    assert separation_scores(lam, 2, 1, 0.0)[1:].tolist() == [0.0, 0.0, 0.0]
    assert separation_scores(lam, 2, 10, 8.2)[2:].tolist() == [0.0, 0.0]
    # a degenerate bulk: an infinite score, not a division error
    s = separation_scores(np.array([5.0, 1.0, 1.0, 1.0]), window=2, max_outliers=10, floor=0.0)
    assert s[0] == np.inf


def test_outliers_bad_input():
    with pytest.raises(HesslabError, match="window"):
        outliers(np.arange(1.0, 10.0))  # fewer than window + 2 positive values
    with pytest.raises(HesslabError, match="window"):
        outliers(np.arange(1.0, 30.0), window=0)
    with pytest.raises(HesslabError, match="min_separation"):
        outliers(np.arange(1.0, 30.0), min_separation=-1)
    with pytest.raises(HesslabError, match="max_outliers"):
        outliers(np.arange(1.0, 30.0), max_outliers=0)
    with pytest.raises(HesslabError, match="floor"):
        outliers(np.arange(1.0, 30.0), floor=2.0)
    with pytest.raises(HesslabError, match="zero_tol"):
        outliers(np.arange(1.0, 30.0), zero_tol=-1.0)
    with pytest.raises(HesslabError, match="eigenvalues"):
        outliers(np.ones((3, 3)))


def test_outlier_result_save_load_plot(tmp_path):
    ev, _ = planted(300, 3, seed=2)
    d = spectral_density(rotated(ev, 2), num_steps=60, num_probes=2)
    for res in (outliers(d), outliers(np.sort(ev)[::-1][:40])):
        for name in ("o.json", "o.npz"):
            back = OutlierResult.load(res.save(tmp_path / name))
            assert back.count == res.count == 3
            np.testing.assert_allclose(back.positions, res.positions)
            np.testing.assert_array_equal(back.counts_per_probe, res.counts_per_probe)
        axes = res.plot()
        assert len(axes) == 2 and all(a.get_xlabel() and a.get_ylabel() for a in axes)
        axes[0].figure.savefig(tmp_path / f"outliers_{res.source}.png")
        _, ax = plt.subplots()
        assert res.plot(ax=ax) is ax
    plt.close("all")


# --------------------------------------------------------------------------------------
# Negative-mass bounds (Chebyshev–Markov–Stieltjes) against exact probe measures
# --------------------------------------------------------------------------------------


def _numpy_lanczos(ev: np.ndarray, v: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss nodes and weights of the measure Σ v_i² δ(λ_i) (diagonal A), m steps, full reorth."""
    Q = np.zeros((m, ev.size))
    alpha, beta = np.zeros(m), np.zeros(m - 1)
    q = v / np.linalg.norm(v)
    for j in range(m):
        Q[j] = q
        w = ev * q
        alpha[j] = w @ q
        for _ in range(2):
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        if j < m - 1:
            beta[j] = np.linalg.norm(w)
            q = w / beta[j]
    return gauss_quadrature(alpha, beta)


@pytest.mark.parametrize("seed", range(4))
def test_negative_mass_bounds_hold(seed):
    rng = np.random.default_rng(seed)
    # a Hessian-like spectrum: a big cluster at ±tiny, a spread bulk, a few outliers
    ev = np.concatenate([1e-6 * rng.standard_normal(150), rng.normal(0, 0.3, 200), [5.0, 8.0]])
    probes = rng.standard_normal((3, ev.size))
    nodes, weights, exact = [], [], []
    for v in probes:
        x, w = _numpy_lanczos(ev, v, 25)
        nodes.append(x)
        weights.append(w)
        exact.append(np.sum(v[ev < 0] ** 2) / (v @ v))
    lo, hi = _negative_mass_bounds(np.array(nodes), np.array(weights), np.ones((3, 25), dtype=bool))
    assert lo - 1e-12 <= np.mean(exact) <= hi + 1e-12


# --------------------------------------------------------------------------------------
# The trained digits MLP (Ghorbani et al.: about one outlier per class)
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_digits_mlp_outliers_and_concentration():
    """64-32-32-10 ReLU MLP, 10 epochs of SGD: measured 9–10 outliers (10 classes) and
    99% of the gradient in the top-10 eigenspace; with BatchNorm no outliers."""
    from hesslab import zoo

    train, _ = zoo.digits()
    found = {}
    for bn in (False, True):
        model = zoo.digits_mlp(batchnorm=bn)
        zoo.train(model, train, epochs=10)
        H = Hessian(model, CE, train, dtype=torch.float64)
        top = lanczos(H, k=30, tol=1e-6)
        found[bn] = outliers(top).count
        if not bn:
            assert 8 <= found[bn] <= 11
            assert gradient_concentration(H, k=10, eigenvectors=top).concentration > 0.9
    assert found[True] < found[False]
