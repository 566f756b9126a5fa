"""Singh et al.: measured ranks of H_L, H_O, H_F of small deep linear networks against the
closed-form predictions, on digits images pooled to 4×4."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hesslab._results import jsonable
from hesslab.analysis import rank_report

from ._stages import Stages, guard

__all__ = ["rank_analysis", "rank_summary"]


def _linear_net(widths: Sequence[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:])]
    return nn.Sequential(*layers).double()


def _pooled_digits(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N digits images average-pooled to 4×4: inputs (N, 16) float64, labels (N,)."""
    from hesslab import zoo

    (X, y), _ = zoo.digits(image=True, seed=seed, dtype=torch.float64)
    X = torch.nn.functional.avg_pool2d(X[:num_samples], 2).reshape(num_samples, -1)
    return X - X.mean(0), y[:num_samples]


def rank_analysis(hidden: Sequence[int], num_samples: int, seed: int = 0, store: Any = None,
                  stages: Stages | None = None) -> dict[str, Any]:
    """Measured ranks of H_L, H_O, H_F against Singh et al.'s formulas on small deep
    linear networks (no bias) fed with N pooled digits images (d = 16, K = 10).

    Returns:
        ``{"sweep": [rows over the hidden width, cross-entropy], "reports": {name:
        RankReport}, "unavailable": reason or "", "errors": {part: message}}``.
    """
    stages = stages or Stages(0, progress=False, verbose=False)
    result: dict[str, Any] = {"sweep": [], "reports": {}, "unavailable": "", "errors": {}}
    X, y = _pooled_digits(num_samples, seed)
    onehot = torch.nn.functional.one_hot(y, 10).double()
    ce, mse = nn.CrossEntropyLoss(), nn.MSELoss()
    with stages.stage(f"deep linear networks: ranks over the hidden width {list(hidden)}"):
        for m in hidden:
            widths = [X.shape[1], int(m), 10]
            with guard(result["errors"], f"sweep M1={m}", stages):
                rep = rank_report(_linear_net(widths, seed + m), ce, (X, y))
                result["sweep"].append({"hidden": int(m), "widths": widths, "num_params": rep.num_params,
                                        "num_samples": rep.num_samples,
                                        "ranks": dict(rep.ranks), "predicted": dict(rep.predicted),
                                        "input_rank": rep.input_rank})
                if store is not None:
                    store.save(f"rank/linear_{'-'.join(map(str, widths))}_cross_entropy", rep)
    with stages.stage("deep linear networks: three layers, cross-entropy and MSE"):
        for name, widths, loss, targets in [
            ("linear_16-8-6-10_cross_entropy", [X.shape[1], 8, 6, 10], ce, y),
            ("linear_16-6-10_mse", [X.shape[1], 6, 10], mse, onehot),
        ]:
            with guard(result["errors"], name, stages):
                rep = rank_report(_linear_net(widths, seed + 100), loss, (X, targets))
                result["reports"][name] = rep
                if store is not None:
                    store.save(f"rank/{name}", rep)
    return result


def rank_summary(rank: dict[str, Any]) -> dict[str, Any]:
    """The rank results as they go into ``summary.json`` (plain JSON)."""
    sweep = rank["sweep"]
    return jsonable({
        "sweep": sweep,
        "reports": {k: {"ranks": r.ranks, "predicted": r.predicted, "num_params": r.num_params,
                        "matches": r.matches, "widths": r.widths, "loss": r.loss}
                    for k, r in rank["reports"].items()},
        "sweep_all_match": all(r["ranks"][p] == r["predicted"][p] for r in sweep for p in r["ranks"])
        if sweep else None,
    })
