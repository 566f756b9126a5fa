"""The compiled Lanczos ops against their pure-torch twins and by their own properties."""

from __future__ import annotations

import pytest
import torch

from hesslab import _ops, reference
from hesslab.errors import HesslabError

SHAPES = [(1, 1, 1), (2, 1, 17), (3, 5, 37), (1, 4, 1000), (4, 12, 5003), (2, 3, 70001)]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def _basis(b: int, m: int, n: int, filled: int, dtype, device) -> torch.Tensor:
    """(b, m, n) with orthonormal rows 0..filled-1 and garbage after (the kernels must not read it)."""
    Q = torch.randn(b, m, n, dtype=torch.float64, device=device)
    k = min(filled, n)
    if b and k:
        q, _ = torch.linalg.qr(torch.randn(b, n, k, dtype=torch.float64, device=device))
        Q[:, :k] = q.transpose(1, 2)
    return Q.to(dtype)


@pytest.mark.parametrize("shape", SHAPES + [(0, 3, 10)], ids=str)
def test_step_matches_twin(shape, dtype, device):
    b, m, n = shape
    for j in sorted({0, m // 2, m - 1}):
        if j + 1 > n:
            continue
        Q = _basis(b, m, n, j + 1, dtype, device)
        w = torch.randn(b, n, dtype=dtype, device=device)
        beta_prev = torch.rand(b, dtype=torch.float64, device=device)
        Q2, w2 = Q.clone(), w.clone()
        a, bt, br = _ops.lanczos_step_(Q, w, beta_prev, j, 1e-10)
        a2, bt2, br2 = reference.lanczos_step(Q2, w2, beta_prev, j, 1e-10, accumulate=torch.float64)
        assert a.dtype == bt.dtype == torch.float64 and br.dtype == torch.bool
        assert a.shape == bt.shape == br.shape == (b,)
        scale = 1 + bt2.abs().max().item() if b else 1
        torch.testing.assert_close(a, a2, rtol=TOL[dtype], atol=TOL[dtype] * scale)
        torch.testing.assert_close(bt, bt2, rtol=TOL[dtype], atol=TOL[dtype] * scale)
        assert torch.equal(br, br2)
        torch.testing.assert_close(w, w2, rtol=TOL[dtype], atol=TOL[dtype] * scale)
        torch.testing.assert_close(Q, Q2, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES + [(0, 3, 10)], ids=str)
def test_reorthogonalize_matches_twin(shape, dtype, device):
    b, m, n = shape
    for j in sorted({0, min(m, n) // 2, min(m, n)}):
        Q = _basis(b, m, n, j, dtype, device)
        w = torch.randn(b, n, dtype=dtype, device=device)
        w2 = w.clone()
        c = _ops.reorthogonalize_(Q, w, j)
        c2 = reference.reorthogonalize(Q, w2, j, accumulate=torch.float64)
        assert c.shape == (b, j) and c.dtype == torch.float64
        torch.testing.assert_close(c, c2, rtol=TOL[dtype], atol=TOL[dtype] * 10)
        torch.testing.assert_close(w, w2, rtol=TOL[dtype], atol=TOL[dtype] * 10)
        if j and b:  # w is now orthogonal to the first j rows
            proj = torch.einsum("bjn,bn->bj", Q[:, :j].double(), w.double())
            assert proj.abs().max() <= TOL[dtype] * 10 * w.double().norm(dim=1).max()


def test_second_update_runs_where_one_pass_is_not_enough(dtype, device):
    """Run 0's w lies almost in span(Q) (1e-6 of it outside): one Gram–Schmidt pass leaves
    it far from orthogonal, so the second update must run. Run 1's random w is orthogonal to
    working precision after one pass. Both must end orthogonal to working precision."""
    b, m, n, j = 2, 8, 4000, 8
    Q = _basis(b, m, n, j, torch.float64, device)
    gen = torch.Generator(device=device).manual_seed(0)
    inside = torch.einsum("bj,bjn->bn", torch.randn(b, j, dtype=torch.float64, device=device, generator=gen), Q)
    noise = torch.randn(b, n, dtype=torch.float64, device=device, generator=gen)
    w64 = torch.stack([inside[0] + 1e-6 * noise[0] / noise[0].norm() * inside[0].norm(), noise[1]])
    Q, w = Q.to(dtype), w64.to(dtype)
    eps = torch.finfo(dtype).eps
    first = w.double() - torch.einsum("bj,bjn->bn", torch.einsum("bjn,bn->bj", Q.double(), w.double()), Q.double())
    one_pass = torch.einsum("bjn,bn->bj", Q.double(), first.to(dtype).double()).norm(dim=1) / first.norm(dim=1)
    assert one_pass[0] > 100 * eps  # the case needs the second update
    _ops.reorthogonalize_(Q, w, j)
    after = torch.einsum("bjn,bn->bj", Q.double(), w.double()).norm(dim=1) / w.double().norm(dim=1)
    assert (after <= 4 * eps).all(), after


def test_results_do_not_depend_on_the_thread_count():
    """The CPU kernels cut work into fixed segments: 1 and 2 threads agree bitwise."""
    b, m, n, j = 3, 6, 300_001, 4
    Q = _basis(b, m, n, j + 1, torch.float32, "cpu")
    w = torch.randn(b, n)
    bp = torch.rand(b, dtype=torch.float64)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            Qt, wt = Q.clone(), w.clone()
            outs.append((*_ops.lanczos_step_(Qt, wt, bp, j, 1e-10), Qt, wt, _ops.reorthogonalize_(Qt, wt.clone(), j)))
    finally:
        torch.set_num_threads(before)
    for x, y in zip(*outs):
        assert torch.equal(x, y)


def test_non_contiguous_mutated_arguments_are_refused(dtype, device):
    """Q and w are written in place: a strided one is refused with its name (it used to be
    computed on a contiguous copy and copied back, the whole basis twice per step)."""
    b, m, n, j = 3, 6, 101, 2
    Qc = _basis(b, m, n, j + 1, dtype, device)
    Q = Qc.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided (b, m, n)
    assert not Q.is_contiguous()
    w = torch.randn(n, b, dtype=dtype, device=device).t()
    assert not w.is_contiguous()
    beta_prev = torch.rand(b, dtype=torch.float64, device=device)
    Q0, w0 = Q.clone(), w.clone()
    with pytest.raises(HesslabError, match="argument 'Q' is written in place and must be contiguous"):
        _ops.lanczos_step_(Q, w.contiguous(), beta_prev, j, 1e-10)
    with pytest.raises(HesslabError, match="argument 'w' is written in place and must be contiguous"):
        _ops.lanczos_step_(Qc.clone(), w, beta_prev, j, 1e-10)
    with pytest.raises(HesslabError, match="argument 'w' is written in place and must be contiguous"):
        _ops.reorthogonalize_(Qc, w, j)
    assert torch.equal(Q, Q0) and torch.equal(w, w0)  # nothing was written


def test_non_contiguous_read_only_arguments_are_fine(dtype, device):
    """reorthogonalize_ only reads Q, lanczos_step_ only reads beta_prev: strided ones work."""
    b, m, n, j = 3, 6, 101, 2
    Qc = _basis(b, m, n, j + 1, dtype, device)
    Q = Qc.transpose(1, 2).contiguous().transpose(1, 2)
    w = torch.randn(b, n, dtype=dtype, device=device)
    w2 = w.clone()
    c = _ops.reorthogonalize_(Q, w, j)
    c2 = reference.reorthogonalize(Qc, w2, j, accumulate=torch.float64)
    torch.testing.assert_close(c, c2, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(w, w2, rtol=TOL[dtype], atol=TOL[dtype])
    beta_prev = torch.rand(2 * b, dtype=torch.float64, device=device)[::2]
    Q1, Q2, w = Qc.clone(), Qc.clone(), torch.randn(b, n, dtype=dtype, device=device)
    w2 = w.clone()
    out = _ops.lanczos_step_(Q1, w, beta_prev, j, 1e-10)
    ref = reference.lanczos_step(Q2, w2, beta_prev, j, 1e-10, accumulate=torch.float64)
    for x, y in zip(out, ref):
        torch.testing.assert_close(x, y, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(Q1, Q2, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(w, w2, rtol=TOL[dtype], atol=TOL[dtype])


def _run_lanczos(A: torch.Tensor, b: int, m: int, dtype, step=_ops.lanczos_step_):
    """m Lanczos steps on symmetric A (n, n) for b random starts; returns Q, alphas, betas."""
    n = A.shape[0]
    Q = torch.zeros(b, m, n, dtype=dtype, device=A.device)
    v = torch.randn(b, n, dtype=torch.float64, device=A.device)
    Q[:, 0] = (v / v.norm(dim=1, keepdim=True)).to(dtype)
    beta = torch.zeros(b, dtype=torch.float64, device=A.device)
    alphas, betas = [], []
    for j in range(m):
        w = (Q[:, j].double() @ A).to(dtype)
        alpha, beta, br = step(Q, w, beta, j, 1e-10)
        assert not br.any()
        alphas.append(alpha)
        betas.append(beta)
    return Q, torch.stack(alphas, 1), torch.stack(betas, 1)


def test_full_run_is_orthogonal_and_tridiagonalises(device):
    torch.manual_seed(1)
    n, m, b = 300, 80, 3
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, device=device))
    lam = torch.logspace(-3, 2, n, dtype=torch.float64, device=device)
    A = (U * lam) @ U.T
    Q, alphas, betas = _run_lanczos(A, b, m, torch.float64)
    eye = torch.eye(m, dtype=torch.float64, device=device)
    for i in range(b):
        err = (Q[i] @ Q[i].T - eye).abs().max().item()
        assert err < 1e-13, err
        T = torch.diag(alphas[i]) + torch.diag(betas[i, :-1], 1) + torch.diag(betas[i, :-1], -1)
        torch.testing.assert_close(Q[i] @ A @ Q[i].T, T, atol=1e-10, rtol=0)
    # Ritz values converge to the extreme eigenvalues.
    T0 = torch.diag(alphas[0]) + torch.diag(betas[0, :-1], 1) + torch.diag(betas[0, :-1], -1)
    assert abs(torch.linalg.eigvalsh(T0)[-1].item() - lam[-1].item()) < 1e-8 * lam[-1].item()


def test_float32_storage_with_float64_accumulation(device):
    """float32 bases stay orthogonal to ~1e-6 after many steps; the float32-GEMM twin is reported."""
    torch.manual_seed(2)
    n, m, b = 2000, 120, 2
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, device=device))
    A = (U * torch.logspace(-4, 3, n, dtype=torch.float64, device=device)) @ U.T
    eye = torch.eye(m, dtype=torch.float64, device=device)

    def ortho(Q):
        Qd = Q.double()
        return max((Qd[i] @ Qd[i].T - eye).abs().max().item() for i in range(b))

    torch.manual_seed(3)
    err_kernel = ortho(_run_lanczos(A, b, m, torch.float32)[0])
    torch.manual_seed(3)
    err_twin = ortho(_run_lanczos(A, b, m, torch.float32, step=reference.lanczos_step)[0])
    print(f"\n||QᵀQ − I||_max after {m} steps, float32 storage: kernel {err_kernel:.2e}, float32 GEMM twin {err_twin:.2e}")
    assert err_kernel < 5e-6


def test_breakdown_reports_and_never_nans(dtype, device):
    n, m, b = 50, 8, 2
    lam = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, device=device).repeat_interleave(torch.tensor([20, 20, 10], device=device))
    A = torch.diag(lam)  # three distinct eigenvalues: the Krylov space has dimension 3
    Q = torch.zeros(b, m, n, dtype=dtype, device=device)
    Q[:, 0] = 1 / n**0.5
    beta = torch.zeros(b, dtype=torch.float64, device=device)
    flags = []
    for j in range(4):
        w = (Q[:, j].double() @ A).to(dtype)
        _, beta, br = _ops.lanczos_step_(Q, w, beta, j, 1e-4 if dtype == torch.float32 else 1e-10)
        flags.append(br)
    assert not torch.stack(flags[:2]).any() and flags[2].all()
    assert torch.isfinite(Q).all() and (Q[:, 3] == 0).all()
    # A zero product (the null space) is a breakdown too.
    w = torch.zeros(b, n, dtype=dtype, device=device)
    _, beta, br = _ops.lanczos_step_(Q, w, beta, 4, 1e-10)
    assert br.all() and (beta == 0).all() and torch.isfinite(Q).all()


def test_bad_arguments_name_the_argument(device):
    Q = torch.zeros(2, 4, 10, device=device)
    w = torch.zeros(2, 10, device=device)
    bp = torch.zeros(2, dtype=torch.float64, device=device)
    cases = [
        ((Q, w[:, :5], bp, 0), "'w'"),
        ((Q, w.double(), bp, 0), "'w'"),
        ((Q, w, bp.float(), 0), "'beta_prev'"),
        ((Q, w, bp[:1], 0), "'beta_prev'"),
        ((Q, w, bp, 4), "'j'"),
        ((Q, w, bp, -1), "'j'"),
        ((Q[0], w, bp, 0), "'Q'"),
        ((Q.long(), w.long(), bp, 0), "'Q'"),
        ((Q, w, bp.to("meta"), 0), "'beta_prev'"),
    ]
    for args, name in cases:
        with pytest.raises(HesslabError, match=name):
            _ops.lanczos_step_(*args)
    with pytest.raises(HesslabError, match="'j'"):
        _ops.reorthogonalize_(Q, w, 5)
    with pytest.raises(HesslabError, match="'w'"):
        _ops.reorthogonalize_(Q, w[:1], 2)


def test_cuda_tensor_without_cuda_kernels_gets_a_hesslab_error(monkeypatch):
    monkeypatch.setattr(_ops, "has_kernel", lambda op, dev: dev == "cpu")
    Q = torch.zeros(1, 2, 3, device="meta")
    with pytest.raises(HesslabError, match="no META kernel"):
        _ops.reorthogonalize_(Q, torch.zeros(1, 3, device="meta"), 1)


def test_opcheck(dtype, device):
    Q = _basis(2, 5, 33, 3, dtype, device)
    w = torch.randn(2, 33, dtype=dtype, device=device)
    bp = torch.rand(2, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.hesslab.lanczos_step_.default, (Q, w, bp, 2, 1e-10))
    torch.library.opcheck(torch.ops.hesslab.reorthogonalize_.default, (Q, w, 3))


def test_under_torch_compile(device):
    Q = _basis(2, 4, 20, 2, torch.float64, device)
    w = torch.randn(2, 20, dtype=torch.float64, device=device)
    bp = torch.rand(2, dtype=torch.float64, device=device)

    def step(Q, w, bp):
        a, b, br = torch.ops.hesslab.lanczos_step_(Q, w, bp, 1, 1e-10)
        return a * 2, b, br

    Q2, w2 = Q.clone(), w.clone()
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(Q, w, bp)
    ref = reference.lanczos_step(Q2, w2, bp, 1, 1e-10, accumulate=torch.float64)
    torch.testing.assert_close(out[0], ref[0] * 2)
    torch.testing.assert_close(Q, Q2)


# ---------------------------------------------------------------- gs_sweep_ (one sweep, for sharded steps)

@pytest.mark.parametrize("shape", SHAPES + [(0, 3, 10), (2, 3, 0)], ids=str)
def test_gs_sweep_matches_twin(shape, dtype, device):
    b, m, n = shape
    for rows in sorted({0, m // 2, m}):
        Q = _basis(b, m, n, rows, dtype, device)
        for with_coef in (False, True):
            for dots in (True, False):
                w = torch.randn(b, n, dtype=dtype, device=device)
                coef = torch.randn(b, rows, dtype=torch.float64, device=device) if with_coef else None
                w2 = w.clone()
                out = _ops.gs_sweep_(Q, w, coef, rows, dots)
                ref = reference.gs_sweep(Q, w2, coef, rows, dots)
                assert out.shape == (b, rows + 1 if dots else 1) and out.dtype == torch.float64
                assert out.device == Q.device
                scale = 1 + (w2.abs().max().item() ** 2 * max(n, 1) if b * n else 0)
                torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype] * scale)
                torch.testing.assert_close(w, w2, rtol=TOL[dtype], atol=TOL[dtype] * 10)
                if not with_coef:
                    assert torch.equal(w, w2)  # no update: w untouched


def test_gs_sweep_three_sweeps_are_cgs2(dtype, device):
    """Sums, update + sums, update: the coefficients and w of reorthogonalize_ (to rounding)."""
    b, m, n, rows = 3, 7, 301, 5
    Q = _basis(b, m, n, rows, dtype, device)
    w = torch.randn(b, n, dtype=dtype, device=device)
    w2 = w.clone()
    s1 = _ops.gs_sweep_(Q, w, None, rows)
    d = s1[:, :rows].contiguous()
    s2 = _ops.gs_sweep_(Q, w, d, rows)
    c = s2[:, :rows].contiguous()
    s3 = _ops.gs_sweep_(Q, w, c, rows, dots=False)
    coeff = reference.reorthogonalize(Q, w2, rows, accumulate=torch.float64)
    torch.testing.assert_close(d + c, coeff, rtol=TOL[dtype], atol=TOL[dtype] * 10)
    torch.testing.assert_close(w, w2, rtol=TOL[dtype], atol=TOL[dtype] * 10)
    torch.testing.assert_close(s1[:, rows], w2.new_tensor(0).double() + (d.pow(2).sum(1) + s2[:, rows]),
                               rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0)  # Pythagoras
    torch.testing.assert_close(s3[:, 0], s2[:, rows] - c.pow(2).sum(1), rtol=1e-4, atol=1e-10)


def test_gs_sweep_non_contiguous_and_bad_arguments(dtype, device):
    b, m, n, rows = 2, 4, 33, 3
    Qc = _basis(b, m, n, rows, dtype, device)
    Q = Qc.transpose(1, 2).contiguous().transpose(1, 2)  # read only: a strided Q is fine
    coef = torch.randn(rows, b, dtype=torch.float64, device=device).t()  # strided coef too
    w = torch.randn(b, n, dtype=dtype, device=device)
    w2 = w.clone()
    torch.testing.assert_close(_ops.gs_sweep_(Q, w, coef, rows), reference.gs_sweep(Qc, w2, coef, rows),
                               rtol=TOL[dtype], atol=TOL[dtype] * 100)
    wt = torch.randn(n, b, dtype=dtype, device=device).t()
    cases = [
        ((Qc, wt, None, rows), "argument 'w' is written in place and must be contiguous"),
        ((Qc, w, None, m + 1), "'rows'"),
        ((Qc, w, None, -1), "'rows'"),
        ((Qc, w, coef.float(), rows), "'coef'"),
        ((Qc, w, coef[:, :2], rows), "'coef'"),
        ((Qc, w[:1], None, rows), "'w'"),
        ((Qc, w, coef.to("meta"), rows), "'coef'"),
        ((Qc[:1], Qc[:1, rows], None, rows), "must not share memory"),  # w is a row of Q
    ]
    for args, match in cases:
        with pytest.raises(HesslabError, match=match):
            _ops.gs_sweep_(*args)


def test_gs_sweep_opcheck(dtype, device):
    Q = _basis(2, 5, 33, 3, dtype, device)
    w = torch.randn(2, 33, dtype=dtype, device=device)
    coef = torch.randn(2, 3, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.hesslab.gs_sweep_.default, (Q, w, coef, 3, True))
    torch.library.opcheck(torch.ops.hesslab.gs_sweep_.default, (Q, w, None, 3, False))
