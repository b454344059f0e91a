#!/usr/bin/env python3
"""One decode step of a model's MoE layers: N fdmoe layers of a SPEC shape, each with its own
weights and gate (routing from the layer's gate, as gpu_bench's fdmoe+routing column), run in
sequence on one stream, each on the same x (random weights would shrink a chained activation
to nothing), the whole step captured in one torch CUDA graph and replayed
(moe_anchors.bench_graph).

gpu_bench times one layer replayed back to back: its kernels' code was run a forward ago and
is still in L2. In an engine every layer is its own backend with its own copy of the kernels,
last run a whole step ago, with every other layer's weights streamed through L2 since; this is
that case. Prints ms a step and us a layer; `--layers 1,16` times the first layer alone too
(the one-layer case in the same process, for the difference).

    python3 bench/decode_step.py --shape qwen3-30b-a3b --layers 1,16 --tokens 1,4,16

Run from the repository root on the device machine (scripts/build_gpu_bundle.sh first)."""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402  (environment setup and layer builders)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--layers", default="16", help="comma-separated layer counts")
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--library", default="./.device/libfdmoe.so")
    args = ap.parse_args()
    gpu_bench.setup_environment(args)
    sys.path.insert(0, str(gpu_bench.find_anchors("./.device/anchors")))
    import torch
    import moe_anchors as A
    import fdmoe

    E, k, H, I = A.SHAPES[args.shape]
    tokens = [int(t) for t in args.tokens.split(",")]
    counts = [int(n) for n in args.layers.split(",")]
    torch.manual_seed(0)
    weights, layers = [], []
    for _ in range(max(counts)):
        w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / math.sqrt(H)
        w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / math.sqrt(I)
        weights.append((w13, w2))  # borrowed by the layer: kept alive here
        layers.append(gpu_bench.make_routed(args.shape, E, k, H, I, max(tokens), w13, w2, fdmoe, torch))
    torch.cuda.synchronize()
    print("| shape | layers | T | ms a step | us a layer |\n|---|---|---|---|---|")
    for T in tokens:
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        outs = [torch.empty_like(x) for _ in layers]
        for n in counts:

            def step(n=n):
                for layer, o in zip(layers[:n], outs):
                    layer.forward(x, out=o)

            ms = A.bench_graph(step)
            print(f"| {args.shape} | {n} | {T} | {ms:.3f} | {ms * 1e3 / n:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
