"""The Hessian and the generalized Gauss-Newton matrix of a model's loss.

Both are :class:`~hesslab.linops._curvature.CurvatureOperator` subclasses that define one
batch's block product, through torch.func (``_func_product``) and through an autograd
graph that can be kept (``_build_state`` / ``_apply_state``); see
:mod:`hesslab.linops._curvature` for the notation and the product paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hesslab.errors import HesslabError
from hesslab.linops._compiled import reverse_hvp
from hesslab.linops._curvature import CurvatureOperator, _State
from hesslab.linops._fdcheck import ggn_difference, hessian_difference
from hesslab.linops._lmloss import LossHead, apply_cross_entropy

__all__ = ["Hessian", "GGN"]

_CURVATURES = ("auto", "analytic", "autograd")
#: "auto" takes the closed form from this many logits per batch (large vocabularies). Below
#: it the double backward is as cheap, and H − GGN stays exactly zero where the two
#: coincide (the same ops in both), which rank analyses (hesslab.rank_report) rely on.
_CLOSED_FORM_MIN = 1 << 16


def _jvp_with_targets(
    fn: Callable[[Any, Tensor], Any], primal: Any, tangent: Any, targets: Tensor
) -> Any:
    """The jvp of ``x -> fn(x, targets)`` at ``primal`` in direction ``tangent``.

    Floating targets get an explicit zero tangent: without one, forward-mode AD through
    the backward of some losses (``mse_loss``) writes into an immutable ZeroTensor
    (torch 2.x: "ZeroTensors are immutable").
    """
    if targets.is_floating_point():
        return torch.func.jvp(fn, (primal, targets), (tangent, torch.zeros_like(targets)))[1]
    return torch.func.jvp(lambda x: fn(x, targets), (primal,), (tangent,))[1]


class Hessian(CurvatureOperator):
    """The Hessian H = ∇²L(θ) of the sample-mean loss over all of the data.

    H = (1/N) Σ_k n_k ∇²_θ L_k with L_k the mean loss of batch k (see the module
    docstring for the notation). Products are exact; b columns share one pass over the
    data. See :class:`CurvatureOperator` for the arguments. On an FSDP2-sharded model
    (``fully_shard``, under torchrun) it acts on this rank's local shards by finite
    differences, ``shards`` giving the layout (:mod:`hesslab.linops._sharded`).

    Example:
        >>> H = Hessian(model, nn.CrossEntropyLoss(), (X, y), dtype=torch.float64)
        >>> Hv = H @ v              # (n,) -> (n,)
        >>> HV = H @ V              # (n, b) -> (n, b), one data pass
        >>> H_block = Hessian(model, loss_fn, loader, params="fc2.*")
    """

    _difference = staticmethod(hessian_difference)
    finite_difference_supported = True  # method="finite_difference" (_finite_difference)
    _compiled_form = reverse_hvp  # compile=: reverse-over-reverse (_compiled)

    def _func_product(self, selected, others, inputs, targets, Vs):
        def loss_of(p: dict[str, Tensor], t: Tensor) -> Tensor:
            return self._loss(self._forward({**others, **p}, inputs), t)

        grad_fn = torch.func.grad(loss_of)  # ∇_θ L_k, argnums=0

        def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
            return _jvp_with_targets(grad_fn, selected, v, targets)

        V_dict = dict(zip(self.param_names, Vs))  # {name: (b, *s)}
        randomness = "same" if self.train_mode else "error"
        return torch.func.vmap(hvp, randomness=randomness)(V_dict)

    def _build_state(self, selected, others, inputs, targets):
        leaves = self._leaves(selected)
        out = self._forward({**others, **dict(zip(self.param_names, leaves))}, inputs)
        loss = self._loss(out, targets)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        return _State(leaves=leaves, tensors={"grads": grads}, loss=loss.detach())

    def _apply_state(self, state, Vs):
        grads = state.tensors["grads"]
        b = Vs[0].shape[0]
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not used:
            return self._zeros(b)
        # H V = ∂/∂θ ⟨g(θ), V⟩, for all b columns at once
        out = self._batched_grad([grads[i] for i in used], state.leaves, [Vs[i] for i in used])
        zeros = self._zeros(b)
        return [zeros[i] if o is None else o.detach() for i, o in enumerate(out)]


class GGN(CurvatureOperator):
    """The generalized Gauss-Newton matrix G = (1/N) Σ_k n_k J_kᵀ (∇²_z L_k) J_k.

    The outer-product part H_O of the Hessian (Singh et al.): exact for any loss of the
    outputs, e.g. cross-entropy and MSE; positive semi-definite when the loss is convex
    in the outputs. ``Hessian(...) - GGN(...)`` is the functional part H_F.
    Products: J V by forward mode (``jvp``), the loss Hessian on the outputs, Jᵀ by
    ``vjp``, each batched over the b columns (the autograd path obtains J V by
    differentiating Jᵀu with respect to u). The model must return one tensor (or, with
    ``loss_fn=None``, be a causal LM: z are its logits). See :class:`CurvatureOperator`
    for the other arguments.

    The output-space curvature ∇²_z L_k (``output_curvature=``): for large outputs
    (from 2¹⁶ logits per batch, e.g. a language model's vocabulary) and cross-entropy
    (``nn.CrossEntropyLoss``/``F.cross_entropy`` on (n, c) logits with class indices, and
    a causal LM's token loss with ``loss_fn=None``) it is applied in closed form, per
    token w (p∘u − p (pᵀu)) with p = softmax(z) and w = 1/(number of predicted tokens)
    (0 for ignored ones), see :mod:`hesslab.linops._lmloss`; otherwise by
    forward-over-reverse / double backward through the loss. The closed form keeps one
    (B, T, V) softmax instead of the graph of a double backward through log-softmax,
    whose memory grows with batch × tokens × vocabulary (benchmarks/bench_lm_ggn.py).

    ``method="auto"`` takes torch.func when the closed form applies to the first batch
    (eval mode), the lean path for large vocabularies, falling back on autograd once
    (noted in ``notes``) for a model torch.func cannot run; autograd otherwise.

    Args:
        output_curvature: ``"auto"`` (closed form where the loss is recognised and the
            logits are large), ``"analytic"`` (closed form whenever the loss is
            recognised; raise otherwise) or ``"autograd"`` (always the double backward).
    """

    _difference = staticmethod(ggn_difference)

    def __init__(self, model: Any, loss_fn: Any, data: Any, params: Any = None, *,
                 output_curvature: str = "auto", **kwargs: Any):
        if output_curvature not in _CURVATURES:
            raise HesslabError(
                f"output_curvature: expected one of {_CURVATURES}, got {output_curvature!r}"
            )
        self._curv_mode = output_curvature
        self._first_numel: int | None = None
        self._auto_func = False
        auto = kwargs.get("method", "auto") == "auto"
        super().__init__(model, loss_fn, data, params, **kwargs)
        # The rule for method="auto": with the closed form (large outputs), torch.func
        # (forward-mode J V, one vjp) keeps ~1.3x a gradient's memory against 2x for the
        # kept autograd graph (benchmarks/bench_lm_ggn.py); otherwise autograd.
        self._auto_func = (
            auto and not self.train_mode and kwargs.get("reuse_graph", "auto") is not True
            and self._md.head.recognises_cross_entropy() and self._large()
            and self.compiled is None
        )
        if self._auto_func:
            self._path, self._reuse, self._state = "func", False, None

    def _large(self) -> bool:
        """The first batch's logits hold at least ``_CLOSED_FORM_MIN`` entries."""
        return self._curv_mode == "analytic" or (self._first_numel or 0) >= _CLOSED_FORM_MIN

    def _batch_product(self, inputs, targets, Vs, reuse):
        try:
            return super()._batch_product(inputs, targets, Vs, reuse)
        except RuntimeError as err:  # a model torch.func cannot run: autograd, once, noted
            if not (self._auto_func and self._path == "func"):
                raise
            self._path = "autograd"
            self.notes.append(f"GGN: torch.func failed ({str(err).splitlines()[0]}); autograd used")
            return super()._batch_product(inputs, targets, Vs, reuse)

    def _closed_form(self, z: Tensor, targets: Tensor) -> tuple[Tensor, Tensor] | None:
        """(p, w) of the closed-form cross-entropy curvature, or None (double backward)."""
        if self._curv_mode == "autograd" or not (self._large() or z.numel() >= _CLOSED_FORM_MIN):
            return None
        pw = self._md.head.cross_entropy(z, targets)
        if pw is None and self._curv_mode == "analytic":
            raise HesslabError(
                "output_curvature: 'analytic' needs a cross-entropy loss that it recognises "
                "(nn.CrossEntropyLoss()/F.cross_entropy on (n, c) logits with class indices, or "
                "loss_fn=None with a causal LM); use 'auto'"
            )
        return pw

    def _func_product(self, selected, others, inputs, targets, Vs):
        def f(p: dict[str, Tensor]) -> Tensor:
            return self._check_output(self._forward({**others, **p}, inputs))

        randomness = "same" if self.train_mode else "error"
        out, vjp_fn = torch.func.vjp(f, selected)  # out: (*z)
        V_dict = dict(zip(self.param_names, Vs))
        def jvp_f(v: dict[str, Tensor]) -> Tensor:
            return torch.func.jvp(f, (selected,), (v,))[1]

        JV = torch.func.vmap(jvp_f, randomness=randomness)(V_dict)  # (b, *z)
        z = out.detach()
        del out  # with the closed form only p = softmax(z) is kept: (B, T, V) floats count
        pw = self._closed_form(z, targets)
        if pw is not None:
            del z
            HJV = apply_cross_entropy(pw, JV)
            del JV, pw
        else:
            grad_z = torch.func.grad(self._loss)  # ∇_z L_k(z, targets)
            HJV = torch.func.vmap(lambda u: _jvp_with_targets(grad_z, z, u, targets))(JV)
        return torch.func.vmap(vjp_fn)(HJV)[0]

    def _check_output(self, out: Any) -> Tensor:
        z = self._md.logits(out)  # one tensor, or a causal LM's logits
        if self._first_numel is None:
            self._first_numel = int(z.numel())
        return z

    def _build_state(self, selected, others, inputs, targets):
        leaves = self._leaves(selected)
        out = self._check_output(
            self._forward({**others, **dict(zip(self.param_names, leaves))}, inputs)
        )
        pw = self._closed_form(out.detach(), targets)
        tensors: dict[str, Any] = {"out": out, "pw": pw}
        if pw is None:
            z = out.detach().requires_grad_(True)
            loss = self._loss(z, targets)
            (grad_z,) = torch.autograd.grad(loss, z, create_graph=True)
            tensors.update(z=z, grad_z=grad_z)
        else:
            with torch.no_grad():
                loss = self._loss(out.detach(), targets)
        if out.requires_grad:
            u = torch.zeros_like(out, requires_grad=True)
            # Jᵀu, linear in u: its derivative with respect to u in direction V is J V
            jtu = torch.autograd.grad(out, leaves, u, create_graph=True, allow_unused=True)
            tensors.update(u=u, jtu=jtu)
        return _State(leaves=leaves, tensors=tensors, loss=loss.detach())

    def _apply_state(self, state, Vs):
        t = state.tensors
        b = Vs[0].shape[0]
        if "u" not in t:
            return self._zeros(b)
        used = [i for i, g in enumerate(t["jtu"]) if g is not None and g.requires_grad]
        if not used:
            return self._zeros(b)
        (JV,) = self._batched_grad([t["jtu"][i] for i in used], [t["u"]], [Vs[i] for i in used])
        if JV is None:
            return self._zeros(b)
        if t["pw"] is not None:
            HJV = apply_cross_entropy(t["pw"], JV)  # (b, *z), closed form
            del JV
        else:
            if not t["grad_z"].requires_grad:
                return self._zeros(b)
            (HJV,) = self._batched_grad([t["grad_z"]], [t["z"]], [JV])  # (b, *z)
            if HJV is None:
                return self._zeros(b)
        out = self._batched_grad([t["out"]], state.leaves, [HJV])
        zeros = self._zeros(b)
        return [zeros[i] if o is None else o.detach() for i, o in enumerate(out)]
