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
  basis (the eigensolver; T gets a zero off-diagonal there);
* a progress bar (tqdm; on by default only when stderr is a terminal);
* checkpoints: with ``checkpoint=path`` the state is written every ``checkpoint_every``
  steps and when the run is interrupted (KeyboardInterrupt or an error in a product);
  a later call with the same arguments resumes from it and gives the identical result.

Notation: Q (b, m, n) the bases, alphas/betas (b, m) float64 the tridiagonal entries:
T_i = tridiag(betas[i, :m-1], alphas[i, :m], betas[i, :m-1]).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .. import _ops
from ..errors import HesslabError, require
from ..linops import LinearOperator


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_basis_memory(b: int, m: int, n: int, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes of a (b, m, n) basis; raises HesslabError with the options when it will not fit."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = b * m * n * itemsize
    avail = _available_bytes(device)
    if need > 0.8 * avail:
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


@dataclass
class KrylovState:
    """Everything needed to continue a batched Lanczos run (and to checkpoint it)."""

    Q: Tensor  # (b, capacity, n) basis, rows [0, j] valid ("local": rows [0, row(j)], a window)
    alphas: Tensor  # (b, capacity) float64, entries [0, j) valid
    betas: Tensor  # (b, capacity) float64, entries [0, j) valid
    steps: Tensor  # (b,) int64: rows of T in use per run (< j where a run stopped at a breakdown)
    j: int = 0  # steps completed
    restarts: int = 0
    generator_state: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))

    local: bool = False  # Q is the rolling window of "local" reorthogonalization

    def row(self, j: int) -> int:
        """Row of Q that holds basis vector j (the last vector of a local window)."""
        return min(j, 1) if self.local else j

    def tridiagonal(self, i: int) -> tuple[Tensor, Tensor]:
        """Diagonal (m_i,) and off-diagonal (m_i - 1,) of run i's T, float64 on the CPU."""
        m = int(self.steps[i])
        return self.alphas[i, :m].cpu(), self.betas[i, : max(m - 1, 0)].cpu()


def _fingerprint(config: dict) -> str:
    return hashlib.sha256(repr(sorted(config.items())).encode()).hexdigest()[:16]


def _save(path: Path, state: KrylovState, fingerprint: str) -> None:
    j = state.j
    payload = {
        "fingerprint": fingerprint,
        "Q": state.Q[:, : state.row(j) + 1].cpu(),
        "alphas": state.alphas[:, :j].cpu(),
        "betas": state.betas[:, :j].cpu(),
        "steps": state.steps.clamp(max=j).cpu(),  # an interrupted step is redone on resume
        "j": j,
        "restarts": state.restarts,
        "generator_state": state.generator_state,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: an interruption while writing keeps the previous checkpoint


def _load(path: Path, fingerprint: str, rows_cap: int, coeff_cap: int, device: torch.device,
          local: bool) -> KrylovState | None:
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload["fingerprint"] != fingerprint:
        raise HesslabError(
            f"checkpoint: {path} was written by a run with different arguments (operator size, steps, probes, "
            "seed, dtype or reorthogonalization); delete it or pass another checkpoint path"
        )
    j = payload["j"]
    b, rows, n = payload["Q"].shape  # rows = row(j) + 1, or j when the run filled its capacity
    Q = torch.zeros(b, max(rows_cap, rows), n, dtype=payload["Q"].dtype, device=device)
    Q[:, :rows] = payload["Q"].to(device)
    cap = max(coeff_cap, rows)  # full: rows = j + 1; local: coeff_cap = max_steps
    alphas = torch.zeros(b, cap, dtype=torch.float64, device=device)
    betas = torch.zeros(b, cap, dtype=torch.float64, device=device)
    alphas[:, :j] = payload["alphas"].to(device)
    betas[:, :j] = payload["betas"].to(device)
    return KrylovState(Q, alphas, betas, payload["steps"].to(device), j, payload["restarts"], payload["generator_state"],
                       local)


def _grow(state: KrylovState, capacity: int) -> None:
    b, cap, n = state.Q.shape
    if capacity <= cap:
        return
    Q = torch.empty(b, capacity, n, dtype=state.Q.dtype, device=state.Q.device)  # rows > j + 1 are never read
    Q[:, :cap] = state.Q
    state.Q = Q
    for name in ("alphas", "betas"):
        old = getattr(state, name)
        new = torch.zeros(b, capacity, dtype=torch.float64, device=old.device)
        new[:, :cap] = old
        setattr(state, name, new)


def _fresh_orthogonal(state: KrylovState, i: int, generator: torch.Generator) -> bool:
    """Write a random unit vector orthogonal to run i's rows [0, j] into row j + 1."""
    j = state.j
    n = state.Q.shape[2]
    for _ in range(3):
        v = torch.randn(n, generator=generator, dtype=torch.float64).to(state.Q)
        w = v[None].clone()
        _ops.reorthogonalize_(state.Q[i : i + 1], w, j + 1)
        norm = w.double().norm()
        if norm > 1e-8 * v.double().norm():
            state.Q[i, j + 1] = (w[0].double() / norm).to(state.Q.dtype)
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
    stop: Callable[[KrylovState], bool] | None = None,
    check_every: int = 1,
    initial_capacity: int | None = None,
    progress: bool | None = None,
    desc: str = "lanczos",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    config: dict | None = None,
    reorthogonalize: str = "full",
) -> KrylovState:
    """Advance b Lanczos runs from ``starts`` (b, n) for up to ``max_steps`` steps.

    Args:
        op: the operator; products are taken in its dtype on its device.
        starts: (b, n) start vectors (normalised here).
        max_steps: the most rows of T per run (≤ n).
        on_breakdown: "stop" (freeze that run: its T is complete) or "restart" (continue
            with a fresh orthogonal vector and a zero off-diagonal; "full" only).
        stop: called every ``check_every`` steps; True ends the run early.
        initial_capacity: rows allocated up front (grown by doubling up to max_steps).
        checkpoint, checkpoint_every, config: see the module docstring; ``config`` holds
            the caller's arguments that determine the result (for the fingerprint).
        reorthogonalize: "full" or "local" (see the module docstring).
    """
    b, n = starts.shape
    require(on_breakdown in ("stop", "restart"), f"on_breakdown must be 'stop' or 'restart', got {on_breakdown!r}")
    require(reorthogonalize in ("full", "local"),
            f"reorthogonalize must be 'full' or 'local', got {reorthogonalize!r}")
    local = reorthogonalize == "local"
    require(not (local and on_breakdown == "restart"), "on_breakdown='restart' needs reorthogonalize='full'")
    coeff_cap = max_steps if local else min(max_steps, initial_capacity or max_steps)
    rows_cap = 3 if local else coeff_cap
    check_basis_memory(b, rows_cap, n, basis_dtype, basis_device)
    fingerprint = _fingerprint({**(config or {}), "n": n, "b": b, "max_steps": max_steps,
                                "basis_dtype": str(basis_dtype), "op_dtype": str(op.dtype),
                                **({"reorthogonalize": reorthogonalize} if local else {})})
    path = Path(checkpoint) if checkpoint is not None else None
    state = _load(path, fingerprint, rows_cap, coeff_cap, basis_device, local) if path is not None else None
    if state is None:
        generator_state = generator.get_state()
        Q = torch.empty(b, rows_cap, n, dtype=basis_dtype, device=basis_device)  # rows > j + 1 are never read
        v0 = starts.to(device=basis_device, dtype=torch.float64)
        norms = v0.norm(dim=1, keepdim=True)
        require(bool((norms > 0).all()), "start vectors must be nonzero")
        Q[:, 0] = (v0 / norms).to(basis_dtype)
        state = KrylovState(
            Q,
            torch.zeros(b, coeff_cap, dtype=torch.float64, device=basis_device),
            torch.zeros(b, coeff_cap, dtype=torch.float64, device=basis_device),
            torch.zeros(b, dtype=torch.long, device=basis_device),
            generator_state=generator_state,
            local=local,
        )
    else:
        generator.set_state(state.generator_state)

    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=state.j, desc=desc, unit="step", disable=not progress_enabled(progress),
               leave=False)
    active = state.steps == state.j  # runs that have not stopped
    W = torch.empty(b, n, dtype=basis_dtype, device=basis_device)  # A q_j, then the residual: one buffer for all steps
    beta_prev = state.betas[:, state.j - 1].clone() if state.j > 0 else torch.zeros(b, dtype=torch.float64, device=basis_device)
    try:
        while state.j < max_steps and bool(active.any()):
            # The stop check runs at the top of a step so that a resumed run (even one
            # resumed after it had finished) sees the same checks as an uninterrupted one.
            if stop is not None and state.j > 0 and state.j % check_every == 0 and stop(state):
                break
            j = state.j
            if not local and j + 1 >= state.Q.shape[1] and state.Q.shape[1] < max_steps:
                _grow(state, min(max_steps, 2 * state.Q.shape[1]))
            r = state.row(j)
            all_active = bool(active.all())
            idx = active.nonzero().flatten()
            V = state.Q[:, r] if all_active else state.Q[idx, r]
            AV = op.matmat(V.T.to(device=op.device, dtype=op.dtype))  # (n, |active|)
            if all_active:  # copied into W: AV may be the operator's own (or V's) storage
                W.copy_(AV.T)
            else:
                W.zero_()
                W[idx] = AV.T.to(device=basis_device, dtype=basis_dtype)
            alpha, beta, broke = _ops.lanczos_step_(state.Q, W, beta_prev, r, breakdown_tol)
            # A NaN/Inf entry of A q_j makes alpha or beta non-finite: one check of 2b scalars.
            if not bool(((torch.isfinite(alpha) & torch.isfinite(beta)) | ~active).all()):
                raise HesslabError(f"the operator returned NaN or Inf at step {j}: check the model, loss and data")
            state.alphas[:, j] = torch.where(active, alpha, state.alphas[:, j])
            state.betas[:, j] = torch.where(active, beta, state.betas[:, j])
            state.steps += active.long()
            broke &= active
            if bool(broke.any()) and j + 1 < max_steps:
                for i in broke.nonzero().flatten().tolist():
                    if on_breakdown == "restart" and _fresh_orthogonal(state, i, generator):
                        state.betas[i, j] = 0.0
                        state.restarts += 1
                    else:
                        active[i] = False
            beta_prev = state.betas[:, j].clone()
            with _interrupts_deferred():  # a checkpoint must never see half of this commit
                state.generator_state = generator.get_state()  # as of the last completed step
                if local and r == 1:  # slide the window: q_j, q_{j+1} become rows 0, 1
                    state.Q[:, 0].copy_(state.Q[:, 1])
                    state.Q[:, 1].copy_(state.Q[:, 2])
                state.j = j + 1
            bar.update(1)
            if path is not None and state.j % checkpoint_every == 0:
                _save(path, state, fingerprint)
    except BaseException:
        if path is not None:  # keep every completed step
            _save(path, state, fingerprint)
        raise
    finally:
        bar.close()
    if path is not None:
        _save(path, state, fingerprint)
    return state
