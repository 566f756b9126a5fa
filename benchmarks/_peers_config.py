"""bench_peers' tools, tasks, labels and the notes on how each setting was matched (or not)."""

from __future__ import annotations

import torch

TOOLS = ("hesslab", "hesslab-local", "pyhessian", "hessian-eigenthings", "curvlinops")
MODULES = {"hesslab": "hesslab", "hesslab-local": "hesslab", "pyhessian": "pyhessian",
           "hessian-eigenthings": "hessian_eigenthings", "curvlinops": "curvlinops"}
DISTRIBUTIONS = {"hesslab": "hesslab", "hesslab-local": "hesslab", "pyhessian": "pyhessian",
                 "hessian-eigenthings": "hessian-eigenthings", "curvlinops": "curvlinops-for-pytorch"}
# Supporting packages whose versions go into the environment record.
SUPPORT = ("backpack-for-pytorch", "einops", "einconv", "linear_operator", "opt-einsum", "unfoldNd", "numpy", "scipy")
TASKS = ("top10", "slq", "trace")
# The product-dominated workloads of issue 15 (float32, products of tens to hundreds of ms): rows at
# matched settings and at each tool's own defaults, ratios against the fastest equally accurate peer.
PRODUCT_WORKLOADS = ("cnn512", "resnet128")
DEFAULTS_WORKLOADS = ("cnn512", "resnet128")
# Workloads whose defaults rows are limited to these tools' tasks (all others: minutes more). On resnet128
# hesslab's verified top-10 (its own defaults, ~22 s) is the only one.
DEFAULTS_ONLY = {"resnet128": {"hesslab": ("top10",)}}
# The top-10 reference of the product workloads: a float64 Lanczos run on the float64 copy. On resnet128 it
# would take minutes (30-60 s with 16 images already), so resnet128 has none: its top-10 peers there are
# hessian-eigenthings (hesslab's step count, full reorthogonalization) and curvlinops (ARPACK, tol 1e-6),
# converged methods that count as equally accurate; PyHessian's power iteration is skipped on it.
REFERENCE = {"cnn512": {"dtype": torch.float64, "tol": 1e-10, "seed": 0}}
# Skipped to keep make bench's added time near 8 minutes (measured on the 16-image ResNet instead).
SKIPPED = {("resnet128", "pyhessian", "top10"): "deflated power iteration, ~360 products (4-7x hesslab's)"}
# Tasks whose "defaults" call differs from the matched one, per tool (the others would repeat a row).
DEFAULTS_DIFFER = {"hesslab": ("top10", "trace"), "pyhessian": ("slq", "trace"),
                   "hessian-eigenthings": ("top10", "slq", "trace"), "curvlinops": ("top10",)}
# Equally accurate: an error at most this factor above hesslab's, or both below the floor of the dtype
# (float32 products cap every tool near 1e-6 relative; float64 near 1e-12).
ACCURACY_FACTOR = 10.0
ERROR_FLOOR = {"float32": 1e-5, "float64": 1e-10}
TOOL_TASKS = {"hesslab-local": ("slq",)}  # a variant measured on the task it changes only
TASK_LABEL = {"top10": "top-10 eigenvalues", "slq": "SLQ density", "trace": "Hutchinson trace"}
ERROR_LABEL = {"top10": "max rel. err. of the 10 eigenvalues", "slq": "1-Wasserstein distance to the exact spectrum",
               "trace": "relative error of the trace"}
LANCZOS_TOL = 1e-6  # hesslab's residual tolerance and ARPACK's (curvlinops) tol for the top-10

NOTES = {
    "product workloads": (
        "cnn512: zoo.digits_cnn(channels=(4, 96)) (18,962 parameters, most in the last Linear) on 512 1x8x8 digits "
        "images, float32. resnet128: zoo.resnet_small() on 128 1x8x8 digits images, float32 (on 128 3x32x32 "
        "inputs, --resnet128-input 3x32x32, one kept-graph product took 8.2 s on this CPU under load ~6: too slow "
        "for make bench). Accuracy: top-10 on cnn512 against a float64 hesslab Lanczos run (tol 1e-10) on the float64 "
        "copy of the model (none on resnet128: minutes; its top-10 peers are converged Lanczos/ARPACK runs); trace and SLQ have no exact reference at this size, so every tool with the same budget "
        "(Hutchinson, 100 Rademacher products; SLQ 90 steps) counts as equally accurate (error '–'). One timed "
        "run each (the products dominate, so repeats change little) after a small warm-up. SLQ uses 2 probes "
        "on cnn512 and 1 on resnet128 (90 x 2 and 90 products per tool); on resnet128 the defaults rows are hesslab's "
        "top-10 only (~22 s; the others would add ~4 minutes) and PyHessian's top-10 is skipped, to keep "
        "the added time of make bench near 8 minutes."
    ),
    "settings": (
        "matched: the same tolerance, steps and products for every tool (the rows below). defaults: each tool's "
        "own defaults for the task, run only where they differ from matched: hesslab lanczos(k=10) with its "
        "dtype tolerance, its k residual products and verify=True (the verification chains that certify "
        "multiplicities; cnn512 and resnet128) and trace() = Hutch++ 100 (cnn512); PyHessian density() (100 steps, 1 probe) and trace() "
        "(tol 1e-3 early stop); hessian-eigenthings lanczos(k=10) (its Krylov size, tol 1e-4), "
        "spectral_density() (10 x 80) and trace() (Hutch++ 100); curvlinops eigsh(tol=0)."
    ),
    "ratios": (
        "vs best peer = (fastest equally accurate peer's time) / hesslab's time, peers at the same settings in "
        "the same run; > 1: hesslab is faster. Equally accurate: error at most 10x hesslab's, or both below "
        "1e-5 (float32) / 1e-10 (float64); where there is no reference every peer counts."
    ),
    "workloads": (
        "mlp: zoo.digits_mlp() (64-32-32-10), 256 training samples, float64. cnn: zoo.digits_cnn(channels=(4, 8)) "
        "(1,626 parameters, small so that its exact Hessian costs seconds), 128 images, float64. resnet: "
        "zoo.resnet_small() (0.31M parameters, BatchNorm in eval mode) on a batch of 16 1x8x8 digits images, "
        "float32 (the batch is small to fit the run in ~8 minutes: the products are cheap, so solver overhead "
        "weighs more than with big batches). resnet18 (GPU suite): zoo.resnet18_cifar(), untrained, a fixed-seed "
        "N(0,1) batch of 128 3x32x32 inputs, float32. Models trained with zoo.train (seeded)."
    ),
    "matched": (
        "Same model, data, dtype, device and thread count for every tool; the operator is built inside the timed "
        "region (hesslab and PyHessian build the first-order graph once per operator and reuse it; "
        "hessian-eigenthings and curvlinops redo the forward pass for every product)."
    ),
    "dtype": (
        "MLP and CNN run in float64 for every tool (models and data cast; PyHessian allocates its vectors with "
        "the default dtype, so torch.set_default_dtype(float64) is set around its calls); the ResNets run in "
        "float32 for every tool. hesslab accumulates Lanczos inner products in float64 either way."
    ),
    "top10/hesslab": f"hl.lanczos(k=10, which='LA', tol={LANCZOS_TOL}, compute_residuals=False, verify=False): full "
                     "reorthogonalisation (CGS2), runs until the 10 residual estimates are below tol*||T||; no extra "
                     "residual products and no verification chains, i.e. ARPACK's guarantee (ARPACK/curvlinops and "
                     "hessian-eigenthings do not certify multiplicities either: a copy of a multiple eigenvalue the "
                     "first Krylov space never separated can be missed). On resnet128 the chains cost 81 of the "
                     "verified run's 118 products; without them the same 10 eigenvalues converge to 1e-10 relative "
                     "of the verified run's in 37 products. The defaults row is hesslab's own lanczos(k=10): dtype "
                     "tolerance, residual products, verify=True.",
    "top10/pyhessian": "Cannot be matched: PyHessian only has deflated power iteration, eigenvalues(top_n=10, "
                       "maxIter=100, tol=1e-3) (its defaults): up to 100 products per eigenvalue, stopping when the "
                       "Rayleigh quotient changes by < 1e-3 relative; it converges to the largest-magnitude "
                       "eigenvalues (compared here with the largest algebraic ones, the same on these models).",
    "top10/hessian-eigenthings": "lanczos(k=10, which='LA', reorthogonalize=True) has no convergence test, only a "
                                 "fixed Krylov size (default 2k = 20 steps): it is given max_iter = hesslab's step "
                                 "count in the same run, so both spend the same products.",
    "top10/curvlinops": f"curvlinops has no eigensolver of its own; its documented route is scipy's eigsh (ARPACK, "
                        f"implicitly restarted Lanczos) on HessianLinearOperator.to_scipy(): eigsh(k=10, "
                        f"which='LA', tol={LANCZOS_TOL}).",
    "slq/hesslab": "hl.spectral_density(num_steps=90, num_probes=8): the 8 probes (Gaussian) advance together, one "
                   "8-column product per step, full reorthogonalisation in the compiled kernel.",
    "slq/hesslab-local": "hl.spectral_density(num_steps=90, num_probes=8, reorthogonalize='local'): as hesslab, "
                         "but each new vector is orthogonalised against the previous two only (3 vectors kept "
                         "per probe instead of 90); converged outliers reappear as duplicate Ritz values whose "
                         "weights add up, so the quadrature stays accurate (the error column measures it).",
    "slq/pyhessian": "density(iter=90, n_v=8): Rademacher probes one after another, one-pass Gram-Schmidt against "
                     "every previous vector in Python; it calls torch.eig, removed from torch, so torch.eig is "
                     "shimmed with torch.linalg.eigh on its (symmetric) tridiagonal matrix.",
    "slq/hessian-eigenthings": "spectral_density(num_runs=8, lanczos_steps=90): Rademacher probes one after "
                               "another, full reorthogonalisation (one Gram-Schmidt pass, a host sync per inner "
                               "product).",
    "slq/curvlinops": "lanczos_approximate_spectrum(ncv=90, num_repeats=8) (Papyan 2020): Gaussian probes one "
                      "after another, NO reorthogonalisation, and by default the spectrum's ends are first "
                      "estimated with eigsh(k=2, which='BE', tol=1e-2), whose products are counted. Its nodes and "
                      "weights are taken from its fast_lanczos calls (wrapped) for the accuracy figure.",
    "trace": "Hutchinson with 100 Rademacher products for every tool. hesslab: trace(method='hutchinson') in "
             "blocks of 10 columns; PyHessian: trace(maxIter=100, tol=-inf) so its early stop never triggers; "
             "hessian-eigenthings: trace(method='hutchinson', num_matvecs=100); curvlinops: "
             "hutchinson_trace(A, 100), one 100-column product (vmap); on out-of-memory it is repeated in "
             "10-column calls (noted in the row).",
    "counting": (
        "Products are counted (and timed) at each tool's product entry point: hesslab's operator counter "
        "(num_matvecs; the time from its instance's _product, which every solver reaches through matmat -> "
        "_matmat; left out: the finite-difference derivative check _matmat runs once per operator at its "
        "first product, float64 gradients, which counts as overhead); "
        "PyHessian's hessian_vector_product (patched in pyhessian.hessian); hessian-eigenthings' "
        "HessianOperator.matvec (instance attribute); curvlinops' _matmat, counting columns (eigsh and the "
        "boundary estimate go through it too)."
    ),
    "curvlinops-check": "curvlinops runs with check_deterministic=False (its check costs two products and two "
                        "gradient passes; hesslab skips its own check for a single batch in eval mode).",
    "accuracy": "top-10: max_i |l_i - l_i*| / |l_i*| over the 10 largest eigenvalues; trace: |t - tr H| / |tr H|; "
                "SLQ: scipy.stats.wasserstein_distance between the quadrature measure (all probes' nodes, "
                "weights / probes) and the exact eigenvalues (weight 1/n each). Stochastic estimates (trace, SLQ) "
                "differ by their random probes as much as by the method.",
    "memory": "CPU: peak resident set above the resident set just before the task (VmHWM reset through "
              "/proc/self/clear_refs, else ru_maxrss deltas in a process per task). GPU: "
              "torch.cuda.max_memory_allocated above the allocation before the task.",
    "timing": "Wall time: the median of the timed repeats (mlp, cnn: 2, the faster of the two; resnet: 1) after a "
              "warm-up that sends a few products through the same code paths; each tool in its own process, tools "
              "one after another, so a change in the machine's load hits them unequally: the load average is "
              "recorded, and total/floor (against the tool's own single product, measured in the same process) "
              "and total/in-products are the steadier figures. The product workloads (cnn512, resnet128) run "
              "two rounds over the tools, the second in reverse order (ABC, CBA), and each row's times are the "
              "means of its two rounds ('round_seconds' in the JSON), so that a drift of the machine's speed "
              "over the minutes of a workload weighs on every tool alike.",
    "threads": "mlp at every --threads count; cnn and resnet at the first only by default (--cnn-threads 1,2 "
               "and --resnet-threads 1,2 add their 2-thread figures, about 4 and 5 more minutes: on this machine "
               "the small CNN's 2-thread runs were 3-6x slower than its 1-thread runs for every tool, which "
               "measures the starved second core more than the tools). Workers run with OMP_WAIT_POLICY=PASSIVE unless "
               "the environment sets it: with the default (spinning) policy, 2-thread runs on this shared 2-core "
               "machine stalled at every parallel region (one product of the small CNN: 1.2 s median with 2 "
               "threads against 5 ms with 1; 12 ms with PASSIVE). With tiny models 2 threads still lose to 1.",
    "floor": "'own HVP ms' is one single-column product of the tool's own operator (after warm-up); "
             "total/floor = wall time / (products x own HVP ms): what the solver adds on top of its products "
             "(below 1 where several columns share one pass over the data). On this shared 2-core VM the "
             "machine's speed drifts by ~30% over seconds and a product timed in a burst is faster than the "
             "same product sustained through a 15 s run, so total/floor mixes solver overhead with drift. "
             "'in-run ms/HVP' is the wall time spent inside the tool's product entry point during the timed "
             "run (the counting wrappers time it; torch.cuda.synchronize() at both ends on a GPU) per HVP, and "
             "total/in-products = wall time / that time: what the solver adds on top of the products it "
             "actually ran (1.00 = nothing), the steadier figure. It counts the operator's construction and "
             "everything between products (orthogonalisation, eigensolves, Python) as the solver's.",
}
