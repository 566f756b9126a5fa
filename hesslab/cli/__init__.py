"""The ``hesslab`` command: ``info``, ``demo``, ``analyze``, ``bench``.

Exit codes: 0 success, 2 bad arguments (argparse), 3 an input error (the message names the
option: a factory that cannot be imported, a checkpoint that does not match the model,
data the model cannot run on, an unknown measure, loss, ``--params`` or ``--kfac-layers``
entry, an ``--out`` that is a file or cannot be written, a negative ``--threads``), 1 a
measure that was asked for failed during the run (everything else is still written; a
failure of a part only needed by a requested measure is printed as a note and exits 0),
130 interrupted (what was finished is in the output folder).

With ``--json`` the results go to stdout as one JSON object and every log line, progress
bar and warning to stderr, so ``hesslab demo --json | jq .models.mlp.lambda_1`` works.

Modules: ``_common`` (``--out``, ``--threads``), ``_load`` (the user's model, checkpoint,
loss and data), ``_analyze`` (``analyze``'s options and run), ``_output`` (the table or
JSON at the end, and the exit code).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from hesslab.errors import HesslabError

from ._analyze import add_analyze_parser, cmd_analyze
from ._common import add_threads_option, check_common, choose_threads
from ._distributed import is_rank_zero
from ._output import EXIT_FAILURE, EXIT_INPUT_ERROR, EXIT_OK, finish

__all__ = ["main", "build_parser", "cmd_analyze", "EXIT_OK", "EXIT_FAILURE", "EXIT_INPUT_ERROR"]


# ======================================================================================
# info, bench, demo
# ======================================================================================


def _cmd_info(args: argparse.Namespace) -> int:
    from hesslab._build import build_info

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


def bench_scripts() -> list[Path]:
    """The benchmark scripts of the source checkout this package runs from (benchmarks/bench_*.py)."""
    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"  # hesslab/cli/ -> the checkout
    scripts = sorted(bench_dir.glob("bench_*.py"))
    if not scripts:
        raise HesslabError(f"no benchmarks found in {bench_dir}: `hesslab bench` runs from a source checkout")
    return scripts


def _cmd_bench(args: argparse.Namespace) -> int:
    scripts = bench_scripts()
    status, took = 0, []
    for script in scripts:
        # Full mode keeps 3 timed repeats so that the whole suite fits ~20 minutes on 2 cores.
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else ["--repeats", "3"])
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        status = max(status, subprocess.call(cmd))
        took.append(f"{script.stem} {(time.perf_counter() - t0) / 60:.1f} min")
    print("hesslab bench: " + ", ".join(took), flush=True)
    return status


def _cmd_demo(args: argparse.Namespace) -> int:
    from hesslab import zoo
    from hesslab.demo import run_demo

    largest = max(sum(p.numel() for p in f().parameters()) for f in (zoo.digits_mlp, zoo.digits_cnn))
    summary = run_demo(args.out, quick=args.quick, seed=args.seed, progress=None, verbose=not args.quiet,
                       threads=choose_threads(args.threads, largest))
    return finish(summary, args, "hesslab demo")


# ======================================================================================
# main
# ======================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hesslab", description="Hessian spectra of PyTorch models.",
        epilog="Exit codes: 0 ok, 1 failure, 2 bad arguments, 3 bad input (the message names the option).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,demo,analyze,bench}")
    p = sub.add_parser("info", help="build (CPU/CUDA kernels, architectures), devices and versions")
    p.add_argument("--json", action="store_true", help="print the build info as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "demo", help="train small networks on the bundled digits data and reproduce the five papers' measurements",
        description=("Trains an MLP and a small CNN on scikit-learn's digits (no download), each with and without "
                     "BatchNorm, keeping checkpoints, and measures top eigenvalues with residuals, the SLQ density, "
                     "the trace, power-law fits, Kronecker factors against exact layer Hessians, ranks of deep "
                     "linear networks against the formulas, gradient concentration and outliers, and the spectrum "
                     "through training, and per-block spectra of a tiny transformer on the digits' rows. Writes results "
                     "(JSON, NPZ), report.html and summary.json."))
    p.add_argument("--out", default="hesslab-demo", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smaller sizes: under a minute on 2 CPU cores")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, initialisation and probes (default 0)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (logs go to stderr)")
    add_threads_option(p)
    p.add_argument("--quiet", action="store_true", help="no log lines on stderr")
    p.set_defaults(func=_cmd_demo)

    add_analyze_parser(sub)

    p = sub.add_parser("bench", help="run the benchmarks in benchmarks/ (source checkout)")
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds each")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on bad arguments, 0 for --help
        return int(exc.code) if isinstance(exc.code, int) else 2
    if getattr(args, "label", None) is not None and not all(c.isalnum() or c in "_-." for c in args.label):
        print("hesslab: error: --label: use letters, digits, '_', '-', '.'", file=sys.stderr)
        return EXIT_INPUT_ERROR
    try:
        check_common(args)
        return args.func(args)
    except HesslabError as exc:
        message = str(exc)
        if args.command == "analyze":
            from ._analyze import make_translator

            message = make_translator(args)("", message)
        if is_rank_zero():  # under torchrun every rank has the same error; rank 0 says it
            print(f"hesslab: error: {message}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        print("hesslab: interrupted" + (f"; what was finished is in {out}" if out else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
