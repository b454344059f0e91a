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
for t in ${FDMOE_GPU_TESTS:-kernels_compile cuda_vs_cpu}; do
  echo "== $t"
  start=$(date +%s)
  if ! .device/bin/$t --nocapture --test-threads=1 2>&1 | tee "$OUT/$t.log"; then status=1; fi
  echo "== $t took $(( $(date +%s) - start )) s"
done
exit $status
