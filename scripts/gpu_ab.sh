#!/usr/bin/env bash
# A/B timing in one device call: bench/gpu_bench.py with the given arguments on a "before"
# library (.device/old/: libfdmoe.so and its cache.tar.xz, copied there from an earlier
# scripts/build_gpu_bundle.sh) and on the current bundle (.device/), alternating, ROUNDS times
# (default 2), so that drift between processes shows as a difference between rounds rather
# than between libraries. Each library keeps its own kernel cache: the cache key holds the
# kernel sources, so a changed kernel would otherwise be compiled on the device.
#
#   cp .device/libfdmoe.so .device/cache.tar.xz .device/old/   # before rebuilding
#   scripts/build_gpu_bundle.sh                                 # the change
#   scripts/gpu_ab.sh --no-anchors --shapes qwen3-30b-a3b --tokens 1,64,256   # on the device
set -uo pipefail
export FDMOE_REQUIRE_GPU=1 PYTHONUNBUFFERED=1 LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -f .device/old/libfdmoe.so ] && [ -f .device/old/cache.tar.xz ] || { echo "no .device/old bundle" >&2; exit 2; }
python3 scripts/unpack_cubins.py .device/old/cache.tar.xz /tmp/fdmoe-cache-old
python3 scripts/unpack_cubins.py .device/cache.tar.xz /tmp/fdmoe-cache-new
status=0
for round in $(seq "${ROUNDS:-2}"); do
  for v in old new; do
    lib=.device/libfdmoe.so; [ "$v" = old ] && lib=.device/old/libfdmoe.so
    echo "== $v, round $round"
    FDMOE_CACHE_DIR=/tmp/fdmoe-cache-$v python3 bench/gpu_bench.py --library "$lib" "$@" \
      > >(tee -a "$OUT/ab_$v.log") 2>&1 || status=1
  done
done
exit $status
