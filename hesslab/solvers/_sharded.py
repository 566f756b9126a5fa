"""The solvers' vector work on sharded vectors (operators with ``shards``, issue 14).

A sharded operator's vectors are split over the ranks (see
:class:`hesslab.linops._shards.Shards`): each rank holds its (n_r,) shard, Krylov bases
are (b, m, n_r) per rank, and every inner product, norm or Gram matrix is a local partial
sum (accumulated in float64) followed by one all-reduce, :meth:`Shards.reduce_`. Every
scalar a solver decides on (alpha, beta, breakdown, restart norms, residual norms,
quadratic forms) comes out of an all-reduce, which hands every rank the same bits, so
the ranks take the same branches and return identical eigenvalues, densities and
traces; only vectors (bases, Ritz vectors) stay local.

The Lanczos step (:func:`lanczos_step`) does the plan of csrc/common/gram_schmidt_plan.h
with the compiled sweeps of ``lanczos_step_`` exposed one at a time (``_ops.gs_sweep_``,
CPU and CUDA kernels: float64 sums, the update fused with the next sums), so that the
partial sums can be all-reduced between the sweeps; the per-run scalars (alpha, beta,
breakdown, the next row) follow the plan's rules in torch. It costs two all-reduces per
step, one per Gram–Schmidt pass:

* pass 1 reduces d = Q_R w (the rows R = q_0..q_j; alpha's first term is d_j and the
  three-term recurrence is the part along rows j and j-1, as in the kernels) together
  with ‖w_in‖² (the breakdown scale) and any caller's partial sums (``extra``: the
  eigensolver's overlaps ⟨q_j, d_f⟩ with the vectors of chains ended by force);
* pass 2 reduces c = Q_R w₁ together with ‖w₁‖² in the same buffer, and the second
  update w₂ = w₁ − Q_Rᵀ c is applied where the plan's skip rule asks for it (‖c‖ >
  eps‖w₁‖, judged on the reduced sums, so every rank decides alike; elsewhere c counts
  as 0 and β² = ‖w₁‖², as in the kernels); then β² = ‖w₁‖² − ‖c‖², Pythagoras for the
  orthonormal rows (‖w₂‖² = ‖w₁‖² − 2⟨w₁, Q_Rᵀc⟩ + ‖c‖² with ⟨w₁, Q_Rᵀc⟩ = ‖c‖²), with
  no third all-reduce. It is accurate because c is at the level of the rounding of pass 1
  (‖c‖ ≈ eps·‖w_in‖ of the storage dtype), so β² loses only (eps·‖w_in‖/β)² relatively,
  far below the breakdown tolerance (β ≤ 1e-10‖w_in‖ in float64, 1.2e-4‖w_in‖ in
  float32: :func:`hesslab.solvers._krylov.breakdown_tol`); a negative difference (β at
  rounding level) counts as β = 0, a breakdown.

Checkpoints of a sharded run are one file per rank: ``path`` becomes
``<path>.rank<r>of<w>`` (:func:`rank_path`). The ranks open them together
(:func:`open_checkpoint`, one all-gather) and agree before anyone resumes: a file
missing on some ranks, files of another world size, different local sizes (part of the
operator signature) or files at different steps raise the same HesslabError on every
rank instead of leaving some ranks waiting in a collective.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from .. import _ops
from ..errors import HesslabError
from ..linops import LinearOperator
from ..linops._model import distributed_active
from ._checkpoint import Checkpoint

def _sq(w: Tensor) -> Tensor:
    """Local ‖w_i‖² per row, float64 (b, 1)."""
    return w.double().pow(2).sum(1, keepdim=True)


def gram_schmidt_(shards, Q: Tensor, w: Tensor, rows: int, extra: Tensor | None = None):
    """CGS2 of w (b, n_r) against ``Q[:, :rows]`` in place, with one all-reduce per pass.

    Up to three compiled sweeps (``_ops.gs_sweep_``, the sweeps of ``lanczos_step_``): the
    local sums of pass 1, reduced; the update with them fused with pass 2's sums, reduced;
    the second update, only for the runs where the plan's skip rule asks for it (‖c‖ >
    eps‖w₁‖, decided on the global sums, so on every rank alike) and with its norm from
    Pythagoras (module docstring). A skipped run keeps c = 0 and ‖w_out‖² = ‖w₁‖².

    Args:
        Q: (b, m, n_r) this rank's bases, contiguous; w (b, n_r) contiguous, mutated.
        extra: local partial sums (any shape, float64) reduced with pass 1's buffer.

    Returns:
        (d, c, in2, out2, extra): the coefficients of the two passes (b, rows) float64,
        ‖w_in‖² and ‖w_out‖² = ‖w₁‖² − ‖c‖² (b,) float64 (clamped at 0), and ``extra``
        reduced (or None), all global.
    """
    b = w.shape[0]
    ex = extra.reshape(-1).to(device=w.device, dtype=torch.float64) if extra is not None else None
    s1 = _ops.gs_sweep_(Q, w, None, rows)  # (b, rows + 1): Q_R w_in, ||w_in||^2
    buf1 = shards.reduce_(s1.reshape(-1) if ex is None else torch.cat([s1.reshape(-1), ex]))
    s1 = buf1[: b * (rows + 1)].reshape(b, rows + 1)
    d, in2 = s1[:, :rows].contiguous(), s1[:, rows]
    s2 = shards.reduce_(_ops.gs_sweep_(Q, w, d, rows))  # w1 = w_in - Q_R^T d; Q_R w1, ||w1||^2
    c, mid2 = s2[:, :rows], s2[:, rows]
    c2 = c.pow(2).sum(1)
    eps = torch.finfo(Q.dtype).eps
    again = ~(c2 <= eps * eps * mid2)  # the plan's skip rule, on global sums (NaN takes the update)
    c = torch.where(again[:, None], c, torch.zeros((), dtype=c.dtype, device=c.device)).contiguous()
    if bool(again.any()):  # w2 = w1 - Q_R^T c (its local norm is not needed: Pythagoras)
        _ops.gs_sweep_(Q, w, c, rows, dots=False)
    out2 = torch.where(again, (mid2 - c2).clamp(min=0.0), mid2)  # NaN stays NaN (clamp propagates it)
    extra_out = buf1[b * (rows + 1) :].reshape(extra.shape) if extra is not None else None
    return d, c, in2, out2, extra_out


def lanczos_step(shards, Q: Tensor, W: Tensor, beta_prev: Tensor, j: int, tol: float,
                 extra: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``_ops.lanczos_step_`` on local shards (Q (b, m, n_r), W (b, n_r)), two all-reduces.

    Same contract as the compiled step (alpha = d_j + c_j, beta = ‖w_out‖, breakdown =
    beta ≤ tol·(‖w_in‖ + |beta_prev|), Q[:, j+1] = w/beta or exactly 0), with β² from
    Pythagoras (module docstring). Returns alpha, beta (b,) float64, breakdown (b,) bool
    and ``extra`` reduced with pass 1.
    """
    d, c, in2, out2, extra = gram_schmidt_(shards, Q, W, j + 1, extra)
    alpha = d[:, j] + c[:, j]
    beta = out2.sqrt()
    scale = in2.sqrt() + (beta_prev.abs() if j > 0 else 0.0)
    broke = beta <= tol * scale
    if j + 1 < Q.shape[1]:
        zero = broke | ~(beta > 0)
        inv = torch.where(zero, torch.zeros_like(beta), 1.0 / torch.where(zero, torch.ones_like(beta), beta))
        row = torch.where(zero.unsqueeze(1), torch.zeros((), dtype=torch.float64, device=W.device),
                          W.double() * inv.unsqueeze(1))
        Q[:, j + 1] = row.to(Q.dtype)
    return alpha, beta, broke, extra


def fresh_orthogonal(shards, Q: Tensor, rows: int, generator: torch.Generator) -> Tensor | None:
    """A random unit vector (n_r,) orthogonal to the rows [0, rows) of Q (1, m, n_r), drawn
    from this rank's stream, or None when three tries left nothing (every rank agrees)."""
    for _ in range(3):
        w = torch.randn(Q.shape[2], generator=generator, dtype=torch.float64).to(Q)[None].clone()
        _, _, in2, out2, _ = gram_schmidt_(shards, Q, w, rows)
        if bool(out2[0] > 1e-16 * in2[0]):  # ‖w_out‖ > 1e-8 ‖v‖, as unsharded
            return (w[0].double() / out2[0].sqrt()).to(Q.dtype)
    return None


def row_norms(shards, X: Tensor) -> Tensor:
    """Global ‖x_i‖ (b,) float64 of the rows of X (b, n_r): one all-reduce."""
    return shards.reduce_(_sq(X)[:, 0]).sqrt()


def column_sums(shards, X: Tensor) -> Tensor:
    """Global column sums (k,) float64 of a local (n_r, k) X: one all-reduce."""
    return shards.reduce_(X.sum(0, dtype=torch.float64))


def cholesky_qr2(shards, Y: Tensor) -> Tensor:
    """An orthonormal basis (n_r, k') float64 of the range of the sharded Y (n_r, k).

    SVQB then CholeskyQR (Stathopoulos & Wu 2002): the all-reduced Gram matrix YᵀY gives
    Y V Λ^{-1/2}, orthonormal to O(eps·κ), with the directions whose eigenvalue is below
    k·eps·λ_max dropped (a rank-deficient sketch: k' < k); a second pass (Cholesky of the
    now well-conditioned Gram matrix) restores orthonormality to O(eps). Two all-reduces.
    """
    Y = Y.double()
    lam, V = torch.linalg.eigh(shards.reduce_(Y.T @ Y))
    keep = lam > Y.shape[1] * torch.finfo(torch.float64).eps * lam.max().clamp(min=0)
    Q = Y @ (V[:, keep] / lam[keep].sqrt())
    R = torch.linalg.cholesky(shards.reduce_(Q.T @ Q), upper=True)
    return torch.linalg.solve_triangular(R, Q, upper=True, left=False)


def require_all(shards, ok: bool, message: str) -> None:
    """Raise HesslabError(message) on every rank when ``ok`` is False on any (one all-reduce)."""
    bad = shards.gather_rows(torch.tensor([0.0 if ok else 1.0]))[:, 0].nonzero().flatten().tolist()
    if bad:
        raise HesslabError(f"{message} (on rank(s) {bad} of {shards.world})")


def rank_path(path: str | os.PathLike, shards) -> Path:
    """This rank's checkpoint file: ``<path>.rank<r>of<w>``."""
    p = Path(path)
    return p.with_name(f"{p.name}.rank{shards.rank}of{shards.world}")


def _other_worlds(path: str | os.PathLike, world: int) -> list[int]:
    """World sizes of the rank files of ``path`` written by runs on another number of ranks."""
    p = Path(path)
    pattern = re.compile(rf"{re.escape(p.name)}\.rank\d+of(\d+)")
    found = {int(m.group(1)) for q in (p.parent.iterdir() if p.parent.is_dir() else ())
             if (m := pattern.fullmatch(q.name))}
    return sorted(found - {world})


def open_checkpoint(path: str | os.PathLike, fingerprint: str, signature: str,
                    shards) -> tuple[Checkpoint, dict | None]:
    """Every rank's checkpoint and payload, agreed on by all ranks (one all-gather).

    Raises the same HesslabError on every rank when any rank's file is refused, when some
    ranks have a file and others none, when the folder holds files of a run on another
    number of ranks, or when the files stopped at different steps.
    """
    ckpt, payload, status = None, None, ("none", -1, False, "")
    try:
        ckpt = Checkpoint(rank_path(path, shards), fingerprint, signature)
        payload = ckpt.read()
        worlds = _other_worlds(path, shards.world) if payload is None else []
        if worlds:
            raise HesslabError(
                f"checkpoint: {str(path)!r} has files of a run on {worlds} rank(s) ({Path(path).name}.rank<r>of<w>) "
                f"and this run has {shards.world}: a sharded run resumes only with the same number of ranks and "
                "local sizes; rerun with those, or delete the files or pass another checkpoint path")
        if payload is not None:
            status = ("ok", int(payload["j"]), bool(payload["finished"]), "")
    except HesslabError as err:
        status = ("error", -1, False, str(err))
    everyone: list = [status] * shards.world
    if distributed_active():
        torch.distributed.all_gather_object(everyone, status)
    errors = [(r, s[3]) for r, s in enumerate(everyone) if s[0] == "error"]
    if errors:
        r, message = errors[0]
        raise HesslabError(f"{message} [rank {r} of {shards.world}; every rank raises this]")
    have = [r for r, s in enumerate(everyone) if s[0] == "ok"]
    if have and len(have) < shards.world:
        missing = [r for r in range(shards.world) if r not in have]
        raise HesslabError(
            f"checkpoint: ranks {have} of {shards.world} found their files {str(path)!r}.rank<r>of{shards.world} but "
            f"ranks {missing} did not: the files of a sharded run resume together; restore the missing ones, or "
            "delete the files or pass another checkpoint path")
    if len({s[1:3] for s in everyone}) > 1:
        raise HesslabError(
            f"checkpoint: the rank files of {str(path)!r} stopped at different steps "
            f"({[s[1] for s in everyone]}): they are not from one run; delete the files or pass another "
            "checkpoint path")
    return ckpt, payload


def gather_shards(op: LinearOperator, vectors: Tensor, dst: int = 0) -> Tensor | None:
    """The global (n, k) vectors on rank ``dst`` from every rank's local (n_r, k) shards.

    For the eigenvectors of :func:`hesslab.lanczos` on a sharded operator (small models:
    rank ``dst`` then holds n × k entries). Every rank must call it; ranks other than
    ``dst`` get None. For an operator that is not sharded ``vectors`` is returned as is.
    """
    if op.shards is None:
        return vectors
    return op.shards.gather(vectors, dst)
