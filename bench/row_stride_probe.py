#!/usr/bin/env python3
"""Does the weights' row stride decide the decode GEMMs' DRAM rate? Times one routing="given"
bf16 layer of Qwen3-30B-A3B's expert count and top-k (E 128, k 8) at small T for several
hidden / intermediate sizes around 2048 / 768, and prints the rate at which the forward
streams its experts' weights: a power-of-two row stride (H = 2048: 4 KiB rows of W13) can
map the blocks' concurrent reads, which sit at the same k offset of different rows, onto few
DRAM channels, where a padded one (H = 2112) would spread them.

    python3 bench/row_stride_probe.py [--tokens 1,8] [--sizes 2048x768,2112x768,...]

Run from the repository root on the device machine (scripts/build_gpu_bundle.sh first)."""

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402  (environment setup and the layer builder)

PER = 20  # forwards per timed graph replay


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--library", default="./.device/libfdmoe.so")
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--sizes", default="2048x768,2112x768,2048x832,2112x832,2176x768")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    gpu_bench.setup_environment(args)
    import torch
    import fdmoe

    E, k = 128, 8
    print("| H x I | T | active E | us (median) | weight bytes MB | TB/s |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        H, I = (int(v) for v in size.split("x"))
        w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / math.sqrt(H)
        w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / math.sqrt(I)
        for T in (int(t) for t in args.tokens.split(",")):
            g = torch.Generator(device="cuda").manual_seed(T)
            ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)]).int()
            w = torch.full((T, k), 1.0 / k, device="cuda")
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            layer = gpu_bench.make_given(E, k, H, I, T, w13, w2, fdmoe)
            # PER forwards captured in one torch graph, so the GPU time is timed and not the
            # Python call's host cost (larger than a decode forward).
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    layer.forward(x, topk_ids=ids, topk_weights=w)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(PER):
                    layer.forward(x, topk_ids=ids, topk_weights=w)
            for _ in range(5):
                graph.replay()
            times = []
            for _ in range(args.reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graph.replay()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1e3 / PER)
            us = statistics.median(times)
            active = int(torch.unique(ids).numel())
            mb = active * 3 * H * I * 2 / 1e6
            print(f"| {H} x {I} | {T} | {active} | {us:.1f} | {mb:.1f} | {mb / us:.2f} |", flush=True)
            layer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
