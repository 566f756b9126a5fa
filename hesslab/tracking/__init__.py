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
The values of each record are those of :func:`hesslab.analysis.measure_spectrum` (the
pipeline ``hesslab demo`` and ``hesslab analyze`` use too); the tracker adds ``warm_start``
to the top-k record.

Modules: ``_tracker`` (:class:`SpectrumTracker`), ``_history`` (:class:`TrackingHistory`,
reading the file back), ``_plots`` (the four panels of :meth:`TrackingHistory.plot`),
``_state`` (:func:`preserved_state`).
"""

from __future__ import annotations

from hesslab.analysis.pipeline import MEASURES
from hesslab.tracking._history import TrackingHistory
from hesslab.tracking._state import preserved_state
from hesslab.tracking._tracker import FORMAT, VERSION, SpectrumTracker, step_checkpoint

__all__ = ["SpectrumTracker", "TrackingHistory", "MEASURES", "preserved_state", "FORMAT", "VERSION", "step_checkpoint"]
