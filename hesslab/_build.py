"""What this installation of hesslab was built with: ``hesslab.build_info()``."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from . import _ops
from ._version import __version__


def build_info() -> dict[str, Any]:
    """Which kernels were built and are registered, for which CUDA and architectures.

    Returns:
        A dict with ``extension`` (whether hesslab._C loaded), ``cpu_kernels`` and
        ``cuda_kernels`` (ops with a registered kernel per backend), the build record
        written by setup.py (``build``: CUDA version, architectures, torch it was built
        against), and the runtime: torch version, CUDA availability and devices.
    """
    record_path = Path(__file__).with_name("_build_config.json")
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB)")
    return {
        "hesslab": __version__,
        "extension": _ops.HAVE_EXTENSION,
        "extension_error": _ops._IMPORT_ERROR,
        "cpu_kernels": [op for op in _ops.OP_NAMES if _ops.has_kernel(op, "cpu")],
        "cuda_kernels": [op for op in _ops.OP_NAMES if _ops.has_kernel(op, "cuda")],
        "build": record,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": ["cpu: " + (platform.processor() or platform.machine()) + f", {torch.get_num_threads()} threads"]
        + devices,
        "python": platform.python_version(),
    }
