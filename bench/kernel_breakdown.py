#!/usr/bin/env python3
"""Where one forward's GPU time goes: per-kernel durations and the gaps between them.

Runs one layer of a SPEC §8 shape (the layer's own routing as gpu_bench's fdmoe+routing column,
or routing="given" with --given, or a quantized format with --format) under the library's graph
replay (or eagerly, with --eager), `--iters` times inside torch.profiler (CUPTI sees the kernels
of replayed graphs), and prints for each kernel its median duration, then the median span of a
whole forward (first kernel start to last kernel end) and how much of it no kernel ran.

    python3 bench/kernel_breakdown.py --shape qwen3-30b-a3b --tokens 1
    python3 bench/kernel_breakdown.py --shape deepseek-v3 --tokens 64 --format mxfp4
    FDMOE_NO_DEPENDENT_LAUNCH=1 python3 bench/kernel_breakdown.py --paired --tokens 8192

--paired alternates eager and replayed forwards in one profile and prints them side by side.

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
        w4a8 = args.format == "mxfp4_a8"  # MXFP4 experts on FP8 activations, as in gpu_bench
        weights = "mxfp4" if w4a8 else args.format
        layer = fdmoe.MoELayer(E, k, H, I, routing="given", act_dtype="bfloat16",
                               weight_dtype=weights, max_tokens=args.tokens, device="cuda",
                               act_quant="fp8_mx" if w4a8 else "none")
        gpu_bench.QuantizedExperts(torch, weights, E, H, I).load_into(layer)
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
    ap.add_argument("--paired", action="store_true",
                    help="eager and replay forwards alternately in one profile, side by side (run with "
                         "FDMOE_NO_DEPENDENT_LAUNCH=1, or overlapping kernels blur the per-kernel times)")
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
    if not args.eager or args.paired:
        layer.capture_graphs(token_counts=[T])
    modes = [True, False] if args.paired else [args.eager]
    for _ in range(10):
        for eager in modes:
            layer.forward(x, force_eager=eager, **kw)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            for eager in modes:
                layer.forward(x, force_eager=eager, **kw)
                torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()),
                     key=lambda e: e.time_range.start)
    # Calls in launch order: a replayed one starts with the argument-block writer, an eager one
    # with the first kernel of the forward, once the current call has had its own.
    first = next((e.name for e in kernels if e.name != "set_forward_args"), None)
    if first is None:
        print("no kernels recorded")
        return 1
    calls, current = [], []
    for e in kernels:
        if current and (e.name == "set_forward_args" or (e.name == first and any(c.name == first for c in current))):
            calls.append(current)
            current = []
        current.append(e)
    if current:
        calls.append(current)
    if len(calls) != args.iters * len(modes):
        print(f"{len(kernels)} kernels did not split into {args.iters * len(modes)} calls")
        return 1
    columns = []
    for m, eager in enumerate(modes):
        per = [c for i, c in enumerate(calls) if i % len(modes) == m]
        durations, spans, busy = {}, [], []
        for call in per:
            for j, e in enumerate(c for c in call if c.name != "set_forward_args"):
                durations.setdefault((j, e.name), []).append(e.time_range.end - e.time_range.start)
            spans.append(call[-1].time_range.end - call[0].time_range.start)
            busy.append(sum(e.time_range.end - e.time_range.start for e in call))
        writer = [e.time_range.end - e.time_range.start for call in per for e in call if e.name == "set_forward_args"]
        columns.append(("eager" if eager else "replay", durations, spans, busy, writer))
    print(f"# {torch.cuda.get_device_name()}: {args.shape} T={T} format={args.format} "
          f"{'given' if given else 'routed'}{active}, {args.iters} forwards "
          f"{'each way, alternating' if args.paired else ('eager' if args.eager else 'replay')}")
    names = [c[0] for c in columns]
    print("| # | kernel | " + " | ".join(f"{n} median us" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    if any(c[4] for c in columns):
        print("| | set_forward_args | " + " | ".join(f"{statistics.median(c[4]):.1f}" if c[4] else "-" for c in columns)
              + " |")
    for key in sorted(columns[0][1]):
        print(f"| {key[0]} | {key[1][:60]} | "
              + " | ".join(f"{statistics.median(c[1][key]):.1f}" if key in c[1] else "-" for c in columns) + " |")
    print("| | span (first start to last end) | "
          + " | ".join(f"{statistics.median(c[2]):.1f}" for c in columns) + " |")
    print("| | of which no kernel ran | "
          + " | ".join(f"{statistics.median(c[2]) - statistics.median(c[3]):.1f}" for c in columns) + " |")
    layer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
