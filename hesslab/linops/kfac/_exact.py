"""The exact output Hessian M of a layer, by batched Hessian-vector products w.r.t. its output.

For a layer flagged by the exact-vs-Gauss-Newton decision (``curvature="exact"``), M is
obtained from the first-order graph g₁ = ∂(Σ_j ℓ_j)/∂δ of the hooked forward pass
(δ the zero perturbation of the layer's output, (n, *z) viewed as rows (n, P, C)):

* "expand": M_j[t, t][:, c] = rows(∂⟨g₁, E_{t,c}⟩/∂δ)[j, t], with E_{t,c} the unit
  direction at position t and channel c for every sample j at once: P·C directions;
* "reduce": Σ_{t,t'} M_j[t, t'][:, c] = Σ_t rows(∂⟨g₁, E_c⟩/∂δ)[j, t], E_c the channel-c
  direction at all positions: C directions.

Vectorised: the directions go through the double backward in chunks with
``is_grads_batched=True`` (vmap over the directions, one graph traversal per chunk
instead of one per direction; chunks sized so that a chunk of directions holds about
2²² output entries), falling back on one direction at a time, once and recorded, where
an op after the layer has no batching rule. A tqdm bar counts the directions (quiet when
not on a terminal). The Gauss-Newton pullbacks of the loss Hessian's square-root
columns are batched the same way (:meth:`ExactM.pullbacks`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from hesslab.linops.kfac._math import LayerRule

__all__ = ["ExactM"]

_CHUNK_ENTRIES = 1 << 22  # output entries per chunk of directions


class ExactM:
    """Exact per-sample output Hessians, batched over directions.

    Attributes:
        batched: False once a batched double backward failed (then one at a time).
        fallback: Why it failed, or None.
        products: Hessian-vector directions applied so far (for the time estimate).
    """

    def __init__(self) -> None:
        self.batched = True
        self.fallback: str | None = None
        self.products = 0

    def directions(self, rows_shape: tuple[int, int, int], reduce: bool) -> int:
        """How many directions one layer's M takes: C ("reduce") or P·C ("expand")."""
        _, P, C = rows_shape
        return C if reduce else P * C

    def compute(
        self, g1: Tensor | None, d: Tensor, rule: LayerRule, reduce: bool, dtype: torch.dtype,
        bar: Any = None,
    ) -> Tensor:
        """M of one layer from its first-order graph.

        Args:
            g1: ∂(Σ_j ℓ_j)/∂δ with its graph (None: the loss does not depend on δ).
            d: δ, (n, *z).
            rule: The layer type's row views.
            reduce: "reduce" (Σ over position pairs) instead of "expand".
            bar: A tqdm bar to advance by the directions done.

        Returns:
            (n, P, C, C) ("expand") or (n, 1, C, C) ("reduce"), symmetrised.
        """
        n, P, C = rule.output_rows(d).shape
        M = torch.zeros(n, 1 if reduce else P, C, C, dtype=dtype, device=d.device)
        if g1 is None or not g1.requires_grad:
            return M
        total = self.directions((n, P, C), reduce)
        chunk = max(1, min(total, _CHUNK_ENTRIES // max(1, d.numel())))
        for start in range(0, total, chunk):
            idx = torch.arange(start, min(start + chunk, total), device=d.device)
            k = idx.numel()
            E = torch.zeros(k, n, P, C, dtype=d.dtype, device=d.device)
            if reduce:
                t, c = None, idx
                E[torch.arange(k), :, :, c] = 1
            else:
                t, c = idx // C, idx % C
                E[torch.arange(k), :, t, c] = 1
            dirs = rule.rows_to_output(E.reshape(k * n, P, C), (k * n, *d.shape[1:]))
            hv = self._apply(g1, d, dirs.reshape(k, *d.shape))  # (k, n, *z)
            if hv is not None:
                r = rule.output_rows(hv.reshape(k * n, *d.shape[1:])).reshape(k, n, P, C)
                if reduce:
                    M0 = M[:, 0]  # (n, C, C), a view
                    M0[:, :, c] = r.sum(2).permute(1, 2, 0).to(dtype)  # (n, C, k)
                else:  # non-adjacent index tensors: the k dimension comes first, (k, n, C)
                    M[:, t, :, c] = r[torch.arange(k), :, t, :].to(dtype)
            self.products += k
            if bar is not None:
                bar.update(k)
        return (M + M.transpose(-1, -2)) / 2

    def pullbacks(self, out: Tensor, inputs: list[Tensor], S: Tensor) -> Iterator[tuple[Tensor | None, ...]]:
        """The vector-Jacobian products Jᵀ s_k of every square-root column s_k, one by one.

        The Gauss-Newton part of B needs one pullback per column of the loss Hessian's
        square root (c classes, or a causal LM's V tokens). By the rule of the curvature
        operators' columns: one at a time on the CPU (a first-order backward batched by
        vmap lost there: 8.0 s against 6.9 s for KFAC(curvature="ggn") on a 2-layer GPT-2
        with a 1024-token vocabulary, 4 × 32 tokens, one thread), in chunks with
        ``is_grads_batched`` elsewhere (CUDA), with the same fallback as the exact M.

        Args:
            out: The model output (n, *z) with its graph; inputs: the layers' δ.
            S: (K, n, *z) the columns.

        Yields:
            Per column, the pullback to every input (None where unused).
        """
        K = S.shape[0]
        chunk = max(1, min(K, _CHUNK_ENTRIES // max(1, out.numel())))
        for start in range(0, K, chunk):
            part = S[start:start + chunk]
            if self.batched and part.shape[0] > 1 and out.device.type != "cpu":
                try:
                    grads = torch.autograd.grad(
                        out, inputs, part, retain_graph=True, allow_unused=True, is_grads_batched=True
                    )
                    for i in range(part.shape[0]):
                        yield tuple(None if g is None else g[i] for g in grads)
                    continue
                except RuntimeError as err:  # no batching rule: one at a time from now on
                    self.batched = False
                    self.fallback = str(err).split("\n")[0]
            for s in part:
                yield torch.autograd.grad(out, inputs, s, retain_graph=True, allow_unused=True)

    def _apply(self, g1: Tensor, d: Tensor, dirs: Tensor) -> Tensor | None:
        """∂⟨g₁, e⟩/∂δ for the k directions ``dirs`` (k, *δ); (k, *δ) or None if unused."""
        if self.batched and dirs.shape[0] > 1:
            try:
                (hv,) = torch.autograd.grad(
                    g1, d, dirs, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
                return hv
            except RuntimeError as err:  # no batching rule for an op after the layer
                self.batched = False
                self.fallback = str(err).split("\n")[0]
        cols = [
            torch.autograd.grad(g1, d, e, retain_graph=True, allow_unused=True)[0] for e in dirs
        ]
        if cols[0] is None:
            return None
        return torch.stack(cols)
