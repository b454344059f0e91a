#!/usr/bin/env bash
# The GPU test suite and the benchmarks in one device call, run on the device machine from the
# repository root after scripts/build_gpu_bundle.sh built .device/ here (carry=[".device"]).
# Every step runs under a share of one deadline, so the call ends inside the device's 10-minute
# limit with what it measured; logs and JSON lines go to $OUT. Prints a short table last.
#
# Steps, each skipped when its variable is empty:
#   FDMOE_GPU_TESTS   Rust GPU test binaries (default: cuda_graphs cuda_vs_cpu)
#   (always, when bundled) the C++ binding's CUDA test, .device/bin/cpp_test_cuda_layer
#   FDMOE_SANITIZE    1: compute-sanitizer memcheck (leak check) and racecheck on a graph and
#                     a routing test, and memcheck on the quick CPU comparison
#   FDMOE_PYTEST      1: the Python binding's GPU tests (bindings/python/tests/test_cuda.py)
#   FDMOE_LATENCY     arguments of bench/graph_latency.py (e.g. "--shapes qwen3-30b-a3b")
#   FDMOE_BENCH       arguments of bench/gpu_bench.py (e.g. "--quick --formats fp8_block")
#   FDMOE_GATE_TRACE  token counts for bench/gate_trace.cu (nvcc; e.g. "1 4"): the fused decode
#                     gate's time and phase stamps
#   FDMOE_SUITE_SECONDS  the deadline for all steps (default 560)
set -uo pipefail
export FDMOE_REQUIRE_GPU=1 FDMOE_REQUIRE_NVRTC=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
# The cubins build_gpu_bundle.sh compiled (a writable copy: new keys are added to it).
export FDMOE_CACHE_DIR=${FDMOE_CACHE_DIR:-/tmp/fdmoe-cache}
mkdir -p "$FDMOE_CACHE_DIR"
if [ -f .device/cache.tar.xz ]; then  # packed by build_gpu_bundle.sh (cubins shrink ~15x)
  python3 scripts/unpack_cubins.py .device/cache.tar.xz "$FDMOE_CACHE_DIR"
else
  cp -n .device/cache/*.cubin "$FDMOE_CACHE_DIR"/ 2>/dev/null
fi
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export FDMOE_LIBRARY=$PWD/.device/libfdmoe.so
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
deadline=$(( $(date +%s) + ${FDMOE_SUITE_SECONDS:-560} ))
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
summary=()
status=0

# step NAME MAX_SECONDS COMMAND...: runs COMMAND under min(MAX_SECONDS, time left), logged.
step() {
  local name=$1 max=$2; shift 2
  local left=$(( deadline - $(date +%s) ))
  local limit=$(( max < left ? max : left ))
  if (( limit < 10 )); then summary+=("| $name | skipped (deadline) | 0 |"); status=1; return; fi
  echo "== $name (limit ${limit} s)"
  local start rc
  start=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  rc=$?
  local took=$(( $(date +%s) - start )) result=ok
  if (( rc == 124 || rc == 137 )); then result="TIMED OUT"; status=1
  elif (( rc != 0 )); then result="FAILED (rc $rc)"; status=1; fi
  summary+=("| $name | $result | $took |")
}

for t in ${FDMOE_GPU_TESTS-cuda_graphs cuda_vs_cpu}; do
  step "$t" 300 .device/bin/$t --nocapture --test-threads=1
done
# On Hopper FP8_BLOCK runs the W8A8 wgmma tiles; FDMOE_FP8_MMA_SYNC=1 checks the sm_89 ones too.
if [[ " ${FDMOE_GPU_TESTS-cuda_vs_cpu} " == *" cuda_vs_cpu "* ]]; then
  step cuda_vs_cpu-fp8-mma-sync 120 env FDMOE_FP8_MMA_SYNC=1 FDMOE_GPU_CASES=fp8_block \
    .device/bin/cuda_vs_cpu --nocapture --test-threads=1
fi

# The C++ binding on the CUDA backend (bindings/cpp/tests/test_cuda_layer.cpp).
if [ -x .device/bin/cpp_test_cuda_layer ]; then
  step cpp-cuda 60 env LD_LIBRARY_PATH="$PWD/.device:$LD_LIBRARY_PATH" .device/bin/cpp_test_cuda_layer
fi

if [ -n "${FDMOE_SANITIZE:-}" ]; then
  # routing_of_a_token runs every gate variant, invalid_ids the multi-block sort, thin the
  # thin decode tile.
  step memcheck-graphs 120 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 9 \
    .device/bin/cuda_graphs --test-threads=1 layers_share forward_inside routing_of_a_token invalid_ids thin
  step racecheck-graphs 180 compute-sanitizer --tool racecheck --error-exitcode 9 \
    .device/bin/cuda_graphs --test-threads=1 forward_inside routing_of_a_token invalid_ids thin
  step memcheck-cpu-compare 150 env FDMOE_GPU_QUICK=1 FDMOE_GPU_CASES="gate rounds,qwen-like,odd,grouped" \
    compute-sanitizer --tool memcheck --error-exitcode 9 .device/bin/cuda_vs_cpu
  # The W4A8 GEMMs (bulk copies on mbarriers, wgmma from registers) at every token tile.
  step racecheck-w4a8 120 env FDMOE_GPU_CASES="w4a8 odd,w4a8 interleaved" \
    compute-sanitizer --tool racecheck --error-exitcode 9 .device/bin/cuda_vs_cpu
  # FP4 prefill on sm_90a (the odd cases' T = 200): generic stores of the decoded weights
  # between cp.async copies and wgmma reads of the same buffers.
  step racecheck-fp4-wgmma 120 env FDMOE_GPU_CASES="mxfp4 odd,nvfp4 odd" \
    compute-sanitizer --tool racecheck --error-exitcode 9 .device/bin/cuda_vs_cpu
  # The W8A8 GEMMs (FP8_BLOCK on sm_90a: cp.async into swizzled tiles, wgmma from shared, GEMM
  # 1's last-arriving block quantizing each 128-channel group from the others' stores), every
  # token tile (the token tiles case: 16 / 32 tokens, and the 64-token prefill tile).
  step racecheck-w8a8 150 env FDMOE_GPU_CASES="fp8_block grouped,fp8_block interleaved,fp8_block token tiles" \
    compute-sanitizer --tool racecheck --error-exitcode 9 .device/bin/cuda_vs_cpu
fi

if [ -n "${FDMOE_PYTEST:-}" ]; then
  step pytest-cuda 120 python3 -m pytest -q -x bindings/python/tests/test_cuda.py
fi
if [ -n "${FDMOE_GATE_TRACE:-}" ]; then
  step gate-trace 90 bash -c 'nvcc -O3 -arch=sm_90a -std=c++17 -I kernels -o /tmp/gate_trace bench/gate_trace.cu &&
    for t in $0; do /tmp/gate_trace "$t" || exit 1; done' "$FDMOE_GATE_TRACE"
fi
if [ -n "${FDMOE_LATENCY:-}" ]; then
  # shellcheck disable=SC2086
  step graph-latency 150 python3 bench/graph_latency.py $FDMOE_LATENCY
fi
if [ -n "${FDMOE_BENCH:-}" ]; then
  # shellcheck disable=SC2086
  step gpu-bench 500 python3 bench/gpu_bench.py $FDMOE_BENCH
fi

# What each step measured, then the table of steps.
for f in "$OUT"/cuda_vs_cpu*.log; do [ -f "$f" ] && grep -E "FAIL|test result" "$f" | tail -5; done
for f in "$OUT"/memcheck-*.log "$OUT"/racecheck-*.log; do [ -f "$f" ] && { echo "$(basename "$f"):"; grep -E "ERROR SUMMARY|LEAK SUMMARY|RACECHECK SUMMARY" "$f" | tail -3; }; done
[ -f "$OUT/gate-trace.log" ] && grep -E "^T=|stamp (1|2|3|4|5|6|7|8|9|10):" "$OUT/gate-trace.log"
[ -f "$OUT/graph-latency.log" ] && grep -E "^\|" "$OUT/graph-latency.log" | tail -20
[ -f "$OUT/gpu-bench.log" ] && grep -E "^\|" "$OUT/gpu-bench.log" | tail -40
echo
echo "| step | result | seconds |"
echo "|---|---|---|"
printf '%s\n' "${summary[@]}"
exit $status
