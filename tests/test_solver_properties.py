"""Property tests of the solvers on random spectra against numpy.linalg.eigh.

Spectra have multiplicities up to 5, tight clusters, large null spaces, both signs,
rank deficiency and tiny n. The property that matters most: a converged flag is never
wrong. A converged pair's eigenvalue lies within its residual of a true eigenvalue, and
the converged values are the true k wanted ones as a multiset, copies included.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hesslab.linops import DenseOperator
from hesslab.solvers import lanczos, spectral_density, trace

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def spectra(draw, max_n: int = 36):
    """(eigenvalues (n,), seed of the eigenbasis): distinct values with multiplicities,
    a cluster, and a null space."""
    values = draw(st.lists(st.integers(-6, 9), min_size=1, max_size=6, unique=True))
    lam = []
    for v in values:
        lam += [float(v)] * draw(st.integers(1, 5))
    if draw(st.booleans()):  # a tight cluster next to one of the values
        lam += [values[0] + 1e-3 * (i + 1) for i in range(draw(st.integers(1, 3)))]
    lam += [0.0] * draw(st.integers(0, 12))  # null space (rank deficiency)
    lam += list(draw(st.lists(st.floats(-3, 3, allow_nan=False, width=32), max_size=10)))  # a bulk
    lam = np.array(lam[:max_n], dtype=np.float64)
    if lam.size < 3:
        lam = np.concatenate([lam, [0.5, -0.5, 1.5][: 3 - lam.size]])
    return lam, draw(st.integers(0, 2**16))


def _operator(lam: np.ndarray, seed: int) -> tuple[DenseOperator, np.ndarray]:
    n = lam.size
    U, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    A = (U * lam) @ U.T
    A = (A + A.T) / 2
    return DenseOperator(torch.from_numpy(A)), np.linalg.eigvalsh(A)


def _wanted(exact: np.ndarray, k: int, which: str) -> np.ndarray:
    if which == "LA":
        return exact[::-1][:k]
    if which == "SA":
        return exact[:k]
    return exact[np.argsort(-np.abs(exact), kind="stable")][:k]


@SETTINGS
@given(spectra(), st.sampled_from(["LA", "SA", "LM"]), st.integers(1, 6))
def test_lanczos_converged_flags_are_never_wrong(spectrum, which, k):
    lam, seed = spectrum
    op, exact = _operator(lam, seed)
    n = lam.size
    k = min(k, n - 1)
    r = lanczos(op, k=k, which=which, seed=seed % 7)
    scale = np.abs(exact).max()
    theta, res, conv = r.eigenvalues.numpy(), r.residuals.numpy(), r.converged.numpy()
    for t, rr in zip(theta[conv], res[conv]):  # an eigenvalue lies within the residual of each converged value
        assert np.abs(exact - t).min() <= rr + 1e-12 * scale
    assert conv.all()  # on spaces this small the run always gets to certify (max_steps = n)
    want = _wanted(exact, k, which)
    if which == "LM":  # ties in magnitude between +a and -a may go either way
        np.testing.assert_allclose(np.sort(np.abs(theta)), np.sort(np.abs(want)), atol=1e-6 * scale)
    else:
        np.testing.assert_allclose(np.sort(theta), np.sort(want), atol=1e-6 * scale)
    assert op.num_matvecs == r.num_matvecs


@SETTINGS
@given(spectra(), st.integers(1, 8), st.integers(1, 3))
def test_slq_moments_match_the_quadratic_forms(spectrum, m, b):
    lam, seed = spectrum
    op, _ = _operator(lam, seed)
    n = lam.size
    m = min(m, n)
    A = op.to_dense().numpy()
    op.num_matvecs = 0
    d = spectral_density(op, num_steps=m, num_probes=b, seed=seed, grid_size=64)
    V = torch.randn(b, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    V = (V / V.norm(dim=1, keepdim=True)).numpy()
    scale = max(np.abs(lam).max(), 1.0)
    Ap = np.eye(n)
    for p in range(2 * m):
        expected = np.einsum("bi,ij,bj->b", V, Ap, V)
        np.testing.assert_allclose(d.moments(p), expected, rtol=1e-7, atol=1e-9 * scale**p)
        Ap = Ap @ A
    np.testing.assert_allclose(d.weights.sum(1), 1.0, atol=1e-12)
    assert np.isfinite(d.density).all() and d.num_matvecs == op.num_matvecs <= m * b
    assert (d.num_steps <= m).all()


@SETTINGS
@given(spectra(), st.sampled_from(["hutchinson", "hutch++"]))
def test_trace_is_exact_where_it_must_be_and_within_its_error_elsewhere(spectrum, method):
    lam, seed = spectrum
    n = lam.size
    # A diagonal operator: zᵀAz = tr(A) for every Rademacher z, so Hutchinson is exact.
    diag = DenseOperator(torch.diag(torch.from_numpy(lam)))
    t = trace(diag, num_matvecs=6, method="hutchinson", seed=seed)
    np.testing.assert_allclose(t.value, lam.sum(), atol=1e-10 * max(1.0, np.abs(lam).sum()))
    op, exact = _operator(lam, seed)
    # Hutch++ with 3n products sketches the whole space: exact.
    full = trace(op, num_matvecs=3 * n, method="hutch++", seed=seed)
    np.testing.assert_allclose(full.value, exact.sum(), atol=1e-9 * max(1.0, np.abs(exact).sum()))
    est = trace(op, num_matvecs=30, method=method, seed=seed)
    assert abs(est.value - exact.sum()) <= 6 * est.std_error + 1e-8 * max(1.0, np.abs(exact).sum())
