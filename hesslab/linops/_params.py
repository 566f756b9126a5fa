"""Parameter selection and the flat-vector layout of a parameter subset.

Notation:
    P: the number of selected parameter tensors, with shapes s_1, ..., s_P.
    n = sum_i prod(s_i): the length of a flat parameter vector.
    b: the number of columns (vectors) processed together.

Layout:
    A flat vector is the concatenation of the selected tensors, each flattened in
    torch's row-major (C) order, in the order in which ``model.named_parameters()``
    yields them (not the order in which they were requested). A block of b vectors is
    an (n, b) matrix whose columns are flat vectors. Internally the per-parameter view
    of a block is a list of tensors of shapes (b, *s_i), batch first, as torch.func.vmap
    expects.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Union

import torch
from torch import Tensor, nn

from hesslab.errors import HesslabError

ParamSpec = Union[None, str, nn.Module, Tensor, Iterable[Union[str, nn.Module, Tensor]]]

_GLOB_CHARS = set("*?[")


def _describe_names(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown or "(none)"


def select_parameters(model: nn.Module, params: ParamSpec) -> tuple[list[str], list[Tensor]]:
    """Resolve a parameter specification to names and tensors of ``model``.

    Args:
        model: The model whose parameters are selected.
        params: ``None`` selects every parameter with ``requires_grad=True``.
            Otherwise one item or an iterable of items, each of which is

            - a parameter name (``"fc1.weight"``),
            - the name of a submodule (``"fc1"``: all of its parameters),
            - a glob pattern matched against parameter names with :mod:`fnmatch`
              (``"layer1.*"``, ``"*.bias"``),
            - an ``nn.Module`` that is part of ``model`` (all of its parameters), or
            - a parameter tensor of ``model`` (matched by identity).

            Explicit selections include frozen parameters (``requires_grad=False``):
            the Hessian with respect to them is well defined, and hesslab never relies
            on the flag.

    Returns:
        ``(names, tensors)`` in the order of ``model.named_parameters()``, without
        duplicates (tied parameters appear once).

    Raises:
        HesslabError: ``params`` (or an item of it) matches no parameter, or ``params=None``
            and no parameter requires grad.
    """
    named = list(model.named_parameters())
    all_names = [name for name, _ in named]
    if params is None:
        chosen = [(name, p) for name, p in named if p.requires_grad]
        if not chosen:
            raise HesslabError(
                "params: the model has no parameter with requires_grad=True "
                f"(parameters: {_describe_names(all_names)}). Unfreeze some parameters, or "
                "pass params= with the names, modules or glob patterns to differentiate."
            )
        return [n for n, _ in chosen], [p for _, p in chosen]

    items: list[str | nn.Module | Tensor]
    if isinstance(params, (str, nn.Module, Tensor)):
        items = [params]
    else:
        try:
            items = list(params)
        except TypeError:
            raise HesslabError(
                "params must be None, a parameter name, a module name, a glob pattern, an "
                f"nn.Module, a parameter, or a list of these; got {type(params).__name__}"
            ) from None
    if not items:
        raise HesslabError("params is empty: it selects no parameter (use None for all).")

    by_id = {id(p): name for name, p in named}
    modules = dict(model.named_modules())
    selected: set[str] = set()
    for item in items:
        if isinstance(item, str):
            if item in by_id.values():
                matches = {item}
            elif item in modules and item != "":
                matches = {by_id[id(p)] for p in modules[item].parameters() if id(p) in by_id}
            elif _GLOB_CHARS & set(item):
                matches = set(fnmatch.filter(all_names, item))
            else:
                matches = set()
        elif isinstance(item, nn.Module):
            matches = {by_id[id(p)] for p in item.parameters() if id(p) in by_id}
        elif isinstance(item, Tensor):
            matches = {by_id[id(item)]} if id(item) in by_id else set()
        else:
            raise HesslabError(
                f"params: item {item!r} of type {type(item).__name__} is not a name, glob "
                "pattern, nn.Module or parameter tensor"
            )
        if not matches and isinstance(item, str):
            alias = {n: by_id.get(id(p)) for n, p in model.named_parameters(remove_duplicate=False)}
            if alias.get(item):
                raise HesslabError(
                    f"params: {item!r} is tied to {alias[item]!r} (one parameter under two names, "
                    f"e.g. GPT-2's lm_head and wte); hesslab lists it once, as {alias[item]!r}: "
                    "select that name"
                )
        if not matches:
            what = repr(item) if isinstance(item, str) else f"the given {type(item).__name__}"
            raise HesslabError(
                f"params: {what} matches no parameter of the model. Parameter names: "
                f"{_describe_names(all_names)}"
            )
        selected |= matches
    chosen = [(name, p) for name, p in named if name in selected]
    return [n for n, _ in chosen], [p for _, p in chosen]


def flatten_tensors(tensors: Sequence[Tensor], shapes: Sequence[torch.Size]) -> Tensor:
    """Concatenate per-parameter tensors into a flat vector or a block of columns.

    Args:
        tensors: One tensor per parameter, either of the parameter's shape s_i or of
            shape (*s_i, b) with the same b for all (b columns).
        shapes: The parameter shapes s_i.

    Returns:
        A vector of shape (n,), or a block of shape (n, b) in the second case.

    Raises:
        HesslabError: wrong number of tensors or shapes that fit neither form.
    """
    tensors = list(tensors)
    if len(tensors) != len(shapes):
        raise HesslabError(
            f"tensors: expected {len(shapes)} tensors (one per selected parameter), "
            f"got {len(tensors)}"
        )
    if not tensors:
        raise HesslabError("tensors: nothing to flatten")
    if all(tuple(t.shape) == tuple(s) for t, s in zip(tensors, shapes)):
        return torch.cat([t.reshape(-1) for t in tensors])  # (n,)
    b = tensors[0].shape[-1] if tensors[0].dim() > 0 else None
    if b is not None and all(tuple(t.shape) == (*s, b) for t, s in zip(tensors, shapes)):
        return torch.cat([t.reshape(-1, b) for t in tensors], dim=0)  # (n, b)
    got = [tuple(t.shape) for t in tensors]
    raise HesslabError(
        f"tensors: shapes {got} match neither the parameter shapes "
        f"{[tuple(s) for s in shapes]} nor those shapes with a trailing column dimension"
    )


def flatten_grads(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Concatenate gradients flattened, with zeros for unused tensors (None); shape (n,)."""
    return torch.cat([
        (torch.zeros_like(x) if g is None else g).reshape(-1) for g, x in zip(grads, like)
    ])


def unflatten_vector(vec: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Split a flat vector (n,) or block (n, b) into per-parameter tensors.

    Args:
        vec: Shape (n,) or (n, b).
        shapes: The parameter shapes s_i, with n = sum_i prod(s_i).

    Returns:
        Views of shape s_i for a vector, or (*s_i, b) for a block.

    Raises:
        HesslabError: ``vec`` has the wrong size or number of dimensions.
    """
    numels = [_numel(s) for s in shapes]
    n = sum(numels)
    if not isinstance(vec, Tensor) or vec.dim() not in (1, 2) or vec.shape[0] != n:
        got = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
        raise HesslabError(f"vec: expected a tensor of shape ({n},) or ({n}, b), got {got}")
    parts = torch.split(vec, numels, dim=0)
    if vec.dim() == 1:
        return [p.reshape(s) for p, s in zip(parts, shapes)]
    b = vec.shape[1]
    return [p.reshape(*s, b) for p, s in zip(parts, shapes)]


def columns_to_params(V: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Split a block of columns into batch-first per-parameter tensors.

    Args:
        V: Shape (n, b).
        shapes: The parameter shapes s_i.

    Returns:
        Tensors of shapes (b, *s_i) (views of ``V.T`` where possible).
    """
    b = V.shape[1]
    Vt = V.T  # (b, n)
    parts = torch.split(Vt, [_numel(s) for s in shapes], dim=1)
    return [p.reshape(b, *s) for p, s in zip(parts, shapes)]


def params_to_columns(parts: Sequence[Tensor]) -> Tensor:
    """Inverse of :func:`columns_to_params`.

    Args:
        parts: Tensors of shapes (b, *s_i).

    Returns:
        A contiguous block of shape (n, b).
    """
    b = parts[0].shape[0]
    return torch.cat([p.reshape(b, -1) for p in parts], dim=1).T.contiguous()  # (n, b)


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out
