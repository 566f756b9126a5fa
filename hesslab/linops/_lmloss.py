"""How a batch's loss comes from the model's output: ``loss_fn``, the model's own loss, causal LMs.

:class:`LossHead` is the one place that knows it, for every curvature operator:

* ``loss_fn`` given: the loss is ``loss_fn(output, targets)``, the batch MEAN; each batch
  weighs its number of samples (``targets.shape[0]``).
* ``loss_fn=None``, a causal language model (transformers ``*ForCausalLM`` /
  ``*LMHeadModel``): the loss is the token cross-entropy that transformers'
  ``ForCausalLMLoss`` computes, the mean over the predicted tokens: logits (B, T, V) at
  positions t < T−1 predict ``labels[:, t+1]``, labels equal to ``-100`` are ignored.
  hesslab computes it from the logits itself, in the operator's dtype (transformers
  upcasts to float32 only), calling the model without ``labels``; on the first batch it
  is checked against the model's own ``.loss``. Each batch weighs its number of
  predicted tokens ``(labels[:, 1:] != -100).sum()``, so the operator is the Hessian of
  the mean over ALL predicted tokens of the data, however they are split into batches.
* ``loss_fn=None``, any other model: the loss is the model's ``output.loss`` (or
  ``output["loss"]``), each batch weighted by its number of samples.

Cross-entropy curvature (the GGN's output-space Hessian) in closed form: for the logits
z of one token with p = softmax(z) and weight w (1/count for a predicted token, 0 for an
ignored one), ∇²_z ℓ = w (diag(p) − p pᵀ), applied to u as w (p∘u − p (pᵀu)). Label
smoothing does not change it (the Hessian of −log p_k is the same for every k).
Recognised: ``nn.CrossEntropyLoss`` (reduction mean, no class weights) and
``F.cross_entropy`` on (n, c) logits with class-index targets, and the causal-LM loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hesslab.errors import HesslabError

__all__ = [
    "IGNORE_INDEX", "LossHead", "apply_cross_entropy", "causal_lm_loss", "is_causal_lm",
    "shifted_labels",
]

IGNORE_INDEX = -100


def is_causal_lm(model: nn.Module) -> bool:
    """True for a transformers causal language model (``*ForCausalLM``, ``*LMHeadModel``)."""
    inner = getattr(model, "module", model)  # DDP
    name = type(inner).__name__
    if not hasattr(inner, "config"):
        return False
    loss_type = getattr(inner, "loss_type", None)
    return loss_type == "ForCausalLM" or name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def shifted_labels(labels: Tensor) -> Tensor:
    """The label each position predicts: ``labels[:, t+1]``, ``-100`` at the last position."""
    pad = torch.full_like(labels[..., :1], IGNORE_INDEX)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean token cross-entropy of a causal LM, as transformers' ``ForCausalLMLoss``.

    Args:
        logits: (B, T, V).
        labels: (B, T) integer token ids, ``-100`` for positions without a loss.

    Returns:
        Shape (): the mean over the predicted tokens (NaN when there is none).
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shifted_labels(labels).reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def _model_loss(out: Any) -> Any:
    """``out.loss`` or ``out["loss"]``; raises AttributeError when the output has neither."""
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    if hasattr(out, "loss") and not isinstance(out, Tensor):
        return out.loss
    raise AttributeError("loss")


def logits_of(out: Any) -> Any:
    """The logits of a model output (``.logits`` / ``["logits"]``), or the output itself."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    return getattr(out, "logits", out)


class LossHead:
    """The loss of a batch from the model's output, its weight, and its curvature.

    Args:
        model: The network.
        loss_fn: The user's loss, or ``None`` for the model's own loss.

    Attributes:
        kind: ``"fn"`` (``loss_fn``), ``"causal_lm"`` or ``"model"`` (``output.loss``).
        notes: What the head decided, for the operator's ``notes``.
    """

    def __init__(self, model: nn.Module, loss_fn: Any):
        self.model = model
        self.loss_fn = loss_fn
        self.notes: list[str] = []
        if loss_fn is not None:
            self.kind = "fn"
        elif is_causal_lm(model):
            self.kind = "causal_lm"
            self.notes.append(
                "loss: the causal-LM token cross-entropy (labels shifted by one, -100 ignored), "
                "computed from the logits in the operator's dtype; each batch weighted by its "
                "number of predicted tokens"
            )
        else:
            self.kind = "model"

    # ------------------------------------------------------------------ calls
    def model_inputs(self, inputs: Any) -> Any:
        """The inputs the model is called with (a causal LM without ``labels``)."""
        if self.kind == "causal_lm" and isinstance(inputs, Mapping) and "labels" in inputs:
            return {k: v for k, v in inputs.items() if k != "labels"}
        return inputs

    def value(self, out: Any, targets: Tensor) -> Any:
        """The batch MEAN loss from the model's output (or from its logits)."""
        if self.kind == "fn":
            return self.loss_fn(out, targets)
        if self.kind == "causal_lm":
            return causal_lm_loss(self.logits(out), targets)
        try:
            loss = _model_loss(out)
        except AttributeError:
            raise HesslabError(
                f"loss_fn: None means the model's output carries the loss (.loss or ['loss']), but "
                f"{type(self.model).__name__} returned a {type(out).__name__} without one. Pass "
                "loss_fn=(output, targets) -> mean loss, e.g. nn.CrossEntropyLoss()."
            ) from None
        if loss is None:
            raise HesslabError(
                f"data: {type(self.model).__name__} returned loss=None: with loss_fn=None each "
                "batch must hold the model's labels (batch['labels']) so that the model computes "
                "its loss; or pass loss_fn="
            )
        return loss

    def logits(self, out: Any) -> Tensor:
        """The tensor the loss is a function of (the GGN's z; KFAC's output)."""
        if self.kind == "model":
            raise HesslabError(
                f"loss_fn: None (the model's own loss) is only decomposed into logits and a loss "
                f"for causal language models; {type(self.model).__name__} is not one. For the GGN "
                "and KFAC pass loss_fn= (e.g. nn.CrossEntropyLoss()) with (inputs, targets) "
                "batches; the Hessian works with the model's loss as it is."
            )
        z = logits_of(out) if self.kind == "causal_lm" else out
        if not isinstance(z, Tensor):
            raise HesslabError(
                f"model: the GGN needs a model returning one tensor, got {type(z).__name__}"
            )
        return z

    def count(self, inputs: Any, targets: Tensor) -> int | None:
        """The weight of a batch: its predicted tokens (causal LM), else None (the default)."""
        if self.kind == "causal_lm":
            return int((targets[..., 1:] != IGNORE_INDEX).sum())
        return None

    def check_first(self, out_with_loss: Any, targets: Tensor) -> None:
        """A causal LM's formula against the model's own ``.loss`` on the first batch.

        Raises:
            HesslabError: they differ beyond float32 rounding (an unusual loss).
        """
        if self.kind != "causal_lm":
            return
        try:
            theirs = _model_loss(out_with_loss)
        except AttributeError:
            return
        if not isinstance(theirs, Tensor):
            return
        ours = float(causal_lm_loss(self.logits(out_with_loss).double(), targets))
        if not abs(float(theirs) - ours) <= 1e-4 * max(1.0, abs(ours)):
            raise HesslabError(
                f"loss_fn: None with the causal LM {type(self.model).__name__}: its .loss "
                f"({float(theirs):.6g}) is not the token cross-entropy over shifted labels "
                f"({ours:.6g}). Pass loss_fn explicitly, with (inputs, targets) batches."
            )

    # ------------------------------------------------------------- curvature
    def recognises_cross_entropy(self) -> bool:
        """True when the loss is a cross-entropy with a closed-form curvature (see below)."""
        return self.kind == "causal_lm" or (self.kind == "fn" and _plain_cross_entropy(self.loss_fn))

    def cross_entropy(self, z: Tensor, targets: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(p, w)`` for the closed-form cross-entropy curvature, or None if not CE.

        Returns:
            p (*z) the softmax over the last dimension; w (*z[:-1]) each token's weight
            (1/count, 0 for an ignored token), so that ∇²_z L = w (diag(p) − p pᵀ).
        """
        if self.kind == "causal_lm":
            labels = shifted_labels(targets)
        elif self.kind == "fn" and _plain_cross_entropy(self.loss_fn) and z.dim() == 2:
            if targets.is_floating_point() or targets.shape != z.shape[:1]:
                return None
            labels = targets
        else:
            return None
        ignore = getattr(self.loss_fn, "ignore_index", IGNORE_INDEX)
        valid = (labels != ignore).to(z.dtype)
        count = valid.sum()
        if float(count) == 0:
            return None
        p = torch.softmax(z.detach(), dim=-1)
        return p, valid / count


def apply_cross_entropy(pw: tuple[Tensor, Tensor], U: Tensor) -> Tensor:
    """w (p∘u − p (pᵀu)) for every column u of ``U`` (b, *z); shape (b, *z)."""
    p, w = pw
    out = p * U  # one (b, *z) buffer, updated in place
    out.addcmul_(p, out.sum(-1, keepdim=True), value=-1.0)
    return out.mul_(w[..., None])


def _plain_cross_entropy(fn: Any) -> bool:
    if fn is F.cross_entropy:
        return True
    return (
        isinstance(fn, nn.CrossEntropyLoss) and fn.reduction == "mean" and fn.weight is None
    )

