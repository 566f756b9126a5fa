"""Gradient concentration and outlier eigenvalues (Ghorbani, Krishnan, Xiao, ICML 2019).

Two findings of Ghorbani et al. become measurements here:

* Large isolated eigenvalues (*outliers*) separate from the bulk of the Hessian spectrum
  early in training (about one per class without BatchNorm). :func:`outliers` finds them
  in a list of top eigenvalues (``hl.lanczos``, ``hl.eigh_exact``) or in a stochastic
  Lanczos quadrature (``hl.spectral_density``), with the rule documented there.
* The full-data gradient g concentrates in the span of the top eigenvectors:
  :func:`gradient_concentration` measures ``‖V_kᵀ g‖² / ‖g‖²``.

Notation: L the sample-mean loss over all of the data, θ ∈ R^n the parameters,
g = ∇L(θ) (n,), H = ∇²L(θ) with eigenpairs (λ_i, v_i), λ₁ ≥ … ≥ λ_n, and
V_k = [v_1 … v_k] (n, k).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hesslab._plotting import axes
from hesslab._results import Result
from hesslab.analysis.powerlaw import as_float64_vector
from hesslab.errors import HesslabError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

    from hesslab.linops import LinearOperator
    from hesslab.solvers import EigenResult, SpectralDensity

__all__ = ["ConcentrationResult", "gradient_concentration", "OutlierResult", "outliers"]

#: Largest deviation |VᵀV − I| accepted for given eigenvectors (float32 Ritz vectors
#: are orthonormal to ~1e-6).
ORTHONORMALITY_TOL = 1e-4


# ======================================================================================
# Gradient concentration
# ======================================================================================


@dataclasses.dataclass
class ConcentrationResult(Result):
    """How much of the gradient lies in the top-k Hessian eigenspace.

    Attributes:
        concentration: ``‖V_kᵀ g‖² / ‖g‖²`` in [0, 1] (NaN when g = 0).
        shares: ``(v_iᵀ g)² / ‖g‖²`` per eigenvector, shape (k,), in the order of the
            eigenvectors (descending eigenvalues); they sum to :attr:`concentration`.
        eigenvalues: λ_i of the eigenvectors used, shape (k,) (NaN where unknown: raw
            eigenvectors were given).
        gradient_norm: ‖g‖₂.
        k: The number of eigenvectors used.
        num_params: n.
    """

    concentration: float
    shares: np.ndarray
    eigenvalues: np.ndarray
    gradient_norm: float
    k: int
    num_params: int

    def __post_init__(self) -> None:
        self.shares = np.asarray(self.shares, dtype=np.float64)
        self.eigenvalues = np.asarray(self.eigenvalues, dtype=np.float64)

    @property
    def cumulative(self) -> np.ndarray:
        """``‖V_jᵀ g‖² / ‖g‖²`` for j = 1..k, shape (k,): the concentration as a curve over k."""
        return np.cumsum(self.shares)

    @property
    def random_baseline(self) -> float:
        """k/n: the expected concentration in a random k-dimensional subspace."""
        return self.k / self.num_params

    def plot(self, ax: Axes | None = None) -> Axes:
        """Bars of the per-eigenvector shares and the cumulative curve over k.

        Args:
            ax: Axes to draw on; a new figure's Axes when None (``plt.show`` is never
                called).

        Returns:
            The matplotlib Axes drawn on.
        """
        ax = axes(ax, (6.0, 4.5))
        idx = np.arange(1, self.k + 1)
        ax.bar(idx, self.shares, color="C0", alpha=0.7, label="share of eigenvector i: (v_iᵀg)²/‖g‖²")
        ax.plot(idx, self.cumulative, "o-", color="C3", ms=4, label="cumulative: ‖V_iᵀg‖²/‖g‖²")
        ax.axhline(self.random_baseline, color="C7", ls="--", lw=1,
                   label=f"random {self.k}-dim subspace: k/n = {self.random_baseline:.2g}")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("eigenvector index i (descending eigenvalue)")
        ax.set_ylabel("share of ‖g‖²")
        ax.set_title(f"Gradient concentration in the top-{self.k} eigenspace: {self.concentration:.3f}")
        ax.legend(fontsize="small", loc="center right")
        return ax


def _as_float64_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    if not isinstance(x, Tensor):
        raise HesslabError(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise HesslabError(f"{name}: expected a floating tensor, got dtype {x.dtype}")
    return x.detach().to("cpu", torch.float64)


def gradient_concentration(
    op: LinearOperator,
    k: int | None = None,
    eigenvectors: Tensor | np.ndarray | EigenResult | None = None,
    *,
    gradient: Tensor | np.ndarray | None = None,
    seed: int = 0,
    lanczos_options: dict[str, Any] | None = None,
) -> ConcentrationResult:
    r"""The share of the gradient in the top-k Hessian eigenspace (Ghorbani et al.).

    .. math::
        c_k = \frac{\lVert V_k^\top g\rVert^2}{\lVert g\rVert^2}
            = \sum_{i=1}^{k} \frac{(v_i^\top g)^2}{\lVert g\rVert^2},

    with g = ∇L(θ) the full-data gradient (``op.gradient()``, one pass over the data) and
    V_k (n, k) the top-k eigenvectors of ``op``, computed by :func:`hesslab.lanczos`
    (``which="LA"``) unless given. A random k-dimensional subspace holds k/n of ‖g‖² on
    average; Ghorbani et al. report c_k close to 1 for k ≈ the number of outliers (about
    the number of classes) in networks without BatchNorm. All products are in float64.

    Args:
        op: The Hessian (or another curvature operator) of shape (n, n): a
            :class:`hesslab.Hessian`, whose ``gradient()`` gives g, or any
            :class:`hesslab.LinearOperator` together with ``gradient=``.
        k: How many eigenvectors to use. Default: 10 when they are computed here, all
            the given ones otherwise; with ``eigenvectors`` given, the first k columns.
        eigenvectors: Orthonormal eigenvectors (n, j), j ≥ k, descending eigenvalues
            first (a tensor or array), or an :class:`hesslab.EigenResult` (its
            eigenvalues are reported too). None: computed with ``hl.lanczos(op, k)``.
        gradient: g (n,), when ``op`` has no ``gradient()`` method or it is known already.
        seed: Seed of the Lanczos start vector.
        lanczos_options: Extra keyword arguments for :func:`hesslab.lanczos` (``tol``,
            ``max_steps``, ``v0``, ...).

    Returns:
        A :class:`ConcentrationResult`. When g = 0 (an exact critical point) the
        concentration and shares are NaN.

    Raises:
        HesslabError: ``op`` without ``gradient()`` and no ``gradient=``, shapes that do
            not match n, k out of range, or eigenvectors that are not orthonormal.
    """
    from hesslab.linops import LinearOperator
    from hesslab.solvers import EigenResult, lanczos

    if not isinstance(op, LinearOperator):
        raise HesslabError(
            f"op: expected a hesslab LinearOperator (e.g. hl.Hessian(model, loss_fn, data)), got {type(op).__name__}"
        )
    n = op.shape[0]
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise HesslabError(f"k: expected a positive int (the number of top eigenvectors) or None, got {k!r}")

    # ---- the gradient
    if gradient is None:
        if not callable(getattr(op, "gradient", None)):
            raise HesslabError(
                f"gradient: {type(op).__name__} has no gradient() method; pass gradient= (the full-data "
                "gradient, shape (n,)) or use a curvature operator such as hl.Hessian"
            )
        gradient = op.gradient()
    g = _as_float64_tensor(gradient, "gradient")
    if g.numel() != n:
        raise HesslabError(f"gradient: expected a vector of n = {n} entries, got shape {tuple(g.shape)}")
    g = g.reshape(-1)

    # ---- the eigenvectors
    eigenvalues: Tensor | None = None
    if eigenvectors is None:
        k = 10 if k is None else int(k)
        if k >= n:
            raise HesslabError(
                f"k: must be < n = {n} to compute the eigenvectors with hl.lanczos, got {k}; pass "
                "eigenvectors= (e.g. from hl.eigh_exact(op)) to use all of them"
            )
        options = {"seed": seed, "compute_residuals": False, **(lanczos_options or {})}
        result = lanczos(op, k=k, which="LA", **options)
        V, eigenvalues = result.eigenvectors, result.eigenvalues
    elif isinstance(eigenvectors, EigenResult):
        if eigenvectors.eigenvectors is None:
            raise HesslabError(
                "eigenvectors: the EigenResult holds no eigenvectors; rerun hl.lanczos with "
                "return_eigenvectors=True"
            )
        V, eigenvalues = eigenvectors.eigenvectors, eigenvectors.eigenvalues
    else:
        V = eigenvectors
    V = _as_float64_tensor(V, "eigenvectors")
    if V.dim() == 1:
        V = V[:, None]
    if V.dim() != 2 or V.shape[0] != n:
        raise HesslabError(f"eigenvectors: expected shape (n, j) with n = {n}, got {tuple(V.shape)}")
    j = V.shape[1]
    if k is None:
        k = j
    if not 1 <= k <= j:
        raise HesslabError(f"k: {j} eigenvectors were given, so k must be in 1..{j}; got {k}")
    V = V[:, :k]
    gram_err = float((V.T @ V - torch.eye(k, dtype=torch.float64)).abs().max())
    if not gram_err <= ORTHONORMALITY_TOL:
        raise HesslabError(
            f"eigenvectors: the columns are not orthonormal (max |VᵀV − I| = {gram_err:.2g} > "
            f"{ORTHONORMALITY_TOL:g}); pass eigenvectors from hl.lanczos or numpy.linalg.eigh"
        )
    lam = np.full(k, np.nan) if eigenvalues is None else np.asarray(eigenvalues, dtype=np.float64)[:k]

    g_norm2 = float(g @ g)
    proj = (V.T @ g).numpy()  # (k,)
    if g_norm2 > 0:
        shares = proj**2 / g_norm2
        conc = float(shares.sum())
    else:
        shares = np.full(k, np.nan)
        conc = math.nan
    return ConcentrationResult(
        concentration=conc, shares=shares, eigenvalues=lam, gradient_norm=math.sqrt(g_norm2), k=int(k),
        num_params=int(n),
    )


# ======================================================================================
# Outliers
# ======================================================================================


@dataclasses.dataclass
class OutlierResult(Result):
    """The top eigenvalues that stand apart from the bulk (see :func:`outliers` for the rule).

    Attributes:
        count: The number of outliers c.
        positions: The outlier eigenvalues λ₁ ≥ … ≥ λ_c, shape (c,). From a density: the
            median over the probes that agree on c of their top c Ritz values.
        bulk_edge: The top of the bulk, λ_{c+1} (from a density: the median over those
            probes of their (c+1)-th Ritz value); NaN when too few values were given.
        separation: The score s_c at the chosen boundary (0 when c = 0).
        scores: s_c for c = 1, 2, …, shape (num_candidates,) (0 where a candidate was not
            allowed); from a density, those of the representative probe.
        values: The positive values the rule was applied to, descending (from a density:
            the Ritz values of the representative probe, the first one agreeing on c).
        source: ``"eigenvalues"`` or ``"density"``.
        min_separation: The threshold used.
        window: W, the number of bulk values the gap is compared with.
        num_dropped: Non-positive values (and, from a density, padding) left out.
        counts_per_probe: From a density, c found in each probe, shape (num_probes,)
            (−1 for a probe with fewer than W + 2 positive Ritz values, which does not
            vote); from eigenvalues, ``[count]``.
        masses: From a density, the mean quadrature weight of each outlier over the
            agreeing probes, shape (c,): about multiplicity/n each (a converged Ritz
            value of a simple eigenvalue λ_i carries weight (vᵀu_i)², mean 1/n). Empty
            from eigenvalues.
        outlier_mass: Σ masses: the share of the spectrum in the outliers (≈ c/n); NaN
            from eigenvalues.
        negative_mass: The share of the spectrum below −zero_tol: from a density, the
            quadrature weight of nodes below −zero_tol averaged over probes; from a full
            spectrum (an ``EigenResult`` of ``hl.eigh_exact``), the fraction of
            eigenvalues below −zero_tol; NaN from a partial list.
        negative_mass_strict: The same below 0 (``SpectralDensity.negative_mass(tol=0)``):
            it includes whatever share of the near-zero mass the quadrature node closest
            to 0 happens to carry on its negative side, often a large share for networks
            with many (near-)zero eigenvalues.
        negative_mass_bounds: From a density, guaranteed bounds ``(lo, hi)`` on the
            probes' mean spectral measure of (−∞, 0) by the Chebyshev–Markov–Stieltjes
            inequalities for Gauss quadrature (lo: weights of the nodes strictly below the
            last negative node; hi: weights up to and including the first non-negative
            node); ``(nan, nan)`` otherwise.
        zero_tol: The tolerance used for :attr:`negative_mass`.
    """

    count: int
    positions: np.ndarray
    bulk_edge: float
    separation: float
    scores: np.ndarray
    values: np.ndarray
    source: str
    min_separation: float
    window: int
    num_dropped: int
    counts_per_probe: np.ndarray
    masses: np.ndarray
    outlier_mass: float
    negative_mass: float
    negative_mass_strict: float
    negative_mass_bounds: np.ndarray
    zero_tol: float

    def __post_init__(self) -> None:
        for name in ("positions", "scores", "values", "masses", "negative_mass_bounds"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        self.counts_per_probe = np.asarray(self.counts_per_probe, dtype=np.int64)
        self.count = int(self.count)

    def plot(self, ax: Axes | None = None) -> Any:
        """The rank plot of the values with the outliers marked, and the separation scores.

        Left: λ_i against i (log y-axis), outliers in red, the bulk in grey, the bulk edge
        dashed. Right: s_c against c with the threshold (only when ``ax`` is None).

        Args:
            ax: Axes for the rank plot alone; None makes a new figure with both panels.

        Returns:
            The Axes of the rank plot, or a tuple (rank plot, scores) for a new figure.
        """
        import matplotlib.pyplot as plt

        ax2 = None
        if ax is None:
            _, (ax, ax2) = plt.subplots(1, 2, figsize=(11.0, 4.3))
        vals = self.values
        idx = np.arange(1, vals.size + 1)
        c = self.count
        ax.semilogy(idx[c:], vals[c:], "o", ms=3, color="C7", label="bulk")
        if c:
            ax.semilogy(idx[:c], vals[:c], "o", ms=5, color="C3", label=f"{c} outliers")
        if np.isfinite(self.bulk_edge) and self.bulk_edge > 0:
            ax.axhline(self.bulk_edge, color="C0", ls="--", lw=1, label=f"bulk edge λ_(c+1) = {self.bulk_edge:.3g}")
        ax.set_xlabel("index i (descending)")
        ax.set_ylabel("eigenvalue λ_i" if self.source == "eigenvalues" else "Ritz value λ_i (one probe)")
        ax.set_title(f"Outliers: {c} (from {'a density' if self.source == 'density' else 'eigenvalues'})")
        ax.legend(fontsize="small")
        if ax2 is None:
            return ax
        cc = np.arange(1, self.scores.size + 1)
        ax2.plot(cc, self.scores, "o-", ms=3, color="C0", label="separation s_c")
        ax2.axhline(self.min_separation, color="C3", ls="--", lw=1, label=f"threshold {self.min_separation:g}")
        if c:
            ax2.axvline(c, color="C3", lw=0.8, alpha=0.6, label=f"boundary c = {c}")
        ax2.set_xlabel("candidate count c")
        ax2.set_ylabel("s_c = ln-gap / ln-spread of the next W values")
        ax2.set_title(f"Separation scores (W = {self.window})")
        ax2.legend(fontsize="small")
        return ax, ax2


def separation_scores(values: np.ndarray, window: int, max_outliers: int, floor: float) -> np.ndarray:
    """The separation score s_c of each candidate boundary c (see :func:`outliers`).

    Args:
        values: Positive values, descending, shape (p,).
        window: W.
        max_outliers: Candidates c > max_outliers score 0.
        floor: Candidates whose window reaches below this value score 0.

    Returns:
        s_c for c = 1..p − W − 1, shape (max(0, p − W − 1),).
    """
    p = values.size
    num = max(0, p - window - 1)
    if num == 0:
        return np.zeros(0)
    ell = np.log(values)
    c = np.arange(1, num + 1)
    gap = ell[c - 1] - ell[c]  # ln λ_c − ln λ_{c+1}
    spread = ell[c] - ell[c + window]  # ln λ_{c+1} − ln λ_{c+1+W}
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(spread > 0, gap / np.where(spread > 0, spread, 1.0), np.where(gap > 0, np.inf, 0.0))
    allowed = (c <= max_outliers) & (values[c + window] >= floor)
    return np.where(allowed, s, 0.0)


def _boundary(scores: np.ndarray, min_separation: float) -> int:
    above = np.flatnonzero(scores >= min_separation)
    return int(above[-1] + 1) if above.size else 0


def _check_rule_args(min_separation: Any, window: Any, max_outliers: Any, floor: Any) -> None:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise HesslabError(f"window: expected a positive int (bulk values compared with each gap), got {window!r}")
    if not isinstance(min_separation, (int, float, np.floating)) or not min_separation > 0:
        raise HesslabError(f"min_separation: expected a positive number, got {min_separation!r}")
    if isinstance(max_outliers, bool) or not isinstance(max_outliers, (int, np.integer)) or max_outliers < 1:
        raise HesslabError(f"max_outliers: expected a positive int, got {max_outliers!r}")
    if not isinstance(floor, (int, float, np.floating)) or not 0 <= floor < 1:
        raise HesslabError(f"floor: expected a number in [0, 1) (relative to λ₁), got {floor!r}")


def outliers(
    density_or_eigenvalues: SpectralDensity | EigenResult | Tensor | np.ndarray | Any,
    *,
    min_separation: float = 0.6,
    window: int = 10,
    max_outliers: int = 100,
    floor: float = 1e-4,
    zero_tol: float | None = None,
) -> OutlierResult:
    r"""The top eigenvalues separated from the bulk, their count and positions.

    **The rule** (for a list of eigenvalues). Take the positive values in descending
    order, λ₁ ≥ … ≥ λ_p, and ℓ_i = ln λ_i. A boundary after the c-th value separates
    outliers from the bulk when the gap across it is large compared with the spread of
    the next W values (the top of the bulk):

    .. math::
        s_c = \frac{ℓ_c − ℓ_{c+1}}{ℓ_{c+1} − ℓ_{c+1+W}} \ge s_{\min}
        \qquad (W = \text{window} = 10,\ s_{\min} = \text{min\_separation} = 0.6).

    The count is the **largest** such c (the boundary nearest the bulk: every value above
    it is an outlier, even when the outliers are themselves spread out), or 0 when no
    boundary qualifies. Candidates are c ≤ ``max_outliers`` whose W values below are all
    ≥ ``floor``·λ₁ (ratios of near-zero eigenvalues carry no information).

    Why this form: in log space the score is invariant to scaling the spectrum, and a
    pure power law λ_i = λ₁ i^(−s) (Xie et al.; no separated outliers) scores at most
    ln 2 / ln 6 ≈ 0.39 for every exponent s. The top of a random (Marchenko–Pastur) bulk
    scored at most 0.53 in 200 trials (n = 300, top 40; 99th percentile 0.52), while
    planted outliers at 1.5–30 times the bulk edge score ≥ 4.6 and are all found.
    Measured on a 64-32-32-10 ReLU MLP on the digits data (Hessian over the 1,437
    training samples, top 40 eigenvalues): 9–10 outliers after 3 and 10 epochs of SGD
    (boundary scores 0.69–1.6, every other candidate ≤ 0.55), 3 after one epoch, none at
    initialisation and none after 30 epochs, when the top of the spectrum has become a
    smooth power-law-like decay; with BatchNorm 10 after one epoch and none after 3, 10
    or 30. The margin can be thin: with a 512-sample Hessian the boundary after the
    9th–12th eigenvalue scored 0.35–0.96 over 15 epochs, so the count alternated between
    about 10 and 0. ``min_separation=0.5`` is more sensitive at the price of occasional
    false positives on random bulks. The rule needs at least c + W + 1 positive values:
    from ``hl.lanczos`` ask for k ≥ (expected outliers) + W + 1, e.g. 3 × the number of
    classes.

    **From a density** (:class:`hesslab.SpectralDensity`): the Ritz values of each probe
    (the quadrature nodes) are eigenvalues of the operator projected on its Krylov space;
    the top ones converge to the top eigenvalues of the operator, each with weight
    (vᵀu_i)² ≈ 1/n. The rule runs on each probe's positive nodes; the count is the most
    frequent per-probe count (ties: the smaller), and the positions and bulk edge are
    medians over the probes that agree with it. The result also carries the quadrature
    mass of each outlier and of the negative part of the spectrum. (A threshold on the
    smoothed density does not separate outliers from the top of the bulk: with the
    Ghorbani kernel both appear as isolated spikes of mass ≈ 1/n each.)

    Only the upper end of the spectrum is examined; outliers below the bulk are rare in
    trained networks (Ghorbani et al.) and can be found by passing −λ.

    Args:
        density_or_eigenvalues: A :class:`hesslab.SpectralDensity`, an
            :class:`hesslab.EigenResult` (its eigenvalues; with ``which="all"``, as from
            ``hl.eigh_exact``, it is the full spectrum and the negative mass is
            reported), or eigenvalues in any order (tensor, array, sequence), shape (p,).
        min_separation: s_min, the score a boundary needs.
        window: W, the number of bulk values below a boundary whose spread the gap is
            compared with.
        max_outliers: The largest count considered.
        floor: Relative floor: boundaries whose window reaches below floor·λ₁ are not
            considered.
        zero_tol: Eigenvalues (nodes) below −zero_tol count as negative. Default: from a
            density, the standard deviation √σ² of its smoothing kernel (its resolution;
            nodes closer to 0 stand for the mass around zero); from a full spectrum,
            n · eps(float64) · max|λ| (numpy's rank tolerance).

    Returns:
        An :class:`OutlierResult`.

    Raises:
        HesslabError: Bad arguments, or fewer than W + 2 positive values (the rule needs
            at least one boundary with W values below it).
    """
    from hesslab.solvers import EigenResult, SpectralDensity

    _check_rule_args(min_separation, window, max_outliers, floor)
    if zero_tol is not None and (not isinstance(zero_tol, (int, float, np.floating)) or not zero_tol >= 0):
        raise HesslabError(f"zero_tol: expected a non-negative number or None, got {zero_tol!r}")
    if isinstance(density_or_eigenvalues, SpectralDensity):
        return _density_outliers(density_or_eigenvalues, float(min_separation), int(window), int(max_outliers),
                                 float(floor), zero_tol)
    full = isinstance(density_or_eigenvalues, EigenResult) and density_or_eigenvalues.which == "all"
    raw = density_or_eigenvalues
    if isinstance(raw, EigenResult):
        raw = raw.eigenvalues
    lam = as_float64_vector(raw)
    pos = np.sort(lam[lam > 0])[::-1]
    if pos.size < window + 2:
        raise HesslabError(
            f"density_or_eigenvalues: the rule needs at least window + 2 = {window + 2} positive eigenvalues, got "
            f"{pos.size} (of {lam.size}); compute more top eigenvalues (hl.lanczos(H, k=3 * num_classes)) or "
            "lower window"
        )
    scores = separation_scores(pos, window, max_outliers, floor * pos[0])
    c = _boundary(scores, min_separation)
    if full and lam.size:
        tol = float(lam.size * np.finfo(np.float64).eps * np.abs(lam).max()) if zero_tol is None else float(zero_tol)
        neg, neg_strict = float(np.mean(lam < -tol)), float(np.mean(lam < 0))
    else:
        tol = math.nan if zero_tol is None else float(zero_tol)
        neg = neg_strict = math.nan
    return OutlierResult(
        count=c, positions=pos[:c], bulk_edge=float(pos[c]), separation=float(scores[c - 1]) if c else 0.0,
        scores=scores, values=pos, source="eigenvalues", min_separation=float(min_separation), window=int(window),
        num_dropped=int(lam.size - pos.size), counts_per_probe=[c], masses=np.zeros(0), outlier_mass=math.nan,
        negative_mass=neg, negative_mass_strict=neg_strict, negative_mass_bounds=[math.nan, math.nan], zero_tol=tol,
    )


def _negative_mass_bounds(nodes: np.ndarray, weights: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """Chebyshev–Markov–Stieltjes bounds on μ((−∞, 0)) averaged over probes.

    For Gauss quadrature with ascending nodes ℓ_1 < … < ℓ_m of a measure μ:
    Σ_{j<i} ω_j ≤ μ((−∞, ℓ_i)) and μ((−∞, ℓ_i]) ≤ Σ_{j≤i} ω_j. With ℓ_a the last node
    < 0 and ℓ_b = ℓ_{a+1} the first ≥ 0: Σ_{j<a} ω_j ≤ μ((−∞, 0)) ≤ Σ_{j≤b} ω_j.
    """
    lo = hi = 0.0
    for x, w, keep in zip(nodes, weights, valid):
        x, w = x[keep], w[keep]
        order = np.argsort(x)
        x, w = x[order], w[order]
        neg = np.flatnonzero(x < 0)
        a = int(neg[-1]) if neg.size else -1  # index of the last negative node
        lo += float(w[:a].sum()) if a > 0 else 0.0
        hi += float(w[: a + 2].sum())
    p = len(nodes)
    return lo / p, min(1.0, hi / p)


def _density_outliers(
    density: SpectralDensity, min_separation: float, window: int, max_outliers: int, floor: float,
    zero_tol: float | None,
) -> OutlierResult:
    nodes = np.asarray(density.nodes, dtype=np.float64)
    weights = np.asarray(density.weights, dtype=np.float64)
    valid = density.valid()
    per_probe = []  # (count, positive nodes descending, their weights, scores) per probe
    dropped = 0
    for x, w, keep in zip(nodes, weights, valid):
        x, w = x[keep], w[keep]
        order = np.argsort(-x, kind="stable")
        x, w = x[order], w[order]
        pos = x > 0
        dropped += int(nodes.shape[1] - pos.sum())
        xp, wp = x[pos], w[pos]
        if xp.size < window + 2:
            per_probe.append((-1, xp, wp, np.zeros(0)))  # too few values: no vote
            continue
        s = separation_scores(xp, window, max_outliers, floor * xp[0])
        per_probe.append((_boundary(s, min_separation), xp, wp, s))
    counts = np.array([p[0] for p in per_probe], dtype=np.int64)
    if not np.any(counts >= 0):
        raise HesslabError(
            f"density_or_eigenvalues: every probe of the density has fewer than window + 2 = {window + 2} positive "
            "Ritz values; run hl.spectral_density with more num_steps or lower window"
        )
    c = int(np.argmax(np.bincount(counts[counts >= 0])))  # the most frequent count; ties go to the smaller
    agree = [p for p in per_probe if p[0] == c]
    rep = agree[0]
    positions = np.median(np.stack([p[1][:c] for p in agree]), axis=0) if c else np.zeros(0)
    masses = np.mean(np.stack([p[2][:c] for p in agree]), axis=0) if c else np.zeros(0)
    edge = float(np.median([p[1][c] for p in agree]))
    tol = math.sqrt(float(density.sigma2)) if zero_tol is None else float(zero_tol)
    neg = float((weights * ((nodes < -tol) & valid)).sum(axis=1).mean())
    lo, hi = _negative_mass_bounds(nodes, weights, valid)
    return OutlierResult(
        count=c, positions=positions, bulk_edge=edge, separation=float(rep[3][c - 1]) if c else 0.0,
        scores=rep[3], values=rep[1], source="density", min_separation=min_separation, window=window,
        num_dropped=int(dropped), counts_per_probe=counts, masses=masses, outlier_mass=float(masses.sum()),
        negative_mass=neg, negative_mass_strict=float(density.negative_mass(tol=0)), negative_mass_bounds=[lo, hi],
        zero_tol=tol,
    )
