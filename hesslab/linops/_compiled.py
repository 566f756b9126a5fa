"""Compiled block products: one batch's Hessian / GGN product under ``torch.compile``.

``Hessian(..., compile=...)`` and ``GGN(..., compile=...)`` run the per-batch block
product as one pure function of the tensors, compiled once per operator (``op.compiled``,
a :class:`CompiledProduct`):

    Hessian: reverse-over-reverse, ``g, vjp_g = vjp(grad(L_k), θ)``, then
        ``vmap(vjp_g)(V)``: one forward and one backward with a graph, then the b
        columns V (b, *s_i) through the batched backward-of-backward.
    GGN: the operator's torch.func form (``_func_product``): ``vmap(jvp(f))`` for J V,
        the loss Hessian on the outputs, ``vmap(vjp(f))``.

The function takes (θ, the other parameters and buffers, inputs, targets, V) and is
compiled with ``fullgraph=True`` and ``dynamic=False``: every distinct shape signature
(batch shape, number of columns b) is its own graph, compiled at its first use and
cached with the operator (an uneven last batch is a second cached graph, not a dynamic
one; a Lanczos run with a final block of k Ritz vectors adds one more). Each operator
gets its own copy of the function's code object, so operators never share torch's
per-function recompile limit. ``op.compiled.compiles`` counts the graphs compiled; a
product over shapes already seen compiles nothing.

A compiled product is not a kept graph: each product repeats the batch's forward and
backward, which the eager kept-graph path (``reuse_graph``) does once, and the first
product of every shape pays the compilation (inductor on this 2-core CPU: 23-67 s for
the digits MLP and a 20k-parameter CNN, 7 min for resnet_small on 128 x 3 x 32 x 32).
Measured on the CPU (benchmarks/bench_compiled.py, benchmarks/RESULTS.md "Targets"), a
compiled Hessian product is 1.5-2x faster than the kept graph on the MLP and the CNN but
0.8x on the ResNet, and a compiled GGN product 0.8x on the MLP and the CNN; compiling pays
back only after 1,000-30,000 products, more than a Lanczos, SLQ or trace run spends.
So ``compile="auto"`` is eager, on every device, by rule (no timing): curvlinops measured
torch.compile 4.6x faster per product on a ResNet-18 on a GPU, but whole runs there are
unmeasured here (the GPU suite, benchmarks/bench_gpu_e2e.py, has the compiled-vs-eager row
with the compile time and the break-even product count); ``compile=True`` is for long runs
over one operator. train mode, ``reuse_graph=True``, ``method="autograd"`` /
``"finite_difference"`` and sharded operators refuse ``compile=True``.

Fallback: when the function does not compile (a graph break under ``fullgraph``, an op
the backend cannot lower, torch declining to compile a new shape), the operator warns
once, naming the reason, records it in ``op.compiled.fallback`` and takes the eager path it
would have taken without ``compile`` from that batch on; the product is still exact.
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from hesslab.errors import HesslabError
from hesslab.linops._data import input_tensors

if TYPE_CHECKING:  # pragma: no cover
    from hesslab.linops._curvature import CurvatureOperator

__all__ = ["COMPILED", "CompiledProduct", "compile_setup", "compiled_batch_product", "reverse_hvp"]

COMPILED = "compiled"
DEFAULT_BACKEND = "inductor"


def reverse_hvp(
    op: CurvatureOperator, selected: dict[str, Tensor], others: dict[str, Tensor], inputs: Any,
    targets: Tensor, Vs: list[Tensor],
) -> dict[str, Tensor]:
    """One batch's Hessian block product by reverse-over-reverse: {name: (b, *s)}.

    ∇_θ L_k and its vjp closure come from one forward and one backward; the b columns
    share them through ``vmap`` over the cotangents (H is symmetric, so vjp = H v).
    """

    def loss_of(p: dict[str, Tensor]) -> Tensor:
        return op._loss(op._forward({**others, **p}, inputs), targets)

    _, vjp_g = torch.func.vjp(torch.func.grad(loss_of), selected)
    return torch.func.vmap(vjp_g)(dict(zip(op.param_names, Vs)))[0]


def _resolve(compile: Any, method: str, reuse_graph: Any, train_mode: bool, op: Any) -> str | None:
    """The backend to compile with, or None for eager; refuses combinations that cannot be."""
    if compile is False:
        return None
    backends = torch._dynamo.list_backends(exclude_tags=())
    if not (compile is True or compile == "auto" or compile in backends):
        raise HesslabError(
            f"compile: expected 'auto', True, False or a torch.compile backend name "
            f"({', '.join(backends)}), got {compile!r}"
        )
    conflict = (
        f"method={method!r}" if method in ("autograd", "finite_difference")
        else "train_mode=True" if train_mode
        else "reuse_graph=True" if reuse_graph is True
        else "a sharded operator" if getattr(op, "shards", None) is not None
        else None
    )
    if compile == "auto":  # eager by rule: compilation is not measured to pay in whole runs
        return None
    if conflict is not None:
        raise HesslabError(
            f"compile: compiled products are a torch.func path in eval mode without a kept "
            f"graph; they do not go with {conflict}. Use compile=False (or 'auto')."
        )
    return DEFAULT_BACKEND if compile is True else compile


def compile_setup(op: CurvatureOperator, compile: Any, method: str, reuse_graph: Any) -> None:
    """Resolve ``compile=`` for ``op``; when on, products take the compiled path.

    Sets ``op.compiled``: None (eager) or a :class:`CompiledProduct`; when on, products
    take the ``"compiled"`` path (``hvp_path``) until a fallback restores the eager one.
    """
    backend = _resolve(compile, method, reuse_graph, op.train_mode, op)
    op.compiled = None if backend is None else CompiledProduct(op, backend, (op._path, op._reuse))
    if op.compiled is not None:
        op._path, op._reuse = COMPILED, False


def compiled_batch_product(
    op: CurvatureOperator, inputs: Any, targets: Tensor, Vs: list[Tensor]
) -> list[Tensor]:
    """One batch's block product [(b, *s_i)] by the compiled function (eager on failure)."""
    selected, others = op._tensors()
    compiled = op.compiled
    out = compiled(selected, others, inputs, targets, Vs)
    if out is not None:
        return out
    op._path, op._reuse = compiled.eager
    warnings.warn(
        f"{type(op).__name__}: compile={compiled.backend!r} fell back on the eager "
        f"{op.hvp_path!r} path: {compiled.fallback}", stacklevel=4,
    )
    return op._batch_product(inputs, targets, Vs, op._reuse)


def _signature(inputs: Any, targets: Tensor, Vs: list[Tensor]) -> tuple:
    """The shapes that select a compiled graph (``dynamic=False``): batch and columns."""
    return (tuple(tuple(t.shape) for t in input_tensors(inputs)), tuple(targets.shape),
            Vs[0].shape[0] if Vs else 0)


class CompiledProduct:
    """One operator's compiled block product and its count of compiled graphs.

    Attributes:
        backend: The ``torch.compile`` backend (``"inductor"`` for ``compile=True``).
        compiles: Graphs compiled so far (one per shape signature seen).
        fallback: None, or why products left the compiled path (they stay eager after).

    Args:
        op: The operator (its ``_compiled_form`` hook, or ``_func_product``).
        backend: A ``torch.compile`` backend name.
        eager: ``(path, reuse)`` to restore on fallback.
    """

    def __init__(self, op: CurvatureOperator, backend: str, eager: tuple[str, bool]):
        self.backend = backend
        self.eager = eager
        self.compiles = 0
        self.fallback: str | None = None
        self._seen: set[tuple] = set()
        inner = torch._dynamo.lookup_backend(backend)
        hook = getattr(type(op), "_compiled_form", None)
        form: Callable = functools.partial(hook, op) if hook is not None else op._func_product
        names = list(op.param_names)

        def counting(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            self.compiles += 1
            return inner(gm, example_inputs)

        def product(selected, others, inputs, targets, Vs):
            out = form(selected, others, inputs, targets, Vs)
            return [out[k] for k in names]

        # A fresh code object: torch caches compiled graphs (and counts recompiles) per code object
        own = types.FunctionType(
            product.__code__.replace(), product.__globals__, f"hesslab_{type(op).__name__}_product",
            product.__defaults__, product.__closure__,
        )
        self._fn = torch.compile(own, fullgraph=True, dynamic=False, backend=counting)

    def __call__(self, selected, others, inputs, targets, Vs) -> list[Tensor] | None:
        """The product [(b, *s_i)], or None (``fallback`` set) when it does not compile."""
        key = _signature(inputs, targets, Vs)
        before = self.compiles
        try:
            out = self._fn(selected, others, inputs, targets, Vs)
        except Exception as err:  # graph break (fullgraph), backend failure: eager says if real
            self.fallback = f"{type(err).__name__}: {_first_line(err)}"
            return None
        if key not in self._seen:
            if self.compiles == before:
                self.fallback = (
                    "torch.compile compiled no graph for a new shape (its recompile limit, or a "
                    "frame it skips)"
                )
                return None
            self._seen.add(key)
        return [t.detach() for t in out]


def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else "(no message)"
