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
# Steps (each logs to $OUT_DIR/gpu_suite_<step>.log; every step has a time limit so the
# suite stays within ~8 minutes on an H100/H200, the build included):
#   1. build      pip install --no-build-isolation --no-deps --no-index -e .   (HESSLAB_CUDA=1,
#                 TORCH_CUDA_ARCH_LIST defaults to the visible GPU's arch only: a faster build)
#   2. check      hesslab.build_info() has CUDA kernels and torch sees a GPU
#   3. ops        the op tests on CUDA first (tests/test_lanczos_ops.py, test_kron_ops.py,
#                 test_ops_paths.py: every kernel code path, determinism, a second GPU when
#                 present; test_ops_fuzz.py): fails if any CUDA variant was skipped
#   4. memcheck   compute-sanitizer --tool memcheck over the CUDA op tests (small shapes)
#   5. racecheck  compute-sanitizer --tool racecheck over the same tests (shared memory races)
#   6. tests      python -m pytest -q -m "not slow" tests, minus the op tests of step 3
#   7. kernels    python benchmarks/bench_kernels.py --device cuda
#   8. peers      python benchmarks/bench_peers.py --device cuda --workloads resnet18 (batch 128)
# Exit status: 1 if the build, the check, the op tests, a sanitizer or the tests fail (it
# stops there); 3 if a benchmark fails (both benchmarks are still attempted); 0 otherwise.
# SKIP_SANITIZER=1 skips steps 4-5 (e.g. when compute-sanitizer is not installed: the
# suite then fails loudly unless this is set).
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

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  ARCH="$("$PY" -c 'import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f"{c[0]}.{c[1]}" if c else "")' 2>/dev/null)"
  [ -n "$ARCH" ] && export TORCH_CUDA_ARCH_LIST="$ARCH"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}"
OP_TESTS=(tests/test_lanczos_ops.py tests/test_kron_ops.py tests/test_ops_paths.py tests/test_ops_fuzz.py)
# The sanitizers slow kernels down 10-100x: run them over the CUDA variants of the op tests
# with small shapes (the large code-path shapes and the float32-orthogonality runs are left
# to step 3) and with torch's caching allocator off, so out-of-bounds accesses hit real
# allocation boundaries.
SANITIZE_SELECT="cuda and not float32_storage and not full_run and not grid_stride and not grid_y and not scale_loop and not deterministic and not thread_count"

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

no_cuda_skips() {  # no_cuda_skips LOG: fail loudly if a CUDA variant was skipped
  if grep -qiE "skipped.*(no CUDA|without CUDA)" "$1"; then
    fail "CUDA tests were skipped although a GPU is present (see $1)"
  fi
}

step ops timeout 240 "$PY" -m pytest -q -rs -p no:cacheprovider "${OP_TESTS[@]}" \
  || fail "the op tests failed on the GPU (see $OUT_DIR/gpu_suite_ops.log)"
no_cuda_skips "$OUT_DIR/gpu_suite_ops.log"
if ! grep -qE "[0-9]+ passed" "$OUT_DIR/gpu_suite_ops.log"; then
  fail "the op tests ran nothing (see $OUT_DIR/gpu_suite_ops.log)"
fi

if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
  [ -x "$SANITIZER" ] || fail "compute-sanitizer not found at $SANITIZER (set COMPUTE_SANITIZER, or SKIP_SANITIZER=1)"
  for tool in memcheck racecheck; do
    step "$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 "$SANITIZER" --tool "$tool" --error-exitcode 86 \
      --target-processes all "$PY" -m pytest -q -x -rs -p no:cacheprovider -k "$SANITIZE_SELECT" \
      tests/test_lanczos_ops.py tests/test_kron_ops.py tests/test_ops_paths.py \
      || fail "compute-sanitizer --tool $tool found errors or timed out (see $OUT_DIR/gpu_suite_$tool.log)"
    grep -qE "[0-9]+ passed" "$OUT_DIR/gpu_suite_$tool.log" || fail "$tool ran no test (see $OUT_DIR/gpu_suite_$tool.log)"
    no_cuda_skips "$OUT_DIR/gpu_suite_$tool.log"
  done
fi

step tests timeout 300 "$PY" -m pytest -q -m "not slow" -rs -p no:cacheprovider \
  $(printf -- '--ignore=%s ' "${OP_TESTS[@]}") tests \
  || fail "the tests failed (see $OUT_DIR/gpu_suite_tests.log)"
no_cuda_skips "$OUT_DIR/gpu_suite_tests.log"

BENCH_RC=0
step kernels timeout 120 "$PY" benchmarks/bench_kernels.py --device cuda --out "$OUT_DIR/kernels_cuda.json" || BENCH_RC=3
step peers timeout 150 "$PY" benchmarks/bench_peers.py --device cuda --workloads resnet18 --resnet18-batch 128 \
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
