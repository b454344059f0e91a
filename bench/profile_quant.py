#!/usr/bin/env python3
"""One quantized (or bf16) routing="given" layer of a SPEC §8 shape, run `--iters` times at one
token count: the target for `ncu` / `nsys` when a kernel's speed needs explaining.

    ncu --kernel-name regex:qgemm --launch-count 2 --section SpeedOfLight \\
        python3 bench/profile_quant.py --format fp8_block --shape qwen3-30b-a3b --tokens 16

Run from the repository root on the device machine (scripts/build_gpu_bundle.sh first)."""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402  (environment setup and the random quantized experts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="fp8_block", help="fp8_block, mxfp4, mxfp4_a8 (on FP8 activations), nvfp4 or bfloat16")
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--routed", action="store_true",
                    help="bf16 only: the layer's own routing from a gate (gpu_bench's fdmoe+routing)")
    ap.add_argument("--library", default="./.device/libfdmoe.so")
    args = ap.parse_args()
    gpu_bench.setup_environment(args)
    sys.path.insert(0, str(gpu_bench.find_anchors("./.device/anchors")))
    import torch
    import fdmoe
    import moe_anchors as A

    E, k, H, I = A.SHAPES[args.shape]
    if args.format == "bfloat16":
        w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / math.sqrt(H)
        w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / math.sqrt(I)
        if args.routed:
            layer = gpu_bench.make_routed(args.shape, E, k, H, I, args.tokens, w13, w2, fdmoe, torch)
        else:
            layer = gpu_bench.make_given(E, k, H, I, args.tokens, w13, w2, fdmoe)
    else:
        if args.routed:
            sys.exit("--routed is for bfloat16 layers")
        w4a8 = args.format == "mxfp4_a8"  # MXFP4 experts on FP8 activations, as in gpu_bench
        weights = "mxfp4" if w4a8 else args.format
        layer = fdmoe.MoELayer(E, k, H, I, routing="given", act_dtype="bfloat16",
                               weight_dtype=weights, max_tokens=args.tokens, device="cuda",
                               act_quant="fp8_mx" if w4a8 else "none")
        gpu_bench.QuantizedExperts(torch, weights, E, H, I).load_into(layer)
    x = torch.randn(args.tokens, H, device="cuda", dtype=torch.bfloat16)
    topk_w, topk_ids = torch.topk(torch.softmax(torch.randn(args.tokens, E, device="cuda"), -1), k, -1)
    topk_w = (topk_w / topk_w.sum(-1, keepdim=True)).float().contiguous()
    kw = {} if args.routed else dict(topk_ids=topk_ids.to(torch.int32), topk_weights=topk_w)
    for _ in range(args.iters):
        layer.forward(x, **kw)
    torch.cuda.synchronize()
    layer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
