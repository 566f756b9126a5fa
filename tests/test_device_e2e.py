"""End to end on the ``device`` fixture: the public API on cpu and, where built, cuda.

The op tests (test_lanczos_ops, test_kron_ops, test_ops_paths) pin every kernel against
its twin; this file runs what users call (operator products, ``lanczos``,
``spectral_density``, ``trace``, ``KFAC``, ``SpectrumTracker``, a checkpoint resumed) on
the device, with the model and the data there, against a CPU float64 reference:

* products of ``Hessian`` and ``GGN`` against dense ``torch.func`` oracles (float64);
* ``lanczos`` and ``trace`` against ``numpy.linalg.eigh`` / the exact trace of the oracle;
* ``spectral_density`` against the same call on the CPU (same seed: equal to rounding);
* ``KFAC`` factors, products, ``topk`` and ``power`` against the CPU operator;
* one ``SpectrumTracker`` measurement against the CPU one;
* resume on the device: a checkpointed run interrupted and resumed gives bit for bit
  the uninterrupted run's result on that device (the promise in hesslab/_ops.py);
* benchmarks/bench_gpu_e2e.py ``--quick --device cpu`` runs end to end (tiny models, every
  task, JSON and markdown; the one test here that takes more than a second or two);

Sizes are tiny (a 51-parameter MLP): the whole file takes a few seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hesslab as hl

from tests import models
from tests.test_linops import dense_ggn, dense_hessian

CE = nn.CrossEntropyLoss()
ROOT = Path(__file__).resolve().parents[1]


def _problem(device, dtype=torch.float64, seed=0):
    model = models.mlp(hidden=(6,), seed=seed, dtype=dtype, device=device)
    X, y = models.classification_data(24, 4, 3, seed=seed, dtype=dtype, device=device)
    return model, (X, y)


def _dense(kind: str) -> torch.Tensor:
    """The CPU float64 oracle of the problem above."""
    model, (X, y) = _problem("cpu")
    return (dense_hessian if kind == "hessian" else dense_ggn)(model, CE, X, y)


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _assert_close(actual, expected, rtol):
    """Agreement relative to the largest entry of ``expected``."""
    actual, expected = _np(actual), _np(expected)
    scale = max(np.abs(expected).max(), 1e-300)
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_operator_products_on_device_match_dense(device, kind):
    model, data = _problem(device)
    op = (hl.Hessian if kind == "hessian" else hl.GGN)(model, CE, data)
    D = _dense(kind)
    V = torch.randn(D.shape[0], 3, dtype=torch.float64)
    out = op @ V.to(device)
    assert out.device.type == device.type
    _assert_close(out, D @ V, 1e-10)


def test_lanczos_on_device_matches_dense_eigenvalues(device):
    model, data = _problem(device)
    H = hl.Hessian(model, CE, data)
    lam = np.linalg.eigh(_np(_dense("hessian")))[0][::-1]
    top = hl.lanczos(H, k=4, tol=1e-10)
    np.testing.assert_allclose(_np(top.eigenvalues), lam[:4], rtol=1e-8)
    vecs = top.eigenvectors
    assert vecs.device.type == device.type
    D = _dense("hessian")
    _assert_close(D @ vecs.cpu(), vecs.cpu() * top.eigenvalues.cpu(), 1e-7)


def test_spectral_density_on_device_matches_cpu(device):
    model, data = _problem(device)
    d = hl.spectral_density(hl.Hessian(model, CE, data), num_steps=20, num_probes=3, seed=5)
    ref_model, ref_data = _problem("cpu")
    ref = hl.spectral_density(hl.Hessian(ref_model, CE, ref_data), num_steps=20, num_probes=3, seed=5)
    lam = np.linalg.eigh(_np(_dense("hessian")))[0]
    np.testing.assert_allclose(_np(d.nodes), _np(ref.nodes), rtol=1e-7, atol=1e-9 * abs(lam).max())
    np.testing.assert_allclose(_np(d.weights), _np(ref.weights), rtol=1e-6, atol=1e-9)
    assert _np(d.nodes).min() >= lam[0] - 1e-8 and _np(d.nodes).max() <= lam[-1] + 1e-8


def test_trace_on_device_is_exact_with_a_full_sketch(device):
    model, data = _problem(device)
    n = models.num_params(model)
    t = hl.trace(hl.Hessian(model, CE, data), num_matvecs=3 * n, method="hutch++", seed=3)
    assert t.value == pytest.approx(float(torch.trace(_dense("hessian"))), rel=1e-8)
    h = hl.trace(hl.Hessian(model, CE, data), num_matvecs=40, method="hutchinson", seed=3)
    assert abs(h.value - float(torch.trace(_dense("hessian")))) <= 4 * h.std_error + 1e-10


def test_kfac_on_device_matches_cpu(device):
    model, data = _problem(device)
    K = hl.KFAC(model, CE, data, curvature="ggn")  # PSD: every power exists
    ref_model, ref_data = _problem("cpu")
    R = hl.KFAC(ref_model, CE, ref_data, curvature="ggn")
    assert K.layer_names == R.layer_names
    for name, f in K.factors.items():
        assert f.A.device.type == device.type
        _assert_close(f.A, R.factors[name].A, 1e-12)
        _assert_close(f.B, R.factors[name].B, 1e-12)
    V = torch.randn(K.shape[0], 3, dtype=torch.float64)
    Vd = V.to(device)
    _assert_close(K @ Vd, R @ V, 1e-12)
    _assert_close(K.power(-1, damping=1e-2) @ Vd, R.power(-1, damping=1e-2) @ V, 1e-10)
    _assert_close(K.power(0.5, damping=0.1) @ Vd, R.power(0.5, damping=0.1) @ V, 1e-10)
    _assert_close(K.eigenvalues(), R.eigenvalues(), 1e-12)
    for name in K.layer_names:
        values, vecs = K.topk(name, 4)
        rvalues, rvecs = R.topk(name, 4)
        _assert_close(values, rvalues, 1e-12)
        # eigenvectors up to sign: compare the projectors
        _assert_close(vecs.cpu() @ vecs.cpu().T, rvecs @ rvecs.T, 1e-9)


def test_spectrum_tracker_measurement_on_device_matches_cpu(device, tmp_path):
    small = dict(k=3, lanczos_options={"tol": 1e-10}, density_options={"num_steps": 15, "num_probes": 2},
                 trace_options={"num_matvecs": 12}, outlier_options={"window": 4})
    records = []
    for where, sub in ((device, "dev"), (torch.device("cpu"), "cpu")):
        model, data = _problem(where)
        tracker = hl.SpectrumTracker(model, CE, data, path=tmp_path / f"{sub}.jsonl", **small)
        tracker.step(0)
        records.append(hl.SpectrumTracker.load(tracker.path).records[0])
    rec, ref = records
    assert rec["loss"]["value"] == pytest.approx(ref["loss"]["value"], rel=1e-12)
    np.testing.assert_allclose(rec["top_k"]["eigenvalues"], ref["top_k"]["eigenvalues"], rtol=1e-8)
    assert rec["trace"]["value"] == pytest.approx(ref["trace"]["value"], rel=1e-8)
    np.testing.assert_allclose(rec["density"]["nodes"], ref["density"]["nodes"], rtol=1e-6, atol=1e-8)
    lam = np.linalg.eigh(_np(_dense("hessian")))[0][::-1]
    np.testing.assert_allclose(rec["top_k"]["eigenvalues"], lam[:3], rtol=1e-8)


@pytest.mark.parametrize("solver", ["lanczos", "slq"])
def test_checkpoint_resumed_on_device_gives_the_identical_result(device, tmp_path, solver):
    """The determinism promise of hesslab/_ops.py on the device: resumed on the same device
    (and GPU model, and build), a run continues bit for bit."""
    A = _dense("hessian").to(device)
    run = {
        "lanczos": lambda op, **kw: hl.lanczos(op, k=5, tol=1e-10, **kw),
        "slq": lambda op, **kw: hl.spectral_density(op, num_steps=22, num_probes=3, **kw),
    }[solver]
    path = tmp_path / "state.pt"
    full, resumed = models.interrupted_and_resumed(run, A, 31, path)
    for key, value in full.to_dict().items():
        if key != "num_matvecs":
            np.testing.assert_array_equal(np.asarray(value), np.asarray(resumed.to_dict()[key]), err_msg=key)


def test_gpu_e2e_benchmark_quick_cpu_runs_end_to_end(tmp_path):
    """benchmarks/bench_gpu_e2e.py --quick --device cpu: tiny models, every measure, JSON + table."""
    out = tmp_path / "e2e.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu_e2e.py"), "--quick", "--device", "cpu",
         "--json", str(out), "--markdown", str(tmp_path / "e2e.md")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert {r["model"] for r in report["rows"]} == {"resnet18", "gpt2"}
    ours = [r for r in report["rows"] if r["library"] == "hesslab"]
    assert {r["task"] for r in ours} >= {"product", "top10", "slq", "trace"}
    for r in ours:
        assert r["seconds"] > 0 and 0 <= r["outside_products_share"] <= 1
    assert "| model |" in (tmp_path / "e2e.md").read_text()
