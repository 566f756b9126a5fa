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


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny tensors: one thread avoids oversubscribing the 2-core CI machines.
    The kernels' multi-threaded paths are tested explicitly (test_lanczos_ops)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
