"""The ``hesslab`` command: ``info``, ``demo``, ``bench``.

Exit codes: 0 success, 2 bad arguments (argparse), 3 a hesslab error in the input, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .errors import HesslabError

EXIT_INPUT_ERROR = 3


def _cmd_info(args: argparse.Namespace) -> int:
    from ._build import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    build = info["build"] or {}
    print(f"hesslab {info['hesslab']}  (torch {info['torch']}, python {info['python']})")
    if not info["extension"]:
        print(f"  compiled extension: NOT LOADED ({info['extension_error']}); using pure-torch twins")
    print(f"  CPU kernels : {', '.join(info['cpu_kernels']) or 'none'}")
    if info["cuda_kernels"]:
        print(f"  CUDA kernels: {', '.join(info['cuda_kernels'])}")
        print(f"                built with CUDA {build.get('cuda_version')} for {build.get('cuda_archs')}")
    else:
        print("  CUDA kernels: none (build with HESSLAB_CUDA=1 and a CUDA build of torch)")
    print(f"  torch CUDA  : {info['torch_cuda']}, available: {info['cuda_available']}")
    for d in info["devices"]:
        print(f"  device      : {d}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    scripts = sorted(bench_dir.glob("bench_*.py"))
    if not scripts:
        raise HesslabError(f"no benchmarks found in {bench_dir}: `hesslab bench` runs from a source checkout")
    status = 0
    for script in scripts:
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        print("$ " + " ".join(cmd), flush=True)
        status = max(status, subprocess.call(cmd))
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hesslab", description="Hessian spectra of PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="build (CPU/CUDA kernels, architectures), devices and versions")
    p.add_argument("--json", action="store_true", help="print the build info as JSON")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("bench", help="run the benchmarks in benchmarks/ (source checkout)")
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds each")
    p.set_defaults(func=_cmd_bench)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HesslabError as exc:
        print(f"hesslab: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR


if __name__ == "__main__":
    sys.exit(main())
