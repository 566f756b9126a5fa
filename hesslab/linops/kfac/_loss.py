"""The losses KFAC knows: recognising ``loss_fn``, and checking outputs and targets.

KFAC needs the loss's Hessian with respect to the model output in closed form (through
the square-root columns of :func:`hesslab.linops.kfac._math.sqrt_columns`), so it
recognises cross-entropy and mean squared error, or trusts ``loss_type`` and compares
the loss's value with the formula on the first batch. With ``loss_fn=None`` and a causal
language model (transformers ``*ForCausalLM``) it uses the token cross-entropy
("causal_lm"): logits (B, T, V), position t predicting ``labels[:, t+1]``, ``-100``
ignored, the mean over the predicted tokens; each token is a term of the loss, so B is
normalised by the number of predicted tokens and A by the number of sequences (see
:mod:`hesslab.linops.kfac._computer`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hesslab.errors import HesslabError

__all__ = ["LOSS_TYPES", "LossSpec", "check_output", "resolve_loss"]

LOSS_TYPES = ("cross_entropy", "mse")


class LossSpec(NamedTuple):
    """A recognised loss: ``kind`` ("cross_entropy" | "mse") and its label smoothing."""

    kind: str
    label_smoothing: float


def resolve_loss(loss_fn: Any, loss_type: str | None, head_kind: str = "fn") -> LossSpec:
    """Recognise the loss, or trust ``loss_type`` (checked numerically on the first batch).

    Args:
        head_kind: The :class:`~hesslab.linops._lmloss.LossHead` kind ("causal_lm" with
            ``loss_fn=None`` and a causal LM).
    """
    if loss_fn is None:
        if head_kind == "causal_lm":
            return LossSpec("causal_lm", 0.0)
        raise HesslabError(
            "loss_fn: None (the model's own loss) is supported by KFAC for causal language models "
            "(transformers *ForCausalLM: the token cross-entropy); for other models pass "
            "nn.CrossEntropyLoss() or nn.MSELoss() with (inputs, targets) batches"
        )
    if loss_type is not None:
        if loss_type not in LOSS_TYPES:
            raise HesslabError(f"loss_type: expected one of {LOSS_TYPES} or None, got {loss_type!r}")
        return LossSpec(loss_type, 0.0)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.reduction != "mean":
            raise HesslabError(
                f"loss_fn: CrossEntropyLoss(reduction={loss_fn.reduction!r}); hesslab operators need the "
                "batch mean, reduction='mean' (the default)"
            )
        if loss_fn.weight is not None:
            raise HesslabError(
                "loss_fn: CrossEntropyLoss with class weights is a weighted mean, not a sample mean; "
                "KFAC supports weight=None only"
            )
        return LossSpec("cross_entropy", float(loss_fn.label_smoothing))
    if isinstance(loss_fn, nn.MSELoss):
        if loss_fn.reduction != "mean":
            raise HesslabError(
                f"loss_fn: MSELoss(reduction={loss_fn.reduction!r}); hesslab operators need the batch "
                "mean, reduction='mean' (the default)"
            )
        return LossSpec("mse", 0.0)
    if loss_fn is F.cross_entropy:
        return LossSpec("cross_entropy", 0.0)
    if loss_fn is F.mse_loss:
        return LossSpec("mse", 0.0)
    raise HesslabError(
        f"loss_fn: KFAC needs the loss's Hessian with respect to the model output and recognises "
        f"nn.CrossEntropyLoss(), nn.MSELoss(), F.cross_entropy and F.mse_loss; got "
        f"{getattr(loss_fn, '__name__', type(loss_fn).__name__)}. If it computes one of these (mean "
        "reduction), pass loss_type='cross_entropy' or 'mse' (its value is checked on the first batch)."
    )


def check_output(spec: LossSpec, loss_fn: Any, out: Any, targets: Tensor, first: bool = False) -> Tensor:
    """Check the model's output against the targets for this loss; return it.

    Args:
        spec: The recognised loss.
        loss_fn: The user's loss (its ``ignore_index``; on the first batch its value).
        out: The model's output on the batch.
        targets: The batch's targets.
        first: Also compare ``loss_fn``'s value with the formula (the first batch).

    Raises:
        HesslabError: not one tensor, batch sizes that differ, shapes that do not fit
            the loss, targets equal to ``ignore_index`` or out of range, negative
            probability targets, or a loss value that is not the formula's.
    """
    if not isinstance(out, Tensor):
        raise HesslabError(f"model: KFAC needs a model returning one tensor, got {type(out).__name__}")
    if out.dim() < 1 or (targets.dim() >= 1 and out.shape[0] != targets.shape[0]):
        raise HesslabError(
            f"data: the model's output has shape {tuple(out.shape)} but the targets "
            f"{tuple(targets.shape)}; their first dimensions (the batch) must agree"
        )
    if spec.kind == "causal_lm":
        if out.dim() != 3 or targets.shape != out.shape[:2]:
            raise HesslabError(
                f"data: a causal LM's logits (B, T, V) and labels (B, T) must agree; got logits "
                f"{tuple(out.shape)} and labels {tuple(targets.shape)}"
            )
        return out
    if spec.kind == "cross_entropy":
        _check_cross_entropy(loss_fn, out, targets)
    elif targets.shape != out.shape:
        raise HesslabError(
            f"data: MSE targets must have the output's shape {tuple(out.shape)}, got "
            f"{tuple(targets.shape)} (broadcasting would change the loss)"
        )
    if first:
        _check_value(spec, loss_fn, out, targets)
    return out


def _check_cross_entropy(loss_fn: Any, out: Tensor, targets: Tensor) -> None:
    if out.dim() != 2:
        raise HesslabError(
            f"model: cross-entropy KFAC needs outputs of shape (n, c), got {tuple(out.shape)}; "
            "flatten extra dimensions into the batch (per-position losses are supported for causal "
            "LMs: loss_fn=None with a transformers *ForCausalLM model and dict batches)"
        )
    if targets.is_floating_point():
        if targets.shape != out.shape:
            raise HesslabError(
                f"data: probability targets must have the output's shape {tuple(out.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        if bool((targets.sum(1) < 0).any()):
            raise HesslabError("data: probability targets must be non-negative")
        return
    if targets.shape != out.shape[:1]:
        raise HesslabError(
            f"data: class-index targets must have shape ({out.shape[0]},), got {tuple(targets.shape)}"
        )
    ignore = getattr(loss_fn, "ignore_index", -100)
    if bool((targets == ignore).any()):
        raise HesslabError(
            f"data: some targets equal ignore_index={ignore}; the mean then runs over fewer "
            "samples than the batch holds. Drop those samples from the data (ignored tokens are "
            "supported for causal LMs with loss_fn=None)."
        )
    if bool(((targets < 0) | (targets >= out.shape[1])).any()):
        raise HesslabError(f"data: class-index targets must lie in [0, {out.shape[1]})")


def _check_value(spec: LossSpec, loss_fn: Any, out: Tensor, targets: Tensor) -> None:
    value = loss_fn(out, targets)
    if not isinstance(value, Tensor) or value.numel() != 1:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise HesslabError(f"loss_fn: must return a scalar tensor, the mean loss over the batch; got {got}")
    value = float(value)
    if spec.kind == "cross_entropy":
        ref = float(F.cross_entropy(out, targets, label_smoothing=spec.label_smoothing))
        what = "cross-entropy (mean over the batch)"
    else:
        ref = float(F.mse_loss(out, targets))
        what = "mean squared error (mean over all entries)"
    tol = math.sqrt(torch.finfo(out.dtype).eps) * max(1.0, abs(ref))
    if not abs(value - ref) <= tol:
        raise HesslabError(
            f"loss_fn: on the first batch it returns {value:.6g} but the {what} is {ref:.6g}; "
            "KFAC's output Hessian would not match this loss. Pass a loss KFAC supports "
            "(loss_type= only for callables that compute exactly that loss)."
        )
