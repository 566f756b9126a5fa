"""The kernel benchmark runs from a checkout and reports what RESULTS.md quotes (no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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


@pytest.mark.skipif(not (BENCH / "_peers_adapters.py").exists(), reason="needs a source checkout")
def test_product_timer_accumulates_time_inside_products_once_per_outer_call_and_resets():
    import time

    from torch import nn

    a = _load_bench_module("_peers_adapters")
    counter = a.new_counter()
    calls = []

    def product(cols, nested=False):
        calls.append(cols)
        time.sleep(0.02)
        if nested:  # a product that re-enters the entry point is timed once, its columns counted
            wrapped(1)
        return cols

    wrapped = a._counting(product, counter, lambda cols, nested=False: cols)
    t0 = time.perf_counter()
    assert wrapped(3) == 3 and wrapped(2, nested=True) == 2
    outside = time.perf_counter() - t0
    assert calls == [3, 2, 1] and counter["n"] == 6 and counter["depth"] == 0
    assert 3 * 0.02 <= counter["s"] <= outside  # three sleeps inside, nothing counted twice
    with pytest.raises(ZeroDivisionError):  # a failing product still stops its timer
        a._counting(lambda: 1 / 0, counter)()
    assert counter["depth"] == 0 and counter["n"] == 7
    adapter = a.Adapter(nn.Linear(2, 2), None, None, "cpu")
    adapter.counter.update(n=5, s=1.5)
    adapter.reset_counter()
    assert adapter.counter == {"n": 0, "s": 0.0, "depth": 0}
    w = _load_bench_module("_peers_worker")
    fig = w.in_run_figures(seconds=3.0, products=10, product_s=2.5, hvp_ms=200.0)
    assert fig["ms_per_product"] == 300.0 and fig["ms_per_product_in_run"] == 250.0
    assert abs(fig["floor_ratio"] - 1.5) < 1e-12 and abs(fig["solver_overhead"] - 1.2) < 1e-12
    assert "solver_overhead" not in w.in_run_figures(1.0, 0, 0.0, None)


@pytest.mark.skipif(not (BENCH / "_peers_targets.py").exists(), reason="needs a source checkout")
def test_targets_add_the_solver_overhead_row_beside_the_floor_row_and_render_shows_both_columns():
    t = _load_bench_module("_peers_targets")
    base = dict(workload="resnet128", threads=1, settings="matched", dtype="float32", tool="hesslab", seconds=5.0)
    rows = [dict(base, task="slq", floor_ratio=1.4, solver_overhead=1.03, ms_per_product_in_run=41.0, products=100),
            dict(base, task="trace", floor_ratio=1.01, solver_overhead=1.2, ms_per_product_in_run=40.0, products=100),
            dict(base, workload="cnn512", task="trace", solver_overhead=1.5)]  # ResNet only
    goals = {(g["target"], g["where"]): g for g in t.targets(rows, None)}
    solver = "solver overhead: total / time inside products (same run)"
    floor = "overhead: total / (products x kept-graph product)"
    assert goals[(solver, "resnet128, SLQ density")]["value"] == 1.03
    assert goals[(solver, "resnet128, SLQ density")]["met"] is True
    assert goals[(floor, "resnet128, SLQ density")]["met"] is False  # the definition, kept
    assert goals[(solver, "resnet128, Hutchinson trace")]["met"] is False
    assert goals[(floor, "resnet128, Hutchinson trace")]["met"] is True
    assert all(g["goal"] == "<= 1.05" for g in goals.values()) and len(goals) == 4
    b = _load_bench_module("bench_peers")
    md = b.render(rows, {}, {})
    assert "| in-run ms/HVP | total/in-products |" in md
    assert "| 41.0 | 1.03 |" in md and "| 40.0 | 1.20 |" in md


@pytest.mark.skipif(not (BENCH / "_peers_adapters.py").exists(), reason="needs a source checkout")
@pytest.mark.parametrize("settings, verify", [("matched", False), ("defaults", None)])
def test_hesslab_top10_matched_skips_verification_and_defaults_keep_it(monkeypatch, settings, verify):
    import time

    import hesslab as hl
    import hesslab.linops._curvature as curvature
    from hesslab import zoo
    from torch import nn

    from tests.test_linops import dense_hessian

    a = _load_bench_module("_peers_adapters")
    seen, real, check = [], hl.lanczos, curvature.check_first_product

    def recording(op, **kw):
        seen.append(kw)
        return real(op, **kw)

    def slow_check(*args, **kwargs):  # the first product's derivative check: overhead, not product time
        seen.append("check")
        time.sleep(0.2)
        return check(*args, **kwargs)

    monkeypatch.setattr(hl, "lanczos", recording)

    monkeypatch.setattr(curvature, "check_first_product", slow_check)
    (X, y), _ = zoo.digits()
    model = zoo.digits_mlp(hidden=(16,)).double().eval()  # 1,210 parameters
    adapter = a.HesslabAdapter(model, nn.CrossEntropyLoss(), (X[:64].double(), y[:64]), "cpu")
    adapter.settings = settings
    t0 = time.perf_counter()
    out = adapter.top_k(3, None, small=False)
    elapsed = time.perf_counter() - t0
    assert seen[0].get("verify") is verify  # defaults: hesslab's own (verify=True when not passed)
    assert ("compute_residuals" in seen[0]) is (settings == "matched")
    # every product went through the wrapped _product: its count is the operator's; the check is not in it
    assert seen.count("check") == 1
    assert adapter.counter["n"] == out["products"] > 0 and 0 < adapter.counter["s"] <= elapsed - 0.2
    H = dense_hessian(model, nn.CrossEntropyLoss(), X[:64].double(), y[:64]).numpy()
    ref = np.linalg.eigvalsh(H)[::-1][:3]
    assert np.max(np.abs(np.array(out["eigenvalues"]) - ref) / np.abs(ref)) < 1e-6


def test_rounds_merge_into_means_with_consistent_figures():
    sys.path.insert(0, str(BENCH))
    from _peers_worker import merge_rounds

    def row(tool, seconds, product_s, hvp_ms, **kw):
        return dict(workload="w", tool=tool, task="trace", settings="matched", threads=1, seconds=seconds,
                    products=10, product_s=product_s, hvp_ms=hvp_ms, **kw)

    first = [row("a", 2.0, 1.6, 100.0, error=0.1), row("b", 4.0, 3.0, 200.0), row("c", 1.0, 1.0, 1.0),
             row("d", 1.0, 0.5, 50.0)]
    first[2].pop("seconds")  # a failed row: no time
    second = [row("b", 6.0, 5.0, 300.0), row("a", 3.0, 2.4, 120.0, error=0.9)]  # reverse order; d missing
    a, b, c, d = merge_rounds([first, second])
    assert a["seconds"] == 2.5 and a["round_seconds"] == [2.0, 3.0] and a["error"] == 0.1  # outputs: round 1
    assert a["product_s"] == pytest.approx(2.0) and a["hvp_ms"] == pytest.approx(110.0)
    assert a["solver_overhead"] == pytest.approx(2.5 / 2.0) and a["ms_per_product_in_run"] == pytest.approx(200.0)
    assert a["floor_ratio"] == pytest.approx(2.5 / (10 * 0.110))
    assert b["seconds"] == 5.0 and b["solver_overhead"] == pytest.approx(5.0 / 4.0)
    assert "seconds" not in c and d == first[3]  # unmeasured and single-round rows pass through


@pytest.mark.skipif(not (BENCH / "bench_peers.py").exists(), reason="needs a source checkout")
def test_peer_benchmark_product_workload_quick_run(tmp_path):
    out = tmp_path / "peers.json"
    r = _run_quick("bench_peers.py", ["--workloads", "cnn512", "--tools", "hesslab", "--rounds", "2"], out,
                   timeout=900)
    data = json.loads(out.read_text())
    rows = {(x["task"], x["settings"]): x for x in data["rows"]}
    for row in rows.values():  # two rounds, the row's time their mean
        assert len(row["round_seconds"]) == 2 and row["seconds"] == pytest.approx(np.mean(row["round_seconds"]))
    assert set(rows) == {("top10", "matched"), ("slq", "matched"), ("trace", "matched"),
                         ("top10", "defaults"), ("trace", "defaults")}
    for row in rows.values():
        assert not row.get("failed") and row["seconds"] > 0 and row["products"] > 0
        # the time inside the products is part of the timed run's wall time
        assert 0 < row["product_s"] <= row["seconds"] and row["solver_overhead"] >= 1.0
    # top-10 against the float64 reference: float32 products cap the error near 1e-6
    assert rows[("top10", "matched")]["error"] < 1e-4 and rows[("top10", "defaults")]["error"] < 1e-4
    assert rows[("trace", "defaults")]["products"] == 100 and "targets" in data
    assert "### Targets of issue 15" in r.stdout and "| workload | thr | task | tool | settings |" in r.stdout
    assert "| in-run ms/HVP | total/in-products |" in r.stdout


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
