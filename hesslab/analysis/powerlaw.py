"""Power-law fit of the top of a Hessian spectrum (Xie, Tang, Cai, Sun, Li 2022).

The model: the top eigenvalues follow ``λ_k = λ₁ k^(−s)``; equivalently the K largest
eigenvalues are samples of a density ``p(λ) ∝ λ^(−β)`` on ``λ ≥ λ_K`` with
``s = 1/(β − 1)``. The exponent is estimated by the continuous power-law maximum
likelihood estimator of Clauset, Shalizi and Newman (2009) with the cutoff at the K-th
eigenvalue, as the paper does (with the ``powerlaw`` package); the goodness of fit is
the Kolmogorov–Smirnov distance, evaluated exactly as that package evaluates it, against
the critical value ``1.36/√K`` (α = 0.05). A log-log least-squares line through
``(k, λ_k)`` is reported beside it as a second estimate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from hesslab._plotting import axes
from hesslab._results import Result
from hesslab.errors import HesslabError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

__all__ = ["PowerLawFit", "power_law_fit", "as_float64_vector", "MIN_K_TO_DECIDE", "LAMBDA1_FACTOR", "VERDICTS"]

#: Coefficient of the asymptotic two-sided KS critical value at α = 0.05: d_c = 1.36/√K.
KS_COEFFICIENT_05 = 1.36

#: Below this many eigenvalues the verdict is "undecided". A spectrum that decays
#: linearly, λ_k = λ₁(1 − c k), which is no power law, sits at a KS distance of about 0.29
#: from its fitted power law at every K; the critical value 1.36/√K is below that only
#: from K = 22 on (0.43 at K = 10), so with fewer values the test accepts it. 30 leaves a
#: margin (d_c = 0.25).
MIN_K_TO_DECIDE = 30

#: KS distance of a linearly decaying spectrum from its fitted power law (any K ≥ 10):
#: the alternative :data:`MIN_K_TO_DECIDE` is chosen against.
LINEAR_SPECTRUM_KS = 0.29

#: The fitted λ₁ (``λ_K K^ŝ``) may miss the largest eigenvalue by at most this factor
#: (either way) for a "power law" verdict; exact rank laws λ_k = λ₁ k^(−s) miss it by
#: 1.2–1.4 (the MLE's bias at K = 30–60), so a factor of 2 means the line does not
#: describe the top of the spectrum even if the KS test accepts its tail.
LAMBDA1_FACTOR = 2.0

#: The values of :attr:`PowerLawFit.verdict`.
VERDICTS = ("power law", "not a power law", "undecided")


@dataclasses.dataclass
class PowerLawFit(Result):
    """A power-law fit ``λ_k ≈ λ₁ k^(−s)`` to the top K eigenvalues.

    Attributes:
        s: MLE of the spectral decay exponent, ``ŝ = 1/(β̂ − 1)``.
        beta: MLE of the density exponent, ``β̂ = 1 + K / Σ_{i≤K} ln(λ_i/λ_K)``.
        s_std_error: Standard error of ``ŝ`` by the delta method,
            ``σ_β/(β̂ − 1)² = ŝ/√K``.
        beta_std_error: Standard error of ``β̂``, ``(β̂ − 1)/√K``.
        lambda1: The fitted model's λ₁, ``λ_K · K^ŝ``: the value at k = 1 of the MLE line
            ``λ_K (k/K)^(−ŝ)`` (see :meth:`plot`); compare with the observed
            ``eigenvalues[0]``.
        k: K, the number of eigenvalues used (the top K positive ones).
        ks_distance: Kolmogorov–Smirnov distance ``d_ks`` between the empirical CDF of the
            K values and the fitted ``F*(λ) = 1 − (λ/λ_K)^(−(β̂−1))``, computed as the
            ``powerlaw`` package does (see :func:`power_law_fit`).
        ks_critical: Critical value ``d_c = 1.36/√K`` (α = 0.05).
        is_power_law: The KS test alone: ``d_ks < d_c`` (kept for existing callers;
            reports use :attr:`verdict`).
        s_lstsq: Least-squares decay exponent: minus the slope of ``log λ_k`` on
            ``log k``, k = 1..K.
        lambda1_lstsq: Least-squares λ₁: ``exp`` of the intercept of that line.
        r2: Coefficient of determination of the least-squares line (in log-log space).
        num_dropped: How many input eigenvalues were ≤ 0 (or were given as non-positive)
            and so could not enter the fit.
        eigenvalues: The K values used, descending, shape ``(K,)``, float64.
        lambda1_ratio: The largest eigenvalue over the fitted λ₁ (1 = the line meets it).
        verdict: One of :data:`VERDICTS`: "undecided" with fewer than
            :data:`MIN_K_TO_DECIDE` values, or when the KS test accepts but the fitted λ₁
            misses the largest eigenvalue by more than :data:`LAMBDA1_FACTOR`; otherwise
            "power law" when ``d_ks < d_c``, else "not a power law".
        verdict_reason: The test and its numbers behind the verdict, one sentence.
    """

    s: float
    beta: float
    s_std_error: float
    beta_std_error: float
    lambda1: float
    k: int
    ks_distance: float
    ks_critical: float
    is_power_law: bool
    s_lstsq: float
    lambda1_lstsq: float
    r2: float
    num_dropped: int
    eigenvalues: np.ndarray
    lambda1_ratio: float = math.nan
    verdict: str = ""
    verdict_reason: str = ""

    def __post_init__(self) -> None:
        self.eigenvalues = np.asarray(self.eigenvalues, dtype=np.float64)
        if not self.verdict:  # a fit saved before verdicts existed
            self.verdict, self.verdict_reason, self.lambda1_ratio = _verdict(
                self.k, self.ks_distance, self.ks_critical, self.lambda1, self.eigenvalues)

    def model_line(self, k: np.ndarray | None = None) -> np.ndarray:
        """The MLE model's eigenvalue at index k: ``λ_K (k/K)^(−ŝ)``.

        This is the fitted distribution's quantile at upper-tail probability ``k/K``:
        among K samples from ``p(λ) ∝ λ^(−β̂)`` (λ ≥ λ_K) the expected number at or above
        λ is ``K (λ/λ_K)^(−(β̂−1))``; setting it to k and solving for λ gives the line.

        Args:
            k: Indices, shape ``(m,)``; default ``1..K``.

        Returns:
            Model eigenvalues, shape ``(m,)``.
        """
        kk = np.arange(1, self.k + 1, dtype=np.float64) if k is None else np.asarray(k, dtype=np.float64)
        lam_k = float(self.eigenvalues[-1])
        return lam_k * (kk / self.k) ** (-self.s)

    def plot(self, ax: Axes | None = None) -> Axes:
        """Log-log plot of the spectrum with both fitted lines.

        Draws the points ``(k, λ_k)`` for k = 1..K, the MLE line
        ``λ_K (k/K)^(−ŝ)`` (the fitted power-law model written as a rank plot: the
        eigenvalue whose model upper-tail count among K samples is k; it passes through
        the cutoff ``(K, λ_K)``, where the model's support starts, and reaches
        :attr:`lambda1` at k = 1) and the least-squares line
        ``λ₁^lstsq k^(−s_lstsq)``. The legend gives ŝ ± its standard error, d_ks against
        d_c and the verdict.

        Args:
            ax: Axes to draw on; a new figure's Axes when None. ``plt.show`` is never
                called.

        Returns:
            The matplotlib Axes drawn on.
        """
        ax = axes(ax, (6.0, 4.5))
        kk = np.arange(1, self.k + 1, dtype=np.float64)
        ax.loglog(kk, self.eigenvalues, "o", ms=3, alpha=0.7, color="C0", label=f"top K = {self.k} eigenvalues")
        relation = "<" if self.is_power_law else "≥"
        ks_says = "KS: power law" if self.is_power_law else "KS: not a power law"
        ax.loglog(
            kk,
            self.model_line(kk),
            "-",
            color="C3",
            lw=1.8,
            label=(
                f"MLE: ŝ = {self.s:.3g} ± {self.s_std_error:.2g}, β̂ = {self.beta:.3g}\n"
                f"d_ks = {self.ks_distance:.3g} {relation} d_c = {self.ks_critical:.3g} ({ks_says})\n"
                f"verdict: {self.verdict} (K = {self.k}, λ₁ measured/fitted = {self.lambda1_ratio:.2g})"
            ),
        )
        ax.loglog(
            kk,
            self.lambda1_lstsq * kk ** (-self.s_lstsq),
            "--",
            color="C2",
            lw=1.4,
            label=f"least squares: s = {self.s_lstsq:.3g}, R² = {self.r2:.3f}",
        )
        # Keep the data readable when a line runs far off it (a bad fit).
        lo, hi = float(self.eigenvalues[-1]), float(self.eigenvalues[0])
        ax.set_ylim(lo / 3.0, hi * 3.0)
        ax.set_xlabel("index k")
        ax.set_ylabel("eigenvalue λ_k")
        title = "Power-law fit of the top eigenvalues"
        if self.num_dropped:
            title += f" ({self.num_dropped} non-positive dropped)"
        ax.set_title(title)
        ax.legend(fontsize="small")
        return ax


def as_float64_vector(eigenvalues: Any) -> np.ndarray:
    """A 1-D float64 numpy copy of an array, tensor or sequence of real eigenvalues.

    Shared by the analyses that take eigenvalues (power law, outliers).

    Raises:
        HesslabError: complex values, non-numbers, or not 1-D.
    """
    try:
        import torch

        if isinstance(eigenvalues, torch.Tensor):
            if eigenvalues.is_complex():
                raise HesslabError("eigenvalues: got a complex tensor; pass the real eigenvalues")
            eigenvalues = eigenvalues.detach().to(device="cpu", dtype=torch.float64).numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    try:
        arr = np.asarray(eigenvalues)
    except Exception as exc:  # pragma: no cover - exotic input
        raise HesslabError(f"eigenvalues: cannot convert {type(eigenvalues).__name__} to an array ({exc})") from exc
    if np.iscomplexobj(arr):
        raise HesslabError("eigenvalues: got complex values; pass the real eigenvalues (e.g. from eigvalsh)")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise HesslabError(f"eigenvalues: expected numbers, got an array of dtype {arr.dtype}")
    if arr.ndim != 1:
        raise HesslabError(
            f"eigenvalues: expected a 1-D array of eigenvalues, got shape {tuple(arr.shape)}; flatten it first"
        )
    arr = arr.astype(np.float64, copy=True)
    if not np.all(np.isfinite(arr)):
        raise HesslabError("eigenvalues: contains NaN or infinite values; remove them before fitting")
    return arr


def _ks_distance(lam_ascending: np.ndarray, alpha_minus_one: float) -> float:
    """KS distance of the ``powerlaw`` package between the data and the fitted power law.

    With the values sorted ascending, ``x_(1) = λ_K ≤ … ≤ x_(K)``, the package compares the
    model CDF ``F*(x) = 1 − (x/λ_K)^(−(β̂−1))`` with the empirical CDF evaluated just
    below each distinct value, ``F̂(x−) = #{i: x_i < x}/K`` (0, 1/K, …, (K−1)/K without
    ties; xmin = λ_K is included and contributes 0), and takes
    ``max(max(F* − F̂), −min(F* − F̂))`` over those points.
    """
    k = lam_ascending.size
    bins = np.unique(lam_ascending)
    empirical = np.searchsorted(lam_ascending, bins, side="left") / k
    model = 1.0 - (bins / lam_ascending[0]) ** (-alpha_minus_one)
    diff = model - empirical
    return float(max(np.max(diff), -np.min(diff)))


def _verdict(k: int, ks: float, ks_crit: float, lambda1_fit: float, top: np.ndarray) -> tuple[str, str, float]:
    """``(verdict, reason, λ₁ measured / fitted)`` of a fit (see :attr:`PowerLawFit.verdict`)."""
    measured = float(top[0]) if top.size else math.nan
    ratio = measured / lambda1_fit if lambda1_fit and math.isfinite(lambda1_fit) else math.nan
    ks_text = f"KS test: d_ks = {ks:.3g} {'<' if ks < ks_crit else '≥'} d_c = 1.36/√K = {ks_crit:.3g}"
    if k < MIN_K_TO_DECIDE:
        return "undecided", (
            f"{ks_text}, but K = {k} is too few to decide: below K = {MIN_K_TO_DECIDE} the critical value "
            f"({ks_crit:.2f} here) is above the distance {LINEAR_SPECTRUM_KS} of a linearly decaying spectrum, "
            f"which is no power law; compute at least {MIN_K_TO_DECIDE} top eigenvalues"), ratio
    if ks >= ks_crit:
        return "not a power law", f"{ks_text}: rejected at α = 0.05", ratio
    if not (1 / LAMBDA1_FACTOR <= ratio <= LAMBDA1_FACTOR):
        return "undecided", (
            f"{ks_text} accepts the tail, but the fitted λ₁ = {lambda1_fit:.3g} misses the largest eigenvalue "
            f"{measured:.3g} by a factor {max(ratio, 1 / ratio):.2f} (> {LAMBDA1_FACTOR:g}): the line does not "
            "describe the top of the spectrum"), ratio
    return "power law", (f"{ks_text} and the fitted λ₁ is within a factor {LAMBDA1_FACTOR:g} of the largest "
                         f"eigenvalue (ratio {ratio:.2f})"), ratio


def power_law_fit(eigenvalues: Any, k_max: int | None = None) -> PowerLawFit:
    r"""Fit ``λ_k = λ₁ k^(−s)`` to the top eigenvalues by maximum likelihood.

    Non-positive values cannot enter a power law: they are dropped (counted in
    ``num_dropped``). The rest are sorted descending, ``λ_1 ≥ … ≥ λ_n``, and the top
    ``K = min(k_max, n)`` are fitted with the cutoff at ``λ_K`` (Clauset et al. 2009,
    continuous case):

    .. math::
        β̂ = 1 + K \Big/ \sum_{i=1}^{K} \ln(λ_i/λ_K), \qquad ŝ = 1/(β̂ − 1),

        σ_β = (β̂ − 1)/\sqrt{K}, \qquad σ_s = σ_β/(β̂ − 1)^2 = ŝ/\sqrt{K}.

    Goodness of fit: ``d_ks = max_x |F*(x) − F̂(x−)|`` over the K values, with
    ``F*(λ) = 1 − (λ/λ_K)^(−(β̂−1))`` and ``F̂(x−)`` the fraction of the K values strictly
    below x — exactly the ``powerlaw`` package's statistic (its ``D``). It looks at the
    empirical CDF on one side of each jump only, so it can be up to 1/K below the
    textbook two-sided KS statistic; we keep it for agreement with the paper's tool. The
    power law is accepted by the test when ``d_ks < d_c = 1.36/√K`` (``is_power_law``);
    the :attr:`~PowerLawFit.verdict` is "undecided" below :data:`MIN_K_TO_DECIDE` values
    or when the fitted λ₁ misses the largest by more than :data:`LAMBDA1_FACTOR`.

    The least-squares estimate regresses ``log λ_k`` on ``log k`` (k = 1..K):
    ``log λ_k ≈ log λ₁^lstsq − s_lstsq log k``, with its R².

    Args:
        eigenvalues: Eigenvalues in any order, shape ``(n,)``: a numpy array, a torch
            tensor (any device and dtype; read as float64) or a sequence.
        k_max: Use at most this many of the largest positive eigenvalues (the paper
            uses 1000 for small nets, 50 for a ResNet18). None: all positive ones.

    Returns:
        A :class:`PowerLawFit`.

    Raises:
        HesslabError: If the input is not a finite real 1-D array, if ``k_max`` is not an
            integer ≥ 2, if fewer than 2 positive eigenvalues remain, or if the top K are
            all equal (the MLE is then infinite).
    """
    lam = as_float64_vector(eigenvalues)
    if k_max is not None:
        if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)):
            raise HesslabError(f"k_max: expected an int >= 2 or None, got {k_max!r} ({type(k_max).__name__})")
        if k_max < 2:
            raise HesslabError(f"k_max: must be >= 2 (a power law needs at least two eigenvalues), got {k_max}")
    positive = lam[lam > 0]
    num_dropped = int(lam.size - positive.size)
    n_pos = int(positive.size)
    k = n_pos if k_max is None else min(int(k_max), n_pos)
    if k < 2:
        raise HesslabError(
            f"eigenvalues: need at least 2 positive eigenvalues to fit a power law, got {n_pos} "
            f"({num_dropped} non-positive of {lam.size} dropped); compute more of the top eigenvalues"
        )
    top = np.sort(positive)[::-1][:k].copy()  # descending, shape (K,)
    lam_k = float(top[-1])

    log_ratio_sum = float(np.sum(np.log(top / lam_k)))
    if log_ratio_sum <= 0.0:
        raise HesslabError(
            f"eigenvalues: the top K = {k} positive eigenvalues are all equal ({lam_k:.6g}); a power law "
            "cannot be fitted (β̂ would be infinite): pass a larger k_max or a spectrum that decays"
        )
    beta = 1.0 + k / log_ratio_sum
    alpha_minus_one = beta - 1.0
    s = 1.0 / alpha_minus_one
    beta_se = alpha_minus_one / math.sqrt(k)
    s_se = beta_se / alpha_minus_one**2

    ks = _ks_distance(top[::-1], alpha_minus_one)
    ks_crit = KS_COEFFICIENT_05 / math.sqrt(k)

    # Log-log least squares: log λ_k = a + b log k.
    log_k = np.log(np.arange(1, k + 1, dtype=np.float64))
    log_lam = np.log(top)
    x_c = log_k - log_k.mean()
    y_c = log_lam - log_lam.mean()
    slope = float(np.dot(x_c, y_c) / np.dot(x_c, x_c))
    intercept = float(log_lam.mean() - slope * log_k.mean())
    ss_tot = float(np.dot(y_c, y_c))
    resid = y_c - slope * x_c
    r2 = 1.0 - float(np.dot(resid, resid)) / ss_tot if ss_tot > 0 else 1.0

    lambda1_fit = float(lam_k * np.float64(k) ** s) if s * math.log(k) < 700 else math.inf
    verdict, reason, ratio = _verdict(int(k), ks, float(ks_crit), lambda1_fit, top)
    return PowerLawFit(
        s=float(s),
        beta=float(beta),
        s_std_error=float(s_se),
        beta_std_error=float(beta_se),
        lambda1=lambda1_fit,
        k=int(k),
        ks_distance=ks,
        ks_critical=float(ks_crit),
        is_power_law=bool(ks < ks_crit),
        s_lstsq=float(-slope),
        lambda1_lstsq=float(math.exp(intercept)),
        r2=float(r2),
        num_dropped=num_dropped,
        eigenvalues=top,
        lambda1_ratio=float(ratio),
        verdict=verdict,
        verdict_reason=reason,
    )
