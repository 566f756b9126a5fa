"""Typed wrappers over ``torch.ops.hesslab.*``: device checks, fake kernels, fallback.

The compiled library ``hesslab._C`` registers the op schemas and their CPU (and, when
built, CUDA) kernels. This module:

* checks that every tensor argument lives on one device and that a kernel exists for it,
  so a CUDA tensor sent to a CPU-only build gets a :class:`~hesslab.errors.HesslabError`
  naming the fix instead of a dispatcher trace (shape and dtype checks happen in C++,
  csrc/common/checks.h, and come back here as HesslabError too);
* registers fake (meta) kernels so the ops trace under ``torch.compile``;
* falls back to the pure-torch twins in :mod:`hesslab.reference` (with a warning, once)
  when the extension is not built at all, e.g. when running from a source tree.

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

OP_NAMES = ("lanczos_step_", "reorthogonalize_", "kron_matmul", "kron_eig_apply", "kron_topk")
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
        elif not isinstance(a, (int, float)):
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
        return getattr(torch.ops.hesslab, op)(*args)
    except (ValueError, TypeError, IndexError) as exc:
        raise HesslabError(str(exc).split("\n")[0]) from None


def lanczos_step_(Q: Tensor, w: Tensor, beta_prev: Tensor, j: int, tol: float = 1e-10) -> tuple[Tensor, Tensor, Tensor]:
    """One Lanczos step with full reorthogonalization for b runs at once, in place.

    For each run i: alpha = ⟨w, q_j⟩; w −= alpha q_j + beta_prev q_{j−1}; CGS2 of w against
    q_0..q_j (alpha absorbs the corrections along q_j); beta = ‖w‖; Q[i, j+1] = w / beta
    when j + 1 < m. All inner products accumulate in float64. The second Gram–Schmidt
    update is skipped for a run whose w the first already left orthogonal to working
    precision (‖Qw‖ ≤ eps‖w‖, eps of Q's dtype), as it could change w only by rounding:
    with float64 accumulation that is nearly every step of a float32 basis, one sweep
    over Q saved out of three.

    Args:
        Q: (b, m, n) Krylov bases, rows 0..j orthonormal; row j+1 is written.
        w: (b, n) on entry A q_j; on exit the residual beta · q_{j+1}.
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
    update only where needed, as in :func:`lanczos_step_`).

    Returns:
        (b, j) float64: the sum of the applied passes' coefficients ⟨q_r, w⟩.
    """
    return _call("reorthogonalize_", [("Q", Q), ("w", w), ("j", int(j))], reference.reorthogonalize,
                 {"accumulate": torch.float64})


def kron_matmul(A: Sequence[Tensor], B: Sequence[Tensor], V: Tensor) -> Tensor:
    """Block-diagonal Kronecker product over layers: block l of the result is vec(B_l V_l A_lᵀ).

    Args:
        A: per layer (in_l, in_l) input factor.
        B: per layer (out_l, out_l) output factor.
        V: (b, N), N = Σ out_l·in_l; block l is a row-major (out_l, in_l) matrix.

    Returns:
        (b, N), the product (B_l ⊗ A_l) applied blockwise.
    """
    return _call("kron_matmul", [("A", list(A)), ("B", list(B)), ("V", V)], reference.kron_matmul)


def kron_eig_apply(
    UA: Sequence[Tensor],
    lamA: Sequence[Tensor],
    UB: Sequence[Tensor],
    lamB: Sequence[Tensor],
    V: Tensor,
    power: float = 1.0,
    damping: float = 0.0,
    thresholds: Tensor | None = None,
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
    """
    if thresholds is None:
        thresholds = torch.full((len(UA),), float("-inf"), dtype=torch.float64, device=V.device)
    return _call(
        "kron_eig_apply",
        [("UA", list(UA)), ("lamA", list(lamA)), ("UB", list(UB)), ("lamB", list(lamB)), ("V", V),
         ("power", float(power)), ("damping", float(damping)), ("thresholds", thresholds)],
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
    """
    return _call("kron_topk", [("lamB", lamB), ("lamA", lamA), ("k", int(k))], reference.kron_topk)


if HAVE_EXTENSION:

    @torch.library.register_fake("hesslab::lanczos_step_")
    def _(Q, w, beta_prev, j, tol):
        b = Q.shape[0]
        f64 = dict(dtype=torch.float64, device=Q.device)
        return Q.new_empty(b, **f64), Q.new_empty(b, **f64), Q.new_empty(b, dtype=torch.bool, device=Q.device)

    @torch.library.register_fake("hesslab::reorthogonalize_")
    def _(Q, w, j):
        return Q.new_empty(Q.shape[0], j, dtype=torch.float64)

    @torch.library.register_fake("hesslab::kron_matmul")
    def _(A, B, V):
        return torch.empty_like(V, memory_format=torch.contiguous_format)

    @torch.library.register_fake("hesslab::kron_eig_apply")
    def _(UA, lamA, UB, lamB, V, power, damping, thresholds):
        return torch.empty_like(V, memory_format=torch.contiguous_format)

    @torch.library.register_fake("hesslab::kron_topk")
    def _(lamB, lamA, k):
        return lamB.new_empty(k), lamB.new_empty(k, dtype=torch.long), lamB.new_empty(k, dtype=torch.long)
