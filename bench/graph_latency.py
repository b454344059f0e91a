"""Per-call latency of one fdmoe forward, eager vs library graph replay, and its host cost.

For each SPEC shape (routing by the layer's own gate, as a serving engine runs it) and
T in 1, 8, 64, 512, 8192, on the lent GPU:
  eager ms        GPU time of one fdmoe_forward with FDMOE_FORWARD_FORCE_EAGER (CUDA events)
  replay ms       GPU time of one fdmoe_forward replaying the library's graph for T's bucket
                  (its argument-block writer node updated, one graph launch)
  torch graph ms  the same eager kernels captured in a torch.cuda.CUDAGraph by the caller
  replay overhead median over rounds of (replay - torch graph), the two timed back to back in
                  each round: what the library's own graph path adds. Paired, because at
                  T = 8192 a few tens of microseconds of clock drift between two separately
                  timed medians of ~3 ms exceed the quantity measured
  host us         CPU time of one fdmoe_forward call (ctypes call on a prebuilt argument struct,
                  into an idle stream), eager and replay: median of many
Medians of many calls after warm-up. Run on the device: python3 bench/graph_latency.py
"""
import argparse
import ctypes
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402  (environment setup and layer builders shared with the table)

SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336),
          "deepseek-v3": (256, 8, 7168, 2048)}
TOKENS = [1, 8, 64, 512, 8192]


def event_ms(torch, call):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    call()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def interleaved_ms(torch, calls, reps):
    """Each round times every call once, in turn: their medians, and the per-round times."""
    rounds = [[event_ms(torch, c) for c in calls] for _ in range(reps)]
    return [statistics.median(r[i] for r in rounds) for i in range(len(calls))], rounds


def host_us(torch, call, reps):
    """Median CPU time of one call into an idle stream. Timing a loop of calls instead would
    count the wait for a free slot once the GPU falls behind: at Qwen3 T = 512 (an eager
    forward is six launches and 0.7 ms) 200 calls fill the launch queue and read ~100 us each."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--library", default="./.device/libfdmoe.so")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--reps", type=int, default=0, help="timed rounds per T (0: 200, 50 from 4096 tokens)")
    args = ap.parse_args()
    gpu_bench.setup_environment(args)
    import torch
    import fdmoe
    from fdmoe import _lib

    lib = _lib.load()
    print(f"# device {torch.cuda.get_device_name()}", flush=True)
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = []
    for name in args.shapes.split(","):
        E, k, H, I = SHAPES[name]
        w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / math.sqrt(H)
        w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / math.sqrt(I)
        layer = gpu_bench.make_routed(name, E, k, H, I, max(tokens), w13, w2, fdmoe, torch)
        stream = torch.cuda.current_stream()
        layer.capture_graphs(stream=stream)
        handle = layer._live()
        for T in tokens:
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
            a = _lib.init_struct(_lib.FdmoeForwardArgs, "fdmoe_forward_args_init")
            a.num_tokens, a.x, a.out, a.stream = T, x.data_ptr(), out.data_ptr(), stream.cuda_stream
            ref = ctypes.byref(a)

            def call(flags):
                a.flags = flags
                _lib.check(lib.fdmoe_forward(handle, ref))

            eager = lambda: call(_lib.FORWARD_FORCE_EAGER)  # noqa: E731
            replay = lambda: call(0)  # noqa: E731
            reps = args.reps or (50 if T >= 4096 else 200)
            g = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                a.stream = side.cuda_stream
                with torch.cuda.graph(g, stream=side):
                    eager()
                a.stream = stream.cuda_stream
            torch.cuda.synchronize()
            for f in (eager, replay, g.replay):
                for _ in range(5):
                    f()
            eager()
            torch.cuda.synchronize()
            e_out = out.clone()
            replay()
            torch.cuda.synchronize()
            bitwise = bool(torch.equal(e_out, out))
            (eager_ms, replay_ms, graph_ms), rounds = interleaved_ms(torch, (eager, replay, g.replay), reps)
            res = {"shape": name, "T": T, "eager_ms": eager_ms, "replay_ms": replay_ms, "torch_graph_ms": graph_ms,
                   "replay_overhead_us": statistics.median(r[1] - r[2] for r in rounds) * 1e3,
                   "eager_host_us": host_us(torch, eager, reps), "replay_host_us": host_us(torch, replay, reps),
                   "replay_bitwise": bitwise}
            rows.append(res)
            print(res, flush=True)
        layer.close()
        del w13, w2
        torch.cuda.empty_cache()
    print("\n| shape | T | eager ms | replay ms | torch graph ms | replay overhead us | eager host us | replay host us | replay == eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['T']} | {r['eager_ms']:.3f} | {r['replay_ms']:.3f} | {r['torch_graph_ms']:.3f} | "
              f"{r['replay_overhead_us']:.1f} | {r['eager_host_us']:.1f} | {r['replay_host_us']:.1f} | {r['replay_bitwise']} |")


if __name__ == "__main__":
    main()
