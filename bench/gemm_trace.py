#!/usr/bin/env python3
"""Where the wgmma decode GEMMs' time goes, block by block: one routing="given" FP8_BLOCK layer of
a SPEC §8 shape run with the GEMMs' phase stamps compiled in (FDMOE_GEMM_TRACE, kernels/common/
types.cuh: globaltimer at entry, after the dependent-launch wait, after the tile set-up, when
the first stage has landed, after the last MMA, after the store, at the end; and the SM), then
for each GEMM of the last forward: the median length of each phase, the kernel's span against
its weight bytes at the copy rate, and a timeline of how many blocks an SM stream (first stage
landed .. last MMA) and the weight rate that implies.

    python3 bench/gemm_trace.py --shapes qwen3-30b-a3b,deepseek-v3 --tokens 16

Run from the repository root on the device machine (scripts/build_gpu_bundle.sh first). The
stamped kernels are compiled on the device by NVRTC (the buffer's address is in their source)."""

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402  (environment setup and the random quantized experts)

TRACE_BLOCKS = 16384  # FDMOE_GEMM_TRACE_BLOCKS
PHASES = ("wait", "setup", "first stage", "stream", "store", "quantize")


def analyse(trace, gemm, name, weight_bytes_per_block, copy_rate, bins, origin=None):
    """Prints one GEMM's phases and timeline; returns its first block's entry (ns)."""
    rows = trace[gemm].cpu().tolist()
    blocks = [r for r in rows if r[0] != 0]
    real = [r for r in blocks if (r[7] >> 32) & 0xFF]
    if not real:
        print(f"{name}: no stamped blocks")
        return None
    t0 = min(r[0] for r in blocks)
    end = max(max(r[:7]) for r in blocks)
    span_us = (end - t0) / 1e3
    sms = len({r[7] & 0xFFFFFFFF for r in blocks})
    total = weight_bytes_per_block * len(real)
    ideal_us = total / copy_rate / 1e-6 / 1e12
    print(f"\n{name}: {len(blocks)} blocks ({len(real)} with work) on {sms} SMs; span {span_us:.1f} us; "
          f"weights {total / 1e6:.1f} MB = {ideal_us:.1f} us at {copy_rate:.2f} TB/s "
          f"({ideal_us / span_us:.2f} of the rate)")
    if origin is not None:
        print(f"  first block entered {(t0 - origin) / 1e3:.1f} us and the last ended {(end - origin) / 1e3:.1f} us "
              f"after GEMM 1's first")
    # Phases: stamps 0 entry, 1 after wait, 2 after set-up, 3 first stage, 4 last MMA, 5 store, 6 end.
    order = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    if gemm == 1:  # GEMM 2 waits inside its pipeline, after its first weight copies
        order = [(0, 2), (2, 1), (1, 3), (3, 4), (4, 5), (5, 6)]
        phases = ("setup", "copies, wait", "first stage", "stream", "store", "quantize")
    else:
        phases = PHASES
    cells = []
    for (a, b), label in zip(order, phases):
        d = [(r[b] - r[a]) / 1e3 for r in real if r[a] and r[b]]
        if d:
            cells.append(f"{label} {statistics.median(d):.2f}")
    life = [(r[6] - r[0]) / 1e3 for r in real]
    print("  median us: " + ", ".join(cells) + f"; block life {statistics.median(life):.2f} "
          f"(min {min(life):.1f}, max {max(life):.1f})")
    empty = [r for r in blocks if not (r[7] >> 32) & 0xFF]
    if empty:
        first_empty = (min(r[0] for r in empty) - t0) / 1e3
        print(f"  {len(empty)} blocks without work, the first entering at {first_empty:.1f} us")
    firsts = sorted((r[3] - t0) / 1e3 for r in real)
    lasts = sorted((r[4] - t0) / 1e3 for r in real)
    print(f"  first stage landed: first block {firsts[0]:.2f} us, median {statistics.median(firsts):.1f}; "
          f"last MMA of the last block {lasts[-1]:.1f} us")
    # Timeline: time-weighted blocks streaming per SM, and the weight rate if each block's
    # bytes arrive evenly between its set-up and its last MMA.
    bin_us = span_us / bins
    streaming = [0.0] * bins
    resident = [0.0] * bins
    rate = [0.0] * bins
    for r in real:
        for lo, hi, acc, bytes_ in ((r[3], r[4], streaming, None), (r[0], r[6], resident, None),
                                    (r[2], r[4], rate, weight_bytes_per_block)):
            if hi <= lo:
                continue
            a, b = (lo - t0) / 1e3, (hi - t0) / 1e3
            for i in range(min(bins - 1, int(a // bin_us)), min(bins, int(b // bin_us) + 1)):
                ov = min(b, (i + 1) * bin_us) - max(a, i * bin_us)
                if ov > 0:
                    acc[i] += ov / bin_us if bytes_ is None else bytes_ * ov / (b - a)
    print(f"  | us | blocks resident / SM | streaming / SM | weight TB/s |")
    for i in range(bins):
        tb = rate[i] / (bin_us * 1e-6) / 1e12
        print(f"  | {i * bin_us:6.1f} | {resident[i] / sms:4.2f} | {streaming[i] / sms:4.2f} | {tb:4.2f} |")
    return t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3-30b-a3b,deepseek-v3")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--bins", type=int, default=20, help="timeline rows per GEMM")
    ap.add_argument("--copy-rate", type=float, default=3.02, help="TB/s, the floor's (H100: 3.02)")
    ap.add_argument("--library", default="./.device/libfdmoe.so")
    args = ap.parse_args()
    gpu_bench.setup_environment(args)
    sys.path.insert(0, str(gpu_bench.find_anchors("./.device/anchors")))
    import torch
    import fdmoe
    import moe_anchors as A

    trace = torch.zeros(2, TRACE_BLOCKS, 8, device="cuda", dtype=torch.int64)
    os.environ["FDMOE_GEMM_TRACE"] = hex(trace.data_ptr())
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        E, k, H, I = A.SHAPES[shape]
        layer = fdmoe.MoELayer(E, k, H, I, routing="given", act_dtype="bfloat16", weight_dtype="fp8_block",
                               max_tokens=args.tokens, device="cuda")
        gpu_bench.QuantizedExperts(torch, "fp8_block", E, H, I).load_into(layer)
        x = torch.randn(args.tokens, H, device="cuda", dtype=torch.bfloat16)
        topk_w, topk_ids = torch.topk(torch.softmax(torch.randn(args.tokens, E, device="cuda"), -1), k, -1)
        topk_w = (topk_w / topk_w.sum(-1, keepdim=True)).float().contiguous()
        experts = len(set(topk_ids.flatten().tolist()))
        for _ in range(args.iters):
            trace.zero_()
            layer.forward(x, topk_ids=topk_ids.to(torch.int32), topk_weights=topk_w)
        torch.cuda.synchronize()
        print(f"\n## {shape}, FP8_BLOCK, T = {args.tokens}, {experts} experts routed "
              f"(stamps of forward {args.iters}, eager)")
        # One block: 64 weight rows (wgmma M) of K bytes.
        origin = analyse(trace, 0, "GEMM 1 (up)", 64 * H, args.copy_rate, args.bins)
        analyse(trace, 1, "GEMM 2 (down)", 64 * I, args.copy_rate, args.bins, origin)
        layer.close()
        del layer
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
