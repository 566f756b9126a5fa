"""Solvers against dense float64 Hessians (numpy eigh) and by their defining properties."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from hesslab.errors import HesslabError
from hesslab.linops import DenseOperator, Hessian
from hesslab.solvers import EigenResult, SpectralDensity, TraceEstimate, eigh_exact, lanczos, spectral_density, trace
from hesslab.solvers import _krylov
from hesslab.solvers import _lanczos as _lanczos_mod

from tests import models

CE = nn.CrossEntropyLoss()


def _problems():
    """(name, operator, dense Hessian) for an MLP, a CNN, and both with BatchNorm in eval mode."""
    out = []
    for name, model, data in [
        ("mlp", models.mlp(hidden=(8, 6), seed=1), models.classification_data(40, 4, 3, seed=1)),
        ("mlp_bn", models.mlp(hidden=(8, 6), batchnorm=True, seed=2), models.classification_data(40, 4, 3, seed=2)),
        ("cnn", models.cnn(seed=3), models.image_data(30, seed=3)),
        ("cnn_bn", models.cnn(batchnorm=True, seed=4), models.image_data(30, seed=4)),
    ]:
        H = Hessian(model, CE, data)
        out.append((name, H, H.to_dense().numpy()))
    return out


PROBLEMS = _problems()


@pytest.fixture(params=PROBLEMS, ids=[p[0] for p in PROBLEMS])
def problem(request):
    return request.param


def test_lanczos_top10_and_bottom5_match_eigh(problem):
    _, H, D = problem
    exact = np.linalg.eigh(D)[0]
    scale = np.abs(exact).max()
    top = lanczos(H, k=10, which="LA", tol=1e-10)
    np.testing.assert_allclose(top.eigenvalues.numpy(), exact[::-1][:10], rtol=0, atol=1e-8 * scale)
    assert top.converged.all() and top.num_converged == 10
    assert top.residuals.max() < 1e-6 * scale
    V = top.eigenvectors.numpy()
    np.testing.assert_allclose(V.T @ V, np.eye(10), atol=1e-8)
    bottom = lanczos(H, k=5, which="SA", tol=1e-10)
    np.testing.assert_allclose(bottom.eigenvalues.numpy(), exact[:5], rtol=0, atol=1e-8 * scale)
    lm = lanczos(H, k=3, which="LM", tol=1e-10)
    by_mag = exact[np.argsort(-np.abs(exact))][:3]
    np.testing.assert_allclose(lm.eigenvalues.numpy(), by_mag, rtol=0, atol=1e-8 * scale)


def test_ritz_vectors_in_slices_equal_the_whole_product():
    Q = torch.randn(7, 1003, dtype=torch.float32)
    S = torch.randn(7, 3, dtype=torch.float64)
    whole = Q.T.double() @ S
    for max_bytes in (8, 8 * 7 * 100, 2**28):  # one column per slice, 100 per slice, all at once
        torch.testing.assert_close(_lanczos_mod.ritz_vectors(Q, S, max_bytes=max_bytes), whole, rtol=1e-12, atol=0)


def test_lanczos_counts_products_and_finds_multiplicities():
    lam = torch.tensor([5.0] * 4 + [3.0] * 3 + list(np.linspace(-1, 1, 40)), dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(47, 47, dtype=torch.float64))
    op = DenseOperator((U * lam) @ U.T)
    r = lanczos(op, k=7, tol=1e-10)
    np.testing.assert_allclose(r.eigenvalues.numpy(), [5] * 4 + [3] * 3, atol=1e-9)
    assert op.num_matvecs == r.num_matvecs == r.num_steps + 7
    # Three distinct eigenvalues: every Krylov space breaks down after three steps, and
    # each copy of the top eigenvalue beyond the first is found after a restart.
    op = DenseOperator(torch.diag(torch.tensor([1.0] * 10 + [2.0] * 10 + [4.0] * 5, dtype=torch.float64)))
    r = lanczos(op, k=5, tol=1e-10)
    np.testing.assert_allclose(r.eigenvalues.numpy(), [4.0] * 5, atol=1e-10)
    assert r.restarts >= 4 and r.converged.all()


def test_lanczos_warm_start_converges_faster(problem):
    _, H, D = problem
    cold = lanczos(H, k=5, tol=1e-8, check_every=1)
    warm = lanczos(H, k=5, tol=1e-8, check_every=1, v0=cold.eigenvectors)
    assert warm.num_steps < cold.num_steps
    np.testing.assert_allclose(warm.eigenvalues.numpy(), cold.eigenvalues.numpy(), atol=1e-7 * abs(cold.eigenvalues[0].item()))


def test_lanczos_float32_basis_keeps_float64_products():
    _, H, D = PROBLEMS[0]
    exact = np.linalg.eigh(D)[0][::-1][:5]
    r = lanczos(H, k=5, basis_dtype=torch.float32, tol=1e-6)
    np.testing.assert_allclose(r.eigenvalues.numpy(), exact, rtol=1e-6)


def _probes(n: int, num_probes: int, seed: int) -> np.ndarray:
    v = torch.randn(num_probes, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (v / v.norm(dim=1, keepdim=True)).numpy()


def test_slq_moments_match_quadratic_forms(problem):
    _, H, D = problem
    m, b = 6, 3
    d = spectral_density(H, num_steps=m, num_probes=b, seed=7)
    V = _probes(D.shape[0], b, 7)
    scale = np.abs(np.linalg.eigvalsh(D)).max()
    Dp = np.eye(D.shape[0])
    for p in range(2 * m):
        expected = np.einsum("bi,ij,bj->b", V, Dp, V)
        np.testing.assert_allclose(d.moments(p), expected, rtol=1e-7, atol=1e-9 * scale**p)
        Dp = Dp @ D
    np.testing.assert_allclose(d.weights.sum(1), 1.0, atol=1e-12)
    assert d.num_matvecs == m * b


def test_slq_local_reorthogonalization_keeps_the_quadrature():
    """Local reorthogonalization loses global orthogonality (ghost copies of converged
    outliers) but keeps the moments vᵀA^p v and the density of the full-basis run."""
    rng = np.random.default_rng(0)
    n = 400
    lam = np.concatenate([[40.0, 25.0, 18.0], rng.normal(0.0, 0.5, n - 3)])  # outliers converge early
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    D = (U * lam) @ U.T
    op = DenseOperator(torch.from_numpy(D))
    m, b = 60, 3
    full = spectral_density(op, num_steps=m, num_probes=b, seed=2)
    local = spectral_density(op, num_steps=m, num_probes=b, seed=2, reorthogonalize="local")
    assert local.num_matvecs == full.num_matvecs == m * b
    assert (local.reorthogonalize, full.reorthogonalize) == ("local", "full")
    V = _probes(n, b, 2)
    Dp = np.eye(n)
    for p in range(12):
        expected = np.einsum("bi,ij,bj->b", V, Dp, V)
        np.testing.assert_allclose(local.moments(p), expected, rtol=1e-9, atol=1e-12 * 40.0**p)
        Dp = Dp @ D
    # ghosts: the top outlier appears more than once among a local run's nodes, once in a full run's
    near_top = lambda d: (np.abs(d.nodes - 40.0) < 1e-6).sum(axis=1)
    assert (near_top(full) == 1).all() and (near_top(local) >= 2).any()
    def w1(d):  # 1-Wasserstein distance of the quadrature measure to the exact spectrum
        valid = d.valid()
        return scipy.stats.wasserstein_distance(d.nodes[valid], lam, d.weights[valid])

    assert w1(local) < 1.2 * w1(full) + 0.01
    assert np.all(np.abs(local.weights.sum(1) - 1.0) < 1e-10)


def test_slq_local_reorthogonalization_keeps_three_vectors(monkeypatch):
    seen = []
    real = _krylov._ops.lanczos_step_
    monkeypatch.setattr(_krylov._ops, "lanczos_step_", lambda Q, *a: seen.append(Q.shape) or real(Q, *a))
    op = DenseOperator(torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64)))
    spectral_density(op, num_steps=20, num_probes=2, reorthogonalize="local")
    assert set(seen) == {(2, 3, 50)}
    with pytest.raises(HesslabError, match="reorthogonalize must be"):
        spectral_density(op, num_steps=5, reorthogonalize="none")


def test_slq_with_n_steps_gives_the_eigenvalues():
    torch.manual_seed(5)
    n = 30
    lam = torch.linspace(-2, 10, n, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    op = DenseOperator((U * lam) @ U.T)
    d = spectral_density(op, num_steps=n, num_probes=2)
    for i in range(2):
        valid = d.valid()[i]
        np.testing.assert_allclose(np.sort(d.nodes[i][valid]), lam.numpy(), atol=1e-10)


def test_slq_stops_a_probe_at_breakdown_and_stays_exact():
    lam = torch.tensor([1.0] * 10 + [2.0] * 10 + [4.0] * 5, dtype=torch.float64)
    op = DenseOperator(torch.diag(lam))
    d = spectral_density(op, num_steps=10, num_probes=3)
    assert (d.num_steps == 3).all()
    for i in range(3):
        np.testing.assert_allclose(np.sort(d.nodes[i, :3]), [1, 2, 4], atol=1e-12)
    assert np.isfinite(d.density).all()
    np.testing.assert_allclose(d.density.sum() * (d.grid[1] - d.grid[0]), 1.0, rtol=1e-12)
    assert d.num_matvecs < 3 * 10  # stopped probes cost nothing


def test_negative_mass_counts_what_lies_below_the_kernel_width():
    lam = torch.tensor([-1.0] * 5 + [-1e-9] * 10 + [1.0] * 15, dtype=torch.float64)
    d = spectral_density(DenseOperator(torch.diag(lam)), num_steps=5, num_probes=4, seed=3)
    V = _probes(30, 4, 3)
    exact = (V[:, :5] ** 2).sum(1).mean()  # the probes' weight on the eigenvalue −1
    np.testing.assert_allclose(d.negative_mass(), exact, rtol=1e-10)
    np.testing.assert_allclose(d.negative_mass(tol=0), (V[:, :15] ** 2).sum(1).mean(), rtol=1e-10)


def test_slq_ghorbani_grid_and_kernel():
    _, H, D = PROBLEMS[0]
    d = spectral_density(H, num_steps=20, num_probes=4, preset="ghorbani")
    lo = np.mean(d.nodes.min(axis=1)) - 0.01
    hi = np.mean(d.nodes.max(axis=1)) + 0.01
    assert len(d.grid) == 10000 and np.isclose(d.grid[0], lo) and np.isclose(d.grid[-1], hi)
    assert np.isclose(d.sigma2, 1e-5 * max(1, hi - lo))
    np.testing.assert_allclose(d.density.sum() * (d.grid[1] - d.grid[0]), 1.0, rtol=1e-12)
    assert 0 <= d.negative_mass() <= 1


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_three_standard_errors(problem, method):
    _, H, D = problem
    t = trace(H, num_matvecs=60, method=method, seed=11)
    assert t.num_matvecs == 60
    assert abs(t.value - np.trace(D)) <= 3 * t.std_error + 1e-10


def test_eigh_exact_matches_numpy(problem):
    _, H, D = problem
    e = eigh_exact(H)
    np.testing.assert_allclose(e.eigenvalues.numpy(), np.linalg.eigh(D)[0][::-1], atol=1e-10)
    assert e.residuals.max() < 1e-8


@pytest.mark.parametrize("solver", ["lanczos", "slq", "slq_local"])
def test_checkpoint_resume_gives_the_identical_result(tmp_path, solver):
    _, H, D = PROBLEMS[2]
    A = torch.from_numpy(D)
    run = {
        "lanczos": lambda op, **kw: lanczos(op, k=6, tol=1e-10, **kw),
        "slq": lambda op, **kw: spectral_density(op, num_steps=25, num_probes=3, **kw),
        "slq_local": lambda op, **kw: spectral_density(op, num_steps=25, num_probes=3, reorthogonalize="local", **kw),
    }[solver]
    path = tmp_path / "state.pt"
    full, resumed = models.interrupted_and_resumed(run, A, 37, path)
    again = run(DenseOperator(A), checkpoint=path)  # resuming a finished run changes nothing
    for other in (resumed, again):
        for key, value in full.to_dict().items():
            if key != "num_matvecs":
                np.testing.assert_array_equal(np.asarray(value), np.asarray(other.to_dict()[key]), err_msg=key)
    with pytest.raises(HesslabError, match="different arguments"):
        spectral_density(DenseOperator(A), num_steps=24, num_probes=3, checkpoint=path)
    other = "full" if solver == "slq_local" else "local"
    if solver != "lanczos":
        with pytest.raises(HesslabError, match="different arguments"):
            spectral_density(DenseOperator(A), num_steps=25, num_probes=3, checkpoint=path, reorthogonalize=other)


def test_ctrl_c_during_a_step_commit_arrives_after_it():
    """The driver commits a step (generator state, window slide, step count) with SIGINT
    held, so a checkpoint written on KeyboardInterrupt never sees half a step."""
    done = []
    with pytest.raises(KeyboardInterrupt):
        with _krylov._interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # without the mask KeyboardInterrupt is raised here
            done.append(True)
    assert done == [True]


def test_memory_estimate_refuses_with_options(monkeypatch):
    monkeypatch.setattr(_krylov, "available_bytes", lambda device: 1000)
    op = DenseOperator(torch.eye(50, dtype=torch.float64))
    with pytest.raises(HesslabError, match="basis_dtype=torch.float32") as err:
        spectral_density(op, num_steps=10, num_probes=4)
    assert "fewer steps" in str(err.value) and "basis_device='cpu'" in str(err.value)
    assert "reorthogonalize='local'" in str(err.value)


def test_bad_arguments():
    op = DenseOperator(torch.eye(10, dtype=torch.float64))
    for kwargs, name in [({"k": 10}, "k must"), ({"k": 0}, "k must"), ({"k": 2, "which": "XX"}, "which"),
                         ({"k": 3, "max_steps": 2}, "max_steps"), ({"k": 2, "v0": torch.ones(9)}, "v0")]:
        with pytest.raises(HesslabError, match=name):
            lanczos(op, **kwargs)
    with pytest.raises(HesslabError, match="num_steps"):
        spectral_density(op, num_steps=11)
    with pytest.raises(HesslabError, match="num_probes"):
        spectral_density(op, num_steps=5, num_probes=0)
    with pytest.raises(HesslabError, match="method"):
        trace(op, 10, method="exact")
    with pytest.raises(HesslabError, match="num_matvecs"):
        trace(op, 2, method="hutch++")
    with pytest.raises(HesslabError, match="max_size"):
        eigh_exact(op, max_size=5)


def test_results_save_and_load(tmp_path):
    _, H, D = PROBLEMS[0]
    local = spectral_density(H, num_steps=5, num_probes=2, grid_size=50, reorthogonalize="local")
    for result in [lanczos(H, k=3), local, trace(H, 9)]:
        for suffix in (".json", ".npz"):
            path = result.save(tmp_path / f"r{suffix}")
            back = type(result).load(path)
            for key, value in result.to_dict().items():
                got = back.to_dict()[key]
                if value is None:
                    assert got is None
                else:
                    np.testing.assert_array_equal(np.asarray(value), np.asarray(got), err_msg=key)
    assert isinstance(back, TraceEstimate)
    assert SpectralDensity.load(local.save(tmp_path / "d.json")).reorthogonalize == "local"


@pytest.mark.parametrize("grid", [None, np.linspace(-1.0, 3.0, 301)])
def test_density_curve_is_lazy_and_identical(monkeypatch, tmp_path, grid):
    """Issue 15: spectral_density leaves the smoothed curve to the first read of .grid,
    .density, plot() or to_dict(); the values are those of the eager smooth_density call."""
    from hesslab.solvers import _slq

    calls = []
    original = _slq.smooth_density
    monkeypatch.setattr(_slq, "smooth_density", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    op = PROBLEMS[0][1]
    kwargs = dict(num_steps=12, num_probes=3, seed=5, sigma2=1e-4, grid_size=500, grid=grid)
    results = [spectral_density(op, **kwargs) for _ in range(4)]
    assert calls == []
    d = results[0]
    g, dens, var = original(d.nodes, d.weights, 1e-4, 500, grid, counts=d.num_steps)
    assert d.sigma2 == var
    assert np.array_equal(d.density, dens) and np.array_equal(d.grid, g) and len(calls) == 1
    assert d.density is d.density  # evaluated once
    for other, first_read in zip(results[1:], [lambda r: r.grid, lambda r: r.to_dict(), lambda r: r.plot()]):
        first_read(other)
        assert np.array_equal(other.grid, g) and np.array_equal(other.density, dens)
    assert len(calls) == 4
    back = SpectralDensity.load(results[1].save(tmp_path / "d.npz"))
    assert all(np.array_equal(np.asarray(v), np.asarray(back.to_dict()[k])) for k, v in d.to_dict().items())
    assert len(calls) == 4 and back.sigma2 == d.sigma2


def test_density_plot_has_log_axis():
    import matplotlib

    matplotlib.use("Agg")
    d = spectral_density(PROBLEMS[0][1], num_steps=10, num_probes=2, grid_size=200)
    ax = d.plot(label="mlp")
    assert ax.get_yscale() == "log" and ax.get_xlabel() and len(ax.lines) == 1
    assert isinstance(d, SpectralDensity) and isinstance(lanczos(PROBLEMS[0][1], k=2), EigenResult)


@pytest.mark.parametrize("call, name", [
    (lambda op: spectral_density(op, 5, 2, sigma2=0), "sigma2"),
    (lambda op: spectral_density(op, 5, 2, sigma2=-1e-3), "sigma2"),
    (lambda op: spectral_density(op, 5, 2, sigma2=float("nan")), "sigma2"),
    (lambda op: spectral_density(op, 5, 2, grid_size=1), "grid_size"),
    (lambda op: spectral_density(op, 5, 2, grid_size=10.5), "grid_size"),
    (lambda op: spectral_density(op, 5, 2, grid=np.array([1.0, 1.0, 2.0])), "grid"),
    (lambda op: spectral_density(op, 5, 2, grid=np.array([0.0, np.inf])), "grid"),
    (lambda op: spectral_density(op, 5.0, 2), "num_steps"),
    (lambda op: spectral_density(op, 5, True), "num_probes"),
    (lambda op: spectral_density(op, 5, 2, seed=0.5), "seed"),
    (lambda op: spectral_density(op, 5, 2, basis_dtype=torch.int64), "basis_dtype"),
    (lambda op: spectral_density(op, 5, 2, checkpoint_every=0), "checkpoint_every"),
    (lambda op: lanczos(op, 2, tol=0), "tol"),
    (lambda op: lanczos(op, 2, tol=-1e-6), "tol"),
    (lambda op: lanczos(op, 2, tol=1.5), "tol"),
    (lambda op: lanczos(op, 2, tol=float("inf")), "tol"),
    (lambda op: lanczos(op, 2.0), "k"),
    (lambda op: lanczos(op, 2, max_steps=4.0), "max_steps"),
    (lambda op: lanczos(op, 2, check_every=0), "check_every"),
    (lambda op: lanczos(op, 2, checkpoint_every=0), "checkpoint_every"),
    (lambda op: lanczos(op, 2, v0=torch.full((10,), float("nan"))), "v0"),
    (lambda op: trace(op, 10, batch_size=0), "batch_size"),
    (lambda op: trace(op, 10.0), "num_matvecs"),
    (lambda op: trace(op, 10, seed="1"), "seed"),
])
def test_numeric_arguments_are_validated(call, name):
    op = DenseOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(HesslabError, match=f"^{name} must"):
        call(op)
    assert op.num_matvecs == 0


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_lanczos_finds_every_copy_and_flags_only_certified_pairs(which):
    """Issue 12 item 2: A = U diag(3, 2, 1, 0, ..., 0) Uᵀ with k = 5 (breakdowns), and a
    double eigenvalue inside a spectrum of distinct values (no breakdown: only a
    verification chain reveals the second copy)."""
    U, _ = torch.linalg.qr(torch.randn(30, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    lam = torch.zeros(30, dtype=torch.float64)
    lam[:3] = torch.tensor([3.0, 2.0, 1.0])
    r = lanczos(DenseOperator((U * lam) @ U.T), k=5, which=which)
    want = {"LA": [3, 2, 1, 0, 0], "SA": [0] * 5, "LM": [3, 2, 1, 0, 0]}[which]
    np.testing.assert_allclose(np.sort(r.eigenvalues.numpy()), np.sort(want), atol=1e-10)
    assert r.converged.all()
    rng = np.random.default_rng(1)
    lam = (-1.0 if which == "SA" else 1.0) * np.concatenate([[10.0] * 3, rng.uniform(0, 9, 117)])
    Q, _ = np.linalg.qr(rng.standard_normal((120, 120)))
    A = torch.from_numpy((Q * lam) @ Q.T)
    r = lanczos(DenseOperator(A), k=4, which=which)
    want = np.sort(np.abs(lam))[::-1][:4]  # 10, 10, 10, then the largest of the rest
    np.testing.assert_allclose(np.abs(r.eigenvalues.numpy()), want, atol=1e-8)
    assert r.converged.all() and r.restarts >= 1
    quick = lanczos(DenseOperator(A), k=4, which=which, verify=False)  # cheaper, and may miss the third copy
    assert quick.num_matvecs < r.num_matvecs


@pytest.fixture
def bars(monkeypatch):
    """Every tqdm bar the solvers open, written to a string, with (n, total) at creation and close."""
    import io

    import tqdm.auto

    made = []

    class Recorded(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "file": io.StringIO()})
            self.opened_total = self.total
            made.append(self)

        def close(self):
            self.closed_at = (self.n, self.total)
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    return made


def test_progress_bars_end_at_the_real_count(bars):
    """Issue 18: a bar counts to the budget and, when the run ends early, ends full at the
    count reached (not at 70 of 300)."""
    A = torch.diag(torch.tensor([5.0, 5.0, 2.0, 2.0, 1.0] * 8, dtype=torch.float64))
    op = DenseOperator(A)
    r = lanczos(op, k=2, progress=True, max_steps=35)
    assert bars[-1].opened_total == 35 and bars[-1].closed_at == (r.num_steps, r.num_steps) and r.num_steps < 35
    d = spectral_density(op, num_steps=10, num_probes=2, progress=True)  # 3 distinct values: breakdown at step 3
    assert bars[-1].opened_total == 10 and bars[-1].closed_at == (3, 3) and d.num_steps.tolist() == [3, 3]
    t = trace(op, 10, progress=True, batch_size=4)
    assert bars[-1].opened_total == 10 and bars[-1].closed_at == (t.num_matvecs, 10)
    assert len(bars) == 3


def test_one_device_read_per_step(monkeypatch):
    """Issue 17: a driver step reads back from the device once (the flags); SLQ has no
    convergence test, so its run reads one transfer per step plus a constant."""
    A = torch.diag(torch.linspace(1.0, 2.0, 40, dtype=torch.float64))
    reads = []
    real = torch.Tensor.cpu

    def counted(self, *args, **kwargs):
        reads.append(1)
        return real(self, *args, **kwargs)

    counts = []
    for steps in (6, 12):
        reads.clear()
        monkeypatch.setattr(torch.Tensor, "cpu", counted)
        d = spectral_density(DenseOperator(A), num_steps=steps, num_probes=2)
        monkeypatch.setattr(torch.Tensor, "cpu", real)
        assert d.num_steps.tolist() == [steps, steps]
        counts.append(len(reads))
    assert counts[1] - counts[0] == 6  # six more steps, six more reads
