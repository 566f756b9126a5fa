"""Measured Hessian ranks of a small network next to the deep-linear-network formulas.

Singh, Bachmann and Hofmann (NeurIPS 2021) split the Hessian of the loss into an
outer-product part and a functional part, ``H_L = H_O + H_F``, and give the rank of each
for deep linear networks. :func:`rank_report` builds the three dense float64 matrices of
a given network (``hl.Hessian``, ``hl.GGN`` and their difference), measures their
numerical ranks with :func:`hesslab.numerical_rank`, and, when the network is a deep
linear one, puts the closed-form prediction of :func:`hesslab.linear_network_rank` beside
them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from hesslab._plotting import axes
from hesslab._results import Result
from hesslab.analysis.rank import linear_network_rank, numerical_rank
from hesslab.errors import HesslabError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

__all__ = ["RankReport", "rank_report"]

PARTS = ("H_L", "H_O", "H_F")

#: Default largest parameter count :func:`rank_report` densifies.
MAX_PARAMS = 2048


@dataclasses.dataclass
class RankReport(Result):
    """Numerical ranks of H_L, H_O, H_F and, for deep linear networks, their predictions.

    Every dict below is keyed by ``"H_L"`` (the Hessian of the loss), ``"H_O"`` (the
    outer-product / Gauss–Newton part) and ``"H_F"`` (the functional part H_L − H_O).

    Attributes:
        num_params: n, the number of parameters (each matrix is n×n).
        ranks: The measured numerical ranks.
        predicted: The ranks :func:`hesslab.linear_network_rank` predicts, or None (not a
            deep linear network, an unknown loss, or no verified formula: see
            :attr:`note`).
        thresholds: The singular-value cutoffs used (numpy's rule σ_max·n·eps unless
            ``tol`` was given).
        gaps: σ_rank/σ_(rank+1) at the cutoff: the larger, the clearer the rank.
        near_threshold: The singular values around each cutoff (up to 10 kept and 10
            discarded, descending).
        singular_values: All singular values of each matrix, descending, shape (n,).
        architecture: ``"deep linear"`` or ``"other"``.
        widths: ``[d, M_1, …, K]`` for a deep linear network, else None.
        bias: Whether its layers have biases (None for other networks).
        loss: ``"mse"``, ``"cross_entropy"`` or None (not recognised).
        num_samples: N, the number of samples in ``data``.
        input_rank: r, the numerical rank of the N×d input matrix (deep linear networks),
            else None.
        note: Why some prediction is missing ("" when all three are there).
    """

    num_params: int
    ranks: dict[str, int]
    predicted: dict[str, int | None]
    thresholds: dict[str, float]
    gaps: dict[str, float]
    near_threshold: dict[str, np.ndarray]
    singular_values: dict[str, np.ndarray]
    architecture: str
    widths: list[int] | None
    bias: bool | None
    loss: str | None
    num_samples: int
    input_rank: int | None
    note: str

    def __post_init__(self) -> None:
        self.ranks = {k: int(v) for k, v in self.ranks.items()}
        self.predicted = {k: None if v is None else int(v) for k, v in self.predicted.items()}
        self.near_threshold = {k: np.asarray(v, dtype=np.float64) for k, v in self.near_threshold.items()}
        self.singular_values = {k: np.asarray(v, dtype=np.float64) for k, v in self.singular_values.items()}

    @property
    def matches(self) -> dict[str, bool | None]:
        """Per part, whether the measured rank equals the prediction (None: no prediction)."""
        return {
            p: None if self.predicted.get(p) is None else self.ranks[p] == self.predicted[p] for p in PARTS
        }

    def plot(self, ax: Axes | None = None) -> Axes:
        """Bar chart of the measured ranks beside the predicted ones, with n marked.

        Args:
            ax: Axes to draw on; a new figure's Axes when None (``plt.show`` is never
                called).

        Returns:
            The matplotlib Axes drawn on.
        """
        ax = axes(ax, (6.0, 4.5))
        x = np.arange(len(PARTS))
        width = 0.38
        has_pred = any(self.predicted.get(p) is not None for p in PARTS)
        measured = [self.ranks[p] for p in PARTS]
        bars = ax.bar(x - width / 2 if has_pred else x, measured, width, color="C0",
                      label="measured (numerical rank, float64)")
        ax.bar_label(bars, fontsize="small", padding=2)
        if has_pred:
            pred = [np.nan if self.predicted.get(p) is None else self.predicted[p] for p in PARTS]
            bars = ax.bar(x + width / 2, pred, width, color="C1", label="predicted (Singh et al., deep linear)")
            ax.bar_label(bars, labels=["n/a" if np.isnan(v) else f"{int(v)}" for v in pred], fontsize="small",
                         padding=2)
        ax.axhline(self.num_params, color="C7", ls="--", lw=1, label=f"n = {self.num_params} parameters")
        ax.set_xticks(x, ["H_L (Hessian)", "H_O (Gauss–Newton)", "H_F = H_L − H_O"])
        from matplotlib.ticker import MaxNLocator

        ax.set_ylabel("rank")
        ax.set_ylim(0, self.num_params * 1.15)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        what = f"deep linear net {self.widths}" if self.architecture == "deep linear" else "network"
        title = f"Hessian ranks of a {what}, N = {self.num_samples}" + (f", {self.loss}" if self.loss else "")
        if not has_pred:
            title += ("\n(not a deep linear network: no closed-form prediction)" if self.architecture == "other"
                      else "\n(no closed-form prediction: see the report's note)")
        ax.set_title(title, fontsize="medium")
        # Below the axes: inside, it would cover the labels on the bars (ranks reach n).
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
        return ax


def _linear_structure(model: nn.Module) -> tuple[list[int] | None, bool | None, str]:
    """``(widths, bias, note)`` of a deep linear network, or ``(None, None, why not)``."""
    if not isinstance(model, nn.Sequential):
        return None, None, "not a deep linear network (the model is not an nn.Sequential of nn.Linear layers)"
    layers = list(model.children())
    if not layers or any(type(m) is not nn.Linear for m in layers):
        return None, None, "not a deep linear network (the model is not an nn.Sequential of nn.Linear layers only)"
    biases = {m.bias is not None for m in layers}
    if len(biases) > 1:
        return None, None, "some layers have a bias and others not; the formulas need all or none"
    widths = [layers[0].in_features]
    for m in layers:
        if m.in_features != widths[-1]:
            return None, None, "the layers' widths do not chain"
        widths.append(m.out_features)
    if not all(p.requires_grad for p in model.parameters()):
        return None, None, "some parameters are frozen; the formulas count every weight"
    return widths, biases.pop(), ""


def _loss_name(loss_fn: Any) -> str | None:
    if isinstance(loss_fn, nn.MSELoss) and loss_fn.reduction == "mean":
        return "mse"
    if (
        isinstance(loss_fn, nn.CrossEntropyLoss)
        and loss_fn.reduction == "mean"
        and loss_fn.weight is None
        and loss_fn.label_smoothing == 0
    ):
        return "cross_entropy"
    return None


def _input_matrix(data: Any) -> Tensor | None:
    """The inputs of all batches stacked as an (N, d) float64 matrix, or None."""
    from hesslab.linops import is_single_batch

    batches = [data] if is_single_batch(data) else list(data)
    xs = []
    for batch in batches:
        inputs = batch[0]
        if not isinstance(inputs, Tensor) or inputs.dim() != 2:
            return None
        xs.append(inputs.detach().to("cpu", torch.float64))
    return torch.cat(xs) if xs else None


def rank_report(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    data: Any,
    tol: float | None = None,
    *,
    loss: str | None = None,
    max_params: int = MAX_PARAMS,
) -> RankReport:
    """Numerical ranks of H_L, H_O and H_F of a small network, with the linear-network prediction.

    The three n×n matrices are built densely in float64 (n products each):
    ``H_L = hl.Hessian(model, loss_fn, data)``, ``H_O = hl.GGN(model, loss_fn, data)`` and
    ``H_F = H_L − H_O``, each symmetrised, and their ranks measured by
    :func:`hesslab.numerical_rank` (numpy's rule σ_max·n·eps unless ``tol`` is given).
    The model is evaluated in eval mode and left unchanged.

    When the model is a deep linear network, an ``nn.Sequential`` of ``nn.Linear``
    layers, all without bias or all with, and the loss is ``nn.MSELoss()`` or
    ``nn.CrossEntropyLoss()`` (mean reduction, no class weights or label smoothing), the
    prediction is ``hl.linear_network_rank(widths, N, input_rank=r, loss, bias)`` with r
    the numerical rank of the N×d input matrix. With biases the formulas for H_F and H_L
    exist for up to two layers only; deeper ones get H_O alone.

    Args:
        model: A small network (n ≤ ``max_params`` parameters requiring grad).
        loss_fn: ``loss_fn(output, targets) -> scalar`` mean loss.
        data: One ``(inputs, targets)`` batch or a list of them (as for ``hl.Hessian``).
        tol: Absolute singular-value threshold for all three matrices; None: numpy's rule
            per matrix.
        loss: ``"mse"`` or ``"cross_entropy"``: name the loss for the prediction when
            ``loss_fn`` is a plain function; default: recognised from ``loss_fn``.
        max_params: Refuse larger models (the matrices need 3·n² float64 entries, n
            products each and an SVD each).

    Returns:
        A :class:`RankReport`.

    Raises:
        HesslabError: The model has more than ``max_params`` parameters, ``loss`` or
            ``tol`` is invalid, or the operators reject the arguments.
    """
    from hesslab.linops import GGN, Hessian

    if not isinstance(model, nn.Module):
        raise HesslabError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if loss is not None and loss not in ("mse", "cross_entropy"):
        raise HesslabError(f"loss: expected 'mse', 'cross_entropy' or None, got {loss!r}")
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n > max_params:
        mib = 3 * n * n * 8 / 2**20
        raise HesslabError(
            f"model: has n = {n} parameters, more than max_params = {max_params}; rank_report builds three dense "
            f"{n}×{n} float64 matrices ({mib:.0f} MiB, {2 * n} Hessian-vector products) and their SVDs. Use a "
            "smaller network, or raise max_params if memory and time allow"
        )

    H = Hessian(model, loss_fn, data, dtype=torch.float64)
    G = GGN(model, loss_fn, data, dtype=torch.float64)
    dense_l = H.to_dense(max_size=max(n, 1)).cpu()
    dense_o = G.to_dense(max_size=max(n, 1)).cpu()
    dense_l = (dense_l + dense_l.T) / 2
    dense_o = (dense_o + dense_o.T) / 2
    matrices = {"H_L": dense_l, "H_O": dense_o, "H_F": dense_l - dense_o}
    results = {p: numerical_rank(m, tol=tol) for p, m in matrices.items()}
    num_samples = H.num_data

    widths, bias, note = _linear_structure(model)
    loss_name = loss or _loss_name(loss_fn)
    predicted: dict[str, int | None] = {p: None for p in PARTS}
    input_rank = None
    if widths is not None:
        X = _input_matrix(data)
        if X is None:
            note = "the inputs are not (N, d) tensors, so the input rank is unknown"
        elif loss_name is None:
            note = (
                f"the loss {type(loss_fn).__name__} is not recognised; pass loss='mse' or loss='cross_entropy' "
                "for a prediction"
            )
        else:
            input_rank = max(1, numerical_rank(X).rank)
            parts = ("H_O",) if (bias and len(widths) > 3) else PARTS
            pred = linear_network_rank(widths, num_samples, input_rank=input_rank, loss=loss_name, bias=bool(bias),
                                       parts=parts)
            predicted = {"H_L": pred.rank_H_L, "H_O": pred.rank_H_O, "H_F": pred.rank_H_F}
            if len(parts) == 1:
                note = "with biases and more than two layers only rank H_O has a verified formula"
    return RankReport(
        num_params=int(n),
        ranks={p: results[p].rank for p in PARTS},
        predicted=predicted,
        thresholds={p: results[p].threshold for p in PARTS},
        gaps={p: results[p].gap for p in PARTS},
        near_threshold={p: results[p].near_threshold for p in PARTS},
        singular_values={p: results[p].singular_values for p in PARTS},
        architecture="deep linear" if widths is not None else "other",
        widths=widths,
        bias=bias,
        loss=loss_name,
        num_samples=int(num_samples),
        input_rank=input_rank,
        note=note,
    )
