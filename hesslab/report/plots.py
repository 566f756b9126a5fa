"""The report's figures: each function returns a matplotlib ``Figure`` (no pyplot state).

Every plot has axis labels with what is measured, a legend when several things are
drawn, and a title; densities use a log y-axis (Ghorbani et al.), eigenvalue rank plots
log-log axes with the power-law fit (Xie et al.).
"""

from __future__ import annotations

import textwrap
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "new_figure", "density_panels", "top_eigenvalues", "overlap_curves", "kfac_vs_exact",
    "low_rank_shares", "concentration_curves", "outlier_panels", "tracking_lines", "density_heatmaps",
    "rank_sweep", "rank_bars", "singular_values", "training_curves", "dominant_panels", "integer_ticks",
]


def new_figure(width: float = 7.0, height: float = 4.5, nrows: int = 1, ncols: int = 1, **kw: Any):
    """A Figure with an Agg canvas and its axes (array when more than one)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=True, **kw)
    return fig, axes


def _axes_list(axes: Any) -> list:
    return list(np.atleast_1d(axes).ravel())


def integer_ticks(ax: Any, which: str = "x") -> None:
    """Ticks at whole numbers only on an axis of counts or indices (no 2.5, 7.5)."""
    from matplotlib.ticker import MaxNLocator

    for name in which:
        getattr(ax, f"{name}axis").set_major_locator(MaxNLocator(integer=True))


def density_panels(groups: Mapping[str, Sequence[tuple[str, Any]]], floor: float = 1e-7, pad: float = 0.04,
                   grid_size: int = 4000):
    """One panel per group, each overlaying densities ``(label, SpectralDensity)`` on a log y-axis.

    The density is re-smoothed from the quadrature nodes and weights with the same kernel
    on a grid padded by ``pad`` of the spectrum's width on both sides, so the spikes at the
    ends of the spectrum are drawn whole (the stored grid stops at the mean extreme node).
    """
    from hesslab.solvers import smooth_density

    fig, axes = new_figure(6.0 * len(groups), 4.3, 1, len(groups))
    for ax, (title, items) in zip(_axes_list(axes), groups.items()):
        for i, (label, d) in enumerate(items):
            grid, dens = np.asarray(d.grid), np.asarray(d.density)
            try:
                nodes, weights = np.asarray(d.nodes, dtype=np.float64), np.asarray(d.weights, dtype=np.float64)
                valid = d.valid()
                lo, hi = float(nodes[valid].min()), float(nodes[valid].max())
                width = max(hi - lo, 1e-12)
                # the same kernel variance as the stored density: sigma2 = var / max(1, width of its grid)
                rel = float(d.sigma2) / max(1.0, float(grid[-1] - grid[0]))
                g = np.linspace(lo - pad * width, hi + pad * width, grid_size)
                grid, dens, _ = smooth_density(nodes, weights, rel, grid=g, counts=np.asarray(d.num_steps))
            except Exception:  # noqa: BLE001 - fall back on the stored grid
                pass
            ax.semilogy(grid, dens + floor, color=f"C{i}", lw=1.2, label=label)
        ax.set_xlabel("eigenvalue λ of the Hessian")
        ax.set_ylabel(f"density φ(λ) + {floor:g} (log scale)")
        ax.set_title(title)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.25)
    return fig


def top_eigenvalues(eig: Any, fit: Any | None, title: str):
    """Left: the top eigenvalues on log-log axes with the power-law fit; right: the
    relative residuals ‖Hv − λv‖/|λ| of the same eigenpairs."""
    fig, (ax, ax2) = new_figure(12.0, 4.5, 1, 2)
    lam = np.asarray(eig.eigenvalues, dtype=np.float64)
    k = np.arange(1, lam.size + 1)
    if fit is not None:
        fit.plot(ax=ax)
        neg = lam <= 0
        if np.any(neg):
            ax.text(0.02, 0.02, f"{int(neg.sum())} non-positive eigenvalue(s) not shown", transform=ax.transAxes,
                    fontsize="small", color="0.35")
    else:
        pos = lam > 0
        ax.loglog(k[pos], lam[pos], "o", ms=3, label="eigenvalues")
        ax.set_xlabel("index k")
        ax.set_ylabel("eigenvalue λ_k")
        ax.legend(fontsize="small")
    ax.set_title(f"{title}: top {lam.size} eigenvalues, log-log")
    res = np.asarray(eig.residuals, dtype=np.float64)
    rel = res / np.maximum(np.abs(lam), 1e-300)
    ok = np.isfinite(rel)
    if np.any(ok):
        ax2.semilogy(k[ok], np.maximum(rel[ok], 1e-18), "o", ms=3, color="C0", label="‖Hv − λv‖ / |λ|")
        ax2.legend(fontsize="small")
    else:
        ax2.text(0.5, 0.5, "residuals not measured", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xlabel("index k")
    ax2.set_ylabel("relative residual (log scale)")
    ax2.set_title(f"{title}: accuracy of each eigenpair ({eig.num_matvecs} products)")
    ax2.grid(alpha=0.25)
    return fig


def overlap_curves(curves: Mapping[str, Any], title: str):
    """Overlap ‖U_kᵀV_k‖²_F/k against k, one line per label, random baselines k/n dashed."""
    fig, ax = new_figure(7.0, 5.0 + 0.2 * len(curves))
    for i, (label, c) in enumerate(curves.items()):
        ax.plot(c.ks, c.overlaps, "o-", ms=3, color=f"C{i}", label=f"{label} (n = {c.n})")
        ax.plot(c.ks, c.random_baseline, ":", color=f"C{i}", lw=1)
    ax.plot([], [], ":", color="0.4", label="random subspaces (k/n)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("k (dimension of the top-k eigenspace)")
    integer_ticks(ax)
    ax.set_ylabel("overlap ‖U_kᵀV_k‖²_F / k")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2 if len(curves) < 4 else 1)
    ax.grid(alpha=0.25)
    return fig


def kfac_vs_exact(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str):
    """Top eigenvalues of each layer's exact Hessian block (solid) and of B ⊗ A (dashed)."""
    fig, ax = new_figure(7.0, 4.5)
    for i, (label, (exact, kfac)) in enumerate(pairs.items()):
        exact, kfac = np.asarray(exact, dtype=np.float64), np.asarray(kfac, dtype=np.float64)
        ax.semilogy(np.arange(1, exact.size + 1), np.maximum(exact, 1e-12), "o-", ms=3, color=f"C{i}",
                    label=f"{label}: exact block")
        ax.semilogy(np.arange(1, kfac.size + 1), np.maximum(kfac, 1e-12), "s--", ms=3, mfc="none",
                    color=f"C{i}", label=f"{label}: E[M] ⊗ E[xxᵀ]")
    ax.set_xlabel("index i")
    integer_ticks(ax)
    ax.set_ylabel("eigenvalue λ_i (log scale)")
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=2)
    ax.grid(alpha=0.25)
    return fig


def low_rank_shares(groups: Mapping[str, Mapping[str, Any]], title: str):
    """σ₁²/Σσ² of the top eigenvectors reshaped to the weight matrix: one panel per model,
    one line per layer (``groups``: {model: {layer label: LowRank}})."""
    fig, axes = new_figure(5.0 * len(groups), 4.2, 1, len(groups), sharey=True)
    for ax, (model, shares) in zip(_axes_list(axes), groups.items()):
        for i, (label, lr) in enumerate(shares.items()):
            top = np.atleast_1d(np.asarray(lr.top_share, dtype=np.float64))
            ax.plot(np.arange(1, top.size + 1), top, "o-", ms=3, color=f"C{i}",
                    label=f"{label} ({lr.shape[0]}×{lr.shape[1]})")
        ax.axhline(1.0, color="0.5", lw=0.8, ls="--", label="rank one")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("eigenvector index i (descending eigenvalue)")
        ax.set_title(model)
        ax.legend(fontsize="small", loc="lower left")
        ax.grid(alpha=0.25)
    _axes_list(axes)[0].set_ylabel("share of the top singular value σ₁²/Σσ²")
    integer_ticks(_axes_list(axes)[0])
    # One panel (one model) is narrow: wrap the title rather than cut it at the edges.
    fig.suptitle(textwrap.fill(title, max(30, int(11 * 5.0 * len(groups)))))
    return fig


def concentration_curves(results: Mapping[str, Any], title: str):
    """Cumulative share of ‖g‖² in the top-j eigenspace, j = 1..k, per model."""
    fig, ax = new_figure(7.0, 4.5)
    for i, (label, r) in enumerate(results.items()):
        idx = np.arange(1, r.k + 1)
        ax.plot(idx, r.cumulative, "o-", ms=3, color=f"C{i}", label=f"{label}: {r.concentration:.2f} at k = {r.k}")
    if results:
        r = next(iter(results.values()))
        ax.axhline(r.k / r.num_params, color="0.4", ls=":", lw=1, label=f"random subspace (k/n ≈ {r.k / r.num_params:.1e})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("j (top-j Hessian eigenvectors)")
    integer_ticks(ax)
    ax.set_ylabel("‖V_jᵀ g‖² / ‖g‖²")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.25)
    return fig


def outlier_panels(results: Mapping[str, Any], ncols: int = 2):
    """One rank plot per model with the outliers marked (``OutlierResult.plot``)."""
    ncols = min(ncols, len(results))
    nrows = -(-len(results) // ncols)
    fig, axes = new_figure(6.0 * ncols, 4.0 * nrows, nrows, ncols)
    axs = _axes_list(axes)
    for ax, (label, r) in zip(axs, results.items()):
        r.plot(ax=ax)
        if r.count == 0:  # no boundary: the "bulk edge" would just be λ₁
            for line in list(ax.get_lines()):
                if str(line.get_label()).startswith("bulk edge"):
                    line.remove()
            ax.legend(fontsize="small")
        ax.set_title(f"{label}: {r.count} outlier(s)" + (" (no gap passes the rule)" if r.count == 0 else ""))
        ax.grid(alpha=0.25)
    for ax in axs[len(results):]:
        ax.set_visible(False)
    return fig


def dominant_panels(results: Mapping[str, Any], title: str):
    """Eigenvalues of each layer's output factor B = E[M], the dominant ones highlighted."""
    fig, axes = new_figure(4.6 * len(results), 4.0, 1, len(results))
    for ax, (label, r) in zip(_axes_list(axes), results.items()):
        r.plot(ax=ax)
        ax.set_title(f"{label}: {r.count} dominant")
        ax.set_ylabel("eigenvalue of B = E[M] (log scale)")
    fig.suptitle(title)
    return fig


def tracking_lines(histories: Mapping[str, Any], xlabel: str = "epoch"):
    """Through training, per model: λ₁, the number of outliers, the gradient concentration
    and the power-law KS distance against its critical value."""
    fig, axes = new_figure(12.0, 7.5, 2, 2)
    a_lam, a_out, a_conc, a_ks = _axes_list(axes)
    for i, (label, h) in enumerate(histories.items()):
        c = f"C{i}"
        steps, lam = h.top_eigenvalues()
        if len(steps):
            a_lam.semilogy(steps, lam[:, 0], "o-", ms=3, color=c, label=f"{label}: λ₁")
            a_lam.semilogy(steps, lam[:, -1], "s--", ms=3, mfc="none", color=c, label=f"{label}: λ_{lam.shape[1]}")
        steps, counts = h.outlier_counts()
        if len(steps):
            a_out.plot(steps, counts, "o-", ms=3, color=c, label=label)
        steps, conc = h.concentration()
        if len(steps):
            a_conc.plot(steps, conc, "o-", ms=3, color=c, label=label)
        steps, ks = h.series("power_law", "ks_distance")
        if len(steps):
            _, crit = h.series("power_law", "ks_critical")
            a_ks.plot(steps, ks, "o-", ms=3, color=c, label=f"{label}: d_ks")
            a_ks.plot(steps, crit, ":", color=c, lw=1, label=f"{label}: critical 1.36/√K")
    a_lam.set_ylabel("eigenvalue (log scale)")
    a_lam.set_title("Largest and k-th Hessian eigenvalue")
    a_out.set_ylabel("number of outliers")
    a_out.set_title("Outliers separated from the bulk (from the SLQ density)")
    a_conc.set_ylabel("‖V_kᵀ g‖² / ‖g‖²")
    a_conc.set_ylim(-0.02, 1.02)
    a_conc.set_title("Gradient concentration in the top-k eigenspace")
    a_ks.set_ylabel("Kolmogorov–Smirnov distance")
    a_ks.set_title("Power-law fit of the top-k eigenvalues (KS accepts below dotted)")
    integer_ticks(a_out, "y")
    lo, hi = a_out.get_ylim()  # all counts 0: without room for 1 the integer locator falls back to fractions
    a_out.set_ylim(min(lo, -0.5), max(hi, 1.5))
    for ax in (a_lam, a_out, a_conc, a_ks):
        ax.set_xlabel(xlabel)
        integer_ticks(ax)
        ax.grid(alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig


def density_heatmaps(histories: Mapping[str, Any], xlabel: str = "epoch", grid_size: int = 300,
                     dynamic_range: float = 1e6):
    """The eigenvalue density through training as a heatmap (log colour scale), one panel
    per model, outliers found at each step marked."""
    from matplotlib.colors import LogNorm

    fig, axes = new_figure(6.2 * len(histories), 4.6, 1, len(histories))
    for ax, (label, h) in zip(_axes_list(axes), histories.items()):
        steps, grid, D = h.density_map(grid_size=grid_size)
        if not len(steps):
            ax.text(0.5, 0.5, "density not recorded", ha="center", va="center", transform=ax.transAxes)
            continue
        s = steps.astype(np.float64)
        if s.size == 1:
            ex = np.array([s[0] - 0.5, s[0] + 0.5])
        else:
            mid = (s[1:] + s[:-1]) / 2
            ex = np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])
        delta = grid[1] - grid[0]
        ey = np.concatenate([grid - delta / 2, grid[-1:] + delta / 2])
        vmax = float(D.max()) if D.max() > 0 else 1.0
        mesh = ax.pcolormesh(ex, ey, np.maximum(D, vmax / dynamic_range).T,
                             norm=LogNorm(vmin=vmax / dynamic_range, vmax=vmax), cmap="magma", shading="flat")
        fig.colorbar(mesh, ax=ax, label="density (log scale)")
        xs, ys = [], []
        for r in h.records:
            o = (r.get("density") or {}).get("outliers") or {}
            for p in o.get("positions") or []:
                if p is not None:
                    xs.append(r["step"])
                    ys.append(p)
        if xs:
            ax.plot(xs, ys, "x", color="cyan", ms=5, mew=1.2, label="outliers")
            ax.legend(fontsize="small", loc="upper left")
        ax.set_xticks(steps)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eigenvalue λ")
        ax.set_title(f"{label}: Hessian eigenvalue density")
    return fig


def rank_sweep(rows: Sequence[Mapping[str, Any]], title: str, x_key: str = "hidden", xlabel: str = "hidden width M₁"):
    """Measured numerical ranks (markers) against the predicted ones (lines) over a sweep.

    ``rows``: dicts with ``x_key``, ``num_params`` and ``ranks``/``predicted`` dicts keyed
    by ``"H_L"``, ``"H_O"``, ``"H_F"``.
    """
    fig, ax = new_figure(7.0, 4.5)
    x = np.array([r[x_key] for r in rows], dtype=np.float64)
    names = {"H_L": "H_L (Hessian)", "H_O": "H_O (outer product)", "H_F": "H_F (functional)"}
    for i, part in enumerate(("H_L", "H_O", "H_F")):
        pred = np.array([np.nan if r["predicted"].get(part) is None else r["predicted"][part] for r in rows])
        meas = np.array([r["ranks"][part] for r in rows], dtype=np.float64)
        ax.plot(x, pred, "-", color=f"C{i}", lw=1.5, label=f"{names[part]}: formula")
        ax.plot(x, meas, "o", color=f"C{i}", ms=6, mfc="none", mew=1.5, label=f"{names[part]}: measured")
    ax.plot(x, [r["num_params"] for r in rows], ":", color="0.4", label="n (number of parameters)")
    ax.set_xlabel(xlabel)
    integer_ticks(ax, "xy")
    ax.set_ylabel("rank")
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=2)
    ax.grid(alpha=0.25)
    return fig


def rank_bars(report: Any):
    """Measured against predicted ranks of one network (``RankReport.plot``)."""
    fig, ax = new_figure(7.0, 4.5)
    report.plot(ax=ax)
    return fig


def singular_values(report: Any, title: str):
    """All singular values of H_L, H_O and H_F with each matrix's rank threshold."""
    fig, ax = new_figure(7.0, 4.5)
    tiny = np.finfo(np.float64).tiny
    style = {"H_L": dict(marker="o", ms=5, mfc="none", ls=""), "H_O": dict(marker=".", ms=4, ls=""),
             "H_F": dict(marker="x", ms=3, ls="")}
    for i, part in enumerate(("H_L", "H_O", "H_F")):
        sv = np.asarray(report.singular_values[part])
        ax.semilogy(np.arange(1, sv.size + 1), np.maximum(sv, tiny), color=f"C{i}",
                    label=f"{part}: rank {report.ranks[part]}", **style[part])
        ax.axhline(report.thresholds[part], color=f"C{i}", ls="--", lw=0.8)
    ax.plot([], [], "--", color="0.4", lw=0.8, label="thresholds σ_max·n·eps")
    ax.set_ylim(bottom=max(1e-30, min(report.thresholds.values()) * 1e-6))
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value σ_i (log scale)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.25)
    return fig


def training_curves(runs: Mapping[str, Mapping[str, Any]]):
    """Training loss per epoch, with the checkpoints marked."""
    fig, ax = new_figure(7.0, 4.2)
    for i, (label, run) in enumerate(runs.items()):
        loss = np.asarray(run["train_loss"], dtype=np.float64)
        ep = np.arange(1, loss.size + 1)
        ax.semilogy(ep, loss, "-", color=f"C{i}", label=f"{label} (test accuracy {run['test_accuracy']:.3f})")
        ck = [e for e in run.get("checkpoint_epochs", []) if 1 <= e <= loss.size]
        ax.semilogy(ck, loss[np.array(ck, dtype=int) - 1] if ck else [], "o", color=f"C{i}", ms=4)
    ax.plot([], [], "o", color="0.4", ms=4, label="checkpoint kept")
    ax.set_xlabel("epoch")
    integer_ticks(ax)
    ax.set_ylabel("mean training loss (cross-entropy, log scale)")
    ax.set_title("Training on scikit-learn's digits (SGD, momentum 0.9)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.25)
    return fig
