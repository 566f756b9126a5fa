"""Reading a tracker's file back: :class:`TrackingHistory`, merged by step."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hesslab._results import Result, jsonable
from hesslab.errors import HesslabError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["TrackingHistory"]


def _floats(values: Any) -> np.ndarray:
    """A JSON list (None for non-finite) back to a float64 array (NaN)."""
    if values is None:
        return np.full(0, np.nan)
    return np.asarray(values, dtype=np.float64)


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

    def recorded(self, measure: str) -> list[dict[str, Any]]:
        """The steps' records that hold ``measure`` without an error."""
        return [r for r in self.records if measure in r and "error" not in r[measure]]

    def series(self, measure: str, field: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one scalar field of one measure, e.g. ``("trace", "value")``.

        Steps where the measure is missing or failed are left out.
        """
        recs = self.recorded(measure)
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
        recs = self.recorded("top_k")
        steps = np.array([r["step"] for r in recs], dtype=np.int64)
        rows = [_floats(r["top_k"]["eigenvalues"]) for r in recs]
        k = max((len(x) for x in rows), default=0)
        out = np.full((len(rows), k), np.nan)
        for i, x in enumerate(rows):
            out[i, : len(x)] = x
        return steps, out

    def outlier_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, number of outliers)`` from each density (see :func:`hesslab.outliers`)."""
        recs = [r for r in self.recorded("density") if "count" in (r["density"].get("outliers") or {})]
        return (np.array([r["step"] for r in recs], dtype=np.int64),
                np.array([r["density"]["outliers"]["count"] for r in recs], dtype=np.int64))

    def density(self, step: int) -> Any:
        """The :class:`hesslab.SpectralDensity` recorded at ``step`` (its smoothed density is
        recomputed on the default grid from the stored nodes and weights)."""
        from hesslab.solvers import SpectralDensity, smooth_density

        for r in self.recorded("density"):
            if r["step"] == step:
                d = r["density"]
                nodes, weights = _floats(d["nodes"]), _floats(d["weights"])
                counts = np.asarray(d["num_steps"], dtype=np.int64)
                grid, dens, _ = smooth_density(nodes, weights, 1e-5, 10000, counts=counts)
                return SpectralDensity(nodes, weights, counts, grid, dens, float(d["sigma2"]), int(d["num_matvecs"]),
                                       d.get("reorthogonalize", "full"))
        raise HesslabError(f"step: no density was recorded at step {step}; recorded steps: {self.density_steps()}")

    def density_steps(self) -> list[int]:
        return [int(r["step"]) for r in self.recorded("density")]

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

        recs = self.recorded("density")
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
        from hesslab.tracking._plots import plot_history

        return plot_history(self, fig, grid_size=grid_size, dynamic_range=dynamic_range)
