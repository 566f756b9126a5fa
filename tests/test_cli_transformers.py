"""``hesslab analyze`` on transformers and timm models with no wrapper (issue 13): dict
batches passed as model(**batch), ``--loss model`` (the default for dict batches with
labels), ``--max-batches`` counting dict batches, ``--measures blocks`` (per-block spectra,
restricted by ``--params``), ``--kfac-layers`` naming GPT-2's Conv1D layers, and a timm
ViT from a config end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from hesslab.cli import main  # noqa: E402

FIX = "tests.cli_fixtures"
ROOT = Path(__file__).resolve().parent.parent
GPT = ["analyze", "--model", f"{FIX}:gpt2_tiny", "--data", f"{FIX}:lm_loader"]
SMALL = ["--k", 3, "--slq-steps", 15, "--slq-probes", 2, "--trace-matvecs", 12]


def _cli(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hesslab", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_gpt2_dict_batches_with_the_models_own_loss(tmp_path):
    proc = _cli(GPT + ["--out", tmp_path, "--measures", "top_k,density,trace", *SMALL])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finished"] is True and summary["source"]["loss"] == "model"  # the default for dict batches
    assert summary["source"]["batches"] == 2 and summary["source"]["samples"] == 4
    assert summary["source"]["outputs"] == 32  # the vocabulary
    numbers = summary["models"]["model"]
    assert numbers["lambda_1"] > 0 and "trace" in numbers
    assert (tmp_path / "report.html").is_file()


def test_max_batches_counts_dict_batches_and_missing_labels_name_the_option(tmp_path, capsys):
    rc = main([str(a) for a in GPT + ["--out", tmp_path, "--measures", "trace", "--trace-matvecs", 3,
                                      "--max-batches", 1, "--loss", "model", "--quiet"]])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["source"]["batches"] == 1 and "--max-batches 1" in summary["source"]["data_used"]
    rc = main(["analyze", "--model", f"{FIX}:gpt2_tiny", "--data", f"{FIX}:lm_loader_no_labels",
               "--out", str(tmp_path / "b"), "--measures", "trace", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3 and "--data: the first batch is a dict without 'labels'" in err


def _blocks_run(tmp_path, base):
    proc = _cli(base + ["--out", tmp_path, "--measures", "blocks", "--blocks-steps", 8, "--blocks-probes", 2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr.splitlines()
    cost = next(i for i, line in enumerate(log) if "model: blocks (" in line and "will cost" in line)
    assert cost < next(i for i, line in enumerate(log) if "per-block spectra (" in line)  # said before it starts
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finished"] is True and not summary["errors"]
    bs = summary["block_spectra"]["model"]
    assert 0.0 <= bs["heterogeneity"] <= 1.0 and bs["num_blocks"] == len(bs["blocks"])
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Per-block spectra" in html and "heterogeneity" in html
    assert (tmp_path / "plots" / "block_spectra_model.png").is_file()
    return bs


def test_blocks_measure_on_gpt2(tmp_path):
    bs = _blocks_run(tmp_path, GPT)
    assert {"transformer.h.0.attn.c_attn.q", "transformer.h.0.attn.c_attn.k", "transformer.h.0.attn.c_attn.v",
            "transformer.h.0.mlp.c_fc", "transformer.wte"} <= set(bs["blocks"])
    assert all(v["lambda_max"] is not None for v in bs["blocks"].values())


def test_blocks_measure_on_an_mlp(tmp_path):
    bs = _blocks_run(tmp_path, ["analyze", "--model", f"{FIX}:tiny_mlp", "--data", f"{FIX}:loader"])
    assert set(bs["blocks"]) == {"0", "2"} and bs["blocks"]["0"]["size"] == 8 * 6 + 6


def test_params_restrict_the_blocks_measure(tmp_path):
    base = GPT + ["--params", "transformer.h.0.attn.*", "--params", "transformer.h.0.mlp.c_fc"]
    bs = _blocks_run(tmp_path, base)
    assert set(bs["blocks"]) == {"transformer.h.0.attn.c_attn.q", "transformer.h.0.attn.c_attn.k",
                                 "transformer.h.0.attn.c_attn.v", "transformer.h.0.attn.c_proj",
                                 "transformer.h.0.mlp.c_fc"}
    assert bs["blocks"]["transformer.h.0.mlp.c_fc"]["size"] == 16 * 64 + 64


def test_kfac_layers_name_gpt2_conv1d_layers(tmp_path, capsys):
    rc = main([str(a) for a in GPT + ["--out", tmp_path, "--measures", "kfac", "--kfac-layers",
                                      "transformer.h.0.mlp.c_proj", "--k", 2, "--kfac-steps", 20, "--quiet"]])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    kfac = json.loads((tmp_path / "summary.json").read_text())["kfac"]["model"]
    assert list(kfac["layers"]) == ["transformer.h.0.mlp.c_proj"]
    assert kfac["layers"]["transformer.h.0.mlp.c_proj"]["module"] == "Conv1D"
    assert "transformer.h.0.attn.c_attn" in kfac["not_compared"]
    rc = main([str(a) for a in GPT + ["--out", tmp_path / "b", "--measures", "kfac", "--kfac-layers",
                                      "transformer.wte", "--quiet"]])
    err = capsys.readouterr().err
    assert rc == 3 and "--kfac-layers: 'transformer.wte' matches none of the Kronecker layers" in err
    assert "transformer.h.0.attn.c_attn" in err  # the Conv1D layers are listed as the choices


def test_timm_vit_from_a_config_end_to_end(tmp_path):
    proc = _cli(["analyze", "--model", f"{FIX}:vit_tiny", "--data", f"{FIX}:image_loader", "--out", tmp_path,
                 "--measures", "top_k,density,trace,kfac,blocks", *SMALL, "--kfac-steps", 20,
                 "--blocks-steps", 8, "--blocks-probes", 2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finished"] is True and not summary["errors"], summary["errors"]
    assert summary["source"]["loss"] == "cross_entropy" and summary["source"]["samples"] == 8
    assert summary["models"]["model"]["lambda_1"] > 0
    assert {"blocks.0.attn.qkv.q", "blocks.0.attn.qkv.k", "blocks.0.attn.qkv.v", "blocks.0.mlp.fc1",
            "cls_token", "pos_embed"} <= set(summary["block_spectra"]["model"]["blocks"])
    assert summary["kfac"]["model"]["layers"]  # the Kronecker comparison ran on a token-shared layer
