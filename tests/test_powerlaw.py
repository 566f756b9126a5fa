"""Tests for hesslab.analysis.powerlaw against the `powerlaw` package (Alstott et al.).

The package is a test-only dependency: the comparisons skip without it, the rest runs.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from hesslab.analysis.powerlaw import PowerLawFit, power_law_fit
from hesslab.errors import HesslabError

RTOL = 1e-10


@pytest.fixture(scope="module")
def powerlaw_pkg():
    return pytest.importorskip("powerlaw")


def reference(pkg, eigenvalues: np.ndarray, k: int) -> tuple[float, float, float]:
    """(β̂, D, σ_β) from ``powerlaw.Fit`` on the top k positive values, xmin = λ_k.

    The package bounds α to [0, 3] by default (and then fits numerically); widen the range
    so it returns the unconstrained MLE for steep spectra too.
    """
    x = np.sort(eigenvalues[eigenvalues > 0])[::-1][:k]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = pkg.Fit(x, xmin=x[-1], verbose=0, parameter_ranges={"alpha": [1, 100]})
        pl = fit.power_law
        return float(pl.alpha), float(pl.D), float(pl.standard_err)


def zipf(s: float, k: int, lambda1: float = 3.0) -> np.ndarray:
    return lambda1 * np.arange(1, k + 1, dtype=np.float64) ** (-s)


def power_law_sample(beta: float, n: int, xmin: float, rng: np.random.Generator) -> np.ndarray:
    """n samples of p(λ) ∝ λ^(−β), λ ≥ xmin, by inverting the CDF."""
    return xmin * (1.0 - rng.random(n)) ** (-1.0 / (beta - 1.0))


def _assert_matches(pkg, values: np.ndarray, k_max: int | None = None) -> PowerLawFit:
    fit = power_law_fit(values, k_max=k_max)
    alpha, d_ks, se = reference(pkg, values, fit.k)
    assert fit.beta == pytest.approx(alpha, rel=RTOL)
    assert fit.ks_distance == pytest.approx(d_ks, rel=RTOL)
    assert fit.beta_std_error == pytest.approx(se, rel=RTOL)
    return fit


# --------------------------------------------------------------------------------------
# Agreement with the powerlaw package
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [0.3, 0.7, 1.0, 1.5, 3.0])
@pytest.mark.parametrize("k", [10, 300])
def test_zipf_spectrum_matches_package(powerlaw_pkg, s, k):
    values = zipf(s, k)
    fit = _assert_matches(powerlaw_pkg, np.random.default_rng(0).permutation(values))
    assert fit.k == k and fit.num_dropped == 0
    # The least-squares line is exact on a Zipf spectrum.
    assert fit.s_lstsq == pytest.approx(s, rel=1e-12)
    assert fit.lambda1_lstsq == pytest.approx(3.0, rel=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.is_power_law


@pytest.mark.parametrize("k_max", [2, 3, 50, 999, 5000])
def test_k_max_matches_package(powerlaw_pkg, k_max):
    values = zipf(1.2, 1000) * np.random.default_rng(1).uniform(0.8, 1.25, 1000)
    fit = _assert_matches(powerlaw_pkg, values, k_max=k_max)
    assert fit.k == min(k_max, 1000)
    np.testing.assert_array_equal(fit.eigenvalues, np.sort(values)[::-1][: fit.k])


@pytest.mark.parametrize("beta", [1.5, 2.0, 2.7, 4.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_law_samples_match_package_and_pass(powerlaw_pkg, beta, seed):
    rng = np.random.default_rng(seed)
    values = power_law_sample(beta, 2000, 0.01, rng)
    fit = _assert_matches(powerlaw_pkg, values)
    assert fit.is_power_law, f"d_ks = {fit.ks_distance} >= d_c = {fit.ks_critical}"
    assert fit.ks_critical == pytest.approx(1.36 / math.sqrt(2000))


@pytest.mark.parametrize(
    "name,make",
    [
        ("uniform", lambda rng: rng.uniform(0, 1, 1000)),
        ("exponential", lambda rng: rng.exponential(1.0, 1000)),
        ("lognormal", lambda rng: rng.lognormal(0.0, 0.5, 1000)),
        ("marchenko-pastur", lambda rng: np.linalg.eigvalsh(np.cov(rng.standard_normal((300, 600))))),
    ],
)
def test_non_power_law_spectra_match_package_and_fail(powerlaw_pkg, name, make):
    values = make(np.random.default_rng(7))
    fit = _assert_matches(powerlaw_pkg, values)
    assert not fit.is_power_law, f"{name}: d_ks = {fit.ks_distance} < d_c = {fit.ks_critical}"
    assert fit.ks_distance > 3 * fit.ks_critical


def test_ties_match_package(powerlaw_pkg):
    values = np.array([5.0, 3.0, 3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 0.5])
    fit = _assert_matches(powerlaw_pkg, values, k_max=8)
    assert fit.k == 8


def test_verdict_with_large_k():
    # With K = 1000 an exponential spectrum is clearly rejected ...
    values = np.random.default_rng(3).exponential(1.0, 5000)
    assert not power_law_fit(values, k_max=1000).is_power_law
    # ... and a true power law with the same K is accepted.
    pl = power_law_sample(2.0, 5000, 1.0, np.random.default_rng(3))
    assert power_law_fit(pl, k_max=1000).is_power_law


# --------------------------------------------------------------------------------------
# Statistics of the estimator
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_recovers_true_exponent_from_large_samples(s):
    rng = np.random.default_rng(int(10 * s))
    k = 20000
    values = power_law_sample(1.0 + 1.0 / s, k, 1e-3, rng)
    fit = power_law_fit(values)
    assert abs(fit.s - s) < 4 * fit.s_std_error
    assert abs(fit.beta - (1 + 1 / s)) < 4 * fit.beta_std_error
    assert fit.s_std_error == pytest.approx(fit.s / math.sqrt(k), rel=1e-12)
    assert fit.beta_std_error == pytest.approx((fit.beta - 1) / math.sqrt(k), rel=1e-12)
    assert fit.is_power_law


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_zipf_mle_close_to_s(s):
    fit = power_law_fit(zipf(s, 5000))
    assert fit.s == pytest.approx(s, rel=0.01)
    assert fit.beta == pytest.approx(1 + 1 / fit.s, rel=1e-14)


def test_fields_and_model_line():
    values = zipf(0.9, 400)
    fit = power_law_fit(values)
    k = fit.k
    lam_k = values[-1]
    assert fit.eigenvalues.dtype == np.float64 and fit.eigenvalues.shape == (k,)
    assert fit.lambda1 == pytest.approx(lam_k * k**fit.s, rel=1e-12)
    line = fit.model_line()
    assert line[-1] == pytest.approx(lam_k, rel=1e-14)
    assert line[0] == pytest.approx(fit.lambda1, rel=1e-12)
    # beta from its definition
    assert fit.beta == pytest.approx(1 + k / np.sum(np.log(values / lam_k)), rel=1e-14)


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def test_non_positive_dropped_and_counted(powerlaw_pkg):
    rng = np.random.default_rng(5)
    pos = power_law_sample(2.2, 300, 0.1, rng)
    values = np.concatenate([pos, -rng.uniform(0, 5, 40), np.zeros(7)])
    rng.shuffle(values)
    fit = _assert_matches(powerlaw_pkg, values)
    assert fit.num_dropped == 47
    assert fit.k == 300
    assert np.all(fit.eigenvalues > 0)
    assert power_law_fit(pos).beta == fit.beta


def _same(a: PowerLawFit, b: PowerLawFit) -> bool:
    da, db = a.to_dict(), b.to_dict()
    return np.array_equal(da.pop("eigenvalues"), db.pop("eigenvalues")) and da == db


def test_order_and_tensor_input():
    values = zipf(1.3, 200)
    ref = power_law_fit(values)
    shuffled = np.random.default_rng(2).permutation(values)
    assert _same(power_law_fit(shuffled), ref)
    assert _same(power_law_fit(list(values)), ref)
    t = torch.from_numpy(shuffled)
    assert _same(power_law_fit(t), ref)
    assert power_law_fit(t.to(torch.float32)).beta == pytest.approx(ref.beta, rel=1e-5)
    assert power_law_fit(t[::2]).k == 100  # non-contiguous


@pytest.mark.parametrize(
    "values,kwargs,match",
    [
        (np.array([1.0]), {}, "at least 2 positive"),
        (np.array([2.0, 0.0, -1.0]), {}, "at least 2 positive"),
        (np.array([]), {}, "at least 2 positive"),
        (np.arange(1.0, 10.0), {"k_max": 1}, "k_max"),
        (np.arange(1.0, 10.0), {"k_max": 0}, "k_max"),
        (np.arange(1.0, 10.0), {"k_max": -3}, "k_max"),
        (np.arange(1.0, 10.0), {"k_max": 2.5}, "k_max"),
        (np.arange(1.0, 10.0), {"k_max": True}, "k_max"),
        (np.arange(1.0, 10.0), {"k_max": "10"}, "k_max"),
        (np.ones((3, 3)), {}, "1-D"),
        (np.array([1.0, np.nan, 2.0]), {}, "NaN"),
        (np.array([1.0, np.inf, 2.0]), {}, "infinite"),
        (np.array([1.0, 2.0], dtype=complex), {}, "complex"),
        (np.array([3.0, 3.0, 3.0, 1.0]), {"k_max": 3}, "all equal"),
        (np.array(["a", "b"]), {}, "numbers"),
    ],
)
def test_bad_input(values, kwargs, match):
    with pytest.raises(HesslabError, match=match):
        power_law_fit(values, **kwargs)


def test_k_max_numpy_int_and_exactly_two():
    fit = power_law_fit(np.array([4.0, 1.0, 0.5]), k_max=np.int64(2))
    assert fit.k == 2
    assert fit.beta == pytest.approx(1 + 2 / math.log(4.0))
    assert fit.ks_critical == pytest.approx(1.36 / math.sqrt(2))


# --------------------------------------------------------------------------------------
# Results: save/load and plot
# --------------------------------------------------------------------------------------


def test_save_load_roundtrip(tmp_path):
    fit = power_law_fit(np.concatenate([zipf(1.1, 50), [-1.0, 0.0]]))
    for name in ("fit.json", "fit.npz"):
        back = PowerLawFit.load(fit.save(tmp_path / name))
        assert _same(back, fit)
        assert isinstance(back.is_power_law, bool) and isinstance(back.k, int)


def test_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = power_law_sample(2.0, 500, 0.01, np.random.default_rng(0))
    fit = power_law_fit(np.concatenate([values, [-0.5, -1.0]]), k_max=300)
    ax = fit.plot()
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "index k"
    assert ax.get_ylabel() == "eigenvalue λ_k"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("ŝ" in t and "d_ks" in t and "power law" in t for t in labels)
    assert any("least squares" in t for t in labels)
    lines = ax.get_lines()
    assert len(lines) == 3
    np.testing.assert_allclose(lines[1].get_ydata(), fit.model_line())
    ax.figure.savefig(tmp_path / "powerlaw.png")
    plt.close(ax.figure)
    # Drawing on given axes returns them.
    fig, ax2 = plt.subplots()
    assert power_law_fit(np.random.default_rng(0).exponential(size=200)).plot(ax=ax2) is ax2
    plt.close(fig)


# ======================================================================================
# the verdict (issue 18): undecided with too few values or a fit that misses λ₁
# ======================================================================================


def test_verdict_undecided_with_ten_eigenvalues():
    from hesslab.analysis.powerlaw import MIN_K_TO_DECIDE

    fit = power_law_fit(zipf(1.0, 10))
    assert fit.is_power_law  # the KS test alone accepts (d_c = 0.43 at K = 10) ...
    assert fit.verdict == "undecided"  # ... but cannot decide anything
    assert f"K = 10 is too few" in fit.verdict_reason and str(MIN_K_TO_DECIDE) in fit.verdict_reason
    assert f"{fit.ks_critical:.3g}" in fit.verdict_reason and f"{fit.ks_distance:.3g}" in fit.verdict_reason
    # a linearly decaying spectrum of 10 values: accepted by KS, never a "power law"
    lin = power_law_fit(np.linspace(1.0, 0.1, 10))
    assert lin.is_power_law and lin.verdict == "undecided"
    assert power_law_fit(np.linspace(1.0, 0.1, 40)).verdict == "not a power law"


def test_verdict_power_law_and_lambda1_miss():
    from hesslab.analysis.powerlaw import LAMBDA1_FACTOR

    fit = power_law_fit(zipf(1.0, 60))
    assert fit.verdict == "power law" and "KS test" in fit.verdict_reason
    assert 1 / LAMBDA1_FACTOR < fit.lambda1_ratio < LAMBDA1_FACTOR
    lam = zipf(1.0, 60)
    lam[0] *= 4.0  # the top eigenvalue far above the line through the rest
    miss = power_law_fit(lam)
    assert miss.is_power_law and miss.verdict == "undecided"
    assert "misses the largest eigenvalue" in miss.verdict_reason and miss.lambda1_ratio > LAMBDA1_FACTOR


def test_verdict_survives_save_and_load(tmp_path):
    fit = power_law_fit(zipf(1.0, 10))
    fit.save(tmp_path / "fit")
    back = PowerLawFit.load(tmp_path / "fit")
    assert back.verdict == "undecided" and back.verdict_reason == fit.verdict_reason
