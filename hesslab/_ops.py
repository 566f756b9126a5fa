"""Typed wrappers over ``torch.ops.hesslab.*``: device checks, fake kernels, fallback.

The compiled library ``hesslab._C`` registers the op schemas and their CPU (and, when
built, CUDA) kernels. This module:

* checks that every tensor argument lives on one device and that a kernel exists for it,
  so a CUDA tensor sent to a CPU-only build gets a :class:`~hesslab.errors.HesslabError`
  naming the fix instead of a dispatcher trace (shape, dtype, device, contiguity and
  aliasing checks happen in C++, csrc/common/checks.h; only those argument errors, and
  the dispatcher's own "Expected a value of type" errors, come back here as
  HesslabError, chained to the original exception; anything else, a genuine bug,
  propagates unchanged with its traceback);
* registers fake (meta) kernels that apply the same checks with ``torch._check_value`` /
  ``torch._check_type`` and the same messages, so the ops trace under ``torch.compile``
  and a bad call fails at trace time, and a direct call that mixes a ``meta`` tensor with
  real ones (which the dispatcher routes to the fake kernel) is refused instead of
  returning uninitialised memory;
* falls back to the pure-torch twins in :mod:`hesslab.reference` (with a warning, once)
  when the extension is not built at all, e.g. when running from a source tree.

Determinism (what a resumed run can rely on): every kernel is bitwise reproducible run to
run. On the CPU the same inputs give the same bits whatever the thread count (fixed
segments, sums in a fixed order). On CUDA the Lanczos ops reduce in two stages without
atomics (per-block partial sums, then a fixed-order sum over the blocks; the grid depends
only on n and the device's SM count, so a MIG slice counts as another model) and the Kronecker GEMMs compute every output tile in one block in a fixed K
order (layers below KRON_CUBLAS_MIN_ELEMENTS) or through cuBLAS (larger layers: bitwise
reproducible for the same problem, GPU model, cuBLAS version and stream), so the same
inputs give the same bits on the same GPU model with the same build.
Results are *not* bitwise equal across backends (CPU and CUDA add in different fixed
orders: they agree to rounding) nor across GPU architectures or builds. A checkpointed
Krylov run resumed on the same device, GPU model and build therefore continues bit for bit
as the uninterrupted run would, provided the operator's own products are deterministic
(on a GPU, autograd products may use non-deterministic cuBLAS/cuDNN/atomic kernels unless
``torch.use_deterministic_algorithms(True)`` is set); resumed elsewhere it agrees to rounding.

Conventions: Lanczos bases ``Q`` are (b, m, n), float32 or float64, with inner products
accumulated in float64. Kronecker layers use PyTorch's row-major vec: for V of shape
(out, in), (B ⊗ A) vec(V) = vec(B V Aᵀ), and a flat (b, N) tensor concatenates the
layers' blocks in order.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import reference
from .errors import HesslabError

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    HAVE_EXTENSION = True
    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only on unbuilt trees
    HAVE_EXTENSION = False
    _IMPORT_ERROR = str(exc)

OP_NAMES = ("lanczos_step_", "reorthogonalize_", "gs_sweep_", "kron_matmul", "kron_eig_apply", "kron_topk")
_warned_fallback = False


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``hesslab::op`` has a compiled kernel for ``device_type`` ("cpu" or "cuda")."""
    if not HAVE_EXTENSION:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"hesslab::{op}", key)


def _tensors(op: str, named_args: list[tuple[str, object]]) -> list[tuple[str, Tensor]]:
    """The tensor arguments (list arguments expanded), each checked to be a Tensor."""
    out = []
    for name, a in named_args:
        if isinstance(a, list):
            out += [(f"{name}[{i}]", t) for i, t in enumerate(a)]
        elif a is not None and not isinstance(a, (int, float)):  # None: an optional tensor left out
            out.append((name, a))
    for name, t in out:
        if not isinstance(t, Tensor):
            raise HesslabError(f"hesslab.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    return out


def _call(op: str, named_args: list[tuple[str, object]], twin: Callable, twin_kwargs: dict | None = None):
    """Check devices, then run the compiled op (or the twin when nothing is compiled)."""
    tensors = _tensors(op, named_args)
    if not tensors:  # an empty layer list: nothing to place on a device
        return twin(*[a for _, a in named_args], **(twin_kwargs or {}))
    first_name, first = tensors[0]
    for name, t in tensors[1:]:
        if t.device != first.device:
            raise HesslabError(
                f"hesslab.{op}: argument '{name}' is on {t.device} but '{first_name}' is on {first.device}; "
                "move all arguments to one device"
            )
    args = [a for _, a in named_args]
    if not HAVE_EXTENSION:
        global _warned_fallback
        if not _warned_fallback:
            warnings.warn(
                f"hesslab._C is not built ({_IMPORT_ERROR}); using the pure-torch twins in hesslab.reference. "
                "Install with `pip install --no-build-isolation -e .` to get the compiled kernels.",
                stacklevel=3,
            )
            _warned_fallback = True
        return twin(*args, **(twin_kwargs or {}))
    if not has_kernel(op, first.device.type):
        raise HesslabError(
            f"hesslab.{op}: no {first.device.type.upper()} kernel in this build of hesslab "
            f"(argument '{first_name}' is on {first.device}). "
            + (
                "Rebuild with CUDA: HESSLAB_CUDA=1 CUDA_HOME=/path/to/cuda pip install --no-build-isolation -e ."
                if first.device.type == "cuda"
                else "Move the tensors to the CPU."
            )
        )
    try:
        return _compiled(op)(*args)
    except (ValueError, TypeError, RuntimeError) as exc:
        message = str(exc).split("\n")[0]
        if _is_argument_error(op, exc, message):
            raise HesslabError(message) from exc
        raise


def _compiled(op: str) -> Callable:
    """The compiled op ``torch.ops.hesslab.<op>`` (a seam for tests)."""
    return getattr(torch.ops.hesslab, op)


def _is_argument_error(op: str, exc: Exception, message: str) -> bool:
    """Whether ``exc`` is an argument error of the op itself: a check of csrc/common/checks.h
    (or of its fake twin below: ValueError/TypeError starting "hesslab.<op>: argument"),
    or the dispatcher refusing an argument's type against the schema. Everything else (a
    CUDA launch failure, an error inside ATen, a bug) is not."""
    if isinstance(exc, (ValueError, TypeError)) and message.startswith(f"hesslab.{op}: argument"):
        return True
    return type(exc) is RuntimeError and message.startswith(f"hesslab::{op}() Expected a value of type")


def lanczos_step_(Q: Tensor, w: Tensor, beta_prev: Tensor, j: int, tol: float = 1e-10) -> tuple[Tensor, Tensor, Tensor]:
    """One Lanczos step with full reorthogonalization for b runs at once, in place.

    For each run i: alpha = ⟨w, q_j⟩; w −= alpha q_j + beta_prev q_{j−1}; CGS2 of w against
    q_0..q_j (alpha absorbs the corrections along q_j); beta = ‖w‖; Q[i, j+1] = w / beta
    when j + 1 < m. All inner products accumulate in float64. The second Gram–Schmidt
    update is skipped for a run whose w the first already left orthogonal to working
    precision (‖Qw‖ ≤ eps‖w‖, eps of Q's dtype), as it could change w only by rounding:
    with float64 accumulation that is nearly every step of a float32 basis, one sweep
    over Q saved out of three.

    The CPU and CUDA kernels follow one plan (csrc/common/gram_schmidt_plan.h): d = Q w,
    w −= Qᵀd (the recurrence and the first pass at once), c = Q w, the second update only
    where needed; alpha = d_j (+ c_j), with one breakdown rule.

    Args:
        Q: (b, m, n) Krylov bases, rows 0..j orthonormal; row j+1 is written. Must be
            contiguous (it is mutated: a strided one is refused, never copied).
        w: (b, n) on entry A q_j; on exit the residual beta · q_{j+1}. Contiguous, and
            sharing no memory with Q or beta_prev (an alias such as ``Q[:, 1]`` is refused).
        beta_prev: (b,) float64, the previous beta (ignored when j = 0).
        j: the current row, 0 ≤ j < m.
        tol: breakdown when beta ≤ tol · (‖w_in‖ + |beta_prev|), i.e. when reorthogonalization
            removed all but a tol share of what entered the step; Q[i, j+1] is then zeros
            (never NaN) and the driver restarts that run with a fresh orthogonal vector.

    Returns:
        alpha (b,) float64, beta (b,) float64, breakdown (b,) bool, on Q's device.
    """
    return _call(
        "lanczos_step_",
        [("Q", Q), ("w", w), ("beta_prev", beta_prev), ("j", int(j)), ("tol", float(tol))],
        reference.lanczos_step,
        {"accumulate": torch.float64},
    )


def reorthogonalize_(Q: Tensor, w: Tensor, j: int) -> Tensor:
    """CGS2 of w (b, n) against the first j rows of Q (b, m, n), in place (the second
    update only where needed, as in :func:`lanczos_step_`). w must be contiguous and share
    no memory with Q (which is only read, and may be strided).

    Returns:
        (b, j) float64: the sum of the applied passes' coefficients ⟨q_r, w⟩.
    """
    return _call("reorthogonalize_", [("Q", Q), ("w", w), ("j", int(j))], reference.reorthogonalize,
                 {"accumulate": torch.float64})


def gs_sweep_(Q: Tensor, w: Tensor, coef: Tensor | None, rows: int, dots: bool = True) -> Tensor:
    """One sweep of the Gram–Schmidt plan over the rows R = q_0..q_{rows-1} of Q (b, m, n),
    for a caller that combines partial sums between sweeps (the sharded Lanczos step of
    :mod:`hesslab.solvers._sharded`, which all-reduces them over ranks).

    Where ``coef`` (b, rows) float64 is given, w −= Q_Rᵀ coef (float64 sums, w rounded to
    its dtype once); then the local sums of the updated w: Q_R w (when ``dots``) and ‖w‖²,
    in float64, fused with the update in one pass over Q_R (as sweep 2 of ``lanczos_step_``).
    w must be contiguous and share no memory with Q or coef (Q is only read, may be strided).

    Returns:
        (b, rows + 1) float64 [Q_R w, ‖w‖²] when ``dots``, else (b, 1) [‖w‖²], on Q's device.
    """
    return _call("gs_sweep_", [("Q", Q), ("w", w), ("coef", coef), ("rows", int(rows)), ("dots", bool(dots))],
                 reference.gs_sweep)


#: Layers with out·in at or above this many elements go through cuBLAS on CUDA (the
#: grouped kernel takes the smaller ones); the environment variable
#: HESSLAB_KRON_CUBLAS_MIN overrides it at each call (csrc/cuda/kron_cuda.cpp).
KRON_CUBLAS_MIN_ELEMENTS = 64 * 256


def kron_matmul(A: Sequence[Tensor], B: Sequence[Tensor], V: Tensor, *, allow_tf32: bool = False) -> Tensor:
    """Block-diagonal Kronecker product over layers: block l of the result is vec(B_l V_l A_lᵀ).

    Precision (the GEMMs accumulate in the storage dtype): float64 inputs compute in
    float64 (on CUDA through cuBLAS's FP64 path, tensor cores on sm_80/sm_90); float32
    inputs compute and accumulate in float32, never in TF32 unless ``allow_tf32=True``,
    whatever torch's global switches (``torch.backends.cuda.matmul.allow_tf32``,
    ``set_float32_matmul_precision``) say. With ``allow_tf32`` the CUDA cuBLAS path (layers
    of at least :data:`KRON_CUBLAS_MIN_ELEMENTS` entries) rounds inputs to TF32 (relative
    error ~1e-3, several times the FP32 throughput); small layers and the CPU ignore it.
    For float64 accumulation of float32 data pass float64 tensors (there is no mixed
    mode). The pure-torch twin follows torch's own settings.

    Args:
        A: per layer (in_l, in_l) input factor.
        B: per layer (out_l, out_l) output factor.
        V: (b, N), N = Σ out_l·in_l; block l is a row-major (out_l, in_l) matrix.
        allow_tf32: permit TF32 for float32 GEMMs on CUDA (off by default).

    Returns:
        (b, N), the product (B_l ⊗ A_l) applied blockwise.
    """
    return _call("kron_matmul", [("A", list(A)), ("B", list(B)), ("V", V), ("allow_tf32", bool(allow_tf32))],
                 reference.kron_matmul)


def kron_eig_apply(
    UA: Sequence[Tensor],
    lamA: Sequence[Tensor],
    UB: Sequence[Tensor],
    lamB: Sequence[Tensor],
    V: Tensor,
    power: float = 1.0,
    damping: float = 0.0,
    thresholds: Tensor | None = None,
    *,
    allow_tf32: bool = False,
) -> Tensor:
    """Apply f(B_l ⊗ A_l) blockwise through the factors' eigenbases.

    Block l of the result is U_B (F ∘ (U_Bᵀ V_l U_A)) U_Aᵀ with F[r, s] = f(λ_B[r] λ_A[s]),
    f(x) = (x + damping)^power where x ≥ thresholds[l] (x rounded to V's dtype, as
    :func:`kron_topk` reports it) and 0 elsewhere. power = −1 with
    damping > 0 gives the damped inverse; power = 0 with thresholds at the k-th largest
    product (see :func:`kron_topk`) the projection onto the top-k eigenspace.

    Args:
        UA, lamA: per layer eigenvectors (in_l, in_l) and eigenvalues (in_l,) of A_l.
        UB, lamB: per layer eigenvectors (out_l, out_l) and eigenvalues (out_l,) of B_l.
        V: (b, N) as in :func:`kron_matmul`.
        thresholds: (L,) float64 on V's device; None means no cut (−inf).
        allow_tf32: permit TF32 for the float32 rotations on CUDA; precision as in
            :func:`kron_matmul`.
    """
    if thresholds is None:
        thresholds = torch.full((len(UA),), float("-inf"), dtype=torch.float64, device=V.device)
    return _call(
        "kron_eig_apply",
        [("UA", list(UA)), ("lamA", list(lamA)), ("UB", list(UB)), ("lamB", list(lamB)), ("V", V),
         ("power", float(power)), ("damping", float(damping)), ("thresholds", thresholds),
         ("allow_tf32", bool(allow_tf32))],
        reference.kron_eig_apply,
    )


def kron_topk(lamB: Tensor, lamA: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest eigenvalues of B ⊗ A from its factors' eigenvalues.

    Args:
        lamB: (p,) eigenvalues of B; lamA: (q,) eigenvalues of A; any order, any sign.
        k: 0 ≤ k ≤ p·q.

    Returns:
        values (k,) descending, idx_B (k,) and idx_A (k,) int64 with values = lamB[idx_B]·lamA[idx_A].
        The eigenvector of pair (i, j) is U_B[:, i] ⊗ U_A[:, j] (row-major vec).

    Ties: the products are compared in float64 on every device; among equal products the
    larger i comes first, and among equal lamA values the order of a stable argsort (the
    larger j first where lamB[i] ≥ 0, the smaller where lamB[i] < 0), so the CPU and CUDA
    kernels return the same pairs. (The twin forms all products and keeps torch.topk's
    order among ties, which may differ.)
    """
    return _call("kron_topk", [("lamB", lamB), ("lamA", lamA), ("k", int(k))], reference.kron_topk)


# ---- fake (meta) kernels: the checks of csrc/common/checks.h, with the same messages ----

_CPP_DTYPE = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
              torch.int64: "Long", torch.int32: "Int", torch.bool: "Bool", torch.int8: "Char", torch.uint8: "Byte",
              torch.int16: "Short", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def _cpp(x) -> str:
    """x as C++ prints it in the checks' messages (dtype names, sizes as [a, b])."""
    if isinstance(x, torch.dtype):
        return _CPP_DTYPE.get(x, str(x))
    if isinstance(x, (torch.Size, tuple, list)):
        return "[" + ", ".join(str(int(v)) for v in x) + "]"
    return str(x)


def _value(cond, op: str, msg: Callable[[], str]) -> None:
    torch._check_value(cond, lambda: f"hesslab.{op}: " + msg())


def _type(cond, op: str, msg: Callable[[], str]) -> None:
    torch._check_type(cond, lambda: f"hesslab.{op}: " + msg())


def _check_floating(t: Tensor, op: str, name: str) -> None:
    _type(t.dtype in (torch.float32, torch.float64), op,
          lambda: f"argument '{name}' must be float32 or float64, got {_cpp(t.dtype)}")


def _check_dim(t: Tensor, dim: int, op: str, name: str, layout: str) -> None:
    _value(t.dim() == dim, op, lambda: f"argument '{name}' must have shape {layout} ({dim} dims), got {_cpp(t.shape)}")


def _check_device(t: Tensor, ref: Tensor, op: str, name: str, ref_name: str) -> None:
    _value(t.device == ref.device, op,
           lambda: f"argument '{name}' must be on the device of '{ref_name}' ({ref.device}), got {t.device}")


def _check_same(t: Tensor, ref: Tensor, op: str, name: str, ref_name: str) -> None:
    _type(t.dtype == ref.dtype, op,
          lambda: f"argument '{name}' must have the dtype of '{ref_name}' ({_cpp(ref.dtype)}), got {_cpp(t.dtype)}")
    _check_device(t, ref, op, name, ref_name)


def _check_mutated_contiguous(t: Tensor, op: str, name: str) -> None:
    _value(t.is_contiguous(), op,
           lambda: f"argument '{name}' is written in place and must be contiguous, got shape {_cpp(t.shape)} "
                   f"with strides {_cpp(t.stride())}; pass {name}.contiguous() and read the result from that tensor")


def _check_basis_and_vectors(Q: Tensor, w: Tensor, op: str) -> None:
    _check_floating(Q, op, "Q")
    _check_dim(Q, 3, op, "Q", "(b, m, n)")
    _check_dim(w, 2, op, "w", "(b, n)")
    _check_same(w, Q, op, "w", "Q")
    _value(w.shape[0] == Q.shape[0] and w.shape[1] == Q.shape[2], op,
           lambda: f"argument 'w' must have shape (b, n) = ({Q.shape[0]}, {Q.shape[2]}) to match 'Q' "
                   f"{_cpp(Q.shape)}, got {_cpp(w.shape)}")


def check_lanczos_step(Q: Tensor, w: Tensor, beta_prev: Tensor, j: int) -> None:
    """The argument checks of lanczos_step_ (csrc/common/checks.h), as ``torch._check``s;
    memory overlap, which fake tensors cannot see, is checked in C++ only."""
    op = "lanczos_step_"
    _check_basis_and_vectors(Q, w, op)
    _value(Q.shape[1] >= 1, op, lambda: f"argument 'Q' must hold m >= 1 rows, got {_cpp(Q.shape)}")
    _value(0 <= j < Q.shape[1], op, lambda: f"argument 'j' must satisfy 0 <= j < m = {Q.shape[1]}, got {j}")
    _type(beta_prev.dtype == torch.float64, op, lambda: f"argument 'beta_prev' must be float64, got {_cpp(beta_prev.dtype)}")
    _check_dim(beta_prev, 1, op, "beta_prev", "(b,)")
    _value(beta_prev.shape[0] == Q.shape[0], op,
           lambda: f"argument 'beta_prev' must have shape (b,) = ({Q.shape[0]},), got {_cpp(beta_prev.shape)}")
    _check_device(beta_prev, Q, op, "beta_prev", "Q")
    _check_mutated_contiguous(Q, op, "Q")
    _check_mutated_contiguous(w, op, "w")


def check_reorthogonalize(Q: Tensor, w: Tensor, j: int) -> None:
    """The argument checks of reorthogonalize_ (as :func:`check_lanczos_step`)."""
    op = "reorthogonalize_"
    _check_basis_and_vectors(Q, w, op)
    _value(0 <= j <= Q.shape[1], op, lambda: f"argument 'j' must satisfy 0 <= j <= m = {Q.shape[1]}, got {j}")
    _check_mutated_contiguous(w, op, "w")


def check_gs_sweep(Q: Tensor, w: Tensor, coef: Tensor | None, rows: int) -> None:
    """The argument checks of gs_sweep_ (as :func:`check_lanczos_step`)."""
    op = "gs_sweep_"
    _check_basis_and_vectors(Q, w, op)
    _value(0 <= rows <= Q.shape[1], op, lambda: f"argument 'rows' must satisfy 0 <= rows <= m = {Q.shape[1]}, got {rows}")
    _check_mutated_contiguous(w, op, "w")
    if coef is not None:
        _type(coef.dtype == torch.float64, op, lambda: f"argument 'coef' must be float64, got {_cpp(coef.dtype)}")
        _check_dim(coef, 2, op, "coef", "(b, rows)")
        _value(coef.shape[0] == Q.shape[0] and coef.shape[1] == rows, op,
               lambda: f"argument 'coef' must have shape (b, rows) = ({Q.shape[0]}, {rows}), got {_cpp(coef.shape)}")
        _check_device(coef, Q, op, "coef", "Q")


def check_kron_factors(A, B, V: Tensor, op: str, a_name: str, b_name: str) -> list[int]:
    """The checks of the Kronecker factors; returns the per-layer offsets (as C++)."""
    _check_floating(V, op, "V")
    _check_dim(V, 2, op, "V", "(b, N)")
    _value(len(A) == len(B), op,
           lambda: f"arguments '{a_name}' and '{b_name}' must list the same number of layers, got {len(A)} and {len(B)}")
    offsets = [0]
    for l, (a, b) in enumerate(zip(A, B)):
        an, bn = f"{a_name}[{l}]", f"{b_name}[{l}]"
        _check_same(a, V, op, an, "V")
        _check_same(b, V, op, bn, "V")
        _value(a.dim() == 2 and a.shape[0] == a.shape[1], op,
               lambda: f"argument '{an}' must be a square matrix (in, in), got {_cpp(a.shape)}")
        _value(b.dim() == 2 and b.shape[0] == b.shape[1], op,
               lambda: f"argument '{bn}' must be a square matrix (out, out), got {_cpp(b.shape)}")
        offsets.append(offsets[-1] + a.shape[0] * b.shape[0])
    _value(V.shape[1] == offsets[-1], op,
           lambda: f"argument 'V' must have N = sum(out*in) = {offsets[-1]} columns for the given factors, "
                   f"got {_cpp(V.shape)}")
    return offsets


def check_kron_eig(UA, lamA, UB, lamB, V: Tensor, thresholds: Tensor) -> None:
    """The checks of kron_eig_apply (as C++)."""
    op = "kron_eig_apply"
    check_kron_factors(UA, UB, V, op, "UA", "UB")
    _value(len(lamA) == len(UA) and len(lamB) == len(UB), op,
           lambda: f"arguments 'lamA' and 'lamB' must list one eigenvalue vector per layer ({len(UA)}), "
                   f"got {len(lamA)} and {len(lamB)}")
    for l in range(len(UA)):
        an, bn = f"lamA[{l}]", f"lamB[{l}]"
        _check_same(lamA[l], V, op, an, "V")
        _check_same(lamB[l], V, op, bn, "V")
        _value(lamA[l].dim() == 1 and lamA[l].shape[0] == UA[l].shape[0], op,
               lambda: f"argument '{an}' must have shape ({UA[l].shape[0]},), got {_cpp(lamA[l].shape)}")
        _value(lamB[l].dim() == 1 and lamB[l].shape[0] == UB[l].shape[0], op,
               lambda: f"argument '{bn}' must have shape ({UB[l].shape[0]},), got {_cpp(lamB[l].shape)}")
    _type(thresholds.dtype == torch.float64, op,
          lambda: f"argument 'thresholds' must be float64, got {_cpp(thresholds.dtype)}")
    _value(thresholds.dim() == 1 and thresholds.shape[0] == len(UA), op,
           lambda: f"argument 'thresholds' must have shape (L,) = ({len(UA)},), one per layer, "
                   f"got {_cpp(thresholds.shape)}")
    _check_device(thresholds, V, op, "thresholds", "V")


def check_kron_topk(lamB: Tensor, lamA: Tensor, k: int) -> None:
    """The checks of kron_topk (as C++)."""
    op = "kron_topk"
    _check_floating(lamB, op, "lamB")
    _check_dim(lamB, 1, op, "lamB", "(p,)")
    _check_dim(lamA, 1, op, "lamA", "(q,)")
    _check_same(lamA, lamB, op, "lamA", "lamB")
    pq = lamB.shape[0] * lamA.shape[0]
    _value(0 <= k <= pq, op, lambda: f"argument 'k' must satisfy 0 <= k <= p*q = {pq}, got {k}")


if HAVE_EXTENSION:

    @torch.library.register_fake("hesslab::lanczos_step_")
    def _(Q, w, beta_prev, j, tol):
        check_lanczos_step(Q, w, beta_prev, j)
        b = Q.shape[0]
        f64 = dict(dtype=torch.float64, device=Q.device)
        return Q.new_empty(b, **f64), Q.new_empty(b, **f64), Q.new_empty(b, dtype=torch.bool, device=Q.device)

    @torch.library.register_fake("hesslab::reorthogonalize_")
    def _(Q, w, j):
        check_reorthogonalize(Q, w, j)
        return Q.new_empty(Q.shape[0], j, dtype=torch.float64)

    @torch.library.register_fake("hesslab::gs_sweep_")
    def _(Q, w, coef, rows, dots):
        check_gs_sweep(Q, w, coef, rows)
        return Q.new_empty(Q.shape[0], rows + 1 if dots else 1, dtype=torch.float64)

    @torch.library.register_fake("hesslab::kron_matmul")
    def _(A, B, V, allow_tf32=False):
        check_kron_factors(A, B, V, "kron_matmul", "A", "B")
        return torch.empty_like(V, memory_format=torch.contiguous_format)

    @torch.library.register_fake("hesslab::kron_eig_apply")
    def _(UA, lamA, UB, lamB, V, power, damping, thresholds, allow_tf32=False):
        check_kron_eig(UA, lamA, UB, lamB, V, thresholds)
        return torch.empty_like(V, memory_format=torch.contiguous_format)

    @torch.library.register_fake("hesslab::kron_topk")
    def _(lamB, lamA, k):
        check_kron_topk(lamB, lamA, k)
        return lamB.new_empty(k), lamB.new_empty(k, dtype=torch.long), lamB.new_empty(k, dtype=torch.long)
