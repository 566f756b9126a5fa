"""bench_peers' adapters: one tool's tasks through its own public API, plus peak-memory probes.

Every adapter runs in a worker process (see _peers_worker.py). ``settings`` is "matched"
(the same tolerance, steps and products for every tool: the rows that compare tools) or
"defaults" (each tool's own documented defaults for the same task).
"""

from __future__ import annotations

import re
import resource
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from _peers_config import LANCZOS_TOL

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
def _counting(fn: Callable, counter: dict, columns: Callable[..., int] = lambda *a, **k: 1,
              device: str = "cpu") -> Callable:
    """``fn`` counting its columns into ``counter["n"]`` and its wall time into ``counter["s"]``.

    The time runs from entry to return of the outermost call (a product calling the
    wrapped entry point again is timed once), with ``torch.cuda.synchronize()`` before
    the start and before the end on a CUDA device, so queued kernels land in the product
    that launched them. ``counter`` holds "n" (columns), "s" (seconds) and "depth".
    """
    cuda = str(device).startswith("cuda")

    def wrapped(*args, **kwargs):
        counter["n"] += columns(*args, **kwargs)
        if counter["depth"]:
            return fn(*args, **kwargs)
        counter["depth"] = 1
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if cuda:
                torch.cuda.synchronize()
            counter["s"] += time.perf_counter() - t0
            counter["depth"] = 0

    return wrapped


def new_counter() -> dict:
    """A product counter for :func:`_counting`: columns, seconds inside products, nesting depth."""
    return {"n": 0, "s": 0.0, "depth": 0}


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
        self.counter = new_counter()
        self.notes: list[str] = []
        self.settings = "matched"  # or "defaults": the tool's own defaults (set by the worker)

    @property
    def defaults(self) -> bool:
        return self.settings == "defaults"

    def reset_counter(self) -> None:
        """Zero the product count and the time inside products (the worker calls it per task call)."""
        self.counter.update(new_counter())

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

        H = hl.Hessian(self.model, self.loss_fn, self.data, progress=False)
        # Every solver's products go through H.matmat -> H._matmat -> H._product; H.num_matvecs stays
        # the count. Timed at _product: the products proper, without the finite-difference derivative
        # check that _matmat runs at the first product (float64 gradients), which thus counts as overhead.
        H._product = _counting(H._product, self.counter, lambda V, **_: V.shape[1], self.device)
        return H

    def top_k(self, k, steps, small):
        import hesslab as hl

        H = self._op()
        kw = {"k": 2, "max_steps": 6} if small else {"k": k}
        if not self.defaults:  # matched: ARPACK's tolerance and guarantee (no residual products, no certificate)
            kw.update(tol=LANCZOS_TOL, compute_residuals=False, verify=False)
        r = hl.lanczos(H, which="LA", progress=False, **kw)
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
        kw = {} if self.defaults else {"num_matvecs": num, "method": "hutchinson"}  # defaults: hutch++, 100
        t = hl.trace(H, seed=0, progress=False, **kw)
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
        ph.hessian_vector_product = _counting(ph.hessian_vector_product, self.counter, device=self.device)
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
        e, w = self._run(lambda hc: hc.density() if self.defaults and steps > 3 else hc.density(iter=steps, n_v=probes))
        return {"nodes": np.array(e), "weights": np.array(w), "products": self.counter["n"] - c0}

    def trace(self, num):
        c0 = self.counter["n"]
        vals = self._run(lambda hc: hc.trace() if self.defaults and num > 3 else hc.trace(maxIter=num, tol=float("-inf")))
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
        op.matvec = _counting(op.matvec, self.counter, device=self.device)
        return op

    def top_k(self, k, steps, small):
        import hessian_eigenthings as he

        op, c0 = self._op(), self.counter["n"]
        n = op.size
        m = 4 if small else min(n - 1, steps or 6 * k)
        if self.defaults and not small:  # its own Krylov size and tolerance
            r = he.lanczos(op, k=k, which="LA", seed=0)
        else:
            r = he.lanczos(op, k=min(k, m), max_iter=m, which="LA", reorthogonalize=True, seed=0)
        return {"eigenvalues": r.eigenvalues.detach().cpu().double().numpy().tolist(),
                "products": self.counter["n"] - c0, "steps": r.iterations}

    def slq(self, steps, probes, small):
        import hessian_eigenthings as he

        op, c0 = self._op(), self.counter["n"]
        kw = {} if self.defaults and steps > 3 else {"num_runs": probes, "lanczos_steps": steps}
        d = he.spectral_density(op, seed=0, **kw)
        return {"nodes": d.raw_eigenvalues.detach().cpu().double().numpy(),
                "weights": d.raw_weights.detach().cpu().double().numpy(), "products": self.counter["n"] - c0}

    def trace(self, num):
        import hessian_eigenthings as he

        op, c0 = self._op(), self.counter["n"]
        kw = {} if self.defaults and num > 3 else {"num_matvecs": num, "method": "hutchinson"}
        t = he.trace(op, seed=0, **kw)
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
        op._matmat = _counting(op._matmat, self.counter, lambda M: M[0].shape[-1], self.device)
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
                tol = 0.0 if self.defaults else LANCZOS_TOL  # eigsh's default: machine precision
                vals, _ = eigsh(op.to_scipy(), k=k, which="LA", tol=tol, v0=v0)
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
