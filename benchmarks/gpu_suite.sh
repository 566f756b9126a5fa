#!/usr/bin/env bash
# hesslab's GPU suite: build, CUDA tests, kernel benchmark, peers on ResNet-18. Needs no network.
#
#   bash benchmarks/gpu_suite.sh            # from anywhere; results under $OUT, else benchmarks/out
#   PYTHON=/path/to/python bash benchmarks/gpu_suite.sh
#
# Expects: an NVIDIA GPU, a CUDA build of torch already installed in $PYTHON's environment,
# setuptools/wheel/ninja/numpy/scipy/scikit-learn/tqdm/pytest there too, and nvcc (CUDA_HOME)
# for the build. The peers (pyhessian, hessian-eigenthings, curvlinops) are optional: the
# ones that import are benchmarked, the others are skipped and named in the output.
#
# Steps (each logs to $OUT_DIR/gpu_suite_<step>.log):
#   1. build   pip install --no-build-isolation --no-deps --no-index -e .   (HESSLAB_CUDA=1)
#   2. check   hesslab.build_info() has CUDA kernels and torch sees a GPU
#   3. tests   python -m pytest -q -m "not slow" tests   (cuda variants run on the GPU)
#   4. kernels python benchmarks/bench_kernels.py --device cuda
#   5. peers   python benchmarks/bench_peers.py --device cuda --workloads resnet18 (batch 128)
# Exit status: 1 if the build, the check or the tests fail (it stops there); 3 if a
# benchmark fails (both benchmarks are still attempted); 0 otherwise.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
OUT_DIR="${OUT:-$ROOT/benchmarks/out}"
mkdir -p "$OUT_DIR"
export HESSLAB_CUDA="${HESSLAB_CUDA:-1}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

START=$(date +%s)
SUMMARY="$OUT_DIR/gpu_suite_summary.md"
{
  echo "# hesslab GPU suite"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), host $(hostname)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 || echo 'nvidia-smi not found')"
  echo "- python: $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1)"
  echo "- torch: $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())' 2>&1 | tail -1)"
  echo "- nvcc: $({ "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>/dev/null || nvcc --version 2>/dev/null; } | tail -1 || echo 'not found')"
  echo
} >"$SUMMARY"

step() {  # step NAME COMMAND...: run, log, record the outcome; returns the command's status
  local name="$1"; shift
  local log="$OUT_DIR/gpu_suite_$name.log" t0=$(date +%s) rc
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  echo "- $name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)"), $(( $(date +%s) - t0 )) s — \`$*\`" >>"$SUMMARY"
  return "$rc"
}

fail() {
  echo "gpu_suite: $1" | tee -a "$SUMMARY" >&2
  exit 1
}

step build "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || fail "the build failed (see $OUT_DIR/gpu_suite_build.log)"

step check "$PY" - <<'EOF' || fail "hesslab was built without CUDA kernels, or torch sees no GPU (see $OUT_DIR/gpu_suite_check.log)"
import json, sys, torch, hesslab
info = hesslab.build_info()
print(json.dumps(info, indent=1, default=str))
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False")
if not info.get("cuda_kernels"):
    sys.exit("hesslab.build_info() lists no CUDA kernels")
EOF

step tests "$PY" -m pytest -q -m "not slow" -rs tests || fail "the tests failed (see $OUT_DIR/gpu_suite_tests.log)"
if grep -qiE "skipped.*(no CUDA|without CUDA)" "$OUT_DIR/gpu_suite_tests.log"; then
  fail "the CUDA tests were skipped although a GPU is present (see $OUT_DIR/gpu_suite_tests.log)"
fi

BENCH_RC=0
step kernels "$PY" benchmarks/bench_kernels.py --device cuda --out "$OUT_DIR/kernels_cuda.json" || BENCH_RC=3
step peers "$PY" benchmarks/bench_peers.py --device cuda --workloads resnet18 --resnet18-batch 128 \
  --out "$OUT_DIR/peers_cuda.json" || BENCH_RC=3

{
  echo
  echo "Total $(( $(date +%s) - START )) s. Files: kernels_cuda.json, peers_cuda.json, peers_cuda.md and the logs, in $OUT_DIR."
  if grep -q '^|' "$OUT_DIR/gpu_suite_kernels.log" 2>/dev/null; then
    echo
    echo "## Kernels (bench_kernels.py --device cuda)"
    echo
    grep '^|' "$OUT_DIR/gpu_suite_kernels.log"
  fi
  if [ -f "$OUT_DIR/peers_cuda.md" ]; then
    echo
    cat "$OUT_DIR/peers_cuda.md"
  fi
} >>"$SUMMARY"
echo "=== summary: $SUMMARY"
exit "$BENCH_RC"
