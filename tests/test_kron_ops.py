"""The compiled Kronecker ops against dense kron products and their pure-torch twins."""

from __future__ import annotations

import pytest
import torch

from hesslab import _ops, reference
from hesslab.errors import HesslabError

LAYERS = [(3, 4), (1, 1), (5, 2), (7, 13), (10, 1)]  # (out, in)
TOL = {torch.float32: 1e-4, torch.float64: 1e-11}


def _spd(k: int, dtype, device, shift: float = 0.1) -> torch.Tensor:
    X = torch.randn(k, k + 2, dtype=torch.float64)
    return ((X @ X.T) / k + shift * torch.eye(k, dtype=torch.float64)).to(dtype=dtype, device=device)


def _factors(dtype, device, layers=LAYERS):
    A = [_spd(i, dtype, device) for _, i in layers]
    B = [_spd(o, dtype, device) for o, _ in layers]
    return A, B


def _dense(A, B) -> torch.Tensor:
    """The block-diagonal matrix diag(B_l ⊗ A_l) for row-major vec (float64)."""
    return torch.block_diag(*[torch.kron(b.double().contiguous(), a.double().contiguous()) for a, b in zip(A, B)])


@pytest.mark.parametrize("b", [0, 1, 3])
def test_kron_matmul_matches_dense_kron(b, dtype, device):
    A, B = _factors(dtype, device)
    N = sum(o * i for o, i in LAYERS)
    V = torch.randn(b, N, dtype=dtype, device=device)
    out = _ops.kron_matmul(A, B, V)
    assert out.shape == (b, N) and out.dtype == dtype
    expected = V.double() @ _dense(A, B).T
    torch.testing.assert_close(out.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(out, reference.kron_matmul(A, B, V), rtol=TOL[dtype], atol=TOL[dtype])


def test_kron_matmul_non_contiguous_and_unsymmetric(dtype, device):
    layers = [(6, 3), (2, 9)]
    A = [torch.randn(i, i, dtype=dtype, device=device).t() for _, i in layers]  # strided, not symmetric
    B = [torch.randn(o, o, dtype=dtype, device=device) for o, _ in layers]
    N = sum(o * i for o, i in layers)
    V = torch.randn(N, 4, dtype=dtype, device=device).t()
    assert not V.is_contiguous()
    expected = V.double() @ _dense(A, B).T
    torch.testing.assert_close(_ops.kron_matmul(A, B, V).double(), expected, rtol=TOL[dtype], atol=TOL[dtype])


def _eig(A, B):
    la, ua = zip(*[torch.linalg.eigh(a) for a in A])
    lb, ub = zip(*[torch.linalg.eigh(b) for b in B])
    return list(ua), list(la), list(ub), list(lb)


def test_kron_eig_apply_power_and_damped_inverse(dtype, device):
    A, B = _factors(dtype, device)
    UA, lamA, UB, lamB = _eig(A, B)
    N = sum(o * i for o, i in LAYERS)
    V = torch.randn(3, N, dtype=dtype, device=device)
    D = _dense(A, B)
    # power 1: the product itself
    out = _ops.kron_eig_apply(UA, lamA, UB, lamB, V, 1.0, 0.0)
    torch.testing.assert_close(out.double(), V.double() @ D.T, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    # power -1 with damping: (B ⊗ A + d I)^{-1}
    d = 0.3
    out = _ops.kron_eig_apply(UA, lamA, UB, lamB, V, -1.0, d)
    expected = torch.linalg.solve(D + d * torch.eye(N, dtype=torch.float64, device=device), V.double().T).T
    torch.testing.assert_close(out.double(), expected, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    # power 1/2, squared, is the product again
    half = _ops.kron_eig_apply(UA, lamA, UB, lamB, V, 0.5, 0.0)
    twice = _ops.kron_eig_apply(UA, lamA, UB, lamB, half, 0.5, 0.0)
    torch.testing.assert_close(twice.double(), V.double() @ D.T, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    ref = reference.kron_eig_apply(UA, lamA, UB, lamB, V, -1.0, d, torch.full((len(LAYERS),), -float("inf"), dtype=torch.float64, device=device))
    torch.testing.assert_close(_ops.kron_eig_apply(UA, lamA, UB, lamB, V, -1.0, d), ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_kron_topk_projection_matches_dense_eigenspace(dtype, device):
    tol = TOL[dtype] * 10
    layers = [(4, 5), (3, 6)]
    A, B = _factors(dtype, device, layers)
    UA, lamA, UB, lamB = _eig(A, B)
    k = 4
    thresholds, projectors = [], []
    for l in range(len(layers)):
        vals, ib, ia = _ops.kron_topk(lamB[l], lamA[l], k)
        thresholds.append(vals[-1].item())
        # the eigenvectors U_B[:, i] ⊗ U_A[:, j] span the top-k eigenspace of the dense block
        Uk = torch.stack([torch.kron(UB[l][:, i], UA[l][:, j]) for i, j in zip(ib.tolist(), ia.tolist())], 1)
        lam, U = torch.linalg.eigh(torch.kron(B[l].double(), A[l].double()))
        torch.testing.assert_close(vals.double(), lam.flip(0)[:k], atol=tol, rtol=tol)
        torch.testing.assert_close(Uk.double() @ Uk.double().T, U[:, -k:] @ U[:, -k:].T, atol=tol * 10, rtol=0)
        projectors.append(Uk @ Uk.T)
    N = sum(o * i for o, i in layers)
    V = torch.randn(2, N, dtype=dtype, device=device)
    thr = torch.tensor(thresholds, dtype=torch.float64, device=device)
    out = _ops.kron_eig_apply(UA, lamA, UB, lamB, V, 0.0, 0.0, thr)  # keeps exactly the k listed products
    torch.testing.assert_close(out.double(), V.double() @ torch.block_diag(*projectors).double(), atol=tol * 10, rtol=0)


@pytest.mark.parametrize("p,q,k", [(5, 7, 10), (1, 1, 1), (6, 3, 18), (4, 4, 0), (30, 40, 100)])
def test_kron_topk_mixed_signs(p, q, k, dtype, device):
    lamB = torch.randn(p, dtype=dtype, device=device)
    lamA = torch.randn(q, dtype=dtype, device=device)
    vals, ib, ia = _ops.kron_topk(lamB, lamA, k)
    rvals, _, _ = reference.kron_topk(lamB, lamA, k)
    assert vals.shape == ib.shape == ia.shape == (k,) and ib.dtype == torch.long
    torch.testing.assert_close(vals, rvals, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(vals, (lamB[ib] * lamA[ia]), rtol=TOL[dtype], atol=TOL[dtype])
    assert len(set(zip(ib.tolist(), ia.tolist()))) == k  # distinct pairs


def test_bad_arguments_name_the_argument(device):
    A, B = _factors(torch.float64, device, [(2, 3)])
    V = torch.randn(1, 6, dtype=torch.float64, device=device)
    with pytest.raises(HesslabError, match="'V'"):
        _ops.kron_matmul(A, B, V[:, :5])
    with pytest.raises(HesslabError, match=r"'A\[0\]'"):
        _ops.kron_matmul([A[0].float()], B, V)
    with pytest.raises(HesslabError, match=r"'B\[0\]'"):
        _ops.kron_matmul(A, [torch.randn(2, 3, dtype=torch.float64, device=device)], V)
    with pytest.raises(HesslabError, match="same number of layers"):
        _ops.kron_matmul(A + A, B, V)
    with pytest.raises(HesslabError, match="'k'"):
        _ops.kron_topk(torch.ones(2, device=device), torch.ones(3, device=device), 7)
    with pytest.raises(HesslabError, match="'lamA'"):
        _ops.kron_topk(torch.ones(2, device=device), torch.ones(3, dtype=torch.float64, device=device), 1)
    UA, lamA, UB, lamB = _eig(A, B)
    with pytest.raises(HesslabError, match="'thresholds'"):
        _ops.kron_eig_apply(UA, lamA, UB, lamB, V, 1.0, 0.0, torch.zeros(2, dtype=torch.float64, device=device))
    with pytest.raises(HesslabError, match=r"'lamA\[0\]'"):
        _ops.kron_eig_apply(UA, [lamA[0][:2]], UB, lamB, V)
    with pytest.raises(HesslabError, match="must be a torch.Tensor"):
        _ops.kron_matmul([A[0].numpy() if device.type == "cpu" else None], B, V)


def test_opcheck(dtype, device):
    A, B = _factors(dtype, device, [(3, 4), (2, 2)])
    UA, lamA, UB, lamB = _eig(A, B)
    V = torch.randn(2, 16, dtype=dtype, device=device)
    thr = torch.full((2,), -float("inf"), dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.hesslab.kron_matmul.default, (A, B, V))
    torch.library.opcheck(torch.ops.hesslab.kron_eig_apply.default, (UA, lamA, UB, lamB, V, -1.0, 0.1, thr))
    torch.library.opcheck(torch.ops.hesslab.kron_topk.default, (lamB[0], lamA[0], 5))


def test_under_torch_compile(device):
    A, B = _factors(torch.float64, device, [(3, 4)])
    V = torch.randn(2, 12, dtype=torch.float64, device=device)
    f = torch.compile(lambda V: torch.ops.hesslab.kron_matmul(A, B, V) + 1, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(V), reference.kron_matmul(A, B, V) + 1)


def test_opcheck_with_allow_tf32(device):
    A, B = _factors(torch.float32, device, [(3, 4)])
    UA, lamA, UB, lamB = _eig(A, B)
    V = torch.randn(2, 12, device=device)
    thr = torch.full((1,), -float("inf"), dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.hesslab.kron_matmul.default, (A, B, V, True))
    torch.library.opcheck(torch.ops.hesslab.kron_eig_apply.default, (UA, lamA, UB, lamB, V, 1.0, 0.0, thr, True))
    # the trailing argument is optional: calls without it keep their meaning
    torch.testing.assert_close(_ops.kron_matmul(A, B, V, allow_tf32=False), torch.ops.hesslab.kron_matmul(A, B, V))


# ---- ties in kron_topk: one rule on every device ----

def _topk_rule(lamB: torch.Tensor, lamA: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The documented tie rule, by brute force: float64 products descending; equal products
    by the larger row i; within a row the walk of a stable argsort of lamA (descending for
    lamB[i] >= 0: the larger j of equal lamA first; ascending for lamB[i] < 0)."""
    lb, la = lamB.double().cpu().tolist(), lamA.double().cpu().tolist()
    asc = torch.argsort(lamA.cpu(), stable=True).tolist()
    items = []
    for i, b in enumerate(lb):
        walk = asc[::-1] if b >= 0 else asc
        items += [(-(b * la[j]), -i, c, i, j) for c, j in enumerate(walk)]
    return [(i, j) for *_, i, j in sorted(items)[:k]]


@pytest.mark.parametrize("case", ["ties", "signed_ties", "float32_rounding"])
def test_kron_topk_ties_pick_the_same_pairs_on_every_device(case, dtype, device):
    if case == "ties":
        lamB, lamA = torch.tensor([1.0, 2.0, 2.0, 0.5, 4.0]), torch.tensor([2.0, 1.0, 1.0, 4.0, 0.5])
    elif case == "signed_ties":
        lamB, lamA = torch.tensor([-1.0, 1.0, -2.0, 2.0, 0.0]), torch.tensor([1.0, -1.0, 2.0, -2.0, 1.0])
    else:  # products that are distinct in float64 but equal once rounded to float32
        lamB = torch.tensor([1.0 + 2.0**-23, 1.0, 1.0 - 2.0**-24], dtype=torch.float64)
        lamA = torch.tensor([1.0 + 2.0**-23, 1.0 - 2.0**-23, 3.0], dtype=torch.float64)
    lamB, lamA = lamB.to(dtype=dtype, device=device), lamA.to(dtype=dtype, device=device)
    k = lamB.numel() * lamA.numel()
    vals, ib, ia = _ops.kron_topk(lamB, lamA, k)
    pairs = list(zip(ib.tolist(), ia.tolist()))
    assert pairs == _topk_rule(lamB, lamA, k)
    cvals, cib, cia = _ops.kron_topk(lamB.cpu(), lamA.cpu(), k)
    assert pairs == list(zip(cib.tolist(), cia.tolist()))  # the same pairs as the CPU kernel
    torch.testing.assert_close(vals.cpu(), cvals, rtol=0, atol=0)
    expected = (lamB.double()[ib] * lamA.double()[ia]).to(dtype)  # the float64 key, rounded once
    torch.testing.assert_close(vals, expected, rtol=0, atol=0)


# ---- the CUDA adapter's two GEMM paths (cuBLAS above the size threshold) ----

def _cuda_only(device):
    if device.type != "cuda":
        pytest.skip("the cuBLAS path and TF32 exist only on CUDA")


# out*in on both sides of KRON_CUBLAS_MIN_ELEMENTS = 16384, many tiny layers, a tall and a
# wide one, and a non-square layer wider than 128 (several 64 x 64 tiles and K steps).
THRESHOLD_LAYERS = [(64, 255), (64, 256), (3, 5), (130, 127), (1, 1), (1, 300), (300, 2), (2, 4)]


@pytest.mark.parametrize("threshold", [None, "0", "1000000000"], ids=["default", "all_cublas", "all_grouped"])
@pytest.mark.parametrize("b", [1, 3])
def test_cublas_path_matches_the_twin_across_the_threshold(threshold, b, dtype, device, monkeypatch):
    _cuda_only(device)
    if threshold is not None:
        monkeypatch.setenv("HESSLAB_KRON_CUBLAS_MIN", threshold)
    assert 64 * 255 < _ops.KRON_CUBLAS_MIN_ELEMENTS <= 64 * 256
    A, B = _factors(dtype, device, THRESHOLD_LAYERS)
    N = sum(o * i for o, i in THRESHOLD_LAYERS)
    V = torch.randn(b, N, dtype=dtype, device=device)
    A64, B64, V64 = [a.double().cpu() for a in A], [x.double().cpu() for x in B], V.double().cpu()
    tol = {torch.float32: 2e-5, torch.float64: 1e-12}[dtype]
    out = _ops.kron_matmul(A, B, V)
    expected = reference.kron_matmul(A64, B64, V64)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    UA, lamA, UB, lamB = _eig(A, B)
    thr = torch.full((len(A),), 0.05, dtype=torch.float64, device=device)  # cut some products
    out = _ops.kron_eig_apply(UA, lamA, UB, lamB, V, -0.5, 0.1, thr)
    expected = reference.kron_eig_apply([u.cpu() for u in UA], [x.cpu() for x in lamA], [u.cpu() for u in UB],
                                        [x.cpu() for x in lamB], V.cpu(), -0.5, 0.1, thr.cpu())
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.cpu(), expected, rtol=tol * 10, atol=tol * 10 * scale)
    again = _ops.kron_matmul(A, B, V)
    assert torch.equal(again, _ops.kron_matmul(A, B, V))  # run to run: the same bits


def test_bad_threshold_variable_is_refused(device, monkeypatch):
    _cuda_only(device)
    monkeypatch.setenv("HESSLAB_KRON_CUBLAS_MIN", "many")
    A, B = _factors(torch.float64, device, [(2, 3)])
    with pytest.raises(ValueError, match="HESSLAB_KRON_CUBLAS_MIN"):
        _ops.kron_matmul(A, B, torch.randn(1, 6, dtype=torch.float64, device=device))


def test_float32_is_not_tf32_unless_asked(device):
    """TF32 off by default even with torch's global TF32 switches on: a wide float32 product
    matches float64 to float32 rounding (~1e-6), not TF32's ~1e-3."""
    _cuda_only(device)
    layers = [(512, 512)]
    A, B = _factors(torch.float32, device, layers)
    V = torch.randn(4, 512 * 512, device=device)
    exact = reference.kron_matmul([a.double() for a in A], [x.double() for x in B], V.double())
    scale = exact.abs().max().item()
    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        fp32_err = (_ops.kron_matmul(A, B, V).double() - exact).abs().max().item() / scale
        tf32_err = (_ops.kron_matmul(A, B, V, allow_tf32=True).double() - exact).abs().max().item() / scale
        UA, lamA, UB, lamB = _eig(A, B)
        eig = _ops.kron_eig_apply(UA, lamA, UB, lamB, V, 1.0, 0.0)
        eig_err = (eig.double() - exact).abs().max().item() / scale
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])
    assert fp32_err < 1e-5, f"float32 product off by {fp32_err:.2e}: TF32 used without allow_tf32?"
    assert eig_err < 1e-4, f"kron_eig_apply float32 off by {eig_err:.2e}"
    assert tf32_err < 1e-2  # TF32 when asked: still right to TF32 rounding
