"""The tracker: measures the Hessian spectrum during training and appends each record to a file."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hesslab._results import jsonable
from hesslab.analysis.pipeline import DEFAULTS, MEASURES
from hesslab.errors import HesslabError, require_subset
from hesslab.tracking._history import TrackingHistory
from hesslab.tracking._state import preserved_state

__all__ = ["SpectrumTracker", "FORMAT", "VERSION", "step_checkpoint"]

FORMAT = "hesslab.tracking"
VERSION = 1


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

            A ``checkpoint`` path in either is a template: each measurement uses its own
            file, the step inserted before the suffix (``checkpoint="ckpt/c.pt"`` at step
            123 writes ``ckpt/c.step000123.pt``; see :func:`step_checkpoint`). A measurement
            interrupted at step s resumes from its file when step s is measured again; a
            finished one is never reused for another step (which would log its stale
            eigenvalues, or be refused once the warm start changes the arguments). A
            tracker in a new process has no previous eigenvectors to warm-start from, so
            its Lanczos file of an interrupted step was written with another start vector
            and is refused (a HesslabError naming ``checkpoint``, recorded or raised as
            ``on_error`` says); delete that file or use ``warm_start=False`` to resume
            across processes.
        trace_options: For :func:`hesslab.trace` (``num_matvecs``, capped at 3n; ``method``).
        outlier_options: For :func:`hesslab.outliers` on each density.

            The defaults under these options are the pipeline's
            (:data:`hesslab.analysis.pipeline.DEFAULTS`, those of ``hesslab demo``): Lanczos
            ``tol=1e-6``; SLQ with 80 steps and 8 probes on a 4000-point grid; Hutch++ with
            99 products. (Before the tracker shared the pipeline it used ``tol=1e-8``, 90
            SLQ steps, a 2000-point grid and 100 products.)
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
            "defaults": DEFAULTS,  # what the options above override (the pipeline's)
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

        The measures are those of :func:`hesslab.analysis.measure_spectrum`, with its
        defaults under this tracker's options; each record is written as soon as it is done.

        Returns:
            ``{measure: record}`` as written to the file.
        """
        from hesslab.analysis import measure_spectrum
        from hesslab.linops import Hessian

        out: dict[str, Any] = {}
        with preserved_state(self.model):
            t0 = time.perf_counter()
            try:
                H = Hessian(self.model, self.loss_fn, self._data(), **{"progress": False, **self.hessian_options})
            except HesslabError as err:  # e.g. the loss diverged to NaN
                self._on_error(step_index, "loss", err)
                self._write(out, step_index, "loss", {"seconds": time.perf_counter() - t0, "num_matvecs": 0,
                                                      "error": str(err)})
                self.num_measurements += 1
                return out
            lanczos_options = _per_step(self.lanczos_options, step_index)
            warm = self.warm_start and self.last_eigenvectors is not None and "v0" not in self.lanczos_options
            if warm:
                lanczos_options["v0"] = self.last_eigenvectors

            def on_record(name: str, record: dict[str, Any], result: Any) -> None:
                if name == "top_k" and result is not None:
                    self.last_eigenvectors = result.eigenvectors.detach().to("cpu", torch.float64)
                    record = {**record, "warm_start": warm}
                self._write(out, step_index, name, record)

            measure_spectrum(
                H, self.measures, k=self.k, seed=self.seed, lanczos_options=lanczos_options,
                density_options=_per_step(self.density_options, step_index), trace_options=self.trace_options,
                outlier_options=self.outlier_options, progress=False,
                on_error=lambda name, exc: self._on_error(step_index, name, exc), on_record=on_record,
            )
        self.num_measurements += 1
        return out

    def _on_error(self, step: int, name: str, exc: Exception) -> None:
        """A failed measure: propagate anything but a HesslabError (a bug, an interrupt), and
        with ``on_error="raise"`` a HesslabError too; warn otherwise. Outliers that cannot be
        found are only recorded (in the density's or the top-k's record)."""
        if not isinstance(exc, HesslabError):
            raise exc
        if name in ("outliers", "outliers_top"):
            return
        if self.on_error == "raise":
            raise exc
        warnings.warn(f"SpectrumTracker: {name} at step {step} failed: {exc}", stacklevel=5)

    def _write(self, out: dict[str, Any], step: int, name: str, record: dict[str, Any]) -> None:
        """Append one measure's record (a line of the file) at once."""
        line = jsonable({"type": "record", "step": step, "measure": name, "time": time.time(), **record})
        self._append(line)
        out[name] = line

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


def step_checkpoint(path: str | os.PathLike, step: int) -> Path:
    """The checkpoint file of the measurement at ``step``: the step, zero-padded to six
    digits, inserted before the suffix (``c.pt`` at step 123 -> ``c.step000123.pt``;
    ``c`` -> ``c.step000123``; step -4 -> ``c.step-00004.pt``)."""
    p = Path(path)
    return p.with_name(f"{p.stem}.step{int(step):06d}{p.suffix}")


def _per_step(options: dict[str, Any], step: int) -> dict[str, Any]:
    """A copy of solver options whose ``checkpoint`` (when set) is the step's own file."""
    out = dict(options)
    if out.get("checkpoint") is not None:
        out["checkpoint"] = step_checkpoint(out["checkpoint"], step)
    return out


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

