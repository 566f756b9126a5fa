"""SpectrumTracker and TrackingHistory (hesslab.tracking).

Oracles: dense float64 Hessians, gradients and losses built with torch.autograd at the
parameters of each measured step (numpy ``eigh`` for the top eigenvalues and the
concentration, the exact trace); the file itself, reloaded while the loop runs and after
a simulated crash; snapshots of the model's modes, flags, gradients, buffers and random
state taken around each measurement.
"""

from __future__ import annotations

import json
import math
import sys
import types
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import hesslab.solvers
from hesslab.analysis.powerlaw import power_law_fit
from hesslab.errors import HesslabError
from hesslab.solvers import SpectralDensity
from hesslab.tracking import MEASURES, SpectrumTracker, TrackingHistory, preserved_state
from tests import models

CE = nn.CrossEntropyLoss()
#: Small settings for a 51-parameter model: a measurement takes a fraction of a second.
SMALL = dict(k=4, density_options={"num_steps": 20, "num_probes": 2}, trace_options={"num_matvecs": 12},
             outlier_options={"window": 4})



def problem(seed: int = 0, **kwargs):
    model = models.mlp(hidden=(6,), seed=seed, **kwargs)
    return model, models.classification_data(24, 4, 3, seed=seed)


def sgd_step(model: nn.Module, data, opt: torch.optim.Optimizer) -> None:
    model.train()
    opt.zero_grad()
    CE(model(data[0]), data[1]).backward()
    opt.step()


def dense_reference(model: nn.Module, data) -> tuple[float, np.ndarray, np.ndarray]:
    """(loss, H, g) of the mean cross-entropy, float64, by plain autograd in eval mode."""
    X, y = data
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, shapes, sizes = [n for n, _ in named], [p.shape for _, p in named], [p.numel() for _, p in named]
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(model.named_buffers())
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of(flat):
        params = {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return CE(functional_call(model, {**fixed, **params}, (X,)), y)

    training = model.training
    model.eval()
    try:
        H = torch.autograd.functional.hessian(loss_of, theta)
        g = torch.autograd.functional.jacobian(loss_of, theta)
        return float(loss_of(theta)), H.numpy(), g.numpy()
    finally:
        model.train(training)


# --------------------------------------------------------------------------------------
# What is recorded
# --------------------------------------------------------------------------------------


def test_records_against_dense_references(tmp_path):
    model, data = problem(seed=0)
    n = 51
    tracker = SpectrumTracker(
        model, CE, data, path=tmp_path / "s.jsonl", k=4, lanczos_options={"tol": 1e-10},
        density_options={"num_steps": 30, "num_probes": 3}, trace_options={"num_matvecs": 3 * n},
        outlier_options={"window": 4},
    )
    assert tracker.num_params == n
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    refs = []
    for i in range(3):
        sgd_step(model, data, opt)
        out = tracker.step(i)
        assert set(out) == {"loss", *MEASURES}
        refs.append(dense_reference(model, data))
    history = SpectrumTracker.load(tracker.path)
    assert history.steps.tolist() == [0, 1, 2]
    assert history.header["num_params"] == n and history.header["k"] == 4
    for rec, (loss, H, g) in zip(history.records, refs):
        lam, U = np.linalg.eigh(H)
        lam, U = lam[::-1], U[:, ::-1]
        assert rec["loss"]["value"] == pytest.approx(loss, rel=1e-10)
        np.testing.assert_allclose(rec["top_k"]["eigenvalues"], lam[:4], rtol=1e-8)
        assert all(rec["top_k"]["converged"])
        # Hutch++ with 3n products spans the whole space: the trace is exact
        assert rec["trace"]["value"] == pytest.approx(np.trace(H), rel=1e-8)
        ref_conc = float(np.sum((U[:, :4].T @ g) ** 2) / (g @ g))
        assert rec["concentration"]["concentration"] == pytest.approx(ref_conc, rel=1e-6)
        assert rec["concentration"]["gradient_norm"] == pytest.approx(np.linalg.norm(g), rel=1e-10)
        assert rec["power_law"]["s"] == pytest.approx(power_law_fit(lam[:4]).s, rel=1e-6)
        d = rec["density"]
        nodes, weights = np.array(d["nodes"]), np.array(d["weights"])
        assert nodes.shape == weights.shape == (3, 30)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-10)
        assert nodes.min() >= lam[-1] - 1e-8 and nodes.max() <= lam[0] + 1e-8
        assert 0 <= d["negative_mass"] <= 1 and "count" in d["outliers"]
        assert rec["top_k"]["num_matvecs"] > 0 and rec["top_k"]["seconds"] >= 0
    # warm start from the previous eigenvectors from the second measurement on
    assert [r["top_k"]["warm_start"] for r in history.records] == [False, True, True]
    assert tracker.last_eigenvectors.shape == (n, 4)


def test_reload_while_running_and_every(tmp_path):
    model, data = problem(seed=1)
    tracker = SpectrumTracker(model, CE, data, every=2, path=tmp_path / "s.jsonl", **SMALL)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    measured = []
    for i in range(6):
        sgd_step(model, data, opt)
        out = tracker(i, model)  # the zoo.train on_epoch signature
        if i % 2:
            assert out is None
            continue
        measured.append(i)
        history = tracker.history()  # read the file mid-run
        assert history.steps.tolist() == measured
        assert history.records[-1] == {"step": i, **out}
    assert tracker.num_measurements == 3


def test_crash_keeps_every_completed_record(tmp_path, monkeypatch):
    model, data = problem(seed=2)
    path = tmp_path / "crash.jsonl"
    tracker = SpectrumTracker(model, CE, data, path=path, **SMALL)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        for i in range(10):
            sgd_step(model, data, opt)
            tracker.step(i)
            if i == 3:
                raise RuntimeError("simulated crash")
    history = TrackingHistory.load(path)
    assert history.steps.tolist() == [0, 1, 2, 3]
    assert all(set(r) == {"step", "loss", *MEASURES} for r in history.records)

    # a crash in the middle of a measurement keeps the measures finished before it
    def broken_trace(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hesslab.solvers, "trace", broken_trace)
    with pytest.raises(KeyboardInterrupt):
        tracker.step(4)
    history = TrackingHistory.load(path)
    assert set(history.records[-1]) == {"step", "loss", "top_k", "power_law", "concentration", "density"}
    # a line cut off while it was written (the process killed mid-write) is skipped
    with open(path, "a") as f:
        f.write('{"type": "record", "step": 5, "measure": "top_k", "eigenval')
    history = TrackingHistory.load(path)
    assert history.num_skipped_lines == 1 and history.steps.tolist() == [0, 1, 2, 3, 4]


def test_file_is_strict_json_lines(tmp_path):
    model, data = problem(seed=3)
    tracker = SpectrumTracker(model, CE, data, measures=("top_k",), path=tmp_path / "s.jsonl", k=3,
                              lanczos_options={"compute_residuals": False})
    tracker.step(0)

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    lines = tracker.path.read_text().splitlines()
    objs = [json.loads(line, parse_constant=no_constants) for line in lines]
    assert objs[0]["type"] == "header" and objs[0]["format"] == "hesslab.tracking"
    assert [o["measure"] for o in objs[1:]] == ["loss", "top_k"]
    assert objs[2]["residuals"] == [None, None, None]  # NaN residuals (not computed) as null
    assert np.isnan(np.asarray(TrackingHistory.load(tracker.path).records[0]["top_k"]["residuals"], float)).all()


def test_resume_appends_and_overwrite(tmp_path):
    model, data = problem(seed=4)
    path = tmp_path / "s.jsonl"
    kw = dict(measures=("top_k",), path=path, k=3)
    first = SpectrumTracker(model, CE, data, **kw)
    first.step(0)
    first.step(1)
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # training went on
    second = SpectrumTracker(model, CE, data, **kw)  # a resumed run continues the file
    again = second.step(1)
    second.step(2)
    history = TrackingHistory.load(path)
    assert history.steps.tolist() == [0, 1, 2]
    assert history.records[1] == {"step": 1, **again}  # step 1 measured twice: the last record wins
    assert history.records[1]["top_k"]["eigenvalues"] != history.records[0]["top_k"]["eigenvalues"]
    SpectrumTracker(model, CE, data, overwrite=True, **kw).step(7)
    assert TrackingHistory.load(path).steps.tolist() == [7]


def test_measure_errors_warn_or_raise(tmp_path):
    model, data = problem(seed=5)
    bad = dict(measures=("trace",), trace_options={"num_matvecs": 1}, k=3)
    tracker = SpectrumTracker(model, CE, data, path=tmp_path / "w.jsonl", **bad)
    with pytest.warns(UserWarning, match="trace"):
        out = tracker.step(0)
    assert "num_matvecs" in out["trace"]["error"]
    history = tracker.history()
    assert len(history.trace()[0]) == 0 and len(history.loss()[0]) == 1
    strict = SpectrumTracker(model, CE, data, path=tmp_path / "r.jsonl", on_error="raise", **bad)
    with pytest.raises(HesslabError, match="num_matvecs"):
        strict.step(0)


# --------------------------------------------------------------------------------------
# The model is left exactly as it was
# --------------------------------------------------------------------------------------


def _snapshot(model: nn.Module) -> dict:
    return {
        "modes": [m.training for m in model.modules()],
        "flags": [p.requires_grad for p in model.parameters()],
        "grad_ids": [None if p.grad is None else id(p.grad) for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "rng": torch.get_rng_state(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def _assert_same(model: nn.Module, snap: dict) -> None:
    assert [m.training for m in model.modules()] == snap["modes"]
    assert [p.requires_grad for p in model.parameters()] == snap["flags"]
    assert [None if p.grad is None else id(p.grad) for p in model.parameters()] == snap["grad_ids"]
    for p, g in zip(model.parameters(), snap["grads"]):
        assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snap["params"]))
    buffers = dict(model.named_buffers())
    assert buffers.keys() == snap["buffers"].keys()
    assert all(torch.equal(buffers[k], v) for k, v in snap["buffers"].items())
    assert torch.equal(torch.get_rng_state(), snap["rng"])
    assert torch.is_grad_enabled() == snap["grad_enabled"]


def _messy_model():
    """BatchNorm and dropout in train mode, one frozen parameter, gradients present and absent,
    one submodule in eval mode."""
    model, data = problem(seed=6, batchnorm=True, dropout=0.3)
    model.train()
    model[1].eval()  # the BatchNorm alone in eval mode
    CE(model(data[0]), data[1]).backward()
    model[0].bias.requires_grad_(False)
    model[0].bias.grad = None
    model[-1].bias.grad = None
    return model, data


@pytest.mark.parametrize("hessian_options", [{}, {"train_mode": True, "params": "4.*"}])
def test_state_restored_exactly(tmp_path, hessian_options):
    model, data = _messy_model()
    if hessian_options.get("train_mode"):
        model[3].p = 0.0  # train mode with dropout would be non-deterministic
    bn = model[1]
    stats_before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    tracker = SpectrumTracker(model, CE, data, path=tmp_path / "s.jsonl", hessian_options=hessian_options,
                              **{**SMALL, "k": 3})
    snap = _snapshot(model)
    with torch.no_grad():  # a caller's grad mode is kept too
        snap["grad_enabled"] = False
        out = tracker.step(0)
        _assert_same(model, snap)
    assert set(out) == {"loss", *MEASURES} and all("error" not in r for r in out.values())
    assert torch.equal(bn.running_mean, stats_before[0]) and torch.equal(bn.running_var, stats_before[1])
    assert torch.equal(bn.num_batches_tracked, stats_before[2])
    if hessian_options:  # the last layer only (4.weight, 4.bias)
        assert tracker.num_params == 6 * 3 + 3
    else:  # the parameters requiring grad; the loss is measured in eval mode
        assert tracker.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert out["loss"]["value"] == pytest.approx(dense_reference(model, data)[0], rel=1e-10)


def test_state_restored_when_a_measure_raises(tmp_path):
    model, data = _messy_model()
    tracker = SpectrumTracker(model, CE, data, measures=("top_k", "trace"), path=tmp_path / "s.jsonl", k=3,
                              trace_options={"num_matvecs": 1}, on_error="raise")
    snap = _snapshot(model)
    with pytest.raises(HesslabError):
        tracker.step(0)
    _assert_same(model, snap)


def test_preserved_state_undoes_everything():
    model, data = _messy_model()
    snap = _snapshot(model)
    with preserved_state(model):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(not p.requires_grad)
        model[0].weight.grad.zero_()  # in place: values restored, same object
        model[-1].weight.grad = torch.ones_like(model[-1].weight)  # replaced: the old object returns
        model[-1].bias.grad = torch.ones_like(model[-1].bias)  # was None: None again
        model[1].train()
        model[1](torch.randn(8, 6, dtype=torch.float64))  # BatchNorm running statistics move
        torch.rand(5)  # the random stream moves
    _assert_same(model, snap)


# --------------------------------------------------------------------------------------
# Lightning, without requiring it
# --------------------------------------------------------------------------------------


def _fake_lightning(monkeypatch, package: str = "lightning") -> type:
    class Callback:  # the base class Lightning's Trainer expects
        pass

    if package == "lightning":
        root, sub = types.ModuleType("lightning"), types.ModuleType("lightning.pytorch")
        sub.Callback = Callback
        root.pytorch = sub
        monkeypatch.setitem(sys.modules, "lightning", root)
        monkeypatch.setitem(sys.modules, "lightning.pytorch", sub)
    else:
        monkeypatch.setitem(sys.modules, "lightning", None)
        monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
        mod = types.ModuleType("pytorch_lightning")
        mod.Callback = Callback
        monkeypatch.setitem(sys.modules, "pytorch_lightning", mod)
    return Callback


@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_lightning_callback(tmp_path, monkeypatch, package):
    Callback = _fake_lightning(monkeypatch, package)
    model, data = problem(seed=7)
    tracker = SpectrumTracker(model, CE, data, measures=("top_k",), path=tmp_path / "s.jsonl", k=3, every=2)
    epochs = tracker.lightning_callback()
    assert isinstance(epochs, Callback) and epochs.tracker is tracker
    for epoch in range(3):
        trainer = SimpleNamespace(current_epoch=epoch, global_step=10 * epoch)
        epochs.on_train_batch_end(trainer, model, None, data, 0)  # not this hook's job
        epochs.on_train_epoch_end(trainer, model)
    assert tracker.history().steps.tolist() == [0, 2]
    batches = tracker.lightning_callback(on="train_batch_end")
    batches.on_train_batch_end(SimpleNamespace(current_epoch=3, global_step=40), model, None, data, 0)
    batches.on_train_epoch_end(SimpleNamespace(current_epoch=3, global_step=40), model)
    assert tracker.history().steps.tolist() == [0, 2, 40]
    with pytest.raises(HesslabError, match="on"):
        tracker.lightning_callback(on="validation_end")


def test_without_lightning(tmp_path, monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    model, data = problem(seed=8)
    tracker = SpectrumTracker(model, CE, data, measures=("top_k",), path=tmp_path / "s.jsonl", k=3)
    with pytest.raises(HesslabError, match="Lightning is not installed"):
        tracker.lightning_callback()
    tracker.on_train_epoch_end(SimpleNamespace(current_epoch=0), model)  # the duck-typed hook
    assert tracker.history().steps.tolist() == [0]


# --------------------------------------------------------------------------------------
# History: accessors, files, plots
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    model, data = problem(seed=9)
    path = tmp_path_factory.mktemp("hist") / "s.jsonl"
    tracker = SpectrumTracker(model, CE, data, path=path, every=1, **SMALL)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for i in range(0, 8, 2):
        sgd_step(model, data, opt)
        sgd_step(model, data, opt)
        tracker.step(i)
    return TrackingHistory.load(path)


def test_history_accessors(history, tmp_path):
    steps = [0, 2, 4, 6]
    assert len(history) == 4 and history.steps.tolist() == steps
    s, lam = history.top_eigenvalues()
    assert s.tolist() == steps and lam.shape == (4, 4) and np.all(np.diff(lam, axis=1) <= 0)
    s, c = history.concentration()
    assert s.tolist() == steps and np.all((c >= 0) & (c <= 1))
    s, value, err = history.trace()
    assert s.tolist() == steps and np.all(err >= 0)
    assert history.loss()[0].tolist() == steps and history.outlier_counts()[0].tolist() == steps
    d = history.density(4)
    assert isinstance(d, SpectralDensity) and d.nodes.shape == (2, 20) and d.reorthogonalize == "full"
    with pytest.raises(HesslabError, match="step"):
        history.density(3)
    s, grid, D = history.density_map(grid_size=300)
    assert D.shape == (4, 300)
    np.testing.assert_allclose(D.sum(axis=1) * (grid[1] - grid[0]), 1.0, atol=1e-3)  # each row a density
    # save / load round trip (a tracker file again)
    back = TrackingHistory.load(history.save(tmp_path / "copy.jsonl"))
    assert back.records == history.records and back.header == history.header
    with pytest.raises(HesslabError, match="header"):
        (tmp_path / "other.jsonl").write_text('{"a": 1}\n')
        TrackingHistory.load(tmp_path / "other.jsonl")
    with pytest.raises(HesslabError, match="no such file"):
        TrackingHistory.load(tmp_path / "missing.jsonl")


def test_history_plot(history, tmp_path):
    fig = history.plot()
    titles = [ax.get_title() for ax in fig.axes]
    assert any("density" in t for t in titles) and any("Top-4" in t for t in titles)
    assert any("concentration" in t for t in titles) and any("Trace" in t for t in titles)
    fig.savefig(tmp_path / "tracking.png", dpi=80)
    plt.close(fig)


def test_plot_with_some_measures_missing(tmp_path):
    model, data = problem(seed=10)
    tracker = SpectrumTracker(model, CE, data, measures=("trace",), path=tmp_path / "t.jsonl", k=3,
                              trace_options={"num_matvecs": 9})
    tracker.step(0)
    tracker.step(1)
    fig = tracker.history().plot()
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "density: not recorded" in texts and "top_k: not recorded" in texts
    fig.savefig(tmp_path / "partial.png", dpi=60)
    plt.close(fig)


def test_bad_arguments(tmp_path):
    model, data = problem(seed=11)
    path = tmp_path / "s.jsonl"
    with pytest.raises(HesslabError, match="measures"):
        SpectrumTracker(model, CE, data, measures=("top_k", "hessian"), path=path)
    with pytest.raises(HesslabError, match="every"):
        SpectrumTracker(model, CE, data, every=0, path=path)
    with pytest.raises(HesslabError, match="k"):
        SpectrumTracker(model, CE, data, k=51, path=path)
    with pytest.raises(HesslabError, match="model"):
        SpectrumTracker("model", CE, data, path=path)
    with pytest.raises(HesslabError, match="on_error"):
        SpectrumTracker(model, CE, data, path=path, on_error="ignore")
    with pytest.raises(HesslabError, match="density_options"):
        SpectrumTracker(model, CE, data, path=path, density_options=[("num_steps", 3)])
    tracker = SpectrumTracker(model, CE, data, path=path, measures=("top_k",), k=3)
    with pytest.raises(HesslabError, match="step_index"):
        tracker.step(1.5)
    assert math.isclose(tracker.every, 1)


# --------------------------------------------------------------------------------------
# The measurement pipeline the tracker shares with hesslab demo and analyze
# --------------------------------------------------------------------------------------


def test_pipeline_defaults_records_and_numbers(tmp_path):
    from hesslab.analysis.pipeline import DEFAULTS, measure_spectrum
    from hesslab.demo import Budget
    from hesslab.linops import Hessian

    model, data = problem(seed=12)
    H = Hessian(model, CE, data)
    seen = []
    found = measure_spectrum(H, MEASURES, k=4, outlier_options={"window": 4},
                             on_record=lambda name, rec, res: seen.append(name))
    assert seen == list(found.records) == ["loss", "top_k", "power_law", "concentration", "density", "trace"]
    assert not found.errors
    n = 51
    d, t = found.results["density"], found.results["trace"]
    # one set of defaults: SLQ steps capped at n, 8 probes, the demo's grid; Hutch++ with 99 products
    assert d.nodes.shape == (DEFAULTS["density"]["num_probes"], min(DEFAULTS["density"]["num_steps"], n))
    assert d.grid.size == DEFAULTS["density"]["grid_size"] and t.method == "hutch++" and t.num_matvecs == 99
    budget = Budget()
    assert (budget.slq_steps, budget.slq_probes, budget.density_grid, budget.trace_matvecs, budget.lanczos_tol) == (
        80, 8, 4000, 99, 1e-6)
    # the tracker writes the same records, with the same values (to rounding: the product
    # path of a Hessian may differ between two runs, which can move a node near 0 across it)
    tracker = SpectrumTracker(model, CE, data, path=tmp_path / "s.jsonl", k=4, outlier_options={"window": 4})
    written = tracker.measure(0)
    for name, rec in found.records.items():
        assert set(written[name]) == {"type", "step", "measure", "time", *rec} | ({"warm_start"} if name == "top_k"
                                                                                  else set())
        for key, value in rec.items():
            if key in ("seconds", "negative_mass_strict", "negative_mass", "outliers"):
                continue
            if isinstance(value, (str, bool, dict)) or value is None:
                assert written[name][key] == value, (name, key)
            else:
                np.testing.assert_allclose(written[name][key], value, rtol=1e-5, atol=1e-9, err_msg=f"{name} {key}")
    assert tracker.history().header["defaults"]["density"]["grid_size"] == 4000
    nb = found.numbers()
    assert nb["lambda_1"] == pytest.approx(found.records["top_k"]["eigenvalues"][0])
    assert nb["trace"] == found.records["trace"]["value"] and nb["hessian_matvecs"] == found.num_matvecs > 0
    assert json.dumps(nb, allow_nan=False)


def test_pipeline_failures_are_recorded_or_raised():
    from hesslab.analysis.pipeline import measure_spectrum
    from hesslab.linops import Hessian

    model, data = problem(seed=13)
    H = Hessian(model, CE, data)
    found = measure_spectrum(H, ("top_k", "power_law", "concentration", "trace"), k=3,
                             lanczos_options={"max_steps": 0}, trace_options={"num_matvecs": 1})
    assert set(found.errors) == {"top_k", "power_law", "concentration", "trace"}
    assert "see top_k" in found.errors["power_law"] and "num_matvecs" in found.errors["trace"]
    assert all(found.records[m]["error"] == found.errors[m] for m in found.errors)
    assert "value" in found.records["loss"] and not found.results
    with pytest.raises(HesslabError, match="num_matvecs"):
        measure_spectrum(H, ("trace",), trace_options={"num_matvecs": 1},
                         on_error=lambda name, exc: (_ for _ in ()).throw(exc))
    with pytest.raises(HesslabError, match="measures"):
        measure_spectrum(H, ("top_k", "hessian"))


def _checkpointed(tmp_path, model, data, name, checkpoints: bool):
    """A tracker of top_k and density, with per-step checkpoints under tmp_path or none."""
    lanczos = {"tol": 1e-10, "checkpoint_every": 2}
    density = {"num_steps": 20, "num_probes": 2}
    if checkpoints:
        lanczos["checkpoint"], density["checkpoint"] = tmp_path / "c.pt", tmp_path / "d.pt"
    return SpectrumTracker(model, CE, data, measures=("top_k", "density"), path=tmp_path / f"{name}.jsonl", k=4,
                           lanczos_options=lanczos, density_options=density)


def test_checkpoint_option_is_per_step(tmp_path):
    """Issue 12: a checkpoint in the options is a template; each step writes its own file,
    so a changing model logs fresh eigenvalues (no stale result, no refusal at step 2)."""
    from hesslab.tracking import step_checkpoint

    assert str(step_checkpoint("a/c.pt", 123)) == "a/c.step000123.pt"
    assert str(step_checkpoint("c", 7)) == "c.step000007"
    model, data = problem(seed=3)
    tracker = _checkpointed(tmp_path, model, data, "ckpt", True)
    fresh = _checkpointed(tmp_path, model, data, "fresh", False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lam1 = []
    for i in range(3):
        sgd_step(model, data, opt)
        out, ref = tracker.step(i), fresh.step(i)
        assert "error" not in out["top_k"] and "error" not in out["density"]
        assert out["top_k"]["eigenvalues"] == ref["top_k"]["eigenvalues"]
        assert out["density"]["nodes"] == ref["density"]["nodes"]
        lam1.append(out["top_k"]["eigenvalues"][0])
    assert len(set(lam1)) == 3
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [f"{c}.step00000{i}.pt" for c in "cd" for i in range(3)]


def test_interrupted_tracker_step_resumes(tmp_path, monkeypatch):
    from hesslab.linops import Hessian

    model, data = problem(seed=4)
    tracker = _checkpointed(tmp_path, model, data, "ckpt", True)
    fresh = _checkpointed(tmp_path, model, data, "fresh", False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sgd_step(model, data, opt)
    tracker.step(0), fresh.step(0)
    sgd_step(model, data, opt)
    calls = {"n": 0, "limit": None}
    original = Hessian.matmat

    def counted(self, V):
        calls["n"] += 1
        if calls["limit"] is not None and calls["n"] > calls["limit"]:
            raise KeyboardInterrupt
        return original(self, V)

    monkeypatch.setattr(Hessian, "matmat", counted)
    ref = fresh.step(1)
    fresh_calls = calls["n"]
    calls.update(n=0, limit=7)  # interrupted in the middle of step 1's Lanczos run
    with pytest.raises(KeyboardInterrupt):
        tracker.step(1)
    assert (tmp_path / "c.step000001.pt").exists()
    calls.update(n=0, limit=None)
    out = tracker.step(1)  # resumes from the file of step 1 (the same warm start)
    assert out["top_k"]["eigenvalues"] == ref["top_k"]["eigenvalues"]
    assert out["density"]["nodes"] == ref["density"]["nodes"]
    assert calls["n"] <= fresh_calls - 7 + 2  # the completed products are not repeated
