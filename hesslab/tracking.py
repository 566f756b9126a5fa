"""The Hessian spectrum through training: a tracker that writes its results as it goes.

:class:`SpectrumTracker` is called from any training loop (``tracker.step(i)``, or
``tracker(i)``), from :func:`hesslab.zoo.train` (``on_epoch=tracker``) or, when PyTorch
Lightning is installed, as a Lightning callback (``tracker.lightning_callback()``).
Every ``every``-th call it builds ``hl.Hessian(model, loss_fn, data)`` at the current
parameters and measures the chosen quantities:

==================  =======================================================================
``"top_k"``         the k largest eigenvalues (``hl.lanczos``), warm-started from the
                    previous measurement's eigenvectors (``v0=``)
``"density"``       the eigenvalue density by SLQ (``hl.spectral_density``): its nodes and
                    weights, the negative mass and the outliers (``hl.outliers``)
``"trace"``         tr H (``hl.trace``, Hutch++)
``"power_law"``     ``hl.power_law_fit`` of the top-k eigenvalues
``"concentration"`` ``hl.gradient_concentration``: ‖V_kᵀg‖²/‖g‖² in the top-k eigenspace
==================  =======================================================================

plus the loss (one pass over the data) at every measurement. Each result is appended to
a JSON-lines file **as soon as it is computed** (flushed and fsynced), so a crash of the
training loses nothing that was measured. :meth:`SpectrumTracker.load` (or
:meth:`TrackingHistory.load`) reads the file back, also while training still runs, and
:meth:`TrackingHistory.plot` draws the density over steps as a heatmap, the top
eigenvalues, the gradient concentration, the trace and the loss.

Measuring leaves the model exactly as it was: the train/eval flag of every module, the
``requires_grad`` flags, the ``.grad`` tensors (the same objects, with the same values),
the buffers (BatchNorm running statistics) and the global random number generators are
restored, whatever the measurement did or raised. The Hessian is evaluated in eval mode
unless ``hessian_options={"train_mode": True}``.

File format: one JSON object per line. The first line of each tracker session is
``{"type": "header", "format": "hesslab.tracking", "version": 1, ...}``; every measured
quantity is a line ``{"type": "record", "step": s, "measure": name, "seconds": t,
"num_matvecs": m, ...values}``. Non-finite floats are written as ``null`` (strict JSON).
Arrays are lists; the density's nodes and weights are (num_probes, num_steps) lists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from hesslab._results import Result, jsonable
from hesslab.errors import HesslabError, require_subset

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["SpectrumTracker", "TrackingHistory", "MEASURES", "preserved_state"]

#: The measures a tracker can take.
MEASURES = ("top_k", "density", "trace", "power_law", "concentration")

FORMAT = "hesslab.tracking"
VERSION = 1

_NEEDS_TOP_K = ("top_k", "power_law", "concentration")


# ======================================================================================
# Leaving the model as it was
# ======================================================================================


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore ``model`` on exit exactly as it was on entry.

    Restored: every module's ``training`` flag, every parameter's ``requires_grad``
    flag, every parameter's ``.grad`` (the same tensor object, or None; values written
    into it in place are copied back), every buffer's values (BatchNorm running
    statistics, ``num_batches_tracked``), the global CPU (and, for a model on a GPU, CUDA)
    random number generator states and the grad mode. Costs one copy of the gradients
    and buffers.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [(p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_devices = sorted({t.device.index or 0 for t in (*params, *model.buffers()) if t.is_cuda})
    cuda_rng = [torch.cuda.get_rng_state(d) for d in cuda_devices]
    grad_enabled = torch.is_grad_enabled()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        # Values are compared rather than version counters: some kernels (BatchNorm's
        # running statistics) write in place without bumping them.
        for p, flag, (grad, saved) in zip(params, flags, grads):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if p.grad is not grad:
                p.grad = grad
            if grad is not None and not torch.equal(grad, saved):
                with torch.no_grad():
                    grad.copy_(saved)
        for b, saved in buffers:
            if not torch.equal(b, saved):
                with torch.no_grad():
                    b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        for d, state in zip(cuda_devices, cuda_rng):
            torch.cuda.set_rng_state(state, d)
        torch.set_grad_enabled(grad_enabled)


# ======================================================================================
# JSON helpers
# ======================================================================================


def _floats(values: Any) -> np.ndarray:
    """A JSON list (None for non-finite) back to a float64 array (NaN)."""
    if values is None:
        return np.full(0, np.nan)
    return np.asarray(values, dtype=np.float64)


# ======================================================================================
# The tracker
# ======================================================================================


class SpectrumTracker:
    """Measure the Hessian spectrum every ``every`` steps of training and log it to a file.

    Example (any training loop)::

        tracker = hl.SpectrumTracker(model, nn.CrossEntropyLoss(), (X, y), every=50,
                                     path="runs/spectrum.jsonl", k=20)
        for i, (xb, yb) in enumerate(loader):
            ...  # forward, backward, optimizer step
            tracker.step(i)          # measures when i % 50 == 0
        history = hl.SpectrumTracker.load("runs/spectrum.jsonl")
        history.plot()

    ``zoo.train(model, data, on_epoch=tracker)`` and, with Lightning,
    ``Trainer(callbacks=[tracker.lightning_callback()])`` work as well.

    Args:
        model: The network being trained. Never modified (see :func:`preserved_state`).
        loss_fn: ``loss_fn(output, targets) -> scalar`` mean loss.
        data: The data the Hessian is taken over: one ``(inputs, targets)`` batch or a
            re-iterable of them (e.g. a fixed subset of the training set). A batch or a
            list of batches on another device than the model is moved to it.
        every: Measure when ``step_index % every == 0``.
        measures: Any of ``"top_k"``, ``"density"``, ``"trace"``, ``"power_law"``,
            ``"concentration"``. ``"power_law"`` and ``"concentration"`` use the top-k
            eigenpairs, which are then computed (and recorded) even without ``"top_k"``.
        path: The JSON-lines file. Records are appended to an existing file (a resumed
            run continues it; reloading keeps the last record of each step and measure)
            unless ``overwrite=True``.
        k: The number of top eigenpairs (also the K of the power-law fit and the
            eigenspace of the gradient concentration).
        overwrite: Start the file afresh.
        seed: Seed of every random start vector and probe (the same at each step, so
            changes between steps are not sampling noise).
        warm_start: Start Lanczos from the previous measurement's eigenvectors.
        hessian_options: Keyword arguments for :class:`hesslab.Hessian` (``params``,
            ``dtype``, ``train_mode``, ``method``, ...).
        lanczos_options: For :func:`hesslab.lanczos` (``tol``, ``max_steps``, ...).
        density_options: For :func:`hesslab.spectral_density` (``num_steps``,
            ``num_probes``, ...); ``num_steps`` is capped at n.
        trace_options: For :func:`hesslab.trace` (``num_matvecs``, ``method``).
        outlier_options: For :func:`hesslab.outliers` on each density.
        on_error: ``"warn"``: a measurement that fails with a :class:`HesslabError` (e.g.
            a power-law fit with fewer than two positive eigenvalues) is recorded as
            ``{"error": message}`` and training goes on; ``"raise"``: it propagates.

    Attributes:
        path: The file written.
        num_params: n.
        last_eigenvectors: The latest top-k eigenvectors (n, k), float64, or None.
        num_measurements: How many steps were measured in this session.

    Raises:
        HesslabError: Bad arguments (each message names the argument).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        data: Any,
        every: int = 1,
        measures: Sequence[str] = MEASURES,
        path: str | os.PathLike = "hesslab_spectrum.jsonl",
        k: int = 10,
        *,
        overwrite: bool = False,
        seed: int = 0,
        warm_start: bool = True,
        hessian_options: dict[str, Any] | None = None,
        lanczos_options: dict[str, Any] | None = None,
        density_options: dict[str, Any] | None = None,
        trace_options: dict[str, Any] | None = None,
        outlier_options: dict[str, Any] | None = None,
        on_error: str = "warn",
    ):
        from hesslab.linops import select_parameters

        if not isinstance(model, nn.Module):
            raise HesslabError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise HesslabError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise HesslabError(f"every: expected a positive int (measure when step % every == 0), got {every!r}")
        measures = require_subset("measures", measures, MEASURES)
        if on_error not in ("warn", "raise"):
            raise HesslabError(f"on_error: expected 'warn' or 'raise', got {on_error!r}")
        for name, opt in [("hessian_options", hessian_options), ("lanczos_options", lanczos_options),
                          ("density_options", density_options), ("trace_options", trace_options),
                          ("outlier_options", outlier_options)]:
            if opt is not None and not isinstance(opt, dict):
                raise HesslabError(f"{name}: expected a dict of keyword arguments or None, got {type(opt).__name__}")
        self.hessian_options = dict(hessian_options or {})
        _, tensors = select_parameters(model, self.hessian_options.get("params"))
        n = sum(t.numel() for t in tensors)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < n:
            raise HesslabError(f"k: expected an int with 1 <= k < n = {n} (the number of parameters), got {k!r}")
        if "power_law" in measures and k < 2:
            raise HesslabError(f"k: the power-law fit needs k >= 2 eigenvalues, got {k}")
        try:
            self.path = Path(path)
        except TypeError:
            raise HesslabError(f"path: expected a file path, got {type(path).__name__}") from None

        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.every = int(every)
        self.measures = measures
        self.k = int(k)
        self.seed = int(seed)
        self.warm_start = bool(warm_start)
        self.lanczos_options = dict(lanczos_options or {})
        self.density_options = dict(density_options or {})
        self.trace_options = dict(trace_options or {})
        self.outlier_options = dict(outlier_options or {})
        self.on_error = on_error
        self.num_params = int(n)
        self.last_eigenvectors: Tensor | None = None
        self.num_measurements = 0
        self._data_cache: tuple[torch.device, Any] | None = None

        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and self.path.exists():
            self.path.unlink()
        self._append({
            "type": "header", "format": FORMAT, "version": VERSION, "created": time.time(),
            "model": type(model).__name__, "num_params": self.num_params, "measures": list(measures),
            "every": self.every, "k": self.k, "seed": self.seed, "warm_start": self.warm_start,
            "options": {
                "hessian": _describe_options(self.hessian_options),
                "lanczos": _describe_options(self.lanczos_options),
                "density": _describe_options(self.density_options),
                "trace": _describe_options(self.trace_options),
                "outliers": _describe_options(self.outlier_options),
            },
        })

    # ------------------------------------------------------------------- entry points
    def step(self, step_index: int) -> dict[str, Any] | None:
        """Measure when ``step_index % every == 0``.

        Args:
            step_index: The training step (or epoch) to record the measurement under.

        Returns:
            The records written at this step, ``{measure: record}``, or None when no
            measurement was due.
        """
        if isinstance(step_index, bool) or not isinstance(step_index, (int, np.integer)):
            raise HesslabError(f"step_index: expected an int, got {step_index!r}")
        if step_index % self.every != 0:
            return None
        return self.measure(int(step_index))

    def __call__(self, step_index: int, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        """``tracker(i)``: same as :meth:`step`. Extra arguments are ignored, so the tracker
        can be passed as ``on_epoch=tracker`` to :func:`hesslab.zoo.train`."""
        return self.step(step_index)

    # Duck-typed Lightning hook (a real Callback comes from lightning_callback()).
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Lightning-style hook: measure at the end of a training epoch (``trainer.current_epoch``)."""
        self.step(int(trainer.current_epoch))

    def lightning_callback(self, on: str = "train_epoch_end") -> Any:
        """A ``lightning.pytorch.Callback`` (or ``pytorch_lightning.Callback``) driving this tracker.

        The Callback subclass is created when this is called, so Lightning is never
        needed otherwise.

        Args:
            on: ``"train_epoch_end"``: measure after each training epoch with
                ``trainer.current_epoch`` as the step (``every`` counts epochs);
                ``"train_batch_end"``: after each optimizer step with
                ``trainer.global_step`` as the step.

        Returns:
            A Callback instance for ``Trainer(callbacks=[...])``.

        Raises:
            HesslabError: Lightning is not installed, or ``on`` is invalid.
        """
        if on not in ("train_epoch_end", "train_batch_end"):
            raise HesslabError(f"on: expected 'train_epoch_end' or 'train_batch_end', got {on!r}")
        try:
            from lightning.pytorch import Callback
        except ImportError:
            try:
                from pytorch_lightning import Callback
            except ImportError:
                raise HesslabError(
                    "lightning_callback: PyTorch Lightning is not installed (pip install lightning); in a plain "
                    "training loop call tracker.step(step_index) instead"
                ) from None
        tracker = self

        class SpectrumTrackerCallback(Callback):  # type: ignore[misc, valid-type]
            """Measures the Hessian spectrum with a :class:`hesslab.SpectrumTracker`."""

            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                if on == "train_epoch_end":
                    tracker.step(int(trainer.current_epoch))

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                                   batch_idx: int) -> None:
                if on == "train_batch_end":
                    tracker.step(int(trainer.global_step))

        SpectrumTrackerCallback.tracker = tracker
        return SpectrumTrackerCallback()

    # -------------------------------------------------------------------- measuring
    def measure(self, step_index: int) -> dict[str, Any]:
        """Take every measure now and record it under ``step_index`` (ignores ``every``).

        Returns:
            ``{measure: record}`` as written to the file.
        """
        from hesslab.linops import Hessian

        out: dict[str, Any] = {}
        with preserved_state(self.model):
            options = {"progress": False, **self.hessian_options}
            try:
                H = Hessian(self.model, self.loss_fn, self._data(), **options)
            except HesslabError as err:  # e.g. the loss diverged to NaN
                self._run(out, step_index, "loss", None, lambda: _raise(err))
                self.num_measurements += 1
                return out
            self._run(out, step_index, "loss", H, lambda: ({"value": H.loss()}, None))
            top = None
            if any(m in self.measures for m in _NEEDS_TOP_K):
                top = self._run(out, step_index, "top_k", H, lambda: self._top_k(H))
            if "power_law" in self.measures:
                self._run(out, step_index, "power_law", H, lambda: self._power_law(top))
            if "concentration" in self.measures:
                self._run(out, step_index, "concentration", H, lambda: self._concentration(H, top))
            if "density" in self.measures:
                self._run(out, step_index, "density", H, lambda: self._density(H))
            if "trace" in self.measures:
                self._run(out, step_index, "trace", H, lambda: self._trace(H))
        self.num_measurements += 1
        return out

    def _run(self, out: dict[str, Any], step: int, name: str, H: Any, fn: Callable[[], tuple[dict, Any]]) -> Any:
        """Run one measure, append its record at once, and return its raw result."""
        before = 0 if H is None else H.num_matvecs
        t0 = time.perf_counter()
        try:
            payload, raw = fn()
        except HesslabError as err:
            if self.on_error == "raise":
                raise
            warnings.warn(f"SpectrumTracker: {name} at step {step} failed: {err}", stacklevel=4)
            payload, raw = {"error": str(err)}, None
        record = {
            "type": "record", "step": step, "measure": name, "time": time.time(),
            "seconds": time.perf_counter() - t0, "num_matvecs": 0 if H is None else H.num_matvecs - before, **payload,
        }
        record = jsonable(record)
        self._append(record)
        out[name] = record
        return raw

    def _top_k(self, H: Any) -> tuple[dict, Any]:
        from hesslab.solvers import lanczos

        options = {"seed": self.seed, "progress": False, "compute_residuals": True, **self.lanczos_options}
        warm = self.warm_start and self.last_eigenvectors is not None and "v0" not in self.lanczos_options
        if warm:
            options["v0"] = self.last_eigenvectors
        result = lanczos(H, k=self.k, which="LA", **options)
        self.last_eigenvectors = result.eigenvectors.detach().to("cpu", torch.float64)
        payload = {
            "eigenvalues": result.eigenvalues, "residuals": result.residuals, "converged": result.converged,
            "num_steps": result.num_steps, "warm_start": warm,
        }
        return payload, result

    def _power_law(self, top: Any) -> tuple[dict, Any]:
        from hesslab.analysis.powerlaw import power_law_fit

        if top is None:
            raise HesslabError("power_law: the top-k eigenvalues could not be computed at this step")
        fit = power_law_fit(top.eigenvalues)
        payload = {key: value for key, value in fit.to_dict().items() if key != "eigenvalues"}
        return payload, fit

    def _concentration(self, H: Any, top: Any) -> tuple[dict, Any]:
        from hesslab.analysis.concentration import gradient_concentration

        if top is None:
            raise HesslabError("concentration: the top-k eigenvectors could not be computed at this step")
        result = gradient_concentration(H, eigenvectors=top)
        payload = {
            "concentration": result.concentration, "shares": result.shares, "gradient_norm": result.gradient_norm,
            "k": result.k, "num_params": result.num_params,
        }
        return payload, result

    def _density(self, H: Any) -> tuple[dict, Any]:
        from hesslab.analysis.concentration import outliers
        from hesslab.solvers import spectral_density

        options = {"seed": self.seed, "progress": False, "grid_size": 2000, **self.density_options}
        options["num_steps"] = min(int(options.get("num_steps", 90)), self.num_params)
        d = spectral_density(H, **options)
        payload: dict[str, Any] = {
            "nodes": d.nodes, "weights": d.weights, "num_steps": d.num_steps, "sigma2": d.sigma2,
            "reorthogonalize": d.reorthogonalize, "negative_mass_strict": d.negative_mass(tol=0),
        }
        try:
            o = outliers(d, **self.outlier_options)
        except HesslabError as err:
            payload["outliers"] = {"error": str(err)}
            payload["negative_mass"] = None
        else:
            payload["negative_mass"] = o.negative_mass
            payload["outliers"] = {
                "count": o.count, "positions": o.positions, "bulk_edge": o.bulk_edge, "separation": o.separation,
                "counts_per_probe": o.counts_per_probe, "masses": o.masses,
            }
        return payload, d

    def _trace(self, H: Any) -> tuple[dict, Any]:
        from hesslab.solvers import trace

        options = {"seed": self.seed, "progress": False, **self.trace_options}
        t = trace(H, **options)
        return {"value": t.value, "std_error": t.std_error, "method": t.method}, t

    # ------------------------------------------------------------------------ data
    def _data(self) -> Any:
        """``data`` on the model's device (single batches and lists of batches are moved)."""
        from hesslab.linops import is_single_batch, map_inputs

        try:
            device = next(self.model.parameters()).device
        except StopIteration:
            return self.data
        if self._data_cache is not None and self._data_cache[0] == device:
            return self._data_cache[1]

        def move(batch: Any) -> Any:
            inputs, targets = batch
            return (map_inputs(inputs, lambda t: t.to(device)), targets.to(device))

        def on_device(batch: Any) -> bool:
            from hesslab.linops import input_tensors

            return all(t.device == device for t in (*input_tensors(batch[0]), batch[1]))

        data = self.data
        if is_single_batch(data):
            moved = data if on_device(data) else move(data)
        elif isinstance(data, (list, tuple)) and all(is_single_batch(b) for b in data):
            moved = data if all(on_device(b) for b in data) else [move(b) for b in data]
        else:
            moved = data  # a DataLoader or generator: used as is
        self._data_cache = (device, moved)
        return moved

    # --------------------------------------------------------------------- writing
    def _append(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    # --------------------------------------------------------------------- reading
    @staticmethod
    def load(path: str | os.PathLike) -> TrackingHistory:
        """Read a tracker's file (also while training still writes to it)."""
        return TrackingHistory.load(path)

    def history(self) -> TrackingHistory:
        """Everything recorded in :attr:`path` so far."""
        return TrackingHistory.load(self.path)

    def __repr__(self) -> str:
        return (f"SpectrumTracker(path={str(self.path)!r}, every={self.every}, measures={self.measures}, "
                f"k={self.k}, n={self.num_params})")


def _raise(err: Exception) -> Any:
    raise err


def _describe_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON (tensors and other objects as their repr)."""
    out = {}
    for key, value in options.items():
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            out[key] = list(value)
        else:
            out[key] = repr(value) if not isinstance(value, Tensor) else f"tensor{tuple(value.shape)}"
    return jsonable(out)


# ======================================================================================
# Reading back
# ======================================================================================


@dataclasses.dataclass
class TrackingHistory(Result):
    """Everything a :class:`SpectrumTracker` wrote, merged by step.

    Attributes:
        header: The first header line of the file (the tracker's settings: ``num_params``,
            ``measures``, ``every``, ``k``, ``options``, ...).
        records: One dict per measured step, sorted by step: ``{"step": s, "loss": {...},
            "top_k": {...}, ...}`` with each measure's record as written (for a step
            measured twice, e.g. by a resumed run, the last record of each measure).
        num_skipped_lines: Lines that could not be read (a line cut off by a crash while
            it was being written; a fsynced line is never cut).
    """

    header: dict[str, Any]
    records: list[dict[str, Any]]
    num_skipped_lines: int = 0

    # ---------------------------------------------------------------------- files
    @classmethod
    def load(cls, path: str | os.PathLike) -> TrackingHistory:
        """Read a JSON-lines file written by a tracker or by :meth:`save`.

        Raises:
            HesslabError: The file does not exist or holds no tracker header.
        """
        path = Path(path)
        if not path.exists():
            raise HesslabError(f"path: no such file {str(path)!r}")
        header: dict[str, Any] | None = None
        by_step: dict[int, dict[str, Any]] = {}
        skipped = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    skipped += 1
                    continue
                if not isinstance(obj, dict):
                    skipped += 1
                elif obj.get("type") == "header":
                    header = obj if header is None else header
                elif obj.get("type") == "record" and "step" in obj and "measure" in obj:
                    by_step.setdefault(int(obj["step"]), {"step": int(obj["step"])})[obj["measure"]] = obj
                else:
                    skipped += 1
        if header is None:
            raise HesslabError(
                f"path: {str(path)!r} holds no hesslab tracking header; is it a file written by hl.SpectrumTracker?"
            )
        records = [by_step[s] for s in sorted(by_step)]
        return cls(header=header, records=records, num_skipped_lines=skipped)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the history as a tracker's JSON-lines file (readable by :meth:`load`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(jsonable(self.header), allow_nan=False) + "\n")
            for rec in self.records:
                for name, value in rec.items():
                    if name != "step":
                        f.write(json.dumps(jsonable(value), allow_nan=False) + "\n")
        return path

    # ------------------------------------------------------------------- accessors
    def __len__(self) -> int:
        return len(self.records)

    @property
    def steps(self) -> np.ndarray:
        """The measured steps, ascending, shape (T,)."""
        return np.array([r["step"] for r in self.records], dtype=np.int64)

    @property
    def num_params(self) -> int:
        return int(self.header.get("num_params", 0))

    def _ok(self, measure: str) -> list[dict[str, Any]]:
        return [r for r in self.records if measure in r and "error" not in r[measure]]

    def series(self, measure: str, field: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one scalar field of one measure, e.g. ``("trace", "value")``.

        Steps where the measure is missing or failed are left out.
        """
        recs = self._ok(measure)
        steps = np.array([r["step"] for r in recs], dtype=np.int64)
        vals = np.array([np.nan if r[measure].get(field) is None else r[measure][field] for r in recs],
                        dtype=np.float64)
        return steps, vals

    def loss(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, loss)`` at each measurement."""
        return self.series("loss", "value")

    def trace(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, trace estimate, standard error)``."""
        steps, value = self.series("trace", "value")
        _, err = self.series("trace", "std_error")
        return steps, value, err

    def concentration(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, ‖V_kᵀg‖²/‖g‖²)``."""
        return self.series("concentration", "concentration")

    def top_eigenvalues(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, eigenvalues)`` with eigenvalues of shape (T, k), descending, NaN-padded."""
        recs = self._ok("top_k")
        steps = np.array([r["step"] for r in recs], dtype=np.int64)
        rows = [_floats(r["top_k"]["eigenvalues"]) for r in recs]
        k = max((len(x) for x in rows), default=0)
        out = np.full((len(rows), k), np.nan)
        for i, x in enumerate(rows):
            out[i, : len(x)] = x
        return steps, out

    def outlier_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, number of outliers)`` from each density (see :func:`hesslab.outliers`)."""
        recs = [r for r in self._ok("density") if "count" in (r["density"].get("outliers") or {})]
        return (np.array([r["step"] for r in recs], dtype=np.int64),
                np.array([r["density"]["outliers"]["count"] for r in recs], dtype=np.int64))

    def density(self, step: int) -> Any:
        """The :class:`hesslab.SpectralDensity` recorded at ``step`` (its smoothed density is
        recomputed on the default grid from the stored nodes and weights)."""
        from hesslab.solvers import SpectralDensity, smooth_density

        for r in self._ok("density"):
            if r["step"] == step:
                d = r["density"]
                nodes, weights = _floats(d["nodes"]), _floats(d["weights"])
                counts = np.asarray(d["num_steps"], dtype=np.int64)
                grid, dens, _ = smooth_density(nodes, weights, 1e-5, 10000, counts=counts)
                return SpectralDensity(nodes, weights, counts, grid, dens, float(d["sigma2"]), int(d["num_matvecs"]),
                                       d.get("reorthogonalize", "full"))
        raise HesslabError(f"step: no density was recorded at step {step}; recorded steps: {self.density_steps()}")

    def density_steps(self) -> list[int]:
        return [int(r["step"]) for r in self._ok("density")]

    def density_map(
        self, grid: np.ndarray | None = None, grid_size: int = 400, sigma2: float = 1e-5
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r"""The densities of all steps on one common grid: ``(steps, grid, D)``.

        Each row is the SLQ estimate averaged over probes, with Ghorbani's Gaussian kernel
        (variance σ² = ``sigma2``·max(1, width) for the common width) integrated over each
        grid cell, so narrow spikes (outliers) are never missed between grid points:

        .. math::
            D_{t,i} = \frac{1}{P\,Δ} \sum_{p,j} ω_{pj}
                \Big[Φ\big(\tfrac{e_{i+1} − ℓ_{pj}}{σ}\big) − Φ\big(\tfrac{e_i − ℓ_{pj}}{σ}\big)\Big],

        with e_i the cell edges and Δ the cell width; Σ_i D_{t,i} Δ = 1.

        Args:
            grid: Cell centres, evenly spaced (G,); default ``grid_size`` points from the
                smallest to the largest node over all steps, padded by 1% of the width.
            grid_size: G when ``grid`` is None.
            sigma2: Relative kernel variance.

        Returns:
            steps (T,), grid (G,), D (T, G).
        """
        from scipy.special import ndtr

        recs = self._ok("density")
        steps = np.array([r["step"] for r in recs], dtype=np.int64)
        data = []
        for r in recs:
            d = r["density"]
            nodes, weights = _floats(d["nodes"]), _floats(d["weights"])
            valid = np.arange(nodes.shape[1])[None, :] < np.asarray(d["num_steps"])[:, None]
            data.append((nodes, weights, valid))
        if grid is None:
            if not data:
                return steps, np.zeros(0), np.zeros((0, 0))
            lo = min(float(x[v].min()) for x, _, v in data)
            hi = max(float(x[v].max()) for x, _, v in data)
            pad = 0.01 * max(hi - lo, 1e-12)
            grid = np.linspace(lo - pad, hi + pad, grid_size)
        grid = np.asarray(grid, dtype=np.float64)
        delta = grid[1] - grid[0] if grid.size > 1 else 1.0
        edges = np.concatenate([grid - delta / 2, grid[-1:] + delta / 2])
        sigma = math.sqrt(sigma2 * max(1.0, float(edges[-1] - edges[0])))
        out = np.zeros((len(data), grid.size))
        for t, (nodes, weights, valid) in enumerate(data):
            x, w = nodes[valid], weights[valid]
            cdf = ndtr((edges[:, None] - x[None, :]) / sigma)  # (G + 1, num nodes)
            out[t] = (np.diff(cdf, axis=0) @ w) / (nodes.shape[0] * delta)
        return steps, grid, out

    # ------------------------------------------------------------------------ plot
    def plot(self, fig: Figure | None = None, grid_size: int = 400, dynamic_range: float = 1e7) -> Figure:
        """Four panels over the training steps.

        (a) The eigenvalue density as a heatmap (steps × eigenvalue, common grid, log
        colour scale over ``dynamic_range`` decades below the maximum), with the
        outliers found at each step marked; (b) the top-k eigenvalues; (c) the gradient
        concentration ‖V_kᵀg‖²/‖g‖² with the random-subspace level k/n; (d) the trace
        estimate (± one standard error) and the loss. Panels whose measure was not
        recorded say so.

        Args:
            fig: A matplotlib Figure to draw into (its content is replaced); None: new.
            grid_size: Eigenvalue cells of the heatmap.
            dynamic_range: Ratio of the colour scale's top to its bottom.

        Returns:
            The Figure (``plt.show`` is never called).
        """
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm

        if fig is None:
            fig = plt.figure(figsize=(12.0, 8.5))
        else:
            fig.clf()
        axes = fig.subplots(2, 2)
        ax_d, ax_top, ax_c, ax_t = axes.ravel()

        def empty(ax: Any, what: str) -> None:
            ax.text(0.5, 0.5, f"{what}: not recorded", ha="center", va="center", transform=ax.transAxes,
                    color="0.4")
            ax.set_xticks([])
            ax.set_yticks([])

        # (a) density heatmap
        steps, grid, D = self.density_map(grid_size=grid_size)
        if len(steps):
            edges_x = _step_edges(steps)
            delta = grid[1] - grid[0] if grid.size > 1 else 1.0
            edges_y = np.concatenate([grid - delta / 2, grid[-1:] + delta / 2])
            vmax = float(D.max()) if D.size and D.max() > 0 else 1.0
            vmin = vmax / dynamic_range
            mesh = ax_d.pcolormesh(edges_x, edges_y, np.maximum(D, vmin).T, norm=LogNorm(vmin=vmin, vmax=vmax),
                                   cmap="magma", shading="flat")
            fig.colorbar(mesh, ax=ax_d, label="density (log scale)")
            o_steps, o_pos = [], []
            for r in self._ok("density"):
                for p in (r["density"].get("outliers") or {}).get("positions") or []:
                    if p is not None:
                        o_steps.append(r["step"])
                        o_pos.append(p)
            if o_pos:
                ax_d.plot(o_steps, o_pos, "o", mfc="none", mec="cyan", ms=5, mew=0.9, label="outliers (hl.outliers)")
                ax_d.legend(fontsize="small", loc="upper right", framealpha=0.6)
            ax_d.set_xlabel("step")
            ax_d.set_ylabel("eigenvalue λ")
            ax_d.set_title("Hessian eigenvalue density (SLQ)")
        else:
            empty(ax_d, "density")

        # (b) top-k eigenvalues
        steps, lam = self.top_eigenvalues()
        if len(steps):
            k = lam.shape[1]
            cmap = plt.get_cmap("viridis")
            for i in range(k):
                ax_top.plot(steps, lam[:, i], "-o", ms=2.5, lw=1.2, color=cmap(i / max(k - 1, 1)))
            if _wide_positive(lam):
                ax_top.set_yscale("log")
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize

            fig.colorbar(ScalarMappable(norm=Normalize(1, max(k, 2)), cmap=cmap), ax=ax_top,
                         label="index i (1 = largest)")
            ax_top.set_xlabel("step")
            ax_top.set_ylabel("eigenvalue λ_i")
            ax_top.set_title(f"Top-{k} Hessian eigenvalues (Lanczos)")
        else:
            empty(ax_top, "top_k")

        # (c) concentration
        steps, conc = self.concentration()
        if len(steps):
            ax_c.plot(steps, conc, "-o", ms=3, color="C3", label="‖V_kᵀg‖² / ‖g‖²")
            k = int(self.header.get("k", 0))
            if self.num_params and k:
                ax_c.axhline(k / self.num_params, color="C7", ls="--", lw=1,
                             label=f"random {k}-dim subspace (k/n = {k / self.num_params:.2g})")
            ax_c.set_ylim(-0.02, 1.05)
            ax_c.set_xlabel("step")
            ax_c.set_ylabel("share of ‖g‖² in the top-k eigenspace")
            ax_c.set_title(f"Gradient concentration (k = {k})")
            ax_c.legend(fontsize="small")
        else:
            empty(ax_c, "concentration")

        # (d) trace and loss
        steps, value, err = self.trace()
        l_steps, loss = self.loss()
        if len(steps):
            ax_t.errorbar(steps, value, yerr=err, fmt="-o", ms=3, color="C0", capsize=2, label="tr H (Hutch++ ± s.e.)")
            ax_t.set_ylabel("trace of H", color="C0")
            ax_t.set_title("Trace and loss")
        elif len(l_steps):
            ax_t.set_yticks([])
            ax_t.set_title("Loss (trace not recorded)")
        if len(l_steps):
            ax_l = ax_t.twinx()
            ax_l.plot(l_steps, loss, "-s", ms=3, color="C1", label="loss")
            if _wide_positive(loss):
                ax_l.set_yscale("log")
            ax_l.set_ylabel("loss", color="C1")
            handles = ax_t.get_legend_handles_labels()[0] + ax_l.get_legend_handles_labels()[0]
            ax_l.legend(handles, [h.get_label() for h in handles], fontsize="small", loc="best")
        if len(steps) or len(l_steps):
            ax_t.set_xlabel("step")
        else:
            empty(ax_t, "trace and loss")
        from matplotlib.ticker import MaxNLocator

        for ax in (ax_d, ax_top, ax_c, ax_t):
            if ax.get_xlabel() == "step":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        n = self.num_params
        fig.suptitle(f"Hessian spectrum through training (n = {n} parameters, {len(self)} measurements)")
        fig.tight_layout()
        return fig


def _wide_positive(values: np.ndarray) -> bool:
    """True when all finite values are positive and span more than a decade (log axis)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return bool(v.size and v.min() > 0 and v.max() / v.min() > 10)


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around (sorted) steps for pcolormesh: midpoints, half a gap at the ends."""
    s = steps.astype(np.float64)
    if s.size == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])
