"""Pure-torch twins of the compiled ops: the test oracle and the fallback.

Each function computes what the op of the same name in ``torch.ops.hesslab`` computes
(see csrc/hesslab.cpp and hesslab/_ops.py for the contracts), with batched
matrix products (bmm/einsum) instead of hand-written kernels. The Lanczos twins take
``accumulate``: ``None`` does the inner products in the storage dtype (a plain float32
GEMM for float32 bases, the baseline the benchmarks compare against), ``torch.float64``
upcasts first and so matches the compiled kernels, which always accumulate in float64.
The twins always apply both Gram–Schmidt updates and the textbook three-term recurrence;
the kernels follow the plan in csrc/common/gram_schmidt_plan.h (the recurrence folded into
the first update, the second update skipped where the first already reached working
precision), identical in exact arithmetic, so the two agree to rounding, not bitwise. The
scalar rules (breakdown, a zero next row on breakdown or when beta is not > 0) are the same.

Shapes: Q (b, m, n) Krylov bases, w (b, n), V (b, N) flat vectors over Kronecker layers
(layer l owns N_l = out_l * in_l consecutive entries, a row-major (out_l, in_l) matrix).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc(t: Tensor, accumulate: torch.dtype | None) -> Tensor:
    return t if accumulate is None else t.to(accumulate)


def reorthogonalize(Q: Tensor, w: Tensor, j: int, accumulate: torch.dtype | None = None) -> Tensor:
    """CGS2 of ``w`` (b, n) against ``Q[:, :j]`` in place; returns the coefficients (b, j) float64."""
    Qj = _acc(Q[:, :j], accumulate)
    total = torch.zeros(Q.shape[0], j, dtype=torch.float64, device=Q.device)
    for _ in range(2):  # w is rounded to its storage dtype after each pass, as in the kernels
        x = _acc(w, accumulate)
        c = torch.bmm(Qj, x.unsqueeze(2)).squeeze(2)  # (b, j)
        w.copy_(x - torch.bmm(Qj.transpose(1, 2), c.unsqueeze(2)).squeeze(2))
        total += c.to(torch.float64)
    return total


def lanczos_step(
    Q: Tensor, w: Tensor, beta_prev: Tensor, j: int, tol: float, accumulate: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One Lanczos step for b runs, mutating ``Q[:, j+1]`` and ``w``.

    alpha = <w, q_j>; w -= alpha q_j + beta_prev q_{j-1}; CGS2 against q_0..q_j (alpha
    absorbs the q_j coefficients); beta = ||w||; breakdown = beta <= tol (||w_in|| + |beta_prev|)
    (the scale of the terms that were subtracted, so that w_in = 0 is a breakdown too);
    Q[:, j+1] = w / beta, or zeros on breakdown (or when beta is not > 0), when j + 1 < m.

    Returns:
        alpha (b,) float64, beta (b,) float64, breakdown (b,) bool.
    """
    x = _acc(w, accumulate)
    qj = _acc(Q[:, j], accumulate)
    a0 = (x * qj).sum(1)
    scale = x.norm(dim=1).to(torch.float64) + (beta_prev.abs() if j > 0 else 0.0)
    x = x - a0.unsqueeze(1) * qj
    if j > 0:
        x = x - beta_prev.to(x.dtype).unsqueeze(1) * _acc(Q[:, j - 1], accumulate)
    w.copy_(x)
    coeff = reorthogonalize(Q, w, j + 1, accumulate)
    x = _acc(w, accumulate)
    alpha = a0.to(torch.float64) + coeff[:, j]
    beta = x.norm(dim=1).to(torch.float64)
    breakdown = beta <= tol * scale
    if j + 1 < Q.shape[1]:
        zero = breakdown | ~(beta > 0)
        scale = torch.where(zero, torch.zeros_like(beta), 1.0 / torch.where(zero, 1.0, beta))
        row = torch.where(zero.unsqueeze(1), torch.zeros_like(x), x * scale.to(x.dtype).unsqueeze(1))
        Q[:, j + 1] = row.to(Q.dtype)  # exactly 0 on breakdown, even for a NaN residual
    return alpha, beta, breakdown


def gs_sweep(Q: Tensor, w: Tensor, coef: Tensor | None, rows: int, dots: bool = True) -> Tensor:
    """w -= Q[:, :rows]ᵀ coef (float64, when coef is given; w rounded once), then
    [Q[:, :rows] w, ‖w‖²] as (b, rows + 1) float64 (only ‖w‖², (b, 1), without dots)."""
    QR = Q[:, :rows].to(torch.float64)
    if coef is not None and rows > 0:
        w.copy_(w.to(torch.float64) - torch.bmm(QR.transpose(1, 2), coef.unsqueeze(2)).squeeze(2))
    x = w.to(torch.float64)
    norm2 = (x * x).sum(1, keepdim=True)
    if not dots:
        return norm2
    return torch.cat([torch.bmm(QR, x.unsqueeze(2)).squeeze(2), norm2], dim=1)


def _layers(V: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """Split V (b, N) into the per-layer (b, out, in) views."""
    sizes = [o * i for o, i in shapes]
    return [blk.reshape(V.shape[0], o, i) for blk, (o, i) in zip(V.split(sizes, dim=1), shapes)]


def kron_matmul(A: list[Tensor], B: list[Tensor], V: Tensor, allow_tf32: bool = False) -> Tensor:
    """Block-diagonal Kronecker product: block l of the result is vec(B_l V_l A_lᵀ).
    (allow_tf32 is accepted for the op's schema; the twin follows torch's own TF32 settings.)"""
    shapes = [(b.shape[0], a.shape[0]) for a, b in zip(A, B)]
    outs = [torch.einsum("ro,boi,si->brs", B_l, V_l, A_l) for A_l, B_l, V_l in zip(A, B, _layers(V, shapes))]
    return torch.cat([o.flatten(1) for o in outs], dim=1) if outs else V.clone()


def kron_eig_apply(
    UA: list[Tensor],
    lamA: list[Tensor],
    UB: list[Tensor],
    lamB: list[Tensor],
    V: Tensor,
    power: float,
    damping: float,
    thresholds: Tensor,
    allow_tf32: bool = False,
) -> Tensor:
    """Block l: U_B (f(λ_B λ_Aᵀ) ∘ (U_Bᵀ V_l U_A)) U_Aᵀ with f(x) = (x + damping)^power for x ≥ threshold_l, else 0."""
    shapes = [(ub.shape[0], ua.shape[0]) for ua, ub in zip(UA, UB)]
    outs = []
    for l, V_l in enumerate(_layers(V, shapes)):
        x = torch.outer(lamB[l].double(), lamA[l].double())
        keep = x.to(V.dtype).double() >= thresholds[l]  # the cut sees products as kron_topk reports them
        f = torch.where(keep, (x + damping).pow(power), torch.zeros_like(x))
        X = UB[l].T @ V_l @ UA[l]
        outs.append((UB[l] @ (X * f.to(V.dtype)) @ UA[l].T).flatten(1))
    return torch.cat(outs, dim=1) if outs else V.clone()


def kron_topk(lamB: Tensor, lamA: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest products λ_B[i] λ_A[j], descending, with their index pairs (forms all p·q)."""
    prod = torch.outer(lamB.double(), lamA.double()).reshape(-1)
    values, flat = torch.topk(prod, k)
    return values.to(lamB.dtype), flat // lamA.shape[0], flat % lamA.shape[0]
