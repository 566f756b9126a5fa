"""Checkpoint files of the Krylov driver: what they hold, how they are written and checked.

A checkpoint identifies the run that wrote it in three ways, each refused with a
:class:`~hesslab.errors.HesslabError` that names ``checkpoint`` and the fix (delete the
file or pass another path) when it does not match the run that resumes it:

* a fingerprint of the solver's arguments (size, steps, probes, seed, dtypes,
  reorthogonalization): "written by a run with different arguments";
* a signature of the operator: its hesslab class, dtype, shape and, where it has them,
  ``param_names`` / ``param_shapes`` and the shard layout (world size, every rank's local
  size, the layout permutation): "written for a different operator";
* the operator's action on the run's own first start vector q₀: ⟨q₀, A q₀⟩ and ‖A q₀‖,
  recorded at the first step and recomputed with one product on resume, compared to a
  tolerance fitting the operator's dtype (10·√eps relative: 1.5e-7 for float64,
  3.5e-3 for float32). This catches another model of the same shape, other data or
  other weights.

Files are written atomically (a temporary file in the same folder, flushed and fsynced,
then ``os.replace``), so a process killed during a write leaves the previous checkpoint
intact. A run that finished marks its checkpoint ``finished`` and keeps there what it
measured after its last step (the eigensolver's residual norms); resuming it returns the
same result after the one identity product.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import HesslabError
from ..linops import LinearOperator

FORMAT = "hesslab-krylov-2"
_FIX = "delete the file or pass another checkpoint path"


def fingerprint(config: dict) -> str:
    """A short hash of the arguments that determine a run's result."""
    return hashlib.sha256(repr(sorted(config.items())).encode()).hexdigest()[:16]


def operator_signature(op: LinearOperator) -> str:
    """A short hash of the operator's type, dtype, shape, parameter layout and shard layout (when it has them)."""
    # The hesslab class the operator is (or derives from): a user subclass that only adds
    # logging or interruption keeps its parent's checkpoints.
    cls = next((c for c in type(op).__mro__ if c.__module__.startswith("hesslab.")), type(op))
    kind = f"{cls.__module__}.{cls.__qualname__}"
    names = getattr(op, "param_names", None)
    shapes = getattr(op, "param_shapes", None)
    parts = [kind, str(op.dtype), tuple(op.shape),
             None if names is None else tuple(str(x) for x in names),
             None if shapes is None else tuple(tuple(int(d) for d in s) for s in shapes)]
    shards = op.shards
    if shards is not None:  # the unsharded signature is unchanged (its old checkpoints stay valid)
        parts.append(("shards", shards.rank, shards.world, tuple(shards.local_sizes), shards.signature))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def identity_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the identity check: 10·√eps of the operator's dtype."""
    return 10 * math.sqrt(torch.finfo(dtype).eps)


def action_summary(q: torch.Tensor, Aq: torch.Tensor, shards=None) -> tuple[float, float]:
    """(⟨q, A q⟩, ‖A q‖) in float64: what a checkpoint records of its operator (of the
    global vectors when ``shards`` is given: local partial sums and one all-reduce)."""
    q, Aq = q.double().cpu(), Aq.double().cpu()
    if shards is None:
        return float(q @ Aq), float(Aq.norm())
    sums = shards.reduce_(torch.stack([q @ Aq, Aq @ Aq]))
    return float(sums[0]), float(sums[1].sqrt())


class Checkpoint:
    """One checkpoint file: validated when the run starts, then loaded and saved.

    Args:
        path: the file.
        fingerprint: hash of the solver's arguments (see :func:`fingerprint`).
        operator: the operator's signature (see :func:`operator_signature`).
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str, operator: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.operator = operator
        self._check_writable()

    def _check_writable(self) -> None:
        """Refuse a directory or a place we cannot write, before step 1 rather than at the first save."""
        p = self.path
        if p.is_dir():
            raise HesslabError(f"checkpoint: {str(p)!r} is a directory; pass a file path, e.g. {str(p / 'lanczos.pt')!r}")
        if not p.parent.is_dir():
            raise HesslabError(f"checkpoint: the folder {str(p.parent)!r} of {str(p)!r} does not exist; create it or "
                               "pass another checkpoint path")
        probe = self._tmp_path()
        try:
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as exc:
            raise HesslabError(f"checkpoint: cannot write in {str(p.parent)!r} ({exc.strerror or exc}); pass a "
                               "checkpoint path in a writable folder") from exc

    def _tmp_path(self) -> Path:
        return self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")

    def read(self) -> dict[str, Any] | None:
        """The payload of an existing file checked against this run's fingerprint and
        operator signature, or None when there is no file."""
        p = self.path
        if not p.exists():
            return None
        try:
            payload = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # random bytes, a truncated file, a pickle we refuse to run
            raise HesslabError(f"checkpoint: {str(p)!r} is not a readable hesslab checkpoint "
                               f"(torch.load with weights_only=True failed: {type(exc).__name__}); "
                               f"{_FIX}") from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise HesslabError(f"checkpoint: {str(p)!r} is a torch file but not a hesslab solver checkpoint "
                               f"(format {FORMAT!r}); {_FIX}")
        if payload["fingerprint"] != self.fingerprint:
            raise HesslabError(
                f"checkpoint: {str(p)!r} was written by a run with different arguments (operator size, steps, probes, "
                f"seed, dtype or reorthogonalization); {_FIX}"
            )
        if payload["operator"] != self.operator:
            raise HesslabError(f"checkpoint: {str(p)!r} was written for a different operator (type, dtype, shape, "
                               f"parameters or shard layout differ); {_FIX}")
        return payload

    def check_identity(self, recorded: tuple[float, float] | None, now: tuple[float, float],
                       dtype: torch.dtype) -> None:
        """Compare the operator's action on q₀ now with what the file recorded."""
        if recorded is None:
            return
        tol = identity_tolerance(dtype) * max(abs(recorded[1]), abs(now[1]), 1e-300)
        if abs(recorded[0] - now[0]) > tol or abs(recorded[1] - now[1]) > tol:
            raise HesslabError(
                f"checkpoint: {str(self.path)!r} was written for a different operator: on the run's first vector "
                f"q0 it recorded <q0, A q0> = {recorded[0]:.6g}, |A q0| = {recorded[1]:.6g}, the operator now gives "
                f"{now[0]:.6g}, {now[1]:.6g} (other weights, data or model?); {_FIX}"
            )

    def write(self, payload: dict[str, Any]) -> None:
        """Write atomically: temporary file, flush + fsync, ``os.replace``, fsync of the folder."""
        tmp = self._tmp_path()
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "fingerprint": self.fingerprint, "operator": self.operator, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        try:
            fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:  # pragma: no cover - platforms without directory handles
            return
        try:
            os.fsync(fd)
        except OSError:  # pragma: no cover
            pass
        finally:
            os.close(fd)
