#!/usr/bin/env python3
"""numpy (OpenBLAS) side of the CPU benchmark: the same routed-expert work as
`examples/cpu_bench.rs`, on the same weights, inputs and given routing, bit for bit.

What is timed per forward (F32): a stable sort of the (token, slot) pairs by expert, then for
each active expert: gather its rows of x, `x @ W_gate.T`, `x @ W_up.T`, SwiGLU, `@ W_down.T`,
and a weighted scatter-add into `out` (a token picks an expert at most once, so the fancy-index
`+=` has no duplicate rows). Every matmul is one BLAS call on the whole row block of an expert.

Logical expert e uses physical expert e % pool, as on the Rust side (see its header).

Prints one JSON line per cell, like the Rust side, with "impl": "numpy". With `--check-dir`,
also compares each output with the `SHAPE_T<T>.f32` file cpu_bench wrote there (relative L2).
With `--merge FILE`, reads both sides' JSON lines from FILE and prints the comparison table.
"""

import argparse
import json
import time

import numpy as np

SHAPES = {
    # name: (num_experts, top_k, hidden, intermediate, pool, (n_group, topk_group) or None)
    "qwen3-30b-a3b": (128, 8, 2048, 768, 128, None),
    "mixtral-8x7b": (8, 2, 4096, 14336, 8, None),
    "deepseek-v3": (256, 8, 7168, 2048, 16, (8, 4)),
}

STREAM_X = 0x7000_0000
STREAM_SCORES = 0x6000_0000
STREAM_WEIGHTS = 0x5000_0000
CHUNK = 1 << 24


def mix(index, stream):
    """The counter hash of cpu_bench.rs, on uint32 arrays (wrapping arithmetic)."""
    u32 = np.uint32
    h = index.astype(np.uint32) * u32(0x9E3779B1)
    h ^= u32((stream * 0x85EBCA77) & 0xFFFFFFFF)
    h ^= h >> u32(15)
    h *= u32(0x2C1B3C6D)
    h ^= h >> u32(12)
    h *= u32(0x297A2D39)
    h ^= h >> u32(15)
    return h


def unit(index, stream):
    """Uniform [0, 1) on a 2^-24 grid, exact in f32."""
    return (mix(index, stream) >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def fill(shape, stream, scale):
    n = int(np.prod(shape))
    out = np.empty(n, dtype=np.float32)
    scale = np.float32(scale)
    for start in range(0, n, CHUNK):
        end = min(n, start + CHUNK)
        v = unit(np.arange(start, end, dtype=np.uint32), stream)
        v -= np.float32(0.5)
        v *= scale
        out[start:end] = v
    return out.reshape(shape)


def weight_scale(fan_in):
    return np.float32(np.sqrt(12.0 / fan_in))


def routing(num_experts, top_k, groups, t):
    e, k = num_experts, top_k
    idx = np.arange(t * e, dtype=np.uint32).reshape(t, e)
    scores = mix(idx, STREAM_SCORES + t).astype(np.uint64)
    # Unique keys: score high, reversed index low (ties -> lower index).
    keys = (scores << np.uint64(16)) | (np.uint64(0xFFFF) - np.arange(e, dtype=np.uint64))
    if groups is not None:
        n_group, topk_group = groups
        per = e // n_group
        best = scores.reshape(t, n_group, per).max(axis=2)
        gkeys = (best << np.uint64(16)) | (np.uint64(0xFFFF) - np.arange(n_group, dtype=np.uint64))
        kept = np.argsort(gkeys, axis=1)[:, ::-1][:, :topk_group]
        allowed = np.zeros((t, n_group), dtype=bool)
        np.put_along_axis(allowed, kept, True, axis=1)
        keys = np.where(np.repeat(allowed, per, axis=1), keys, np.uint64(0))
    ids = np.argsort(keys, axis=1)[:, ::-1][:, :k].astype(np.int32)
    u = unit(np.arange(t * k, dtype=np.uint32), STREAM_WEIGHTS + t).reshape(t, k)
    weights = (u + np.float32(0.5)) / np.float32(k)
    return ids, weights


def forward(x, ids, weights, experts, num_experts):
    """Routed experts with SwiGLU, per-expert BLAS matmuls, weighted scatter-add."""
    t, k = ids.shape
    out = np.zeros_like(x)
    flat = ids.ravel()
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=num_experts)
    tokens = order // k
    slot_weights = weights.ravel()[order][:, None]
    start = 0
    for e in np.flatnonzero(counts):
        end = start + counts[e]
        rows = tokens[start:end]
        xe = x[rows]
        w_gate, w_up, w_down = experts(e)
        g = xe @ w_gate.T
        u = xe @ w_up.T
        # silu(g) * u, in place.
        s = np.negative(g)
        np.exp(s, out=s)
        s += np.float32(1.0)
        np.divide(g, s, out=g)
        g *= u
        y = g @ w_down.T
        y *= slot_weights[start:end]
        out[rows] += y
        start = end
    return out


def time_runs(args, f):
    f()
    times = []
    start = time.perf_counter()
    while len(times) < args.min_reps or (
        len(times) < args.max_reps and time.perf_counter() - start < args.min_secs
    ):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)


def bench_shape(name, args):
    e, k, h, i, pool_size, groups = SHAPES[name]
    pool = [
        (
            fill((i, h), 3 * p + 1, weight_scale(h)),
            fill((i, h), 3 * p + 2, weight_scale(h)),
            fill((h, i), 3 * p + 3, weight_scale(i)),
        )
        for p in range(pool_size)
    ]

    def experts(x):
        return pool[x % pool_size]

    for t in args.tokens:
        x = fill((t, h), STREAM_X + t, np.sqrt(12.0))
        ids, weights = routing(e, k, groups, t)
        result = {}

        def run():
            result["out"] = forward(x, ids, weights, experts, e)

        times = time_runs(args, run)
        line = {
            "impl": "numpy",
            "shape": name,
            "tokens": t,
            "ms_median": round(float(np.median(times)), 4),
            "ms_min": round(times[0], 4),
            "reps": len(times),
        }
        if args.check_dir:
            try:
                ref = np.fromfile(f"{args.check_dir}/{name}_T{t}.f32", dtype=np.float32)
                out = result["out"].ravel()
                line["rel_l2_vs_fdmoe"] = float(
                    np.linalg.norm((out - ref).astype(np.float64)) / np.linalg.norm(out.astype(np.float64))
                )
            except FileNotFoundError:
                pass
        print(json.dumps(line), flush=True)


def merge(path):
    """Prints the markdown table of both sides' JSON lines in `path`."""
    cells = {}
    order = []
    blas = None
    with open(path) as f:
        for raw in f:
            raw = raw.strip()
            if not raw.startswith("{"):
                continue
            row = json.loads(raw)
            if "blas" in row:
                blas = row
                continue
            key = (row["shape"], row["tokens"])
            if key not in cells:
                order.append(key)
            cells.setdefault(key, {})[row["impl"]] = row

    def ms(v):
        return "-" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.2f}"

    print("| shape | T | fdmoe ms | numpy ms | fdmoe / numpy | rel L2 fdmoe vs numpy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for key in order:
        c = cells[key]
        f = c.get("fdmoe", {}).get("ms_median")
        n = c.get("numpy", {}).get("ms_median")
        err = c.get("numpy", {}).get("rel_l2_vs_fdmoe")
        ratio = f"{f / n:.2f}" if f and n else "-"
        err = "-" if err is None else f"{err:.1e}"
        print(f"| {key[0]} | {key[1]} | {ms(f)} | {ms(n)} | {ratio} | {err} |")
    if blas:
        print(
            f"\nnumpy {blas['numpy']}, {blas['blas']} {blas['version']}, "
            f"kernel {blas['kernel']}, {blas['threads']} threads"
        )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--tokens", default="1,16,64,256")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=30)
    p.add_argument("--min-secs", type=float, default=1.0)
    p.add_argument("--check-dir")
    p.add_argument("--merge", metavar="FILE")
    args = p.parse_args()
    if args.merge:
        merge(args.merge)
        return
    args.tokens = [int(v) for v in args.tokens.split(",")]
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=args.threads, user_api="blas"):
        for info in threadpool_info():
            if info.get("user_api") == "blas":
                print(
                    json.dumps(
                        {
                            "blas": info.get("internal_api"),
                            "version": info.get("version"),
                            "kernel": info.get("architecture"),
                            "threads": info.get("num_threads"),
                            "numpy": np.__version__,
                        }
                    ),
                    flush=True,
                )
        for name in args.shapes.split(","):
            bench_shape(name, args)


if __name__ == "__main__":
    main()
