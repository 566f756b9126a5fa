"""Sharded models on torch.distributed: time per product and per Lanczos step, memory per rank.

Workload: one seeded float32 MLP (64-512-512-512-10, 0.56M parameters, tanh) over one fixed
set of 4096 samples (strong scaling: the same global data split over the ranks, uneven
when the world size does not divide it), wrapped with FSDP2 ``fully_shard`` (every Linear,
then the root) on 1, 2 and 4 gloo ranks of this CPU, one thread per rank. ``hl.Hessian``
of the sharded model takes products by central differences of gradients (two gradient
passes per column, each with FSDP's all-gathers of the parameters and reduce-scatter of
the gradient); ``hl.spectral_density`` runs its Lanczos steps on sharded vectors (each
rank holds its shard of the basis; two all-reduces of ~m float64 numbers per step).

Measured per world size (medians over the ranks' medians):

  * product: one ``H @ v`` (median of the repeats after one warm-up);
  * step: one Lanczos step of ``spectral_density(H, num_steps=S, num_probes=1)`` (total / S);
  * gradient: one gradient of the sharded model (``H.gradient()``), the unit of cost;
  * basis MiB/rank: the (1, S, n_r) float32 basis of that run, n_r the rank's local size;
  * peak RSS MiB/rank: the largest resident set size over the ranks after the run;
  * solver all-reduces/step and bytes/step: counted by wrapping ``torch.distributed.all_reduce``
    during the Lanczos run, minus those inside the products.

The machine has 2 cores: 4 ranks oversubscribe it, so the 4-rank times measure the
oversubscription as much as the algorithm; the communication counts do not depend on it.

    python benchmarks/bench_scaling.py [--worlds 1,2,4] [--steps 30] [--repeats 5]
"""

from __future__ import annotations

import datetime
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks._common import environment, parser, table, write_json  # noqa: E402

WIDTHS = (64, 512, 512, 512, 10)
SAMPLES = 4096


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def _data(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(SAMPLES, WIDTHS[0], generator=g)
    y = torch.randint(0, WIDTHS[-1], (SAMPLES,), generator=g)
    bounds = [round(SAMPLES * r / world) for r in range(world + 1)]
    return X[bounds[rank]: bounds[rank + 1]], y[bounds[rank]: bounds[rank + 1]]


class _CountAllReduce:
    """Counts calls and bytes of torch.distributed.all_reduce while active."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self._orig = torch.distributed.all_reduce

    def __enter__(self) -> _CountAllReduce:
        def counted(tensor, *args, **kwargs):
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return self._orig(tensor, *args, **kwargs)

        torch.distributed.all_reduce = counted
        return self

    def __exit__(self, *exc) -> None:
        torch.distributed.all_reduce = self._orig


def _worker(rank: int, world: int, port: int, steps: int, repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=300))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        import hesslab as hl

        model = _model()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        H = hl.Hessian(model, torch.nn.CrossEntropyLoss(), _data(rank, world))
        v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(rank))

        def median_time(fn) -> float:
            times = []
            for i in range(repeats + 1):
                torch.distributed.barrier()
                t0 = time.perf_counter()
                fn()
                if i:
                    times.append(time.perf_counter() - t0)
            return statistics.median(times)

        product = median_time(lambda: H @ v)
        gradient = median_time(H.gradient)
        with _CountAllReduce() as inside:
            H @ v
        per_product = inside.calls
        before = H.num_matvecs
        torch.distributed.barrier()
        with _CountAllReduce() as counted:
            t0 = time.perf_counter()
            hl.spectral_density(H, num_steps=steps, num_probes=1, progress=False)
            total = time.perf_counter() - t0
        taken = H.num_matvecs - before
        solver_calls = counted.calls - taken * per_product
        queue.put({
            "rank": rank, "world": world, "n": H.shards.global_size if H.shards else H.shape[0],
            "n_local": H.shape[0], "product_s": product, "gradient_s": gradient,
            "step_s": total / max(taken, 1), "products": taken,
            "solver_all_reduces": solver_calls, "solver_all_reduces_per_step": solver_calls / max(taken, 1),
            "basis_mib": steps * H.shape[0] * 4 / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        })
    finally:
        torch.distributed.destroy_process_group()


def _run(world: int, steps: int, repeats: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, steps, repeats, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"rank process exited with {p.exitcode} (world {world})")
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--worlds", default="1,2,4", help="world sizes, comma separated")
    p.add_argument("--steps", type=int, default=30, help="Lanczos steps of the timed SLQ run")
    args = p.parse_args()
    steps = 8 if args.quick else args.steps
    repeats = 2 if args.quick else args.repeats
    rows = []
    for world in (int(w) for w in args.worlds.split(",")):
        ranks = _run(world, steps, repeats)
        med = {k: statistics.median(r[k] for r in ranks)
               for k in ("product_s", "gradient_s", "step_s", "solver_all_reduces_per_step")}
        rows.append({
            "world": world, "n": ranks[0]["n"], "n_local_max": max(r["n_local"] for r in ranks),
            "product_ms": 1e3 * med["product_s"], "gradient_ms": 1e3 * med["gradient_s"],
            "product_per_gradient": med["product_s"] / med["gradient_s"],
            "step_ms": 1e3 * med["step_s"], "all_reduces_per_step": med["solver_all_reduces_per_step"],
            "basis_mib": max(r["basis_mib"] for r in ranks),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks), "ranks": ranks,
        })
    columns = [("world", "ranks", "d"), ("n_local_max", "n_r (max)", "d"), ("gradient_ms", "gradient ms", ".1f"),
               ("product_ms", "product ms", ".1f"), ("product_per_gradient", "product/gradient", ".2f"),
               ("step_ms", "Lanczos step ms", ".1f"), ("all_reduces_per_step", "solver all-reduces/step", ".1f"),
               ("basis_mib", "basis MiB/rank", ".2f"), ("peak_rss_mib", "peak RSS MiB/rank", ".0f")]
    print(table(rows, columns))
    path = write_json("scaling", {"environment": environment("cpu"), "steps": steps, "repeats": repeats,
                                  "widths": WIDTHS, "samples": SAMPLES, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
