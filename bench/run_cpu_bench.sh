#!/usr/bin/env bash
# CPU benchmark: fdmoe (examples/cpu_bench.rs) beside numpy/OpenBLAS (bench/numpy_moe.py) on
# the same shapes, weights, inputs and given routing. Shape by shape, fdmoe then numpy, never
# both at once (so a slow drift of the machine hits both sides of a row alike); then a merged
# table: median ms per cell, the ratio fdmoe / numpy, and the relative L2 difference of the two
# outputs (a check that both did the same work).
#
#   bench/run_cpu_bench.sh [--shapes a,b] [--tokens 1,16,64,256] [--threads 2] [--min-reps 5]
#                          [--max-reps 30] [--min-secs 1.0]
#
# Every argument goes to both sides. Needs python3 with numpy and threadpoolctl
# (`python3 -m pip install numpy threadpoolctl`). Run it on an otherwise idle machine: the
# script reports how much CPU other processes took while it ran, and a compile beside it
# distorts the timings.
set -euo pipefail
cd "$(dirname "$0")/.."

shapes="qwen3-30b-a3b,mixtral-8x7b,deepseek-v3"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --shapes) shapes="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cargo build --release --quiet --example cpu_bench

# CPU time (clock ticks) the whole machine spent busy, and this shell's children.
machine_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
children_cpu() { awk '{print $16+$17}' /proc/$$/stat; }
busy_start=$(machine_busy)

IFS=, read -ra shape_list <<<"$shapes"
for shape in "${shape_list[@]}"; do
  echo "== $shape: fdmoe" >&2
  ./target/release/examples/cpu_bench --shapes "$shape" --out-dir "$work" "${args[@]}" |
    tee -a "$work/results.jsonl"
  # Some machines here set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE to work around old OpenBLAS
  # builds; they hold a current numpy back to a slower kernel, so the numpy side runs without
  # them (numpy_moe.py prints the kernel and thread count OpenBLAS then uses).
  echo "== $shape: numpy" >&2
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
    python3 bench/numpy_moe.py --shapes "$shape" --check-dir "$work" "${args[@]}" |
    tee -a "$work/results.jsonl"
done

ticks=$(getconf CLK_TCK)
busy=$(($(machine_busy) - busy_start))
echo
python3 bench/numpy_moe.py --merge "$work/results.jsonl"
echo
# Far more machine time than this run's own means something else competed for the cores.
echo "CPU-seconds while this ran: machine $((busy / ticks)), this run $(($(children_cpu) / ticks))"
