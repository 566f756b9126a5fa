"""Fuzzing the compiled ops' arguments: every call matches the pure-torch twin or raises a
clear error that names an argument, never a silent wrong result or uninitialised memory.

Also: the fake (meta) kernels refuse what the C++ checks refuse, with the same messages
(so torch.compile fails at trace time), and hesslab._ops maps only argument errors to
HesslabError, chained to the original exception.

Hypothesis draws shapes (zero sizes included), dtypes, strides, devices (cpu and meta),
aliasing between arguments and one defect at most per call, and whether the call goes
through hesslab._ops or straight to torch.ops.hesslab. CPU only (meta tensors need no
GPU); the CUDA adapters run the same C++ checks (csrc/common/checks.h).
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from hesslab import _ops, reference
from hesslab.errors import HesslabError

pytestmark = pytest.mark.skipif(not _ops.HAVE_EXTENSION, reason="hesslab._C is not built")

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TOL_LANCZOS = {torch.float32: 2e-5, torch.float64: 1e-12}
TOL_KRON = {torch.float32: 1e-3, torch.float64: 1e-10}


def _basis(b, m, n, filled, dtype, gen):
    """(b, m, n): orthonormal rows 0..filled-1, garbage after."""
    Q = torch.randn(b, m, n, dtype=torch.float64, generator=gen)
    k = min(filled, n)
    if b and k:
        q, _ = torch.linalg.qr(torch.randn(b, n, k, dtype=torch.float64, generator=gen))
        Q[:, :k] = q.transpose(1, 2)
    return Q.to(dtype)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous tensor (every other element of a wider one)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _call(path: str, op: str, *args):
    if path == "direct":
        return getattr(torch.ops.hesslab, op)(*args)
    return getattr(_ops, op)(*args)


def _assert_clear_error(path: str, call, names: set[str]) -> None:
    """call() raises: HesslabError through hesslab._ops, else a ValueError/TypeError/
    RuntimeError; either way its message names one of ``names`` as an argument."""
    expected = HesslabError if path == "wrapper" else (ValueError, TypeError, RuntimeError)
    with pytest.raises(expected) as info:
        call()
    message = str(info.value).split("\n")[0]
    assert message.startswith("hesslab"), message
    assert any(f"'{name}'" in message for name in names), (names, message)


# ---------------------------------------------------------------------------------------
# Lanczos ops

LANCZOS_OK = [None, "Q_strided_read_only", "beta_strided"]
LANCZOS_BAD = ["Q_strided", "w_strided", "w_alias_Q", "beta_alias_Q", "beta_alias_w", "meta_beta", "meta_w",
               "meta_Q", "all_meta", "w_dtype", "beta_dtype", "Q_int", "w_shape", "beta_shape", "j_range"]


@st.composite
def lanczos_cases(draw):
    op = draw(st.sampled_from(["lanczos_step_", "reorthogonalize_"]))
    b = draw(st.integers(0, 3))
    m = draw(st.integers(1, 5))
    n = draw(st.sampled_from([0, m + 2, m + 3, 17, 40]))  # n >= m + 2: no borderline breakdown
    j = draw(st.integers(0, m - 1 if op == "lanczos_step_" else m))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    defect = draw(st.sampled_from(LANCZOS_OK + LANCZOS_BAD))
    path = draw(st.sampled_from(["wrapper", "direct"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return op, b, m, n, j, dtype, defect, path, seed


def _lanczos_expected_names(op, defect, b, n, dtype):
    """None: the call must succeed; else the argument names the error may cite; 'skip'
    where the defect does not apply to this case (it is then a valid call)."""
    step = op == "lanczos_step_"
    numel = b > 0 and n > 0
    table = {
        "Q_strided": {"Q"} if step and n >= 2 and b > 0 else "skip",
        "Q_strided_read_only": None if not step and n >= 2 and b > 0 else "skip",
        "w_strided": {"w"} if n >= 2 and b > 0 else "skip",
        "beta_strided": None if step and b > 1 else "skip",
        "w_alias_Q": {"w"} if numel else "skip",
        "beta_alias_Q": {"Q", "beta_prev"} if step and numel and dtype == torch.float64 else "skip",
        "beta_alias_w": {"w", "beta_prev"} if step and numel and dtype == torch.float64 else "skip",
        "meta_beta": {"beta_prev", "Q"} if step else "skip",
        "meta_w": {"w", "Q"},
        "meta_Q": {"Q", "w", "beta_prev"},
        "all_meta": "all_meta",
        "w_dtype": {"w"},
        "beta_dtype": {"beta_prev"} if step else "skip",
        "Q_int": {"Q"},
        "w_shape": {"w"},
        "beta_shape": {"beta_prev"} if step else "skip",
        "j_range": {"j"},
        None: None,
    }
    return table[defect]


@FUZZ
@given(lanczos_cases())
def test_fuzz_lanczos_ops(case):
    op, b, m, n, j, dtype, defect, path, seed = case
    expected = _lanczos_expected_names(op, defect, b, n, dtype)
    if expected == "skip":
        defect, expected = None, None
    step = op == "lanczos_step_"
    gen = torch.Generator().manual_seed(seed)
    Q = _basis(b, m, n, j + 1 if step else j, dtype, gen)
    w = torch.randn(b, n, dtype=dtype, generator=gen)
    bp = torch.rand(b, dtype=torch.float64, generator=gen)
    Q_ref, w_ref = Q.clone(), w.clone()
    if defect in ("Q_strided", "Q_strided_read_only"):
        Q = _strided(Q)
    elif defect == "w_strided":
        w = _strided(w)
    elif defect == "beta_strided":
        bp = _strided(bp)
    elif defect == "w_alias_Q":
        w = Q[:, min(j, m - 1)]
    elif defect == "beta_alias_Q":
        bp = Q[:, m - 1, 0]
    elif defect == "beta_alias_w":
        bp = w[:, 0]
    elif defect == "meta_beta":
        bp = bp.to("meta")
    elif defect == "meta_w":
        w = w.to("meta")
    elif defect == "meta_Q":
        Q = Q.to("meta")
    elif defect == "all_meta":
        Q, w, bp = Q.to("meta"), w.to("meta"), bp.to("meta")
    elif defect == "w_dtype":
        w = w.to(torch.float64 if dtype == torch.float32 else torch.float32)
    elif defect == "beta_dtype":
        bp = bp.float()
    elif defect == "Q_int":
        Q, w = Q.long(), w.long()
    elif defect == "w_shape":
        w = torch.randn(b, n + 1, dtype=dtype, generator=gen)
    elif defect == "beta_shape":
        bp = torch.rand(b + 1, dtype=torch.float64, generator=gen)
    elif defect == "j_range":
        j = m if step else m + 1
    args = (Q, w, bp, j, 1e-10) if step else (Q, w, j)
    Q_before, w_before = Q.clone(), w.clone()

    if expected == "all_meta":
        if path == "wrapper":  # no META kernel: a hesslab message, not a dispatcher trace
            with pytest.raises(HesslabError, match="no META kernel"):
                _call(path, op, *args)
            return
        out = _call(path, op, *args)
        outs = out if step else (out,)
        assert all(t.device.type == "meta" for t in outs)
        assert [tuple(t.shape) for t in outs] == ([(b,)] * 3 if step else [(b, j)])
        return
    if expected is not None:
        _assert_clear_error(path, lambda: _call(path, op, *args), expected)
        if Q.device.type != "meta" and w.device.type != "meta" and Q.dtype == Q_before.dtype:
            assert torch.equal(Q, Q_before) and torch.equal(w, w_before), "a refused call wrote"
        return

    tol = TOL_LANCZOS[dtype]
    if step:
        out = _call(path, op, *args)
        ref = reference.lanczos_step(Q_ref, w_ref, bp.contiguous(), j, 1e-10, accumulate=torch.float64)
        assert out[0].dtype == out[1].dtype == torch.float64 and out[2].dtype == torch.bool
        scale = 1 + (ref[1].abs().max().item() if b else 0)
        torch.testing.assert_close(out[0], ref[0], rtol=tol, atol=tol * scale)
        torch.testing.assert_close(out[1], ref[1], rtol=tol, atol=tol * scale)
        assert torch.equal(out[2], ref[2])
        torch.testing.assert_close(w, w_ref, rtol=tol, atol=tol * scale)
        torch.testing.assert_close(Q, Q_ref, rtol=tol, atol=tol)
    else:
        out = _call(path, op, *args)
        ref = reference.reorthogonalize(Q_ref, w_ref, j, accumulate=torch.float64)
        assert out.shape == (b, j) and out.dtype == torch.float64
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol * 10)
        torch.testing.assert_close(w, w_ref, rtol=tol, atol=tol * 10)
        assert torch.equal(Q, Q_before)  # read only


# ---------------------------------------------------------------------------------------
# Kronecker ops

KRON_OK = [None, "V_strided", "factor_strided", "shared_factor", "V_aliases_factor"]
KRON_BAD = ["meta_thresholds", "meta_V", "meta_factor", "meta_lam", "all_meta", "factor_dtype", "V_columns",
            "non_square", "layer_count", "thresholds_dtype", "thresholds_shape", "lam_shape", "k_range",
            "topk_dtype"]


def _spd(k, dtype, gen):
    X = torch.randn(k, k + 2, dtype=torch.float64, generator=gen)
    return ((X @ X.T) / max(k, 1) + 0.1 * torch.eye(k, dtype=torch.float64)).to(dtype)


@st.composite
def kron_cases(draw):
    op = draw(st.sampled_from(["kron_matmul", "kron_eig_apply", "kron_topk"]))
    layers = draw(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=0, max_size=4))
    b = draw(st.sampled_from([0, 1, 3]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    p, q = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    k = draw(st.integers(0, p * q))
    defect = draw(st.sampled_from(KRON_OK + KRON_BAD))
    path = draw(st.sampled_from(["wrapper", "direct"]))
    seed = draw(st.integers(0, 2**31 - 1))
    cut = draw(st.sampled_from([float("-inf"), 0.05, 0.5]))
    return op, layers, b, dtype, p, q, k, defect, path, seed, cut


def _kron_expected(op, defect, layers):
    nonempty = [l for l, (o, i) in enumerate(layers) if o and i]
    has_layer = bool(layers)
    eig = op == "kron_eig_apply"
    topk = op == "kron_topk"
    fl = "UA" if eig else "A"
    table = {
        "V_strided": None if not topk else "skip",
        "factor_strided": None if not topk and has_layer and layers[0][1] >= 2 else "skip",
        "shared_factor": None if not topk and any(o == i for o, i in layers) else "skip",
        "V_aliases_factor": None if not topk and nonempty else "skip",
        "meta_thresholds": {"thresholds", "V"} if eig else "skip",
        "meta_V": ("skip" if topk else "all_meta" if op == "kron_matmul" and not has_layer
                   else {"V", f"{fl}[0]", "thresholds"}),
        "meta_factor": {f"{fl}[0]", "V"} if not topk and has_layer else "skip",
        "meta_lam": {"lamA", "lamB", "lamA[0]", "lamB[0]", "V"} if (topk or (eig and has_layer)) else "skip",
        "all_meta": "all_meta",
        "factor_dtype": {f"{fl}[0]", "lamB"} if (topk or has_layer) else "skip",
        "V_columns": {"V"} if not topk else "skip",
        "non_square": {f"{fl}[0]"} if not topk and has_layer else "skip",
        "layer_count": {fl, "UB" if eig else "B"} if not topk else "skip",
        "thresholds_dtype": {"thresholds"} if eig else "skip",
        "thresholds_shape": {"thresholds"} if eig else "skip",
        "lam_shape": {"lamA[0]"} if eig and has_layer else "skip",
        "k_range": {"k"} if topk else "skip",
        "topk_dtype": {"lamB"} if topk else "skip",
        None: None,
    }
    return table[defect]


@FUZZ
@given(kron_cases())
def test_fuzz_kron_ops(case):
    op, layers, b, dtype, p, q, k, defect, path, seed, cut = case
    expected = _kron_expected(op, defect, layers)
    if expected == "skip":
        defect, expected = None, None
    gen = torch.Generator().manual_seed(seed)
    tol = TOL_KRON[dtype]

    if op == "kron_topk":
        lamB = torch.randn(p, dtype=dtype, generator=gen)
        lamA = torch.randn(q, dtype=dtype, generator=gen)
        if defect == "k_range":
            k = p * q + 1
        elif defect == "topk_dtype":
            lamB, lamA = lamB.long(), lamA.long()
        elif defect == "factor_dtype":
            lamA = lamA.to(torch.float64 if dtype == torch.float32 else torch.float32)
        elif defect == "meta_lam":
            lamA = lamA.to("meta")
        elif defect == "all_meta":
            lamB, lamA = lamB.to("meta"), lamA.to("meta")
        args = (lamB, lamA, k)
        if expected == "all_meta":
            _check_all_meta(path, op, args, [(k,)] * 3)
            return
        if expected is not None:
            _assert_clear_error(path, lambda: _call(path, op, *args), expected)
            return
        vals, ib, ia = _call(path, op, *args)
        rvals, _, _ = reference.kron_topk(lamB, lamA, k)
        torch.testing.assert_close(vals, rvals, rtol=tol, atol=tol)
        torch.testing.assert_close(vals, lamB[ib] * lamA[ia], rtol=tol, atol=tol)
        assert len(set(zip(ib.tolist(), ia.tolist()))) == k
        return

    eig = op == "kron_eig_apply"
    A = [_spd(i, dtype, gen) for _, i in layers]
    B = [_spd(o, dtype, gen) for o, _ in layers]
    if defect == "shared_factor":  # one tensor as both factors of a square layer
        l = next(l for l, (o, i) in enumerate(layers) if o == i)
        B[l] = A[l]
    if eig:
        lamA, UA = map(list, zip(*[torch.linalg.eigh(a) for a in A])) if A else ([], [])
        lamB, UB = map(list, zip(*[torch.linalg.eigh(x) for x in B])) if B else ([], [])
        left, right = UA, UB
    else:
        left, right = A, B
    N = sum(o * i for o, i in layers)
    V = torch.randn(b, N, dtype=dtype, generator=gen)
    thr = torch.full((len(layers),), cut, dtype=torch.float64)
    if defect == "V_strided":
        V = _strided(V)
    elif defect == "factor_strided":
        left[0] = left[0].t()  # strided (and, for kron_matmul, unsymmetric A: fine)
    elif defect == "V_aliases_factor":  # V and a factor views of one buffer (both read only)
        l = next(l for l, (o, i) in enumerate(layers) if o and i)
        buf = torch.cat([left[l].reshape(-1), V.reshape(-1)])
        left[l] = buf[: left[l].numel()].view_as(left[l])
        V = buf[left[l].numel():].view_as(V)
    elif defect == "meta_thresholds":
        thr = thr.to("meta")
    elif defect == "meta_V":
        V = V.to("meta")
    elif defect == "meta_factor":
        left[0] = left[0].to("meta")
    elif defect == "meta_lam":
        lamA[0] = lamA[0].to("meta")
    elif defect == "all_meta":
        left, right = [t.to("meta") for t in left], [t.to("meta") for t in right]
        V, thr = V.to("meta"), thr.to("meta")
        if eig:
            lamA, lamB = [t.to("meta") for t in lamA], [t.to("meta") for t in lamB]
    elif defect == "factor_dtype":
        left[0] = left[0].to(torch.float64 if dtype == torch.float32 else torch.float32)
    elif defect == "V_columns":
        V = torch.randn(b, N + 1, dtype=dtype, generator=gen)
    elif defect == "non_square":
        left[0] = torch.randn(left[0].shape[0], left[0].shape[0] + 1, dtype=dtype, generator=gen)
    elif defect == "layer_count":
        right = right + [torch.eye(1, dtype=dtype)]
    elif defect == "thresholds_dtype":
        thr = thr.float()
    elif defect == "thresholds_shape":
        thr = torch.zeros(len(layers) + 1, dtype=torch.float64)
    elif defect == "lam_shape":
        lamA[0] = torch.zeros(lamA[0].shape[0] + 1, dtype=dtype)
    args = (left, lamA, right, lamB, V, -1.0 if cut == 0.05 else 1.0, 0.1, thr) if eig else (left, right, V)
    if expected == "all_meta":
        _check_all_meta(path, op, args, [tuple(V.shape)])
        return
    if expected is not None:
        _assert_clear_error(path, lambda: _call(path, op, *args), expected)
        return
    out = _call(path, op, *args)
    ref = reference.kron_eig_apply(*args) if eig else reference.kron_matmul(*args)
    assert out.shape == V.shape and out.dtype == dtype
    scale = 1 + (ref.abs().max().item() if ref.numel() else 0)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * scale)


def _check_all_meta(path, op, args, shapes):
    if path == "wrapper":
        with pytest.raises(HesslabError, match="no META kernel"):
            _call(path, op, *args)
        return
    out = _call(path, op, *args)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(t.device.type == "meta" for t in outs)
    assert [tuple(t.shape) for t in outs] == shapes


# ---------------------------------------------------------------------------------------
# The repros of issue 12 (items 4 and 5), spelled out


def test_meta_tensor_mixed_with_real_ones_is_refused():
    Q = torch.zeros(2, 3, 5, dtype=torch.float64)
    Q[:, 0] = 5**-0.5
    w = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="argument 'beta_prev' must be on the device of 'Q'"):
        torch.ops.hesslab.lanczos_step_(Q, w, torch.zeros(2, dtype=torch.float64, device="meta"), 1, 1e-10)
    UA, lam = [torch.eye(2, dtype=torch.float64)], [torch.ones(2, dtype=torch.float64)]
    V = torch.randn(1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="argument 'thresholds' must be on the device of 'V'"):
        torch.ops.hesslab.kron_eig_apply(UA, lam, UA, lam, V, 1.0, 0.0, torch.zeros(1, dtype=torch.float64,
                                                                                       device="meta"))


def test_aliased_arguments_are_refused_and_nothing_is_written():
    gen = torch.Generator().manual_seed(0)
    Q = _basis(1, 4, 30, 2, torch.float64, gen)
    before = Q.clone()
    bp = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(HesslabError, match="argument 'w' is written in place and must not share memory with "
                                           "argument 'Q'"):
        _ops.lanczos_step_(Q, Q[:, 1], bp, 1, 1e-10)
    with pytest.raises(HesslabError, match="argument 'w' is written in place and must not share memory"):
        _ops.reorthogonalize_(Q, Q[:, 0], 2)
    Qb = _basis(3, 4, 30, 2, torch.float64, gen)
    with pytest.raises(HesslabError, match="argument 'w'"):  # a strided view: refused as non-contiguous
        _ops.reorthogonalize_(Qb, Qb[:, 0], 2)
    with pytest.raises(HesslabError, match="argument 'Q' is written in place and must not share memory with "
                                           "argument 'beta_prev'"):
        _ops.lanczos_step_(Q, torch.randn(1, 30, dtype=torch.float64), Q[:, 3, 0], 1, 1e-10)
    assert torch.equal(Q, before)


def test_views_of_one_buffer_that_do_not_overlap_are_fine():
    """Disjoint slices of one storage are separate arguments (no false alarm)."""
    gen = torch.Generator().manual_seed(1)
    buf = torch.empty(2 * 4 * 30 + 2 * 30 + 2, dtype=torch.float64)
    Q = buf[: 240].view(2, 4, 30)
    Q.copy_(_basis(2, 4, 30, 2, torch.float64, gen))
    w = buf[240:300].view(2, 30)
    w.copy_(torch.randn(2, 30, dtype=torch.float64, generator=gen))
    bp = buf[300:]
    bp.fill_(0.5)
    Q2, w2 = Q.clone(), w.clone()
    out = _ops.lanczos_step_(Q, w, bp, 1, 1e-10)
    ref = reference.lanczos_step(Q2, w2, bp.clone(), 1, 1e-10, accumulate=torch.float64)
    for x, y in zip(out, ref):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Q, Q2, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Fake kernels: same checks, same messages; torch.compile fails at trace time

BAD_CALLS = [
    ("lanczos_step_", lambda: (torch.zeros(2, 4, 10), torch.zeros(2, 9), torch.zeros(2, dtype=torch.float64), 0,
                               1e-10)),
    ("lanczos_step_", lambda: (torch.zeros(2, 4, 10), torch.zeros(2, 10), torch.zeros(2), 0, 1e-10)),
    ("lanczos_step_", lambda: (torch.zeros(2, 4, 10), torch.zeros(2, 10), torch.zeros(2, dtype=torch.float64), 4,
                               1e-10)),
    ("lanczos_step_", lambda: (torch.zeros(2, 4, 10), torch.zeros(2, 10, dtype=torch.float64),
                               torch.zeros(2, dtype=torch.float64), 0, 1e-10)),
    ("lanczos_step_", lambda: (torch.zeros(2, 10, 4).transpose(1, 2), torch.zeros(2, 10),
                               torch.zeros(2, dtype=torch.float64), 0, 1e-10)),
    ("reorthogonalize_", lambda: (torch.zeros(2, 4, 10), torch.zeros(10, 2).t(), 1)),
    ("reorthogonalize_", lambda: (torch.zeros(2, 4, 10).long(), torch.zeros(2, 10).long(), 1)),
    ("kron_matmul", lambda: ([torch.eye(3)], [torch.eye(2)], torch.zeros(1, 5))),
    ("kron_matmul", lambda: ([torch.eye(3)], [torch.eye(2, dtype=torch.float64)], torch.zeros(1, 6))),
    ("kron_matmul", lambda: ([torch.eye(3)], [torch.zeros(2, 3)], torch.zeros(1, 6))),
    ("kron_eig_apply", lambda: ([torch.eye(3)], [torch.ones(3)], [torch.eye(2)], [torch.ones(2)], torch.zeros(1, 6),
                                1.0, 0.0, torch.zeros(2, dtype=torch.float64))),
    ("kron_eig_apply", lambda: ([torch.eye(3)], [torch.ones(2)], [torch.eye(2)], [torch.ones(2)], torch.zeros(1, 6),
                                1.0, 0.0, torch.zeros(1, dtype=torch.float64))),
    ("kron_topk", lambda: (torch.ones(2), torch.ones(3), 7)),
    ("kron_topk", lambda: (torch.ones(2), torch.ones(3, dtype=torch.float64), 1)),
]


def _first_line(exc: BaseException) -> str:
    return str(exc).split("\n")[0]


@pytest.mark.parametrize("op,make", BAD_CALLS, ids=[f"{op}-{i}" for i, (op, _) in enumerate(BAD_CALLS)])
def test_fake_kernel_refuses_like_cpp_with_the_same_message(op, make):
    args = make()
    with pytest.raises((ValueError, TypeError)) as eager:
        getattr(torch.ops.hesslab, op)(*args)
    with FakeTensorMode() as mode:
        fake_args = [([mode.from_tensor(t) for t in a] if isinstance(a, list) else
                      mode.from_tensor(a) if isinstance(a, torch.Tensor) else a) for a in args]
        with pytest.raises((ValueError, TypeError)) as fake:
            getattr(torch.ops.hesslab, op)(*fake_args)
    assert type(fake.value) is type(eager.value)
    assert _first_line(fake.value) == _first_line(eager.value)
    meta_args = [([t.to("meta") for t in a] if isinstance(a, list) else
                  a.to("meta") if isinstance(a, torch.Tensor) else a) for a in args]
    with pytest.raises((ValueError, TypeError)) as meta:
        getattr(torch.ops.hesslab, op)(*meta_args)
    assert _first_line(meta.value) == _first_line(eager.value).replace("(cpu)", "(meta)")


def test_torch_compile_fails_at_trace_time_with_the_message():
    Q, w, bp = torch.zeros(2, 4, 10), torch.zeros(2, 9), torch.zeros(2, dtype=torch.float64)

    def step(Q, w, bp):
        return torch.ops.hesslab.lanczos_step_(Q, w, bp, 0, 1e-10)[0] * 2

    # TorchDynamoException: raised while Dynamo ran the graph on fake tensors (trace time),
    # by the fake kernel's check, not by a kernel at run time.
    with pytest.raises(torch._dynamo.exc.TorchDynamoException,
                       match=re.escape("hesslab.lanczos_step_: argument 'w' must have shape (b, n)")):
        torch.compile(step, backend="aot_eager", fullgraph=True)(Q, w, bp)
    Qs = torch.zeros(2, 10, 4).transpose(1, 2)
    with pytest.raises(torch._dynamo.exc.TorchDynamoException,
                       match="argument 'Q' is written in place and must be contiguous"):
        torch.compile(step, backend="aot_eager", fullgraph=True)(Qs, torch.zeros(2, 10), bp)


# ---------------------------------------------------------------------------------------
# hesslab._ops: argument errors become HesslabError (chained), genuine bugs do not


def test_argument_errors_become_hesslab_errors_chained_to_the_original():
    with pytest.raises(HesslabError) as info:
        _ops.kron_topk(torch.ones(2), torch.ones(3), 7)
    assert isinstance(info.value.__cause__, ValueError) and not isinstance(info.value.__cause__, HesslabError)
    assert str(info.value) == _first_line(info.value.__cause__)
    assert "argument 'k'" in str(info.value)


def test_schema_type_errors_of_the_dispatcher_become_hesslab_errors():
    with pytest.raises(HesslabError, match="Expected a value of type 'int' for argument 'k'") as info:
        _ops._call("kron_topk", [("lamB", torch.ones(2)), ("lamA", torch.ones(3)), ("k", 2.5)], reference.kron_topk)
    assert type(info.value.__cause__) is RuntimeError


@pytest.mark.parametrize("exc", [ValueError("boom: not an argument check"), TypeError("unsupported operand"),
                                 RuntimeError("CUDA error: an illegal memory access was encountered"),
                                 IndexError("index 3 is out of bounds"),
                                 ValueError("hesslab.kron_topk: CUDA kernel launch failed")], ids=repr)
def test_genuine_errors_propagate_unchanged(monkeypatch, exc):
    def broken(*args):
        raise exc

    monkeypatch.setattr(_ops, "_compiled", lambda op: broken)
    with pytest.raises(type(exc)) as info:
        _ops.kron_topk(torch.ones(2), torch.ones(3), 1)
    assert info.value is exc and not isinstance(info.value, HesslabError)
    assert info.traceback[-1].name == "broken"  # the traceback still reaches the failing frame
