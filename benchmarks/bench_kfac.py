"""Kronecker-factored layer Hessians: build and product time against exact products, and
how well the factors' top eigenspaces match the exact layer Hessians'.

Workloads (hesslab.zoo, scikit-learn's digits as 1×8×8 images): the digits CNN (two
3×3 convolutions and a linear layer, trained a few epochs) and the ResNet-style network
(BatchNorm in eval mode, trained briefly; its BatchNorm layers are skipped by KFAC, with
the warning). Per model and thread count (torch.set_num_threads):

  * build: KFAC(model, CrossEntropyLoss(), data), one pass over the data (curvature
    "exact": the Gauss-Newton M plus a one-product check on the first batch that the
    network is piecewise linear, as these are);
  * KFAC product: K @ v for one vector (and a block of 10), through the compiled grouped
    op kron_matmul, with the layout permutations;
  * exact product: Hessian(model, loss, data, params=K.param_names) @ v, the exact
    Hessian over the same parameters (single batch: the first-order graph is kept, so
    this is hesslab's fastest exact path).
Medians of repeats after one warm-up.

Then, per layer: the overlap ‖UᵀV‖²/k of the top-k eigenspaces of KFAC's block B ⊗ A
(K.topk) and of the exact layer Hessian (hesslab.lanczos on layer_hessian, float32,
tol 1e-4), at k = 1, 5 and 10 (the number of classes), for both weight-sharing
conventions of convolutions (kfac_approx "expand" and "reduce"; identical for Linear
layers); the top eigenvalue of each; the share σ₁²/Σσ² of the exact top eigenvector
reshaped to the (out, in+1) weight; and the number of dominant eigenvalues of B = E[M]
(largest relative gap among the first 2c) against c = 10. The JSON also keeps the
minimum of the timed repeats beside the median (on a shared machine the gap between them
shows the contention).

    python benchmarks/bench_kfac.py [--quick] [--threads 1,2] [--repeats 5]
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, parser, table, write_json  # noqa: E402

import hesslab as hl  # noqa: E402
from hesslab import zoo  # noqa: E402
from hesslab.analysis.overlap import dominant_eigenvalues, eigenvector_low_rank, overlap_curve  # noqa: E402
from hesslab.linops import KFAC, layer_hessian  # noqa: E402

CE = nn.CrossEntropyLoss()
NUM_CLASSES = 10


def workloads(quick: bool):
    """(name, trained model, one batch, layers to compare with Lanczos)."""
    (Itr, jtr), _ = zoo.digits(image=True)
    torch.set_num_threads(2)
    cnn = zoo.digits_cnn()
    zoo.train(cnn, (Itr, jtr), epochs=3 if quick else 10)
    n_cnn = 256 if quick else 1024
    yield "digits_cnn", cnn, (Itr[:n_cnn], jtr[:n_cnn]), None
    res = zoo.resnet_small()
    zoo.train(res, (Itr, jtr), epochs=1 if quick else 3)
    n_res = 128 if quick else 256
    # Lanczos on every layer of the ResNet costs minutes; --quick compares the small ones
    res_layers = ["stem.0", "stages.1.short.0", "head"] if quick else None
    yield "resnet_small", res, (Itr[:n_res], jtr[:n_res]), res_layers


def build(model, data, approx: str = "expand") -> KFAC:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="KFAC: skipped")
        return KFAC(model, CE, data, kfac_approx=approx)


def median_and_min(fn, repeats: int) -> tuple[float, float]:
    """Median and minimum wall time (s) over ``repeats`` calls after one warm-up."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def timings(name, model, data, threads, repeats) -> dict:
    torch.set_num_threads(threads)
    K = build(model, data)
    build_s, build_min = median_and_min(lambda: build(model, data), repeats)
    n = K.shape[0]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(n, 1, generator=g).to(K.dtype)
    V = torch.randn(n, 10, generator=g).to(K.dtype)
    kfac_1, kfac_1_min = median_and_min(lambda: K.matmat(v), repeats * 4)
    kfac_10, kfac_10_min = median_and_min(lambda: K.matmat(V), repeats * 4)
    H = hl.Hessian(model, CE, data, params=K.param_names)
    hvp_1, hvp_1_min = median_and_min(lambda: H.matmat(v), repeats)
    row = dict(model=name, n=n, layers=len(K.layer_names), samples=K.num_data, threads=threads,
               build_s=build_s, kfac_ms=kfac_1 * 1e3, kfac10_ms=kfac_10 * 1e3, hvp_ms=hvp_1 * 1e3,
               speedup=hvp_1 / kfac_1, build_in_hvps=build_s / hvp_1, hvp_path=H.hvp_path,
               min_build_s=build_min, min_kfac_ms=kfac_1_min * 1e3, min_kfac10_ms=kfac_10_min * 1e3,
               min_hvp_ms=hvp_1_min * 1e3)
    print(row, flush=True)
    return row


def overlaps(name, model, data, layers, k_max: int, quick: bool) -> list[dict]:
    Ks = {approx: build(model, data, approx) for approx in ("expand", "reduce")}
    t0 = time.perf_counter()
    for K in Ks.values():
        K.eigenvalues()  # the factors' eigendecompositions, once
    eig_s = (time.perf_counter() - t0) / 2
    K = Ks["expand"]
    rows = []
    for layer in layers or K.layer_names:
        sl = K.layer_slice(layer)
        n_l = sl.stop - sl.start
        k = min(k_max, n_l - 1)
        H = layer_hessian(model, CE, data, layer)
        t0 = time.perf_counter()
        r = hl.lanczos(H, k=k, tol=1e-4, max_steps=min(n_l, 40 if quick else 150), compute_residuals=False,
                       progress=False)
        t_exact = time.perf_counter() - t0
        out, in_aug = K.layer_shape(layer)
        weight = dict(model.named_modules())[layer].weight
        low = eigenvector_low_rank(r.eigenvectors[:, 0], weight.shape)
        row = dict(model=name, layer=layer, shape=f"{out}×{in_aug}", n=n_l, k=k,
                   lam1_exact=float(r.eigenvalues[0]), top_share=float(low.top_share),
                   lanczos_steps=r.num_steps, converged=r.num_converged, lanczos_s=t_exact, eig_s=eig_s)
        for approx, Ka in Ks.items():
            vals, U = Ka.topk(layer, k)
            curve = overlap_curve(U, r.eigenvectors.to(U.dtype), atol=1e-2, label=f"{name}/{layer} {approx}")
            tag = approx[0]  # e / r
            row.update({f"lam1_{tag}": float(vals[0]), f"ov1_{tag}": curve.at(1), f"ov5_{tag}": curve.at(min(5, k)),
                        f"ovk_{tag}": curve.at(k), f"curve_{tag}": curve.overlaps.tolist(),
                        f"dominant_{tag}": dominant_eigenvalues(
                            Ka.factors[layer].B, num_classes=NUM_CLASSES, max_count=min(out - 1, 2 * NUM_CLASSES)
                        ).count})
        print({k_: v for k_, v in row.items() if not k_.startswith("curve")}, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    if args.device != "cpu":
        raise SystemExit("bench_kfac.py measures the CPU; --device cuda is not supported here")
    threads = [int(t) for t in args.threads.split(",")]
    repeats = 3 if args.quick else args.repeats
    t_rows, o_rows = [], []
    for name, model, data, layers in workloads(args.quick):
        for t in threads:
            t_rows.append(timings(name, model, data, t, repeats))
        torch.set_num_threads(1)  # robust on a shared machine; these are not timings
        o_rows += overlaps(name, model, data, layers, NUM_CLASSES, args.quick)
    env = environment("cpu")
    env["threads_measured"] = threads
    env["quick"] = bool(args.quick)
    path = write_json("kfac", {"environment": env, "timings": t_rows, "overlaps": o_rows}, args.out)
    print("\n" + table(t_rows, [
        ("model", "model", "s"), ("n", "params (KFAC layers)", ",d"), ("layers", "layers", "d"),
        ("samples", "samples", "d"), ("threads", "threads", "d"), ("build_s", "build s", ".3f"),
        ("build_in_hvps", "build / exact product", ".1f"), ("kfac_ms", "KFAC product ms", ".3f"),
        ("kfac10_ms", "KFAC 10 columns ms", ".3f"), ("hvp_ms", "exact product ms", ".1f"),
        ("speedup", "exact / KFAC", ".0f"),
    ]))
    print("\n" + table(o_rows, [
        ("model", "model", "s"), ("layer", "layer", "s"), ("shape", "out×(in+1)", "s"), ("k", "k", "d"),
        ("lam1_exact", "λ₁ exact", ".3g"), ("lam1_e", "λ₁ expand", ".3g"), ("lam1_r", "λ₁ reduce", ".3g"),
        ("ov1_e", "overlap k=1 e/r", ".2f"), ("ov1_r", "", ".2f"), ("ov5_e", "k=5 e/r", ".2f"), ("ov5_r", "", ".2f"),
        ("ovk_e", "k=10 e/r", ".2f"), ("ovk_r", "", ".2f"), ("top_share", "σ₁²/Σσ² exact v₁", ".2f"),
        ("dominant_e", "dominant eig. of B (expand)", "d"), ("converged", "Lanczos converged", "d"),
    ]))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
