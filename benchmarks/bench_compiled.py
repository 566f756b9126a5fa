"""Compiled against eager products: ``Hessian/GGN(..., compile=True)`` vs the kept graph (issue 15).

Per model and operator: the eager product (the default path: the first-order graph kept,
one column) and the compiled one (``compile=True``, inductor: reverse-over-reverse for
the Hessian, the torch.func form for the GGN; no kept graph, so each product repeats the
forward and backward), single column, medians of interleaved repeats (eager, compiled,
eager, ...: load changes hit both alike); the compile time (the first compiled product,
minus one compiled product); the relative difference of the two products; and the number
of products after which compiling pays back, compile / (eager - compiled), where it does.

Models: mlp (zoo.digits_mlp, 256 digits, float32), cnn512 (zoo.digits_cnn(channels=(4, 96)),
18,962 parameters, 512 images, float32), resnet (zoo.resnet_small, 16 1x8x8 images;
``--models`` adds it: inductor takes minutes to compile its double backward on this CPU),
resnet18 (the GPU suite's, zoo.resnet18_cifar on a random 128x3x32x32 batch).

    python benchmarks/bench_compiled.py [--quick] [--device cuda] [--models mlp,cnn512]
        [--operators Hessian,GGN] [--repeats 5] [--backend inductor]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, parser, sync, table, write_json  # noqa: E402

COLUMNS = [("model", "model", "s"), ("device", "device", "s"), ("operator", "operator", "s"),
           ("n", "params", "d"), ("eager_ms", "eager (kept graph) ms", ".2f"), ("compiled_ms", "compiled ms", ".2f"),
           ("ratio", "eager ÷ compiled", ".2f"), ("compile_s", "compile s", ".1f"),
           ("break_even", "pays back after (products)", ".0f"), ("rel_diff", "rel. difference", ".1e"),
           ("compiles", "graphs", "d"), ("fallback", "fallback", "s")]


def build(name: str, quick: bool, device: str):
    """(model, (inputs, targets)) of a named workload, on ``device``, float32, eval mode."""
    from hesslab import zoo

    (X, y), _ = zoo.digits()
    (I, j), _ = zoo.digits(image=True)
    gen = torch.Generator().manual_seed(0)
    if name == "mlp":
        model, data = zoo.digits_mlp(), (X[:64 if quick else 256], y[:64 if quick else 256])
    elif name == "cnn512":
        m = 64 if quick else 512
        model, data = zoo.digits_cnn(channels=(4, 96)), (I[:m], j[:m])
    elif name == "resnet":
        model, data = zoo.resnet_small(), (I[:4 if quick else 16], j[:4 if quick else 16])
    elif name == "resnet18":
        m = 8 if quick else 128
        model = zoo.resnet18_cifar()
        data = (torch.randn(m, 3, 32, 32, generator=gen), torch.randint(0, 10, (m,), generator=gen))
    else:
        raise SystemExit(f"unknown model {name!r} (mlp, cnn512, resnet, resnet18)")
    return model.to(device).eval(), (data[0].to(device), data[1].to(device))


def measure(model: nn.Module, data, operator: str, device: str, repeats: int, backend: str = "inductor",
            loss: nn.Module | None = None) -> dict:
    """One row: eager kept-graph and compiled single-column products of ``operator`` (default loss: CE)."""
    import hesslab as hl

    cls = {"Hessian": hl.Hessian, "GGN": hl.GGN}[operator]
    loss = nn.CrossEntropyLoss() if loss is None else loss
    eager = cls(model, loss, data, compile=False, check_derivatives=False)
    comp = cls(model, loss, data, compile=backend, check_derivatives=False)
    v = torch.randn(eager.shape[0], generator=torch.Generator().manual_seed(1)).to(device)

    def timed(op) -> tuple[float, torch.Tensor]:
        sync(device)
        t0 = time.perf_counter()
        out = op @ v
        sync(device)
        return time.perf_counter() - t0, out

    ref = eager @ v  # builds the kept graph
    first, out = timed(comp)  # compiles
    te, tc = [], []
    for _ in range(repeats):
        te.append(timed(eager)[0])
        tc.append(timed(comp)[0])
    e, c = statistics.median(te), statistics.median(tc)
    row = dict(operator=operator, device=device, n=eager.shape[0], eager_ms=1e3 * e, compiled_ms=1e3 * c,
               ratio=e / c, compile_s=max(first - c, 0.0), eager_path=eager.hvp_path, compiled_path=comp.hvp_path,
               rel_diff=float((out - ref).norm() / ref.norm()), compiles=comp.compiled.compiles,
               fallback=comp.compiled.fallback, backend=backend, repeats=repeats)
    row["break_even"] = row["compile_s"] / (e - c) if e > c else None
    return row


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma separated: mlp, cnn512, resnet, resnet18 "
                   "(default mlp,cnn512 on the CPU, resnet18 on CUDA)")
    p.add_argument("--operators", default=None, help="Hessian,GGN (default: both on the MLP, the Hessian on the "
                   "others, to keep make bench short)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor, what compile=True "
                   "uses; aot_eager with --quick, which checks the path in seconds rather than timing it)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    torch.set_num_threads(int(args.threads.split(",")[0]))
    models = (args.models or ("resnet18" if cuda else "mlp,cnn512")).split(",")
    repeats = 2 if args.quick else args.repeats
    backend = args.backend or ("aot_eager" if args.quick else "inductor")
    start, load = time.perf_counter(), os.getloadavg()
    rows = []
    for name in models:
        model, data = build(name, args.quick, args.device)
        for operator in (args.operators or ("Hessian,GGN" if name == "mlp" else "Hessian")).split(","):
            row = dict(model=name, **measure(model, data, operator, args.device, repeats, backend))
            row["loadavg"] = os.getloadavg()
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            rows.append(row)
    env = environment(args.device)
    env["loadavg_start"], env["loadavg_end"] = load, os.getloadavg()
    env["threads"] = torch.get_num_threads()
    duration = time.perf_counter() - start
    path = write_json("compiled" if not cuda else "compiled_cuda",
                      {"environment": env, "rows": rows, "duration_seconds": duration}, args.out)
    md = table(rows, COLUMNS)
    path.with_suffix(".md").write_text(
        f"# bench_compiled ({args.device}, {torch.get_num_threads()} thread(s), medians of {repeats} interleaved "
        f"repeats, load {'/'.join(f'{x:.1f}' for x in load)})\n\n{md}\n")
    print("\n" + md + f"\n\nwrote {path}; total {duration:.0f} s")


if __name__ == "__main__":
    main()
