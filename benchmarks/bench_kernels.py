"""Compiled kernels against their pure-torch twins (bmm/einsum).

Lanczos step: one full step (recurrence + CGS2 against all j+1 rows + normalisation) at
the last row of a (b, m, n) basis, the kernel (float64 accumulation) against the twin
in the storage dtype (a float32 GEMM for float32 bases). Reported: median time, the
ratio twin/kernel (> 1: the kernel is faster), and the orthogonality error of the new
vector against the basis, max |Qᵀ q_{j+1}|, for both.

Kronecker product: kron_matmul over the layer shapes of a small CNN/ResNet, kernel vs
the einsum twin.

GPU mode (--device cuda): also the achieved bandwidth of the Lanczos step against a
device-to-device copy of the same size. Bytes moved, by the plan of
csrc/common/gram_schmidt_plan.h: Q's j+1 rows read in 3 sweeps (dots, update, dots) plus
a 4th where the second update runs (nearly never for float32 bases with float64 sums,
usually for float64 ones: counted as 3 and 4), plus ~10 passes over w (norms, updates,
the new row).

    python benchmarks/bench_kernels.py [--quick] [--device cuda] [--threads 1,2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, parser, table, timeit, write_json  # noqa: E402

from hesslab import _ops, reference  # noqa: E402

LANCZOS_FULL = [  # (n, m, b): up to ~1.3 GB of float32 basis; sized for `make bench`'s 20 minutes
    (10_000, 200, 16), (100_000, 200, 4), (100_000, 50, 16), (1_000_000, 100, 2), (1_000_000, 20, 8),
]
LANCZOS_QUICK = [(10_000, 50, 4), (100_000, 50, 2), (1_000_000, 10, 1)]
KRON_LAYERS = {  # (out, in+1) of Linear/Conv2d layers (conv in = C_in * k * k)
    "digits_cnn": [(8, 10), (16, 73), (10, 257)],
    "resnet_small": [(32, 10), (32, 289), (32, 289), (64, 289), (64, 577), (64, 33), (128, 577), (128, 1153), (128, 65), (10, 129)],
}


def _basis(b: int, m: int, n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """(b, m, n) with orthonormal-ish rows: random rows are nearly orthogonal for n >> m."""
    Q = torch.randn(b, m, n, dtype=dtype, device=device)
    Q /= Q.norm(dim=2, keepdim=True)
    q, _ = torch.linalg.qr(Q[:, : m - 1].transpose(1, 2).double())
    Q[:, : m - 1] = q.transpose(1, 2).to(dtype)
    return Q


def _ortho_error(Q: torch.Tensor, j: int) -> float:
    nxt = Q[:, j + 1].double() if j + 1 < Q.shape[1] else None
    if nxt is None:
        return float("nan")
    return float(torch.einsum("bjn,bn->bj", Q[:, : j + 1].double(), nxt).abs().max())


def bench_lanczos(sizes, dtypes, threads, repeats, device):
    rows = []
    for n, m, b in sizes:
        for dtype in dtypes:
            j = m - 2  # the last step that writes a new row: j + 1 rows to orthogonalise against
            Q0 = _basis(b, m, n, dtype, device)
            w0 = torch.randn(b, n, dtype=dtype, device=device)
            bp = torch.rand(b, dtype=torch.float64, device=device)
            for t in threads:
                torch.set_num_threads(t)
                res = {}
                for name, fn in [("kernel", _ops.lanczos_step_), ("twin", reference.lanczos_step)]:
                    Q, w = Q0.clone(), w0.clone()

                    def setup():
                        w.copy_(w0)

                    res[name] = timeit(lambda: fn(Q, w, bp, j, 1e-10), repeats, device, setup)
                    w.copy_(w0)
                    fn(Q, w, bp, j, 1e-10)
                    res[name + "_ortho"] = _ortho_error(Q, j)
                    del Q, w
                row = dict(op="lanczos_step_", n=n, m=m, b=b, dtype=str(dtype).split(".")[1], threads=t,
                           kernel_ms=res["kernel"] * 1e3, twin_ms=res["twin"] * 1e3, ratio=res["twin"] / res["kernel"],
                           kernel_ortho=res["kernel_ortho"], twin_ortho=res["twin_ortho"])
                if device.startswith("cuda"):
                    sweeps = 3 if dtype == torch.float32 else 4  # see the module docstring
                    nbytes = Q0.element_size() * b * n * (sweeps * (j + 1) + 10)
                    big = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
                    dst = torch.empty_like(big)
                    copy = timeit(lambda: dst.copy_(big), repeats, device)
                    row.update(kernel_GBps=nbytes / res["kernel"] / 1e9, copy_GBps=2 * big.numel() * 4 / copy / 1e9)
                    del big, dst
                rows.append(row)
                print(row, flush=True)
            del Q0, w0
    return rows


def bench_kron(batches, dtypes, threads, repeats, device):
    rows = []
    for model, shapes in KRON_LAYERS.items():
        A = [torch.randn(i, i, dtype=torch.float64) for _, i in shapes]
        B = [torch.randn(o, o, dtype=torch.float64) for o, _ in shapes]
        N = sum(o * i for o, i in shapes)
        for dtype in dtypes:
            Ad = [a.to(dtype=dtype, device=device) for a in A]
            Bd = [x.to(dtype=dtype, device=device) for x in B]
            for b in batches:
                V = torch.randn(b, N, dtype=dtype, device=device)
                for t in threads:
                    torch.set_num_threads(t)
                    k = timeit(lambda: _ops.kron_matmul(Ad, Bd, V), repeats, device)
                    r = timeit(lambda: reference.kron_matmul(Ad, Bd, V), repeats, device)
                    err = float((_ops.kron_matmul(Ad, Bd, V) - reference.kron_matmul(Ad, Bd, V)).abs().max())
                    row = dict(op="kron_matmul", model=model, N=N, b=b, dtype=str(dtype).split(".")[1], threads=t,
                               kernel_ms=k * 1e3, twin_ms=r * 1e3, ratio=r / k, max_abs_diff=err)
                    rows.append(row)
                    print(row, flush=True)
    return rows


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    device = args.device
    threads = [int(t) for t in args.threads.split(",")] if device == "cpu" else [torch.get_num_threads()]
    dtypes = [torch.float32, torch.float64]
    sizes = LANCZOS_QUICK if args.quick else LANCZOS_FULL
    repeats = 2 if args.quick else args.repeats
    lanczos_rows = bench_lanczos(sizes, dtypes, threads, repeats, device)
    kron_rows = bench_kron([1, 8] if not args.quick else [1], dtypes, threads, repeats, device)
    path = write_json(f"kernels_{device.split(':')[0]}", {"environment": environment(device), "lanczos": lanczos_rows,
                                                          "kron": kron_rows}, args.out)
    cols = [("n", "n", ",d"), ("m", "m", "d"), ("b", "b", "d"), ("dtype", "dtype", "s"), ("threads", "threads", "d"),
            ("kernel_ms", "kernel ms", ".2f"), ("twin_ms", "twin ms", ".2f"), ("ratio", "twin/kernel", ".2f"),
            ("kernel_ortho", "kernel ‖Qᵀq‖∞", ".1e"), ("twin_ortho", "twin ‖Qᵀq‖∞", ".1e")]
    if device.startswith("cuda"):
        cols += [("kernel_GBps", "kernel GB/s", ".0f"), ("copy_GBps", "copy GB/s", ".0f")]
    print("\n" + table(lanczos_rows, cols))
    print("\n" + table(kron_rows, [("model", "layers", "s"), ("N", "N", ",d"), ("b", "b", "d"), ("dtype", "dtype", "s"),
                                   ("threads", "threads", "d"), ("kernel_ms", "kernel ms", ".3f"),
                                   ("twin_ms", "twin ms", ".3f"), ("ratio", "twin/kernel", ".2f")]))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
