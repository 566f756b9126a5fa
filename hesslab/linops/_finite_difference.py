"""Hessian products without a double backward: central differences of gradients.

``Hessian(..., method="finite_difference")`` computes, for every column v of a block and
every batch k,

    H_k v ≈ (∇L_k(θ + εv) − ∇L_k(θ − εv)) / (2ε),

two first-order gradients per column and batch (2b per batch for b columns); the base
weights the batches by n_k and all-reduces across ranks exactly as for the exact paths,
so a product is still one pass over the data. No second-order graph is built, so it also
serves models whose ops (fused attention kernels, custom Functions) have no double
backward, and sharded models where a double backward is impossible.

The step (δ = the machine epsilon of the dtype the gradients are computed in):

    ε = ∛δ · (1 + ‖θ‖) / ‖v‖,   so the step length is h = ε‖v‖ = ∛δ (1 + ‖θ‖),

θ being the selected parameters. The cube root balances the two errors of a central
difference; with u = v/‖v‖,

    ‖FD − Hv‖ / ‖v‖ ≲ h²/6 · ‖∇³L[u, u, ·]‖  +  δ · c‖∇L‖ / h,
                      (truncation, O(ε²))       (rounding of the two gradients, O(δ/ε))

so both terms are O(δ^{2/3}) relative for a smooth (C³) loss: about 2e-5·K in float32
and 4e-11·K in float64, K a model constant of order one for well-scaled networks (the
measured errors are in the tests and benchmarks/RESULTS.md). A non-smooth model (ReLU,
max-pooling) is exact between kinks; a kink crossed by the step adds an error of the
size of the jump in the gradient over 2ε, so such products are only as good as the
step is small against the distance to the nearest kink.

``fd_dtype=torch.float64`` computes the perturbed gradients in float64 (cast copies of
parameters, buffers and data) even for a float32 operator, so the error is that of
float64 (δ = 2.2e-16); the product is returned in the operator's dtype.

The parameters are never written: every perturbed θ ± εv is a new tensor passed to the
model through ``torch.func.functional_call``, so the model's parameters stay bitwise as
they were after any number of products. In train mode the buffers are fresh clones (as
on every path: BatchNorm running statistics never move), and the 2b gradients of a
batch see the same random draws (dropout masks), the global RNG advancing once per batch
as a single forward pass would advance it.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hesslab.errors import HesslabError
from hesslab.linops._data import cast_batch, cast_floating

if TYPE_CHECKING:  # pragma: no cover
    from hesslab.linops._curvature import CurvatureOperator

__all__ = ["METHOD", "fd_batch_product", "fd_setup", "fd_step"]

METHOD = "finite_difference"


def fd_setup(op: CurvatureOperator, method: str, fd_dtype: torch.dtype | None) -> None:
    """Validate the finite-difference options of ``op`` and record them.

    Raises:
        HesslabError: ``fd_dtype`` is not a floating dtype, is given without
            ``method='finite_difference'``, or the operator has no finite-difference path.
    """
    if fd_dtype is not None:
        if not (isinstance(fd_dtype, torch.dtype) and fd_dtype.is_floating_point):
            raise HesslabError(
                f"fd_dtype: expected a floating torch.dtype or None, got {fd_dtype!r}"
            )
        if method != METHOD:
            raise HesslabError(
                f"fd_dtype: only used with method='{METHOD}' (got method={method!r})"
            )
    if method == METHOD and not getattr(type(op), "finite_difference_supported", False):
        raise HesslabError(
            f"method: '{METHOD}' is available for Hessian only; {type(op).__name__} products need "
            "the loss Hessian on the outputs. Use method='autograd' or 'func' for "
            f"{type(op).__name__}, or Hessian(..., method='{METHOD}')."
        )
    op._fd_dtype = fd_dtype


def fd_step(theta_norm: float, v_norm: float, dtype: torch.dtype) -> float:
    """ε = ∛δ (1 + ‖θ‖) / ‖v‖ for the dtype's machine epsilon δ (see the module docstring)."""
    return torch.finfo(dtype).eps ** (1.0 / 3.0) * (1.0 + theta_norm) / v_norm


def fd_batch_product(op: CurvatureOperator, inputs: Any, targets: Tensor,
                     Vs: list[Tensor]) -> list[Tensor]:
    """One batch's block product by central differences of gradients.

    Args:
        op: The operator (its model, loss and parameter layout).
        inputs, targets: The batch (already on the operator's device and dtype).
        Vs: The b columns per parameter, shapes (b, *s_i).

    Returns:
        [(b, *s_i)] in the operator's dtype: column j is
        (∇L_k(θ + ε_j v_j) − ∇L_k(θ − ε_j v_j)) / (2ε_j), ε_j by :func:`fd_step`.
    """
    dt = op._fd_dtype or op.dtype
    if dt != op.dtype:
        inputs, targets = cast_batch(inputs, targets, dt)
    names = op.param_names
    full = op._md.tensors()
    theta = [cast_floating(full[k], dt) for k in names]
    theta_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in theta))
    b = Vs[0].shape[0]
    evals = 2 * b
    cols: list[Tensor] = []
    for j in range(b):
        v = [V[j].to(dt) for V in Vs]
        v_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in v))
        if v_norm == 0.0 or not math.isfinite(v_norm):  # NaN/Inf columns give NaN (diagnosed)
            fill = 0.0 if v_norm == 0.0 else math.nan
            cols.append(torch.full((op.shape[0],), fill, dtype=dt, device=op.device))
            evals -= 2
            continue
        eps = fd_step(theta_norm, v_norm, dt)
        grads = []
        for sign in (1.0, -1.0):
            evals -= 1
            shifted = {k: t + (sign * eps) * d for k, t, d in zip(names, theta, v)}
            with _same_draws(op, last=evals == 0):
                grads.append(_gradient(op, inputs, targets, shifted, dt))
        cols.append((grads[0] - grads[1]).div_(2 * eps))
    block = torch.stack(cols).to(op.dtype)  # (b, n)
    parts = torch.split(block, [math.prod(s) for s in op.param_shapes], dim=1)
    return [p.reshape(b, *s) for p, s in zip(parts, op.param_shapes)]


def _gradient(op: CurvatureOperator, inputs: Any, targets: Tensor, shifted: dict[str, Tensor],
              dt: torch.dtype) -> Tensor:
    """∇L_k at the shifted parameters, the other tensors (fresh clones in train mode) in dt."""
    full = op._md.tensors()
    if dt != op.dtype:
        full = {k: cast_floating(t, dt) for k, t in full.items()}
    full.update(shifted)
    try:
        return op._batch_gradient(inputs, targets, full)[1]
    except RuntimeError as err:
        if dt == op.dtype:
            raise
        raise HesslabError(
            f"fd_dtype: the model fails in {dt} (a dtype fixed inside the model?); pass "
            f"fd_dtype=None to compute the gradients in {op.dtype}. Original error: "
            f"{str(err).splitlines()[0]}"
        ) from err


def _same_draws(op: CurvatureOperator, last: bool) -> contextlib.AbstractContextManager:
    """In train mode every gradient but a batch's last one runs on a forked RNG.

    So all 2b evaluations draw the same dropout masks, and the global RNG advances once
    per batch. Eval mode draws nothing: no fork.
    """
    if not op.train_mode or last:
        return contextlib.nullcontext()
    devices = [op.device] if op.device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)
