"""Builds hesslab's one extension, ``hesslab._C`` (everything else is in pyproject.toml).

``HESSLAB_CUDA`` picks the backends:

* ``auto`` (default): CPU kernels always; CUDA kernels too when torch is a CUDA build and
  nvcc is found (CUDA_HOME, then /usr/local/cuda). No visible GPU is needed.
* ``1``: CUDA kernels required; fails with the fix spelled out if they cannot be built.
* ``0``: CPU kernels only.

With no GPU visible and no ``TORCH_CUDA_ARCH_LIST``, the CUDA kernels are built for
8.0, 9.0 and 9.0+PTX (A100, H100/H200, and JIT for newer parts). ``HESSLAB_DEBUG=1``
builds with -O0 -g (and -lineinfo for CUDA). ``HESSLAB_NATIVE=0`` drops -march=native
(on by default: the package compiles where it runs). The outcome is recorded in
hesslab/_build_config.json, which ``hesslab.build_info()`` reads.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _fail(message: str) -> None:
    sys.exit(f"hesslab build error: {message}")


def _find_cuda_home() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        # /usr/local/bin/nvcc may be a wrapper script: prefer a real toolkit next to it.
        real = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(real, "include", "cuda_runtime.h")):
            return real
    return None


def _nvidia_include_dirs() -> list[str]:
    """Header folders of the `nvidia` pip packages (cuBLAS/cuSPARSE headers torch includes)."""
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _cublas_link_args(cuda_home: str) -> list[str]:
    """Linker flags for cuBLAS (the Kronecker ops' large-layer path): the toolkit's
    lib64/libcublas.so, else the `nvidia` pip package torch itself loads (libcublas.so.N,
    linked by its soname, with an rpath to its folder)."""
    for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")):
        if os.path.exists(os.path.join(d, "libcublas.so")):
            return [f"-L{d}", "-lcublas"]
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        nvidia = None
    for base in (nvidia.__path__ if nvidia is not None else []):
        for lib in sorted(glob.glob(os.path.join(base, "*", "lib", "libcublas.so*"))):
            d = os.path.dirname(lib)
            return [f"-L{d}", f"-l:{os.path.basename(lib)}", f"-Wl,-rpath,{d}"]
    _fail(f"cuBLAS was not found (no libcublas.so under {cuda_home}/lib64, nor in the nvidia pip "
          "packages): install the CUDA toolkit's cuBLAS, or build CPU-only with HESSLAB_CUDA=0.")
    return []


def _want_cuda(torch) -> bool:
    mode = os.environ.get("HESSLAB_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        _fail(f"HESSLAB_CUDA must be auto, 1 or 0, got {mode!r}.")
    if mode == "0":
        return False
    cuda_home = _find_cuda_home()
    problems = []
    if torch.version.cuda is None:
        problems.append(
            f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch "
            "(e.g. pip install torch --index-url https://download.pytorch.org/whl/cu130)"
        )
    if cuda_home is None:
        problems.append(
            "nvcc was not found: install the CUDA toolkit and set CUDA_HOME=/path/to/cuda "
            "(the folder holding bin/nvcc)"
        )
    if problems:
        if mode == "1":
            _fail("HESSLAB_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems)
                  + ". Or build CPU-only with HESSLAB_CUDA=0.")
        print("hesslab: building CPU kernels only (" + "; ".join(problems) + ")", file=sys.stderr)
        return False
    os.environ["CUDA_HOME"] = cuda_home
    return True


def _sources(*patterns: str) -> list[str]:
    """Globbed sources, relative to the project root (setuptools rejects absolute paths)."""
    found = sorted(p for pat in patterns for p in glob.glob(os.path.join(CSRC, pat)))
    return [os.path.relpath(p, ROOT) for p in found]


def _extension():
    import torch
    want_cuda = _want_cuda(torch)
    # Import after CUDA_HOME is settled: cpp_extension reads it at import time.
    from torch.utils import cpp_extension

    if want_cuda:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    debug = os.environ.get("HESSLAB_DEBUG", "0") == "1"
    sources = _sources("*.cpp", "cpu/*.cpp")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp"]  # torch adds the -std it needs (C++20 for torch 2.14)
    if os.environ.get("HESSLAB_NATIVE", "1") == "1":
        # The CPU kernels convert float32 to float64 and accumulate; without AVX2/FMA they
        # are compute-bound at 2-5 GB/s. pip builds on the machine that runs the code;
        # set HESSLAB_NATIVE=0 to build a binary for another machine.
        cxx += ["-march=native"]
    include_dirs = [CSRC]
    define_macros = []
    archs = None
    if want_cuda:
        sources += _sources("cuda/*.cu", "cuda/*.cpp")
        # Last in the search path, so the toolkit's own headers win where both have one.
        for d in _nvidia_include_dirs():
            cxx += ["-idirafter", d]
        define_macros.append(("HESSLAB_WITH_CUDA", "1"))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "visible GPUs"
        nvcc = ["-O0", "-g", "-lineinfo"] if debug else ["-O3"]  # no fast-math: keep IEEE division and sqrt
        ext = cpp_extension.CUDAExtension(
            "hesslab._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"] + _cublas_link_args(os.environ["CUDA_HOME"]),
        )
    else:
        ext = cpp_extension.CppExtension(
            "hesslab._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    config = {
        "cpu": True,
        "cuda": want_cuda,
        "cuda_archs": archs,
        "cuda_version": torch.version.cuda if want_cuda else None,
        "cuda_home": os.environ.get("CUDA_HOME") if want_cuda else None,
        "torch_version": torch.__version__,
        "debug": debug,
        "native": os.environ.get("HESSLAB_NATIVE", "1") == "1",
    }
    with open(os.path.join(ROOT, "hesslab", "_build_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return ext, cpp_extension.BuildExtension


ext, build_ext = _extension()
setup(ext_modules=[ext], cmdclass={"build_ext": build_ext.with_options(use_ninja=True)})
