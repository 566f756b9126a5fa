"""Eigenvalue density by stochastic Lanczos quadrature: ``hl.spectral_density``.

Ghorbani, Krishnan, Xiao (ICML 2019). For a unit probe v, m Lanczos steps give T_m;
its eigenvalues ℓ_j (nodes) and the squared first components of its eigenvectors ω_j
(weights) form a Gauss quadrature with Σ_j ω_j ℓ_j^p = vᵀ A^p v for p ≤ 2m − 1. The
density φ_σ(t) = (1/n) tr g_σ(A − t I) is estimated by averaging Σ_j ω_j g_σ(t − ℓ_j)
over probes. All probes advance together (one batched product per step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from .._plotting import axes
from .._results import Result
from ..errors import require
from ..linops import LinearOperator
from ._checks import check_basis_dtype, check_grid, check_int, check_real, global_size, is_int
from ._krylov import breakdown_tol, run_krylov


#: The padding of the density's grid beyond the mean extreme nodes (the reference code's).
GRID_EXPAND = 1e-2


class _Curve:
    """A field of :class:`SpectralDensity` (``grid`` or ``density``) computed on first
    access: :func:`spectral_density` leaves both None together with the smoothing recipe,
    and the first read evaluates the curve with :func:`smooth_density` (the same call, so
    the same values, as computing it at once). A dataclass field with this descriptor as
    its class attribute has no default (``__get__`` on the class raises AttributeError)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            raise AttributeError(self.name)
        values = obj.__dict__
        if values.get(self.name) is None and values.get("_recipe") is not None:
            recipe = values.pop("_recipe")
            grid, density, _ = smooth_density(obj.nodes, obj.weights, recipe["sigma2"], recipe["grid_size"],
                                              recipe["grid"], counts=obj.num_steps)
            values["grid"], values["density"] = grid, density
        return values.get(self.name)

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.name] = value
        if value is not None:
            obj.__dict__.pop("_recipe", None)  # an explicit curve replaces a pending one


@dataclass
class SpectralDensity(Result):
    """Quadrature nodes and weights per probe, and the smoothed density on a grid.

    The grid and density of a result of :func:`spectral_density` are evaluated on first
    access (``.grid``, ``.density``, :meth:`plot`, :meth:`to_dict`, :meth:`save`, ``==``),
    not at the end of the run: a 10,000-point curve costs a sizeable share of a small
    model's SLQ time and most callers only read the nodes and weights.

    Attributes:
        nodes: (num_probes, m) Ritz values per probe, ascending; a probe whose Krylov
            space was exhausted after m_i < m steps has zero-weight padding after m_i.
        weights: (num_probes, m), each row sums to 1.
        num_steps: (num_probes,) Lanczos steps per probe.
        grid: (grid_size,) evaluation points.
        density: (grid_size,) the smoothed density, normalised so Σ density·Δt = 1.
        sigma2: the Gaussian kernel's variance used (already scaled by the spectrum width).
        num_matvecs: operator products used (columns).
        reorthogonalize: "full" or "local" (see :func:`spectral_density`); with "local",
            nodes may hold duplicate copies of converged outliers sharing their weight.
    """

    nodes: np.ndarray
    weights: np.ndarray
    num_steps: np.ndarray
    grid: np.ndarray = _Curve()
    density: np.ndarray = _Curve()
    sigma2: float
    num_matvecs: int
    reorthogonalize: str = "full"

    def moments(self, p: int) -> np.ndarray:
        """Σ_j ω_j ℓ_j^p per probe: equals vᵀ A^p v for p ≤ 2 m − 1."""
        return (np.asarray(self.weights) * np.asarray(self.nodes, dtype=np.float64) ** p).sum(axis=1)

    def negative_mass(self, tol: float | None = None) -> float:
        """The share of the spectrum below −tol, averaged over probes (Σ ω_j over ℓ_j < −tol).

        Hessians of trained networks have a large cluster of Ritz values at ±(tiny), which a
        strict ``< 0`` would count as negative mass; the default tol is the smoothing
        kernel's standard deviation √sigma2, below which the density cannot tell a value from 0.
        Pass ``tol=0`` for the strict count.
        """
        tol = float(np.sqrt(self.sigma2)) if tol is None else float(tol)
        w, x = np.asarray(self.weights), np.asarray(self.nodes)
        return float((w * ((x < -tol) & self.valid())).sum(axis=1).mean())

    def valid(self) -> np.ndarray:
        """(num_probes, m) bool: which entries of nodes/weights are real (not padding)."""
        steps = np.asarray(self.num_steps)
        return np.arange(np.asarray(self.nodes).shape[1])[None, :] < steps[:, None]

    def plot(self, ax=None, label: str | None = None, **kwargs):
        """The density on a log y-axis (density + 1e-7, as in Ghorbani et al.); returns the Axes."""
        ax = axes(ax, (6.0, 4.0))
        ax.semilogy(self.grid, np.asarray(self.density) + 1e-7, label=label, **kwargs)
        ax.set_xlabel("eigenvalue λ")
        ax.set_ylabel("density (log scale)")
        ax.set_title(f"Hessian eigenvalue density (SLQ, {len(self.nodes)} probes × {int(np.max(self.num_steps))} steps)")
        if label:
            ax.legend()
        return ax


def gauss_quadrature(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes (eigenvalues of T) and weights (squared first components) of a tridiagonal T."""
    if alphas.shape[0] == 1:
        return alphas.copy(), np.ones(1)
    theta, S = scipy.linalg.eigh_tridiagonal(alphas, betas)
    return theta, S[0, :] ** 2


def smooth_density(
    nodes: np.ndarray, weights: np.ndarray, sigma2: float = 1e-5, grid_size: int = 10000,
    grid: np.ndarray | None = None, grid_expand: float = GRID_EXPAND, counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Ghorbani et al.'s smoothing (their reference code, google/spectral-density).

    Grid: ``grid_size`` points from (mean over probes of the smallest node) − grid_expand
    to (mean of the largest node) + grid_expand. Kernel: a Gaussian whose variance is
    sigma2 · max(1, λ_max − λ_min) over that range. Densities are averaged over probes and
    renormalised so that Σ density·Δt = 1.

    ``counts`` (num_probes,) gives the valid nodes per probe (the rest is padding).

    Returns:
        grid, density, the kernel variance used.
    """
    check_real("sigma2", sigma2, hint=" (the kernel variance before scaling by the spectrum width)")
    check_int("grid_size", grid_size, 2)
    check_real("grid_expand", grid_expand, low_open=False)
    grid = check_grid(grid)
    valid, lo, hi = _support(nodes, counts, grid_expand)
    if grid is None:
        grid = np.linspace(lo, hi, grid_size)
    var = sigma2 * max(1.0, hi - lo)
    density = np.zeros_like(grid)
    for x, w, keep in zip(nodes, weights, valid):
        diff = grid[:, None] - x[None, keep]
        density += (np.exp(-(diff**2) / (2 * var)) / np.sqrt(2 * np.pi * var)) @ w[keep]
    density /= len(nodes)
    step = grid[1] - grid[0] if len(grid) > 1 else 1.0
    total = density.sum() * step
    return grid, density / total if total > 0 else density, var


def _support(nodes: np.ndarray, counts, grid_expand: float) -> tuple[np.ndarray, float, float]:
    """(valid mask, lo, hi) of :func:`smooth_density`: the mean extreme nodes ± grid_expand."""
    counts = np.full(len(nodes), nodes.shape[1]) if counts is None else np.asarray(counts)
    valid = np.arange(nodes.shape[1])[None, :] < counts[:, None]
    lo = np.mean([x[v].min() for x, v in zip(nodes, valid)]) - grid_expand
    hi = np.mean([x[v].max() for x, v in zip(nodes, valid)]) + grid_expand
    return valid, lo, hi


def spectral_density(
    op: LinearOperator,
    num_steps: int = 90,
    num_probes: int = 8,
    *,
    seed: int = 0,
    sigma2: float = 1e-5,
    grid_size: int = 10000,
    grid: np.ndarray | None = None,
    preset: str | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    reorthogonalize: str = "full",
    progress: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
) -> SpectralDensity:
    """Estimate the eigenvalue density of a symmetric operator by SLQ.

    All ``num_probes`` Lanczos runs advance together: each step is one batched product
    (one pass over the data for every probe) and one compiled step with full
    reorthogonalization. Probes are Gaussian, normalised (as in the reference code). A
    probe whose Krylov space is exhausted stops early (its quadrature is then exact),
    where the reference code raises an error.

    The default smoothing is the reference code's ("ghorbani" preset: σ² = 1e-5 scaled by
    max(1, spectrum width), a 10,000-point grid padded by 0.01); ``preset="ghorbani"`` also
    pins num_steps = 90 if it was left at its default, and always uses float64 bases.

    A sharded operator (``op.shards``): every rank calls it with the same arguments, the
    probes' shards are drawn from each rank's own stream (``shards.seed(seed)``), the
    basis holds the local (num_probes, num_steps, n_r) shards, and nodes, weights and the
    density are identical on every rank (see :func:`hesslab.lanczos` for checkpoints).

    Args:
        op: symmetric (n, n) operator.
        num_steps: Lanczos steps per probe (quadrature degree 2·num_steps − 1), ≤ n.
        num_probes: random probes (variance of the estimate ∝ 1/num_probes).
        seed: seed of the probes.
        sigma2, grid_size, grid: smoothing (see :func:`smooth_density`).
        basis_dtype, basis_device: storage of the (num_probes, num_steps, n) basis.
        reorthogonalize: "full" (default, as in the paper): every new Lanczos vector is
            orthogonalized against the probe's whole basis (CGS2), which is kept in memory.
            "local": only against the previous two vectors, keeping 3 instead of num_steps
            vectors per probe and doing 2 instead of up to num_steps rows of work per step,
            for models whose basis does not fit or whose products are cheap next to the
            reorthogonalization. Without global orthogonality converged outliers come back
            as duplicate Ritz values; the quadrature splits their weight between the copies,
            so the density and its moments stay accurate (Paige 1976; Golub & Meurant 2010,
            ch. 4), though individual nodes are no longer eigenvalue estimates to trust.
        progress: progress bar; None shows it when stderr is a terminal.
        checkpoint: file to save state to and resume from after an interruption.
        checkpoint_every: steps between checkpoint writes (an interruption always writes).

    Returns:
        SpectralDensity.
    """
    n = global_size(op)
    if preset is not None:
        require(preset == "ghorbani", f"preset must be None or 'ghorbani', got {preset!r}")
        sigma2, grid_size, basis_dtype = 1e-5, 10000, torch.float64
    check_int("num_steps", num_steps, 1, n, hint=f" (n = {n})")
    check_int("num_probes", num_probes, 1)
    require(is_int(seed), f"seed must be an integer, got {seed!r}")
    check_real("sigma2", sigma2, hint=" (the kernel variance before scaling by the spectrum width)")
    check_int("grid_size", grid_size, 2)
    grid = check_grid(grid)
    check_basis_dtype(basis_dtype)
    basis_dtype = basis_dtype or op.dtype
    basis_device = torch.device(basis_device) if basis_device is not None else op.device
    gen = torch.Generator().manual_seed(seed if op.shards is None else op.shards.seed(seed))
    starts = torch.randn(num_probes, op.shape[0], generator=gen, dtype=torch.float64)
    before = op.num_matvecs
    state = run_krylov(
        op, starts, num_steps, basis_dtype=basis_dtype, basis_device=basis_device, on_breakdown="stop",
        generator=gen, breakdown_tol=breakdown_tol(basis_dtype), progress=progress,
        desc=f"SLQ {num_probes} probes", checkpoint=checkpoint, checkpoint_every=checkpoint_every,
        config={"solver": "slq", "seed": seed}, reorthogonalize=reorthogonalize,
    )
    nodes = np.zeros((num_probes, num_steps))
    weights = np.zeros((num_probes, num_steps))
    for i in range(num_probes):
        d, e = state.tridiagonal(i)
        x, w = gauss_quadrature(d.numpy(), e.numpy())
        nodes[i, : len(x)], weights[i, : len(w)] = x, w
    counts = state.steps.cpu().numpy()
    _, lo, hi = _support(nodes, counts, GRID_EXPAND)
    result = SpectralDensity(nodes, weights, counts, None, None, sigma2 * max(1.0, hi - lo),
                             op.num_matvecs - before, reorthogonalize)
    result.__dict__["_recipe"] = {"sigma2": sigma2, "grid_size": grid_size, "grid": grid}  # the curve, when read
    return result
