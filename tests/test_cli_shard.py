"""``hesslab analyze --shard none|ddp|fsdp`` on two gloo ranks (torchrun, or the same
environment set by hand to see every rank's exit status and output), against one
``python -m hesslab analyze`` process and the dense float64 Hessian (torch.func) of
tests.cli_fixtures:tiny_mlp over the loader's 48 samples in 3 batches (rank 0 gets
batches 0 and 2, rank 1 batch 1: uneven shards). Every subprocess has a timeout and
every collective ``--dist-timeout 60``, so nothing hangs."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hesslab.cli import main

from . import cli_fixtures
from .test_distributed import _free_port

ROOT = Path(__file__).resolve().parent.parent
K = 3
ARGS = ["analyze", "--model", "tests.cli_fixtures:tiny_mlp", "--data", "tests.cli_fixtures:loader", "--k", str(K),
        "--measures", "top_k,trace", "--trace-matvecs", "30", "--dtype", "float64", "--quiet"]
TIMEOUT = 180


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    (tmp / "tmpdir").mkdir(exist_ok=True)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp / "tmpdir"), **extra)
    return env


def _torchrun(tmp: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "hesslab", *ARGS, "--out", str(out), "--dist-timeout", "60", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=TIMEOUT)


def _by_hand(tmp: Path, out: Path, *extra: str) -> list[subprocess.CompletedProcess]:
    """Two ranks started as torchrun starts them (RANK, WORLD_SIZE, MASTER_*), each one's result."""
    port = str(_free_port())
    cmd = [sys.executable, "-m", "hesslab", *ARGS, "--out", str(out), "--dist-timeout", "60", *extra]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(tmp, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in range(2)]
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _eigenvalues(out: Path) -> np.ndarray:
    return np.load(out / "results" / "model" / "top_k.npz")["eigenvalues"]


@functools.cache
def _dense_hessian() -> np.ndarray:
    """The dense (75, 75) Hessian of the mean cross-entropy over all 48 samples."""
    model = cli_fixtures.tiny_mlp().double()
    X, y = (torch.cat(t) for t in zip(*cli_fixtures.loader()))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, [s.numel() for s in shapes])
        params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, (X.double(),)), y)

    return torch.func.hessian(f)(theta).numpy()


def _dense() -> np.ndarray:
    """Its eigenvalues, descending."""
    return np.sort(np.linalg.eigvalsh(_dense_hessian()))[::-1]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """One process: ``python -m hesslab analyze`` (the module entry point torchrun's -m needs)."""
    tmp = tmp_path_factory.mktemp("single")
    r = subprocess.run([sys.executable, "-m", "hesslab", *ARGS, "--out", str(tmp / "out")], cwd=ROOT,
                       env=_env(tmp), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "out"


def _check_one_writer(tmp: Path, stdout: str) -> None:
    """One summary table printed, and no output folder left behind by rank 1 (torch's own
    temporary files aside)."""
    assert stdout.count("hesslab analyze finished") == 1, stdout
    assert "Processes: 2 (torchrun)" in stdout
    assert not [p for name in ("summary.json", "report.html") for p in (tmp / "tmpdir").rglob(name)]


@pytest.mark.parametrize("shard", ["fsdp", "ddp"])
def test_torchrun_two_ranks_equal_one_process(tmp_path, single, shard):
    r = _torchrun(tmp_path, tmp_path / "out", "--shard", shard)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    _check_one_writer(tmp_path, r.stdout)
    got, want = _eigenvalues(tmp_path / "out"), _eigenvalues(single)
    rtol = 1e-5 if shard == "fsdp" else 1e-8  # fsdp: finite-difference products
    np.testing.assert_allclose(got, want, rtol=rtol)
    np.testing.assert_allclose(got, _dense()[:K], rtol=max(rtol, 1e-7))
    V = np.load(tmp_path / "out" / "results" / "model" / "top_k.npz")["eigenvectors"]
    assert V.shape == (75, K)  # whole eigenvectors (gathered on rank 0), not rank 0's rows
    assert np.abs(_dense_hessian() @ V - V * got).max() < 1e-5 * got[0]
    summary = _summary(tmp_path / "out")
    assert summary["source"]["world_size"] == 2 and summary["source"]["shard"] == shard
    numbers, exact = summary["models"]["model"], float(_dense().sum())
    assert numbers["num_params"] == 75  # the global n, not a rank's shard
    assert abs(numbers["trace"] - exact) < 5 * numbers["trace_std_error"] + 1e-8
    if shard == "ddp":  # replicated: the same probes as one process
        assert numbers["trace"] == pytest.approx(_summary(single)["models"]["model"]["trace"], rel=1e-8)


def test_none_every_rank_exits_0_and_only_rank_0_speaks(tmp_path, single):
    ranks = _by_hand(tmp_path, tmp_path / "out", "--shard", "none")
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr[-3000:] for r in ranks]
    assert ranks[1].stdout == "" and ranks[1].stderr == ""
    _check_one_writer(tmp_path, ranks[0].stdout)
    np.testing.assert_allclose(_eigenvalues(tmp_path / "out"), _eigenvalues(single), rtol=1e-8)


@pytest.mark.parametrize("extra, words", [
    (["--shard", "fsdp", "--measures", "top_k,kfac"], ["--measures: kfac", "--shard fsdp", "top_k,density"]),
    (["--shard", "ddp", "--max-batches", "1"], ["--data: 1 batch(es) for 2 ranks", "--max-batches 1"]),
])
def test_bad_combinations_give_the_same_error_on_every_rank(tmp_path, extra, words):
    ranks = _by_hand(tmp_path, tmp_path / "out", *extra)
    assert [r.returncode for r in ranks] == [3, 3], [r.stderr[-3000:] for r in ranks]
    assert ranks[1].stderr == ""  # rank 0 says it
    assert all(w in ranks[0].stderr for w in words), ranks[0].stderr
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_rank_that_fails_alone_stops_every_rank(tmp_path):
    """The model factory fails on rank 1 only: rank 0 does not wait for it, both exit 3."""
    ranks = _by_hand(tmp_path, tmp_path / "out", "--model", "tests.cli_fixtures:rank1_broken_mlp", "--shard", "fsdp")
    assert [r.returncode for r in ranks] == [3, 3], [r.stderr[-3000:] for r in ranks]
    assert "(on rank 1 of 2) --model:" in ranks[0].stderr and "fails on rank 1 only" in ranks[0].stderr
    assert ranks[1].stderr == ""


@pytest.mark.parametrize("shard", ["fsdp", "ddp"])
def test_shard_without_torchrun_says_to_use_torchrun(tmp_path, capsys, monkeypatch, shard):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main([*ARGS, "--out", str(tmp_path / "o"), "--shard", shard]) == 3
    err = capsys.readouterr().err
    assert f"--shard {shard}" in err and "torchrun --nproc-per-node" in err
