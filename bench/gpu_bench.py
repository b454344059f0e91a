#!/usr/bin/env python3
"""SPEC §8 on the GPU: libfdmoe beside the anchors, timed in one process.

For each benchmark shape (moe_anchors.SHAPES) and token count (moe_anchors.TOKENS, or
--quick / --tokens): bf16 weights made on the GPU exactly as moe_anchors.main makes them,
routing given exactly as the anchors get it (top-k of the softmax of random logits,
renormalized), and

  fdmoe ms          a routing="given" fdmoe cuda layer that borrows the torch weight tensors,
                    `layer.forward(x, topk_ids=..., topk_weights=...)` captured inside torch's
                    CUDA graph and replayed (moe_anchors.bench_graph), after its output is
                    checked against moe_anchors.ref_moe (rel L2 < 2e-2);
  fdmoe+routing ms  the whole layer with the library's own routing from a f32 [E, H] gate
                    (grouped_topk, n_group 8, topk_group 4, correction bias for DeepSeek-V3;
                    softmax_topk otherwise), checked against ref_moe on its recorded routing;
  anchors           moe_anchors' torch_loop (T <= 256 only: it is slow), grouped_mm and the
                    Triton (vLLM algorithm) kernel with moe_anchors.main's candidate configs,
                    the best kept; each checked against the same reference;
  floor             max(bytes / copy bandwidth, flops / bf16 matmul rate) as moe_anchors
                    computes it, from moe_anchors.ceilings() measured once at the start;
  <format> ms       with --formats fp8_block,mxfp4,nvfp4 (T <= --format-max-tokens): a
                    routing="given" layer of pre-quantized random experts of that format
                    (E4M3 codes of normal values with 1/sqrt(K) block scales; random E2M1 nibbles
                    with scales giving the same weight RMS), loaded from host memory through
                    load_quantized_weights, timed the same way on the same x and routing, and
                    checked against ref_moe's arithmetic on the weights dequantized by torch.
                    Its ratio is to the bf16 floor of the cell (the issue's targets are stated
                    against it).

JSON lines go to stdout as cells finish (and to $OUT/gpu_bench.jsonl when OUT is set); a
markdown table ends the run. Run from the repository root on the device machine, after
scripts/build_gpu_bundle.sh put the cuda build and the anchors into .device/:

    python3 bench/gpu_bench.py [--quick] [--shapes qwen3-30b-a3b,...] [--tokens 1,16]
                               [--no-anchors] [--no-routing]

Needs only python3 with torch, triton and numpy (the device image); fdmoe is imported from
bindings/python beside this script, the library from $FDMOE_LIBRARY or ./.device/libfdmoe.so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK_TOLERANCE = 2e-2
TORCH_LOOP_MAX_TOKENS = 256


# ---------------------------------------------------------------------------------------------
# Setup.


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--anchors-dir", default="./.device/anchors",
                    help="folder holding moe_anchors.py (default ./.device/anchors, then "
                         "the repository's .device/anchors, then ../shared/anchors)")
    ap.add_argument("--library", default=os.environ.get("FDMOE_LIBRARY", "./.device/libfdmoe.so"),
                    help="libfdmoe.so with the cuda backend ($FDMOE_LIBRARY, else ./.device/libfdmoe.so)")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of moe_anchors.SHAPES")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts (default moe_anchors.TOKENS)")
    ap.add_argument("--quick", action="store_true", help="only the first four token counts")
    ap.add_argument("--no-anchors", action="store_true", help="time fdmoe only")
    ap.add_argument("--no-routing", action="store_true", help="skip the fdmoe+routing column")
    ap.add_argument("--formats", default="", help="comma-separated quantized formats to time too")
    ap.add_argument("--format-max-tokens", type=int, default=4096,
                    help="largest T the quantized layers run (their workspace is sized by it)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def find_anchors(arg: str) -> Path:
    for cand in (Path(arg), REPO / ".device" / "anchors", REPO.parent / "shared" / "anchors"):
        if (cand / "moe_anchors.py").is_file():
            return cand.resolve()
    sys.exit(f"moe_anchors.py not found in {arg} (nor .device/anchors, ../shared/anchors); "
             "scripts/build_gpu_bundle.sh copies it there, or pass --anchors-dir")


def setup_environment(args) -> None:
    lib = Path(args.library)
    if not lib.is_file():
        sys.exit(f"{lib} not found: build it with scripts/build_gpu_bundle.sh or pass --library")
    os.environ["FDMOE_LIBRARY"] = str(lib.resolve())
    # The library reads these when it first compiles/loads its kernels (NVRTC, disk cache).
    os.environ.setdefault("FDMOE_CACHE_DIR", "/tmp/fdmoe-cache")
    cuda_lib = "/usr/local/cuda/lib64"
    paths = os.environ.get("LD_LIBRARY_PATH", "")
    if os.path.isdir(cuda_lib) and cuda_lib not in paths.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{cuda_lib}:{paths}" if paths else cuda_lib
    sys.path.insert(0, str(REPO / "bindings" / "python"))


_jsonl = None


def emit(obj: dict) -> None:
    line = json.dumps(obj)
    print(line, flush=True)
    if _jsonl is not None:
        _jsonl.write(line + "\n")
        _jsonl.flush()


def log(msg: str) -> None:
    print(f"# {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# The benchmark.


def fake_quantize_fp8(torch, a):
    """SPEC §5's FP8_BLOCK activations: E4M3 per row per 128 channels (amax >= 1e-4), back to
    float32."""
    rows, cols = a.shape
    g = a.reshape(rows, cols // 128, 128)
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    q = (g * (448.0 / amax)).to(torch.float8_e4m3fn).float()
    return (q * (amax / 448.0)).reshape(rows, cols)


def fake_pre_dispatch(torch, a):
    """act_quant = FP8_MX's activations (SPEC §5's pre-dispatch rule): E4M3 per row per 32
    channels with a power-of-two scale 2^ceil(log2(max(amax, 1e-4) / 448)), back to float32."""
    rows, cols = a.shape
    g = a.reshape(rows, cols // 32, 32)
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    return ((g / scale).to(torch.float8_e4m3fn).float() * scale).reshape(rows, cols)


def reference(torch, x, w13, w2, topk_w, topk_ids, fp8_activations=False):
    """moe_anchors.ref_moe (its torch_loop in float32), expert by expert: the same arithmetic in
    the same order, without ref_moe's float32 copy of every weight at once (45 GB for
    DeepSeek-V3, which would not fit beside the bf16 weights). w13 / w2 may also be functions
    of the expert returning its float32 matrices (quantized layers); `fp8_activations`
    quantizes both GEMMs' inputs as FP8_BLOCK layers do, "mx" as act_quant = FP8_MX does."""
    if fp8_activations == "mx":
        fq = lambda a: fake_pre_dispatch(torch, a)  # noqa: E731
    elif fp8_activations:
        fq = lambda a: fake_quantize_fp8(torch, a)  # noqa: E731
    else:
        fq = lambda a: a  # noqa: E731
    M, H = x.shape
    get13 = w13 if callable(w13) else (lambda e: w13[e].float())
    get2 = w2 if callable(w2) else (lambda e: w2[e].float())
    xf = fq(x.float())
    out = torch.zeros((M, H), device=x.device, dtype=torch.float32)
    for e in torch.unique(topk_ids).tolist():
        tok, slot = torch.where(topk_ids == e)
        h = xf[tok] @ get13(e).t()
        I = h.shape[1] // 2
        a = fq(torch.nn.functional.silu(h[:, :I]) * h[:, I:])
        out.index_add_(0, tok, (a @ get2(e).t()).float() * topk_w[tok, slot, None])
    return out.to(torch.bfloat16).float()


# E2M1 code -> value (sign in bit 3).
_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
_E2M1_RMS = math.sqrt(sum(v * v for v in _E2M1) / 8)


class QuantizedExperts:
    """Random pre-quantized experts of one format in the layouts load_quantized_weights takes
    (host numpy), made on the GPU, plus a torch dequantizer of one expert for the reference."""

    def __init__(self, torch, fmt, E, H, I):
        fmt = "mxfp4" if fmt == "mxfp4_a8" else fmt  # the same weights, FP8 activations
        self.torch, self.fmt = torch, fmt
        self.parts = {}
        for name, (n, k) in (("w13", (2 * I, H)), ("w2", (H, I))):
            if fmt == "fp8_block":
                # Expert by expert: float32 normals of all of DeepSeek-V3's experts would not fit.
                data = torch.empty(E, n, k, device="cuda", dtype=torch.uint8)
                for e in range(E):
                    data[e] = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn).view(torch.uint8)
                scale = torch.full((E, n // 128, k // 128), 1.0 / math.sqrt(k), device="cuda")
                glob = None
            else:
                data = torch.randint(0, 256, (E, n, k // 2), device="cuda", dtype=torch.uint8)
                target = 1.0 / (_E2M1_RMS * math.sqrt(k))  # the weight RMS of a bf16 layer
                if fmt == "mxfp4":
                    byte = 127 + round(math.log2(target))
                    scale = torch.full((E, n, k // 32), byte, device="cuda", dtype=torch.uint8)
                    glob = None
                else:
                    scale = torch.full((E, n, k // 16), 0x38, device="cuda", dtype=torch.uint8)  # 1.0
                    glob = torch.full((E,), target, device="cuda")
            self.parts[name] = tuple(None if t is None else t.cpu().numpy() for t in (data, scale, glob))
            del data, scale
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def load_into(self, layer):
        (d13, s13, g13), (d2, s2, g2) = self.parts["w13"], self.parts["w2"]
        layer.load_quantized_weights(d13, d2, s13, s2, g13, g2)

    def expert(self, name, e):
        """Expert e's matrix `name` as float32 on the GPU (exact dequantization)."""
        torch = self.torch
        data, scale, glob = self.parts[name]
        d = torch.from_numpy(data[e]).cuda()
        s = torch.from_numpy(scale[e]).cuda()
        if self.fmt == "fp8_block":
            w = d.view(torch.float8_e4m3fn).float()
            return w * s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
        lut = torch.tensor(_E2M1 + [-v for v in _E2M1], device="cuda")
        codes = torch.stack([d & 0xF, d >> 4], -1).reshape(d.shape[0], -1).long()
        w = lut[codes]
        if self.fmt == "mxfp4":
            return w * torch.exp2(s.float() - 127).repeat_interleave(32, 1)
        bs = s.view(torch.float8_e4m3fn).float().repeat_interleave(16, 1)
        return w * bs * float(glob[e])


def graph_replay_is_bitwise(torch, fn) -> bool:
    """Captures fn() in a torch CUDA graph, replays it and compares with an eager call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    graph.replay()
    eager = fn()
    torch.cuda.synchronize()
    same = torch.equal(captured.view(torch.int16), eager.view(torch.int16))
    del graph, captured
    return bool(same)


def attempt(res: dict, key: str, fn):
    """fn(), or None with the failure recorded as res[key + "_error"] (one failing part of a
    cell must not end a run that costs device time)."""
    try:
        return fn()
    except Exception as ex:  # noqa: BLE001
        res[f"{key}_error"] = f"{type(ex).__name__}: {str(ex)[:240]}"
        log(f"{key} failed: {res[f'{key}_error']}")
        return None


def make_given(E, k, H, I, max_tokens, w13, w2, fdmoe):
    """A routing="given" cuda layer borrowing w13/w2 (the anchors' conditions)."""
    layer = fdmoe.MoELayer(E, k, H, I, routing="given", act_dtype="bfloat16",
                           weight_dtype="bfloat16", max_tokens=max_tokens, device="cuda")
    layer.load_weights(w13, w2, borrow=True)
    return layer


def make_routed(name, E, k, H, I, max_tokens, w13, w2, fdmoe, torch):
    """A cuda layer routing with its own f32 [E, H] gate, borrowing w13/w2: DeepSeek-V3's
    grouped top-k (n_group 8, topk_group 4, correction bias, scaling 2.5), else softmax top-k."""
    common = dict(act_dtype="bfloat16", weight_dtype="bfloat16", max_tokens=max_tokens, device="cuda")
    gate = torch.randn(E, H, device="cuda") / math.sqrt(H)
    if name == "deepseek-v3":
        layer = fdmoe.MoELayer(E, k, H, I, routing="grouped_topk", n_group=8, topk_group=4,
                               routed_scaling_factor=2.5, **common)
        bias = 0.1 * torch.randn(E, device="cuda")
        layer.load_weights(w13, w2, gate=gate, correction_bias=bias, borrow=True)
    else:
        layer = fdmoe.MoELayer(E, k, H, I, routing="softmax_topk", **common)
        layer.load_weights(w13, w2, gate=gate, borrow=True)
    return layer


def bench_shape(name, tokens, args, A, fdmoe, torch, bw, fl):
    E, k, H, I = A.SHAPES[name]
    log(f"{name}: E={E} k={k} H={H} I={I}, tokens {tokens}")
    t0 = time.time()
    # Exactly as moe_anchors.main makes them.
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / math.sqrt(H)
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / math.sqrt(I)
    w13t = w13.transpose(1, 2)
    w2t = w2.transpose(1, 2)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the randn temporaries, so the library's allocations fit
    setup = {}  # layer creation failures, repeated in every row of the shape
    max_tokens = max(tokens)
    given = attempt(setup, "fdmoe", lambda: make_given(E, k, H, I, max_tokens, w13, w2, fdmoe))
    routed = None
    if not args.no_routing:
        routed = attempt(setup, "fdmoe_routing",
                         lambda: make_routed(name, E, k, H, I, max_tokens, w13, w2, fdmoe, torch))
    quantized = {}
    fmt_max = min(max_tokens, args.format_max_tokens)
    for fmt in [f for f in args.formats.split(",") if f]:
        def make_quantized(fmt=fmt):
            experts = QuantizedExperts(torch, fmt, E, H, I)
            w4a8 = fmt == "mxfp4_a8"
            layer = fdmoe.MoELayer(E, k, H, I, routing="given", act_dtype="bfloat16",
                                   weight_dtype="mxfp4" if w4a8 else fmt, max_tokens=fmt_max,
                                   device="cuda", act_quant="fp8_mx" if w4a8 else "none")
            experts.load_into(layer)
            return experts, layer

        quantized[fmt] = attempt(setup, fmt, make_quantized)
    log(f"{name}: weights and layers ready in {time.time() - t0:.1f} s")

    rows = []
    for M in tokens:
        t_cell = time.time()
        x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(M, E, device="cuda")
        topk_w, topk_ids = torch.topk(torch.softmax(logits, -1), k, -1)
        topk_w = (topk_w / topk_w.sum(-1, keepdim=True)).float().contiguous()
        ti = topk_ids.to(torch.int32)
        active = torch.unique(topk_ids).numel()
        wbytes = active * 3 * H * I * 2
        bytes_min = wbytes + M * H * 2 * 2
        flops = 2 * M * k * 3 * H * I
        floor_ms = max(bytes_min / bw, flops / fl) * 1e3
        ref = reference(torch, x, w13, w2, topk_w, topk_ids)
        ref_norm = ref.norm()

        def err(o):
            return ((o.float() - ref).norm() / ref_norm).item()

        res = {"shape": name, "tokens": M, "active_experts": active, "floor_ms": floor_ms}
        res.update(setup)

        # fdmoe, routing given: checked, graph replay compared with eager, timed.
        def run_given():
            return given.forward(x, topk_ids=ti, topk_weights=topk_w)

        def time_given():
            res["fdmoe_err"] = err(run_given())
            res["fdmoe_check"] = "ok" if res["fdmoe_err"] < CHECK_TOLERANCE else "FAILED"
            res["fdmoe_graph_bitwise"] = attempt(res, "fdmoe_graph",
                                                 lambda: graph_replay_is_bitwise(torch, run_given))
            torch.cuda.empty_cache()
            res["fdmoe_ms"] = A.bench_graph(run_given)

        if given is not None:
            attempt(res, "fdmoe", time_given)

        # fdmoe with its own routing, checked on the routing it recorded.
        def time_routed():
            o, rid, rw = routed.forward(x, return_routing=True)
            rref = reference(torch, x, w13, w2, rw, rid.long())
            res["fdmoe_routing_err"] = ((o.float() - rref).norm() / rref.norm()).item()
            res["fdmoe_routing_check"] = "ok" if res["fdmoe_routing_err"] < CHECK_TOLERANCE else "FAILED"
            res["fdmoe_routing_active_experts"] = torch.unique(rid).numel()
            res["fdmoe_routing_ms"] = A.bench_graph(lambda: routed.forward(x))

        if routed is not None:
            attempt(res, "fdmoe_routing", time_routed)

        # Quantized layers on the same x and routing, checked on their own weights.
        for fmt, made in quantized.items():
            if made is None or M > fmt_max:
                continue
            experts, qlayer = made

            def time_quantized(fmt=fmt, experts=experts, qlayer=qlayer):
                def run():
                    return qlayer.forward(x, topk_ids=ti, topk_weights=topk_w)

                qref = reference(torch, x, lambda e: experts.expert("w13", e),
                                 lambda e: experts.expert("w2", e), topk_w, topk_ids,
                                 fp8_activations="mx" if fmt == "mxfp4_a8" else fmt == "fp8_block")
                res[f"{fmt}_err"] = ((run().float() - qref).norm() / qref.norm()).item()
                res[f"{fmt}_check"] = "ok" if res[f"{fmt}_err"] < CHECK_TOLERANCE else "FAILED"
                del qref
                res[f"{fmt}_graph_bitwise"] = graph_replay_is_bitwise(torch, run)
                torch.cuda.empty_cache()
                res[f"{fmt}_ms"] = A.bench_graph(run)
                res[f"{fmt}_over_bf16_floor"] = res[f"{fmt}_ms"] / floor_ms

            attempt(res, fmt, time_quantized)

        # The anchors, on the same inputs (moe_anchors.main's procedure).
        if not args.no_anchors:
            if M <= TORCH_LOOP_MAX_TOKENS:
                res["torch_loop_ms"] = A.bench(lambda: A.torch_loop(x, w13, w2, topk_w, topk_ids))
            try:
                o = A.grouped_mm(x, w13t, w2t, topk_w, topk_ids)
                res["grouped_mm_err"] = err(o)
                res["grouped_mm_ms"] = A.bench_graph(lambda: A.grouped_mm(x, w13t, w2t, topk_w, topk_ids))
            except Exception as ex:  # noqa: BLE001
                res["grouped_mm_ms"] = None
                res["grouped_mm_error"] = str(ex)[:120]
            cands = []
            if name == "qwen3-30b-a3b":
                key = min(A.VLLM_QWEN_H100, key=lambda b: abs(b - M))
                cands.append(A.VLLM_QWEN_H100[key])
            cands += A.SWEEP
            best = None
            for cfg in cands:
                try:
                    o = A.triton_moe(x, w13, w2, topk_w, ti, cfg)
                    e_ = err(o)
                    if not e_ < CHECK_TOLERANCE:
                        continue
                    t = A.bench_graph(lambda: A.triton_moe(x, w13, w2, topk_w, ti, cfg))
                    if best is None or t < best[0]:
                        best = (t, cfg, e_)
                except Exception as ex:  # noqa: BLE001
                    log(f"triton cfg failed {cfg} {str(ex)[:100]}")
            if best:
                res["triton_vllm_ms"], res["triton_cfg"], res["triton_err"] = best

        anchors = {n: res.get(f"{n}_ms") for n in ("torch_loop", "grouped_mm", "triton_vllm")}
        anchors = {n: v for n, v in anchors.items() if v}
        fd = res.get("fdmoe_ms")
        if anchors:
            best_name = min(anchors, key=anchors.get)
            res["best_anchor"], res["best_anchor_ms"] = best_name, anchors[best_name]
            if fd:
                res["fdmoe_over_best"] = fd / anchors[best_name]
        if fd:
            res["fdmoe_over_floor"] = fd / floor_ms
        res["cell_s"] = round(time.time() - t_cell, 2)
        emit(res)
        rows.append(res)
        torch.cuda.empty_cache()

    for layer in [given, routed] + [m[1] for m in quantized.values() if m is not None]:
        if layer is not None:
            layer.close()
    torch.cuda.synchronize()
    return rows  # the weights go with this frame; main() empties torch's cache


def table(rows) -> str:
    def f(v):
        return f"{v:.3f}" if isinstance(v, float) else "-"

    def ratio(v):
        return f"{v:.2f}x" if isinstance(v, float) else "-"

    short = {"torch_loop": "torch loop", "grouped_mm": "grouped_mm", "triton_vllm": "triton"}
    lines = [
        "| shape | T | active E | floor ms | fdmoe ms | fdmoe+routing ms | torch loop | grouped_mm "
        "| triton | best anchor | fdmoe/floor | fdmoe/best |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flag = {"ok": "", "FAILED": " (CHECK FAILED)"}.get(r.get("fdmoe_check"), " (ERROR)")
        best = "-"
        if r.get("best_anchor"):
            best = f"{r['best_anchor_ms']:.3f} ({short[r['best_anchor']]})"
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['active_experts']} | {f(r['floor_ms'])} | "
            f"{f(r.get('fdmoe_ms'))}{flag} | {f(r.get('fdmoe_routing_ms'))} | "
            f"{f(r.get('torch_loop_ms'))} | {f(r.get('grouped_mm_ms'))} | "
            f"{f(r.get('triton_vllm_ms'))} | {best} | {ratio(r.get('fdmoe_over_floor'))} | "
            f"{ratio(r.get('fdmoe_over_best'))} |"
        )
    formats = [f for f in ("fp8_block", "mxfp4", "mxfp4_a8", "nvfp4") if any(f"{f}_ms" in r for r in rows)]
    if formats:
        lines += [
            "",
            "| shape | T | bf16 floor ms | fdmoe bf16 ms | best anchor ms | "
            + " | ".join(f"{f} ms | {f}/bf16 floor" for f in formats) + " |",
            "|---|---|---|---|---|" + "---|---|" * len(formats),
        ]
        for r in rows:
            if not any(f"{f}_ms" in r for f in formats):
                continue
            cells = []
            for f_ in formats:
                flag = "" if r.get(f"{f_}_check", "ok") == "ok" else " (CHECK FAILED)"
                cells.append(f"{f(r.get(f'{f_}_ms'))}{flag} | {ratio(r.get(f'{f_}_over_bf16_floor'))}")
            lines.append(
                f"| {r['shape']} | {r['tokens']} | {f(r['floor_ms'])} | {f(r.get('fdmoe_ms'))} | "
                f"{f(r.get('best_anchor_ms'))} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def main() -> int:
    global _jsonl
    args = parse_args()
    anchors_dir = find_anchors(args.anchors_dir)
    setup_environment(args)
    sys.path.insert(0, str(anchors_dir))

    import torch
    import triton

    import fdmoe
    import moe_anchors as A

    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        _jsonl = open(Path(os.environ["OUT"]) / "gpu_bench.jsonl", "w")

    shapes = args.shapes.split(",") if args.shapes else list(A.SHAPES)
    unknown = [s for s in shapes if s not in A.SHAPES]
    if unknown:
        sys.exit(f"unknown shapes {unknown}; known: {', '.join(A.SHAPES)}")
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    else:
        tokens = A.TOKENS[:4] if args.quick else list(A.TOKENS)

    start = time.time()
    torch.manual_seed(args.seed)
    features = fdmoe.query_features("cuda")
    if not features:
        sys.exit(f"{os.environ['FDMOE_LIBRARY']} has no cuda backend (build it with scripts/build_gpu_bundle.sh)")
    bw, fl = A.ceilings()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    emit({
        "device": torch.cuda.get_device_name(),
        "copy_bw_TBps": round(bw / 1e12, 3),
        "bf16_mm_TFLOPs": round(fl / 1e12, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fdmoe": fdmoe.version(),
        "library": os.environ["FDMOE_LIBRARY"],
        "anchors": str(anchors_dir / "moe_anchors.py"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    })
    log(f"device {torch.cuda.get_device_name()}  copy_bw {bw / 1e12:.2f} TB/s  bf16_mm {fl / 1e12:.0f} TFLOP/s")

    rows = []
    for name in shapes:
        rows += bench_shape(name, tokens, args, A, fdmoe, torch, bw, fl)
        torch.cuda.empty_cache()  # this shape's weights, before the next shape's (DeepSeek: 22.5 GB)
        log(f"{name} done, {time.time() - start:.0f} s so far")
    print()
    print(table(rows), flush=True)
    checked = ("fdmoe", "fp8_block", "mxfp4", "mxfp4_a8", "nvfp4")
    failed = [f"{r['shape']}/{r['tokens']}" for r in rows
              if r.get("fdmoe_check") != "ok" or r.get("fdmoe_routing_check", "ok") != "ok"
              or any(r.get(f"{c}_check", "ok") != "ok" for c in checked)
              or any(key.startswith(checked) and key.endswith("_error") for key in r)]
    log(f"total {time.time() - start:.0f} s" + (f"; fdmoe CHECK FAILED or ERROR in {failed}" if failed else ""))
    if _jsonl is not None:
        _jsonl.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
