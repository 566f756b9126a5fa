"""A once-per-operator check of second derivatives against central finite differences.

Autograd's second derivatives are only as right as every backward formula on the way:
a custom ``torch.autograd.Function`` whose backward is not itself differentiable (it
detaches, or uses a formula autograd cannot see through) gives a Hessian that is
silently wrong. So the first product of every :class:`~hesslab.linops.CurvatureOperator`
is compared, on the first batch and for its first column v, with finite differences of
first derivatives, which need no second derivative at all (in float64, parameters and
data cast):

    Hessian:  H v ≈ (∇L_1(θ + εu) − ∇L_1(θ − εu)) / (2ε) · ‖v‖,  u = v / ‖v‖.
    GGN:      G v = Jᵀ (∇²_z L_1) J v ≈ Jᵀ [(∇_z L_1(z + εw) − ∇_z L_1(z − εw)) / (2ε)] · ‖Jv‖,
              w = J v / ‖J v‖, with J v itself a central difference of the outputs and
              Jᵀ one (first-order) vector-Jacobian product.

The check raises only when the difference quotient is *consistent* (a second, four times
smaller step agrees with the first to 1e-3) and the product disagrees with it by more
than 5% of their size, far beyond rounding. A kink (ReLU, max-pooling) crossed by the
step makes the two quotients disagree, so it never raises a false alarm; the second
step is only taken when the first quotient disagrees with the product. In train mode,
every evaluation draws the same dropout masks (the RNG is forked and reseeded, so the
global RNG is untouched). Where the float64 copy cannot run, the check is skipped.

The check runs on the first batch's first 8 samples (every input tensor whose first
dimension is the batch's is cut): the same operations at a fraction of the cost, which
matters because float64 convolutions are several times slower than float32 ones on a CPU
(on a 0.3M-parameter ResNet with a 128-image batch the check cost 1.3 s, ten products,
on the whole batch). Both sides of the comparison, the product and the quotient, see the
same cut batch, so the check stays exact for any function of it. A model that cannot run
on the cut batch (a batch size built into it), and a compiled operator (a new input shape
would compile a new graph), are checked on the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hesslab.errors import HesslabError
from hesslab.linops._compiled import COMPILED
from hesslab.linops._data import cast_batch, cast_floating, map_inputs
from hesslab.linops._model import any_rank, distributed_active
from hesslab.linops._params import columns_to_params, flatten_grads, params_to_columns

if TYPE_CHECKING:  # pragma: no cover
    from hesslab.linops._curvature import CurvatureOperator

__all__ = ["check_first_product", "ggn_difference", "hessian_difference"]

#: (op, parameters θ by name, inputs, targets, u (n,) float64, ε) -> the quotient, (n,).
Difference = Callable[["CurvatureOperator", dict[str, Tensor], Any, Tensor, Tensor, float], Tensor]

_STEP = 1e-4  # relative to 1 + RMS(θ)
_CONSISTENT = 1e-3
_WRONG = 0.05
_SEED = 20240613
_SAMPLES = 8  # the check's cut of the first batch


def check_first_product(op: CurvatureOperator, v: Tensor, product: Tensor | None,
                        difference: Difference) -> None:
    """Compare the operator's product with a difference quotient on the first batch.

    Args:
        op: The operator.
        v: (n,), the first column of its first product.
        product: (n,), that column of the product when it is the first batch's own
            (single batch, no torch.distributed), else None (recomputed on batch 1
            when the check needs the whole batch).
        difference: The operator's difference quotient (see the module docstring).

    Raises:
        HesslabError: the product disagrees with a consistent difference quotient.
    """
    md = op._md
    _, inputs, targets, _ = md.first_batch()
    head = _head(inputs, targets) if op._path != COMPILED else None
    devices = [op.device] if op.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), md.model_mode():
        verdict = _UNCHECKED
        if head is not None:
            try:
                verdict = _verdict(op, *head, v, _column_product(op, *head, v), difference)
            except RuntimeError:  # the model cannot run on the cut batch: check the whole one
                pass
        if verdict is _UNCHECKED:
            if product is None:
                product = _column_product(op, inputs, targets, v)
            try:
                verdict = _verdict(op, inputs, targets, v, product.to(torch.float64), difference)
            except RuntimeError:  # the model cannot run in float64 (a hard-coded dtype): skip
                verdict = None
    bad = verdict is not None
    if distributed_active():
        bad = any_rank(bad)  # every rank raises, or none
    if bad:
        err = "" if verdict is None else f" (relative difference {verdict:.2g})"
        raise HesslabError(
            f"loss_fn/model: the second derivatives autograd gives for {type(op).__name__} disagree "
            f"with finite differences of first derivatives on the first batch{err}, far beyond "
            f"rounding. Some backward formula on the way from the parameters through the model to "
            f"loss_fn ({_name(md.loss_fn)}) is not itself differentiable, e.g. a custom "
            "torch.autograd.Function whose backward detaches or hides its dependence on the "
            "input. Give it a differentiable backward (plain torch ops), or use ops with a double "
            "backward."
        )


_UNCHECKED = object()


def _head(inputs: Any, targets: Tensor) -> tuple[Any, Tensor] | None:
    """The batch's first ``_SAMPLES`` samples, or None when it has no more than that."""
    size = targets.shape[0] if targets.dim() >= 1 else 0
    if size <= _SAMPLES:
        return None

    def cut(t: Tensor) -> Tensor:
        return t[:_SAMPLES] if t.dim() >= 1 and t.shape[0] == size else t

    return map_inputs(inputs, cut), targets[:_SAMPLES]


def _column_product(op: CurvatureOperator, inputs: Any, targets: Tensor, v: Tensor) -> Tensor:
    """The operator's block product of one batch for the single column v; (n,) float64."""
    torch.manual_seed(_SEED)
    Vs = columns_to_params(v[:, None], op.param_shapes)
    return params_to_columns(op._batch_product(inputs, targets, Vs, reuse=False))[:, 0].to(torch.float64)


def _verdict(op: CurvatureOperator, inputs: Any, targets: Tensor, v: Tensor, product: Tensor,
             difference: Difference) -> float | None:
    """The relative disagreement when the quotient is consistent and disagrees, else None."""
    full = {k: cast_floating(t.detach(), torch.float64) for k, t in op._md.tensors().items()}
    inputs, targets = cast_batch(inputs, targets, torch.float64)
    v64 = v.to(torch.float64)
    scale_v = float(v64.norm())
    if scale_v == 0.0 or not math.isfinite(scale_v):
        return None
    theta = torch.cat([full[k].reshape(-1) for k in op.param_names])
    eps = _STEP * (1.0 + float(theta.norm()) / math.sqrt(theta.numel()))

    def quotient(step: float) -> Tensor:
        torch.manual_seed(_SEED)
        return difference(op, dict(full), inputs, targets, v64 / scale_v, step) * scale_v

    fd1 = quotient(eps)
    scale = max(float(fd1.norm()), float(product.norm()), 1e-300)
    if float((product - fd1).norm()) <= _WRONG * scale:
        return None
    fd2 = quotient(eps / 4)
    if float((fd1 - fd2).norm()) > _CONSISTENT * scale:
        return None  # a kink crossed by the step: no verdict
    return float((product - fd2).norm()) / scale


def hessian_difference(op: CurvatureOperator, full: dict[str, Tensor], inputs: Any,
                       targets: Tensor, u: Tensor, eps: float) -> Tensor:
    """(∇L_1(θ + εu) − ∇L_1(θ − εu)) / (2ε) over the selected parameters; (n,)."""
    grads = [_gradient(op, full, inputs, targets, u, s * eps) for s in (1.0, -1.0)]
    return (grads[0] - grads[1]) / (2 * eps)


def ggn_difference(op: CurvatureOperator, full: dict[str, Tensor], inputs: Any,
                   targets: Tensor, u: Tensor, eps: float) -> Tensor:
    """Jᵀ [(∇_z L_1(z + εw) − ∇_z L_1(z − εw)) / (2ε)] ‖Ju‖ with Ju by central differences."""
    md = op._md
    sel = {k: full.pop(k) for k in op.param_names}
    shifts = dict(zip(op.param_names, columns_to_params(u[:, None], op.param_shapes)))

    def output(step: float) -> Tensor:
        torch.manual_seed(_SEED)
        p = {k: sel[k] + step * shifts[k][0] for k in op.param_names}
        return md.logits(md.forward({**full, **p}, inputs))

    Ju = (output(eps) - output(-eps)) / (2 * eps)
    norm = float(Ju.norm())
    if norm == 0.0:
        return torch.zeros_like(u)
    torch.manual_seed(_SEED)
    leaves = [sel[k].detach().requires_grad_(True) for k in op.param_names]
    z = md.logits(md.forward({**full, **dict(zip(op.param_names, leaves))}, inputs))

    def grad_z(step: float) -> Tensor:
        zz = (z.detach() + step * Ju / norm).requires_grad_(True)
        (g,) = torch.autograd.grad(md.loss(zz, targets), zz)
        return g

    w = (grad_z(eps) - grad_z(-eps)) / (2 * eps) * norm
    return flatten_grads(torch.autograd.grad(z, leaves, w, allow_unused=True), leaves)


def _gradient(op: CurvatureOperator, full: dict[str, Tensor], inputs: Any, targets: Tensor,
              u: Tensor, step: float) -> Tensor:
    """∇L_1 at θ + step·u over the selected parameters (float64); (n,)."""
    shifted = dict(full)
    for k, s in zip(op.param_names, columns_to_params(u[:, None], op.param_shapes)):
        shifted[k] = full[k] + step * s[0]
    torch.manual_seed(_SEED)
    return op._batch_gradient(inputs, targets, shifted)[1]


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)
