"""Extreme eigenpairs by Lanczos with full reorthogonalization: ``hl.lanczos``."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._results import Result
from ..errors import HesslabError, require
from ..linops import LinearOperator
from ._checks import check_basis_dtype, check_int, check_real, global_size, is_int
from ._krylov import KrylovState, breakdown_tol, run_krylov
from ._ritz import assess, ritz_pairs, select
from ._sharded import require_all, row_norms

WHICH = ("LA", "SA", "LM")


@dataclass
class EigenResult(Result):
    """Eigenpairs of an operator.

    Attributes:
        eigenvalues: (k,) float64, in the order asked for: descending for "LA" and "LM"
            (by magnitude), ascending for "SA".
        eigenvectors: (n, k) float64, orthonormal columns (Ritz vectors), or None; for a
            sharded operator this rank's (n_r, k) rows (``hl.gather_shards`` assembles them).
        residuals: (k,) ‖A v − λ v‖ measured with one extra product per vector (NaN when
            not measured).
        converged: (k,) bool: the run certified the wanted set (no copy or larger value
            missed, see :func:`lanczos`) and this pair's residual ≤ tol · ‖T‖ (the measured
            residual when computed, else the recurrence's).
        num_matvecs: operator products used (columns), the residual check included.
        num_steps: Lanczos steps taken.
        which: "LA", "SA", "LM" or "all".
        restarts: breakdowns answered with a fresh orthogonal vector.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    converged: Tensor
    num_matvecs: int
    num_steps: int
    which: str
    restarts: int = 0

    @property
    def num_converged(self) -> int:
        return int(np.asarray(self.converged).sum())


def default_tol(dtype: torch.dtype) -> float:
    """The relative residual tolerance an operator of this dtype can deliver: 1e-8 for
    float64 products, 1e-6 for float32 (whose products are accurate to about 1e-7), and
    10·√eps for other dtypes."""
    if dtype == torch.float64:
        return 1e-8
    if dtype == torch.float32:
        return 1e-6
    return 10 * float(torch.finfo(dtype).eps) ** 0.5


def _check_arguments(op: LinearOperator, k, which: str, tol, max_steps, check_every, seed, basis_dtype) -> None:
    n = global_size(op)
    require(which in WHICH, f"which must be one of {WHICH}, got {which!r}")
    check_int("k", k, 1, n - 1, hint=f" (n = {n}; for all eigenvalues use hl.eigh_exact)")
    if max_steps is not None:
        check_int("max_steps", max_steps, k, n, hint=f" (k = {k}, n = {n})")
    check_real("tol", tol, 0.0, 1.0, hint=" (relative residual tolerance)")
    if check_every is not None:
        check_int("check_every", check_every, 1)
    require(is_int(seed), f"seed must be an integer, got {seed!r}")
    check_basis_dtype(basis_dtype)


def _start_vector(op: LinearOperator, v0, gen: torch.Generator) -> Tensor:
    """(1, n) float64: a seeded Gaussian, or the warm start plus a 1e-3 random perturbation
    (sharded: this rank's (1, n_r) shard; the checks and norms are global)."""
    n, shards = op.shape[0], op.shards
    start = torch.randn(1, n, generator=gen, dtype=torch.float64)
    if v0 is None:
        return start
    v = torch.as_tensor(v0).detach().to("cpu", torch.float64)
    v = v[:, None] if v.dim() == 1 else v
    if shards is None:
        require(v.dim() == 2 and v.shape[0] == n,
                f"v0 must have shape (n,) or (n, j) with n = {n}, got {tuple(v.shape)}")
        require(bool(torch.isfinite(v).all()), "v0 must be finite")
        warm = v.sum(1)
        require(bool(warm.norm() > 0), "v0 must not sum to zero")
        return warm[None] / warm.norm() + 1e-3 * start / start.norm()
    shape_ok = v.dim() == 2 and v.shape[0] == n
    require_all(shards, shape_ok, "v0 must be this rank's shard of the start vector(s), shape (n_r,) or (n_r, j) "
                "with n_r the operator's local size op.shape[0]")
    require_all(shards, bool(torch.isfinite(v).all()), "v0 must be finite")
    warm = v.sum(1)[None]
    norms = row_norms(shards, torch.cat([warm, start]))
    require(bool(norms[0] > 0), "v0 must not sum to zero")  # a global value: every rank agrees
    return warm / norms[0] + 1e-3 * start / norms[1]


def lanczos(
    op: LinearOperator,
    k: int = 10,
    which: str = "LA",
    *,
    tol: float | None = None,
    max_steps: int | None = None,
    v0: Tensor | None = None,
    seed: int = 0,
    return_eigenvectors: bool = True,
    compute_residuals: bool = True,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    check_every: int | None = None,
    progress: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    verify: bool = True,
) -> EigenResult:
    """The k extreme eigenpairs of a symmetric operator.

    Lanczos with full reorthogonalization (CGS2, float64 inner products) through the
    compiled ``lanczos_step_``. The Krylov space grows until every wanted Ritz pair has a
    residual ‖Av − θv‖ ≤ tol · ‖T‖₂ (from the recurrence, checked every ``check_every``
    steps) *and* the wanted set is certified complete: a breakdown (an invariant subspace)
    continues with a fresh random vector orthogonal to the basis, and once the wanted
    pairs have converged the run starts such a chain itself and runs it until its extreme
    pair converges; the run ends when the newest chain found nothing beyond the k-th
    wanted value. So an eigenvalue of any multiplicity is found as many times as k asks,
    for "LA", "SA" and "LM" alike (see :mod:`hesslab.solvers._ritz`). With full
    reorthogonalization no restart is needed for convergence: the cost is memory, k to a
    few thousand rows of n, checked before the run starts.

    A pair is flagged converged only when the run was certified and its residual meets
    the tolerance: the residual measured with one block product of the k Ritz vectors
    (``compute_residuals``), else the one from the recurrence.

    **Sharded operators** (``op.shards`` set, e.g. an FSDP2 Hessian under torchrun):
    every rank calls ``lanczos`` with the same arguments; the basis holds this rank's
    shards (memory b·m·n_r per rank), every inner product is all-reduced (two
    all-reduces per step, see :mod:`hesslab.solvers._sharded`), and the eigenvalues,
    residuals and flags are identical on every rank. ``v0`` is this rank's (n_r,) or
    (n_r, j) shard, the returned eigenvectors are this rank's (n_r, k) rows:
    ``hl.gather_shards(op, result.eigenvectors, dst=0)`` assembles the (n, k) matrix on
    rank 0 (small models). A checkpoint is one file per rank, ``<checkpoint>.rank<r>of<w>``;
    the ranks resume together, and only with the same world size and local sizes.

    Args:
        op: symmetric (n, n) operator, e.g. ``hl.Hessian``.
        k: number of eigenpairs, 1 ≤ k < n (use :func:`eigh_exact` for all of them).
        which: "LA" largest algebraic, "SA" smallest algebraic, "LM" largest magnitude.
        tol: relative residual tolerance, 0 < tol < 1; eigenvalues are then accurate to
            about tol² · ‖A‖² / gap. Default: what the operator's dtype can deliver
            (:func:`default_tol`: 1e-8 for float64, 1e-6 for float32).
        max_steps: Krylov dimension limit; default min(n, max(300, 40 k)).
        v0: warm start, (n,) or (n, j) (e.g. the previous eigenvectors when tracking
            training): the start vector is their sum plus a 1e-3 random perturbation.
        seed: seed of the random start and restart vectors.
        return_eigenvectors: compute the (n, k) Ritz vectors.
        compute_residuals: measure ‖A v − λ v‖ with k extra products (one block product).
        basis_dtype: storage of the Krylov basis; default the operator's dtype. float32
            halves the memory; inner products still accumulate in float64.
        basis_device: where the basis lives (default the operator's device).
        check_every: steps between convergence checks (each costs an O(m²) tridiagonal
            eigensolve, nothing next to a product); default 1.
        progress: progress bar; None shows it when stderr is a terminal.
        checkpoint: file to save the run's state to and resume from after an interruption.
        checkpoint_every: steps between checkpoint writes (an interruption always writes).
        verify: run the verification chains that certify the wanted set (the default).
            False saves their products (about a third more on small Hessians) but then
            a converged flag only says that the pair's residual meets the tolerance and
            that no breakdown revealed a copy it misses: a copy of a multiple eigenvalue
            that the first Krylov space never separated can be missing.

    Returns:
        EigenResult.

    Raises:
        HesslabError: bad k, which, tol, max_steps, check_every, v0 or checkpoint, or a
            basis that does not fit in memory.
    """
    tol = default_tol(op.dtype) if tol is None else tol
    _check_arguments(op, k, which, tol, max_steps, check_every, seed, basis_dtype)
    n = global_size(op)
    max_steps = min(n, max(300, 40 * k)) if max_steps is None else max_steps
    basis_dtype = basis_dtype or op.dtype
    basis_device = torch.device(basis_device) if basis_device is not None else op.device
    check_every = check_every or 1
    gen = torch.Generator().manual_seed(seed if op.shards is None else op.shards.seed(seed))
    start = _start_vector(op, v0, gen)

    def decide(state: KrylovState) -> str:
        room = min(n, max_steps) - state.j
        return assess(state, k, which, tol, room, verify)

    state = run_krylov(
        op, start, max_steps, basis_dtype=basis_dtype, basis_device=basis_device, on_breakdown="restart",
        generator=gen, breakdown_tol=breakdown_tol(basis_dtype), stop=decide, check_every=check_every,
        initial_capacity=max(2 * k + 20, 64), progress=progress, desc=f"lanczos k={k} {which}", checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, on_finish=_finished_residuals(op, k, which) if compute_residuals else None,
        config={"solver": "lanczos", "k": k, "which": which, "tol": tol, "seed": seed, "verify": bool(verify),
                "v0": None if v0 is None else float(start.sum())},
    )
    return _result(op, state, k, which, tol, decide(state) == "stop", return_eigenvectors, compute_residuals)


def _wanted(state: KrylovState, k: int, which: str):
    """(Ritz pairs, indices of the k wanted ones) of run 0."""
    pairs = ritz_pairs(state)
    return pairs, select(pairs.theta, k, which)


def _wanted_vectors(state: KrylovState, pairs, sel) -> Tensor:
    """The wanted Ritz vectors (n, k), float64 on the CPU."""
    S = torch.from_numpy(pairs.S[:, sel])
    return ritz_vectors(state.Q[0, : S.shape[0]], S)


def _residual_norms(op: LinearOperator, vectors: Tensor, theta: np.ndarray) -> Tensor:
    """‖A v − θ v‖ of each Ritz pair: one block product of all k Ritz vectors."""
    AV = op.matmat(vectors.to(device=op.device, dtype=op.dtype)).double().cpu()
    R = AV - vectors * torch.from_numpy(theta)
    if op.shards is None:
        return R.norm(dim=0)
    return op.shards.reduce_(R.pow(2).sum(0)).sqrt()


def _finished_residuals(op: LinearOperator, k: int, which: str) -> Callable[[KrylovState], dict]:
    """The driver's ``on_finish``: the k residual norms, measured once and kept in the
    checkpoint, so that resuming a finished run costs only its identity product."""
    def measure(state: KrylovState) -> dict:
        pairs, sel = _wanted(state, k, which)
        return {"residuals": _residual_norms(op, _wanted_vectors(state, pairs, sel), pairs.theta[sel])}

    return measure


def _result(op: LinearOperator, state: KrylovState, k: int, which: str, tol: float, certified: bool,
            return_eigenvectors: bool, compute_residuals: bool) -> EigenResult:
    """The k wanted pairs of a finished run, with residuals (measured now, or those its
    checkpoint kept) and honest converged flags."""
    pairs, sel = _wanted(state, k, which)
    theta = pairs.theta
    thr = tol * max(float(np.abs(theta).max()), 1e-300)
    m = int(state.steps[0])
    vectors = None
    residuals = torch.full((k,), float("nan"), dtype=torch.float64)
    converged = pairs.est[sel] <= thr
    stored = state.extra.get("residuals") if compute_residuals else None
    if return_eigenvectors or (compute_residuals and stored is None):
        vectors = _wanted_vectors(state, pairs, sel)  # (n, k)
    if compute_residuals:
        residuals = stored.clone() if stored is not None else _residual_norms(op, vectors, theta[sel])
        converged = residuals.numpy() <= thr
    return EigenResult(
        eigenvalues=torch.from_numpy(theta[sel].copy()),
        eigenvectors=vectors if return_eigenvectors else None,
        residuals=residuals,
        converged=torch.from_numpy(converged & certified),
        num_matvecs=m + (k if compute_residuals else 0),
        num_steps=m,
        which=which,
        restarts=state.restarts,
    )


def ritz_vectors(Q: Tensor, S: Tensor, max_bytes: int = 2**28) -> Tensor:
    """Qᵀ S in float64 on the CPU, for a basis Q (m, n) of any dtype and device and S (m, k).

    Converted to float64 a slice of columns at a time, so that the extra memory stays
    below ``max_bytes`` however long the basis (a float64 copy of 300 steps of an
    11M-parameter basis would take 26 GB).
    """
    m, n = Q.shape
    S = S.to(device=Q.device, dtype=torch.float64)
    out = torch.empty(n, S.shape[1], dtype=torch.float64)
    step = max(1, max_bytes // (8 * max(m, 1)))
    for lo in range(0, n, step):
        out[lo : lo + step] = (Q[:, lo : lo + step].T.double() @ S).cpu()
    return out


def eigh_exact(op: LinearOperator, max_size: int = 4096, return_eigenvectors: bool = True) -> EigenResult:
    """All eigenpairs of a small operator from its dense float64 matrix.

    Args:
        op: (n, n) operator with n ≤ max_size (it is materialised with n products).
        max_size: refuse larger operators (use :func:`lanczos` for the extremes or
            :func:`spectral_density` for the density).

    Returns:
        EigenResult with the n eigenvalues in descending order ("which" = "all").
    """
    require(op.shards is None, "eigh_exact: the operator is sharded over ranks; use hl.lanczos (or gather the "
            "dense matrix yourself on one rank)")
    require(op.shape[0] <= max_size,
            f"eigh_exact: n = {op.shape[0]} exceeds max_size = {max_size}; raise max_size if memory allows "
            "(n^2 float64), or use hl.lanczos / hl.spectral_density")
    D = op.to_dense(max_size=max_size).to(torch.float64).cpu()
    D = (D + D.T) / 2
    if return_eigenvectors:
        lam, U = torch.linalg.eigh(D)
        lam, U = lam.flip(0), U.flip(1)
        residuals = (D @ U - U * lam).norm(dim=0)
    else:
        lam, U = torch.linalg.eigvalsh(D).flip(0), None
        residuals = torch.zeros_like(lam)
    n = lam.shape[0]
    return EigenResult(lam, U, residuals, torch.ones(n, dtype=torch.bool), n, n, "all")
