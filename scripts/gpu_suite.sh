#!/usr/bin/env bash
# The GPU test suite, run on the device machine from the repository root after
# scripts/build_gpu_bundle.sh built .device/ here. Prints a short table last.
set -uo pipefail
export FDMOE_REQUIRE_GPU=1 FDMOE_REQUIRE_NVRTC=1 NCCL_NVLS_ENABLE=0
export FDMOE_CACHE_DIR=${FDMOE_CACHE_DIR:-/tmp/fdmoe-cache}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
status=0
for t in ${FDMOE_GPU_TESTS:-kernels_compile cuda_graphs cuda_vs_cpu}; do
  echo "== $t"
  start=$(date +%s)
  if ! .device/bin/$t --nocapture --test-threads=1 2>&1 | tee "$OUT/$t.log"; then status=1; fi
  echo "== $t took $(( $(date +%s) - start )) s"
done

if [ -n "${FDMOE_SANITIZE:-}" ]; then
  for tool in "memcheck --leak-check full" racecheck; do
    echo "== compute-sanitizer $tool (representative set)"
    compute-sanitizer --tool $tool --error-exitcode 9 \
      .device/bin/cuda_graphs --test-threads=1 layers_share forward_inside 2>&1 | tail -4 || status=1
  done
  FDMOE_GPU_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 9 .device/bin/cuda_vs_cpu 2>&1 | tail -5 || status=1
fi
exit $status
