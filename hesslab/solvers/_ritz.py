"""Ritz pairs of a (possibly restarted) Lanczos run, and when they can be trusted.

A run of :func:`hesslab.lanczos` is a sequence of *chains* (see
:class:`~hesslab.solvers._krylov.KrylovState`): the first Krylov space, and after each
restart a Krylov space of A compressed to the complement of every row before. The
Ritz pairs are those of the projected matrix H = QᵀAQ: block tridiagonal (one block
T_c per chain) when every restart followed a breakdown, plus a rank-one coupling per
chain ended by force. A pair (θ, s) has the residual

    ‖A Q s − θ Q s‖² = wᵀ (DᵀD − DᵀQ QᵀD) w,   w_f = β_f s_{e_f},

over the vectors D that leave the basis: the next vector d_f of each chain ended by
force (after its last row e_f, with that row's β) and the run's current next vector. With
no forced restart this is the classical |β_m s_m|. In exact arithmetic it is the
residual, not a bound.

**Multiplicity.** One Krylov space holds one copy of each eigenvalue. A copy that it
misses lies (in exact arithmetic) in the complement of every row so far, so a chain
started there from a random vector finds it. The wanted set is *certified* when every
wanted pair has converged (residual ≤ tol·max|θ|) and the newest chain, run until its
own extreme Ritz value converged or it was exhausted (a breakdown: its Ritz values are
then all the distinct eigenvalues left), found nothing strictly beyond the k-th wanted
value. Until then the run asks for another chain (or, without room for one, continues).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from ._krylov import KrylovState


MISS_PROBABILITY = 1e-3  # of a verification chain ending before it saw what it looks for (a bound)
RESTART_MARGIN = 10.0  # the wanted pairs converge to tol / RESTART_MARGIN before a forced restart


def select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the k wanted values of ``theta``, in reporting order."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")[:k]
    if which == "SA":
        return np.argsort(theta, kind="stable")[:k]
    return np.argsort(-np.abs(theta), kind="stable")[:k]


def _beyond(x: float, bound: float, which: str, margin: float) -> bool:
    """Whether x lies strictly past ``bound`` in the wanted direction, by more than ``margin``."""
    if which == "LA":
        return x > bound + margin
    if which == "SA":
        return x < bound - margin
    return abs(x) > abs(bound) + margin


@dataclass
class RitzPairs:
    """All Ritz pairs of run 0.

    Attributes:
        theta: (M,) Ritz values, ascending, M the steps taken.
        est: (M,) their residual norms (see the module docstring).
        S: (M, M) coefficients of the Ritz vectors in Q's rows.
        newest: (Ritz values, residual norms) of the newest chain's own block, the
            compression of A to what the earlier chains left.
    """

    theta: np.ndarray
    est: np.ndarray
    S: np.ndarray
    newest: tuple[np.ndarray, np.ndarray]


def _tridiagonal_eigh(d: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if d.shape[0] == 1:
        return d.copy(), np.ones((1, 1))
    return scipy.linalg.eigh_tridiagonal(d, e)


def _projected(state: KrylovState, m: int, chains: list[tuple[int, int]], alphas, betas) -> np.ndarray:
    """H = QᵀAQ (m, m): the chains' tridiagonal blocks and the forced chains' couplings."""
    H = np.diag(alphas)
    for a, b in chains:
        i = np.arange(a, b - 1)
        H[i, i + 1] = H[i + 1, i] = betas[a : b - 1]
    C = state.C[:, :m].cpu().numpy()
    for f, start in enumerate(state.forced):
        if start < m:
            H[start - 1, start:] = H[start:, start - 1] = betas[start - 1] * C[f, start:]
    return H


def _residuals(state: KrylovState, m: int, S: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """‖A Q s − θ Q s‖ per column s of S (see the module docstring)."""
    ends = [start - 1 for start in state.forced if start < m] + [m - 1]
    W = betas[ends, None] * S[ends, :]  # (F + 1, M)
    F = len(ends) - 1
    if F == 0:
        return np.abs(W[0])
    D = state.D[:F].double()
    r = state.row(m)
    nxt = state.Q[0, r].double() if r < state.Q.shape[1] else torch.zeros_like(D[0])
    Dall = torch.cat([D, nxt[None]])
    gram = Dall @ Dall.T  # sharded: local partial sums, all-reduced
    gram = (gram if state.shards is None else state.shards.reduce_(gram)).cpu().numpy()
    C = state.C[:F, :m].cpu().numpy()  # next vector: orthogonal to the basis
    proj = np.zeros((F + 1, F + 1))
    proj[:F, :F] = C @ C.T
    quad = np.einsum("fm,fg,gm->m", W, gram - proj, W)
    return np.sqrt(np.maximum(quad, 0.0))


def ritz_pairs(state: KrylovState) -> RitzPairs:
    """The Ritz pairs of run 0, and its newest chain's own Ritz values and residuals."""
    m = int(state.steps[0])
    chains = state.chains()
    alphas = state.alphas[0, :m].cpu().numpy()
    betas = state.betas[0, :m].cpu().numpy()
    blocks = [_tridiagonal_eigh(alphas[a:b], betas[a : b - 1]) for a, b in chains]
    if not state.forced:  # block diagonal: the blocks' pairs
        S = np.zeros((m, m))
        for (a, b), (_, Sc) in zip(chains, blocks):
            S[a:b, a:b] = Sc
        theta = np.concatenate([t for t, _ in blocks]) if blocks else np.zeros(0)
        order = np.argsort(theta, kind="stable")
        theta, S = theta[order], S[:, order]
    else:
        theta, S = np.linalg.eigh(_projected(state, m, chains, alphas, betas))
    est = _residuals(state, m, S, betas) if m else np.zeros(0)
    a, b = chains[-1] if chains else (0, 0)
    own = blocks[-1] if blocks else (np.zeros(0), np.zeros((0, 0)))
    return RitzPairs(theta, est, S, (own[0], np.abs(betas[b - 1] * own[1][-1, :]) if b > a else np.zeros(0)))


def assess(state: KrylovState, k: int, which: str, tol: float, room: int, verify: bool = True) -> str:
    """"stop" (the wanted set is certified), "restart" (ask for another chain) or "continue".

    Args:
        state: the run (run 0 is assessed).
        k, which: the wanted pairs.
        tol: relative residual tolerance (of ‖T‖ = max |θ|).
        room: steps a new chain could still take; with too little room the current
            chain continues instead (it ends exhausted, which certifies as well).
        verify: start verification chains; without, a run whose newest chain is still
            open stops once the wanted pairs converged (a copy of an eigenvalue that no
            breakdown revealed can then be missed).
    """
    m = int(state.steps[0])
    if m < k or m in state.forced:  # a forced chain that has not made its first step
        return "continue"
    p = ritz_pairs(state)
    if p.theta.size < k:
        return "continue"
    sel = select(p.theta, k, which)
    thr = tol * max(float(np.abs(p.theta).max()), 1e-300)
    if np.any(p.est[sel] > thr):
        return "continue"
    n = state.size
    if m >= n:
        return "stop"  # the basis spans the whole space: every Ritz pair is exact
    own_theta, own_est = p.newest
    ends = {select(own_theta, 1, w)[0] for w in ((which,) if which != "LM" else ("LA", "SA"))}
    kth = float(p.theta[sel[-1]])
    if any(_beyond(float(own_theta[i]), kth, which, 2 * thr) for i in ends):
        # the newest chain found something past the k-th wanted value (Ritz values only
        # move outwards): converge it, then look again in a fresh chain
        if m in state.cuts:
            return "continue"
        if not verify:
            return "stop"
        if np.any(p.est[sel] > thr / RESTART_MARGIN):
            return "continue"  # (a margin: the next chain's coupling must not undo the convergence)
        return "restart" if room >= max(2 * k, 10) else "continue"
    if m in state.cuts or bool(own_est.max() <= thr):
        return "stop"  # exhausted (a breakdown, or invariant to the tolerance): nothing is left beyond
    # The extreme Ritz value of a chain from a random vector converges to the extreme
    # eigenvalue of what is left, from inside. It is resolved when its residual is small
    # next to its distance to the k-th wanted value and the chain is long enough for the
    # bound of Kuczyński & Woźniakowski (1992): after j steps from a random start,
    # λ_max − θ_max ≤ ε·width except with probability 1.648·√n·exp(−(2j − 1)·√ε).
    a, b = state.chains()[-1]
    width = 2 * float(np.abs(p.theta).max())
    for i in ends:
        gap = abs(float(own_theta[i]) - kth) if which != "LM" else abs(kth) - abs(float(own_theta[i]))
        if own_est[i] > max(thr, 0.1 * gap):
            return "continue"
        eps = max(gap, thr) / width
        if 2 * (b - a) - 1 < np.log(1.648 * np.sqrt(n) / MISS_PROBABILITY) / np.sqrt(eps):
            return "continue"
    return "stop"
