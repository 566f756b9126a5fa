"""Argument checks shared by the solvers: each names the argument and its valid range."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from ..errors import HesslabError, require


def is_int(x) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_int(name: str, value, low: int, high: int | None = None, hint: str = "") -> int:
    """``value`` as an int, checked to be an integer in [low, high]."""
    ok = is_int(value) and value >= low and (high is None or value <= high)
    if not ok:
        rng = f">= {low}" if high is None else f"with {low} <= {name} <= {high}"
        raise HesslabError(f"{name} must be an integer {rng}{hint}, got {value!r}")
    return int(value)


def check_real(name: str, value, low: float = 0.0, high: float = math.inf, *, low_open: bool = True,
               hint: str = "") -> float:
    """``value`` as a float, checked to be a finite real number in (low, high) (or [low, high))."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value < high
    if not ok:
        left = "<" if low_open else "<="
        rng = f"{low} {left} {name}" + (f" < {high}" if math.isfinite(high) else "")
        raise HesslabError(f"{name} must be a finite number with {rng}{hint}, got {value!r}")
    return float(value)


def check_basis_dtype(basis_dtype) -> None:
    require(basis_dtype is None or basis_dtype in (torch.float32, torch.float64),
            f"basis_dtype must be None, torch.float32 or torch.float64, got {basis_dtype!r}")


def check_grid(grid) -> np.ndarray | None:
    """A user grid as a float64 array: 1-D, finite, strictly increasing, at least 2 points."""
    if grid is None:
        return None
    g = np.asarray(grid, dtype=np.float64)
    require(g.ndim == 1 and g.size >= 2 and bool(np.isfinite(g).all()) and bool(np.all(np.diff(g) > 0)),
            f"grid must be a 1-D array of at least 2 finite, strictly increasing points, got shape {g.shape}")
    return g


def global_size(op) -> int:
    """n: the operator's size, the global one (``shards.global_size``) when it is sharded."""
    return op.shape[0] if op.shards is None else op.shards.global_size
