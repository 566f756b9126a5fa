"""Shared fixtures: ``device`` (cpu always, cuda when present and built) and ``dtype``."""

from __future__ import annotations

import pytest
import torch

from hesslab import _ops


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and _ops.has_kernel("lanczos_step_", "cuda")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> torch.device:
    if request.param == "cuda" and not _cuda_ready():
        pytest.skip("no CUDA device, or hesslab built without CUDA kernels")
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
