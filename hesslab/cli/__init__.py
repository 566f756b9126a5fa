"""The ``hesslab`` command: ``info``, ``demo``, ``analyze``, ``bench``.

Exit codes: 0 success, 2 bad arguments (argparse), 3 an input error (the message names the
option: a factory that cannot be imported, a checkpoint that does not match the model,
data the model cannot run on, an unknown measure or loss, an ``--out`` that is a file or
cannot be written, a negative ``--threads``), 1 anything else (including a
measure that failed during the run; everything else is still written).

With ``--json`` the results go to stdout as one JSON object and every log line, progress
bar and warning to stderr, so ``hesslab demo --json | jq .models.mlp.lambda_1`` works.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import HesslabError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INPUT_ERROR = 3

LOSSES = ("cross_entropy", "mse")


# ======================================================================================
# info, bench
# ======================================================================================


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


# ======================================================================================
# shared output
# ======================================================================================


def _finish(summary: dict[str, Any], args: argparse.Namespace, what: str) -> int:
    """Print the results (table or JSON), the problems on stderr; the exit code."""
    from .report import format_table, jsonable

    out = Path(args.out)
    if args.json:
        print(json.dumps(jsonable(summary), indent=1, allow_nan=False))
    else:
        table = summary.get("table") or {}
        if table:
            print(format_table(table["headers"], table["rows"]))
        extra = _extra_lines(summary)
        if extra:
            print()
            print("\n".join(extra))
        print()
        secs = (summary.get("seconds") or {}).get("total")
        print(f"{what} finished in {secs:.1f} s. Report: {out / 'report.html'}  Results: {out / 'summary.json'}")
    for key, reason in (summary.get("unavailable") or {}).items():
        print(f"hesslab: {key}: not available: {reason}", file=sys.stderr)
    if summary.get("errors"):
        for key, errs in summary["errors"].items():
            print(f"hesslab: error in {key}: {errs}", file=sys.stderr)
        print(f"hesslab: some measures failed; the others were written to {out}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _extra_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for label, info in (summary.get("kfac") or {}).items():
        if label == "seeds":
            lines.append("Two MLPs trained from different seeds, overlap of top-k eigenspaces:")
            lines += [f"  {name}: {v['overlap']:.2f} at k = {v['k']} (random {v['random']:.3f})"
                      for name, v in info.items()]
            continue
        parts = [f"{layer}: {v.get('overlap_kc', float('nan')):.2f}" for layer, v in (info.get("layers") or {}).items()
                 if v.get("overlap_kc") is not None]
        if parts:
            lines.append(f"{label}: overlap of top-10 eigenspaces, E[M]⊗E[xxᵀ] vs exact layer block: {', '.join(parts)}")
    rank = summary.get("rank") or {}
    if rank.get("sweep"):
        sweep = rank["sweep"]
        n_ok = sum(r["ranks"][p] == r["predicted"][p] for r in sweep for p in r["ranks"])
        lines.append(f"Deep linear networks: {n_ok} of {3 * len(sweep)} measured ranks (H_L, H_O, H_F over "
                     f"{len(sweep)} widths) equal Singh et al.'s formulas")
    for label, t in (summary.get("tracking") or {}).items():
        if t.get("outliers"):
            lines.append(f"{label}: outliers per epoch {t['outliers']}")
    return lines


# ======================================================================================
# demo
# ======================================================================================


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(args.out, quick=args.quick, seed=args.seed, progress=None, verbose=not args.quiet,
                       threads=args.threads or None)
    return _finish(summary, args, "hesslab demo")


# ======================================================================================
# analyze: loading the user's objects
# ======================================================================================


def _import_object(spec: str, option: str) -> Any:
    """``pkg.module:name`` (or ``path/to/file.py:name``) -> the object; errors name the option."""
    if not isinstance(spec, str) or ":" not in spec:
        raise HesslabError(f"{option}: expected 'pkg.module:name' or 'path/to/file.py:name', got {spec!r}")
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise HesslabError(f"{option}: expected 'pkg.module:name' or 'path/to/file.py:name', got {spec!r}")
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise HesslabError(f"{option}: no such file {module_name!r} (from {spec!r})")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except HesslabError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's input
        raise HesslabError(f"{option}: cannot import module {module_name!r} from {spec!r}: "
                           f"{type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise HesslabError(f"{option}: module {module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


def _load_model(spec: str) -> Any:
    from torch import nn

    obj = _import_object(spec, "--model")
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise HesslabError(f"--model: {spec!r} is neither a torch.nn.Module nor a factory returning one "
                           f"(got {type(obj).__name__})")
    try:
        model = obj()
    except Exception as exc:  # noqa: BLE001
        raise HesslabError(f"--model: calling the factory {spec!r}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise HesslabError(f"--model: the factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_checkpoint(model: Any, path: str) -> None:
    import torch

    p = Path(path)
    if not p.is_file():
        raise HesslabError(f"--checkpoint: no such file {path!r}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise HesslabError(f"--checkpoint: cannot read {path!r} with torch.load(weights_only=True): "
                           f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HesslabError(f"--checkpoint: {path!r} holds no state_dict (a dict of tensors, as saved by "
                           "torch.save(model.state_dict(), path)), nor one under 'state_dict' or 'model_state_dict'")
    own = set(model.state_dict())
    if own and not (own & set(state)) and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel/DDP
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).strip().replace("\n\t", " ").replace("\n", " ")
        raise HesslabError(f"--checkpoint: {path!r} does not match the model from --model: {msg[:900]}") from exc


def _load_loss(spec: str) -> tuple[Any, str]:
    from torch import nn

    if spec == "cross_entropy":
        return nn.CrossEntropyLoss(), "cross_entropy"
    if spec == "mse":
        return nn.MSELoss(), "mse"
    if ":" not in spec:
        raise HesslabError(f"--loss: unknown loss {spec!r}; expected one of {', '.join(LOSSES)} or 'pkg.module:fn' "
                           "(a callable loss_fn(output, targets) returning the batch-mean loss)")
    obj = _import_object(spec, "--loss")
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001
            raise HesslabError(f"--loss: cannot instantiate {spec!r}(): {type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise HesslabError(f"--loss: {spec!r} is not callable (got {type(obj).__name__}); pass a function "
                           "loss_fn(output, targets) -> scalar mean loss")
    return obj, spec


def _move(x: Any, device: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_move(v, device) for v in x)
    return x


def _load_data(spec: str, device: Any, max_batches: int | None) -> tuple[Any, int]:
    """The batches from the loader factory, moved to ``device``: (data, number of batches)."""
    from torch import Tensor

    from .linops import is_single_batch

    obj = _import_object(spec, "--data")
    if callable(obj) and not hasattr(obj, "__iter__"):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001
            raise HesslabError(f"--data: calling the loader factory {spec!r}() failed: "
                               f"{type(exc).__name__}: {exc}") from exc
    if is_single_batch(obj):
        return _move(tuple(obj), device), 1
    if isinstance(obj, (Tensor, str, bytes, dict)) or not hasattr(obj, "__iter__"):
        raise HesslabError(f"--data: {spec!r} gave {type(obj).__name__}; expected a DataLoader, a list of "
                           "(inputs, targets) batches or one (inputs, targets) pair")
    batches = []
    try:
        for i, batch in enumerate(obj):
            if max_batches is not None and i >= max_batches:
                break
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise HesslabError(f"--data: batch {i} from {spec!r} is a {type(batch).__name__}"
                                   f"{' of length ' + str(len(batch)) if hasattr(batch, '__len__') else ''}; "
                                   "expected an (inputs, targets) pair")
            batches.append(_move(tuple(batch), device))
    except HesslabError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise HesslabError(f"--data: iterating over {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not batches:
        raise HesslabError(f"--data: {spec!r} yielded no batch")
    return (batches[0] if len(batches) == 1 else batches), len(batches)


def _describe(x: Any) -> str:
    import torch

    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in x) + ")"
    return type(x).__name__


def _check_first_batch(model: Any, loss_fn: Any, data: Any) -> int:
    """Run the model and the loss on the first batch; errors name --data or --loss.

    Returns the size of the model's last output dimension (the number of classes)."""
    import torch

    from .linops import call_model, is_single_batch

    inputs, targets = data if is_single_batch(data) else data[0]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                output = call_model(model, inputs)
            except Exception as exc:  # noqa: BLE001
                msg = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
                raise HesslabError(f"--data: the model from --model fails on the first batch (inputs "
                                   f"{_describe(inputs)}): {type(exc).__name__}: {msg}. Check that the loader "
                                   "yields inputs of the shape and dtype the model expects.") from exc
            try:
                loss = loss_fn(output, targets)
            except Exception as exc:  # noqa: BLE001
                msg = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
                raise HesslabError(f"--loss: the loss fails on the model's output {_describe(output)} and the "
                                   f"targets {_describe(targets)} of the first batch from --data: "
                                   f"{type(exc).__name__}: {msg}") from exc
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise HesslabError(f"--loss: must return a scalar tensor (the batch-mean loss), got "
                                   f"{_describe(loss)}")
    finally:
        model.train(training)
    return int(output.shape[-1]) if isinstance(output, torch.Tensor) and output.dim() >= 1 else 0


def _parse_measures(text: str) -> list[str]:
    from .demo import ANALYZE_MEASURES

    items = [m.strip() for m in text.split(",") if m.strip()]
    if items == ["all"]:
        return list(ANALYZE_MEASURES)
    unknown = [m for m in items if m not in ANALYZE_MEASURES]
    if unknown or not items:
        raise HesslabError(f"--measures: unknown measure(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                           f"choose a comma-separated subset of {','.join(ANALYZE_MEASURES)} (or 'all')")
    return list(dict.fromkeys(items))


def _parse_device(text: str) -> Any:
    import torch

    try:
        device = torch.device(text)
    except Exception as exc:  # noqa: BLE001
        raise HesslabError(f"--device: not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HesslabError(f"--device: {text!r} asked for, but CUDA is not available (torch "
                               f"{torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HesslabError(f"--device: {text!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise HesslabError(f"--device: {text!r} is not supported; use cpu or cuda[:index]")
    return device


def _cmd_analyze(args: argparse.Namespace) -> int:
    import torch

    from .demo import Budget, run_analysis

    measures = _parse_measures(args.measures)
    device = _parse_device(args.device)
    loss_fn, loss_name = _load_loss(args.loss)
    if "kfac" in measures and loss_name not in LOSSES and not isinstance(
            loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.MSELoss)):
        raise HesslabError("--measures: kfac needs --loss cross_entropy or mse (the Kronecker factors propagate the "
                           "Hessian of a known loss); drop kfac from --measures or use a built-in loss")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = _load_model(args.model)
    if args.checkpoint:
        _load_checkpoint(model, args.checkpoint)
    model = model.to(device)
    data, num_batches = _load_data(args.data, device, args.max_batches)
    num_classes = _check_first_batch(model, loss_fn, data)
    if not any(p.requires_grad for p in model.parameters()):
        raise HesslabError("--model: the model has no parameter with requires_grad=True; nothing to analyse")
    budget = Budget(slq_steps=args.slq_steps, slq_probes=args.slq_probes, trace_matvecs=args.trace_matvecs,
                    layer_k=args.k, slq_reorthogonalize=args.slq_reorthogonalize)
    source = {"model": args.model, "checkpoint": args.checkpoint or "", "data": args.data, "loss": args.loss,
              "device": str(device), "batches": num_batches, "outputs": num_classes}
    summary = run_analysis(model, loss_fn, data, measures=measures, out=args.out, k=args.k, seed=args.seed,
                           label=args.label, loss_name=loss_name, source=source, verbose=not args.quiet,
                           budget=budget)
    return _finish(summary, args, "hesslab analyze")


# ======================================================================================
# main
# ======================================================================================


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_out(text: str) -> None:
    """``--out`` must be a folder that exists or can be created, and be writable, before
    any work starts (the run writes everything there)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise HesslabError(f"--out: {text!r} is a file, not a folder; give a folder (created when missing)")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise HesslabError(f"--out: {text!r} cannot be created: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HesslabError(f"--out: {text!r} is not writable here (no write permission in {str(existing)!r}); "
                           "give a folder you can write to")


def _check_common(args: argparse.Namespace) -> None:
    """The options several commands share (``--out``, ``--threads``), checked before any work."""
    if getattr(args, "threads", None) is not None and args.threads < 0:
        raise HesslabError(f"--threads: expected 0 (torch's default) or a positive number of threads, "
                           f"got {args.threads}")
    if getattr(args, "out", None) is not None:
        _check_out(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hesslab", description="Hessian spectra of PyTorch models.",
        epilog="Exit codes: 0 ok, 1 failure, 2 bad arguments, 3 bad input (the message names the option).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,demo,analyze,bench}")
    p = sub.add_parser("info", help="build (CPU/CUDA kernels, architectures), devices and versions")
    p.add_argument("--json", action="store_true", help="print the build info as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "demo", help="train small networks on the bundled digits data and reproduce the four papers' measurements",
        description=("Trains an MLP and a small CNN on scikit-learn's digits (no download), each with and without "
                     "BatchNorm, keeping checkpoints, and measures top eigenvalues with residuals, the SLQ density, "
                     "the trace, power-law fits, Kronecker factors against exact layer Hessians, ranks of deep "
                     "linear networks against the formulas, gradient concentration and outliers, and the spectrum "
                     "through training. Writes results (JSON, NPZ), report.html and summary.json."))
    p.add_argument("--out", default="hesslab-demo", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smaller sizes: under a minute on 2 CPU cores")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, initialisation and probes (default 0)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (logs go to stderr)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads (default 1: fastest for these tiny models; 0 keeps torch's default)")
    p.add_argument("--quiet", action="store_true", help="no log lines on stderr")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "analyze", help="the same analyses on your model: --model pkg.module:factory --data pkg.module:loader",
        description=("Loads a model from a factory (pkg.module:name or path/to/file.py:name: an nn.Module or a "
                     "callable returning one), optionally a state_dict checkpoint, and data from a loader factory "
                     "(a callable returning a DataLoader, a list of (inputs, targets) batches or one such pair), "
                     "then measures the Hessian of the mean loss over all batches."))
    p.add_argument("--model", required=True, metavar="MOD:FACTORY", help="model factory, e.g. mypkg.models:make_net")
    p.add_argument("--checkpoint", metavar="FILE", help="state_dict to load (torch.save(model.state_dict(), FILE))")
    p.add_argument("--data", required=True, metavar="MOD:LOADER", help="loader factory, e.g. mypkg.data:val_loader")
    p.add_argument("--loss", default="cross_entropy", metavar="LOSS",
                   help="cross_entropy, mse or pkg.module:fn (fn(output, targets) -> mean loss); default %(default)s")
    p.add_argument("--measures", default="top_k,density,trace,power_law,concentration,kfac",
                   help="comma-separated subset of top_k,density,trace,power_law,concentration,kfac (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default: cpu)")
    p.add_argument("--out", default="hesslab-analysis", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--k", type=_positive_int, default=10, help="top eigenpairs (Lanczos, concentration, "
                   "per-layer Kronecker comparison); default 10")
    p.add_argument("--seed", type=int, default=0, help="seed of every random vector (default 0)")
    p.add_argument("--max-batches", type=_positive_int, default=None, metavar="N",
                   help="use only the first N batches of the loader (default: all; they are held in memory)")
    p.add_argument("--slq-steps", type=_positive_int, default=80, help="Lanczos steps per SLQ probe (default 80)")
    p.add_argument("--slq-probes", type=_positive_int, default=8, help="SLQ probes (default 8)")
    p.add_argument("--slq-reorthogonalize", choices=("full", "local"), default="full",
                   help="full: keep every probe's basis (default); local: keep 3 vectors per probe, for large "
                        "models (same density, see hesslab.spectral_density)")
    p.add_argument("--trace-matvecs", type=_positive_int, default=99, help="Hutch++ products (default 99)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="torch threads (default: torch's own)")
    p.add_argument("--label", default="model", help="name of the model in files and the report (default: model)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (logs go to stderr)")
    p.add_argument("--quiet", action="store_true", help="no log lines on stderr")
    p.set_defaults(func=_cmd_analyze)

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
        _check_common(args)
        return args.func(args)
    except HesslabError as exc:
        print(f"hesslab: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("hesslab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
