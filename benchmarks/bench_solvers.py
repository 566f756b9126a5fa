"""Solver overhead against the Hessian-vector products themselves, and batched SLQ.

Workloads (hesslab.zoo, scikit-learn's digits, trained a few epochs): an MLP, a CNN, and
a ResNet-style network with BatchNorm in eval mode (0.31M parameters). Tasks: top-10
eigenvalues (hl.lanczos), an SLQ density (90 steps × 8 probes, hl.spectral_density, with
full and with local reorthogonalization), and a Hutch++ trace (100 products).

Reported per task:
  * wall time (median of repeats) and number of products;
  * overhead = total time / time spent inside the operator's products (instrumented):
    everything the solver adds (kernels, tridiagonal eigensolves, bookkeeping);
  * floor ratio = total time / (products × the time of one single-column product measured
    alone): below 1 where batching several columns into one data pass pays off.
And, at the first thread count: batched SLQ (all probes in one pass per step) against the
same probes run one after another (30 steps, the ResNet 20, to keep the run short).

The ResNet runs at the first thread count only unless --resnet-threads says otherwise
(its 2-thread rows add about 1.5 minutes to `make bench`).

    python benchmarks/bench_solvers.py [--quick] [--threads 1,2] [--resnet-threads 1,2]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, parser, table, timeit, write_json  # noqa: E402

import hesslab as hl  # noqa: E402
from hesslab import zoo  # noqa: E402


class Timed(hl.LinearOperator):
    """Wraps an operator and accumulates the wall time of its products."""

    def __init__(self, op: hl.LinearOperator):
        super().__init__(op.shape, op.dtype, op.device)
        self.op, self.seconds = op, 0.0

    def _matmat(self, V):
        t0 = time.perf_counter()
        out = self.op.matmat(V)
        self.seconds += time.perf_counter() - t0
        return out


def workloads(quick: bool):
    (Xtr, ytr), _ = zoo.digits()
    (Itr, jtr), _ = zoo.digits(image=True)
    n_data = 256 if quick else 1024
    mlp = zoo.digits_mlp()
    zoo.train(mlp, (Xtr, ytr), epochs=3 if quick else 10)
    cnn = zoo.digits_cnn()
    zoo.train(cnn, (Itr, jtr), epochs=3 if quick else 10)
    res = zoo.resnet_small()
    zoo.train(res, (Itr, jtr), epochs=1 if quick else 2)
    yield "digits_mlp", mlp, (Xtr[:n_data], ytr[:n_data])
    yield "digits_cnn", cnn, (Itr[:n_data], jtr[:n_data])
    yield "resnet_small_bn", res, (Itr[: n_data // 16], jtr[: n_data // 16])


def run(name, model, data, threads, repeats, quick, compare_batched):
    torch.set_num_threads(threads)
    H = hl.Hessian(model, nn.CrossEntropyLoss(), data)
    n = H.shape[0]
    v = torch.randn(n, 1, dtype=H.dtype)
    one = timeit(lambda: H.matmat(v), repeats)
    steps, probes = (30, 4) if quick else (90, 8)
    rows = []
    tasks = {
        "top-10 (lanczos)": lambda op: hl.lanczos(op, k=10, tol=1e-6, compute_residuals=False, return_eigenvectors=False),
        f"SLQ {steps}x{probes}": lambda op: hl.spectral_density(op, num_steps=steps, num_probes=probes, grid_size=2000),
        f"SLQ {steps}x{probes} local": lambda op: hl.spectral_density(op, num_steps=steps, num_probes=probes,
                                                                     grid_size=2000, reorthogonalize="local"),
        "trace (hutch++, 100)": lambda op: hl.trace(op, num_matvecs=100, method="hutch++"),
    }
    runs = 1 if n > 100_000 else max(1, repeats // 2)  # the big model: one timed run per task
    for task, fn in tasks.items():
        times, prod = [], []
        for _ in range(runs):
            op = Timed(H)
            t0 = time.perf_counter()
            fn(op)
            times.append(time.perf_counter() - t0)
            prod.append(op.seconds)
        i = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]
        total, inside, count = times[i], prod[i], op.num_matvecs
        rows.append(dict(model=name, n=n, threads=threads, task=task, seconds=total, matvecs=count,
                         product_ms=one * 1e3, overhead=total / inside, floor_ratio=total / (count * one)))
        print(rows[-1], flush=True)
    if not compare_batched:
        return rows
    # batched SLQ against the same probes one after another
    s = min(steps, 20 if name.startswith("resnet") else 30)
    t0 = time.perf_counter()
    hl.spectral_density(H, num_steps=s, num_probes=probes, grid_size=2000)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in range(probes):
        hl.spectral_density(H, num_steps=s, num_probes=1, seed=p, grid_size=2000)
    sequential = time.perf_counter() - t0
    rows.append(dict(model=name, n=n, threads=threads, task=f"SLQ {s}x{probes}: sequential/batched", seconds=batched,
                     matvecs=s * probes, product_ms=one * 1e3, speedup=sequential / batched))
    print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--resnet-threads", default=None, help="thread counts for the ResNet (default: the first of "
                   "--threads, to keep the run short)")
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    resnet_threads = [int(t) for t in args.resnet_threads.split(",")] if args.resnet_threads else threads[:1]
    repeats = 2 if args.quick else args.repeats
    rows = []
    for name, model, data in workloads(args.quick):
        for t in resnet_threads if name.startswith("resnet") else threads:
            rows += run(name, model, data, t, repeats, args.quick, compare_batched=t == threads[0])
    path = write_json("solvers", {"environment": environment("cpu"), "rows": rows}, args.out)
    print("\n" + table(rows, [("model", "model", "s"), ("n", "params", ",d"), ("threads", "threads", "d"),
                              ("task", "task", "s"), ("seconds", "seconds", ".2f"), ("matvecs", "products", "d"),
                              ("product_ms", "1 product ms", ".1f"), ("overhead", "total/in-products", ".3f"),
                              ("floor_ratio", "total/(products×1 product)", ".2f"),
                              ("speedup", "sequential/batched", ".2f")]))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
