"""The Kronecker block-diagonal operator over given factors, and functions of it.

Notation:
    L blocks; block l is B_l ⊗ A_l with A_l of shape (i_l, i_l) and B_l of shape
    (o_l, o_l), n_l = o_l · i_l, n = Σ_l n_l.

Layout (the Kronecker layout): a flat vector concatenates the blocks in order; block l
is the row-major vec of a matrix V_l of shape (o_l, i_l), vec(V_l)[r·i_l + s] =
V_l[r, s], so (B_l ⊗ A_l) vec(V_l) = vec(B_l V_l A_lᵀ) (``torch.kron(B, A)``). Every
product runs through the compiled grouped ops of :mod:`hesslab._ops`
(``kron_matmul``, ``kron_eig_apply``, ``kron_topk``), which take blocks batch first,
(b, n).

Functions of the operator go through the factors' eigenbases: with A = U_A Λ_A U_Aᵀ and
B = U_B Λ_B U_Bᵀ, f(B ⊗ A) vec(V) = vec(U_B (f(λ_B λ_Aᵀ) ∘ (U_Bᵀ V U_A)) U_Aᵀ), which
gives powers, damped inverses and the top-k eigenpairs (u_B,i ⊗ u_A,j, value λ_B,i λ_A,j).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hesslab import _ops
from hesslab.errors import HesslabError
from hesslab.linops._base import LinearOperator

__all__ = ["KroneckerBlockDiagonal", "KroneckerFunction"]

Eig = tuple[Tensor, Tensor, Tensor, Tensor]  # (U_A, λ_A, U_B, λ_B)


class KroneckerBlockDiagonal(LinearOperator):
    """blockdiag_l(B_l ⊗ A_l) in the Kronecker layout (see the module docstring).

    Args:
        A: The input-side factors A_l, (i_l, i_l), symmetric PSD.
        B: The output-side factors B_l, (o_l, o_l), symmetric.
        psd_B: Per block, whether B_l is PSD (its negative eigenvalues are rounding and
            clamped at 0); ``False`` for indefinite B_l (exact output Hessians).
        names: Per block, a name for messages.
    """

    def __init__(self, A: list[Tensor], B: list[Tensor], *, psd_B: list[bool], names: list[str]):
        n = sum(a.shape[0] * b.shape[0] for a, b in zip(A, B))
        super().__init__((n, n), A[0].dtype, A[0].device)
        self.A = A
        self.B = B
        self.psd_B = psd_B
        self.names = names
        self.sizes = [a.shape[0] * b.shape[0] for a, b in zip(A, B)]
        self._eig: list[Eig] | None = None

    def _matmat(self, V: Tensor) -> Tensor:
        return _ops.kron_matmul(self.A, self.B, V.T.contiguous()).T  # (n, b)

    def block_dense(self, l: int) -> Tensor:
        """The dense block B_l ⊗ A_l, (n_l, n_l), Kronecker layout."""
        return torch.kron(self.B[l], self.A[l])

    def to_dense(self, max_size: int = 4096, chunk_size: int = 256) -> Tensor:
        """The dense block-diagonal matrix (n, n), built from the factors."""
        if self.shape[0] > max_size:
            return super().to_dense(max_size, chunk_size)  # raises with the message
        return torch.block_diag(*[self.block_dense(l) for l in range(len(self.A))])

    def trace(self) -> float:
        """tr = Σ_l tr(B_l) tr(A_l), exactly."""
        return float(sum(torch.trace(a) * torch.trace(b) for a, b in zip(self.A, self.B)))

    # ------------------------------------------------------------------ spectra
    def eig(self) -> list[Eig]:
        """Per block (U_A, λ_A, U_B, λ_B), eigenvalues ascending; cached.

        λ_A (a Gram matrix) and a PSD B's λ_B are clamped at 0. The factors are
        decomposed in float64 and cast back: besides the accuracy, MKL's multi-threaded
        float32 ``syevd`` (torch 2.14 on CPU) was seen to return NaN eigenvectors for
        factors with exactly-zero rows (dead ReLU inputs).
        """
        if self._eig is None:
            cache = []
            for name, a, b, psd in zip(self.names, self.A, self.B, self.psd_B):
                lam_a, U_a = _eigh64(a, f"A of layer {name!r}")
                lam_b, U_b = _eigh64(b, f"B of layer {name!r}")
                lam_a = lam_a.clamp_min(0)
                if psd:
                    lam_b = lam_b.clamp_min(0)
                cache.append((U_a, lam_a, U_b, lam_b))
            self._eig = cache
        return self._eig

    def eigenvalues(self) -> list[Tensor]:
        """Per block the n_l eigenvalues λ_B,i λ_A,j, sorted descending."""
        return [
            torch.outer(lam_b, lam_a).reshape(-1).sort(descending=True).values
            for _, lam_a, _, lam_b in self.eig()
        ]

    def topk(self, l: int, k: int) -> tuple[Tensor, Tensor]:
        """The k largest eigenpairs of block l (``kron_topk``), 1 ≤ k ≤ n_l.

        Returns:
            ``(values (k,) descending, vectors (n_l, k))``, orthonormal columns u_B,i ⊗
            u_A,j in the block's Kronecker layout.
        """
        U_a, lam_a, U_b, lam_b = self.eig()[l]
        values, ib, ia = _ops.kron_topk(lam_b.contiguous(), lam_a.contiguous(), k)
        vecs = (U_b[:, ib][:, None, :] * U_a[:, ia][None, :, :]).reshape(self.sizes[l], k)
        return values, vecs

    def function(self, p: float, damping: float) -> KroneckerFunction:
        """(B ⊗ A + damping·I)^p per block, checked to be real and finite.

        Raises:
            HesslabError: p or damping not finite; p < 0 with some λ_B λ_A + damping ≤ 0
                (singular: raise damping); a non-integer p with some λ_B λ_A + damping < 0
                (an indefinite exact B).
        """
        p, damping = float(p), float(damping)
        if not (math.isfinite(p) and math.isfinite(damping)):
            raise HesslabError(f"p, damping: must be finite, got {p}, {damping}")
        low = min(float(v.min()) for v in self.eigenvalues()) + damping
        if p < 0 and low <= 0:
            raise HesslabError(
                f"damping: (B ⊗ A + damping)^{p:g} is singular: the smallest eigenvalue plus "
                f"damping is {low:.3g}. Pass damping > {-low + 0.0:.3g} (e.g. 1e-3 times the "
                "largest eigenvalue)."
            )
        if p != int(p) and low < 0:
            raise HesslabError(
                f"p: a non-integer power of an indefinite operator (smallest eigenvalue plus "
                f"damping {low:.3g}, from an exact, indefinite B) is not real; raise damping or "
                "use curvature='ggn'"
            )
        return KroneckerFunction(self, p, damping)


class KroneckerFunction(LinearOperator):
    """(B_l ⊗ A_l + damping)^p per block of a :class:`KroneckerBlockDiagonal`.

    Applied through the parent's cached eigendecompositions by ``kron_eig_apply``, in
    the Kronecker layout. Build with :meth:`KroneckerBlockDiagonal.function`.
    """

    def __init__(self, parent: KroneckerBlockDiagonal, p: float, damping: float):
        super().__init__(parent.shape, parent.dtype, parent.device)
        self.parent = parent
        self.p = p
        self.damping = damping

    def _matmat(self, V: Tensor) -> Tensor:
        UA, lamA, UB, lamB = (list(t) for t in zip(*self.parent.eig()))
        R = _ops.kron_eig_apply(
            UA, lamA, UB, lamB, V.T.contiguous(), power=self.p, damping=self.damping
        )
        return R.T  # (n, b)


def _eigh64(M: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` in float64, cast back to M's dtype; raises on non-finite output."""
    lam, U = torch.linalg.eigh(M.to(torch.float64))
    if not (bool(torch.isfinite(lam).all()) and bool(torch.isfinite(U).all())):
        raise HesslabError(f"model: the eigendecomposition of the factor {what} failed (NaN/Inf)")
    return lam.to(M.dtype), U.to(M.dtype)
