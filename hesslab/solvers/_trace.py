"""Stochastic trace estimation: ``hl.trace`` (Hutchinson and Hutch++)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._results import Result
from ..errors import require
from ..linops import LinearOperator
from ._checks import check_int, global_size, is_int
from ._krylov import close_bar, progress_enabled
from ._sharded import cholesky_qr2, column_sums

METHODS = ("hutchinson", "hutch++")


@dataclass
class TraceEstimate(Result):
    """An unbiased trace estimate.

    Attributes:
        value: the estimate of tr(A).
        std_error: its standard error (sample standard deviation of the random part / √count).
        num_matvecs: operator products used.
        method: "hutchinson" or "hutch++".
    """

    value: float
    std_error: float
    num_matvecs: int
    method: str


def _rademacher(n: int, k: int, gen: torch.Generator, op: LinearOperator) -> Tensor:
    z = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.int8).to(op.dtype) * 2 - 1
    return z.to(op.device)


def _apply(op: LinearOperator, Z: Tensor, batch_size: int, bar) -> Tensor:
    """A Z in blocks of ``batch_size`` columns (each block is one pass over the data)."""
    out = []
    for s in range(0, Z.shape[1], batch_size):
        out.append(op.matmat(Z[:, s : s + batch_size]))
        bar.update(out[-1].shape[1])
    return torch.cat(out, dim=1)


def _quad_forms(op: LinearOperator, draw, count: int, batch_size: int, bar) -> Tensor:
    """zᵢᵀ A zᵢ (float64) for ``count`` columns made ``batch_size`` at a time by ``draw(k)``,
    so that memory stays at (n, batch_size) in the operator's dtype."""
    out = []
    for s in range(0, count, batch_size):
        Z = draw(min(batch_size, count - s))
        forms = Z * op.matmat(Z)
        out.append(forms.sum(0, dtype=torch.float64) if op.shards is None else column_sums(op.shards, forms))
        bar.update(Z.shape[1])
    return torch.cat(out)


def trace(
    op: LinearOperator,
    num_matvecs: int = 100,
    method: str = "hutch++",
    *,
    seed: int = 0,
    batch_size: int = 10,
    progress: bool | None = None,
) -> TraceEstimate:
    """Estimate tr(A) with ``num_matvecs`` products.

    Hutchinson: the mean of zᵀAz over Rademacher z. Hutch++ (Meyer et al. 2021): a third
    of the budget sketches S, Q = orth(A S) captures the top of the spectrum exactly
    (tr(QᵀAQ)), and Hutchinson on (I − QQᵀ) A (I − QQᵀ) with the last third estimates the
    rest; the standard error is that of the random part. Hutch++ wins when a few large
    eigenvalues dominate, as for Hessians.

    Args:
        op: symmetric (n, n) operator.
        num_matvecs: product budget (≥ 2 for Hutchinson, ≥ 3 for Hutch++).
        method: "hutchinson" or "hutch++".
        seed: seed of the random vectors.
        batch_size: columns per product call (one pass over the data each).
        progress: progress bar; None shows it when stderr is a terminal.

    A sharded operator (``op.shards``): every rank calls it with the same arguments, the
    random vectors' shards come from each rank's own stream, quadratic forms and the
    projection coefficients are all-reduced, Hutch++ orthonormalizes its sketch by
    CholeskyQR with all-reduced Gram matrices (:func:`._sharded.cholesky_qr2`, which drops
    the null directions of a rank-deficient sketch), and the estimate and its standard
    error are identical on every rank.
    """
    require(method in METHODS, f"method must be one of {METHODS}, got {method!r}")
    minimum = 2 if method == "hutchinson" else 3
    check_int("num_matvecs", num_matvecs, minimum, hint=f" for {method}")
    check_int("batch_size", batch_size, 1, hint=" (columns per product call)")
    require(is_int(seed), f"seed must be an integer, got {seed!r}")
    from tqdm.auto import tqdm

    n, shards = op.shape[0], op.shards  # n: the local n_r of a sharded operator
    gen = torch.Generator().manual_seed(seed if shards is None else shards.seed(seed))
    bar = tqdm(total=num_matvecs, desc=f"trace ({method})", unit="matvec", disable=not progress_enabled(progress),
               leave=False)
    try:
        if method == "hutchinson":
            q = _quad_forms(op, lambda k: _rademacher(n, k, gen, op), num_matvecs, batch_size, bar)
            return TraceEstimate(float(q.mean()), float(q.std() / math.sqrt(num_matvecs)), num_matvecs, method)
        k = min(num_matvecs // 3, global_size(op))
        m_rest = num_matvecs - 2 * k
        sketch = _apply(op, _rademacher(n, k, gen, op), batch_size, bar).double()
        Q = torch.linalg.qr(sketch)[0] if shards is None else cholesky_qr2(shards, sketch)  # (n, k') orthonormal
        AQ = _apply(op, Q.to(op.dtype), batch_size, bar).double()
        exact = float((Q * AQ).sum()) if shards is None else float(column_sums(shards, Q * AQ).sum())
        Qo = Q.to(op.dtype)

        def projected(k: int) -> Tensor:  # (I − QQᵀ) G for a block of Rademacher G
            G = _rademacher(n, k, gen, op)
            coeffs = Qo.T @ G if shards is None else shards.reduce_(Qo.T @ G)
            return G - Qo @ coeffs

        q = _quad_forms(op, projected, m_rest, batch_size, bar)
        # The projected quadratic forms: (PG)ᵀ A (PG) with P = I − QQᵀ.
        value = exact + float(q.mean())
        err = float(q.std() / math.sqrt(m_rest)) if m_rest > 1 else float("nan")
        return TraceEstimate(value, err, k + Q.shape[1] + m_rest, method)
    finally:
        close_bar(bar)
