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
from hesslab.linops._curvature import CurvatureOperator, _State
from hesslab.linops._fdcheck import ggn_difference, hessian_difference

__all__ = ["Hessian", "GGN"]


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
    data. See :class:`CurvatureOperator` for the arguments.

    Example:
        >>> H = Hessian(model, nn.CrossEntropyLoss(), (X, y), dtype=torch.float64)
        >>> Hv = H @ v              # (n,) -> (n,)
        >>> HV = H @ V              # (n, b) -> (n, b), one data pass
        >>> H_block = Hessian(model, loss_fn, loader, params="fc2.*")
    """

    _difference = staticmethod(hessian_difference)
    finite_difference_supported = True  # method="finite_difference" (_finite_difference)

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
    Products: J V by forward mode (``jvp``), the loss Hessian on the outputs by
    forward-over-reverse, Jᵀ by ``vjp``, each batched over the b columns (the autograd
    path obtains J V by differentiating Jᵀu with respect to u). The model must return
    one tensor. See :class:`CurvatureOperator` for the arguments.
    """

    _difference = staticmethod(ggn_difference)

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
        grad_z = torch.func.grad(self._loss)  # ∇_z L_k(z, targets)
        HJV = torch.func.vmap(lambda u: _jvp_with_targets(grad_z, z, u, targets))(JV)  # (b, *z)
        return torch.func.vmap(vjp_fn)(HJV)[0]

    def _check_output(self, out: Any) -> Tensor:
        if not isinstance(out, Tensor):
            raise HesslabError(
                f"model: the GGN needs a model returning one tensor, got {type(out).__name__}"
            )
        return out

    def _build_state(self, selected, others, inputs, targets):
        leaves = self._leaves(selected)
        out = self._check_output(
            self._forward({**others, **dict(zip(self.param_names, leaves))}, inputs)
        )
        z = out.detach().requires_grad_(True)
        loss = self._loss(z, targets)
        (grad_z,) = torch.autograd.grad(loss, z, create_graph=True)
        tensors: dict[str, Any] = {"out": out, "z": z, "grad_z": grad_z}
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
        if JV is None or not t["grad_z"].requires_grad:
            return self._zeros(b)
        (HJV,) = self._batched_grad([t["grad_z"]], [t["z"]], [JV])  # (b, *z)
        if HJV is None:
            return self._zeros(b)
        out = self._batched_grad([t["out"]], state.leaves, [HJV])
        zeros = self._zeros(b)
        return [zeros[i] if o is None else o.detach() for i, o in enumerate(out)]
