"""hesslab against PyHessian, hessian-eigenthings and curvlinops: same models, same work, one run.

Tools (each through an adapter that uses the tool's own public API and solvers):
  hesslab              hl.Hessian + hl.lanczos / hl.spectral_density / hl.trace
  hesslab-local        the SLQ task again with spectral_density(reorthogonalize="local")
  pyhessian            pyhessian.hessian(...).eigenvalues / .density / .trace
  hessian-eigenthings  HessianOperator + lanczos / spectral_density / trace (the 1.0 rewrite)
  curvlinops           HessianLinearOperator + scipy eigsh / lanczos_approximate_spectrum /
                       hutchinson_trace

Tasks: top-10 eigenvalues; SLQ density, 90 steps x 8 probes; Hutchinson trace, 100 products.
Workloads (hesslab.zoo, scikit-learn's digits, trained a few epochs): an MLP (3,466
parameters, 256 samples) and a small CNN (1,626 parameters, 128 images) in float64,
where the exact Hessian (hl.eigh_exact) is the accuracy reference, and resnet_small
(0.31M parameters, BatchNorm in eval mode, float32, a batch of 16 1x8x8 digits images)
for speed; on a GPU ResNet-18 for 32x32 inputs (about 11M parameters, a fixed-seed random
batch of 128). The 16-image ResNet runs on request (--workloads resnet); by default the
128-image one below replaces it. Sizes are chosen so the first three workloads take about 8 minutes on 2 cores:
the CNN and the ResNet run at the first thread count only unless --cnn-threads /
--resnet-threads say otherwise.

Figures per tool, task and thread count: wall time (median of the timed repeats after a
warm-up, the lower one for an even count, the operator's construction included), Hessian-vector products (counted at each
tool's product entry point), time per product, the tool's own single product time and
the ratio total / (products x that), the time spent inside the products during the run
and the ratio total / that (the solver's overhead on top of its products), accuracy (top-10: max relative error of the 10
eigenvalues; trace: relative error; SLQ: 1-Wasserstein distance between the quadrature
measure and the exact spectrum), peak memory above the process's resident set before the
task (CPU: VmHWM reset through /proc/self/clear_refs, or ru_maxrss deltas in a process
per task where that is not allowed; GPU: torch.cuda.max_memory_allocated), and the time
ratio against hesslab in the same run. Every tool runs in its own subprocess.

Product-dominated workloads (issue 15): cnn512 (a float32 digits CNN, 18,962 parameters,
512 images) and resnet128 (resnet_small on 128 images), one thread, one timed run, each
tool at matched settings and at its own defaults; hesslab's rows carry the ratio against
the fastest equally accurate peer of the same run, and the run ends with the table of
issue 15's targets (_peers_targets.py). Modules: _peers_config (tools, tasks, notes),
_peers_adapters (one adapter per tool), _peers_worker (the subprocess), _peers_targets.

    python benchmarks/bench_peers.py [--quick] [--device cuda] [--threads 1,2]
        [--workloads mlp,cnn,resnet,cnn512,resnet128 | resnet18] [--tools hesslab,pyhessian,...]
        [--settings matched,defaults] [--resnet128-input 1x8x8|3x32x32]
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, environment, parser, table, write_json  # noqa: E402
from _peers_adapters import _flat, can_reset_peak  # noqa: E402
from _peers_config import (  # noqa: E402
    DEFAULTS_DIFFER, DEFAULTS_ONLY, DEFAULTS_WORKLOADS, DISTRIBUTIONS, ERROR_LABEL, LANCZOS_TOL, MODULES, NOTES,
    PRODUCT_WORKLOADS, REFERENCE, SKIPPED, SUPPORT, TASK_LABEL, TASKS, TOOL_TASKS, TOOLS,
)
from _peers_targets import add_ratios, load_compiled, render_targets, targets  # noqa: E402
from _peers_worker import merge_rounds, worker  # noqa: E402

# ----------------------------------------------------------------------------- parent
def tool_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (*DISTRIBUTIONS.values(), *SUPPORT):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def available_tools(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """Tools whose module imports in a fresh interpreter (a broken install is skipped, not fatal)."""
    ok, missing = [], {}
    for tool in wanted:
        mod = MODULES[tool]
        if importlib.util.find_spec(mod) is None:
            missing[tool] = "not installed"
            continue
        r = subprocess.run([sys.executable, "-W", "ignore", "-c", f"import {mod}"], capture_output=True, text=True)
        if r.returncode:
            missing[tool] = "import failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:200]
        else:
            ok.append(tool)
    return ok, missing


def build_workloads(names: list[str], quick: bool, resnet_batch: int, resnet18_batch: int, threads: int,
                    resnet128_input: str = "1x8x8") -> dict:
    """Train the models (seeded) and compute the exact references; everything on the CPU."""
    import hesslab as hl
    from hesslab import zoo

    torch.set_num_threads(threads)
    out = {}
    (Xtr, ytr), _ = zoo.digits()
    (Itr, jtr), _ = zoo.digits(image=True)
    for name in names:
        t0 = time.perf_counter()
        if name == "mlp":
            model = zoo.digits_mlp()
            zoo.train(model, (Xtr, ytr), epochs=10)
            m = 128 if quick else 256
            model, data = model.double(), (Xtr[:m].double(), ytr[:m])
            desc = f"digits_mlp 64-32-32-10, {m} samples, float64"
        elif name == "cnn":
            model = zoo.digits_cnn(channels=(4, 8))  # 1,626 parameters: the exact Hessian stays cheap
            zoo.train(model, (Itr, jtr), epochs=10)
            m = 64 if quick else 128
            model, data = model.double(), (Itr[:m].double(), jtr[:m])
            desc = f"digits_cnn(channels=(4, 8)) conv4-conv8-linear, {m} 1x8x8 images, float64"
        elif name == "resnet":
            model = zoo.resnet_small()
            zoo.train(model, (Itr, jtr), epochs=2)
            m = resnet_batch
            data = (Itr[:m], jtr[:m])
            desc = f"resnet_small (BatchNorm, eval mode), {m} 1x8x8 digits images, float32"
        elif name == "cnn512":
            model = zoo.digits_cnn(channels=(4, 96))  # 18,962 parameters
            zoo.train(model, (Itr, jtr), epochs=10)
            m = 128 if quick else 512
            data = (Itr[:m], jtr[:m])
            desc = f"digits_cnn(channels=(4, 96)), {m} 1x8x8 images, float32"
        elif name == "resnet128":
            model = zoo.resnet_small(in_channels=3 if resnet128_input == "3x32x32" else 1)
            m = 16 if quick else 128
            if resnet128_input == "3x32x32":
                gen = torch.Generator().manual_seed(0)
                data = (torch.randn(m, 3, 32, 32, generator=gen), torch.randint(0, 10, (m,), generator=gen))
            else:
                zoo.train(model, (Itr, jtr), epochs=2)
                data = (Itr[:m], jtr[:m])
            desc = f"resnet_small (BatchNorm, eval mode), {m} {resnet128_input} images, float32"
        elif name == "resnet18":
            model = zoo.resnet18_cifar()
            gen = torch.Generator().manual_seed(0)
            m = resnet18_batch
            data = (torch.randn(m, 3, 32, 32, generator=gen), torch.randint(0, 10, (m,), generator=gen))
            desc = f"resnet18_cifar (BatchNorm, eval mode, untrained), fixed-seed random batch of {m} 3x32x32, float32"
        else:
            raise SystemExit(f"unknown workload {name!r} (mlp, cnn, resnet, cnn512, resnet128, resnet18)")
        model.eval()
        n = _flat(model.parameters())
        entry = {"model": model, "data": data, "n": n, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                 "description": desc}
        if next(model.parameters()).dtype == torch.float64 and n <= 4096:
            t1 = time.perf_counter()
            e = hl.eigh_exact(hl.Hessian(model, nn.CrossEntropyLoss(), data), return_eigenvectors=False)
            lam = e.eigenvalues.numpy()
            entry["exact"] = {"eigenvalues": lam, "top": lam[:10], "trace": float(lam.sum())}
            entry["exact_seconds"] = time.perf_counter() - t1
        elif name in REFERENCE:  # the top-10 reference of a product workload (float64 Lanczos)
            t1 = time.perf_counter()
            dt = REFERENCE[name]["dtype"]
            ref_model = copy.deepcopy(model).to(dt)
            ref_data = (data[0].to(dt), data[1])
            r = hl.lanczos(hl.Hessian(ref_model, nn.CrossEntropyLoss(), ref_data), k=10, which="LA",
                           tol=REFERENCE[name]["tol"], seed=REFERENCE[name]["seed"], progress=False)
            entry["exact"] = {"top": r.eigenvalues.numpy()[:10]}
            entry["exact_seconds"] = time.perf_counter() - t1
        entry["setup_seconds"] = time.perf_counter() - t0
        print(f"[setup] {name}: {desc}, n = {n:,}, {entry['setup_seconds']:.1f} s"
              + (f" (exact Hessian {entry['exact_seconds']:.1f} s)" if "exact" in entry else ""), flush=True)
        out[name] = entry
    return out


def _reference_record(exact: dict) -> dict:
    """The JSON record of a workload's reference: the exact spectrum's ends and trace, or the top 10 only."""
    out = {"top10": [float(x) for x in exact["top"]]}
    if "eigenvalues" in exact:
        out.update(lambda_max=float(exact["eigenvalues"][0]), lambda_min=float(exact["eigenvalues"][-1]),
                   trace=exact["trace"])
    return out


def run_tasks(workload: str, tool: str, mode: str) -> tuple[str, ...]:
    """The tasks a tool runs on a workload at "matched" or "defaults" settings (skipped ones included).

    Defaults rows run only on DEFAULTS_WORKLOADS, where the call differs from the matched one
    (DEFAULTS_DIFFER), and on a workload of DEFAULTS_ONLY only for the tools and tasks it names.
    """
    tasks = TOOL_TASKS.get(tool, TASKS)
    if mode != "defaults":
        return tasks
    if workload not in DEFAULTS_WORKLOADS:
        return ()
    only = DEFAULTS_ONLY.get(workload)
    return tuple(t for t in tasks if t in DEFAULTS_DIFFER.get(tool, ()) and (only is None or t in only.get(tool, ())))


def run_worker(spec: dict, tmp: Path, timeout: float) -> list[dict]:
    tag = f"{spec['workload']}-{spec['tool']}-{spec['settings']}-{'-'.join(spec['tasks'])}"
    spec = dict(spec, result=str(tmp / f"{tag}.json"))
    spec_path = tmp / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(max(spec["threads"])), PYTHONWARNINGS="ignore")
    if spec.get("omp_wait_policy") and "OMP_WAIT_POLICY" not in os.environ:
        env["OMP_WAIT_POLICY"] = spec["omp_wait_policy"]
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, __file__, "--_worker", str(spec_path)], env=env, timeout=timeout,
                           capture_output=True, text=True)
        failed = None if r.returncode == 0 else f"worker exited {r.returncode}: " + r.stderr.strip()[-400:]
    except subprocess.TimeoutExpired:
        failed = f"worker timed out after {timeout:.0f} s"
    print(f"[{spec['workload']}] {spec['tool']:<20} {spec['settings']:<8} {','.join(spec['tasks']):<16} "
          f"{time.perf_counter() - t0:6.1f} s"
          + (f"  FAILED: {failed}" if failed else ""), flush=True)
    result = Path(spec["result"])
    if result.exists():
        return json.loads(result.read_text())
    return [dict(workload=spec["workload"], tool=spec["tool"], task=t, threads=th, failed=failed,
                 settings=spec["settings"])
            for th in spec["threads"] for t in spec["tasks"]]


COLUMNS = [("workload", "workload", "s"), ("threads", "thr", "d"), ("task", "task", "s"), ("tool", "tool", "s"),
           ("settings", "settings", "s"), ("seconds", "time s", ".2f"), ("products", "HVPs", "d"), ("ms_per_product", "ms/HVP", ".1f"),
           ("hvp_ms", "own HVP ms", ".1f"), ("floor_ratio", "total/floor", ".2f"),
           ("ms_per_product_in_run", "in-run ms/HVP", ".1f"), ("solver_overhead", "total/in-products", ".2f"),
           ("error", "error", ".2e"),
           ("peak_mb", "peak MB", ".0f"), ("vs_hesslab", "time ÷ hesslab", ".2f"),
           ("vs_best_peer", "best peer ÷ hesslab", ".2f")]


def render(rows: list[dict], env: dict, settings: dict) -> str:
    shown = [dict(r, task=TASK_LABEL.get(r["task"], r["task"]) + (" (FAILED)" if r.get("failed") else "")) for r in rows]
    lines = [table(shown, COLUMNS), "",
             "error: " + "; ".join(f"{TASK_LABEL[t]}: {ERROR_LABEL[t]}" for t in TASKS) + " (– where no exact Hessian).",
             "time ÷ hesslab > 1: hesslab is faster. total/floor: wall time / (HVPs × the tool's own single HVP). "
             "in-run ms/HVP: time inside the product entry point in the same run / HVPs; total/in-products: "
             "wall time / that time (what the solver adds; 1.00 = nothing).", ""]
    fails = [r for r in rows if r.get("failed")]
    for r in fails:
        lines.append(f"- FAILED {r['workload']} {r['tool']} {r['task']} (threads {r.get('threads')}): {r['failed']}")
    for r in rows:
        if r.get("note"):
            lines.append(f"- note {r['workload']} {r['tool']} {r['task']}: {r['note']}")
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workloads", default=None, help="comma separated: mlp, cnn, resnet, cnn512, resnet128, "
                   "resnet18 (default mlp,cnn,resnet,cnn512,resnet128; resnet18 is the GPU suite's)")
    p.add_argument("--settings", default="matched,defaults",
                   help="matched and/or defaults (the latter on the product workloads, where they differ)")
    p.add_argument("--resnet128-input", default="1x8x8", choices=("1x8x8", "3x32x32"),
                   help="resnet128's inputs: 128 digits images (default) or a random 128x3x32x32 batch (slow)")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma separated subset of " + ", ".join(TOOLS))
    p.add_argument("--resnet-batch", type=int, default=None, help="images in the resnet_small batch (default 16)")
    p.add_argument("--cnn-threads", default=None,
                   help="thread counts for the digits CNN (default: the first of --threads, to keep the run short)")
    p.add_argument("--resnet-threads", default=None,
                   help="thread counts for resnet_small (default: the first of --threads, to keep the run short)")
    p.add_argument("--resnet18-batch", type=int, default=128, help="images in the ResNet-18 batch")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds over the tools on the product workloads, in alternating order (ABC, CBA), "
                        "times averaged: this machine's speed drifts by ~30%% over minutes (default 2; "
                        "1 with --quick)")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for the worker processes unless already set ('' leaves it unset): "
                        "PASSIVE keeps 2-thread runs sane on a shared 2-core machine")
    p.add_argument("--_worker", default=None, help=argparse_suppress())
    args = p.parse_args()
    if args._worker:
        worker(args._worker)
        return
    start = time.perf_counter()
    device = args.device
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    threads = [int(t) for t in args.threads.split(",")]
    if args.quick:
        threads = threads[:1]
    if cuda:
        threads = [torch.get_num_threads()]
    # the 16-image ResNet (--workloads resnet) is superseded by resnet128 by default: make bench's time
    workloads = (args.workloads or ("mlp,resnet" if args.quick else "mlp,cnn,cnn512,resnet128")).split(",")
    wanted_settings = [s for s in args.settings.split(",") if s]
    # one thread for the product workloads, like the CNN and the ResNet by default
    wl_threads = {w: threads[:1] if w in PRODUCT_WORKLOADS else threads for w in workloads}
    resnet_batch = args.resnet_batch or (4 if args.quick else 16)
    resnet_threads = [int(t) for t in args.resnet_threads.split(",")] if args.resnet_threads else threads[:1]
    cnn_threads = [int(t) for t in args.cnn_threads.split(",")] if args.cnn_threads else threads[:1]
    if cuda:
        resnet_threads = cnn_threads = threads
    wl_threads.update(resnet=resnet_threads, cnn=cnn_threads)
    config = ({"k": 5, "slq_steps": 20, "slq_probes": 4, "trace_products": 30} if args.quick
              else {"k": 10, "slq_steps": 90, "slq_probes": 8, "trace_products": 100})
    # the product workloads' SLQ with fewer probes (90 x 2 and 90 x 1 products per tool): make bench's time
    configs = {"cnn512": dict(config, slq_probes=min(2, config["slq_probes"])),
               "resnet128": dict(config, slq_probes=1)}
    # Repeats: the products dominate, so cheap workloads get more. --repeats caps them.
    repeats = {"mlp": 2, "cnn": 2, "resnet": 1, "resnet18": 3, "cnn512": 1, "resnet128": 1}
    if args.quick:
        repeats = dict.fromkeys(repeats, 1)
    repeats = {k: min(v, args.repeats) for k, v in repeats.items()}
    rounds = args.rounds or (1 if args.quick else 2)
    rounds_of = {w: rounds if w in PRODUCT_WORKLOADS else 1 for w in workloads}
    warmup = dict.fromkeys(repeats, "small")  # a few products through the same code paths
    tools, missing = available_tools([t.strip() for t in args.tools.split(",") if t.strip()])
    if "hesslab" not in tools:
        raise SystemExit("hesslab itself does not import: " + missing.get("hesslab", "?"))
    resettable = (not cuda) and can_reset_peak()
    versions = tool_versions()
    print(f"tools: {', '.join(f'{t} {versions.get(DISTRIBUTIONS[t])}' for t in tools)}"
          + (f"; skipped: {missing}" if missing else ""), flush=True)

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmpdir:
        tmp = Path(tmpdir)
        load_before = os.getloadavg()
        # one thread: two-thread regions stall badly when the shared machine is busy
        payload = build_workloads(workloads, args.quick, resnet_batch, args.resnet18_batch, 1,
                                  args.resnet128_input)
        torch.save(payload, tmp / "payload.pt")
        for wl in workloads:
            krylov_steps = None
            jobs = []  # (mode, tool, tasks), in order: hesslab's matched top-10 first (its step count)
            for mode in ("matched", "defaults"):
                if mode not in wanted_settings:
                    continue
                for tool in tools:
                    tool_tasks = run_tasks(wl, tool, mode)
                    for t in [t for t in tool_tasks if (wl, tool, t) in SKIPPED]:
                        rows.append(dict(workload=wl, tool=tool, task=t, settings=mode, threads=wl_threads[wl][0],
                                         note="skipped: " + SKIPPED[(wl, tool, t)]))
                    tool_tasks = tuple(t for t in tool_tasks if (wl, tool, t) not in SKIPPED)
                    groups = [list(tool_tasks)] if resettable or cuda else [[t] for t in tool_tasks]
                    jobs += [(mode, tool, tasks) for tasks in groups if tasks]
            round_rows = []
            for rnd in range(rounds_of[wl]):
                got_round = []
                for mode, tool, tasks in (jobs if rnd % 2 == 0 else jobs[::-1]):
                    spec = dict(workload=wl, tool=tool, tasks=tasks, device=device, settings=mode,
                                threads=wl_threads[wl],
                                payload=str(tmp / "payload.pt"), repeats=repeats[wl], warmup=warmup[wl],
                                config=configs.get(wl, config), resettable=resettable,
                                krylov_steps=krylov_steps, omp_wait_policy=args.omp_wait_policy)
                    got = run_worker(spec, tmp, args.timeout)
                    got_round += got
                    if tool == "hesslab" and mode == "matched":
                        steps = [r.get("steps") for r in got if r.get("task") == "top10" and r.get("steps")]
                        krylov_steps = krylov_steps or (max(steps) if steps else None)
                round_rows.append(got_round)
            rows += merge_rounds(round_rows)
    add_ratios(rows)
    env = environment(device)
    env["peers"] = versions
    env["skipped_tools"] = missing
    env["threads"] = {"mlp": threads, "cnn": cnn_threads, "resnet": resnet_threads}
    env["loadavg_start"], env["loadavg_end"] = load_before, os.getloadavg()
    env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", args.omp_wait_policy or None)
    duration = time.perf_counter() - start
    settings = {"config": config, "repeats": repeats, "warmup": warmup, "lanczos_tol": LANCZOS_TOL,
                "workloads": {k: {kk: vv for kk, vv in v.items() if kk in ("n", "dtype", "description",
                                                                         "exact_seconds", "setup_seconds")}
                              for k, v in payload.items()},
                "exact": {k: _reference_record(v["exact"]) for k, v in payload.items() if "exact" in v},
                "configs": configs,
                "command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": args.quick,
                "rounds": rounds_of,
                "duration_seconds": duration}
    md = render(rows, env, settings)
    goals = targets(rows, load_compiled((args.out.parent if args.out else OUT), "compiled"))
    md += "\n\n### Targets of issue 15 (this run)\n\n" + (
        render_targets(goals) if goals else "(nothing measured: no product workload with a peer, no compiled rows)")
    name = "peers" if not cuda else "peers_cuda"
    path = write_json(name, {"environment": env, "settings": settings, "notes": NOTES, "rows": rows,
                             "targets": goals}, args.out)
    header = (f"# bench_peers ({'quick' if args.quick else 'full'}, {device})\n\n"
              f"{env['cpu']}, {env['cores']} cores" + (f", {env['gpu']}" if env.get("gpu") else "")
              + f"; torch {env['torch']} (CUDA {env['cuda']}); "
              + ", ".join(f"{t} {versions.get(DISTRIBUTIONS[t])}" for t in tools)
              + f"\n\n`{settings['command']}`, {duration / 60:.1f} min; load average (1, 5, 15 min) "
              f"{'/'.join(f'{x:.1f}' for x in env['loadavg_start'])} at the start, "
              f"{'/'.join(f'{x:.1f}' for x in env['loadavg_end'])} at the end\n\n")
    path.with_suffix(".md").write_text(header + md + "\n\n## Notes\n\n"
                                       + "\n".join(f"- **{k}**: {v}" for k, v in NOTES.items()) + "\n")
    print("\n" + md)
    print("\nnotes (settings that could not be matched):")
    for k, v in NOTES.items():
        print(f"  {k}: {v}")
    print(f"\nwrote {path} and {path.with_suffix('.md')}; total {duration:.0f} s ({duration / 60:.1f} min)")


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
