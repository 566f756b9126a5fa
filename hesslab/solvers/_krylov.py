"""The batched Lanczos driver shared by the eigensolver and SLQ.

b Lanczos runs (one per start vector) advance together: each step applies the operator
to the b current basis vectors in one ``matmat`` (one pass over the data serves all
runs), then one compiled ``lanczos_step_`` does all the vector work (three-term
recurrence, CGS2 full reorthogonalization, normalisation) for the b runs without a host
sync. The driver adds what long runs need:

* two reorthogonalization modes: ``"full"`` keeps the whole (b, m, n) basis and
  orthogonalizes every new vector against all of it (CGS2); ``"local"`` keeps only a
  rolling window of three rows per run and orthogonalizes against the previous two (the
  three-term recurrence, done twice): b·3·n memory instead of b·m·n, two rows of work per
  step instead of m. Local runs lose global orthogonality once Ritz values converge
  (duplicate "ghost" Ritz values appear), which leaves Gauss quadrature accurate (Paige
  1976; Golub & Meurant, *Matrices, Moments and Quadrature*, 2010, ch. 4): fine for SLQ,
  not for an eigensolver that needs the basis;

* a memory estimate of the Krylov basis before allocating it, refusing with the options
  when it will not fit;
* breakdown handling: a run whose Krylov space is exhausted either stops (SLQ: its
  quadrature is then exact) or restarts with a fresh random vector orthogonal to its
  basis (the eigensolver; T gets a zero off-diagonal there); the eigensolver may also end
  a chain early (a forced restart, see :class:`KrylovState`) to look for copies of an
  eigenvalue that a single Krylov space cannot hold;
* a progress bar (tqdm; on by default only when stderr is a terminal) counting to the
  step budget and ending at the steps actually taken (:func:`close_bar`);
* checkpoints (:mod:`._checkpoint`): with ``checkpoint=path`` the state is written
  atomically every ``checkpoint_every`` steps, when the run is interrupted
  (KeyboardInterrupt or an error in a product) and when it finishes; a later call with
  the same arguments and the same operator resumes from it and gives the identical
  result, and one for another operator or other arguments is refused.

Host syncs (issue 17): a step reads back from the device once, b + 1 booleans in one
transfer (is any active alpha/beta non-finite; which runs broke down), because a
breakdown must be handled (restart or stop) before the next product; the mask of active
runs and their indices live on the host, with a device copy renewed only when a run
stops. The ``stop`` callback (the eigensolver's convergence test) reads the tridiagonal
entries every ``check_every`` steps; the first step reads ⟨q₀, A q₀⟩ for checkpoints; a
breakdown restart reads the norm of its fresh vector. Reading the flags only every few
steps would need speculative steps rolled back at a breakdown (their products wasted and
counted), which the bitwise-resume and product-count guarantees rule out here.

Sharded operators (``op.shards``, issue 14): Q holds this rank's (b, m, n_r) shards of
the bases, n is the global size ``shards.global_size``, and every inner product the
driver takes (start norms, the step's Gram–Schmidt passes, restart vectors, the
checkpoint's ⟨q₀, A q₀⟩) goes through :mod:`._sharded`: two all-reduces per step, and
one file per rank for checkpoints. With ``shards = None`` nothing of it runs.

Notation: Q (b, m, n) the bases, alphas/betas (b, m) float64 the tridiagonal entries:
T_i = tridiag(betas[i, :m-1], alphas[i, :m], betas[i, :m-1]).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .. import _ops
from ..errors import HesslabError, require
from ..linops import LinearOperator
from ._checks import is_int
from . import _sharded
from ._checkpoint import Checkpoint, action_summary, fingerprint, operator_signature


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory on ``device`` (CUDA: free device memory; CPU: MemAvailable), or None."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - unknown is fine for an estimate
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_basis_memory(b: int, m: int, n: int, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes of a (b, m, n) basis; raises HesslabError with the options when it will not fit."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = b * m * n * itemsize
    avail = available_bytes(device)
    if avail is not None and need > 0.8 * avail:
        raise HesslabError(
            f"the Krylov basis needs {need / 2**30:.2f} GiB ({b} runs x {m} vectors x {n} parameters x "
            f"{itemsize} bytes) but only {avail / 2**30:.2f} GiB is available on {device}. Options: fewer steps "
            "(num_steps), fewer probes, basis_dtype=torch.float32 (inner products still accumulate in float64), "
            "basis_device='cpu' to keep the basis in host memory, or for spectral_density "
            "reorthogonalize='local' (3 vectors per probe instead of num_steps)."
        )
    return need


def breakdown_tol(basis_dtype: torch.dtype) -> float:
    """Relative β below which a Krylov space counts as exhausted: 1e-10 for float64 bases,
    1000·eps (1.2e-4) for float32, where rounding noise would otherwise pass for a direction."""
    return max(1e-10, 1000 * torch.finfo(basis_dtype).eps)


def progress_enabled(progress: bool | None) -> bool:
    """``None`` means: show bars only when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def close_bar(bar) -> None:
    """Close a progress bar at the work actually done: its total is the budget (steps or
    products) while it runs, and a run that ends before the budget (converged, broke
    down, interrupted) sets the total to the count reached, so the bar ends full at the
    real count rather than partway to the budget."""
    if not bar.disable and bar.n != bar.total:
        bar.total = bar.n
        bar.refresh()
    bar.close()


@dataclass
class KrylovState:
    """Everything needed to continue a batched Lanczos run (and to checkpoint it).

    Restarts split run 0's steps into *chains* (``cuts`` holds the step where each chain
    after the first begins). A chain ends either at a breakdown (an invariant subspace:
    its β is zero) or by a forced restart asked for by the ``stop`` callback (``forced``).
    A forced restart keeps the chain's next Lanczos vector d in ``D`` (it is no basis
    vector) and replaces it by a fresh random vector orthogonal to the basis; each later
    chain is then a Lanczos run on A compressed to the complement of all earlier rows, and
    the projected matrix QᵀAQ is block tridiagonal plus, for each forced chain f ending at
    row e_f, the coupling β_{e_f} ⟨q_i, d_f⟩ between rows e_f and i ≥ e_f + 1, with
    ``C[f, i] = ⟨q_i, d_f⟩`` recorded as the rows are multiplied.
    """

    Q: Tensor  # (b, capacity, n) basis, rows [0, row(j)] valid ("local": a window of 3)
    alphas: Tensor  # (b, capacity) float64, entries [0, j) valid (indexed by step)
    betas: Tensor  # (b, capacity) float64, entries [0, j) valid
    steps: Tensor  # (b,) int64: rows of T in use per run (< j where a run stopped at a breakdown)
    j: int = 0  # steps completed
    restarts: int = 0
    generator_state: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    local: bool = False  # Q is the rolling window of "local" reorthogonalization
    cuts: list[int] = field(default_factory=list)  # run 0: steps where a restarted chain begins
    forced: list[int] = field(default_factory=list)  # run 0: the cuts that were forced restarts
    D: Tensor | None = None  # (len(forced), n) basis dtype: the next vectors of the chains ended by force
    C: Tensor | None = None  # (len(forced), capacity) float64: C[f, i] = ⟨q_i, d_f⟩ of run 0
    identity: tuple[float, float] | None = None  # (⟨q0, A q0⟩, ‖A q0‖) of run 0, for checkpoints
    finished: bool = False
    extra: dict = field(default_factory=dict)  # what the caller's on_finish measured (kept in the checkpoint)
    shards: object = None  # the operator's Shards when Q holds local shards (then n_r = Q.shape[2])

    @property
    def size(self) -> int:
        """n, the global length of a basis vector (Q.shape[2] unless sharded)."""
        return self.Q.shape[2] if self.shards is None else self.shards.global_size

    def row(self, j: int) -> int:
        """Row of Q that holds basis vector j (the last vector of a local window)."""
        return min(j, 1) if self.local else j

    def tridiagonal(self, i: int) -> tuple[Tensor, Tensor]:
        """Diagonal (m_i,) and off-diagonal (m_i - 1,) of run i's T, float64 on the CPU
        (zero between chains)."""
        m = int(self.steps[i])
        e = self.betas[i, : max(m - 1, 0)].cpu().clone()
        if i == 0:
            for c in self.cuts:
                if 0 < c <= e.shape[0]:
                    e[c - 1] = 0.0
        return self.alphas[i, :m].cpu(), e

    def chains(self) -> list[tuple[int, int]]:
        """Run 0's chains as step ranges [start, end)."""
        m = int(self.steps[0])
        bounds = [0] + [c for c in self.cuts if c < m] + [m]
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _grow(state: KrylovState, rows: int | None = None, coeffs: int | None = None) -> None:
    """Enlarge Q to ``rows`` rows and the coefficient arrays to ``coeffs`` entries."""
    b, cap, n = state.Q.shape
    if rows is not None and rows > cap:
        Q = torch.empty(b, rows, n, dtype=state.Q.dtype, device=state.Q.device)  # rows > row(j) + 1 are never read
        Q[:, :cap] = state.Q
        state.Q = Q
    old_c = state.alphas.shape[1]
    if coeffs is not None and coeffs > old_c:
        for name in ("alphas", "betas"):
            old = getattr(state, name)
            new = torch.zeros(b, coeffs, dtype=torch.float64, device=old.device)
            new[:, :old_c] = old
            setattr(state, name, new)
        C = torch.zeros(state.C.shape[0], coeffs, dtype=torch.float64, device=state.C.device)
        C[:, :old_c] = state.C
        state.C = C


def _fresh_orthogonal(state: KrylovState, i: int, generator: torch.Generator, rows: int) -> bool:
    """Write a random unit vector orthogonal to run i's rows [0, rows) into row ``rows``."""
    n = state.Q.shape[2]
    if rows >= min(state.size, state.Q.shape[1]):
        return False  # no room: the rows already span the whole space, or the capacity is spent
    if state.shards is not None:
        q = _sharded.fresh_orthogonal(state.shards, state.Q[i : i + 1], rows, generator)
        if q is not None:
            state.Q[i, rows] = q
        return q is not None
    for _ in range(3):
        v = torch.randn(n, generator=generator, dtype=torch.float64).to(state.Q)
        w = v[None].clone()  # contiguous, and no view of Q (reorthogonalize_ mutates w only)
        _ops.reorthogonalize_(state.Q[i : i + 1], w, rows)
        norm = w.double().norm()
        if norm > 1e-8 * v.double().norm():
            state.Q[i, rows] = (w[0].double() / norm).to(state.Q.dtype)
            return True
    return False  # the basis already spans the whole space


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold Ctrl-C (SIGINT) until the block ends, so that a KeyboardInterrupt, and with it
    the checkpoint written on the way out, falls between steps and never inside one. The
    Python-level handler is swapped for one that only records the signal (masking the
    signal would not do: the OS hands it to one of torch's other threads); a no-op off the
    main thread, where Python handles no signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if received:
            if callable(old):
                old(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt here
            elif old == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def _payload(state: KrylovState) -> dict:
    j = state.j
    return {
        "Q": state.Q[:, : state.row(j) + 1].cpu(),
        "alphas": state.alphas[:, :j].cpu(),
        "betas": state.betas[:, :j].cpu(),
        "steps": state.steps.clamp(max=j).cpu(),  # an interrupted step is redone on resume
        "j": j,
        "restarts": state.restarts,
        "generator_state": state.generator_state,
        "cuts": list(state.cuts),
        "forced": list(state.forced),
        "D": state.D.cpu(),
        "C": state.C[:, :j].cpu(),
        "identity": state.identity,
        "finished": state.finished,
        "extra": dict(state.extra),
    }


def _state_from(payload: dict, rows_cap: int, coeff_cap: int, device: torch.device, local: bool,
                shards) -> KrylovState:
    j = payload["j"]
    b, rows, n = payload["Q"].shape
    Q = torch.zeros(b, max(rows_cap, rows), n, dtype=payload["Q"].dtype, device=device)
    Q[:, :rows] = payload["Q"].to(device)
    cap = max(coeff_cap, j + 1)
    alphas = torch.zeros(b, cap, dtype=torch.float64, device=device)
    betas = torch.zeros(b, cap, dtype=torch.float64, device=device)
    C = torch.zeros(payload["C"].shape[0], cap, dtype=torch.float64, device=device)
    alphas[:, :j], betas[:, :j] = payload["alphas"].to(device), payload["betas"].to(device)
    C[:, :j] = payload["C"].to(device)
    identity = payload["identity"]
    return KrylovState(Q, alphas, betas, payload["steps"].to(device), j, payload["restarts"],
                       payload["generator_state"], local, list(payload["cuts"]), list(payload["forced"]),
                       payload["D"].to(device), C,
                       None if identity is None else (float(identity[0]), float(identity[1])),
                       bool(payload["finished"]), dict(payload.get("extra", {})), shards)


def _unit_starts(starts: Tensor, basis_dtype: torch.dtype, basis_device: torch.device, shards) -> Tensor:
    """(b, n) start vectors normalised in float64, in the basis dtype (the rows q_0)."""
    v0 = starts.to(device=basis_device, dtype=torch.float64)
    norms = v0.norm(dim=1, keepdim=True) if shards is None else _sharded.row_norms(shards, v0)[:, None]
    require(bool((norms > 0).all()), "start vectors must be nonzero")
    return (v0 / norms).to(basis_dtype)


def _fresh_state(q0: Tensor, rows_cap: int, coeff_cap: int, generator: torch.Generator, local: bool,
                 shards) -> KrylovState:
    b, n = q0.shape
    Q = torch.empty(b, rows_cap, n, dtype=q0.dtype, device=q0.device)  # rows > row(j) + 1 are never read
    Q[:, 0] = q0
    zeros = lambda *shape, dtype=torch.float64: torch.zeros(*shape, dtype=dtype, device=q0.device)  # noqa: E731
    return KrylovState(Q, zeros(b, coeff_cap), zeros(b, coeff_cap), zeros(b, dtype=torch.long),
                       generator_state=generator.get_state(), local=local, D=q0.new_zeros(0, n),
                       C=zeros(0, coeff_cap), shards=shards)


def _resume_or_start(op: LinearOperator, q0: Tensor, ckpt: Checkpoint | None, payload: dict | None, rows_cap: int,
                     coeff_cap: int, generator: torch.Generator, local: bool) -> KrylovState:
    """The state to continue: the checkpoint's ``payload`` (its operator checked with one
    product) or a fresh one."""
    if payload is None:
        return _fresh_state(q0, rows_cap, coeff_cap, generator, local, op.shards)
    state = _state_from(payload, rows_cap, coeff_cap, q0.device, local, op.shards)
    if state.j > 0:
        Aq = op.matmat(q0[:1].T.to(device=op.device, dtype=op.dtype))[:, 0]
        ckpt.check_identity(state.identity, action_summary(q0[0], Aq, op.shards), op.dtype)
    generator.set_state(state.generator_state)
    return state


class _Runs:
    """The mask of runs still going, on the host (read freely) and on the basis device with
    the indices of the active runs (copied there only when a run stops), so that a step
    reads nothing back from the device for it."""

    def __init__(self, active: Tensor, device: torch.device):
        self.host = active.cpu()
        self.device = device
        self.renew()

    def renew(self) -> None:
        self.all = bool(self.host.all())
        self.dev = self.host.to(self.device)
        self.idx = self.host.nonzero().flatten().to(self.device)


def _product(op: LinearOperator, state: KrylovState, W: Tensor, runs: _Runs) -> None:
    """W ← A q_j for the active runs (zeros elsewhere), in the basis dtype; ``W`` is the
    driver's own contiguous buffer, never a view of Q or of the operator's output."""
    r = state.row(state.j)
    all_active, idx = runs.all, runs.idx
    V = state.Q[:, r] if all_active else state.Q[idx, r]
    AV = op.matmat(V.T.to(device=op.device, dtype=op.dtype))  # (n, |active|)
    if state.j == 0 and state.identity is None:  # all runs are active at step 0
        state.identity = action_summary(state.Q[0, 0], AV[:, 0], state.shards)
    if all_active:
        W.copy_(AV.T)
    else:
        W.zero_()
        W[idx] = AV.T.to(device=W.device, dtype=W.dtype)
    if state.forced:  # run 0's overlaps ⟨q_j, d_f⟩ with the next vectors of chains ended by force
        state.C[:, state.j] = state.D.double() @ state.Q[0, r].double()  # sharded: partial sums, reduced by _step


def _step(state: KrylovState, W: Tensor, runs: _Runs, tol: float) -> Tensor:
    """One compiled Lanczos step on W; records alpha and beta of the active runs; returns
    (on the host) the runs that broke down. The step's one device-to-host transfer: the
    finiteness check and the breakdown flags, b + 1 booleans read together."""
    j = state.j
    beta_prev = state.betas[:, j - 1].clone() if j > 0 else torch.zeros_like(state.betas[:, 0])
    if j in state.cuts:
        beta_prev[0] = 0.0  # a chain's first step: no previous vector
    if state.shards is None:
        alpha, beta, broke = _ops.lanczos_step_(state.Q, W, beta_prev, state.row(j), tol)
    else:  # the overlaps ⟨q_j, d_f⟩ ride in the step's first all-reduce
        overlaps = state.C[:, j].clone() if state.forced else None
        alpha, beta, broke, overlaps = _sharded.lanczos_step(state.shards, state.Q, W, beta_prev, state.row(j), tol,
                                                             overlaps)
        if overlaps is not None:
            state.C[:, j] = overlaps
    # A NaN/Inf entry of A q_j makes alpha or beta non-finite.
    bad = ((~torch.isfinite(alpha) | ~torch.isfinite(beta)) & runs.dev).any()
    flags = torch.cat([bad[None], broke.to(torch.bool)]).cpu()
    if bool(flags[0]):
        raise HesslabError(f"the operator returned NaN or Inf at step {j}: check the model, loss and data")
    state.alphas[:, j] = torch.where(runs.dev, alpha, state.alphas[:, j])
    state.betas[:, j] = torch.where(runs.dev, beta, state.betas[:, j])
    state.steps += runs.dev.long()
    return flags[1:] & runs.host


def _after_breakdown(state: KrylovState, broke: Tensor, active: Tensor, on_breakdown: str,
                     generator: torch.Generator, max_steps: int) -> None:
    """Restart (or stop) the runs whose Krylov space was exhausted at this step
    (``broke`` and ``active`` are host masks; ``active`` is updated in place)."""
    j = state.j
    if not bool(broke.any()) or j + 1 >= max_steps:
        return
    r = state.row(j)
    for i in broke.nonzero().flatten().tolist():
        if on_breakdown == "restart" and _fresh_orthogonal(state, i, generator, r + 1):
            state.betas[i, j] = 0.0
            state.restarts += 1
            if i == 0:
                state.cuts.append(j + 1)
        else:
            active[i] = False


def _commit(state: KrylovState, generator: torch.Generator) -> None:
    """Close a step: generator state, window slide, step count, all with Ctrl-C held."""
    with _interrupts_deferred():  # a checkpoint must never see half of this commit
        state.generator_state = generator.get_state()  # as of the last completed step
        if state.local and state.row(state.j) == 1:  # slide the window: q_j, q_{j+1} become rows 0, 1
            state.Q[:, 0].copy_(state.Q[:, 1])
            state.Q[:, 1].copy_(state.Q[:, 2])
        state.j += 1


def force_restart(state: KrylovState, generator: torch.Generator) -> bool:
    """End run 0's current chain: its next Lanczos vector d moves to ``D`` and a fresh
    random vector orthogonal to the basis starts a new chain in its row. False (nothing
    changed) when there is no room."""
    r = state.row(state.j)
    if state.local or state.Q.shape[0] != 1 or r >= state.Q.shape[1]:
        return False
    d = state.Q[0, r].clone()
    with _interrupts_deferred():
        if not _fresh_orthogonal(state, 0, generator, r):
            return False
        state.forced.append(state.j)
        state.cuts.append(state.j)
        state.D = torch.cat([state.D, d[None]])
        state.C = torch.cat([state.C, state.C.new_zeros(1, state.C.shape[1])])
        state.restarts += 1
        state.generator_state = generator.get_state()
    return True


def _check_options(on_breakdown: str, reorthogonalize: str, checkpoint_every: int, check_every: int) -> None:
    require(on_breakdown in ("stop", "restart"), f"on_breakdown must be 'stop' or 'restart', got {on_breakdown!r}")
    require(reorthogonalize in ("full", "local"),
            f"reorthogonalize must be 'full' or 'local', got {reorthogonalize!r}")
    require(not (reorthogonalize == "local" and on_breakdown == "restart"),
            "on_breakdown='restart' needs reorthogonalize='full'")
    require(is_int(checkpoint_every) and checkpoint_every >= 1,
            f"checkpoint_every must be an integer >= 1 (steps between checkpoint writes), got {checkpoint_every!r}")
    require(is_int(check_every) and check_every >= 1,
            f"check_every must be an integer >= 1 (steps between convergence checks), got {check_every!r}")


def run_krylov(
    op: LinearOperator,
    starts: Tensor,
    max_steps: int,
    *,
    basis_dtype: torch.dtype,
    basis_device: torch.device,
    on_breakdown: str,
    generator: torch.Generator,
    breakdown_tol: float,
    stop: Callable[[KrylovState], bool | str] | None = None,
    check_every: int = 1,
    initial_capacity: int | None = None,
    progress: bool | None = None,
    desc: str = "lanczos",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    config: dict | None = None,
    reorthogonalize: str = "full",
    on_finish: Callable[[KrylovState], dict] | None = None,
) -> KrylovState:
    """Advance b Lanczos runs from ``starts`` (b, n) for up to ``max_steps`` steps.

    Args:
        op: the operator; products are taken in its dtype on its device.
        starts: (b, n) start vectors (normalised here); for a sharded operator this
            rank's (b, n_r) shards.
        max_steps: the most rows of T per run (≤ n).
        on_breakdown: "stop" (freeze that run: its T is complete) or "restart" (continue
            with a fresh orthogonal vector and a zero off-diagonal; "full" only).
        stop: called every ``check_every`` steps, before the step: True (or "stop") ends
            the run, "restart" ends run 0's chain and starts another (:func:`force_restart`).
        initial_capacity: rows allocated up front (grown by doubling up to max_steps).
        checkpoint, checkpoint_every, config: see the module docstring; ``config`` holds
            the caller's arguments that determine the result (for the fingerprint).
        reorthogonalize: "full" or "local" (see the module docstring).
        on_finish: with a checkpoint, called once when the run finishes, before the last
            write; the tensors and scalars it returns are kept in ``state.extra`` and in the
            file, so that resuming a finished run finds them there (the eigensolver keeps
            its residual norms, which then cost no products on resume).
    """
    b, n = starts.shape  # n: the local n_r of a sharded operator
    shards = op.shards
    _check_options(on_breakdown, reorthogonalize, checkpoint_every, check_every)
    local = reorthogonalize == "local"
    coeff_cap = max_steps if local else min(max_steps, initial_capacity or max_steps)
    rows_cap = 3 if local else coeff_cap
    check_basis_memory(b, rows_cap, n, basis_dtype, basis_device)
    ckpt = payload = None
    if checkpoint is not None:
        # sharded: the global n here; the local sizes are part of the operator signature
        fp = fingerprint({**(config or {}), "n": n if shards is None else shards.global_size, "b": b,
                          "max_steps": max_steps, "basis_dtype": str(basis_dtype), "op_dtype": str(op.dtype),
                          **({"reorthogonalize": reorthogonalize} if local else {})})
        if shards is None:
            ckpt = Checkpoint(checkpoint, fp, operator_signature(op))
        else:
            ckpt, payload = _sharded.open_checkpoint(checkpoint, fp, operator_signature(op), shards)
    q0 = _unit_starts(starts, basis_dtype, basis_device, shards)
    if ckpt is not None and shards is None:
        payload = ckpt.read()
    state = _resume_or_start(op, q0, ckpt, payload, rows_cap, coeff_cap, generator, local)
    if not state.finished:
        _iterate(op, state, ckpt, max_steps, on_breakdown=on_breakdown, generator=generator, tol=breakdown_tol,
                 stop=stop, check_every=check_every, progress=progress, desc=desc, checkpoint_every=checkpoint_every)
        state.finished = True
        if ckpt is not None:
            try:
                if on_finish is not None:
                    state.extra = dict(on_finish(state))
            finally:  # interrupted in on_finish: the steps are kept, the extras measured on resume
                ckpt.write(_payload(state))
    return state


def _iterate(op: LinearOperator, state: KrylovState, ckpt: Checkpoint | None, max_steps: int, *, on_breakdown: str,
             generator: torch.Generator, tol: float, stop, check_every: int, progress: bool | None, desc: str,
             checkpoint_every: int) -> None:
    """The step loop of :func:`run_krylov`, checkpointing as it goes and when interrupted."""
    from tqdm.auto import tqdm

    b, _, n_local = state.Q.shape
    n = state.size
    bar = tqdm(total=max_steps, initial=state.j, desc=desc, unit="step", disable=not progress_enabled(progress),
               leave=False)
    runs = _Runs(state.steps == state.j, state.Q.device)  # runs that have not stopped
    W = torch.empty(b, n_local, dtype=state.Q.dtype, device=state.Q.device)  # A q_j, then the residual
    try:
        while state.j < max_steps and bool(runs.host.any()):
            # The stop check runs at the top of a step so that a resumed run sees the same
            # checks as an uninterrupted one.
            if stop is not None and state.j > 0 and state.j % check_every == 0:
                decision = stop(state)
                if decision is True or decision == "stop":
                    break
                if decision == "restart":
                    force_restart(state, generator)
            r = state.row(state.j)
            row_limit = min(n, max_steps + 1)  # the next vector of the last step included
            if not state.local and r + 1 >= state.Q.shape[1] and state.Q.shape[1] < row_limit:
                _grow(state, rows=min(row_limit, max(2 * state.Q.shape[1], r + 2)))
            if state.j + 1 >= state.alphas.shape[1]:
                _grow(state, coeffs=min(max_steps, 2 * state.alphas.shape[1]))
            _product(op, state, W, runs)
            broke = _step(state, W, runs, tol)
            if bool(broke.any()):
                _after_breakdown(state, broke, runs.host, on_breakdown, generator, max_steps)
                runs.renew()
            _commit(state, generator)
            bar.update(1)
            if ckpt is not None and state.j % checkpoint_every == 0:
                ckpt.write(_payload(state))
    except BaseException:
        if ckpt is not None:  # keep every completed step
            ckpt.write(_payload(state))
        raise
    finally:
        close_bar(bar)
