"""``hesslab analyze`` for a researcher's own model (issue 18): bounded and visible work,
only what was asked, the options (--params, --train-mode, --dtype, --max-batches,
--threads, --kfac-layers), honest verdicts, and a setup that does not repeat itself."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hesslab.cli import build_parser, main
from hesslab.cli._analyze import make_translator
from hesslab.cli._output import finish

from . import cli_fixtures

FIX = "tests.cli_fixtures"
ROOT = Path(__file__).resolve().parent.parent
BASE = ["analyze", "--model", f"{FIX}:tiny_mlp", "--data", f"{FIX}:loader"]


def _cli(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hesslab", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _main(capsys, args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# ======================================================================================
# 1. bounded, visible long work
# ======================================================================================


def test_each_measure_says_its_cost_first_and_kfac_compares_chosen_layers(tmp_path):
    proc = _cli(BASE + ["--out", tmp_path, "--k", 10, "--slq-steps", 30, "--slq-probes", 3, "--trace-matvecs", 30,
                        "--kfac-layers", "0", "--kfac-steps", 40])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr.splitlines()
    for measure, stage in (("top_k", "top 10 eigenvalues"), ("density", "SLQ density"), ("trace", "trace (")):
        cost = next(i for i, line in enumerate(log) if f"model: {measure}: will cost" in line)
        assert "products" in log[cost] and "free on cpu" in log[cost] and "one product took" in log[cost]
        assert cost < next(i for i, line in enumerate(log) if stage in line)  # said before it starts
    assert any("layer 0: will cost ≤ 50 products" in line for line in log)  # 40 steps + k residuals
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finished"] is True and len(summary["costs"]) >= 4
    kf = summary["kfac"]["model"]
    assert set(kf["layers"]) == {"0"} and set(kf["not_compared"]) == {"2"}
    assert "--kfac-layers" in proc.stdout and "not computed" in proc.stdout
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "exact layer blocks computed for 0 only" in html


def test_kfac_layers_default_is_the_largest_and_the_last():
    from hesslab.demo import choose_layers
    from hesslab.errors import HesslabError

    sizes = {"conv1": 1728, "layer1.0": 36864, "layer4.1": 2359296, "layer4.2": 100, "fc": 513000}
    assert choose_layers(sizes) == ["layer4.1", "fc"]
    assert choose_layers(sizes, ["layer4.*"]) == ["layer4.1", "layer4.2"]
    assert choose_layers(sizes, "all") == list(sizes)
    with pytest.raises(HesslabError, match="kfac_layers: 'nope' matches none"):
        choose_layers(sizes, ["nope"])


def test_bad_kfac_layers_exit_3_naming_the_option(tmp_path, capsys):
    rc, _, err = _main(capsys, BASE + ["--out", tmp_path, "--measures", "kfac", "--kfac-layers", "nope"])
    assert rc == 3 and "--kfac-layers: 'nope' matches none of the Kronecker layers (0, 2)" in err


def test_an_interrupted_run_keeps_what_was_finished(tmp_path, monkeypatch):
    import hesslab.solvers
    from hesslab.demo import run_analysis

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hesslab.solvers, "trace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_analysis(cli_fixtures.tiny_mlp(), torch.nn.CrossEntropyLoss(), cli_fixtures.single_batch(),
                     measures=["top_k", "density", "trace"], out=tmp_path, k=6, verbose=False,
                     budget=__import__("hesslab.demo", fromlist=["Budget"]).Budget(slq_steps=20, slq_probes=2))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finished"] is False
    assert summary["models"]["model"]["lambda_1"] > 0 and "density_max" in summary["models"]["model"]
    assert "trace" not in summary["models"]["model"]
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "has not finished" in html and "Eigenvalue density" in html


# ======================================================================================
# 2. only what was asked; messages name CLI options
# ======================================================================================


def test_outliers_not_asked_for_do_not_run(tmp_path):
    # with 8 SLQ steps the outlier rule cannot run (it needs 12 positive Ritz values) ...
    proc = _cli(BASE + ["--out", tmp_path, "--measures", "top_k,density,trace", "--slq-steps", 8, "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["measures_run"] == ["top_k", "density", "trace"]
    assert summary["errors"] == {} and summary["derived_errors"] == {}
    assert "outliers" not in summary["models"]["model"] and "outliers_top_k" not in summary["models"]["model"]
    assert not list((tmp_path / "results" / "model").glob("outliers*"))
    # ... and asked for, it fails with advice in the CLI's words
    proc = _cli(BASE + ["--out", tmp_path / "b", "--measures", "outliers", "--slq-steps", 8])
    assert proc.returncode == 1
    assert "--slq-steps" in proc.stderr
    for python_name in ("num_steps", "window", "hl.spectral_density", "density_or_eigenvalues"):
        assert python_name not in proc.stderr, python_name


def test_a_derived_failure_is_a_note_and_exit_0(tmp_path, capsys):
    from hesslab.demo import ModelAnalysis
    from hesslab.demo._measure import record_model

    summary = {"models": {}, "errors": {}, "derived_errors": {}, "seconds": {"total": 1.0}}
    a = ModelAnalysis("model", 75, 48, errors={"top_k": "it broke", "outliers_top": "too few"})
    record_model(summary, "model", a, requested=["power_law", "outliers"])
    assert summary["errors"] == {"model": {"outliers_top": "too few"}}
    assert summary["derived_errors"] == {"model": {"top_k": "it broke"}}
    summary["errors"] = {}
    args = argparse.Namespace(out=str(tmp_path), json=False)
    assert finish(summary, args, "hesslab analyze") == 0
    err = capsys.readouterr().err
    assert "note: model: top_k (not asked for" in err and "it broke" in err


KRYLOV_MESSAGE = (
    "the Krylov basis needs 26.70 GiB (8 runs x 81 vectors x 11000000 parameters x 4 bytes) but only 20.50 GiB is "
    "available on cuda:0. Options: fewer steps (num_steps), fewer probes, basis_dtype=torch.float32 (inner products "
    "still accumulate in float64), basis_device='cpu' to keep the basis in host memory, or for spectral_density "
    "reorthogonalize='local' (3 vectors per probe instead of num_steps).")


def test_memory_refusal_suggests_cli_options():
    args = build_parser().parse_args(BASE)
    text = make_translator(args)("density", KRYLOV_MESSAGE)
    assert text.startswith("the Krylov basis needs 26.70 GiB")
    for option in ("--slq-steps (now 80)", "--slq-probes (now 8)", "--slq-reorthogonalize local"):
        assert option in text
    for python_name in ("basis_dtype", "basis_device", "num_steps", "reorthogonalize='local'"):
        assert python_name not in text
    top = make_translator(args)("top_k", KRYLOV_MESSAGE)
    assert "--k (now 10;" in top and "basis_dtype" not in top
    assert make_translator(args)("", "params: 'x' matches nothing; pass params= with names") == \
        "--params: 'x' matches nothing; pass --params with names"


# ======================================================================================
# 3. options: --params, --train-mode, --dtype, --max-batches, --threads
# ======================================================================================


def test_params_blocks_dtype_and_max_batches(tmp_path):
    proc = _cli(BASE + ["--out", tmp_path, "--measures", "top_k,trace", "--k", 4, "--trace-matvecs", 12,
                        "--params", "0.weight,0.bias", "--params", "2.*", "--dtype", "float64",
                        "--max-batches", 2, "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    models = summary["models"]
    assert set(models) == {"model.0.weight_0.bias", "model.2"}, set(models)
    sizes = sorted(m["num_params"] for m in models.values())
    assert sizes == [21, 54]
    assert all(m["num_samples"] == 32 for m in models.values())  # 2 of the 3 batches of 16
    assert summary["source"]["dtype"] == "float64" and summary["source"]["samples"] == 32
    assert "the first 2 batches of 3" in summary["source"]["data_used"]
    assert "the first 2 batches of 3" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_bad_params_exit_3_naming_the_option(tmp_path, capsys):
    rc, _, err = _main(capsys, BASE + ["--out", tmp_path, "--params", "nothing.*"])
    assert rc == 3 and err.startswith("hesslab: error: --params 'nothing.*'"), err


def test_train_mode(tmp_path, capsys):
    base = ["analyze", "--model", f"{FIX}:bn_mlp", "--data", f"{FIX}:single_batch", "--measures", "top_k",
            "--k", 3, "--json"]
    rc, out, err = _main(capsys, base + ["--out", tmp_path / "eval"])
    assert rc == 0, err[-2000:]
    rc, out_t, err = _main(capsys, base + ["--out", tmp_path / "train", "--train-mode"])
    assert rc == 0, err[-2000:]
    ev, tr = json.loads(out), json.loads(out_t)
    assert ev["source"]["mode"] == "eval" and tr["source"]["mode"] == "train"
    assert tr["models"]["model"]["lambda_1"] != pytest.approx(ev["models"]["model"]["lambda_1"], rel=1e-3)


def test_one_threads_default_and_max_batches_default():
    from hesslab.cli._analyze import DEFAULT_MAX_BATCHES
    from hesslab.cli._common import SMALL_MODEL_PARAMS, choose_threads

    parser = build_parser()
    assert parser.parse_args(["demo"]).threads == parser.parse_args(BASE).threads == 0
    assert parser.parse_args(BASE).max_batches == DEFAULT_MAX_BATCHES == 8
    assert choose_threads(0, 1000) == 1 and choose_threads(0, SMALL_MODEL_PARAMS) is None
    assert choose_threads(3, 10) == 3


# ======================================================================================
# 4. honest verdicts
# ======================================================================================


def test_power_law_with_ten_eigenvalues_is_undecided(tmp_path, capsys):
    rc, out, err = _main(capsys, BASE + ["--out", tmp_path, "--measures", "power_law", "--k", 10, "--json"])
    assert rc == 0, err[-2000:]
    nb = json.loads(out)["models"]["model"]
    assert nb["power_law_k"] == 10 and nb["power_law_verdict"] == "undecided"
    assert "too few to decide" in nb["power_law_reason"]
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "undecided: KS test: d_ks" in html and "too few to decide" in html
    assert "the demo fits" not in html and "With and without BatchNorm, side by side" not in html


# ======================================================================================
# 6. setup that does not repeat itself
# ======================================================================================


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_reuses_an_up_to_date_install(tmp_path):
    if not list((ROOT / "hesslab").glob("_C*.so")):
        pytest.skip("the compiled extension is not built here (make would build it)")
    venv = tmp_path / "venv"
    venv.mkdir()
    for stamp in (".hesslab-venv", ".hesslab-install-cuda-auto"):
        (venv / stamp).touch()

    def dry_run() -> str:
        proc = subprocess.run(["make", "-n", "install", f"VENV={venv}", "HESSLAB_CUDA=auto"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "pip install" not in dry_run()  # up to date: nothing to do
    os.utime(venv / ".hesslab-install-cuda-auto", (0, 0))  # older than the sources
    assert "pip install -q --no-build-isolation -e" in dry_run()


def test_pyproject_license_is_not_the_deprecated_table():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(meta["project"]["license"], str)  # a TOML table warns in setuptools >= 77
    assert any(r.startswith("setuptools>=77") for r in meta["build-system"]["requires"])
    assert "browser" in " ".join(meta["tool"]["pytest"]["ini_options"]["markers"])


# ======================================================================================
# 5. the report: long file lists fold
# ======================================================================================


def test_long_file_lists_fold():
    from hesslab.demo._report import FOLD_ROWS, files_section
    from hesslab.report import Report

    rep = Report("t")
    results = [{"name": f"m/r{i}", "type": "EigenResult", "json": f"results/m/r{i}.json"} for i in range(FOLD_ROWS + 5)]
    files_section(rep, {"results": results, "files": {"checkpoints": [f"checkpoints/c{i}.pt" for i in range(32)]}})
    html = rep.to_html()
    assert html.count("<details>") == 2
    assert f"<summary>{FOLD_ROWS + 5} result files" in html and "<summary>32 checkpoints" in html
    rep = Report("t")
    files_section(rep, {"results": results[:3]})
    assert "<details>" not in rep.to_html()  # a short list stays open
