"""The kernel benchmark runs from a checkout and reports what RESULTS.md quotes (no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.skipif(not (BENCH / "bench_kernels.py").exists(), reason="needs a source checkout")
def test_kernel_benchmark_quick_run_writes_its_rows(tmp_path):
    out = tmp_path / "kernels.json"
    r = subprocess.run([sys.executable, str(BENCH / "bench_kernels.py"), "--quick", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
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
