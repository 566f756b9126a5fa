"""``hesslab analyze``: its options, their checks (before any work) and the run; every
message names the CLI's options, not the Python arguments behind them."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from hesslab.errors import HesslabError

from ._common import add_threads_option, choose_threads, positive_int
from ._load import LOSSES, MODEL_LOSS, check_first_batch, default_loss, load_checkpoint, load_data, load_loss, load_model
from ._distributed import (DEFAULT_DIST_TIMEOUT, SHARD_MODES, Launch, agree, agree_status, cast_data,
                           share_batches, shard_model, start, usable_measures)
from ._output import exit_status, finish

__all__ = ["add_analyze_parser", "cmd_analyze", "parse_measures", "make_translator", "DEFAULT_MAX_BATCHES",
           "DEFAULT_KFAC_STEPS", "MAX_KFAC_K"]

#: Batches taken from the loader by default (they are held in memory).
DEFAULT_MAX_BATCHES = 8
#: Lanczos steps on each exact layer block of the Kronecker comparison, by default.
DEFAULT_KFAC_STEPS = 150
#: The most top eigenpairs compared per layer (``--k`` beyond it is cut there).
MAX_KFAC_K = 20

#: Python argument names in operator and solver messages -> the options of this command.
_RENAMES = (
    (r"run hl\.spectral_density with more num_steps or lower window", "run with a larger --slq-steps"),
    (r"window \+ 2 = ", ""),
    (r"^density_or_eigenvalues: ", ""),
    (r"reorthogonalize='local'", "--slq-reorthogonalize local"),
    (r"\bnum_steps\b", "--slq-steps"),
    (r"\bnum_probes\b", "--slq-probes"),
    (r"\bnum_matvecs\b", "--trace-matvecs"),
    (r"\btrain_mode=True\b", "--train-mode"),
    (r"pass dtype= ", "pass --dtype "),
    (r"pass params= ", "pass --params "),
    (r"^params:", "--params:"),
    (r"^dtype:", "--dtype:"),
    (r"^kfac_layers:", "--kfac-layers:"),
)


def make_translator(args: argparse.Namespace) -> Callable[[str, str], str]:
    """``translate(part, message)``: a solver's or operator's message in this command's words."""

    def translate(part: str, message: str) -> str:
        if "Krylov basis needs" in message and "Options:" in message:
            head = message[:message.index("Options:")]
            if part.startswith("density") or part.startswith("outliers"):
                return head + (f"Options: fewer --slq-steps (now {args.slq_steps}), fewer --slq-probes (now "
                               f"{args.slq_probes}), or --slq-reorthogonalize local (3 vectors per probe instead "
                               "of one per step; the same density).")
            if part in ("top_k", "power_law", "concentration"):
                return head + (f"Options: a smaller --k (now {args.k}; the Lanczos basis holds up to max(300, "
                               "40 k) vectors), or leave top_k, power_law and concentration out of --measures.")
            return head + (f"Options: fewer or smaller layers in --kfac-layers, fewer --kfac-steps (now "
                           f"{args.kfac_steps}), or leave kfac out of --measures.")
        for pattern, replacement in _RENAMES:
            message = re.sub(pattern, replacement, message)
        return message

    return translate


def parse_measures(text: str) -> list[str]:
    from hesslab.demo import ANALYZE_MEASURES

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


def _parse_blocks(model: Any, specs: list[str] | None, label: str) -> dict[str, list[str]] | None:
    """``--params`` (repeatable; each a comma-separated list of names, modules or globs) ->
    ``{block label: items}``, each checked against the model; None without ``--params``."""
    from hesslab.linops import select_parameters

    if not specs:
        return None
    blocks: dict[str, list[str]] = {}
    for spec in specs:
        items = [s.strip() for s in spec.split(",") if s.strip()]
        if not items:
            raise HesslabError(f"--params: {spec!r} names no parameter")
        try:
            select_parameters(model, items)
        except HesslabError as exc:
            why = re.sub(r"^params:\s*", "", str(exc))
            raise HesslabError(f"--params {spec!r}: {why}") from exc
        name = f"{label}." + (re.sub(r"[^A-Za-z0-9_.-]+", "_", "+".join(items)).strip("_.") or "block")
        while name in blocks:
            name += "_"
        blocks[name] = items
    return blocks


def _kfac_layers(model: Any, text: str) -> Any:
    """``--kfac-layers``: None (the largest and the last), "all" or names/globs, checked
    against the model's Kronecker layers (Linear, Conv2d, transformers' Conv1D)."""
    from hesslab.demo import choose_layers
    from hesslab.linops.kfac import kronecker_layer_sizes

    if text == "auto":
        return None
    spec: Any = "all" if text == "all" else [s.strip() for s in text.split(",") if s.strip()]
    choose_layers(kronecker_layer_sizes(model), spec)  # raises on a name that matches no layer
    return spec


def _data_note(used: dict[str, Any], max_batches: int) -> str:
    if used["truncated"]:
        total = f" of {used['batches_in_loader']}" if used.get("batches_in_loader") else ""
        return (f"the first {used['batches']} batches{total} in the loader ({used['samples']} samples; "
                f"--max-batches {max_batches}); the rest was not used")
    return f"all {used['batches']} batch(es) of the loader ({used['samples']} samples)"


def _check_kfac_loss(measures: list[str], loss_fn: Any, loss_name: str | None) -> None:
    from torch import nn

    if "kfac" in measures and loss_name is not None and loss_name not in (*LOSSES, MODEL_LOSS) and not isinstance(
            loss_fn, (nn.CrossEntropyLoss, nn.MSELoss)):
        raise HesslabError("--measures: kfac needs --loss cross_entropy, mse or model (the Kronecker factors "
                           "propagate the Hessian of a known loss); drop kfac from --measures or use one of those")


@dataclasses.dataclass
class _Inputs:
    """What every rank loaded: the (unwrapped) model, loss, this rank's data and the notes."""

    model: Any
    loss_fn: Any
    loss_name: str | None
    data: Any
    blocks: dict[str, list[str]] | None
    kfac_layers: Any
    measures: list[str]
    options: dict[str, Any]
    source: dict[str, Any]


def _load_inputs(args: argparse.Namespace, measures: list[str], launch: Launch) -> _Inputs:
    """Model, checkpoint, loss and data, checked on the first batch (no collective)."""
    import torch

    loss_fn, loss_name = load_loss(args.loss) if args.loss else (None, None)
    _check_kfac_loss(measures, loss_fn, loss_name)
    torch.manual_seed(args.seed)  # the same model on every rank
    model = load_model(args.model)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not num_params:
        raise HesslabError("--model: the model has no parameter with requires_grad=True; nothing to analyse")
    blocks = _parse_blocks(model, args.params, args.label)
    kfac_layers = _kfac_layers(model, args.kfac_layers) if "kfac" in measures else None
    threads = choose_threads(args.threads, num_params)
    if threads is not None:
        torch.set_num_threads(threads)
    options: dict[str, Any] = {"train_mode": bool(args.train_mode)}
    model = model.to(launch.device)
    data, used = load_data(args.data, launch.device, args.max_batches)
    if args.dtype and launch.shard == "fsdp":  # the sharded operator runs in the parameters' dtype
        model = model.to(getattr(torch, args.dtype))
        data = cast_data(data, getattr(torch, args.dtype))
    elif args.dtype:
        options["dtype"] = getattr(torch, args.dtype)
    if loss_name is None:  # no --loss: the model's own for dict batches with labels
        loss_fn, loss_name = load_loss(default_loss(data))
        _check_kfac_loss(measures, loss_fn, loss_name)
    num_classes = check_first_batch(model, loss_fn, data)
    local = share_batches(data, used, launch, args.max_batches)
    note = _data_note(used, args.max_batches)
    if launch.distributed:
        note += (f", split over {launch.world} ranks (batch i on rank i % {launch.world}; --shard "
                 f"{launch.shard})")
    source = {"model": args.model, "checkpoint": args.checkpoint or "", "data": args.data, "loss": loss_name,
              "device": str(launch.device), "batches": used["batches"], "samples": used["samples"],
              "data_used": note, "outputs": num_classes, "mode": "train" if args.train_mode else "eval",
              "dtype": args.dtype or "the model's", "world_size": launch.world, "shard": launch.shard}
    return _Inputs(model, loss_fn, loss_name, local, blocks, kfac_layers, measures, options, source)


def cmd_analyze(args: argparse.Namespace) -> int:
    measures = parse_measures(args.measures)
    launch = start(args, _parse_device(args.device))
    try:
        return _run(args, measures, launch)
    finally:
        launch.close()


def _run(args: argparse.Namespace, measures: list[str], launch: Launch) -> int:
    """Load on every rank (failures reach every rank), shard, measure; rank 0 writes and prints."""
    from hesslab.demo import Budget, run_analysis

    speaks = launch.rank == 0 and not args.quiet

    def prepare() -> _Inputs:
        usable = usable_measures(measures, args.measures.strip() != "all",
                                 launch, lambda line: print(line, file=sys.stderr) if speaks else None)
        return _load_inputs(args, usable, launch)

    inputs = agree(launch, prepare)
    model = shard_model(inputs.model, launch)
    budget = Budget(slq_steps=args.slq_steps, slq_probes=args.slq_probes, trace_matvecs=args.trace_matvecs,
                    layer_k=min(args.k, MAX_KFAC_K), layer_max_steps=args.kfac_steps,
                    slq_reorthogonalize=args.slq_reorthogonalize, blocks_steps=args.blocks_steps,
                    blocks_probes=args.blocks_probes)
    with contextlib.ExitStack() as stack:  # ranks other than 0 write to a folder thrown away
        out = args.out if launch.rank == 0 else stack.enter_context(tempfile.TemporaryDirectory())
        summary = run_analysis(model, inputs.loss_fn, inputs.data, measures=inputs.measures, out=out, k=args.k,
                               seed=args.seed, label=args.label, loss_name=inputs.loss_name, source=inputs.source,
                               verbose=speaks, progress=None if launch.rank == 0 else False, budget=budget,
                               blocks=inputs.blocks, hessian_options=inputs.options,
                               kfac_layers=inputs.kfac_layers, translate=make_translator(args))
    status = finish(summary, args, "hesslab analyze") if launch.rank == 0 else exit_status(summary)
    return agree_status(launch, status)


def add_analyze_parser(sub: Any) -> None:
    from hesslab.demo import ANALYZE_MEASURES

    p = sub.add_parser(
        "analyze", help="the same analyses on your model: --model pkg.module:factory --data pkg.module:loader",
        description=("Loads a model from a factory (pkg.module:name or path/to/file.py:name: an nn.Module or a "
                     "callable returning one), optionally a state_dict checkpoint, and data from a loader factory "
                     "(a callable returning a DataLoader, a list of (inputs, targets) batches or of dict batches such as "
                     "{'input_ids': ..., 'labels': ...}, passed as model(**batch), or one such batch), "
                     "then measures the Hessian of the mean loss over the batches used. Each measure says what "
                     "it will cost before it starts; report.html and summary.json are rewritten after each one."))
    p.add_argument("--model", required=True, metavar="MOD:FACTORY", help="model factory, e.g. mypkg.models:make_net")
    p.add_argument("--checkpoint", metavar="FILE", help="state_dict to load (torch.save(model.state_dict(), FILE))")
    p.add_argument("--data", required=True, metavar="MOD:LOADER", help="loader factory, e.g. mypkg.data:val_loader")
    p.add_argument("--loss", default=None, metavar="LOSS",
                   help="cross_entropy, mse, model (the model's own loss: output.loss; a causal LM's token "
                        "cross-entropy) or pkg.module:fn (fn(output, targets) -> mean loss); default: model for "
                        "dict batches with 'labels', cross_entropy otherwise")
    p.add_argument("--measures", default="all",
                   help=f"comma-separated subset of {','.join(ANALYZE_MEASURES)}, or all (default); the ones a "
                        "measure needs run too (power_law, concentration: top_k; outliers: density or top_k); blocks: "
                        "per-block spectra (hesslab.block_spectra: one SLQ density per attention projection, MLP "
                        "layer, embedding, norm; their heterogeneity)")
    p.add_argument("--params", action="append", metavar="NAMES",
                   help="measure the Hessian of these parameters only: comma-separated names, module names or "
                        "globs (e.g. 'layer4.*'); repeat for several blocks, one result set each (default: all); "
                        "the blocks measure keeps the per-block spectra over these parameters")
    p.add_argument("--train-mode", action="store_true",
                   help="evaluate the model in train mode (BatchNorm batch statistics, dropout; checked to be "
                        "deterministic); default: eval mode")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="run the Hessian products in this dtype (default: the model's own)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default: cpu)")
    p.add_argument("--out", default="hesslab-analysis", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--k", type=positive_int, default=10, help="top eigenpairs (Lanczos, concentration, "
                   f"per-layer Kronecker comparison up to {MAX_KFAC_K}); default 10")
    p.add_argument("--seed", type=int, default=0, help="seed of every random vector (default 0)")
    p.add_argument("--max-batches", type=positive_int, default=DEFAULT_MAX_BATCHES, metavar="N",
                   help="use the first N batches of the loader, held in memory (default %(default)s; the report "
                        "says how much data was used)")
    p.add_argument("--slq-steps", type=positive_int, default=80, help="Lanczos steps per SLQ probe (default 80)")
    p.add_argument("--slq-probes", type=positive_int, default=8, help="SLQ probes (default 8)")
    p.add_argument("--slq-reorthogonalize", choices=("full", "local"), default="full",
                   help="full: keep every probe's basis (default); local: keep 3 vectors per probe, for large "
                        "models (same density, see hesslab.spectral_density)")
    p.add_argument("--trace-matvecs", type=positive_int, default=99, help="Hutch++ products (default 99)")
    p.add_argument("--kfac-layers", default="auto", metavar="LAYERS",
                   help="layers whose exact Hessian block kfac compares with the Kronecker factors: comma-separated "
                        "names or globs, 'all', or auto (default: the largest layer and the last one)")
    p.add_argument("--kfac-steps", type=positive_int, default=DEFAULT_KFAC_STEPS,
                   help="at most this many Lanczos steps (products) per exact layer block (default %(default)s)")
    p.add_argument("--blocks-steps", type=positive_int, default=30,
                   help="blocks: Lanczos steps per SLQ probe of each block (capped at its size; default %(default)s)")
    p.add_argument("--blocks-probes", type=positive_int, default=4,
                   help="blocks: SLQ probes per block (default %(default)s)")
    p.add_argument("--shard", choices=SHARD_MODES, default="none",
                   help="under torchrun (several processes): none: every rank holds the model, data parallel "
                        "(default); ddp: the model in DistributedDataParallel; fsdp: FSDP2 fully_shard on every "
                        "direct child module with parameters, then the root, finite-difference products. Measures: "
                        "fsdp top_k, density, trace, power_law, outliers; ddp all but kfac. Batch i of the loader "
                        "goes to rank i %% world; rank 0 writes --out and prints")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_DIST_TIMEOUT, metavar="SECONDS",
                   help="under torchrun: seconds before a collective gives up (default %(default)s)")
    add_threads_option(p)
    p.add_argument("--label", default="model", help="name of the model in files and the report (default: model)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (logs go to stderr)")
    p.add_argument("--quiet", action="store_true", help="no log lines on stderr")
    p.set_defaults(func=cmd_analyze)
