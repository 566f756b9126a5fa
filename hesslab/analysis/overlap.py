"""Eigenspace overlaps, low rank of layer eigenvectors, and the dominant eigenvalues of E[M].

The measurements of Wu et al. ("Dissecting Hessian") on layer-wise Hessians:

* Overlap of two k-dimensional subspaces with orthonormal bases U, V (n × k):
  ``overlap(U, V) = ‖UᵀV‖_F² / k`` = the mean squared cosine of the principal angles:
  1 for the same space, 0 for orthogonal ones, and k/n in expectation for a uniformly
  random space (E‖UᵀV‖_F² = k·k/n). Reported as a curve over k = 1..K when the columns
  are ordered by eigenvalue (top eigenspace of dimension k).
* Low rank of an eigenvector of a layer block: reshaped to the layer's (augmented) weight
  matrix (out, in[+1]) its singular values σ_i give the share of the first,
  σ₁²/Σσ_i², and the stable rank Σσ_i²/σ₁² (1 for a rank-one matrix). Under the
  decoupling conjecture the top eigenvectors are ≈ u_i ⊗ E[x]/‖E[x]‖, i.e. rank one.
* The number of dominant eigenvalues of B = E[M], the output Hessian factor, against the
  number of classes c (the paper finds c or c − 1 large ones): counted at the largest
  relative gap of the spectrum, see :func:`dominant_eigenvalues`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hesslab._plotting import axes
from hesslab._results import Result
from hesslab.errors import HesslabError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

__all__ = [
    "eigenspace_overlap",
    "overlap_curve",
    "OverlapCurve",
    "eigenvector_low_rank",
    "LowRank",
    "dominant_eigenvalues",
    "DominantEigenvalues",
    "kfac_overlap",
]


def _as_numpy(x: Any, name: str) -> np.ndarray:
    """A tensor, array or sequence as a float64 numpy array."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            if x.is_complex():
                raise HesslabError(f"{name}: expected a real tensor, got dtype {x.dtype}")
            return x.detach().to("cpu", torch.float64).numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise HesslabError(f"{name}: expected a real tensor or array, got {type(x).__name__}") from None
    return arr


def _basis(U: Any, name: str, atol: float | None) -> np.ndarray:
    """An (n, k) orthonormal basis as float64 numpy; a vector (n,) is one column."""
    A = _as_numpy(U, name)
    if A.ndim == 1:
        A = A[:, None]
    if A.ndim != 2 or A.shape[1] == 0 or A.shape[0] == 0:
        raise HesslabError(f"{name}: expected an (n, k) basis with k >= 1 columns, got shape {A.shape}")
    if A.shape[1] > A.shape[0]:
        raise HesslabError(f"{name}: has k = {A.shape[1]} columns > n = {A.shape[0]} rows; it cannot be orthonormal")
    if not np.all(np.isfinite(A)):
        raise HesslabError(f"{name}: holds NaN or Inf")
    if atol is not None:
        err = np.abs(A.T @ A - np.eye(A.shape[1])).max()
        if err > atol:
            raise HesslabError(
                f"{name}: the columns are not orthonormal (max |UᵀU − I| = {err:.2g} > atol = {atol:g}); "
                "orthonormalize first, e.g. torch.linalg.qr(U).Q, or pass atol=None to skip the check"
            )
    return A


def eigenspace_overlap(U: Any, V: Any, *, atol: float | None = 1e-3) -> float:
    """The overlap ‖UᵀV‖_F² / k of two subspaces with orthonormal bases.

    Args:
        U: (n, k_U) orthonormal columns (a tensor or array; a vector (n,) is one column).
        V: (n, k_V) orthonormal columns.
        atol: Raise when ``max |UᵀU − I|`` (or VᵀV) exceeds this; ``None`` skips the check.

    Returns:
        ``‖UᵀV‖_F² / k`` with ``k = min(k_U, k_V)``, in [0, 1]: the paper's definition
        when k_U = k_V = k, and symmetric in U and V in general (1 when the smaller space
        lies in the larger). For random spaces its expectation is max(k_U, k_V)/n.

    Raises:
        HesslabError: shapes that differ in n, bases that are not orthonormal, NaN/Inf.
    """
    A = _basis(U, "U", atol)
    B = _basis(V, "V", atol)
    if A.shape[0] != B.shape[0]:
        raise HesslabError(f"U, V: the bases live in different dimensions, n = {A.shape[0]} and {B.shape[0]}")
    C = A.T @ B  # (k_U, k_V)
    return float(np.sum(C * C) / min(A.shape[1], B.shape[1]))


@dataclasses.dataclass
class OverlapCurve(Result):
    """Overlap of the top-k eigenspaces for k = ks[0], ks[1], ...

    Attributes:
        ks: (m,) the subspace dimensions k, ascending.
        overlaps: (m,) ``‖U_kᵀV_k‖_F² / k`` with U_k, V_k the first k columns.
        n: The ambient dimension.
        random_baseline: (m,) k/n, the expected overlap of random k-dimensional spaces.
        label: Free text naming what was compared (e.g. ``"fc1: KFAC vs exact"``).
    """

    ks: np.ndarray
    overlaps: np.ndarray
    n: int
    random_baseline: np.ndarray
    label: str = ""

    def __post_init__(self) -> None:
        self.ks = np.asarray(self.ks, dtype=np.int64)
        self.overlaps = np.asarray(self.overlaps, dtype=np.float64)
        self.random_baseline = np.asarray(self.random_baseline, dtype=np.float64)
        self.n = int(self.n)

    def at(self, k: int) -> float:
        """The overlap at dimension k (one of :attr:`ks`)."""
        hit = np.nonzero(self.ks == k)[0]
        if hit.size == 0:
            raise HesslabError(f"k: {k} is not one of the curve's ks {self.ks.tolist()}")
        return float(self.overlaps[hit[0]])

    def plot(self, ax: Axes | None = None, **kwargs: Any) -> Axes:
        """Overlap against k, with the random baseline k/n dashed.

        Args:
            ax: Axes to draw on; a new figure's Axes when None (``plt.show`` is never called).
            **kwargs: Passed to ``ax.plot`` for the overlap line.

        Returns:
            The matplotlib Axes drawn on.
        """
        ax = axes(ax, (5.5, 4.0))
        kwargs.setdefault("marker", "o")
        kwargs.setdefault("ms", 3)
        ax.plot(self.ks, self.overlaps, label=self.label or "overlap", **kwargs)
        ax.plot(self.ks, self.random_baseline, "--", color="gray", lw=1, label="random (k/n)")
        ax.set_xlabel("k (top eigenspace dimension)")
        ax.set_ylabel(r"$\|U_k^\top V_k\|_F^2 / k$")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="best", fontsize="small")
        return ax


def overlap_curve(
    U: Any, V: Any, ks: Sequence[int] | None = None, *, atol: float | None = 1e-3, label: str = ""
) -> OverlapCurve:
    """The overlap of the top-k eigenspaces for k = 1..K.

    The columns of U and V must be ordered by importance (eigenvalues descending, as
    ``hesslab.lanczos(..., which="LA")`` and ``KFAC.topk`` return them); the top-k space is
    spanned by the first k columns.

    Args:
        U: (n, K_U) orthonormal columns.
        V: (n, K_V) orthonormal columns.
        ks: The dimensions to report; default ``1..min(K_U, K_V)``.
        atol: Orthonormality check (see :func:`eigenspace_overlap`); None skips it.
        label: Stored in the result (for legends).

    Returns:
        :class:`OverlapCurve`.

    Raises:
        HesslabError: a k outside ``1..min(K_U, K_V)``, or the checks of
            :func:`eigenspace_overlap`.
    """
    A = _basis(U, "U", atol)
    B = _basis(V, "V", atol)
    if A.shape[0] != B.shape[0]:
        raise HesslabError(f"U, V: the bases live in different dimensions, n = {A.shape[0]} and {B.shape[0]}")
    K = min(A.shape[1], B.shape[1])
    if ks is None:
        kk = np.arange(1, K + 1)
    else:
        kk = np.unique(np.asarray(list(ks), dtype=np.int64))
        if kk.size == 0 or kk[0] < 1 or kk[-1] > K:
            raise HesslabError(f"ks: each k must satisfy 1 <= k <= min(K_U, K_V) = {K}, got {list(ks)}")
    C2 = (A[:, :K].T @ B[:, :K]) ** 2  # (K, K)
    # ‖C[:k, :k]‖² for all k at once: 2-D cumulative sums
    cum = np.cumsum(np.cumsum(C2, axis=0), axis=1)
    overlaps = np.array([cum[k - 1, k - 1] / k for k in kk])
    n = A.shape[0]
    return OverlapCurve(ks=kk, overlaps=overlaps, n=n, random_baseline=kk / n, label=label)


@dataclasses.dataclass
class LowRank(Result):
    """Singular values of eigenvectors reshaped to the layer's weight matrix.

    For one vector the arrays are 1-D / scalars; for k vectors they gain a leading axis.

    Attributes:
        singular_values: (r,) or (k, r) descending, r = min(rows, cols).
        top_share: σ₁²/Σσ_i² (1 for a rank-one matrix); scalar or (k,).
        stable_rank: Σσ_i²/σ₁² (≥ 1); scalar or (k,).
        shape: (rows, cols) of the matrix: (out, in) or (out, in + 1) with the bias column.
    """

    singular_values: np.ndarray
    top_share: Any
    stable_rank: Any
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        self.singular_values = np.asarray(self.singular_values, dtype=np.float64)
        if np.ndim(self.top_share):
            self.top_share = np.asarray(self.top_share, dtype=np.float64)
            self.stable_rank = np.asarray(self.stable_rank, dtype=np.float64)
        else:
            self.top_share = float(self.top_share)
            self.stable_rank = float(self.stable_rank)
        self.shape = (int(self.shape[0]), int(self.shape[1]))


def eigenvector_low_rank(vector: Any, shape: Sequence[int], *, layout: str = "params") -> LowRank:
    """Reshape layer eigenvectors to the weight's matrix shape and measure their rank.

    Args:
        vector: (m,) one vector or (m, k) k vectors (columns) of one layer: what
            ``KFAC.topk(layer, k)`` returns, or ``hesslab.lanczos(layer_hessian(...), k)``'s
            eigenvectors.
        shape: The weight's shape, e.g. ``layer.weight.shape``: (out, in) for a Linear,
            (C_out, C_in, kh, kw) for a Conv2d (the trailing dimensions are flattened to
            in = C_in·kh·kw, as PyTorch flattens them).
        layout: How a vector with a bias part is laid out:
            ``"params"`` (default): hesslab's parameter layout, the weight's out·in entries
            (row-major) then the bias's out entries; the bias becomes the last column of
            the (out, in + 1) matrix. ``"augmented"``: already the row-major (out, in + 1)
            augmented matrix. Vectors of length out·in (no bias) need no layout.

    Returns:
        :class:`LowRank` with the singular values, σ₁²/Σσ² and the stable rank Σσ²/σ₁².

    Raises:
        HesslabError: a length that is neither out·in nor out·(in + 1), a bad layout, a
            zero vector.
    """
    if layout not in ("params", "augmented"):
        raise HesslabError(f"layout: expected 'params' or 'augmented', got {layout!r}")
    try:
        dims = [int(s) for s in shape]
    except TypeError:
        raise HesslabError(f"shape: expected the weight's shape, e.g. (out, in), got {shape!r}") from None
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise HesslabError(f"shape: expected the weight's shape (out, in, ...) with positive sizes, got {tuple(dims)}")
    out, inp = dims[0], int(np.prod(dims[1:]))
    X = _as_numpy(vector, "vector")
    single = X.ndim == 1
    if single:
        X = X[:, None]
    if X.ndim != 2:
        raise HesslabError(f"vector: expected shape (m,) or (m, k), got {X.shape}")
    m, k = X.shape
    if m == out * inp:
        mats = X.T.reshape(k, out, inp)
    elif m == out * (inp + 1):
        if layout == "params":
            W = X[: out * inp].T.reshape(k, out, inp)
            b = X[out * inp :].T.reshape(k, out, 1)
            mats = np.concatenate([W, b], axis=2)
        else:
            mats = X.T.reshape(k, out, inp + 1)
    else:
        raise HesslabError(
            f"vector: length {m} fits neither the weight (out·in = {out}·{inp} = {out * inp}) nor weight and "
            f"bias ({out * (inp + 1)}) of shape {tuple(dims)}"
        )
    sv = np.linalg.svd(mats, compute_uv=False)  # (k, r) descending
    energy = (sv**2).sum(axis=1)
    if np.any(energy == 0):
        raise HesslabError("vector: a zero vector has no rank structure")
    top = sv[:, 0] ** 2 / energy
    stable = energy / sv[:, 0] ** 2
    if single:
        return LowRank(singular_values=sv[0], top_share=top[0], stable_rank=stable[0], shape=mats.shape[1:])
    return LowRank(singular_values=sv, top_share=top, stable_rank=stable, shape=mats.shape[1:])


@dataclasses.dataclass
class DominantEigenvalues(Result):
    """The count of dominant eigenvalues of a matrix (typically B = E[M] of a layer).

    Attributes:
        count: The number of eigenvalues before the largest relative gap.
        eigenvalues: (m,) all eigenvalues, descending.
        ratios: (m − 1,) λ_i / max(λ_{i+1}, floor) for i = 1..m−1 (the gap after the
            i-th eigenvalue); the count is the i of the largest one within ``max_count``.
        floor: rtol·λ₁: eigenvalues below it count as this value (numerical zeros).
        num_classes: c when given, else 0.
        matches_classes: ``count`` is c or c − 1 (False when c is not given).
    """

    count: int
    eigenvalues: np.ndarray
    ratios: np.ndarray
    floor: float
    num_classes: int = 0
    matches_classes: bool = False

    def __post_init__(self) -> None:
        self.eigenvalues = np.asarray(self.eigenvalues, dtype=np.float64)
        self.ratios = np.asarray(self.ratios, dtype=np.float64)
        self.count = int(self.count)
        self.num_classes = int(self.num_classes)
        self.matches_classes = bool(self.matches_classes)

    def plot(self, ax: Axes | None = None) -> Axes:
        """The positive eigenvalues on a log scale, with the dominant ones highlighted."""
        ax = axes(ax, (5.5, 4.0))
        lam = np.maximum(self.eigenvalues, self.floor)
        idx = np.arange(1, lam.size + 1)
        ax.semilogy(idx, lam, "o", ms=3, color="C0", label="eigenvalues")
        ax.semilogy(idx[: self.count], lam[: self.count], "o", ms=5, color="C3", label=f"dominant ({self.count})")
        if self.num_classes:
            ax.axvline(self.num_classes + 0.5, color="gray", ls="--", lw=1, label=f"c = {self.num_classes}")
        ax.set_xlabel("index")
        ax.set_ylabel("eigenvalue")
        ax.legend(loc="best", fontsize="small")
        return ax


def dominant_eigenvalues(
    B: Any, num_classes: int | None = None, *, max_count: int | None = None, rtol: float = 1e-12
) -> DominantEigenvalues:
    """Count the dominant eigenvalues of a symmetric matrix at its largest relative gap.

    Rule: with eigenvalues λ₁ ≥ … ≥ λ_m (those below ``floor = rtol·λ₁`` raised to the
    floor, so numerical zeros and negatives do not create spurious gaps), the count is
    the i ∈ 1..min(m − 1, max_count) that maximizes λ_i / λ_{i+1}, the largest gap on a log
    scale. For the logits of a cross-entropy network B = E[diag(p) − ppᵀ] has rank c − 1,
    so the count is c − 1 there; Wu et al. report c or c − 1 dominant eigenvalues of E[M]
    for hidden layers too.

    Args:
        B: A symmetric (m, m) matrix (e.g. ``K.factors[layer].B``) or a vector of its
            eigenvalues.
        num_classes: c, to report whether the count is c or c − 1.
        max_count: Largest count considered (default m − 1), e.g. 2c to ignore a gap far
            down the spectrum.
        rtol: Relative floor for the eigenvalues.

    Returns:
        :class:`DominantEigenvalues`.

    Raises:
        HesslabError: a non-square or non-symmetric matrix, a spectrum without a positive
            eigenvalue, bad ``max_count`` or ``rtol``.
    """
    X = _as_numpy(B, "B")
    if X.ndim == 2:
        if X.shape[0] != X.shape[1]:
            raise HesslabError(f"B: expected a square matrix or a vector of eigenvalues, got shape {X.shape}")
        scale = max(np.abs(X).max(), 1e-300)
        if np.abs(X - X.T).max() > 1e-8 * scale:
            raise HesslabError("B: not symmetric; pass (B + B.T) / 2 or its eigenvalues")
        lam = np.linalg.eigvalsh((X + X.T) / 2)[::-1]
    elif X.ndim == 1:
        lam = np.sort(X)[::-1]
    else:
        raise HesslabError(f"B: expected a square matrix or a vector of eigenvalues, got shape {X.shape}")
    if lam.size == 0 or not np.all(np.isfinite(lam)):
        raise HesslabError("B: empty, or holds NaN/Inf")
    if not (0 < rtol < 1):
        raise HesslabError(f"rtol: must lie in (0, 1), got {rtol}")
    if lam[0] <= 0:
        raise HesslabError("B: has no positive eigenvalue; nothing dominates")
    m = lam.size
    floor = rtol * lam[0]
    if m == 1:
        ratios = np.zeros(0)
        count = 1
    else:
        mc = m - 1 if max_count is None else int(max_count)
        if not (1 <= mc <= m - 1):
            raise HesslabError(f"max_count: must satisfy 1 <= max_count <= m - 1 = {m - 1}, got {max_count}")
        f = np.maximum(lam, floor)
        ratios = f[:-1] / f[1:]
        count = int(np.argmax(ratios[:mc])) + 1
    c = int(num_classes) if num_classes else 0
    if num_classes is not None and c < 1:
        raise HesslabError(f"num_classes: must be a positive integer, got {num_classes}")
    return DominantEigenvalues(
        count=count, eigenvalues=lam, ratios=ratios, floor=floor, num_classes=c,
        matches_classes=bool(c) and count in (c - 1, c),
    )


def kfac_overlap(K1: Any, K2: Any, k: int, layers: Sequence[str] | None = None) -> dict[str, OverlapCurve]:
    """Per-layer overlap curves of the top-k eigenspaces of two Kronecker operators.

    For two models with the same architecture (e.g. trained from two seeds): the top-k
    eigenvectors of each layer's B ⊗ A (``KFAC.topk``) compared for k = 1..k.

    Args:
        K1, K2: :class:`hesslab.linops._kfac.KFAC` operators (or anything with ``topk``
            and ``layer_names``) over models of the same shapes.
        k: The largest dimension.
        layers: Layer names (default: those of K1).

    Returns:
        ``{layer: OverlapCurve}``.

    Raises:
        HesslabError: a layer missing from K2, or layers of different sizes.
    """
    names = list(layers) if layers is not None else list(K1.layer_names)
    out = {}
    for name in names:
        if name not in K2.layer_names:
            raise HesslabError(f"layers: {name!r} is not a layer of the second operator {K2.layer_names}")
        _, U = K1.topk(name, k)
        _, V = K2.topk(name, k)
        if U.shape != V.shape:
            raise HesslabError(f"layers: {name!r} has {U.shape[0]} parameters in one model and {V.shape[0]} in the other")
        out[name] = overlap_curve(U, V, label=name)
    return out
