"""The batched Lanczos driver shared by the eigensolver and SLQ.

b Lanczos runs (one per start vector) advance together: each step applies the operator
to the b current basis vectors in one ``matmat`` (one pass over the data serves all
runs), then one compiled ``lanczos_step_`` does all the vector work (three-term
recurrence, CGS2 full reorthogonalization, normalisation) for the b runs without a host
sync. The driver adds what long runs need:

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

import hashlib
import os
import sys
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
            f"the Krylov basis needs {need / 2**30:.2f} GiB ({b} runs x {m} steps x {n} parameters x "
            f"{itemsize} bytes) but only {avail / 2**30:.2f} GiB is available on {device}. Options: fewer steps "
            "(num_steps), fewer probes, basis_dtype=torch.float32 (inner products still accumulate in float64), "
            "or basis_device='cpu' to keep the basis in host memory."
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

    Q: Tensor  # (b, capacity, n) basis, rows [0, j] valid
    alphas: Tensor  # (b, capacity) float64, entries [0, j) valid
    betas: Tensor  # (b, capacity) float64, entries [0, j) valid
    steps: Tensor  # (b,) int64: rows of T in use per run (< j where a run stopped at a breakdown)
    j: int = 0  # steps completed
    restarts: int = 0
    generator_state: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))

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
        "Q": state.Q[:, : j + 1].cpu(),
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


def _load(path: Path, fingerprint: str, capacity: int, device: torch.device) -> KrylovState | None:
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload["fingerprint"] != fingerprint:
        raise HesslabError(
            f"checkpoint: {path} was written by a run with different arguments (operator size, steps, probes, "
            "seed or dtype); delete it or pass another checkpoint path"
        )
    j = payload["j"]
    b, rows, n = payload["Q"].shape  # rows = j + 1, or j when the run filled its capacity
    cap = max(capacity, rows)
    Q = torch.zeros(b, cap, n, dtype=payload["Q"].dtype, device=device)
    Q[:, :rows] = payload["Q"].to(device)
    alphas = torch.zeros(b, cap, dtype=torch.float64, device=device)
    betas = torch.zeros(b, cap, dtype=torch.float64, device=device)
    alphas[:, :j] = payload["alphas"].to(device)
    betas[:, :j] = payload["betas"].to(device)
    return KrylovState(Q, alphas, betas, payload["steps"].to(device), j, payload["restarts"], payload["generator_state"])


def _grow(state: KrylovState, capacity: int) -> None:
    b, cap, n = state.Q.shape
    if capacity <= cap:
        return
    Q = torch.zeros(b, capacity, n, dtype=state.Q.dtype, device=state.Q.device)
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
) -> KrylovState:
    """Advance b Lanczos runs from ``starts`` (b, n) for up to ``max_steps`` steps.

    Args:
        op: the operator; products are taken in its dtype on its device.
        starts: (b, n) start vectors (normalised here).
        max_steps: the most rows of T per run (≤ n).
        on_breakdown: "stop" (freeze that run: its T is complete) or "restart" (continue
            with a fresh orthogonal vector and a zero off-diagonal).
        stop: called every ``check_every`` steps; True ends the run early.
        initial_capacity: rows allocated up front (grown by doubling up to max_steps).
        checkpoint, checkpoint_every, config: see the module docstring; ``config`` holds
            the caller's arguments that determine the result (for the fingerprint).
    """
    b, n = starts.shape
    require(on_breakdown in ("stop", "restart"), f"on_breakdown must be 'stop' or 'restart', got {on_breakdown!r}")
    capacity = min(max_steps, initial_capacity or max_steps)
    check_basis_memory(b, capacity, n, basis_dtype, basis_device)
    fingerprint = _fingerprint({**(config or {}), "n": n, "b": b, "max_steps": max_steps,
                                "basis_dtype": str(basis_dtype), "op_dtype": str(op.dtype)})
    path = Path(checkpoint) if checkpoint is not None else None
    state = _load(path, fingerprint, capacity, basis_device) if path is not None else None
    if state is None:
        generator_state = generator.get_state()
        Q = torch.zeros(b, capacity, n, dtype=basis_dtype, device=basis_device)
        v0 = starts.to(device=basis_device, dtype=torch.float64)
        norms = v0.norm(dim=1, keepdim=True)
        require(bool((norms > 0).all()), "start vectors must be nonzero")
        Q[:, 0] = (v0 / norms).to(basis_dtype)
        state = KrylovState(
            Q,
            torch.zeros(b, capacity, dtype=torch.float64, device=basis_device),
            torch.zeros(b, capacity, dtype=torch.float64, device=basis_device),
            torch.zeros(b, dtype=torch.long, device=basis_device),
            generator_state=generator_state,
        )
    else:
        generator.set_state(state.generator_state)

    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=state.j, desc=desc, unit="step", disable=not progress_enabled(progress),
               leave=False)
    active = state.steps == state.j  # runs that have not stopped
    beta_prev = state.betas[:, state.j - 1].clone() if state.j > 0 else torch.zeros(b, dtype=torch.float64, device=basis_device)
    try:
        while state.j < max_steps and bool(active.any()):
            # The stop check runs at the top of a step so that a resumed run (even one
            # resumed after it had finished) sees the same checks as an uninterrupted one.
            if stop is not None and state.j > 0 and state.j % check_every == 0 and stop(state):
                break
            j = state.j
            if j + 1 >= state.Q.shape[1] and state.Q.shape[1] < max_steps:
                _grow(state, min(max_steps, 2 * state.Q.shape[1]))
            idx = active.nonzero().flatten()
            W = torch.zeros(b, n, dtype=basis_dtype, device=basis_device)
            AV = op.matmat(state.Q[idx, j].T.to(device=op.device, dtype=op.dtype))  # (n, |active|)
            if not bool(torch.isfinite(AV).all()):
                raise HesslabError(f"the operator returned NaN or Inf at step {j}: check the model, loss and data")
            W[idx] = AV.T.to(device=basis_device, dtype=basis_dtype)
            alpha, beta, broke = _ops.lanczos_step_(state.Q, W, beta_prev, j, breakdown_tol)
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
            state.generator_state = generator.get_state()  # as of the last completed step
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
