"""Per-block Hessian spectra (Zhang et al. 2024, "Why Transformers Need Adam: A Hessian Perspective").

Zhang et al. find that a transformer's Hessian is close to block diagonal and that the
spectra of its parameter blocks differ from block to block ("block heterogeneity":
query, key, value, attention output, MLP layers, embeddings and norms each have their
own), unlike a CNN's. :func:`block_spectra` estimates one SLQ density per block, each
from the block's own operator (the diagonal block H_bb = Sᵀ H S, never the full matrix)
and measures the heterogeneity: the pairwise Jensen–Shannon distance between the
densities smoothed on one common grid.

Blocks (``blocks=None``, :func:`default_blocks`): one per parameter-owning module
(attention projections, attention output, each MLP layer, embeddings, norms, the head),
with a fused query/key/value projection split into its three parts — GPT-2's ``c_attn``
(``Conv1D``, weight (in, 3E): the columns), timm's ``qkv`` and
``nn.MultiheadAttention``'s ``in_proj`` (weight (3E, in): the rows) — as a
:class:`~hesslab.linops.SubblockOperator` over the parameter's flat entries; parameters
owned directly by a container (timm's ``cls_token``, ``pos_embed``) are blocks of their
own. Tied parameters are one block (``named_parameters`` lists them once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hesslab._results import Result
from hesslab.errors import HesslabError
from hesslab.linops import GGN, Hessian, LinearOperator, SubblockOperator
from hesslab.solvers import SpectralDensity, smooth_density, spectral_density

__all__ = ["Block", "BlockSpectra", "block_spectra", "default_blocks", "js_distance"]

_OPERATORS = {"hessian": Hessian, "ggn": GGN}


@dataclasses.dataclass
class Block:
    """One block: parameters by name, optionally restricted to some of their flat entries.

    Attributes:
        name: The block's name (a module name, with ``.q``/``.k``/``.v`` for fused parts).
        params: Parameter names (``params=`` of the operators).
        index: Positions in the flat layout of ``params`` (None: all entries).
    """

    name: str
    params: list[str]
    index: Tensor | None = None


def _fused_qkv(name: str, module: nn.Module) -> tuple[str, str, bool] | None:
    """(weight name, bias name, columns?) of a fused q/k/v projection, or None."""
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        return "in_proj_weight", "in_proj_bias", False
    if type(module).__name__ == "Conv1D" and name.endswith("c_attn"):
        return "weight", "bias", True
    if isinstance(module, nn.Linear) and name.split(".")[-1] == "qkv" and module.out_features % 3 == 0:
        return "weight", "bias", False
    return None


def _split_qkv(name: str, module: nn.Module, wname: str, bname: str, columns: bool,
               owned: set[str]) -> list[Block]:
    """Three blocks over the fused weight (and bias), in the flat layout [weight, bias]."""
    w = getattr(module, wname)
    b = getattr(module, bname, None)
    prefix = f"{name}." if name else ""
    params = [prefix + wname] + ([prefix + bname] if b is not None and prefix + bname in owned else [])
    rows, cols = w.shape
    third = (cols if columns else rows) // 3
    blocks = []
    for i, part in enumerate("qkv"):
        r = torch.arange(i * third, (i + 1) * third)
        if columns:  # weight (in, 3E): entry (s, c) at s·3E + c
            idx = (torch.arange(rows)[:, None] * cols + r[None, :]).reshape(-1)
        else:  # weight (3E, in): entry (r, s) at r·in + s
            idx = (r[:, None] * cols + torch.arange(cols)[None, :]).reshape(-1)
        if len(params) == 2:
            idx = torch.cat([idx, w.numel() + r])
        blocks.append(Block(f"{prefix}{part}" if not name else f"{name}.{part}", params, idx))
    return blocks


def default_blocks(model: nn.Module, params: Any = None) -> list[Block]:
    """Zhang et al.'s blocks of a model (see the module docstring), in parameter order.

    Args:
        params: ``None`` (every parameter that requires grad) or anything ``params=`` of the
            operators accepts: only blocks over these parameters, a fused q/k/v weight
            without its bias giving q/k/v blocks of the weight alone.
    """
    if params is None:
        owned = {n for n, p in model.named_parameters() if p.requires_grad}
    else:
        from hesslab.linops import select_parameters

        owned = set(select_parameters(model, params)[0])
    blocks: list[Block] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        mine = [prefix + k for k, _ in module.named_parameters(recurse=False) if prefix + k in owned]
        if not mine:
            continue
        fused = _fused_qkv(name, module)
        if fused is not None and prefix + fused[0] in mine:
            blocks.extend(_split_qkv(name, module, *fused, owned))
            mine = [p for p in mine if p not in (prefix + fused[0], prefix + fused[1])]
            if mine:
                blocks.append(Block(f"{name}.other" if name else "other", mine))
        elif any(True for _ in module.children()):  # a container's own parameters
            blocks.extend(Block(p, [p]) for p in mine)
        else:
            blocks.append(Block(name or "<root>", mine))
    return blocks


def _as_blocks(model: nn.Module, blocks: Any, params: Any) -> list[Block]:
    if params is not None and blocks is not None:
        raise HesslabError("params: restricts the default blocks (blocks=None); with blocks= given, name "
                           "the parameters in the blocks instead")
    if blocks is None:
        out = default_blocks(model, params)
    elif isinstance(blocks, Mapping):
        from hesslab.linops import select_parameters

        out = [Block(str(k), select_parameters(model, v)[0]) for k, v in blocks.items()]
    else:
        out = list(blocks)
        if not all(isinstance(b, Block) for b in out):
            raise HesslabError("blocks: expected None, a {name: params} dict or a list of Block")
    if not out:
        raise HesslabError("blocks: no block selected (no parameter requires grad?)")
    return out


def block_operator(model: nn.Module, loss_fn: Any, data: Any, block: Block, operator: str = "hessian",
                   **options: Any) -> LinearOperator:
    """The diagonal block of the curvature operator for one block (a sub-block when indexed)."""
    if operator not in _OPERATORS:
        raise HesslabError(f"operator: expected one of {sorted(_OPERATORS)}, got {operator!r}")
    op = _OPERATORS[operator](model, loss_fn, data, params=block.params, **options)
    return op if block.index is None else SubblockOperator(op, block.index)


def _resmooth(d: SpectralDensity, grid: np.ndarray, var: float) -> np.ndarray:
    """The density of ``d`` on ``grid`` with a Gaussian kernel of variance ``var``."""
    counts = np.asarray(d.num_steps)
    nodes = np.asarray(d.nodes)
    valid = np.arange(nodes.shape[1])[None, :] < counts[:, None]
    own = np.mean([x[v].max() for x, v in zip(nodes, valid)]) - np.mean(
        [x[v].min() for x, v in zip(nodes, valid)]) + 2e-2  # smooth_density's padded width
    return smooth_density(nodes, d.weights, sigma2=var / max(1.0, own), grid=grid, counts=counts)[1]


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """√(Jensen–Shannon divergence) in bits of two densities on one grid; in [0, 1]."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0, None)
    q = np.clip(np.asarray(q, dtype=np.float64), 0, None)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = (a > 1e-300) & (m > 1e-300)  # denormals: m = a/2 can underflow to 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return float(np.sqrt(max(0.0, (kl(p) + kl(q)) / 2)))


@dataclasses.dataclass
class BlockSpectra(Result):
    """One spectral density per block, and how much they differ.

    Attributes:
        names: The blocks, in order.
        sizes: Their numbers of entries.
        spectra: Per block the :class:`~hesslab.solvers.SpectralDensity` fields (see
            :attr:`densities` for the objects).
        grid: (g,) the common grid of ``common``.
        common: (num_blocks, g) each block's density re-smoothed on ``grid`` with one
            kernel width (sigma2 relative to the common range).
        js: (num_blocks, num_blocks) pairwise Jensen–Shannon distances (base 2, in
            [0, 1]) of the rows of ``common``.
        heterogeneity: The mean of ``js`` over pairs of distinct blocks (0: identical
            spectra; 1: disjoint).
    """

    names: list[str]
    sizes: list[int]
    spectra: dict[str, dict[str, Any]]
    grid: np.ndarray
    common: np.ndarray
    js: np.ndarray
    heterogeneity: float

    @property
    def densities(self) -> dict[str, SpectralDensity]:
        """Block name -> its :class:`~hesslab.solvers.SpectralDensity`."""
        return {k: SpectralDensity(**v) for k, v in self.spectra.items()}

    def plot(self, ax: Any = None, floor: float = 1e-8) -> Any:
        """Every block's density on one figure (log y-axis; densities below ``floor`` clipped)."""
        from hesslab._plotting import axes

        ax = axes(ax, figsize=(7.0, 4.5))
        for name in self.names:
            d = self.spectra[name]
            ax.plot(d["grid"], np.maximum(np.asarray(d["density"]), floor), label=name, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"Per-block spectra (heterogeneity {self.heterogeneity:.2f})")
        ax.legend(fontsize=6, ncol=2)
        return ax


def block_spectra(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor] | None,
    data: Any,
    blocks: Any = None,
    num_steps: int = 30,
    num_probes: int = 4,
    *,
    seed: int = 0,
    params: Any = None,
    operator: str = "hessian",
    grid_size: int = 2000,
    sigma2: float = 1e-5,
    **operator_options: Any,
) -> BlockSpectra:
    """Spectral densities of the diagonal blocks of a model's Hessian (or GGN), per block.

    Args:
        model, loss_fn, data: As for :class:`~hesslab.linops.Hessian` (``loss_fn=None``
            and dict batches for transformers models).
        blocks: ``None`` (:func:`default_blocks`), ``{name: params}`` (anything
            ``params=`` accepts) or a list of :class:`Block`.
        num_steps: Lanczos steps per probe (capped at each block's size).
        num_probes: Random probes per block.
        seed: Seed of the probes (the same for every block).
        params: With ``blocks=None``, only the default blocks over these parameters
            (anything ``params=`` of the operators accepts; see :func:`default_blocks`).
        operator: ``"hessian"`` or ``"ggn"``.
        grid_size, sigma2: Smoothing of each block's density and of the common grid.
        **operator_options: Passed to the operator (``dtype``, ``method``, ...).

    Returns:
        A :class:`BlockSpectra`.
    """
    chosen = _as_blocks(model, blocks, params)
    spectra: dict[str, SpectralDensity] = {}
    sizes = []
    for block in chosen:
        op = block_operator(model, loss_fn, data, block, operator, **operator_options)
        steps = max(1, min(num_steps, op.shape[0]))
        spectra[block.name] = spectral_density(
            op, steps, num_probes, seed=seed, sigma2=sigma2, grid_size=grid_size, progress=False
        )
        sizes.append(op.shape[0])
    names = list(spectra)
    lo = min(float(np.min(d.grid)) for d in spectra.values())
    hi = max(float(np.max(d.grid)) for d in spectra.values())
    grid = np.linspace(lo, hi, grid_size)
    # one kernel for all: variance sigma2·max(1, common width), at least (2 grid steps)²
    var = max(sigma2 * max(1.0, hi - lo), (2 * (hi - lo) / max(1, grid_size - 1)) ** 2)
    common = np.stack([_resmooth(d, grid, var) for d in spectra.values()])
    k = len(names)
    js = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            js[i, j] = js[j, i] = js_distance(common[i], common[j])
    pairs = js[np.triu_indices(k, 1)]
    return BlockSpectra(
        names=names, sizes=sizes, spectra={k_: d.to_dict() for k_, d in spectra.items()},
        grid=grid, common=common, js=js, heterogeneity=float(pairs.mean()) if pairs.size else 0.0,
    )
