"""Attention that differentiates twice: every model call runs under the math SDPA backend.

Fused scaled-dot-product attention kernels (flash, memory-efficient, cuDNN) have no
double backward: torch raises "derivative for aten::_scaled_dot_product_flash_attention
..._backward is not implemented" at the first Hessian product. The math backend computes
the same function from plain matmuls and a softmax, which autograd differentiates to any
order. So :class:`~hesslab.linops._model.ModelData` runs every forward pass (Hessian, GGN,
KFAC's exact terms, the finite-difference check, gradients) inside
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``. This covers, with no setting:

* ``F.scaled_dot_product_attention`` wherever it is called: timm's ``Attention`` with
  ``fused_attn=True``, transformers models with ``attn_implementation="sdpa"`` (the
  default), ``nn.MultiheadAttention`` and hand-written modules;
* the backward passes, which autograd records from the math forward.

What cannot be switched from outside is refused before any product:
transformers' ``attn_implementation="flash_attention_2"`` / ``"flash_attention_3"`` (the
flash-attn package's kernels) and ``"flex_attention"`` (a compiled kernel without a
double backward). The fix is to build the model with ``attn_implementation="eager"``
or ``"sdpa"``.

The math backend is slower and uses more memory than a fused kernel (it materialises
the (T, T) attention matrix per head); the eigenvalues are those of the eager model.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator

from torch import nn

from hesslab.errors import HesslabError

__all__ = ["MATH_ATTENTION_NOTE", "attention_notes", "math_attention"]

_log = logging.getLogger("hesslab.linops")

MATH_ATTENTION_NOTE = (
    "attention: products run under torch's math SDPA backend "
    "(sdpa_kernel(SDPBackend.MATH)), because fused attention kernels have no double "
    "backward; the eigenvalues are those of the eager-attention model"
)

_UNSWITCHABLE = ("flash", "flex")
_logged: weakref.WeakSet = weakref.WeakSet()  # models already logged about


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Run ``F.scaled_dot_product_attention`` on the math backend inside the block."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _is_attention(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.MultiheadAttention)
        or hasattr(module, "fused_attn")
        or "Attention" in type(module).__name__
    )


def attention_notes(model: nn.Module) -> list[str]:
    """The notes about attention for ``model`` (logged once per model).

    Returns:
        ``[MATH_ATTENTION_NOTE]`` when the model holds attention modules (or a
        transformers config with an attention implementation), else ``[]``.

    Raises:
        HesslabError: a transformers attention implementation that the math backend
            cannot replace (flash-attention, flex attention), naming the model and the fix.
    """
    found = False
    for name, module in model.named_modules():
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if isinstance(impl, str) and any(k in impl for k in _UNSWITCHABLE):
            where = f" (module {name!r})" if name else ""
            raise HesslabError(
                f"model: {type(model).__name__}{where} uses attn_implementation={impl!r}, a fused "
                "kernel without a double backward that hesslab cannot switch from outside. Build "
                "the model with attn_implementation=\"eager\" (or \"sdpa\", which hesslab runs on "
                "the math backend), e.g. AutoModelForCausalLM.from_config(config, "
                "attn_implementation=\"eager\"), or set config._attn_implementation = \"eager\" "
                "before building it."
            )
        found = found or impl is not None or _is_attention(module)
    if not found:
        return []
    if model not in _logged:
        _logged.add(model)
        _log.info("%s: %s", type(model).__name__, MATH_ATTENTION_NOTE)
    return [MATH_ATTENTION_NOTE]
