"""The ``hesslab`` command end to end: ``demo --quick``, ``analyze`` on tests/cli_fixtures.py,
every bad-input case (exit code 3, a message naming the option) and the console script."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hesslab as hl
from hesslab.cli import main
from hesslab.report import load_results, result_types

from . import cli_fixtures

FIX = "tests.cli_fixtures"
ROOT = Path(__file__).resolve().parent.parent


def _run(capsys, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ======================================================================================
# demo --quick (run once, checked by several tests)
# ======================================================================================


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import io
    from contextlib import redirect_stderr, redirect_stdout

    so, se = io.StringIO(), io.StringIO()
    with redirect_stdout(so), redirect_stderr(se):
        rc = main(["demo", "--quick", "--out", str(out), "--json", "--seed", "0"])
    return rc, so.getvalue(), se.getvalue(), out


def test_demo_exit_code_and_json_on_stdout(demo_run):
    rc, stdout, stderr, out = demo_run
    assert rc == 0, stderr[-3000:]
    summary = json.loads(stdout)  # nothing but JSON on stdout
    assert summary == json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"mlp", "mlp_bn", "cnn", "cnn_bn"}
    for label, nb in summary["models"].items():
        assert nb["lambda_1"] > 0 and nb["trace"] > 0, label
        assert 0 <= nb["concentration"] <= 1
        assert nb["max_relative_residual"] < 1e-2
        assert isinstance(nb["is_power_law"], bool)
    assert "hesslab demo" in stderr  # the log goes to stderr
    assert summary["rank"]["sweep_all_match"] is True
    assert len(summary["files"]["checkpoints"]) >= 4 * 3
    for path in summary["files"]["checkpoints"]:
        assert (out / path).is_file()


def test_demo_report_references_every_plot(demo_run):
    rc, _, _, out = demo_run
    html = (out / "report.html").read_text(encoding="utf-8")
    pngs = sorted(p.stem for p in (out / "plots").glob("*.png"))
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(Path(p).stem for p in summary["files"]["plots"]) == pngs
    # the plots the issue asks for
    for name in ("density", "top_eigenvalues_mlp", "kfac_overlap_mlp", "density_evolution", "rank_sweep",
                 "concentration", "outliers", "eigenvector_low_rank", "tracking"):
        assert name in pngs, name
    embedded = re.findall(r'<img id="fig-([^"]+)"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert sorted(n for n, _ in embedded) == pngs
    for _, b64 in embedded[:3]:
        assert len(b64) > 1000
    assert "http://" not in html and "https://" not in html  # self-contained
    for paper in ("Ghorbani", "Wu", "Xie", "Singh"):
        assert paper in html


def test_demo_transformer_and_its_per_block_spectra(demo_run):
    rc, _, stderr, out = demo_run
    assert rc == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    tr = summary["transformer"]
    assert tr["num_params"] > 1000 and tr["test_accuracy"] > 0.3  # it learned something in the quick preset
    bs = summary["block_spectra"]
    assert set(bs) == {"transformer", "mlp"}
    names = set(bs["transformer"]["blocks"])
    assert {"encoder.0.self_attn.q", "encoder.0.self_attn.k", "encoder.0.self_attn.v", "head"} <= names
    for label in bs:
        assert 0.0 <= bs[label]["heterogeneity"] <= 1.0
    assert (out / "plots" / "block_spectra_transformer.png").is_file()
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Per-block spectra" in html and "Zhang" in html
    assert f"{bs['transformer']['heterogeneity']:.3f} for the transformer" in html  # the sentence uses the numbers
    assert isinstance(load_results(out)["transformer/block_spectra"], hl.BlockSpectra)


def test_demo_results_parse_back_into_result_objects(demo_run):
    _, _, _, out = demo_run
    summary = json.loads((out / "summary.json").read_text())
    types = result_types()
    loaded = load_results(out)
    assert len(loaded) == len(summary["results"]) > 40
    for entry in summary["results"]:
        obj = loaded[entry["name"]]
        assert type(obj).__name__ == entry["type"]
        assert isinstance(obj, types[entry["type"]])
        if "json" in entry:
            assert json.loads((out / entry["json"]).read_text())["type"] == entry["type"]
    top = loaded["mlp/top_k"]
    assert isinstance(top, hl.EigenResult)
    assert np.allclose(top.eigenvalues[0], summary["models"]["mlp"]["lambda_1"])
    assert isinstance(loaded["mlp/density"], hl.SpectralDensity)
    assert isinstance(loaded["mlp/power_law"], hl.PowerLawFit)
    assert isinstance(loaded["mlp/trace"], hl.TraceEstimate)
    # the NPZ twin keeps the eigenvectors the JSON leaves out
    npz = load_results(out, prefer="npz")["mlp/top_k"]
    assert npz.eigenvectors.shape == (summary["models"]["mlp"]["num_params"], summary["models"]["mlp"]["k_top"])
    assert np.allclose(npz.eigenvalues, top.eigenvalues)


# ======================================================================================
# analyze
# ======================================================================================


def _dense_top(model, data) -> float:
    H = hl.Hessian(model, torch.nn.CrossEntropyLoss(), data, dtype=torch.float64)
    return float(torch.linalg.eigvalsh(H.to_dense()).max())


def test_analyze_fixture_model(tmp_path, capsys):
    ckpt = tmp_path / "weights.pt"
    model = cli_fixtures.tiny_mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    torch.save(model.state_dict(), ckpt)
    rc, out, err = _run(capsys, ["analyze", "--model", f"{FIX}:tiny_mlp", "--checkpoint", ckpt,
                                 "--data", f"{FIX}:loader", "--out", tmp_path / "run", "--k", 6, "--slq-steps", 30,
                                 "--slq-probes", 4, "--trace-matvecs", 30, "--json"])
    assert rc == 0, err[-3000:]
    summary = json.loads(out)
    nb = summary["models"]["model"]
    assert nb["num_params"] == 75 and nb["num_samples"] == cli_fixtures.NUM_SAMPLES
    # the checkpoint was loaded: λ₁ is that of the scaled model, over all three batches
    batches = list(cli_fixtures.loader())
    assert nb["lambda_1"] == pytest.approx(_dense_top(model, batches), rel=1e-4)
    assert set(summary["kfac"]["model"]["layers"]) == {"0", "2"}
    loaded = load_results(tmp_path / "run")
    for name in ("model/top_k", "model/density", "model/trace", "model/power_law", "model/concentration",
                 "model/kfac/0/overlap"):
        assert name in loaded, name
    html = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert 'id="fig-density"' in html and 'id="fig-kfac_overlap_model"' in html


def test_analyze_custom_loss_single_batch_table(tmp_path, capsys):
    rc, out, err = _run(capsys, ["analyze", "--model", f"{FIX}:tiny_mlp", "--data", f"{FIX}:single_batch",
                                 "--loss", f"{FIX}:my_cross_entropy", "--measures", "top_k,trace",
                                 "--out", tmp_path, "--k", 4, "--trace-matvecs", 12])
    assert rc == 0, err
    assert "λ₁" in out and "report.html" in out  # the human-readable table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["models"]["model"]["lambda_1"] == pytest.approx(
        _dense_top(cli_fixtures.tiny_mlp(), cli_fixtures.single_batch()), rel=1e-4)
    assert "density" not in summary["models"]["model"] and "power_law_s" not in summary["models"]["model"]


def test_analyze_passes_the_slq_reorthogonalization(tmp_path, capsys):
    rc, _, err = _run(capsys, ["analyze", "--model", f"{FIX}:tiny_mlp", "--data", f"{FIX}:loader",
                               "--measures", "density", "--out", tmp_path, "--slq-steps", 40, "--slq-probes", 3,
                               "--slq-reorthogonalize", "local", "--quiet"])
    assert rc == 0, err
    got = load_results(tmp_path)["model/density"]
    H = hl.Hessian(cli_fixtures.tiny_mlp(), torch.nn.CrossEntropyLoss(), list(cli_fixtures.loader()))
    runs = {mode: hl.spectral_density(H, num_steps=40, num_probes=3, seed=0, reorthogonalize=mode)
            for mode in ("local", "full")}
    np.testing.assert_allclose(got.weights, runs["local"].weights, atol=1e-6)
    assert np.abs(got.weights - runs["full"].weights).max() > 1e-3  # 40 steps for 75 parameters: ghosts


@pytest.fixture
def mismatched_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(cli_fixtures.other_mlp().state_dict(), path)
    return path


BAD = {
    "model module missing": (["--model", "no_such_pkg.models:net"], "--model"),
    "model attribute missing": (["--model", f"{FIX}:no_such_factory"], "--model"),
    "model factory raises": (["--model", f"{FIX}:broken_factory"], "--model"),
    "model spec without colon": (["--model", "tests.cli_fixtures"], "--model"),
    "checkpoint missing": (["--checkpoint", "/nonexistent/weights.pt"], "--checkpoint"),
    "checkpoint mismatch": (["--checkpoint", "MISMATCHED"], "--checkpoint"),
    "data wrong shape": (["--data", f"{FIX}:wrong_shape_loader"], "--data"),
    "data module missing": (["--data", "no_such_pkg.data:loader"], "--data"),
    "unknown measure": (["--measures", "top_k,bogus"], "--measures"),
    "unknown loss": (["--loss", "hinge"], "--loss"),
    "loss not importable": (["--loss", f"{FIX}:no_such_loss"], "--loss"),
    "kfac with a custom loss": (["--loss", f"{FIX}:my_cross_entropy", "--measures", "kfac"], "--measures"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_analyze_bad_input_exit_3(case, tmp_path, capsys, mismatched_checkpoint):
    extra, option = BAD[case]
    extra = [str(mismatched_checkpoint) if a == "MISMATCHED" else a for a in extra]
    argv = {"--model": f"{FIX}:tiny_mlp", "--data": f"{FIX}:loader", "--out": str(tmp_path / "o"),
            "--measures": "top_k"}
    for flag, value in zip(extra[::2], extra[1::2]):
        argv[flag] = value
    rc, out, err = _run(capsys, ["analyze"] + [x for kv in argv.items() for x in kv])
    assert rc == 3, (case, err)
    assert err.startswith("hesslab: error: " + option), (case, err)
    assert out == ""
    assert not (tmp_path / "o" / "summary.json").exists()


def test_checkpoint_mismatch_message_names_the_keys(tmp_path, capsys, mismatched_checkpoint):
    rc, _, err = _run(capsys, ["analyze", "--model", f"{FIX}:tiny_mlp", "--data", f"{FIX}:loader",
                               "--checkpoint", mismatched_checkpoint, "--out", tmp_path])
    assert rc == 3 and "does not match the model" in err and "size mismatch" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_analyze_cuda_without_gpu(tmp_path, capsys):
    rc, _, err = _run(capsys, ["analyze", "--model", f"{FIX}:tiny_mlp", "--data", f"{FIX}:loader",
                               "--device", "cuda", "--out", tmp_path])
    assert rc == 3 and "--device" in err


def test_argparse_errors_exit_2(capsys):
    rc, _, err = _run(capsys, ["analyze", "--data", f"{FIX}:loader"])  # --model missing
    assert rc == 2 and "--model" in err
    rc, _, _ = _run(capsys, ["demo", "--seed", "x"])
    assert rc == 2
    rc, _, _ = _run(capsys, ["analyze", "--model", "a:b", "--data", "a:b", "--k", "0"])
    assert rc == 2


# ======================================================================================
# the console script, in a subprocess
# ======================================================================================


def test_console_script_exit_code_and_streams(tmp_path):
    script = Path(sys.executable).with_name("hesslab")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "hesslab"]
    proc = subprocess.run(cmd + ["analyze", "--model", f"{FIX}:tiny_mlp", "--data", f"{FIX}:wrong_shape_loader",
                                 "--out", str(tmp_path), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    assert "hesslab: error: --data: the model from --model fails on the first batch" in proc.stderr
    assert "(16, 5)" in proc.stderr  # the shape it got


def _cli(args, cwd=ROOT, timeout=120):
    script = Path(sys.executable).with_name("hesslab")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "hesslab"]
    return subprocess.run(cmd + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


SHARED_OPTIONS = {
    "demo --out a file": (["demo", "--quick", "--out", "FILE"], "--out", "is a file"),
    "demo --out under a file": (["demo", "--quick", "--out", "FILE/sub"], "--out", "cannot be created"),
    "demo --threads -3": (["demo", "--quick", "--threads", "-3", "--out", "DIR"], "--threads", "-3"),
    "analyze --out a file": (["analyze", "--model", f"{FIX}:tiny_mlp", "--data", f"{FIX}:loader", "--out", "FILE"],
                             "--out", "is a file"),
    "analyze --out under a file": (["analyze", "--model", f"{FIX}:tiny_mlp", "--data", f"{FIX}:loader",
                                    "--out", "FILE/sub/deeper"], "--out", "cannot be created"),
    "analyze --threads -3": (["analyze", "--model", f"{FIX}:tiny_mlp", "--data", f"{FIX}:loader", "--threads", "-3",
                              "--out", "DIR"], "--threads", "-3"),
}


@pytest.mark.parametrize("case", list(SHARED_OPTIONS))
def test_shared_options_exit_3_without_traceback(case, tmp_path):
    args, option, words = SHARED_OPTIONS[case]
    file = tmp_path / "file.txt"
    file.write_text("not a folder")
    args = [a.replace("FILE", str(file)).replace("DIR", str(tmp_path / "run")) for a in args]
    proc = _cli(args)
    assert proc.returncode == 3, (case, proc.stderr[-2000:])
    assert proc.stderr.startswith("hesslab: error: " + option), (case, proc.stderr)
    assert words in proc.stderr and "Traceback" not in proc.stderr, (case, proc.stderr)
    assert proc.stdout == ""
    assert file.read_text() == "not a folder" and not (tmp_path / "run").exists()


# ======================================================================================
# parts that another module provides: "not available", not a crash
# ======================================================================================


def test_missing_module_is_reported_not_available(monkeypatch):
    import hesslab.linops
    from hesslab import demo
    from hesslab.demo.sections import wu_section
    from hesslab.report import Report

    monkeypatch.delattr(hesslab.linops, "KFAC")  # `from hesslab.linops import KFAC` now fails
    ka = demo.kfac_analysis("m", cli_fixtures.tiny_mlp(), torch.nn.CrossEntropyLoss(), cli_fixtures.single_batch())
    assert "kfac" in ka.unavailable and not ka.layers
    rep = Report("t")
    wu_section(rep, {"m": ka}, None, {}, demo=False)
    assert "Kronecker factors" in rep.to_html() or "not available" in rep.to_html()
    assert "kfac for m: not available" in rep.to_html()


def test_bench_finds_the_checkouts_benchmarks():
    from hesslab.cli import bench_scripts

    names = {p.stem for p in bench_scripts()}
    assert {"bench_kernels", "bench_peers", "bench_scaling", "bench_solvers"} <= names


def test_gpu_benchmark_does_nothing_without_a_gpu_by_default():
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu_e2e.py"
    r = subprocess.run([sys.executable, str(script), "--repeats", "3"],  # what `hesslab bench` passes
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "no CUDA device; nothing to do" in r.stdout
