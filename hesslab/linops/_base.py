"""A small torch-native base for symmetric linear operators, and their sums and multiples.

Notation:
    A: a symmetric linear operator on R^n (a Hessian, a Gauss-Newton matrix, ...).
    n: the dimension (the number of selected parameters for curvature operators).
    b: the number of columns applied at once. A block V has shape (n, b); its columns
       are flat vectors (see :mod:`hesslab.linops._params` for the parameter layout).

Subclasses implement one batched product ``_matmat(V) -> A V`` for V of shape (n, b),
already checked and converted to the operator's dtype and device. Everything else comes
from the base: ``@`` for vectors and blocks, ``matmat``, ``to_scipy()``, ``to_dense()``
for small n, and the algebra ``A + B``, ``A - B``, ``-A``, ``c * A``, ``A / c``.

Two building blocks compose operators: :class:`PermutationOperator` (a change of
vector layout, the one non-symmetric operator here, with its transpose ``.T``)
and :class:`ChainOperator` (A_1 A_2 ... A_m applied right to left), so that an operator
kept in another layout reads P K Pᵀ (see :class:`hesslab.linops.KFAC`).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hesslab.errors import HesslabError

__all__ = ["LinearOperator", "DenseOperator", "PermutationOperator", "ChainOperator"]


class LinearOperator:
    """A symmetric linear operator A of shape (n, n) acting on columns.

    Attributes:
        shape: ``(n, n)``.
        dtype: The floating dtype of products.
        device: The device of products.
        num_matvecs: The number of columns applied so far through :meth:`matmat` and
            ``@`` (a product with a block of b columns counts b).
        shards: None, or the :class:`hesslab.linops._shards.Shards` of a sharded
            operator: ``shape`` is then the local (n_r, n_r), vectors are this rank's
            shards, and solvers all-reduce their inner products through it.
    """

    __array_ufunc__ = None
    shards = None  # numpy scalars and arrays defer to our operators (c * A, A @ x)

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device | str):
        n, m = (int(s) for s in shape)
        if n != m:
            raise HesslabError(f"shape: a LinearOperator here is square, got {shape}")
        self.shape: tuple[int, int] = (n, m)
        self.dtype: torch.dtype = dtype
        self.device: torch.device = torch.device(device)
        self.num_matvecs: int = 0

    # ------------------------------------------------------------------ products
    def _matmat(self, V: Tensor) -> Tensor:
        """Return A V for V of shape (n, b) (operator dtype and device); shape (n, b)."""
        raise NotImplementedError

    def matmat(self, V: Tensor) -> Tensor:
        """Apply the operator to a block of columns.

        Args:
            V: Shape (n, b). A floating tensor of another dtype or device is converted to
                the operator's.

        Returns:
            A V, shape (n, b), in the operator's dtype and on its device.

        Raises:
            HesslabError: ``V`` is not a floating tensor of shape (n, b).
        """
        V = self._check_block(V, "V")
        if V.shape[1] == 0:
            return V.new_zeros(V.shape)
        out = self._matmat(V)  # (n, b)
        self.num_matvecs += V.shape[1]
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """Apply the operator to one vector: (n,) -> (n,)."""
        v = self._check_vector(v, "v")
        return self.matmat(v[:, None])[:, 0]

    def __matmul__(self, x: Any) -> Tensor:
        """``A @ x`` for x of shape (n,) -> (n,) or (n, b) -> (n, b)."""
        if isinstance(x, Tensor) and x.dim() == 1:
            return self.matvec(x)
        if isinstance(x, Tensor) and x.dim() == 2:
            return self.matmat(x)
        if isinstance(x, LinearOperator):
            raise HesslabError(
                "x: products of two operators are not supported (the result is not symmetric); "
                "apply them one after the other: A @ (B @ v)"
            )
        n = self.shape[0]
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise HesslabError(f"x: expected a tensor of shape ({n},) or ({n}, b), got {got}")

    def _check_vector(self, v: Any, name: str) -> Tensor:
        n = self.shape[0]
        if not isinstance(v, Tensor) or v.dim() != 1 or v.shape[0] != n:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise HesslabError(f"{name}: expected a tensor of shape ({n},), got {got}")
        return v

    def _check_block(self, V: Any, name: str) -> Tensor:
        n = self.shape[0]
        if not isinstance(V, Tensor) or V.dim() != 2 or V.shape[0] != n:
            got = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
            raise HesslabError(f"{name}: expected a tensor of shape ({n}, b), got {got}")
        if not (V.is_floating_point()):
            raise HesslabError(f"{name}: expected a floating tensor, got dtype {V.dtype}")
        if V.dtype != self.dtype or V.device != self.device:
            V = V.to(device=self.device, dtype=self.dtype)
        return V

    # --------------------------------------------------------------- conversions
    def to_scipy(self) -> Any:
        """A :class:`scipy.sparse.linalg.LinearOperator` view (float64 numpy in and out).

        Each scipy product converts to the operator's dtype and device, applies
        :meth:`matmat` and converts back, so scipy's ``eigsh`` and friends can serve as
        reference solvers.
        """
        self._refuse_sharded("to_scipy")
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        def _mm(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X, dtype=np.float64)
            one = X.ndim == 1
            V = torch.from_numpy(np.ascontiguousarray(X.reshape(self.shape[0], -1)))
            out = self.matmat(V).detach().to("cpu", torch.float64).numpy()  # (n, b)
            return out[:, 0] if one else out

        return ScipyLinearOperator(
            shape=self.shape, matvec=_mm, rmatvec=_mm, matmat=_mm, rmatmat=_mm, dtype=np.float64
        )

    def to_dense(self, max_size: int = 4096, chunk_size: int = 256) -> Tensor:
        """The dense (n, n) matrix, built by applying the operator to the identity.

        Args:
            max_size: Refuse when n exceeds this (n^2 entries and n products).
            chunk_size: Columns of the identity applied per product.

        Returns:
            Shape (n, n), the operator's dtype and device.

        Raises:
            HesslabError: n > max_size.
        """
        self._refuse_sharded("to_dense")
        n = self.shape[0]
        if n > max_size:
            raise HesslabError(
                f"to_dense: the operator has n = {n} > max_size = {max_size}; the dense matrix "
                f"would need {n}^2 entries and {n} products. Use hesslab.lanczos (eigenpairs), "
                "hesslab.spectral_density or hesslab.trace instead, or raise max_size."
            )
        if chunk_size < 1:
            raise HesslabError(f"chunk_size: must be positive, got {chunk_size}")
        out = torch.empty(n, n, dtype=self.dtype, device=self.device)
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            E = torch.zeros(n, stop - start, dtype=self.dtype, device=self.device)  # (n, c)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            out[:, start:stop] = self.matmat(E)
        return out

    def _refuse_sharded(self, what: str) -> None:
        if self.shards is not None:
            raise HesslabError(
                f"{what}: the operator is sharded over {self.shards.world} ranks (its vectors are this rank's "
                "shards), so a local matrix would mean nothing; use hl.lanczos, hl.spectral_density or hl.trace, "
                "which reduce over the ranks, and op.shards.gather(v) for a whole vector"
            )

    # ------------------------------------------------------------------- algebra
    def _check_compatible(self, other: LinearOperator) -> None:
        if other.shape != self.shape:
            raise HesslabError(f"other: shape {other.shape} does not match {self.shape}")
        if other.dtype != self.dtype:
            raise HesslabError(
                f"other: dtype {other.dtype} does not match {self.dtype}; build both operators "
                "with the same dtype= option"
            )
        if other.device != self.device:
            raise HesslabError(f"other: device {other.device} does not match {self.device}")
        if other.shards != self.shards:
            raise HesslabError("other: its vectors are sharded differently; combine operators of one sharded model")

    def __add__(self, other: Any) -> LinearOperator:
        if isinstance(other, LinearOperator):
            self._check_compatible(other)
            return _SumOperator([(1.0, self), (1.0, other)])
        return NotImplemented

    def __radd__(self, other: Any) -> LinearOperator:
        if isinstance(other, numbers.Number) and other == 0:  # sum([A, B, ...])
            return self
        return NotImplemented

    def __sub__(self, other: Any) -> LinearOperator:
        if isinstance(other, LinearOperator):
            self._check_compatible(other)
            return _SumOperator([(1.0, self), (-1.0, other)])
        return NotImplemented

    def __neg__(self) -> LinearOperator:
        return _SumOperator([(-1.0, self)])

    def __mul__(self, scalar: Any) -> LinearOperator:
        c = _as_scalar(scalar)
        if c is None:
            return NotImplemented
        return _SumOperator([(c, self)])

    __rmul__ = __mul__

    def __truediv__(self, scalar: Any) -> LinearOperator:
        c = _as_scalar(scalar)
        if c is None:
            return NotImplemented
        if c == 0:
            raise HesslabError("scalar: division of an operator by zero")
        return _SumOperator([(1.0 / c, self)])

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def _as_scalar(x: Any) -> float | None:
    """A real scalar as a float, or None when ``x`` is not one."""
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Real):
        return float(x)
    if isinstance(x, Tensor) and x.numel() == 1 and not x.is_complex():
        return float(x.item())
    if isinstance(x, np.ndarray) and x.size == 1 and np.isrealobj(x):
        return float(x.item())
    return None


class _SumOperator(LinearOperator):
    """A linear combination sum_i c_i A_i of compatible operators."""

    def __init__(self, terms: list[tuple[float, LinearOperator]]):
        first = terms[0][1]
        super().__init__(first.shape, first.dtype, first.device)
        flat: list[tuple[float, LinearOperator]] = []
        for c, op in terms:
            if isinstance(op, _SumOperator):
                flat.extend((c * c2, op2) for c2, op2 in op.terms)
            else:
                flat.append((c, op))
        self.terms = flat
        self.shards = first.shards

    def _matmat(self, V: Tensor) -> Tensor:
        out = None
        for c, op in self.terms:
            term = op.matmat(V)  # (n, b)
            if c != 1.0:
                term = term * c
            out = term if out is None else out + term
        return out

    def __repr__(self) -> str:
        inner = " + ".join(f"{c:g} * {op!r}" for c, op in self.terms)
        return f"({inner})"


class DenseOperator(LinearOperator):
    """A LinearOperator wrapping an explicit symmetric matrix.

    Args:
        matrix: A floating tensor of shape (n, n), symmetric.
        check_symmetric: Raise unless ``matrix`` is symmetric up to rounding
            (|A - Aᵀ| <= 1e3 · eps · max|A| entrywise).

    Raises:
        HesslabError: ``matrix`` is not a square floating matrix, or is not symmetric.
    """

    def __init__(self, matrix: Tensor, *, check_symmetric: bool = True):
        square = isinstance(matrix, Tensor) and matrix.dim() == 2
        if not square or matrix.shape[0] != matrix.shape[1]:
            got = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise HesslabError(f"matrix: expected a square tensor of shape (n, n), got {got}")
        if not matrix.is_floating_point():
            raise HesslabError(f"matrix: expected a floating dtype, got {matrix.dtype}")
        if check_symmetric and matrix.numel() > 0:
            scale = matrix.abs().max()
            tol = 1e3 * torch.finfo(matrix.dtype).eps * scale
            if bool((matrix - matrix.T).abs().max() > tol):
                raise HesslabError(
                    "matrix: not symmetric; hesslab operators are symmetric. Pass (A + A.T) / 2, "
                    "or check_symmetric=False if the asymmetry is intended"
                )
        super().__init__(tuple(matrix.shape), matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V  # (n, n) @ (n, b) -> (n, b)

    def to_dense(self, max_size: int = 4096, chunk_size: int = 256) -> Tensor:
        n = self.shape[0]
        if n > max_size or self.shards is not None:
            return super().to_dense(max_size, chunk_size)  # raises with the message
        return self.matrix.clone()


class PermutationOperator(LinearOperator):
    """The permutation matrix P with (P V)[perm[i]] = V[i]: a change of vector layout.

    Row i of a block in the *inner* layout moves to row ``perm[i]`` of the *outer* one;
    ``P.T`` (Pᵀ = P⁻¹) gathers back, (Pᵀ V)[i] = V[perm[i]]. An identity permutation
    costs nothing but a copy. Not symmetric: use it inside a :class:`ChainOperator`
    such as P K Pᵀ.

    Args:
        perm: Shape (n,), a permutation of 0..n-1 (integer, on the operator's device).
        dtype: The dtype of the vectors it moves.
    """

    def __init__(self, perm: Tensor, dtype: torch.dtype, *, _transposed: bool = False):
        n = int(perm.numel())
        super().__init__((n, n), dtype, perm.device)
        self.perm = perm
        self.identity = bool(torch.equal(perm, torch.arange(n, device=perm.device)))
        self._transposed = _transposed

    @property
    def T(self) -> PermutationOperator:
        """Pᵀ = P⁻¹, sharing ``perm``."""
        return PermutationOperator(self.perm, self.dtype, _transposed=not self._transposed)

    def _matmat(self, V: Tensor) -> Tensor:
        if self.identity:
            return V.clone()
        if self._transposed:
            return V.index_select(0, self.perm)  # (n, b): gather
        out = torch.empty(V.shape, dtype=V.dtype, device=V.device)
        return out.index_copy_(0, self.perm, V)  # (n, b): scatter

    def __repr__(self) -> str:
        return f"PermutationOperator(n={self.shape[0]}, transposed={self._transposed})"


class ChainOperator(LinearOperator):
    """The product A_1 A_2 ... A_m of compatible operators, applied right to left.

    Symmetric when the chain is (e.g. P K Pᵀ with K symmetric), which its users ensure.

    Args:
        ops: The factors A_1, ..., A_m, all of one shape, dtype and device.
    """

    def __init__(self, ops: list[LinearOperator]):
        if not ops:
            raise HesslabError("ops: a chain needs at least one operator")
        first = ops[0]
        for op in ops[1:]:
            first._check_compatible(op)
        super().__init__(first.shape, first.dtype, first.device)
        self.ops = list(ops)
        self.shards = first.shards

    def _matmat(self, V: Tensor) -> Tensor:
        for op in reversed(self.ops):
            V = op.matmat(V)  # (n, b)
        return V

    def __repr__(self) -> str:
        return " @ ".join(repr(op) for op in self.ops)


class SubblockOperator(LinearOperator):
    """Sᵀ A S for the coordinate selection S = I[:, index]: the block of A on some entries.

    A vector of the block (k,) is scattered into zeros at ``index`` of A's layout, A is
    applied and the entries at ``index`` are gathered back, so the block of a parameter
    that fuses several (GPT-2's ``c_attn``: query, key and value columns) is an operator
    of its own. Symmetric when A is.

    Args:
        op: The (n, n) operator.
        index: Shape (k,), distinct integer positions in 0..n-1 (A's flat layout).
    """

    def __init__(self, op: LinearOperator, index: Tensor):
        op._refuse_sharded("SubblockOperator")
        index = torch.as_tensor(index, dtype=torch.long, device=op.device).reshape(-1)
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= op.shape[0]:
            raise HesslabError(f"index: expected positions in [0, {op.shape[0]}), got {index.numel()} entries")
        if torch.unique(index).numel() != index.numel():
            raise HesslabError("index: positions must be distinct")
        k = int(index.numel())
        super().__init__((k, k), op.dtype, op.device)
        self.op = op
        self.index = index

    def _matmat(self, V: Tensor) -> Tensor:
        full = torch.zeros(self.op.shape[0], V.shape[1], dtype=V.dtype, device=V.device)
        full.index_copy_(0, self.index, V)  # S V: (n, b)
        return self.op.matmat(full).index_select(0, self.index)  # Sᵀ A S V: (k, b)

    def __repr__(self) -> str:
        return f"SubblockOperator(k={self.shape[0]}, of {self.op!r})"
