"""rank_report: measured ranks of H_L, H_O, H_F against the deep-linear-network formulas.

Oracles: ``linear_network_rank`` (itself checked against torch.func Hessians in
test_rank.py) for deep linear networks over depths, widths (bottlenecks included),
sample counts below and above the input dimension and both losses; and, for a
non-linear network, numerical ranks of dense matrices built here with torch.autograd
(H_L by ``hessian``, H_O = (1/N) Σ_j J_jᵀ ∇²ℓ_j J_j from per-sample Jacobians).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from hesslab.analysis.rank import linear_network_rank, numerical_rank
from hesslab.analysis.rank_report import RankReport, rank_report
from hesslab.errors import HesslabError
from tests import models

CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()



def _data(loss: str, n: int, d: int, k: int, seed: int):
    if loss == "mse":
        return models.regression_data(n, d, k, seed=seed)
    return models.classification_data(n, d, k, seed=seed)


# (widths, N): depths 1-4, bottlenecks, N below and above d
LINEAR_CASES = [
    ([4, 3], 6),
    ([5, 2], 3),
    ([4, 5, 3], 10),
    ([4, 5, 3], 3),
    ([6, 2, 4], 12),  # bottleneck
    ([3, 4, 4, 2], 7),
    ([5, 3, 2, 4], 4),  # bottleneck, N < d
    ([3, 2, 3, 2, 3], 8),
]


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("widths,num_samples", LINEAR_CASES)
def test_deep_linear_without_bias_matches_formula(widths, num_samples, loss):
    model = models.linear_net(widths, seed=len(widths) + num_samples)
    data = _data(loss, num_samples, widths[0], widths[-1], seed=num_samples)
    rep = rank_report(model, MSE if loss == "mse" else CE, data)
    pred = linear_network_rank(widths, num_samples, loss=loss)
    assert rep.architecture == "deep linear" and rep.widths == widths and rep.bias is False
    assert rep.loss == loss and rep.num_samples == num_samples
    assert rep.input_rank == min(widths[0], num_samples)
    assert rep.num_params == pred.num_params == sum(p.numel() for p in model.parameters())
    assert rep.predicted == {"H_L": pred.rank_H_L, "H_O": pred.rank_H_O, "H_F": pred.rank_H_F}
    assert rep.ranks == rep.predicted, (rep.ranks, rep.predicted, rep.gaps)
    assert all(rep.matches.values())
    assert rep.note == ""


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("widths,num_samples", [([4, 3], 7), ([3, 4, 2], 8), ([4, 2, 3], 9), ([3, 4, 3], 2)])
def test_deep_linear_with_bias_matches_formula(widths, num_samples, loss):
    model = models.linear_net(widths, bias=True, seed=num_samples)
    data = _data(loss, num_samples, widths[0], widths[-1], seed=num_samples + 1)
    rep = rank_report(model, MSE if loss == "mse" else CE, data)
    pred = linear_network_rank(widths, num_samples, loss=loss, bias=True)
    assert rep.bias is True
    assert rep.predicted == {"H_L": pred.rank_H_L, "H_O": pred.rank_H_O, "H_F": pred.rank_H_F}
    assert rep.ranks == rep.predicted, (rep.ranks, rep.predicted)


def test_deep_linear_with_bias_three_layers_predicts_H_O_only():
    widths = [3, 4, 3, 2]
    model = models.linear_net(widths, bias=True, seed=1)
    rep = rank_report(model, MSE, models.regression_data(9, 3, 2, seed=1))
    assert rep.predicted["H_L"] is None and rep.predicted["H_F"] is None
    expected = linear_network_rank(widths, 9, bias=True, parts=("H_O",)).rank_H_O
    assert rep.ranks["H_O"] == rep.predicted["H_O"] == expected
    assert rep.matches == {"H_L": None, "H_O": True, "H_F": None}
    assert "H_O" in rep.note


def test_low_rank_inputs_and_batches():
    """Inputs of rank r < min(d, N), given as a list of batches: the measured input rank enters."""
    widths, n = [6, 4, 3], 12
    gen = torch.Generator().manual_seed(0)
    X = (torch.randn(n, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 6, generator=gen, dtype=torch.float64))
    y = torch.randint(0, 3, (n,), generator=gen)
    model = models.linear_net(widths, seed=2)
    rep = rank_report(model, CE, [(X[:5], y[:5]), (X[5:], y[5:])])
    assert rep.input_rank == 2 and rep.num_samples == n
    pred = linear_network_rank(widths, n, input_rank=2, loss="cross_entropy")
    assert rep.ranks == rep.predicted == {"H_L": pred.rank_H_L, "H_O": pred.rank_H_O, "H_F": pred.rank_H_F}


def _dense_parts(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """H_L and H_O of the mean cross-entropy by plain autograd (flat float64 parameters)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return functional_call(model, params, (x,))

    H = hessian(lambda t: CE(f(t, X), y), theta)
    J = jacobian(lambda t: f(t, X), theta)  # (N, K, P)
    p = torch.softmax(f(theta, X), dim=1)  # (N, K)
    A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, K, K) loss Hessian in the logits
    H_O = torch.einsum("nkp,nkl,nlq->pq", J, A, J) / X.shape[0]
    return H.detach().numpy(), H_O.detach().numpy()


def test_nonlinear_network_against_autograd():
    model = models.mlp(hidden=(5,), seed=4)  # tanh, 43 parameters
    X, y = models.classification_data(6, 4, 3, seed=4)
    rep = rank_report(model, CE, (X, y))
    H, H_O = _dense_parts(model, X, y)
    for part, M in (("H_L", H), ("H_O", H_O), ("H_F", H - H_O)):
        ref = numerical_rank((M + M.T) / 2)
        assert rep.ranks[part] == ref.rank, part
        assert rep.thresholds[part] == pytest.approx(ref.threshold, rel=1e-6)
    assert rep.ranks["H_O"] == 6 * 2  # N (K − 1): the GGN of N samples with softmax
    assert rep.architecture == "other" and rep.widths is None
    assert rep.predicted == {"H_L": None, "H_O": None, "H_F": None}
    assert rep.matches == {"H_L": None, "H_O": None, "H_F": None}
    assert "not a deep linear network" in rep.note
    # an absolute tolerance applies to all three
    loose = rank_report(model, CE, (X, y), tol=1e-2)
    assert all(loose.thresholds[p] == 1e-2 for p in loose.ranks)
    assert loose.ranks["H_L"] == numerical_rank(H, tol=1e-2).rank


def test_loss_recognition_and_override():
    widths, n = [4, 3, 2], 6
    model = models.linear_net(widths, seed=5)
    data = models.regression_data(n, 4, 2, seed=5)

    def plain_mse(out, target):
        return ((out - target) ** 2).mean()

    rep = rank_report(model, plain_mse, data)
    assert rep.loss is None and rep.predicted["H_L"] is None and "loss" in rep.note
    rep = rank_report(model, plain_mse, data, loss="mse")
    assert rep.loss == "mse" and rep.ranks == rep.predicted
    with pytest.raises(HesslabError, match="reduction"):  # the operators need the mean loss
        rank_report(model, nn.MSELoss(reduction="sum"), data)
    with pytest.raises(HesslabError, match="loss"):
        rank_report(model, plain_mse, data, loss="hinge")


def test_not_linear_structures():
    X, y = models.classification_data(8, 4, 3, seed=0)
    mixed = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 3)).double()
    assert "bias" in rank_report(mixed, CE, (X, y)).note
    frozen = models.linear_net((4, 3, 3), seed=0)
    frozen[0].weight.requires_grad_(False)
    rep = rank_report(frozen, CE, (X, y))
    assert rep.predicted["H_O"] is None and "frozen" in rep.note
    assert rep.num_params == 9


def test_refuses_large_models():
    model = models.linear_net((10, 10, 10), seed=0)  # 200 parameters
    X, y = models.classification_data(5, 10, 10, seed=0)
    with pytest.raises(HesslabError, match="max_params"):
        rank_report(model, CE, (X, y), max_params=100)
    with pytest.raises(HesslabError, match="model"):
        rank_report("not a model", CE, (X, y))


def test_model_left_unchanged_save_load_plot(tmp_path):
    model = models.linear_net((4, 5, 3), seed=3)
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    rep = rank_report(model, CE, models.classification_data(10, 4, 3, seed=3))
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for name in ("r.json", "r.npz"):
        back = RankReport.load(rep.save(tmp_path / name))
        assert back.ranks == rep.ranks and back.predicted == rep.predicted
        np.testing.assert_allclose(back.singular_values["H_F"], rep.singular_values["H_F"])
        assert back.widths == [4, 5, 3]
    ax = rep.plot()
    assert ax.get_ylabel() == "rank" and ax.get_title()
    assert len(ax.get_legend().get_texts()) == 3
    ax.figure.savefig(tmp_path / "rank_report.png")
    other = rank_report(models.mlp(hidden=(4,), seed=0), CE, models.classification_data(6, 4, 3, seed=0))
    other.plot().figure.savefig(tmp_path / "rank_report_other.png")
    plt.close("all")


# ======================================================================================
# the plot reads right (issue 18): the legend covers no bar label, integer rank ticks
# ======================================================================================


def test_rank_bars_legend_covers_no_label_and_ticks_are_integers():
    from hesslab.report import plots

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.Linear(4, 3, bias=False))
    X = torch.randn(12, 6)
    rep = rank_report(model, CE, (X, torch.randint(0, 3, (12,))))
    fig = plots.rank_bars(rep)
    fig.canvas.draw()
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    labels = [t for t in ax.texts if t.get_text()]  # the bar labels
    assert labels
    for t in labels:
        assert not legend.overlaps(t.get_window_extent(renderer)), t.get_text()
    ticks = [float(t) for t in ax.get_yticks()]
    assert all(t == int(t) for t in ticks), ticks


def test_count_axes_have_integer_ticks():
    from hesslab.report import plots

    rows = [{"hidden": h, "num_params": 10 * h, "ranks": {"H_L": h, "H_O": h, "H_F": 0},
             "predicted": {"H_L": h, "H_O": h, "H_F": 0}} for h in (1, 2, 3)]
    fig = plots.rank_sweep(rows, "sweep")
    fig.canvas.draw()
    ax = fig.axes[0]
    for ticks in (ax.get_xticks(), ax.get_yticks()):
        assert all(float(t) == int(t) for t in ticks), ticks
