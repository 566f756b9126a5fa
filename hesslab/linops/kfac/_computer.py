"""The factor computer: forward hooks on the Kronecker layers, one pass over the data.

Per batch, one forward pass with hooks records every layer's input x and adds a zero
perturbation δ to its output (z + δ), so that derivatives with respect to δ are
derivatives with respect to the layer's output. Then (see the package docstring for the
notation and :mod:`hesslab.linops.kfac._math` for the pure math):

* A terms from the inputs, Σ_j (1/P) Σ_t x̃ x̃ᵀ;
* Gauss-Newton B terms from vector-Jacobian products of the square-root columns s_k of
  the loss Hessian at the output, pulled back to every δ at once (c products per batch);
* on the first batch with ``curvature="exact"``, the decision which layers need the
  exact M: one random probe v, (G v) accumulated from the same products, against (H v)
  by double backward — one joint product over all layers, then one per suspect layer;
  a layer is flagged where ‖(H − G)v‖ > √eps·max(‖Hv‖, ‖Gv‖);
* for the flagged layers, M by exact Hessian-vector products with respect to δ
  (P·out products for "expand", out for "reduce").

The batch loop, casting, modes and collectives are the
:class:`~hesslab.linops._model.ModelData`'s.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hesslab.errors import HesslabError
from hesslab.linops._model import ModelData, all_reduce_sum_, global_count
from hesslab.linops.kfac import _math
from hesslab.linops.kfac._exact import ExactM
from hesslab.linops.kfac._layers import KronLayer, display
from hesslab.linops.kfac._loss import LossSpec, check_output

__all__ = ["FactorResult", "KFACComputer", "KronFactors", "SampleTerms"]

_log = logging.getLogger("hesslab.linops")


class KronFactors(NamedTuple):
    """The Kronecker factors of one layer: the block is ``torch.kron(B, A)``.

    Attributes:
        A: (in+1, in+1) (or (in, in) without bias), the input second moment E[x̃ x̃ᵀ].
        B: (out, out), the output Hessian E[M].
    """

    A: Tensor
    B: Tensor


class SampleTerms(NamedTuple):
    """Per-sample terms of one layer on one batch (see :meth:`KFAC.sample_terms`).

    Attributes:
        M: (n, P, out, out), the position-diagonal blocks M_j[t, t] of the per-sample
            output Hessians ("expand"), or (n, 1, out, out) holding Σ_{t,t'} M_j[t, t']
            ("reduce").
        X: (n, P, in+1) (or in without bias), the (augmented) inputs x̃_{j,t} ("expand"),
            or (n, 1, in+1) the mean patches ("reduce").
    """

    M: Tensor
    X: Tensor


class FactorResult(NamedTuple):
    """What one pass over the data gives: the factors and the decisions on the way.

    Attributes:
        A, B: Per layer, the symmetrised means over all N samples (and ranks).
        num_data: N.
        exact_layers: The layers whose M was computed exactly.
        ggn_fallback: ``{layer: reason}`` where the exact M could not be computed.
    """

    A: list[Tensor]
    B: list[Tensor]
    num_data: int
    exact_layers: list[str]
    ggn_fallback: dict[str, str]


class _Forward(NamedTuple):
    """One hooked forward pass: the output, the layers' inputs and output perturbations."""

    out: Tensor
    xs: list[Tensor]
    deltas: list[Tensor]


class _Probe:
    """The random probe v of the exact-vs-GGN decision, with G v accumulated per layer."""

    def __init__(self, deltas: list[Tensor], layers: list[int]):
        gen = torch.Generator(device="cpu").manual_seed(1234)
        self.v: dict[int, Tensor] = {}
        self.Gv: dict[int, Tensor] = {}  # G_ll v_l, the diagonal blocks
        self.Gv_joint: dict[int, Tensor] = {}  # (G v)_l over all layers jointly
        for l in layers:
            d = deltas[l]
            self.v[l] = torch.randn(d.shape, generator=gen, dtype=torch.float64).to(d)
            self.Gv[l] = torch.zeros_like(d)
            self.Gv_joint[l] = torch.zeros_like(d)

    def add(self, ls: list[int], grads: tuple[Tensor | None, ...], n: int) -> None:
        """Accumulate one square-root column's pullbacks g_l = J_lᵀ s_k."""
        coefs = {l: (g * self.v[l]).reshape(n, -1).sum(1) for l, g in zip(ls, grads) if g is not None}
        total = sum(coefs.values()) if coefs else None  # (n,): ⟨s_k, J v⟩ per sample
        for l, g in zip(ls, grads):
            if g is None:
                continue
            shape = (n, *([1] * (g.dim() - 1)))
            self.Gv[l] += g * coefs[l].reshape(shape)
            self.Gv_joint[l] += g * total.reshape(shape)


class KFACComputer:
    """Computes the Kronecker factors of a set of layers over a model's data.

    Args:
        md: The model/data base (eval mode, device and dtype set).
        layers: The candidate Kronecker layers (:meth:`probe` keeps those called once).
        loss: The recognised loss.
        curvature: ``"exact"`` or ``"ggn"``.
        kfac_approx: ``"expand"`` or ``"reduce"``.
    """

    def __init__(
        self, md: ModelData, layers: list[KronLayer], loss: LossSpec, *, curvature: str,
        kfac_approx: str,
    ):
        self.md = md
        self.layers = layers
        self.loss = loss
        self.curvature = curvature
        self.reduce = kfac_approx == "reduce"
        self.ggn_fallback: dict[str, str] = {}
        self._exact = ExactM()

    # ------------------------------------------------------------------ probing
    def probe(self, warn: dict[str, str]) -> dict[str, str]:
        """One forward pass on the first batch: keep the layers called exactly once.

        Args:
            warn: ``{name: reason}`` of layers already left out; extended here.

        Returns:
            ``{name: reason}`` of every skipped layer (warned about once).
        """
        calls = {lay.name: 0 for lay in self.layers}
        shapes: dict[str, tuple[int, ...]] = {}

        def make_hook(lay: KronLayer):
            def hook(module, args, kwargs, output):
                calls[lay.name] += 1
                if isinstance(output, Tensor):
                    shapes[lay.name] = tuple(output.shape)

            return hook

        _, inputs, targets, _ = self.md.first_batch()
        handles = [lay.module.register_forward_hook(make_hook(lay), with_kwargs=True) for lay in self.layers]
        try:
            with torch.no_grad(), self.md.model_mode():
                out = self.md.forward(self.md.tensors(), inputs, first=True)
        finally:
            for h in handles:
                h.remove()
        out = check_output(self.loss, self.md.loss_fn, self._logits(out), targets, first=True)
        self.md.check_differentiable(out, targets)
        kept = []
        for lay in self.layers:
            c = calls[lay.name]
            if c == 1:
                lay.out_shape = shapes[lay.name][1:]
                kept.append(lay)
            elif c == 0:
                warn[lay.name] = "not called as a module in the forward pass (e.g. used through F.linear)"
            else:
                warn[lay.name] = f"called {c} times per forward pass (weight sharing across calls)"
        if warn:
            listed = ", ".join(f"{display(k)!r} ({r})" for k, r in warn.items())
            warnings.warn(
                f"KFAC: skipped {len(warn)} layer(s) with parameters: {listed}. Their parameters are "
                "not part of the operator; compare with Hessian(..., params=K.param_names).",
                UserWarning,
                stacklevel=3,
            )
        if not kept:
            raise HesslabError(
                "layers: none of the selected Kronecker layers is called exactly once as a module in "
                "the model's forward pass; see the warning for each"
            )
        self.layers = kept
        return dict(warn)

    # ------------------------------------------------------------------ factors
    def compute(self) -> FactorResult:
        """One pass over the data: the factors A, B of every layer (and the decisions)."""
        dtype, device = self.md.dtype, self.md.device
        A = [torch.zeros(lay.in_aug, lay.in_aug, dtype=dtype, device=device) for lay in self.layers]
        B = [torch.zeros(lay.out_dim, lay.out_dim, dtype=dtype, device=device) for lay in self.layers]
        count = weight = 0  # samples (A's normaliser), loss terms (B's: tokens for a causal LM)
        flagged: set[str] | None = None if self.curvature == "exact" else set()
        self.ggn_fallback = {}
        tensors = self.md.tensors()
        start = time.perf_counter()
        for b, (_, inputs, targets, size) in enumerate(self.md.batches()):
            sums, n, flagged = self._batch_terms(inputs, targets, tensors, flagged, per_sample=False)
            if b == 0 and flagged:
                self._estimate(time.perf_counter() - start, flagged)
            if n != size and self.loss.kind != "causal_lm":
                raise HesslabError(
                    f"data: a batch has {size} targets but the model saw {n} samples; the first "
                    "dimensions of inputs, outputs and targets must be the batch"
                )
            for l, (a, b) in enumerate(sums):
                A[l] += a
                B[l] += b
            count += n
            weight += size
        for t in A + B:
            all_reduce_sum_(t)
        count, weight = global_count(count), global_count(weight)
        self.md.num_data = weight
        A = [(a + a.T) / (2 * count) for a in A]
        B = [(b + b.T) / (2 * weight) for b in B]
        exact = [lay.name for lay in self.layers if flagged and lay.name in flagged]
        self._warn_fallback()
        bad = [lay.name for lay, a, b in zip(self.layers, A, B)
               if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()))]
        if bad:
            raise HesslabError(
                f"model: the Kronecker factors of {', '.join(map(repr, bad))} hold NaN or Inf; check "
                "the data and parameters for NaN/Inf, or build in float64 (dtype=torch.float64)"
            )
        return FactorResult(A, B, weight, exact, dict(self.ggn_fallback))

    def _estimate(self, first: float, flagged: set[str]) -> None:
        """Log the first batch's time and the estimate for the whole pass (exact M only)."""
        batches = len(self.md.source)
        total = f"; about {first * batches:.0f} s for all {batches} batches" if batches > 1 else ""
        _log.info(
            "KFAC: exact M for %d layer(s) (%d Hessian-vector directions, %s) took %.1f s on the "
            "first batch%s. It costs P·C double-backward products per layer shared over P "
            "positions; curvature='ggn' (the Gauss-Newton M) takes a few products per batch.",
            len(flagged), self._exact.products,
            "batched" if self._exact.batched else "one at a time", first, total,
        )

    def _warn_fallback(self) -> None:
        if not self.ggn_fallback:
            return
        reason = next(iter(self.ggn_fallback.values()))
        warnings.warn(
            "KFAC: curvature='exact' needs second derivatives through the network, which autograd "
            f"cannot give after layer(s) {', '.join(repr(display(k)) for k in self.ggn_fallback)} "
            f"({reason}). Their B uses the Gauss-Newton M, exact only where the network after them "
            "is piecewise linear; pass curvature='ggn' to use it everywhere without this warning.",
            UserWarning,
            stacklevel=5,
        )

    def sample_terms(self, inputs: Any, targets: Tensor, exact_layers: list[str]) -> list[SampleTerms]:
        """Per layer the per-sample terms on one (cast) batch, exact M for ``exact_layers``."""
        flagged = set(exact_layers) if self.curvature == "exact" else set()
        terms, _, _ = self._batch_terms(inputs, targets, self.md.tensors(), flagged, per_sample=True)
        return terms

    # ------------------------------------------------------------------ one batch
    def _batch_terms(
        self, inputs: Any, targets: Tensor, tensors: dict[str, Tensor], flagged: set[str] | None,
        per_sample: bool,
    ) -> tuple[list[Any], int, set[str]]:
        """One batch's contribution to every layer's factors.

        Args:
            flagged: layers whose M is computed by exact Hessian-vector products; ``None``
                means "not decided yet": decide on this batch (``curvature="exact"``).
            per_sample: return :class:`SampleTerms` per layer instead of the sums.

        Returns:
            ``(terms, n, flagged)``: per layer ``(Σ_j (1/P) Σ_t x̃x̃ᵀ, Σ_j Σ_t M_j[t,t])`` or
            ``SampleTerms``; the batch size; the flagged layers.
        """
        fw = self._hooked_forward(inputs, targets, tensors)
        n = fw.out.shape[0]
        rows = [self._input_rows(l, x) for l, x in enumerate(fw.xs)]  # (n, P, in+1) each
        deciding = flagged is None
        ggn = [l for l, lay in enumerate(self.layers) if deciding or lay.name not in flagged]
        probe = _Probe(fw.deltas, ggn) if deciding else None
        M = self._ggn_terms(fw, targets, ggn, per_sample, probe)
        first: tuple[Tensor | None, ...] = (None,) * len(self.layers)
        if deciding or flagged:
            first = self._first_derivatives(fw, targets, deciding)
        if deciding:
            flagged = self._decide(fw, first, ggn, probe)
        bar = self._exact_bar(fw, flagged)
        for l, lay in enumerate(self.layers):
            if lay.name in flagged:
                M_l = self._exact_M(l, fw.deltas[l], first[l], bar)  # (n, P or 1, out, out)
                M[l] = M_l if per_sample else M_l.sum(dim=(0, 1))
        if bar is not None:
            bar.close()
        terms: list[Any] = []
        for l, lay in enumerate(self.layers):
            if per_sample:
                shape = (n, rows[l].shape[1], lay.out_dim, lay.out_dim)
                terms.append(SampleTerms(M=self._or_zeros(M[l], shape), X=rows[l]))
            else:
                terms.append((_math.input_term(rows[l]), self._or_zeros(M[l], (lay.out_dim, lay.out_dim))))
        return terms, n, flagged

    def _exact_bar(self, fw: _Forward, flagged: set[str]) -> Any:
        """A tqdm bar over this batch's exact-M directions (None when there are few)."""
        total = sum(
            self._exact.directions(_math.RULES[lay.kind].output_rows(fw.deltas[l]).shape, self.reduce)
            for l, lay in enumerate(self.layers) if lay.name in flagged
        )
        if total < 256:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="KFAC exact M", unit="hvp", leave=False, disable=None)

    def _or_zeros(self, t: Tensor | None, shape: tuple[int, ...]) -> Tensor:
        return t if t is not None else torch.zeros(shape, dtype=self.md.dtype, device=self.md.device)

    def _hooked_forward(self, inputs: Any, targets: Tensor, tensors: dict[str, Tensor]) -> _Forward:
        """The forward pass with every layer's input recorded and a zero δ added to its output."""
        xs: dict[str, Tensor] = {}
        deltas: dict[str, Tensor] = {}

        def make_hook(lay: KronLayer):
            def hook(module, args, kwargs, output):
                x = args[0] if args else next(iter(kwargs.values()))
                xs[lay.name] = x.detach()
                delta = torch.zeros_like(output, requires_grad=True)
                deltas[lay.name] = delta
                return output + delta

            return hook

        handles = [lay.module.register_forward_hook(make_hook(lay), with_kwargs=True) for lay in self.layers]
        try:
            with torch.enable_grad(), self.md.model_mode():
                out = self.md.forward(tensors, inputs)
        finally:
            for h in handles:
                h.remove()
        out = check_output(self.loss, self.md.loss_fn, self._logits(out), targets)
        missing = [lay.name for lay in self.layers if lay.name not in deltas]
        if missing:
            raise HesslabError(
                f"model: layer(s) {missing} were not called on this batch; KFAC needs a fixed forward graph"
            )
        return _Forward(out, [xs[lay.name] for lay in self.layers], [deltas[lay.name] for lay in self.layers])

    def _logits(self, out: Any) -> Any:
        """The tensor the loss is a function of (a causal LM's logits), else the output."""
        return self.md.logits(out) if self.loss.kind == "causal_lm" else out

    def _loss_sum(self, out: Tensor, targets: Tensor) -> Tensor:
        """Σ of the batch's loss terms: the mean times n samples, or times its tokens."""
        weight = self.md.head.count(None, targets) if self.loss.kind == "causal_lm" else None
        return self.md.loss(out, targets) * (out.shape[0] if weight is None else weight)

    def _input_rows(self, l: int, x: Tensor) -> Tensor:
        """The (augmented, for "reduce" averaged) input rows of layer l; (n, P or 1, in+1)."""
        lay = self.layers[l]
        rows = _math.RULES[lay.kind].input_rows(lay.module, x.to(self.md.dtype))  # (n, P, in)
        lay.positions = rows.shape[1]
        return _math.augment(rows, lay.bias, self.reduce)

    def _ggn_terms(
        self, fw: _Forward, targets: Tensor, ggn: list[int], per_sample: bool, probe: _Probe | None
    ) -> list[Tensor | None]:
        """Gauss-Newton B terms (or per-sample M) of the layers ``ggn``; None elsewhere."""
        M: list[Tensor | None] = [None] * len(self.layers)
        if not ggn:
            return M
        S = _math.sqrt_columns(self.loss.kind, fw.out, targets)  # (K, n, *out)
        n = fw.out.shape[0]
        for grads in self._exact.pullbacks(fw.out, [fw.deltas[l] for l in ggn], S):
            if probe is not None:
                probe.add(ggn, grads, n)
            for l, g in zip(ggn, grads):
                if g is None:
                    continue
                s = _math.RULES[self.layers[l].kind].output_rows(g)  # (n, P, out)
                if self.reduce:
                    s = s.sum(dim=1, keepdim=True)  # Σ_t: the sum over positions
                term = _math.sample_outer(s) if per_sample else _math.output_term(s)
                M[l] = term if M[l] is None else M[l] + term
        return M

    def _first_derivatives(self, fw: _Forward, targets: Tensor, deciding: bool) -> tuple[Tensor | None, ...]:
        """∂(Σ_j ℓ_j)/∂δ_l for every layer, with the graph kept for second derivatives."""
        n = fw.out.shape[0]
        loss_sum = self._loss_sum(fw.out, targets)  # Σ_j ℓ_j
        try:
            return torch.autograd.grad(loss_sum, fw.deltas, create_graph=True, allow_unused=True)
        except RuntimeError as err:
            if not deciding:
                raise
            for lay in self.layers:
                self.ggn_fallback[lay.name] = str(err).split("\n")[0]
            return (None,) * len(self.layers)

    def _decide(
        self, fw: _Forward, first: tuple[Tensor | None, ...], ggn: list[int], probe: _Probe
    ) -> set[str]:
        """The layers whose output Hessian has a non-Gauss-Newton part, from one probe."""
        tol = math.sqrt(torch.finfo(self.md.dtype).eps)

        def differs(hv: Tensor | None, gv: Tensor) -> bool:
            hv = torch.zeros_like(gv) if hv is None else hv
            return float((hv - gv).norm()) > tol * max(float(hv.norm()), float(gv.norm()))

        # One joint product H v over all layers first: where (H − G)v vanishes in a
        # layer's block (always, for piecewise-linear networks) nothing is flagged there.
        usable = [l for l in ggn if first[l] is not None and first[l].requires_grad]
        suspects = usable
        if usable:
            try:
                joint = torch.autograd.grad(
                    [first[l] for l in usable], [fw.deltas[l] for l in usable],
                    [probe.v[l] for l in usable], retain_graph=True, allow_unused=True,
                )
                suspects = [l for l, hv in zip(usable, joint) if differs(hv, probe.Gv_joint[l])]
            except RuntimeError:
                suspects = usable  # find the layers affected one by one below
        flagged: set[str] = set()
        for l in suspects:
            try:
                (hv,) = torch.autograd.grad(
                    first[l], fw.deltas[l], probe.v[l], retain_graph=True, allow_unused=True
                )
            except RuntimeError as err:  # an op without a second derivative after this layer
                self.ggn_fallback[self.layers[l].name] = str(err).split("\n")[0]
                continue
            if differs(hv, probe.Gv[l]):
                flagged.add(self.layers[l].name)
        return flagged

    def _exact_M(self, l: int, d: Tensor, g1: Tensor | None, bar: Any = None) -> Tensor:
        """Exact per-sample M of layer l (see :mod:`hesslab.linops.kfac._exact`).

        Returns:
            (n, P, C, C) ("expand") or (n, 1, C, C) ("reduce"), symmetrised.
        """
        rule = _math.RULES[self.layers[l].kind]
        return self._exact.compute(g1, d, rule, self.reduce, self.md.dtype, bar)
