#!/usr/bin/env python3
"""Where one forward's GPU time goes: per-kernel durations and the gaps between them.

Runs one layer of a SPEC §8 shape (the layer's own routing as gpu_bench's fdmoe+routing column,
or routing="given" with --given, or a quantized format with --format) under the library's graph
replay (or eagerly, with --eager), `--iters` times inside torch.profiler (CUPTI sees the kernels
of replayed graphs), and prints for each kernel its median duration, then the median span of a
whole forward (first kernel start to last kernel end) and how much of it no kernel ran.

    python3 bench/kernel_breakdown.py --shape qwen3-30b-a3b --tokens 1
    python3 bench/kernel_breakdown.py --shape deepseek-v3 --tokens 64 --format mxfp4

Run from the repository root on the device machine (scripts/build_gpu_bundle.sh first)."""

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402  (environment setup and layer builders)


def build_layer(args, torch, fdmoe, A):
    E, k, H, I = A.SHAPES[args.shape]
    if args.format != "bfloat16":
        layer = fdmoe.MoELayer(E, k, H, I, routing="given", act_dtype="bfloat16",
                               weight_dtype=args.format, max_tokens=args.tokens, device="cuda")
        gpu_bench.QuantizedExperts(torch, args.format, E, H, I).load_into(layer)
        return layer, True
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / math.sqrt(H)
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / math.sqrt(I)
    if args.given:
        return gpu_bench.make_given(E, k, H, I, args.tokens, w13, w2, fdmoe), True
    return gpu_bench.make_routed(args.shape, E, k, H, I, args.tokens, w13, w2, fdmoe, torch), False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--format", default="bfloat16")
    ap.add_argument("--given", action="store_true", help="routing='given' (bf16 only)")
    ap.add_argument("--eager", action="store_true", help="no library graphs: the eager forward")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--library", default="./.device/libfdmoe.so")
    args = ap.parse_args()
    gpu_bench.setup_environment(args)
    sys.path.insert(0, str(gpu_bench.find_anchors("./.device/anchors")))
    import torch
    import fdmoe
    import moe_anchors as A

    E, k, H, I = A.SHAPES[args.shape]
    layer, given = build_layer(args, torch, fdmoe, A)
    T = args.tokens
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    kw, active = {}, ""
    if given:
        w, ids = torch.topk(torch.softmax(torch.randn(T, E, device="cuda"), -1), k, -1)
        kw = dict(topk_ids=ids.to(torch.int32), topk_weights=(w / w.sum(-1, keepdim=True)).float())
        active = f", {ids.unique().numel()} experts active"
    if not args.eager:
        layer.capture_graphs(token_counts=[T])
    for _ in range(10):
        layer.forward(x, **kw)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            layer.forward(x, **kw)
            torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()),
                     key=lambda e: e.time_range.start)
    per_call = len(kernels) // args.iters
    if per_call == 0:
        print("no kernels recorded")
        return 1
    durations, spans, busy = {}, [], []
    for i in range(args.iters):
        call = kernels[i * per_call:(i + 1) * per_call]
        for j, e in enumerate(call):
            durations.setdefault((j, e.name), []).append(e.time_range.end - e.time_range.start)
        spans.append(call[-1].time_range.end - call[0].time_range.start)
        busy.append(sum(e.time_range.end - e.time_range.start for e in call))
    print(f"# {torch.cuda.get_device_name()}: {args.shape} T={T} format={args.format} "
          f"{'given' if given else 'routed'}{active}, {'eager' if args.eager else 'replay'}, "
          f"{per_call} kernels per forward, {args.iters} forwards")
    print("| # | kernel | median us |\n|---|---|---|")
    for (j, name), d in sorted(durations.items()):
        print(f"| {j} | {name[:60]} | {statistics.median(d):.1f} |")
    span, work = statistics.median(spans), statistics.median(busy)
    print(f"| | span (first start to last end) | {span:.1f} |")
    print(f"| | of which no kernel ran | {span - work:.1f} |")
    layer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
