"""The four panels of :meth:`TrackingHistory.plot`: density heatmap, top eigenvalues,
gradient concentration, trace and loss, each over the training steps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from hesslab.tracking._history import TrackingHistory

__all__ = ["plot_history"]


def plot_history(history: TrackingHistory, fig: Figure | None = None, grid_size: int = 400,
                 dynamic_range: float = 1e7) -> Figure:
    """Draw ``history`` into ``fig`` (a new Figure when None); see :meth:`TrackingHistory.plot`."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if fig is None:
        fig = plt.figure(figsize=(12.0, 8.5))
    else:
        fig.clf()
    ax_d, ax_top, ax_c, ax_t = fig.subplots(2, 2).ravel()
    _density_panel(history, fig, ax_d, grid_size, dynamic_range)
    _top_panel(history, fig, ax_top)
    _concentration_panel(history, ax_c)
    _trace_panel(history, ax_t)
    for ax in (ax_d, ax_top, ax_c, ax_t):
        if ax.get_xlabel() == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Hessian spectrum through training (n = {history.num_params} parameters, "
                 f"{len(history)} measurements)")
    fig.tight_layout()
    return fig


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}: not recorded", ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _density_panel(history: TrackingHistory, fig: Figure, ax: Any, grid_size: int, dynamic_range: float) -> None:
    """(a) The density as a heatmap (log colour scale), the outliers of each step marked."""
    from matplotlib.colors import LogNorm

    steps, grid, D = history.density_map(grid_size=grid_size)
    if not len(steps):
        _empty(ax, "density")
        return
    delta = grid[1] - grid[0] if grid.size > 1 else 1.0
    edges_y = np.concatenate([grid - delta / 2, grid[-1:] + delta / 2])
    vmax = float(D.max()) if D.size and D.max() > 0 else 1.0
    vmin = vmax / dynamic_range
    mesh = ax.pcolormesh(_step_edges(steps), edges_y, np.maximum(D, vmin).T, norm=LogNorm(vmin=vmin, vmax=vmax),
                         cmap="magma", shading="flat")
    fig.colorbar(mesh, ax=ax, label="density (log scale)")
    o_steps, o_pos = [], []
    for r in history.recorded("density"):
        for p in (r["density"].get("outliers") or {}).get("positions") or []:
            if p is not None:
                o_steps.append(r["step"])
                o_pos.append(p)
    if o_pos:
        ax.plot(o_steps, o_pos, "o", mfc="none", mec="cyan", ms=5, mew=0.9, label="outliers (hl.outliers)")
        ax.legend(fontsize="small", loc="upper right", framealpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("eigenvalue λ")
    ax.set_title("Hessian eigenvalue density (SLQ)")


def _top_panel(history: TrackingHistory, fig: Figure, ax: Any) -> None:
    """(b) The top-k eigenvalues, one line per index."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    steps, lam = history.top_eigenvalues()
    if not len(steps):
        _empty(ax, "top_k")
        return
    k = lam.shape[1]
    cmap = plt.get_cmap("viridis")
    for i in range(k):
        ax.plot(steps, lam[:, i], "-o", ms=2.5, lw=1.2, color=cmap(i / max(k - 1, 1)))
    if _wide_positive(lam):
        ax.set_yscale("log")
    fig.colorbar(ScalarMappable(norm=Normalize(1, max(k, 2)), cmap=cmap), ax=ax, label="index i (1 = largest)")
    ax.set_xlabel("step")
    ax.set_ylabel("eigenvalue λ_i")
    ax.set_title(f"Top-{k} Hessian eigenvalues (Lanczos)")


def _concentration_panel(history: TrackingHistory, ax: Any) -> None:
    """(c) ‖V_kᵀg‖²/‖g‖² with the random-subspace level k/n."""
    steps, conc = history.concentration()
    if not len(steps):
        _empty(ax, "concentration")
        return
    ax.plot(steps, conc, "-o", ms=3, color="C3", label="‖V_kᵀg‖² / ‖g‖²")
    k, n = int(history.header.get("k", 0)), history.num_params
    if n and k:
        ax.axhline(k / n, color="C7", ls="--", lw=1, label=f"random {k}-dim subspace (k/n = {k / n:.2g})")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("share of ‖g‖² in the top-k eigenspace")
    ax.set_title(f"Gradient concentration (k = {k})")
    ax.legend(fontsize="small")


def _trace_panel(history: TrackingHistory, ax: Any) -> None:
    """(d) The trace estimate (± one standard error) and, on a twin axis, the loss."""
    steps, value, err = history.trace()
    l_steps, loss = history.loss()
    if len(steps):
        ax.errorbar(steps, value, yerr=err, fmt="-o", ms=3, color="C0", capsize=2, label="tr H (Hutch++ ± s.e.)")
        ax.set_ylabel("trace of H", color="C0")
        ax.set_title("Trace and loss")
    elif len(l_steps):
        ax.set_yticks([])
        ax.set_title("Loss (trace not recorded)")
    if len(l_steps):
        ax_l = ax.twinx()
        ax_l.plot(l_steps, loss, "-s", ms=3, color="C1", label="loss")
        if _wide_positive(loss):
            ax_l.set_yscale("log")
        ax_l.set_ylabel("loss", color="C1")
        handles = ax.get_legend_handles_labels()[0] + ax_l.get_legend_handles_labels()[0]
        ax_l.legend(handles, [h.get_label() for h in handles], fontsize="small", loc="best")
    if len(steps) or len(l_steps):
        ax.set_xlabel("step")
    else:
        _empty(ax, "trace and loss")


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
