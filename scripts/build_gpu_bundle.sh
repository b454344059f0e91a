#!/usr/bin/env bash
# Builds, here (no GPU needed), everything the GPU suite runs on the device machine: the
# release cdylib with the cuda feature, the GPU test binaries and the sm_90a kernel cache
# (NVRTC here, so the device compiles nothing), into .device/ (git-ignored, carried to the
# device by `run ... carry=[".device"]`; scripts/gpu_suite.sh points FDMOE_CACHE_DIR at it).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$PWD/target-cuda"  # a separate folder: the device build never invalidates the CPU one
cargo build --release --features cuda --quiet
mkdir -p .device/bin
rm -f .device/bin/*
cp target-cuda/release/libfdmoe.so .device/
for t in cuda_vs_cpu cuda_graphs kernels_compile; do
  exe=$(cargo test --release --features cuda --no-run --message-format=json --test "$t" 2>/dev/null \
        | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -1)
  cp "$exe" ".device/bin/$t"
done
# The C++ binding's CUDA test, against the bundled library (found through LD_LIBRARY_PATH there).
c++ -std=c++17 -Wall -Wextra -Wpedantic -Werror -O1 -I include -I bindings/cpp/include \
  bindings/cpp/tests/test_cuda_layer.cpp -o .device/bin/cpp_test_cuda_layer -L .device -lfdmoe -ldl
rm -rf .device/cache .device/cache.tar.xz
FDMOE_CACHE_DIR="$PWD/.device/cache" cargo run --release --features cuda --quiet \
  --example precompile_kernels -- sm_90a
# Packed: the cubins are most of the bundle and shrink ~15x (gpu_suite.sh unpacks them).
tar -C .device -cJf .device/cache.tar.xz cache && rm -rf .device/cache
# The anchors harness (SPEC §8 comparisons) lives beside the repository and does not travel.
if [ -f ../shared/anchors/moe_anchors.py ]; then
  mkdir -p .device/anchors && cp ../shared/anchors/moe_anchors.py .device/anchors/
fi
# Debug info would push the bundle past what travels to the device (64 MiB).
strip .device/libfdmoe.so .device/bin/*
ls -la .device .device/bin; du -sh .device
