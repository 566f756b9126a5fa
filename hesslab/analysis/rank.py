"""Numerical rank of a matrix or operator, and the rank formulas for deep linear networks.

Singh, Bachmann and Hofmann (NeurIPS 2021) split the Hessian of the loss into an
outer-product (Gauss–Newton) part and a functional part, ``H_L = H_O + H_F``, and give the
ranks of all three for a deep linear network ``f(x) = W_L ⋯ W_1 x``.
:func:`linear_network_rank` evaluates those formulas; :func:`numerical_rank` measures the
rank of a computed Hessian with numpy's ``matrix_rank`` rule, in float64, and shows the
singular values around the threshold so the gap (or the lack of one) can be seen.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hesslab._plotting import axes
from hesslab._results import Result
from hesslab.errors import HesslabError, require_subset

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

__all__ = ["LinearRankPrediction", "RankResult", "linear_network_rank", "numerical_rank"]

#: How many singular values on each side of the threshold :class:`RankResult` keeps.
NEAR_THRESHOLD_SIDE = 10

_LOSSES = ("mse", "cross_entropy")
_PARTS = ("H_O", "H_F", "H_L")


@dataclasses.dataclass
class RankResult(Result):
    """Numerical rank of a matrix.

    Attributes:
        rank: Number of singular values strictly above :attr:`threshold`.
        threshold: The absolute cutoff used: ``σ_max · max(m, n) · eps(float64)`` by
            default, or the ``tol`` given.
        singular_values: All singular values, descending, shape ``(min(m, n),)``, float64.
        near_threshold: The singular values around the cutoff, descending:
            ``singular_values[near_threshold_start : rank + 10]`` with
            ``near_threshold_start = max(0, rank − 10)``, i.e. up to 10 kept and up to 10
            discarded ones, so the gap at the cutoff is visible.
        near_threshold_start: Index in :attr:`singular_values` of ``near_threshold[0]``.
        shape: ``(m, n)`` of the matrix.
    """

    rank: int
    threshold: float
    singular_values: np.ndarray
    near_threshold: np.ndarray
    near_threshold_start: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        self.singular_values = np.asarray(self.singular_values, dtype=np.float64)
        self.near_threshold = np.asarray(self.near_threshold, dtype=np.float64)
        self.shape = (int(self.shape[0]), int(self.shape[1]))

    @property
    def gap(self) -> float:
        """Ratio ``σ_rank / σ_{rank+1}`` of the last kept to the first discarded value.

        ``inf`` when nothing is discarded or the first discarded value is 0, ``nan`` when
        nothing is kept. A large ratio (many orders of magnitude) means a clear rank.
        """
        sv = self.singular_values
        if self.rank == 0:
            return float("nan")
        if self.rank >= sv.size or sv[self.rank] == 0:
            return float("inf")
        return float(sv[self.rank - 1] / sv[self.rank])

    def plot(self, ax: Axes | None = None) -> Axes:
        """Semi-log plot of the singular values with the threshold.

        Args:
            ax: Axes to draw on; a new figure's Axes when None (``plt.show`` is never
                called).

        Returns:
            The matplotlib Axes drawn on.
        """
        ax = axes(ax, (6.0, 4.5))
        sv = self.singular_values
        idx = np.arange(1, sv.size + 1)
        floor = np.finfo(np.float64).tiny
        kept = sv > self.threshold
        ax.semilogy(idx[kept], np.maximum(sv[kept], floor), "o", ms=3, color="C0", label=f"kept (rank {self.rank})")
        ax.semilogy(idx[~kept], np.maximum(sv[~kept], floor), "o", ms=3, color="C7", label="below threshold")
        if self.threshold > 0:
            ax.axhline(self.threshold, color="C3", lw=1.2, ls="--", label=f"threshold {self.threshold:.3g}")
        ax.set_xlabel("index i")
        ax.set_ylabel("singular value σ_i")
        ax.set_title(f"Numerical rank {self.rank} of a {self.shape[0]}×{self.shape[1]} matrix")
        ax.legend(fontsize="small")
        return ax


def _as_float64_matrix(matrix_or_operator: Any) -> np.ndarray:
    """A 2-D float64 numpy array from an array, a tensor or an object with ``to_dense()``."""
    import torch

    obj = matrix_or_operator
    if not isinstance(obj, (np.ndarray, torch.Tensor)) and hasattr(obj, "to_dense"):
        obj = obj.to_dense()
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            obj = obj.to_dense()
        if obj.is_complex():
            raise HesslabError("matrix_or_operator: complex matrices are not supported; pass a real matrix")
        obj = obj.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        arr = np.asarray(obj)
    except Exception as exc:  # pragma: no cover - exotic input
        raise HesslabError(
            f"matrix_or_operator: cannot convert {type(matrix_or_operator).__name__} to a matrix; pass a numpy "
            "array, a torch tensor or an operator with to_dense()"
        ) from exc
    if np.iscomplexobj(arr):
        raise HesslabError("matrix_or_operator: complex matrices are not supported; pass a real matrix")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise HesslabError(
            f"matrix_or_operator: expected a numeric matrix, a torch tensor or an operator with to_dense(), "
            f"got {type(matrix_or_operator).__name__}"
        )
    if arr.ndim != 2:
        raise HesslabError(f"matrix_or_operator: expected a 2-D matrix, got shape {tuple(arr.shape)}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise HesslabError("matrix_or_operator: contains NaN or infinite entries; the rank is undefined")
    return arr


def numerical_rank(matrix_or_operator: Any, tol: float | None = None) -> RankResult:
    """Numerical rank by the singular values, in float64.

    With singular values ``σ_1 ≥ … ≥ σ_p`` of the ``(m, n)`` matrix A (``p = min(m, n)``)
    the rank is ``#{i : σ_i > τ}`` with

    .. math::
        τ = σ_1 · \\max(m, n) · ε_{64} \\quad (ε_{64} = 2^{-52})

    (numpy's ``matrix_rank`` rule) or ``τ = tol`` when given. The matrix is converted to
    float64 first: Hessian ranks measured in float32 are wrong (its noise floor is
    ~1e-7 σ_1, above the small genuine singular values).

    Args:
        matrix_or_operator: A matrix of shape ``(m, n)``: a numpy array, a torch tensor
            (any device or dtype; sparse ones are densified) or an object with a
            ``to_dense()`` method returning one (hesslab linear operators; this builds the
            full n×n matrix, so keep n small).
        tol: Absolute threshold τ (finite, ≥ 0). None: the default rule above.

    Returns:
        A :class:`RankResult`.

    Raises:
        HesslabError: If the input is not a finite real 2-D matrix or ``tol`` is not a
            finite non-negative number.
    """
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)):
            raise HesslabError(f"tol: expected a non-negative float (an absolute threshold) or None, got {tol!r}")
        if not np.isfinite(tol) or tol < 0:
            raise HesslabError(f"tol: must be finite and >= 0 (an absolute threshold on singular values), got {tol!r}")
    a = _as_float64_matrix(matrix_or_operator)
    m, n = a.shape
    if a.size == 0:
        sv = np.zeros(0, dtype=np.float64)
        threshold = 0.0 if tol is None else float(tol)
    else:
        sv = np.linalg.svd(a, compute_uv=False)  # descending
        if tol is None:
            threshold = float(sv[0] * max(m, n) * np.finfo(np.float64).eps)
        else:
            threshold = float(tol)
    rank = int(np.count_nonzero(sv > threshold))
    start = max(0, rank - NEAR_THRESHOLD_SIDE)
    near = sv[start : rank + NEAR_THRESHOLD_SIDE].copy()
    return RankResult(
        rank=rank,
        threshold=threshold,
        singular_values=sv,
        near_threshold=near,
        near_threshold_start=start,
        shape=(m, n),
    )


@dataclasses.dataclass
class LinearRankPrediction(Result):
    """Ranks of the Hessian and its parts for a deep linear network (Singh et al. 2021).

    Attributes:
        rank_H_O: Rank of the outer-product (Gauss–Newton) part ``H_O``
            (None when not requested in ``parts``).
        rank_H_F: Rank of the functional part ``H_F`` (None when not requested).
        rank_H_L: Rank of the Hessian of the loss ``H_L = H_O + H_F`` (None when not
            requested).
        num_params: Number of parameters n (the Hessian is n×n).
        r: Rank of the input data ``Σ_j x_j x_jᵀ`` used.
        k_eff: ``K'``: K for MSE, K − 1 for cross-entropy.
        s: ``min(r, K')``.
        q: ``min(r, K', M_1, …, M_{L−1})``.
        widths: ``[d, M_1, …, M_{L−1}, K]``.
        num_samples: N.
        loss: ``"mse"`` or ``"cross_entropy"``.
        bias: Whether every layer has a bias.
    """

    rank_H_O: int | None
    rank_H_F: int | None
    rank_H_L: int | None
    num_params: int
    r: int
    k_eff: int
    s: int
    q: int
    widths: list[int]
    num_samples: int
    loss: str
    bias: bool

    def __post_init__(self) -> None:
        self.widths = [int(w) for w in self.widths]


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise HesslabError(f"{name}: expected a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise HesslabError(f"{name}: must be a positive int, got {value}")
    return int(value)


def linear_network_rank(
    widths: Sequence[int],
    num_samples: int,
    input_rank: int | None = None,
    loss: str = "mse",
    bias: bool = False,
    *,
    parts: Sequence[str] = ("H_O", "H_F", "H_L"),
) -> LinearRankPrediction:
    """Ranks of ``H_O``, ``H_F`` and ``H_L`` for a deep linear network (Singh et al. 2021).

    **Without bias** (the paper's setting). The network is ``f(x) = W_L ⋯ W_1 x`` with
    ``W_l`` of shape ``(M_l, M_{l−1})``, ``M_0 = d`` and ``M_L = K``; the loss is the
    sample mean of MSE or softmax cross-entropy over N inputs ``X = [x_1 … x_N]``
    (d×N). With ``r = rank(X)`` (``min(d, N)`` for generic data), ``K' = K`` (MSE) or
    ``K − 1`` (cross-entropy, whose Hessian in the logits has the null vector 1),
    ``s = min(r, K')``, ``q = min(r, K', M_1, …, M_{L−1})`` and
    ``ΣM = M_1 + … + M_{L−1}`` (hidden widths only):

    .. math::
        \\operatorname{rank} H_O = q (r + K' − q)

        \\operatorname{rank} H_F = 2 q ΣM + 2 q s − L q^2

        \\operatorname{rank} H_L = 2 q ΣM + q (r + K') − L q^2

    The paper states the last two as upper bounds attained for generic weights (for
    L = 2, ``rank H_F = 2 s M_1``); hesslab's tests check that all three equal the
    numerical rank of float64 Hessians of random networks (L = 2–4, bottleneck and wide
    hidden layers, N below and above d, low-rank inputs, both losses). For ``L = 1`` (no
    hidden layer) the model is linear in its parameters: ``H_F = 0`` and ``H_L = H_O``.

    **With bias** (``bias=True``: every layer computes ``W_l h + b_l``). This part is
    hesslab's own result, not the paper's; each formula was checked against numerical
    ranks of float64 Hessians of about 520 random networks (L = 1–4, d ≤ 7, widths
    ≤ 6, K ≤ 5, N from 1 to 2d + 3, low-rank inputs, both losses; about 1,050 rank
    comparisons, all equal except one numerically ambiguous d = N = 1 network). Write
    ``r₊ = rank([X; 1ᵀ])``, taken as ``min(r + 1, N)``: the ones vector lies in the row
    space of X only when ``r = N`` (generic data; inputs with a constant feature break
    this).

    - ``H_O``, any L: the function is affine, ``f(x) = A x + c`` with
      ``rank A ≤ min M_i`` and c free (through ``b_L``), which gives

      .. math::
          \\operatorname{rank} H_O = q (r + K' − q) + K' \\quad (r₊ = r + 1),
          \\qquad q r + (K' − q) \\min(q + 1, r) \\quad (r₊ = r = N).

      For ``N > d`` this is SCIENCE.md's conjecture ``q (r + K' − q) + K'``.
    - ``H_F`` and ``H_L``, L = 1: ``0`` and ``rank H_O``.
    - ``H_F``, L = 2: ``b_1`` acts as a first-layer weight on the input ``[x; 1]`` and
      ``b_2`` enters linearly, so ``rank H_F = 2 s₊ M_1`` with ``s₊ = min(r₊, K')``.
    - ``H_L``, L = 2 (empirical): with ``q₊ = min(r₊, K', M_1)``,
      ``rank H_L = 2 q₊ M_1 + q₊ (r₊ + K') − 2 q₊² + (K' if q₊ < r₊ else r₊)``.
    - ``H_F`` and ``H_L`` for L ≥ 3 with biases have no verified formula: asking for them
      raises :class:`HesslabError` (pass ``parts=("H_O",)``, or measure them with
      :func:`numerical_rank`).

    Args:
        widths: ``[d, M_1, …, M_{L−1}, K]``: input dimension, hidden widths, output
            dimension; at least 2 positive ints (L = len(widths) − 1 weight matrices).
        num_samples: N, the number of inputs (≥ 1).
        input_rank: ``r``; default ``min(d, N)`` (generic inputs). At most ``min(d, N)``.
        loss: ``"mse"`` or ``"cross_entropy"`` (softmax; needs K ≥ 2).
        bias: Whether every layer has a bias (see above).
        parts: Which ranks to compute, any of ``"H_O"``, ``"H_F"``, ``"H_L"``; the
            others are None in the result.

    Returns:
        A :class:`LinearRankPrediction`.

    Raises:
        HesslabError: On invalid arguments, or when a requested part has no verified
            formula (``H_F``/``H_L`` with ``bias=True`` and L ≥ 3).
    """
    widths, n, r, k_eff, parts = _checked_arguments(widths, num_samples, input_rank, loss, bias, parts)
    hidden = widths[1:-1]
    num_layers = len(widths) - 1
    s = min(r, k_eff)
    q = min([r, k_eff, *hidden])
    num_params = sum(widths[i] * widths[i + 1] for i in range(num_layers))
    if bias:
        num_params += sum(widths[1:])
    if bias:
        rank_o, rank_f, rank_l = _ranks_with_bias(widths, n, r, k_eff, q, parts)
    else:
        rank_o = q * (r + k_eff - q)
        if num_layers == 1:
            rank_f, rank_l = 0, rank_o
        else:
            rank_f = 2 * q * sum(hidden) + 2 * q * s - num_layers * q * q
            rank_l = 2 * q * sum(hidden) + q * (r + k_eff) - num_layers * q * q
    return LinearRankPrediction(
        rank_H_O=int(rank_o) if "H_O" in parts else None,
        rank_H_F=int(rank_f) if ("H_F" in parts and rank_f is not None) else None,
        rank_H_L=int(rank_l) if ("H_L" in parts and rank_l is not None) else None,
        num_params=int(num_params),
        r=int(r),
        k_eff=int(k_eff),
        s=int(s),
        q=int(q),
        widths=list(widths),
        num_samples=int(n),
        loss=loss,
        bias=bool(bias),
    )


def _checked_arguments(widths: Any, num_samples: Any, input_rank: Any, loss: Any, bias: Any,
                       parts: Sequence[str]) -> tuple[list[int], int, int, int, tuple[str, ...]]:
    """:func:`linear_network_rank`'s arguments checked: ``(widths, N, r, K', parts)``."""
    if isinstance(widths, (str, bytes)) or not hasattr(widths, "__len__"):
        raise HesslabError(f"widths: expected a list [d, M_1, ..., M_(L-1), K] of positive ints, got {widths!r}")
    widths = [_check_positive_int(f"widths[{i}]", w) for i, w in enumerate(widths)]
    if len(widths) < 2:
        raise HesslabError(
            f"widths: need at least [d, K] (input and output dimensions), got {widths}; "
            "pass [d, M_1, ..., M_(L-1), K]"
        )
    n = _check_positive_int("num_samples", num_samples)
    if not isinstance(loss, str) or loss not in _LOSSES:
        raise HesslabError(f"loss: expected one of {_LOSSES}, got {loss!r}")
    if not isinstance(bias, (bool, np.bool_)):
        raise HesslabError(f"bias: expected True or False, got {bias!r}")
    parts = require_subset("parts", parts, _PARTS)
    d, k_out = widths[0], widths[-1]
    if input_rank is None:
        r = min(d, n)
    else:
        r = _check_positive_int("input_rank", input_rank)
        if r > min(d, n):
            raise HesslabError(
                f"input_rank: the rank of N = {n} inputs of dimension d = {d} is at most {min(d, n)}, got {r}"
            )
    if loss == "cross_entropy":
        if k_out < 2:
            raise HesslabError(f"widths[-1]: cross_entropy needs K >= 2 classes, got K = {k_out}")
        return widths, n, r, k_out - 1, parts
    return widths, n, r, k_out, parts


def _ranks_with_bias(widths: list[int], n: int, r: int, k_eff: int, q: int,
                     parts: tuple[str, ...]) -> tuple[int, int | None, int | None]:
    """``(rank H_O, rank H_F, rank H_L)`` with a bias in every layer (see
    :func:`linear_network_rank`); H_F and H_L are None for L >= 3 when not asked for."""
    num_layers = len(widths) - 1
    r_aug = min(r + 1, n)  # rank of [X; 1ᵀ] for generic data
    if r_aug == r + 1:
        rank_o = q * (r + k_eff - q) + k_eff
    else:
        rank_o = q * r + (k_eff - q) * min(q + 1, r)
    if num_layers == 1:
        return rank_o, 0, rank_o
    if num_layers == 2:
        m1 = widths[1]
        s_aug = min(r_aug, k_eff)
        q_aug = min(r_aug, k_eff, m1)
        rank_l = 2 * q_aug * m1 + q_aug * (r_aug + k_eff) - 2 * q_aug * q_aug
        return rank_o, 2 * s_aug * m1, rank_l + (k_eff if q_aug < r_aug else r_aug)
    missing = [p for p in parts if p in ("H_F", "H_L")]
    if missing:
        raise HesslabError(
            f"bias: with biases and L = {num_layers} weight matrices, hesslab has no verified formula for "
            f"rank {' and rank '.join(missing)} (only for L <= 2; rank H_O is known for every L); pass "
            "parts=('H_O',) to get rank H_O alone, or measure the others with numerical_rank on the "
            "dense Hessian"
        )
    return rank_o, None, None
