"""Pure math of the Kronecker factors: per-layer-type views and per-batch factor terms.

No hooks, no model, no state: functions of tensors a forward pass produced (see
:mod:`hesslab.linops.kfac._computer` for who calls them and the package docstring for
the notation: x̃ the augmented input, M the output Hessian, P the positions).

Per layer type, a :class:`LayerRule` says how the layer's input and output become rows
of positions, (n, P, in) and (n, P, out). To support a new layer type, add its rule to
:data:`RULES` (and its class to the selection in :mod:`hesslab.linops.kfac._layers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LayerRule",
    "RULES",
    "augment",
    "input_term",
    "output_term",
    "sample_outer",
    "sqrt_columns",
]


class LayerRule(NamedTuple):
    """How one layer type's input and output become rows of positions.

    Attributes:
        input_rows: ``(module, x) -> (n, P, in)``, the input patches x (without the 1).
        output_rows: ``(g) -> (n, P, out)`` for an output-shaped g (n, *z).
        rows_to_output: ``(rows, shape) -> (n, *z)``, the inverse of ``output_rows``.
    """

    input_rows: Callable[[nn.Module, Tensor], Tensor]
    output_rows: Callable[[Tensor], Tensor]
    rows_to_output: Callable[[Tensor, torch.Size], Tensor]


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _linear_rows(module: nn.Module, x: Tensor) -> Tensor:
    """(n, *, in) -> (n, P, in): the extra leading dimensions are the positions."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _conv2d_rows(module: nn.Module, x: Tensor) -> Tensor:
    """(n, C_in, H, W) -> (n, P, C_in·kh·kw): the unfolded patches, padding applied."""
    m = module
    if isinstance(m.padding, str) or any(p != 0 for p in _pair(m.padding)):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=0, stride=m.stride)  # (n, K, P)
    return cols.transpose(1, 2)


def _linear_out_rows(g: Tensor) -> Tensor:
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _conv2d_out_rows(g: Tensor) -> Tensor:
    return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)  # (n, C, H·W) -> (n, P, C)


def _linear_to_output(r: Tensor, shape: torch.Size) -> Tensor:
    return r.reshape(shape)


def _conv2d_to_output(r: Tensor, shape: torch.Size) -> Tensor:
    return r.transpose(1, 2).reshape(shape)


#: The supported layer types by kind. ``conv1d`` is transformers' ``Conv1D`` (GPT-2): a
#: linear layer z = x W + b with its weight stored transposed, (in, out); its rows are a
#: Linear's, (n, *, in) -> (n, P, in) with the tokens as positions (the weight layout is
#: :func:`hesslab.linops.kfac._layers.layer_perm`'s business).
RULES: dict[str, LayerRule] = {
    "linear": LayerRule(_linear_rows, _linear_out_rows, _linear_to_output),
    "conv1d": LayerRule(_linear_rows, _linear_out_rows, _linear_to_output),
    "conv2d": LayerRule(_conv2d_rows, _conv2d_out_rows, _conv2d_to_output),
}


def augment(rows: Tensor, bias: bool, reduce: bool) -> Tensor:
    """x̃ = [x; 1] per position (with a bias), and the mean patch over positions ("reduce").

    Args:
        rows: (n, P, in).

    Returns:
        (n, P, in + bias), or (n, 1, in + bias) for ``reduce``.
    """
    if bias:
        rows = torch.cat([rows, torch.ones_like(rows[..., :1])], dim=-1)
    if reduce:
        rows = rows.mean(dim=1, keepdim=True)  # the mean patch x̄_j (bias entry 1)
    return rows


def input_term(rows: Tensor) -> Tensor:
    """Σ_j (1/P) Σ_t x̃_{j,t} x̃_{j,t}ᵀ of a batch from rows (n, P, i); shape (i, i)."""
    flat = rows.reshape(-1, rows.shape[-1])
    return flat.T @ flat / rows.shape[1]


def output_term(s: Tensor) -> Tensor:
    """Σ_j Σ_t s_{j,t} s_{j,t}ᵀ from one square-root column's rows s (n, P, o); (o, o)."""
    flat = s.reshape(-1, s.shape[-1])
    return flat.T @ flat


def sample_outer(s: Tensor) -> Tensor:
    """Per sample and position s_{j,t} s_{j,t}ᵀ from s (n, P, o); shape (n, P, o, o)."""
    return torch.einsum("npo,npq->npoq", s, s)


def sqrt_columns(kind: str, out: Tensor, targets: Tensor) -> Tensor:
    """Columns s_k of a square root of each sample's output Hessian: Σ_k s_k s_kᵀ = ∇²_out ℓ_j.

    Cross-entropy: s_k = √(w p_k) (e_k − p) with p = softmax(out) and w the targets' mass
    (1 for class indices); MSE (mean over the D entries of a sample): √(2/D) e_k; a causal
    LM ("causal_lm", out (B, T, V)): per token the cross-entropy's, w = 1 for a predicted
    token and 0 for an ignored one (ℓ_j = Σ_t ℓ_{j,t}, the sum over the sequence's tokens).

    Args:
        kind: ``"cross_entropy"`` or ``"mse"``.
        out: (n, c) logits or (n, *) regression outputs.
        targets: The batch's targets (probability targets weight cross-entropy by mass).

    Returns:
        (K, n, *out) with K = c (cross-entropy), V (causal LM) or D = numel per sample (MSE).
    """
    n = out.shape[0]
    if kind == "causal_lm":  # out (B, T, V); targets the unshifted labels (B, T)
        from hesslab.linops._lmloss import IGNORE_INDEX, shifted_labels

        p = torch.softmax(out.detach(), dim=-1)  # (B, T, V)
        w = (shifted_labels(targets) != IGNORE_INDEX).to(p.dtype)[..., None]  # (B, T, 1)
        sp = (p * w).sqrt()
        V = p.shape[-1]
        eye = torch.eye(V, dtype=p.dtype, device=p.device)
        # s_k[b, t] = √(w p_k) (e_k − p): (V, B, T, V)
        return sp.permute(2, 0, 1)[..., None] * (eye[:, None, None, :] - p[None])
    if kind == "cross_entropy":
        p = torch.softmax(out.detach(), dim=1)  # (n, c)
        c = p.shape[1]
        w = targets.sum(1, keepdim=True) if targets.is_floating_point() else torch.ones_like(p[:, :1])
        sp = (p * w).sqrt()  # (n, c)
        eye = torch.eye(c, dtype=p.dtype, device=p.device)
        return sp.T[:, :, None] * (eye[:, None, :] - p[None, :, :])  # (c, n, c)
    D = out[0].numel()
    eye = torch.eye(D, dtype=out.dtype, device=out.device) * math.sqrt(2.0 / D)
    return eye[:, None, :].expand(D, n, D).reshape(D, n, *out.shape[1:])
