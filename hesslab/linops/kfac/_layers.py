"""Which modules are Kronecker layers, and the layout of their parameters.

A Kronecker layer is an ``nn.Linear``, an ``nn.Conv2d`` with ``groups=1`` or a
transformers ``Conv1D`` (GPT-2's linear layer with a transposed weight), owning a weight
and optionally a bias and nothing else, sharing no parameter with another module (tied
weights, e.g. GPT-2's ``lm_head.weight`` = ``transformer.wte.weight``, are skipped with a
warning that names both). Its augmented weight W̃ = [W | b] has shape (out, in + 1)
(in = C_in·kh·kw for a convolution), flattened row-major in the Kronecker layout; the
model layout holds the weight (out·in entries) then the bias (out entries).
:func:`layer_perm` maps one to the other.

Vec order of ``Conv1D``: its weight is stored (in, out) and computes z = x W + b, so
W = weightᵀ is the (out, in) matrix of the other layers; the model layout flattens the
STORED weight row-major, entry (s, r) (input s, output r) at s·out + r, while the
Kronecker layout holds W̃[r, s] at r·(in+1) + s as for every layer (``transposed=True``
in :func:`layer_perm`). The factors are A over the ``in`` inputs, B over the ``out``
outputs, the block B ⊗ A.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from hesslab.errors import HesslabError

__all__ = ["KronLayer", "LayerSpec", "display", "is_conv1d", "kronecker_layer_sizes", "layer_perm", "resolve_layers"]

LayerSpec = Union[None, str, nn.Module, Iterable[Union[str, nn.Module]]]

_SUPPORTED = (nn.Linear, nn.Conv2d)
_NAMES = "nn.Linear, nn.Conv2d (groups=1) and transformers' Conv1D"


def is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), recognised without importing transformers."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


_GLOB_CHARS = set("*?[")


def kronecker_layer_sizes(model: nn.Module) -> dict[str, int]:
    """``{module name: parameters}`` of the modules of a type KFAC factors (nn.Linear,
    nn.Conv2d, transformers' Conv1D), in module order; whether each one is used (tied
    weights, groups, calls per forward) is decided when ``KFAC`` runs."""
    return {n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in model.named_modules()
            if isinstance(m, _SUPPORTED) or is_conv1d(m)}


@dataclass
class KronLayer:
    """Bookkeeping of one Kronecker layer.

    Attributes:
        name, module: The module and its name in the model.
        kind: The key of its rule in :data:`hesslab.linops.kfac._math.RULES`.
        out_dim, in_dim: The weight as a matrix (out, in), without the bias column.
        bias: Whether the layer has a bias (the last column of W̃).
        param_names: ``[weight, bias]`` names in the model.
        offset, numel: Its entries in the operator's flat (model-layout) vectors.
        positions: P seen on the last batch (informational).
        out_shape: The per-sample output shape seen on the first batch.
        transposed: The weight is stored (in, out) (``Conv1D``).
    """

    name: str
    module: nn.Module
    kind: str
    out_dim: int
    in_dim: int
    bias: bool
    param_names: list[str]
    offset: int = 0
    numel: int = 0
    positions: int = 1
    out_shape: tuple[int, ...] = ()
    transposed: bool = False

    @property
    def in_aug(self) -> int:
        """in + 1 with a bias, else in."""
        return self.in_dim + int(self.bias)

    @property
    def slice(self) -> slice:
        """The layer's entries in the operator's flat vectors."""
        return slice(self.offset, self.offset + self.numel)


def display(name: str) -> str:
    """A module name for messages (the root module has the empty name)."""
    return name if name else "<root>"


def layer_perm(out_dim: int, in_dim: int, bias: bool, transposed: bool = False) -> Tensor:
    """Kronecker position r·(in+1) + s -> position in the layer's [weight, bias] layout; (numel,).

    ``transposed``: the weight is stored (in, out) (``Conv1D``), entry (s, r) at s·out + r.
    """
    r = torch.arange(out_dim)[:, None]
    s = torch.arange(in_dim)[None, :]
    idx = s * out_dim + r if transposed else r * in_dim + s  # (out, in): weight entries
    if bias:
        idx = torch.cat([idx, out_dim * in_dim + r], dim=1)  # bias as the last column
    return idx.reshape(-1)


def resolve_layers(model: nn.Module, layers: LayerSpec) -> tuple[list[KronLayer], dict[str, str]]:
    """The candidate Kronecker layers, and the unsupported ones to warn about.

    Args:
        model: The network.
        layers: ``None`` (every module owning a parameter that requires grad), a module
            name (a container selects the layers inside it), a glob over module names,
            an ``nn.Module`` of the model, or a list of these.

    Returns:
        ``(layers, warn)``: the Kronecker layers in module order, and ``{name: reason}``
        of the selected modules that cannot be Kronecker layers.

    Raises:
        HesslabError: ``layers`` matches nothing, names an unsupported module
            explicitly, or selects no supported layer.
    """
    modules = dict(model.named_modules())
    owners = {n: m for n, m in modules.items() if any(True for _ in m.parameters(recurse=False))}
    counts: dict[int, list[str]] = {}  # parameter -> every name it has (tied: several)
    for mn, m in modules.items():
        for pn, p in m.named_parameters(recurse=False):
            counts.setdefault(id(p), []).append(f"{mn}.{pn}" if mn else pn)
    if layers is None:
        explicit: set[str] = set()
        chosen = [
            n for n, m in owners.items() if any(p.requires_grad for p in m.parameters(recurse=False))
        ]
    else:
        chosen, explicit = _select(modules, owners, layers)
    out: list[KronLayer] = []
    warn: dict[str, str] = {}
    for name in chosen:
        m = owners[name]
        reason = _unsupported(m, counts)
        if reason is not None:
            if name in explicit:
                raise HesslabError(
                    f"layers: {display(name)!r} ({reason}) cannot be a KFAC layer; KFAC supports "
                    f"{_NAMES}. Use layer_hessian() for its exact block."
                )
            warn[name] = reason
            continue
        prefix = name + "." if name else ""
        t = is_conv1d(m)
        out.append(KronLayer(
            name=name, module=m,
            kind="conv1d" if t else "linear" if isinstance(m, nn.Linear) else "conv2d",
            out_dim=m.weight.shape[1] if t else m.weight.shape[0],
            in_dim=m.weight.shape[0] if t else int(m.weight[0].numel()), bias=m.bias is not None,
            param_names=[prefix + "weight"] + ([prefix + "bias"] if m.bias is not None else []),
            transposed=t,
        ))
    if not out:
        listed = ", ".join(f"{display(k)} ({r})" for k, r in warn.items())
        raise HesslabError(
            f"layers: no supported layer selected (KFAC handles {_NAMES}); "
            + (f"unsupported: {listed}" if warn else "the model has no layer with trainable parameters")
        )
    return out, warn


def _unsupported(m: nn.Module, counts: dict[int, list[str]]) -> str | None:
    """Why ``m`` cannot be a Kronecker layer, or None."""
    if not (isinstance(m, _SUPPORTED) or is_conv1d(m)):
        return f"{type(m).__name__}: no Kronecker-factored form"
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        return f"Conv2d with groups={m.groups}: not supported"
    if set(dict(m.named_parameters(recurse=False))) - {"weight", "bias"}:
        return f"{type(m).__name__} with extra parameters"
    for p in m.parameters(recurse=False):
        names = counts[id(p)]
        if len(names) > 1:
            return (
                f"tied weights: {' = '.join(names)} is one parameter used by several modules; its "
                f"Hessian block is that of {names[0]!r} (select it with Hessian(params=...))"
            )
    return None


def _select(
    modules: dict[str, nn.Module], owners: dict[str, nn.Module], layers: Any
) -> tuple[list[str], set[str]]:
    """The parameter-owning modules ``layers`` selects, and those it names explicitly."""
    items: list[Any]
    if isinstance(layers, (str, nn.Module)):
        items = [layers]
    else:
        try:
            items = list(layers)
        except TypeError:
            raise HesslabError(
                "layers: expected None, a module name, a glob pattern, an nn.Module or a list of "
                f"these; got {type(layers).__name__}"
            ) from None
    if not items:
        raise HesslabError("layers: the list is empty; pass None for every supported layer")
    by_module = {id(m): n for n, m in modules.items()}
    selected: set[str] = set()
    explicit: set[str] = set()
    for item in items:
        if isinstance(item, nn.Module):
            if id(item) not in by_module:
                raise HesslabError(f"layers: the given {type(item).__name__} is not a submodule of the model")
            roots, exact = [by_module[id(item)]], True
        elif isinstance(item, str):
            if item in modules:
                roots, exact = [item], True
            elif _GLOB_CHARS & set(item):
                roots, exact = fnmatch.filter([k for k in modules if k], item), False
            else:
                roots, exact = [], True
        else:
            raise HesslabError(
                f"layers: item {item!r} of type {type(item).__name__} is not a module name, glob "
                "pattern or nn.Module"
            )
        matched = set()
        for root in roots:
            if root in owners:
                matched.add(root)
                if exact:
                    explicit.add(root)
            prefix = root + "." if root else ""
            matched |= {k for k in owners if k.startswith(prefix) and k != root}
        if not matched:
            supported = [k for k, m in owners.items() if isinstance(m, _SUPPORTED) or is_conv1d(m)]
            raise HesslabError(
                f"layers: {item!r} matches no layer with parameters. Kronecker layers of the model: "
                + (", ".join(repr(display(k)) for k in supported[:12]) or "(none)")
            )
        selected |= matched
    return [k for k in owners if k in selected], explicit
