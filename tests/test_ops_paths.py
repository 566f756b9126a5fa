"""Shapes that reach every code path of the kernels, on every device (the ``device`` fixture:
cpu always, cuda when present), plus a second GPU and run-to-run determinism.

The constants come from the CUDA sources (the CPU kernels get the same shapes):
  * csrc/cuda/cuda_utils.cuh: kBlockThreads = 256, kMaxStrideBlocks = 1024 (grid-stride
    loops wrap once a row has more than 1024 * 256 = 262144 elements), kMaxGridY = 65535
    (runs stride over gridDim.y beyond that);
  * csrc/cuda/lanczos_kernels.cu: kRowTile = 8 rows per dot_rows_kernel tile (rows > 8
    take several tiles, the last one partial);
  * csrc/cuda/kron_kernels.cu: 64 x 64 output tiles, K steps of 16, kMaxGroups = 16 GEMM
    groups or scaled layers per launch (more layers take several launches), and
    eig_scale_kernel's grid-stride loop over one layer's out * in entries.
The CPU kernels' own paths: kSegment = 2^14 entries per task, kTile = 512.
"""

from __future__ import annotations

import pytest
import torch

from hesslab import _ops, reference

STRIDE_SPAN = 1024 * 256  # kMaxStrideBlocks * kBlockThreads
GRID_Y = 65535  # kMaxGridY
ROW_TILE = 8  # kRowTile
GEMM_TILE, GEMM_K = 64, 16
MAX_GROUPS = 16
TOL_LANCZOS = {torch.float32: 2e-5, torch.float64: 1e-12}
TOL_KRON = {torch.float32: 1e-4, torch.float64: 1e-11}


def _basis(b: int, m: int, n: int, filled: int, dtype, device) -> torch.Tensor:
    Q = torch.randn(b, m, n, dtype=torch.float64)
    k = min(filled, n)
    if b and k:
        q, _ = torch.linalg.qr(torch.randn(b, n, k, dtype=torch.float64))
        Q[:, :k] = q.transpose(1, 2)
    return Q.to(dtype=dtype, device=device)


def _check_step(b, m, n, j, dtype, device):
    Q = _basis(b, m, n, j + 1, dtype, device)
    w = torch.randn(b, n, dtype=dtype, device=device)
    bp = torch.rand(b, dtype=torch.float64, device=device)
    Q2, w2 = Q.clone(), w.clone()
    a, bt, br = _ops.lanczos_step_(Q, w, bp, j, 1e-10)
    a2, bt2, br2 = reference.lanczos_step(Q2, w2, bp, j, 1e-10, accumulate=torch.float64)
    tol = TOL_LANCZOS[dtype]
    scale = 1 + (bt2.abs().max().item() if b else 0)
    torch.testing.assert_close(a, a2, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(bt, bt2, rtol=tol, atol=tol * scale)
    assert torch.equal(br, br2)
    torch.testing.assert_close(w, w2, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(Q, Q2, rtol=tol, atol=tol)


def _check_reorth(b, m, n, j, dtype, device):
    Q = _basis(b, m, n, j, dtype, device)
    w = torch.randn(b, n, dtype=dtype, device=device)
    w2 = w.clone()
    c = _ops.reorthogonalize_(Q, w, j)
    c2 = reference.reorthogonalize(Q, w2, j, accumulate=torch.float64)
    tol = TOL_LANCZOS[dtype]
    torch.testing.assert_close(c, c2, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(w, w2, rtol=tol, atol=tol * 10)


LANCZOS_PATHS = {
    "n_wraps_grid_stride": (2, 3, STRIDE_SPAN + 37_963, 1),  # 300000 > 262144: the x loops wrap
    "n_one_block": (3, 4, 200, 2),  # fewer than 256 entries: one block, idle threads
    "n_one": (2, 1, 1, 0),  # a single entry per row, m = 1: no next row to write
    "rows_several_tiles": (2, 22, 300, 2 * ROW_TILE + 3),  # 20 rows: two full tiles and a partial one
    "rows_one_partial_tile": (3, 5, 50, 3),
    "single_run_single_row": (1, 1, 64, 0),
    "empty_batch": (0, 3, 10, 1),
    "empty_rows": (2, 3, 0, 1),  # n = 0: every sum is zero, breakdown everywhere
}


@pytest.mark.parametrize("case", list(LANCZOS_PATHS), ids=str)
def test_lanczos_paths(case, dtype, device):
    b, m, n, j = LANCZOS_PATHS[case]
    _check_step(b, m, n, j, dtype, device)
    _check_reorth(b, m, n, min(j + 1, m), dtype, device)


def test_lanczos_runs_beyond_the_grid_y_extent(device):
    """b > 65535 runs: the y loop of every grid-stride kernel wraps."""
    b, m, n = GRID_Y + 2, 2, 5
    _check_step(b, m, n, 0, torch.float64, device)
    _check_step(b, m, n, 1, torch.float32, device)
    _check_reorth(b, m, n, 1, torch.float64, device)


def _spd(k: int, dtype, device) -> torch.Tensor:
    X = torch.randn(k, k + 2, dtype=torch.float64)
    return ((X @ X.T) / max(k, 1) + 0.1 * torch.eye(k, dtype=torch.float64)).to(dtype=dtype, device=device)


def _check_kron(layers, b, dtype, device):
    A = [_spd(i, dtype, device) for _, i in layers]
    B = [_spd(o, dtype, device) for o, _ in layers]
    N = sum(o * i for o, i in layers)
    V = torch.randn(b, N, dtype=dtype, device=device)
    tol = TOL_KRON[dtype]
    ref = reference.kron_matmul(A, B, V)
    scale = 1 + (ref.abs().max().item() if ref.numel() else 0)
    out = _ops.kron_matmul(A, B, V)
    assert out.shape == V.shape
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * scale)
    eig = [torch.linalg.eigh(a) for a in A], [torch.linalg.eigh(x) for x in B]
    UA, lamA = [e[1] for e in eig[0]], [e[0] for e in eig[0]]
    UB, lamB = [e[1] for e in eig[1]], [e[0] for e in eig[1]]
    thr = torch.full((len(layers),), 0.05, dtype=torch.float64, device=device)
    for power, damping in ((1.0, 0.0), (-1.0, 0.1)):
        ref = reference.kron_eig_apply(UA, lamA, UB, lamB, V, power, damping, thr)
        scale = 1 + (ref.abs().max().item() if ref.numel() else 0)
        out = _ops.kron_eig_apply(UA, lamA, UB, lamB, V, power, damping, thr)
        torch.testing.assert_close(out, ref, rtol=tol * 10, atol=tol * 10 * scale)


KRON_PATHS = {
    # wider than one 64 x 64 output tile in both directions and deeper than one K step of 16
    "tiles_and_k_steps": ([(GEMM_TILE + 6, GEMM_TILE + 26), (GEMM_K + 1, 2 * GEMM_TILE + 1)], 3),
    # more than 16 layers in one grouped call: several launches of 16 groups / scaled layers
    "more_layers_than_groups": ([(1 + l % 5, 1 + (3 * l) % 7) for l in range(MAX_GROUPS + 5)], 2),
    # one layer with more than 1024 * 256 entries: eig_scale_kernel's loop wraps
    "scale_loop_wraps": ([(513, 520)], 1),
    "empty_layers_among_others": ([(3, 0), (2, 4), (0, 5), (0, 0), (1, 1)], 2),
    "single_row": ([(5, 3), (1, 70)], 1),
    "empty_batch": ([(3, 4), (70, 2)], 0),
    "no_layers": ([], 2),
}


@pytest.mark.parametrize("case", list(KRON_PATHS), ids=str)
def test_kron_paths(case, dtype, device):
    layers, b = KRON_PATHS[case]
    _check_kron(layers, b, dtype, device)


@pytest.mark.parametrize("p,q,k", [(1, 1, 1), (70, 90, 300), (1, 300, 300), (300, 1, 17), (0, 5, 0)])
def test_kron_topk_paths(p, q, k, dtype, device):
    lamB = torch.randn(p, dtype=dtype, device=device)
    lamA = torch.randn(q, dtype=dtype, device=device)
    vals, ib, ia = _ops.kron_topk(lamB, lamA, k)
    rvals, _, _ = reference.kron_topk(lamB, lamA, k)
    tol = TOL_KRON[dtype]
    torch.testing.assert_close(vals, rvals, rtol=tol, atol=tol)
    torch.testing.assert_close(vals, lamB[ib] * lamA[ia], rtol=tol, atol=tol)
    assert len(set(zip(ib.tolist(), ia.tolist()))) == k


# ---------------------------------------------------------------------------------------
# Determinism: what resume relies on


def test_lanczos_ops_are_bitwise_deterministic_run_to_run(dtype, device):
    """The same call on the same inputs gives the same bits, on the CPU (fixed segments,
    fixed order) and on CUDA (two-stage reductions without atomics, fixed order): a
    Krylov run resumed from a checkpoint on the same device continues bit for bit."""
    b, m, n, j = 2, 6, STRIDE_SPAN + 10_001, 4
    Q = _basis(b, m, n, j + 1, dtype, device)
    w = torch.randn(b, n, dtype=dtype, device=device)
    bp = torch.rand(b, dtype=torch.float64, device=device)
    runs = []
    for _ in range(2):
        Qt, wt = Q.clone(), w.clone()
        out = _ops.lanczos_step_(Qt, wt, bp, j, 1e-10)
        w2 = torch.randn(b, n, generator=torch.Generator().manual_seed(5), dtype=dtype).to(device)
        runs.append((*out, Qt, wt, _ops.reorthogonalize_(Qt, w2, j + 2), w2))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_kron_ops_are_bitwise_deterministic_run_to_run(device):
    layers = [(GEMM_TILE + 6, GEMM_TILE + 26), (3, 4)]
    A = [_spd(i, torch.float64, device) for _, i in layers]
    B = [_spd(o, torch.float64, device) for o, _ in layers]
    V = torch.randn(4, sum(o * i for o, i in layers), dtype=torch.float64, device=device)
    assert torch.equal(_ops.kron_matmul(A, B, V), _ops.kron_matmul(A, B, V))


# ---------------------------------------------------------------------------------------
# A second GPU: the device guards


def _two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2 and _ops.has_kernel("lanczos_step_", "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA devices and hesslab built with CUDA kernels")
def test_ops_on_the_second_gpu_while_the_first_is_current():
    dev = torch.device("cuda:1")
    with torch.cuda.device(0):
        _check_step(3, 6, 5000, 3, torch.float64, dev)
        _check_reorth(3, 6, 5000, 4, torch.float32, dev)
        _check_kron([(70, 90), (3, 4)], 2, torch.float64, dev)
        lamB, lamA = torch.randn(7, device=dev), torch.randn(9, device=dev)
        vals, ib, ia = _ops.kron_topk(lamB, lamA, 5)
        assert vals.device == ib.device == dev
        torch.testing.assert_close(vals.cpu(), reference.kron_topk(lamB.cpu(), lamA.cpu(), 5)[0])
        Q = _basis(2, 4, 100, 2, torch.float64, dev)
        w = torch.randn(2, 100, dtype=torch.float64, device="cuda:0")
        with pytest.raises(ValueError, match="argument 'w' must be on the device of 'Q'"):
            torch.ops.hesslab.lanczos_step_(Q, w, torch.zeros(2, dtype=torch.float64, device=dev), 1, 1e-10)
        assert torch.cuda.current_device() == 0


def test_nan_input_reaches_alpha_and_beta_and_the_next_row_stays_finite(dtype, device):
    """The plan's skip rule lets NaN take the second update, so a NaN product shows up in
    alpha and beta (the driver checks them) while the next row is written as zeros."""
    b, m, n, j = 2, 4, 300, 1
    Q = _basis(b, m, n, j + 1, dtype, device)
    w = torch.randn(b, n, dtype=dtype, device=device)
    w[0, 7] = float("nan")
    a, bt, br = _ops.lanczos_step_(Q, w, torch.rand(b, dtype=torch.float64, device=device), j, 1e-10)
    assert torch.isnan(a[0]) and torch.isnan(bt[0]) and not br[0]
    assert torch.isfinite(a[1]) and torch.isfinite(bt[1])
    assert torch.isfinite(Q[:, j + 1]).all() and (Q[0, j + 1] == 0).all()
