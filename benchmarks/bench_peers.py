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
batch of 128). Sizes are chosen so the full CPU run takes about 8 minutes on 2 cores:
the CNN and the ResNet run at the first thread count only unless --cnn-threads /
--resnet-threads say otherwise.

Figures per tool, task and thread count: wall time (median of the timed repeats after a
warm-up, the lower one for an even count, the operator's construction included), Hessian-vector products (counted at each
tool's product entry point), time per product, the tool's own single product time and
the ratio total / (products x that), accuracy (top-10: max relative error of the 10
eigenvalues; trace: relative error; SLQ: 1-Wasserstein distance between the quadrature
measure and the exact spectrum), peak memory above the process's resident set before the
task (CPU: VmHWM reset through /proc/self/clear_refs, or ru_maxrss deltas in a process
per task where that is not allowed; GPU: torch.cuda.max_memory_allocated), and the time
ratio against hesslab in the same run. Every tool runs in its own subprocess.

    python benchmarks/bench_peers.py [--quick] [--device cuda] [--threads 1,2]
        [--workloads mlp,cnn,resnet | resnet18] [--tools hesslab,pyhessian,...]
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, environment, parser, sync, table, write_json  # noqa: E402

TOOLS = ("hesslab", "hesslab-local", "pyhessian", "hessian-eigenthings", "curvlinops")
MODULES = {"hesslab": "hesslab", "hesslab-local": "hesslab", "pyhessian": "pyhessian",
           "hessian-eigenthings": "hessian_eigenthings", "curvlinops": "curvlinops"}
DISTRIBUTIONS = {"hesslab": "hesslab", "hesslab-local": "hesslab", "pyhessian": "pyhessian",
                 "hessian-eigenthings": "hessian-eigenthings", "curvlinops": "curvlinops-for-pytorch"}
# Supporting packages whose versions go into the environment record.
SUPPORT = ("backpack-for-pytorch", "einops", "einconv", "linear_operator", "opt-einsum", "unfoldNd", "numpy", "scipy")
TASKS = ("top10", "slq", "trace")
TOOL_TASKS = {"hesslab-local": ("slq",)}  # a variant measured on the task it changes only
TASK_LABEL = {"top10": "top-10 eigenvalues", "slq": "SLQ density", "trace": "Hutchinson trace"}
ERROR_LABEL = {"top10": "max rel. err. of the 10 eigenvalues", "slq": "1-Wasserstein distance to the exact spectrum",
               "trace": "relative error of the trace"}
LANCZOS_TOL = 1e-6  # hesslab's residual tolerance and ARPACK's (curvlinops) tol for the top-10

NOTES = {
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
    "top10/hesslab": f"hl.lanczos(k=10, which='LA', tol={LANCZOS_TOL}): full reorthogonalisation (CGS2), runs until "
                     "the 10 residual estimates are below tol*||T||; no extra residual products.",
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
        "Products are counted at each tool's product entry point: hesslab's operator counter (num_matvecs); "
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
              "is the steadier figure.",
    "threads": "mlp at every --threads count; cnn and resnet at the first only by default (--cnn-threads 1,2 "
               "and --resnet-threads 1,2 add their 2-thread figures, about 4 and 5 more minutes: on this machine "
               "the small CNN's 2-thread runs were 3-6x slower than its 1-thread runs for every tool, which "
               "measures the starved second core more than the tools). Workers run with OMP_WAIT_POLICY=PASSIVE unless "
               "the environment sets it: with the default (spinning) policy, 2-thread runs on this shared 2-core "
               "machine stalled at every parallel region (one product of the small CNN: 1.2 s median with 2 "
               "threads against 5 ms with 1; 12 ms with PASSIVE). With tiny models 2 threads still lose to 1.",
    "floor": "'own HVP ms' is one single-column product of the tool's own operator (after warm-up); "
             "total/floor = wall time / (products x own HVP ms): what the solver adds on top of its products "
             "(below 1 where several columns share one pass over the data).",
}


# ----------------------------------------------------------------------------- memory
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def can_reset_peak() -> bool:
    """Whether this process may reset its peak RSS (Linux >= 4.0: write '5' to clear_refs)."""
    try:
        _CLEAR_REFS.write_text("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block above what was resident (CPU) or allocated (GPU) before it, in MB."""

    def __init__(self, device: str, resettable: bool):
        self.device, self.resettable = device, resettable

    def __enter__(self):
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        elif self.resettable:
            _malloc_trim()  # hand freed heap back, so the baseline is the live set
            _CLEAR_REFS.write_text("5")
            self.before = (_status_kb("VmRSS") or 0) * 1024
        else:
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.resettable:
            peak = (_status_kb("VmHWM") or 0) * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.mb = max(0.0, (peak - self.before) / 2**20)
        return False


# ---------------------------------------------------------------------------- helpers
def _counting(fn: Callable, counter: dict, columns: Callable[..., int] = lambda *a, **k: 1) -> Callable:
    def wrapped(*args, **kwargs):
        counter["n"] += columns(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapped


def _flat(params) -> int:
    return sum(p.numel() for p in params)


def _measure(nodes: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten per-probe quadratures into one measure (weights / probes), dropping padding."""
    nodes = np.asarray(nodes, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    keep = np.isfinite(nodes) & np.isfinite(weights) & (weights > 0)
    return nodes[keep], weights[keep] / max(len(nodes), 1)


# ---------------------------------------------------------------------------- adapters
class Adapter:
    """One tool's three tasks on a (model, loss, data) triple. Methods return plain dicts."""

    name = ""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, data: tuple, device: str):
        self.model, self.loss_fn, self.data, self.device = model, loss_fn, data, device
        self.dtype = next(model.parameters()).dtype
        self.counter = {"n": 0}
        self.notes: list[str] = []

    def top_k(self, k: int, steps: int | None, small: bool) -> dict:
        raise NotImplementedError

    def slq(self, steps: int, probes: int, small: bool) -> dict:
        raise NotImplementedError

    def trace(self, num: int) -> dict:
        raise NotImplementedError

    def hvp_fn(self) -> Callable[[], Any]:
        """A closure doing one single-column product of the tool's own operator."""
        raise NotImplementedError


class HesslabAdapter(Adapter):
    name = "hesslab"
    reorthogonalize = "full"

    def _op(self):
        import hesslab as hl

        return hl.Hessian(self.model, self.loss_fn, self.data, progress=False)

    def top_k(self, k, steps, small):
        import hesslab as hl

        H = self._op()
        kw = {"k": 2, "max_steps": 6} if small else {"k": k}
        r = hl.lanczos(H, which="LA", tol=LANCZOS_TOL, compute_residuals=False, progress=False, **kw)
        return {"eigenvalues": r.eigenvalues.numpy().tolist(), "products": H.num_matvecs, "steps": r.num_steps,
                "converged": int(r.num_converged)}

    def slq(self, steps, probes, small):
        import hesslab as hl

        H = self._op()
        d = hl.spectral_density(H, num_steps=steps, num_probes=probes, seed=0, progress=False,
                                reorthogonalize=self.reorthogonalize)
        valid = d.valid()
        nodes = np.where(valid, d.nodes, np.nan)
        return {"nodes": nodes, "weights": np.where(valid, d.weights, 0.0), "products": H.num_matvecs}

    def trace(self, num):
        import hesslab as hl

        H = self._op()
        t = hl.trace(H, num_matvecs=num, method="hutchinson", seed=0, progress=False)
        return {"value": t.value, "products": H.num_matvecs}

    def hvp_fn(self):
        H = self._op()
        v = torch.randn(H.shape[0], 1, dtype=H.dtype, device=H.device)
        return lambda: H.matmat(v)


class HesslabLocalAdapter(HesslabAdapter):
    name = "hesslab-local"
    reorthogonalize = "local"


class PyHessianAdapter(Adapter):
    name = "pyhessian"

    def __init__(self, *args):
        super().__init__(*args)
        import importlib

        ph = importlib.import_module("pyhessian.hessian")  # the package re-exports a class of the same name
        self._ph = ph
        ph.hessian_vector_product = _counting(ph.hessian_vector_product, self.counter)
        # torch.eig was removed from torch (a stub raises); density() calls it on its symmetric T.
        if True:
            def _eig(T, eigenvectors=False):
                w, V = torch.linalg.eigh(T)
                return torch.stack([w, torch.zeros_like(w)], 1), V

            torch.eig = _eig

    def _run(self, fn):
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        torch.manual_seed(0)
        self.model.zero_grad(set_to_none=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hc = self._ph.hessian(self.model, self.loss_fn, data=self.data, cuda=self.device.startswith("cuda"))
                return fn(hc)
        finally:
            self.model.zero_grad(set_to_none=True)  # PyHessian leaves the first-order graph in .grad
            torch.set_default_dtype(default)

    def top_k(self, k, steps, small):
        c0 = self.counter["n"]
        vals, _ = self._run(lambda hc: hc.eigenvalues(maxIter=3 if small else 100, tol=1e-3, top_n=1 if small else k))
        return {"eigenvalues": sorted(vals, reverse=True), "products": self.counter["n"] - c0}

    def slq(self, steps, probes, small):
        c0 = self.counter["n"]
        e, w = self._run(lambda hc: hc.density(iter=steps, n_v=probes))
        return {"nodes": np.array(e), "weights": np.array(w), "products": self.counter["n"] - c0}

    def trace(self, num):
        c0 = self.counter["n"]
        vals = self._run(lambda hc: hc.trace(maxIter=num, tol=float("-inf")))
        return {"value": float(np.mean(vals)), "products": self.counter["n"] - c0}

    def hvp_fn(self):
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            self.model.zero_grad(set_to_none=True)
            hc = self._ph.hessian(self.model, self.loss_fn, data=self.data, cuda=self.device.startswith("cuda"))
        finally:
            torch.set_default_dtype(default)
        v = [torch.randn_like(p) for p in hc.params]
        import pyhessian.utils as pu

        return lambda: pu.hessian_vector_product(hc.gradsH, hc.params, v)


class EigenthingsAdapter(Adapter):
    name = "hessian-eigenthings"

    def _op(self):
        import hessian_eigenthings as he

        op = he.HessianOperator(self.model, [self.data], he.supervised_loss(self.loss_fn))
        op.matvec = _counting(op.matvec, self.counter)
        return op

    def top_k(self, k, steps, small):
        import hessian_eigenthings as he

        op, c0 = self._op(), self.counter["n"]
        n = op.size
        m = 4 if small else min(n - 1, steps or 6 * k)
        r = he.lanczos(op, k=min(k, m), max_iter=m, which="LA", reorthogonalize=True, seed=0)
        return {"eigenvalues": r.eigenvalues.detach().cpu().double().numpy().tolist(),
                "products": self.counter["n"] - c0, "steps": r.iterations}

    def slq(self, steps, probes, small):
        import hessian_eigenthings as he

        op, c0 = self._op(), self.counter["n"]
        d = he.spectral_density(op, num_runs=probes, lanczos_steps=steps, seed=0)
        return {"nodes": d.raw_eigenvalues.detach().cpu().double().numpy(),
                "weights": d.raw_weights.detach().cpu().double().numpy(), "products": self.counter["n"] - c0}

    def trace(self, num):
        import hessian_eigenthings as he

        op, c0 = self._op(), self.counter["n"]
        t = he.trace(op, num_matvecs=num, method="hutchinson", seed=0)
        return {"value": float(t.estimate), "products": self.counter["n"] - c0}

    def hvp_fn(self):
        op = self._op()
        v = torch.randn(op.size, dtype=op.dtype, device=op.device)
        return lambda: op.matvec(v)


class CurvlinopsAdapter(Adapter):
    name = "curvlinops"

    def _op(self):
        import curvlinops

        params = [p for p in self.model.parameters() if p.requires_grad]
        op = curvlinops.HessianLinearOperator(self.model, self.loss_fn, params, [self.data],
                                              check_deterministic=False)
        op._matmat = _counting(op._matmat, self.counter, lambda M: M[0].shape[-1])
        return op

    def top_k(self, k, steps, small):
        from scipy.sparse.linalg import ArpackNoConvergence, eigsh

        op, c0 = self._op(), self.counter["n"]
        torch.manual_seed(0)
        v0 = np.random.default_rng(0).standard_normal(op.shape[0])
        try:
            if small:
                vals = eigsh(op.to_scipy(), k=2, ncv=5, maxiter=1, which="LA", tol=LANCZOS_TOL, v0=v0,
                             return_eigenvectors=False)
            else:
                vals, _ = eigsh(op.to_scipy(), k=k, which="LA", tol=LANCZOS_TOL, v0=v0)
        except ArpackNoConvergence as err:
            vals = err.eigenvalues
        return {"eigenvalues": sorted(np.asarray(vals, dtype=np.float64).tolist(), reverse=True),
                "products": self.counter["n"] - c0}

    def slq(self, steps, probes, small):
        import curvlinops.papyan2020traces.spectrum as sp

        op, c0 = self._op(), self.counter["n"]
        runs = []
        original = sp.fast_lanczos

        def recording(A, ncv, *a, **kw):
            evals, evecs = original(A, ncv, *a, **kw)
            runs.append((evals.detach().cpu().double().numpy(), (evecs[0, :] ** 2).detach().cpu().double().numpy()))
            return evals, evecs

        sp.fast_lanczos = recording
        torch.manual_seed(0)
        try:
            sp.lanczos_approximate_spectrum(op, ncv=steps, num_repeats=probes,
                                            boundaries=(0.0, 1.0) if small else None)
        finally:
            sp.fast_lanczos = original
        return {"nodes": np.stack([r[0] for r in runs]), "weights": np.stack([r[1] for r in runs]),
                "products": self.counter["n"] - c0}

    def trace(self, num):
        import curvlinops

        op, c0 = self._op(), self.counter["n"]
        torch.manual_seed(0)
        value = None
        try:
            value = float(curvlinops.hutchinson_trace(op, num))
        except torch.OutOfMemoryError:
            pass  # retried below, once the failed attempt's tensors are released
        if value is None:
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            chunk = max(1, num // 10)
            value = float(np.mean([float(curvlinops.hutchinson_trace(op, chunk)) for _ in range(num // chunk)]))
            self.notes.append(f"trace: one {num}-column product ran out of memory; {num // chunk} calls of {chunk}")
        return {"value": value, "products": self.counter["n"] - c0}

    def hvp_fn(self):
        op = self._op()
        v = torch.randn(op.shape[0], dtype=op.dtype, device=op.device)
        return lambda: op @ v


ADAPTERS = {a.name: a for a in (HesslabAdapter, HesslabLocalAdapter, PyHessianAdapter, EigenthingsAdapter, CurvlinopsAdapter)}


# ----------------------------------------------------------------------------- worker
def _accuracy(task: str, out: dict, exact: dict | None) -> float | None:
    if exact is None:
        return None
    if task == "top10":
        ref = np.asarray(exact["top"], dtype=np.float64)
        got = np.asarray(out["eigenvalues"], dtype=np.float64)
        k = min(len(ref), len(got))
        return float(np.max(np.abs(got[:k] - ref[:k]) / np.abs(ref[:k]))) if k else None
    if task == "trace":
        return abs(out["value"] - exact["trace"]) / abs(exact["trace"])
    from scipy.stats import wasserstein_distance

    x, w = _measure(out["nodes"], out["weights"])
    return float(wasserstein_distance(x, np.asarray(exact["eigenvalues"]), u_weights=w))


def _median_index(times: list[float]) -> int:
    return sorted(range(len(times)), key=times.__getitem__)[(len(times) - 1) // 2]


def worker(spec_path: str) -> None:
    """Runs one tool's tasks on one workload for every thread count; writes a JSON list of rows."""
    spec = json.loads(Path(spec_path).read_text())
    warnings.filterwarnings("ignore")
    device = spec["device"]
    payload = torch.load(spec["payload"], weights_only=False)
    w = payload[spec["workload"]]
    model = w["model"].to(device).eval()
    X, y = w["data"]
    data = (X.to(device), y.to(device))
    exact = w.get("exact")
    adapter = ADAPTERS[spec["tool"]](model, nn.CrossEntropyLoss(), data, device)
    resettable = spec["resettable"]
    rows = []
    for threads in spec["threads"]:
        torch.set_num_threads(threads)
        hvp_ms = None
        try:
            fn = adapter.hvp_fn()
            fn()
            times = []
            for _ in range(5):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - t0)
            hvp_ms = statistics.median(times) * 1e3
            del fn
        except Exception as err:  # noqa: BLE001 - reported in the row
            adapter.notes.append(f"single product: {type(err).__name__}: {err}")
        model.zero_grad(set_to_none=True)
        for task in spec["tasks"]:
            cfg = spec["config"]
            steps = spec.get("krylov_steps")

            def call(small: bool) -> dict:
                if task == "top10":
                    return adapter.top_k(cfg["k"], steps, small)
                if task == "slq":
                    return adapter.slq(3, 1, True) if small else adapter.slq(cfg["slq_steps"], cfg["slq_probes"], False)
                return adapter.trace(3 if small else cfg["trace_products"])

            row = dict(workload=spec["workload"], n=w["n"], dtype=w["dtype"], device=device, tool=adapter.name,
                       task=task, threads=threads if not device.startswith("cuda") else None)
            try:
                call(spec["warmup"] == "small")  # warm-up
                times, outs, mems = [], [], []
                for _ in range(spec["repeats"]):
                    adapter.notes.clear()
                    with PeakMemory(device, resettable) as mem:
                        sync(device)
                        t0 = time.perf_counter()
                        out = call(False)
                        sync(device)
                        times.append(time.perf_counter() - t0)
                    outs.append(out)
                    mems.append(mem.mb)
                i = _median_index(times)
                out = outs[i]
                row.update(seconds=times[i], times=times, products=out["products"], hvp_ms=hvp_ms,
                           peak_mb=max(mems), mem_method="cuda" if device.startswith("cuda") else
                           ("vmhwm-reset" if resettable else "ru_maxrss-delta"))
                row["ms_per_product"] = 1e3 * times[i] / out["products"] if out["products"] else None
                if hvp_ms and out["products"]:
                    row["floor_ratio"] = times[i] / (out["products"] * hvp_ms / 1e3)
                row["error"] = _accuracy(task, out, exact)
                if task == "top10":
                    row["eigenvalues"] = [float(v) for v in out["eigenvalues"]]
                    row["steps"] = out.get("steps")
                    if "converged" in out:
                        row["converged"] = out["converged"]
                elif task == "trace":
                    row["value"] = out["value"]
                if adapter.notes:
                    row["note"] = "; ".join(adapter.notes)
            except Exception as err:  # noqa: BLE001 - a failing peer must not stop the others
                row["failed"] = f"{type(err).__name__}: {str(err)[:300]}"
            model.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("times", "eigenvalues")}), flush=True)
    Path(spec["result"]).write_text(json.dumps(rows))


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


def build_workloads(names: list[str], quick: bool, resnet_batch: int, resnet18_batch: int, threads: int) -> dict:
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
        elif name == "resnet18":
            model = zoo.resnet18_cifar()
            gen = torch.Generator().manual_seed(0)
            m = resnet18_batch
            data = (torch.randn(m, 3, 32, 32, generator=gen), torch.randint(0, 10, (m,), generator=gen))
            desc = f"resnet18_cifar (BatchNorm, eval mode, untrained), fixed-seed random batch of {m} 3x32x32, float32"
        else:
            raise SystemExit(f"unknown workload {name!r} (mlp, cnn, resnet, resnet18)")
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
        entry["setup_seconds"] = time.perf_counter() - t0
        print(f"[setup] {name}: {desc}, n = {n:,}, {entry['setup_seconds']:.1f} s"
              + (f" (exact Hessian {entry['exact_seconds']:.1f} s)" if "exact" in entry else ""), flush=True)
        out[name] = entry
    return out


def run_worker(spec: dict, tmp: Path, timeout: float) -> list[dict]:
    tag = f"{spec['workload']}-{spec['tool']}-{'-'.join(spec['tasks'])}"
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
    print(f"[{spec['workload']}] {spec['tool']:<20} {','.join(spec['tasks']):<16} {time.perf_counter() - t0:6.1f} s"
          + (f"  FAILED: {failed}" if failed else ""), flush=True)
    result = Path(spec["result"])
    if result.exists():
        return json.loads(result.read_text())
    return [dict(workload=spec["workload"], tool=spec["tool"], task=t, threads=th, failed=failed)
            for th in spec["threads"] for t in spec["tasks"]]


def add_ratios(rows: list[dict]) -> None:
    ref = {(r["workload"], r.get("threads"), r["task"]): r for r in rows if r["tool"] == "hesslab" and "seconds" in r}
    for r in rows:
        h = ref.get((r["workload"], r.get("threads"), r["task"]))
        if h is not None and r.get("seconds"):
            r["vs_hesslab"] = r["seconds"] / h["seconds"]
            if r.get("peak_mb") is not None and h.get("peak_mb"):
                r["mem_vs_hesslab"] = r["peak_mb"] / h["peak_mb"]


COLUMNS = [("workload", "workload", "s"), ("threads", "thr", "d"), ("task", "task", "s"), ("tool", "tool", "s"),
           ("seconds", "time s", ".2f"), ("products", "HVPs", "d"), ("ms_per_product", "ms/HVP", ".1f"),
           ("hvp_ms", "own HVP ms", ".1f"), ("floor_ratio", "total/floor", ".2f"), ("error", "error", ".2e"),
           ("peak_mb", "peak MB", ".0f"), ("vs_hesslab", "time ÷ hesslab", ".2f")]


def render(rows: list[dict], env: dict, settings: dict) -> str:
    shown = [dict(r, task=TASK_LABEL.get(r["task"], r["task"]) + (" (FAILED)" if r.get("failed") else "")) for r in rows]
    lines = [table(shown, COLUMNS), "",
             "error: " + "; ".join(f"{TASK_LABEL[t]}: {ERROR_LABEL[t]}" for t in TASKS) + " (– where no exact Hessian).",
             "time ÷ hesslab > 1: hesslab is faster. total/floor: wall time / (HVPs × the tool's own single HVP).", ""]
    fails = [r for r in rows if r.get("failed")]
    for r in fails:
        lines.append(f"- FAILED {r['workload']} {r['tool']} {r['task']} (threads {r.get('threads')}): {r['failed']}")
    for r in rows:
        if r.get("note"):
            lines.append(f"- note {r['workload']} {r['tool']} {r['task']}: {r['note']}")
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workloads", default=None, help="comma separated: mlp, cnn, resnet, resnet18 "
                   "(default mlp,cnn,resnet; resnet18 is the GPU suite's)")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma separated subset of " + ", ".join(TOOLS))
    p.add_argument("--resnet-batch", type=int, default=None, help="images in the resnet_small batch (default 16)")
    p.add_argument("--cnn-threads", default=None,
                   help="thread counts for the digits CNN (default: the first of --threads, to keep the run short)")
    p.add_argument("--resnet-threads", default=None,
                   help="thread counts for resnet_small (default: the first of --threads, to keep the run short)")
    p.add_argument("--resnet18-batch", type=int, default=128, help="images in the ResNet-18 batch")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
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
    workloads = (args.workloads or ("mlp,resnet" if args.quick else "mlp,cnn,resnet")).split(",")
    resnet_batch = args.resnet_batch or (4 if args.quick else 16)
    resnet_threads = [int(t) for t in args.resnet_threads.split(",")] if args.resnet_threads else threads[:1]
    cnn_threads = [int(t) for t in args.cnn_threads.split(",")] if args.cnn_threads else threads[:1]
    if cuda:
        resnet_threads = cnn_threads = threads
    config = ({"k": 5, "slq_steps": 20, "slq_probes": 4, "trace_products": 30} if args.quick
              else {"k": 10, "slq_steps": 90, "slq_probes": 8, "trace_products": 100})
    # Repeats: the products dominate, so cheap workloads get more. --repeats caps them.
    repeats = {"mlp": 2, "cnn": 2, "resnet": 1, "resnet18": 3}
    if args.quick:
        repeats = dict.fromkeys(repeats, 1)
    repeats = {k: min(v, args.repeats) for k, v in repeats.items()}
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
        payload = build_workloads(workloads, args.quick, resnet_batch, args.resnet18_batch, 1)
        torch.save(payload, tmp / "payload.pt")
        for wl in workloads:
            krylov_steps = None
            for tool in tools:
                tool_tasks = TOOL_TASKS.get(tool, TASKS)
                groups = [list(tool_tasks)] if resettable or cuda else [[t] for t in tool_tasks]
                for tasks in groups:
                    spec = dict(workload=wl, tool=tool, tasks=tasks, device=device,
                                threads={"resnet": resnet_threads, "cnn": cnn_threads}.get(wl, threads),
                                payload=str(tmp / "payload.pt"), repeats=repeats[wl], warmup=warmup[wl],
                                config=config, resettable=resettable, krylov_steps=krylov_steps,
                                omp_wait_policy=args.omp_wait_policy)
                    got = run_worker(spec, tmp, args.timeout)
                    rows += got
                    if tool == "hesslab":
                        steps = [r.get("steps") for r in got if r.get("task") == "top10" and r.get("steps")]
                        krylov_steps = krylov_steps or (max(steps) if steps else None)
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
                "exact": {k: {"lambda_max": float(v["exact"]["eigenvalues"][0]),
                              "lambda_min": float(v["exact"]["eigenvalues"][-1]),
                              "trace": v["exact"]["trace"], "top10": v["exact"]["top"].tolist()}
                          for k, v in payload.items() if "exact" in v},
                "command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": args.quick,
                "duration_seconds": duration}
    md = render(rows, env, settings)
    name = "peers" if not cuda else "peers_cuda"
    path = write_json(name, {"environment": env, "settings": settings, "notes": NOTES, "rows": rows}, args.out)
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
