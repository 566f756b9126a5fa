"""The kernel benchmark runs from a checkout and reports what RESULTS.md quotes (no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run_quick(script: str, args: list[str], out: Path, timeout: int) -> subprocess.CompletedProcess:
    """``benchmarks/<script> --quick <args> --out <out>`` in a subprocess; it must succeed."""
    r = subprocess.run([sys.executable, str(BENCH / script), "--quick", *args, "--out", str(out)],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.mark.skipif(not (BENCH / "bench_kernels.py").exists(), reason="needs a source checkout")
def test_kernel_benchmark_quick_run_writes_its_rows(tmp_path):
    out = tmp_path / "kernels.json"
    r = _run_quick("bench_kernels.py", ["--threads", "1"], out, timeout=600)
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] and len(data["lanczos"]) == 6 and len(data["kron"]) == 4
    for row in data["lanczos"]:
        assert row["kernel_ms"] > 0 and row["twin_ms"] > 0
        if row["dtype"] == "float32":  # float64 accumulation: closer to orthogonal than a float32 GEMM
            assert row["kernel_ortho"] < 1e-7 and row["kernel_ortho"] < row["twin_ortho"]
        else:
            assert row["kernel_ortho"] < 1e-14
    for row in data["kron"]:
        assert row["max_abs_diff"] < (1e-2 if row["dtype"] == "float32" else 1e-8)  # entries of size ~1e3
    assert "| n | m | b |" in r.stdout  # the table RESULTS.md copies


def _load_bench_module(name: str):
    """A benchmarks/ helper module (they import each other by bare name, as the scripts do)."""
    import importlib

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.mark.skipif(not (BENCH / "_peers_targets.py").exists(), reason="needs a source checkout")
def test_peer_ratios_take_the_fastest_equally_accurate_peer_and_targets_say_met():
    t = _load_bench_module("_peers_targets")
    base = dict(workload="cnn512", threads=1, task="top10", settings="matched", dtype="float32")
    rows = [
        dict(base, tool="hesslab", seconds=2.0, error=1e-6),
        dict(base, tool="curvlinops", seconds=1.0, error=1e-3),  # faster but 1000x less accurate
        dict(base, tool="hessian-eigenthings", seconds=2.5, error=2e-6),
        dict(base, tool="pyhessian", seconds=3.0, error=4e-6),
        dict(base, tool="hesslab", task="slq", seconds=10.0, error=None, floor_ratio=1.2),
        dict(base, tool="pyhessian", task="slq", seconds=12.0, error=None),  # no reference: counts
        dict(base, workload="resnet128", tool="hesslab", task="trace", seconds=5.0, floor_ratio=1.02),
        dict(base, workload="resnet128", tool="pyhessian", task="trace", seconds=4.0),
    ]
    t.add_ratios(rows)
    assert rows[0]["best_peer"] == "hessian-eigenthings" and abs(rows[0]["vs_best_peer"] - 1.25) < 1e-12
    assert abs(rows[1]["vs_hesslab"] - 0.5) < 1e-12
    assert abs(rows[4]["vs_best_peer"] - 1.2) < 1e-12
    compiled = {"rows": [dict(model="mlp", device="cpu", operator="Hessian", eager_ms=3.0, compiled_ms=1.5)]}
    goals = {(g["target"].split(" peer")[0], g["where"]): g for g in t.targets(rows, compiled)}
    assert goals[("ratio vs fastest equally accurate", "cnn512, top-10 eigenvalues")]["met"] is True
    assert goals[("ratio vs fastest equally accurate", "cnn512, SLQ density")]["met"] is False  # 1.2 < 1.3
    assert goals[("ratio vs fastest equally accurate", "resnet128, Hutchinson trace")]["met"] is False  # 0.8
    assert goals[("overhead: total / (products x kept-graph product)", "resnet128, Hutchinson trace")]["met"] is True
    assert ("overhead: total / (products x kept-graph product)", "cnn512, SLQ density") not in goals  # ResNet only
    assert goals[("compiled vs eager kept-graph product (Hessian)", "mlp, cpu")]["value"] == 2.0
    assert "| target |" in t.render_targets(list(goals.values()))


@pytest.mark.skipif(not (BENCH / "bench_peers.py").exists(), reason="needs a source checkout")
def test_peer_benchmark_product_workload_quick_run(tmp_path):
    out = tmp_path / "peers.json"
    r = _run_quick("bench_peers.py", ["--workloads", "cnn512", "--tools", "hesslab"], out, timeout=900)
    data = json.loads(out.read_text())
    rows = {(x["task"], x["settings"]): x for x in data["rows"]}
    assert set(rows) == {("top10", "matched"), ("slq", "matched"), ("trace", "matched"),
                         ("top10", "defaults"), ("trace", "defaults")}
    for row in rows.values():
        assert not row.get("failed") and row["seconds"] > 0 and row["products"] > 0
    # top-10 against the float64 reference: float32 products cap the error near 1e-6
    assert rows[("top10", "matched")]["error"] < 1e-4 and rows[("top10", "defaults")]["error"] < 1e-4
    assert rows[("trace", "defaults")]["products"] == 100 and "targets" in data
    assert "### Targets of issue 15" in r.stdout and "| workload | thr | task | tool | settings |" in r.stdout


@pytest.mark.skipif(not (BENCH / "bench_compiled.py").exists(), reason="needs a source checkout")
def test_compiled_benchmark_quick_run_matches_eager(tmp_path):
    out = tmp_path / "compiled.json"
    r = _run_quick("bench_compiled.py", ["--backend", "aot_eager", "--models", "mlp"], out, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [x["operator"] for x in rows] == ["Hessian", "GGN"]
    for x in rows:
        assert x["rel_diff"] < 1e-5 and x["compiles"] == 1 and x["fallback"] is None
        assert x["eager_path"] == "graph" and x["compiled_path"] == "compiled" and x["eager_ms"] > 0
    assert "| model | device | operator |" in r.stdout


@pytest.mark.skipif(not (BENCH / "bench_scaling.py").exists(), reason="needs a source checkout")
def test_scaling_benchmark_quick_run_counts_two_all_reduces_per_lanczos_step(tmp_path):
    out = tmp_path / "scaling.json"
    r = _run_quick("bench_scaling.py", ["--worlds", "1,2"], out, timeout=600)
    data = json.loads(out.read_text())
    assert [row["world"] for row in data["rows"]] == [1, 2]
    for row in data["rows"]:
        assert row["product_ms"] > 0 and row["step_ms"] > 0
        assert sum(rank["n_local"] for rank in row["ranks"]) == row["n"]  # the shards tile the parameters
        for rank in row["ranks"]:  # 2 per step, plus the start norm and the step-0 fingerprint
            assert rank["solver_all_reduces"] == 2 * rank["products"] + 2
    assert "| ranks |" in r.stdout
