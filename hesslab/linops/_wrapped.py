"""Models as users wrap them: ``DistributedDataParallel`` accepted as is.

A DDP-wrapped model is unwrapped to its ``.module`` for the functional calls and the
parameter names (the inner module's, without ``module.``). DDP's gradient all-reduce
runs in hooks of ``loss.backward()``, which ``torch.autograd.grad`` never fires; hesslab's
operators all-reduce their products themselves (see :mod:`hesslab.linops._model`), so a
wrapped and an unwrapped model give the same operator.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from hesslab.linops._params import ParamSpec

__all__ = ["unwrap_model"]

_PREFIX = "module."


def unwrap_model(model: Any, params: ParamSpec) -> tuple[Any, ParamSpec]:
    """``(inner module, params)`` for a DDP-wrapped model; anything else unchanged.

    Parameter names, submodule names and glob patterns in ``params`` may carry the
    wrapper's ``module.`` prefix: it is removed (modules and tensors need no change, they
    are the inner module's).
    """
    ddp = getattr(nn.parallel, "DistributedDataParallel", None)
    if ddp is None or not isinstance(model, ddp):
        return model, params
    if isinstance(params, str):
        params = _strip(params)
    elif params is not None and not isinstance(params, (nn.Module, Tensor)):
        try:
            params = [_strip(p) if isinstance(p, str) else p for p in params]
        except TypeError:
            pass  # not an iterable: select_parameters says what is wrong
    return model.module, params


def _strip(name: str) -> str:
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name
