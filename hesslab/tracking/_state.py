"""Leaving the model exactly as it was around a measurement."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["preserved_state"]


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore ``model`` on exit exactly as it was on entry.

    Restored: every module's ``training`` flag, every parameter's ``requires_grad``
    flag, every parameter's ``.grad`` (the same tensor object, or None; values written
    into it in place are copied back), every buffer's values (BatchNorm running
    statistics, ``num_batches_tracked``), the global CPU (and, for a model on a GPU, CUDA)
    random number generator states and the grad mode. Costs one copy of the gradients
    and buffers.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [(p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_devices = sorted({t.device.index or 0 for t in (*params, *model.buffers()) if t.is_cuda})
    cuda_rng = [torch.cuda.get_rng_state(d) for d in cuda_devices]
    grad_enabled = torch.is_grad_enabled()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        # Values are compared rather than version counters: some kernels (BatchNorm's
        # running statistics) write in place without bumping them.
        for p, flag, (grad, saved) in zip(params, flags, grads):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if p.grad is not grad:
                p.grad = grad
            if grad is not None and not torch.equal(grad, saved):
                with torch.no_grad():
                    grad.copy_(saved)
        for b, saved in buffers:
            if not torch.equal(b, saved):
                with torch.no_grad():
                    b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        for d, state in zip(cuda_devices, cuda_rng):
            torch.cuda.set_rng_state(state, d)
        torch.set_grad_enabled(grad_enabled)
