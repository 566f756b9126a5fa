"""lanczos, spectral_density and trace on sharded vectors (issue 14 point 3), 2 and 4 gloo ranks.

The operator is a test-only row-sharded dense matrix: a global float64 symmetric A (n = 23,
chosen eigenvalues, one of them double) whose rows are split unevenly over the ranks
(one rank holds a single row); a product all-gathers the local vector and multiplies the
rank's rows. Every rank's results are saved and compared here against numpy's eigh of A
and the exact traces/moments, and against each other with torch.equal: eigenvalues,
densities and traces must be bitwise identical on every rank.

In-process tests check the sharded vector work itself on one rank (``Shards(0, 1, (n,))``,
whose all-reduce is the identity): the two-all-reduce Lanczos step against
``hesslab.reference.lanczos_step`` (float64 accumulation), CholeskyQR2 on rank-deficient
sketches, and the solvers end to end against numpy.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hypothesis import given, settings
from hypothesis import strategies as st

import hesslab as hl
from hesslab import reference
from hesslab.errors import HesslabError
from hesslab.linops import DenseOperator, LinearOperator
from hesslab.linops._shards import Shards
from hesslab.solvers import _sharded
from tests.test_distributed import _free_port, gloo_group

N = 23
SIZES = {2: (22, 1), 4: (9, 1, 6, 7)}
EIGS = np.concatenate([[10.0, 7.0, 7.0, 5.0], np.linspace(-2.0, 2.5, N - 4)])
K = 4
LIMIT_S = 120  # per spawned group; the collectives time out after 60 s


def _matrix() -> torch.Tensor:
    """A (N, N) float64 with eigenvalues EIGS (the top one of them double, 7) in a random basis."""
    rng = np.random.default_rng(3)
    U, _ = np.linalg.qr(rng.standard_normal((N, N)))
    A = (U * EIGS) @ U.T
    return torch.from_numpy((A + A.T) / 2)


class RowSharded(LinearOperator):
    """Rows ``sizes[rank]`` of a global symmetric A on each rank; raises KeyboardInterrupt
    once it has applied ``after`` columns (on every rank at the same product)."""

    def __init__(self, A: torch.Tensor, sizes: tuple[int, ...], after: int | None = None):
        rank = dist.get_rank()
        lo = sum(sizes[:rank])
        super().__init__((sizes[rank], sizes[rank]), A.dtype, "cpu")
        self.rows = A[lo : lo + sizes[rank]]
        self.after = after
        self.shards = Shards.from_local(sizes[rank])

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self.after is not None and self.num_matvecs >= self.after:
            raise KeyboardInterrupt
        width = max(self.shards.local_sizes)
        buf = V.new_zeros(width, V.shape[1])
        buf[: V.shape[0]] = V
        parts = [torch.empty_like(buf) for _ in range(self.shards.world)]
        dist.all_gather(parts, buf)
        full = torch.cat([p[:s] for p, s in zip(parts, self.shards.local_sizes)])
        return self.rows @ full


def _spawn(worker, world: int, *args) -> None:
    """Run ``worker(rank, world, port, *args)`` on ``world`` processes; fail after LIMIT_S."""
    ctx = mp.spawn(worker, args=(world, _free_port(), *args), nprocs=world, join=False)
    deadline = time.monotonic() + LIMIT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{worker.__name__} on {world} ranks did not finish in {LIMIT_S} s")


def _count_reduces(op: RowSharded, fn):
    """(fn(), the number of all-reduces fn made through op.shards.reduce_)."""
    calls = []
    inner = Shards.reduce_

    def counting(self, t):
        calls.append(t.numel())
        return inner(self, t)

    Shards.reduce_ = counting
    try:
        return fn(), len(calls)
    finally:
        Shards.reduce_ = inner


def _solve_worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        op = RowSharded(_matrix(), SIZES[world])
        res = hl.lanczos(op, k=K, seed=5)
        top = hl.gather_shards(op, res.eigenvectors)
        slq, reduces = _count_reduces(op, lambda: hl.spectral_density(op, num_steps=6, num_probes=16, seed=2))
        full = hl.spectral_density(op, num_steps=N, num_probes=2, seed=4)  # exhausts: exact nodes
        traces = {m: hl.trace(op, 60, method=m, seed=1) for m in ("hutchinson", "hutch++")}
        exact_pp = hl.trace(op, 3 * N, method="hutch++", seed=1)  # the sketch spans everything
        torch.save({"eig": res, "top": top, "local_vectors": res.eigenvectors, "slq": slq, "reduces": reduces,
                    "full": full, "traces": traces, "exact_pp": exact_pp}, Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_solvers_match_the_dense_matrix_and_agree_on_every_rank(tmp_path, world):
    _spawn(_solve_worker, world, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    A = _matrix().numpy()
    lam, U = np.linalg.eigh(A)
    lam, U = lam[::-1], U[:, ::-1]
    eig = got[0]["eig"]
    # lanczos: the top k (7 twice) to tight tolerance, certified, with small measured residuals
    np.testing.assert_allclose(eig.eigenvalues.numpy(), lam[:K], rtol=0, atol=1e-10)
    assert bool(eig.converged.all()) and float(eig.residuals.max()) < 1e-7
    for r, g in enumerate(got):  # identical scalars on every rank; local vector shards
        assert torch.equal(g["eig"].eigenvalues, eig.eigenvalues) and torch.equal(g["eig"].residuals, eig.residuals)
        assert g["local_vectors"].shape == (SIZES[world][r], K)
        assert (g["top"] is None) == (r != 0)
    V = got[0]["top"].numpy()  # (N, K) gathered on rank 0
    assert np.allclose(V[:, [0, 3]] * np.sign((V[:, [0, 3]] * U[:, [0, 3]]).sum(0)), U[:, [0, 3]], atol=1e-7)
    P = U[:, 1:3] @ U[:, 1:3].T  # the double eigenvalue: compare the eigenspace
    assert np.abs(V[:, 1:3] @ V[:, 1:3].T - P).max() < 1e-7
    assert np.abs(V.T @ V - np.eye(K)).max() < 1e-10
    # SLQ: moments within 5 standard errors; nodes and weights identical on every rank
    slq = got[0]["slq"]
    for p in (1, 2, 3, 4):
        est = slq.moments(p)
        exact = float((EIGS**p).mean())
        assert abs(est.mean() - exact) <= 5 * est.std(ddof=1) / np.sqrt(len(est)) + 1e-12, p
    full = got[0]["full"]
    distinct = np.unique(EIGS)
    for i in range(2):  # N steps span the space: the nodes are eigenvalues, every distinct one among them
        x = full.nodes[i, : int(full.num_steps[i])]
        nearest = np.abs(x[:, None] - distinct[None]).argmin(1)
        assert np.abs(x - distinct[nearest]).max() < 1e-9 and set(nearest) == set(range(len(distinct)))
    for g in got:
        for key in ("slq", "full"):
            for field in ("nodes", "weights", "num_steps"):
                mine, first = getattr(g[key], field), getattr(got[0][key], field)
                assert torch.equal(torch.as_tensor(mine), torch.as_tensor(first)), (key, field)
        assert torch.equal(torch.as_tensor(g["slq"].density), torch.as_tensor(slq.density))
    # trace: within 5 standard errors; Hutch++ with a full sketch is exact; identical on every rank
    exact = float(EIGS.sum())
    for method, t in got[0]["traces"].items():
        assert t.num_matvecs == 60 and abs(t.value - exact) <= 5 * t.std_error, method
    # A has the eigenvalue 0 (the linspace's 9th point), so the full sketch has rank N - 1: CholeskyQR2
    # drops one direction and Q A costs one product less
    assert abs(got[0]["exact_pp"].value - exact) < 1e-9 and got[0]["exact_pp"].num_matvecs == 3 * N - 1
    for g in got:
        for method in ("hutchinson", "hutch++"):
            assert (g["traces"][method].value, g["traces"][method].std_error) == (
                got[0]["traces"][method].value, got[0]["traces"][method].std_error)
        assert g["exact_pp"].value == got[0]["exact_pp"].value
    # all-reduces: the start norms, the checkpoint identity at step 0, then 2 per step
    assert [g["reduces"] for g in got] == [1 + 1 + 2 * 6] * world


def _errors(fn) -> str | None:
    try:
        fn()
    except HesslabError as err:
        return str(err)
    return None


def _checkpoint_worker(rank: int, world: int, port: int, out: str, phase: str) -> None:
    with gloo_group(rank, world, port):
        path = Path(out) / "run.ckpt"
        A = _matrix()
        kw = dict(k=K, seed=5, checkpoint=path, checkpoint_every=3)
        results = {}
        if phase == "write":
            results["whole"] = hl.lanczos(RowSharded(A, SIZES[world]), **{**kw, "checkpoint": None})
            try:
                hl.lanczos(RowSharded(A, SIZES[world], after=11), **kw)
                raise AssertionError("the run was not interrupted")
            except KeyboardInterrupt:
                pass
            results["steps"] = torch.load(f"{path}.rank{rank}of{world}", weights_only=True)["j"]
            results["resumed"] = hl.lanczos(RowSharded(A, SIZES[world]), **kw)
            other = (SIZES[world][1], SIZES[world][0]) + SIZES[world][2:]  # the same world, other local sizes
            results["sizes_error"] = _errors(lambda: hl.lanczos(RowSharded(A, other), **kw))
            results["slq_error"] = _errors(lambda: hl.spectral_density(RowSharded(A, SIZES[world]), 5, 2,
                                                                      checkpoint=path))
        else:  # another world size on the files of the write phase
            results["world_error"] = _errors(lambda: hl.lanczos(RowSharded(A, SIZES[world]), **kw))
        torch.save(results, Path(out) / f"{phase}{rank}.pt")


def test_sharded_checkpoints_resume_together_and_refuse_another_layout_on_every_rank(tmp_path):
    _spawn(_checkpoint_worker, 2, str(tmp_path), "write")
    got = [torch.load(tmp_path / f"write{r}.pt", weights_only=False) for r in range(2)]
    assert sorted(p.name for p in tmp_path.glob("run.ckpt*")) == ["run.ckpt.rank0of2", "run.ckpt.rank1of2"]
    for g in got:
        assert 0 < g["steps"] < got[0]["whole"].num_steps  # interrupted part-way, resumed from there
        for field in ("eigenvalues", "residuals", "eigenvectors", "converged"):
            assert torch.equal(getattr(g["resumed"], field), getattr(g["whole"], field)), field
        assert g["resumed"].num_steps == g["whole"].num_steps
        assert torch.equal(g["whole"].eigenvalues, got[0]["whole"].eigenvalues)
    for key, words in (("sizes_error", "shard layout"), ("slq_error", "different arguments")):
        assert got[0][key] is not None and words in got[0][key], got[0][key]
        assert got[1][key] == got[0][key]  # the same error on every rank
    _spawn(_checkpoint_worker, 4, str(tmp_path), "resume")
    errors = [torch.load(tmp_path / f"resume{r}.pt")["world_error"] for r in range(4)]
    assert errors[0] is not None and "run on [2] rank(s)" in errors[0] and "this run has 4" in errors[0]
    assert errors == [errors[0]] * 4


def test_a_rank_file_missing_is_refused_on_every_rank(tmp_path):
    _spawn(_missing_worker, 2, str(tmp_path))
    errors = [(tmp_path / f"missing{r}.txt").read_text() for r in range(2)]
    assert "ranks [0] of 2 found their files" in errors[0] and errors[1] == errors[0]


def _missing_worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        path = Path(out) / "run.ckpt"
        op = RowSharded(_matrix(), SIZES[world])
        hl.spectral_density(op, 4, 2, checkpoint=path)
        dist.barrier()
        if rank == 1:
            Path(f"{path}.rank1of2").unlink()
        dist.barrier()
        (Path(out) / f"missing{rank}.txt").write_text(str(_errors(lambda: hl.spectral_density(op, 4, 2,
                                                                                            checkpoint=path))))


# ---------------------------------------------------------------- in process, one rank

def _one_rank(n: int) -> Shards:
    return Shards(0, 1, (n,))


def _basis(b: int, m: int, n: int, j: int, dtype: torch.dtype, seed: int = 0):
    """(Q with rows 0..j orthonormal from reference steps, a fresh A q_j, beta_prev)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = (A + A.T) / 2
    Q = torch.zeros(b, m, n, dtype=dtype)
    q0 = torch.randn(b, n, generator=g, dtype=torch.float64)
    Q[:, 0] = (q0 / q0.norm(dim=1, keepdim=True)).to(dtype)
    beta = torch.zeros(b, dtype=torch.float64)
    for i in range(j):
        w = (Q[:, i].double() @ A).to(dtype)
        _, beta, _ = reference.lanczos_step(Q, w, beta, i, 1e-10, accumulate=torch.float64)
    return Q, (Q[:, j].double() @ A).to(dtype), beta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("j", [0, 1, 5])
def test_the_sharded_step_matches_the_reference_step(dtype, j):
    Q, w, beta_prev = _basis(3, 8, 40, j, dtype)
    Q2, w2 = Q.clone(), w.clone()
    a_ref, b_ref, br_ref = reference.lanczos_step(Q, w, beta_prev, j, 1e-10, accumulate=torch.float64)
    extra = torch.arange(4, dtype=torch.float64).reshape(2, 2)
    alpha, beta, broke, out = _sharded.lanczos_step(_one_rank(40), Q2, w2, beta_prev, j, 1e-10, extra)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(alpha, a_ref, rtol=rtol, atol=rtol * float(b_ref.max()))
    torch.testing.assert_close(beta, b_ref, rtol=rtol, atol=0)
    assert torch.equal(broke, br_ref) and not bool(broke.any())
    torch.testing.assert_close(Q2[:, j + 1], Q[:, j + 1], rtol=0, atol=10 * torch.finfo(dtype).eps)
    assert torch.equal(out, extra)  # reduced with pass 1 (the identity on one rank)
    G = Q2[:, : j + 2].double() @ Q2[:, : j + 2].double().transpose(1, 2)
    assert float((G - torch.eye(j + 2)).abs().max()) < 100 * torch.finfo(dtype).eps


def test_the_sharded_step_breaks_down_on_an_invariant_space_and_keeps_nan():
    Q, _, beta_prev = _basis(3, 6, 30, 2, torch.float64)
    w = torch.stack([2 * Q[0, 1] - Q[0, 0], torch.zeros(30, dtype=torch.float64), Q[2, 2]])  # in span / zero / in span
    _, beta, broke, _ = _sharded.lanczos_step(_one_rank(30), Q, w.clone(), beta_prev, 2, 1e-10)
    assert bool(broke.all()) and bool((beta < 1e-13).all())
    assert torch.equal(Q[:, 3], torch.zeros(3, 30, dtype=torch.float64))
    Q, w, beta_prev = _basis(2, 6, 30, 2, torch.float64)
    w[1, 4] = float("nan")
    alpha, beta, broke, _ = _sharded.lanczos_step(_one_rank(30), Q, w, beta_prev, 2, 1e-10)
    assert bool(beta[1].isnan()) and bool(alpha[1].isnan()) and not bool(broke[0])
    assert torch.equal(Q[1, 3], torch.zeros(30, dtype=torch.float64)) and bool(torch.isfinite(Q[0, 3]).all())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), k=st.integers(1, 12), rank=st.integers(0, 12), seed=st.integers(0, 2**20))
def test_cholesky_qr2_gives_an_orthonormal_basis_of_the_range(n, k, rank, seed):
    k, rank = min(k, n), min(rank, k, n)
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, k, generator=g, dtype=torch.float64)
    if rank == 0:
        Y = torch.randn(n, k, generator=g, dtype=torch.float64)  # full rank instead of the zero matrix
        rank = k
    Q = _sharded.cholesky_qr2(_one_rank(n), Y)
    assert Q.shape == (n, rank)
    assert float((Q.T @ Q - torch.eye(rank)).abs().max()) < 1e-13
    assert float((Y - Q @ (Q.T @ Y)).abs().max()) < 1e-10 * max(1.0, float(Y.abs().max()))  # Y lies in range(Q)


class _OneRankDense(DenseOperator):
    """A dense operator that calls itself sharded over one rank: the solvers' sharded paths in process."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__(matrix)
        self.shards = _one_rank(matrix.shape[0])


def test_the_sharded_paths_on_one_rank_match_numpy(tmp_path):
    A = _matrix()
    op = _OneRankDense(A)
    lam = np.linalg.eigvalsh(A.numpy())[::-1]
    res = hl.lanczos(op, k=K, seed=1, checkpoint=tmp_path / "c")
    np.testing.assert_allclose(res.eigenvalues.numpy(), lam[:K], atol=1e-10)
    assert bool(res.converged.all()) and (tmp_path / "c.rank0of1").exists()
    v0 = hl.lanczos(op, k=K, seed=1, v0=res.eigenvectors)  # a warm start: the local shards are the vectors
    np.testing.assert_allclose(v0.eigenvalues.numpy(), lam[:K], atol=1e-10)
    assert torch.equal(hl.gather_shards(op, res.eigenvectors), res.eigenvectors)
    t = hl.trace(op, 3 * N, method="hutch++")
    assert abs(t.value - float(EIGS.sum())) < 1e-9
    with pytest.raises(HesslabError, match="v0 must be this rank's shard"):
        hl.lanczos(op, k=K, v0=torch.ones(N + 1, dtype=torch.float64))
    with pytest.raises(HesslabError, match="eigh_exact: the operator is sharded"):
        hl.eigh_exact(op)


@pytest.mark.parametrize("reorthogonalize", ["full", "local"])
def test_one_rank_sharded_runs_agree_with_the_compiled_path_to_rounding(reorthogonalize):
    """Shards(0, 1).seed(s) is s·1000003: the unsharded run with that seed draws the same
    vectors, so the torch-op sharded step and the compiled lanczos_step_ must agree to rounding."""
    A = _matrix()
    seed = 3
    plain, sharded = DenseOperator(A), _OneRankDense(A)
    assert sharded.shards.seed(seed) == seed * 1_000_003
    a = hl.spectral_density(plain, 8, 3, seed=seed * 1_000_003, reorthogonalize=reorthogonalize)
    b = hl.spectral_density(sharded, 8, 3, seed=seed, reorthogonalize=reorthogonalize)
    np.testing.assert_allclose(b.nodes, a.nodes, atol=1e-10)
    np.testing.assert_allclose(b.weights, a.weights, atol=1e-10)
    for method in ("hutchinson", "hutch++"):
        ta, tb = hl.trace(plain, 30, method, seed=seed * 1_000_003), hl.trace(sharded, 30, method, seed=seed)
        assert abs(ta.value - tb.value) < 1e-10 and abs(ta.std_error - tb.std_error) < 1e-10, method
    if reorthogonalize == "full":
        la, lb = hl.lanczos(plain, K, seed=seed * 1_000_003), hl.lanczos(sharded, K, seed=seed)
        np.testing.assert_allclose(lb.eigenvalues.numpy(), la.eigenvalues.numpy(), atol=1e-11)
        assert lb.num_steps == la.num_steps and lb.restarts == la.restarts
