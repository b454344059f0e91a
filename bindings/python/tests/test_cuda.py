"""device="cuda" against device="cpu": the same configuration and weights on both backends.

Skipped unless torch sees a CUDA device and the loaded libfdmoe has the cuda backend
(query_features("cuda") non-empty; the plain `cargo build --release` has none: build with
scripts/build_gpu_bundle.sh and point FDMOE_LIBRARY at .device/libfdmoe.so).

The cpu backend computes in f32 from the same bf16/f16-rounded inputs and weights, so the GPU
output must be within SPEC §8's relative L2 1e-2 of it (on the GPU's own routing, replayed on
the cpu, so near-tied choices do not count), and the routing ids must match wherever the k-th
and (k+1)-th scores are more than 1e-4 apart; router logits with exact ties, NaN and infinities
route exactly as on the cpu (ids in slot order, weights NaN where they are). Also: two GPU runs
are bitwise equal; torch
tensors are used in place, numpy arrays make a round trip, cupy arrays work where cupy is
installed; host pointers are refused; T > max_tokens is CAPACITY_EXCEEDED; forward captured in
the caller's torch.cuda.CUDAGraph replays bitwise like eager.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Optional

import ml_dtypes
import numpy as np
import pytest

import fdmoe
import reference as ref

ROUTING_GAP = 1e-4
TOLERANCE = 1e-2
QUANTIZED_TOLERANCE = 2e-2  # SPEC §8: quantized experts against the cpu on the same weights
NP = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}

torch = None


def _cuda_ready():
    global torch
    try:
        import torch as t
    except ImportError:
        return False, "torch is not installed"
    if not t.cuda.is_available():
        return False, "torch sees no CUDA device"
    try:
        features = fdmoe.query_features("cuda")
    except fdmoe.FdmoeError as e:
        return False, f"libfdmoe could not be queried: {e}"
    if not features:
        return False, "this libfdmoe build has no cuda backend (query_features('cuda') is empty)"
    torch = t
    return True, ""


READY, WHY = _cuda_ready()
pytestmark = pytest.mark.skipif(not READY, reason=WHY)

DEV = "cuda:0"


# -- conversions between numpy (ml_dtypes) and torch ------------------------------------------


def T(a: np.ndarray):
    """A torch CUDA tensor with a numpy array's values and dtype (bfloat16 included)."""
    a = np.ascontiguousarray(a)
    if a.dtype == NP["bfloat16"]:
        return torch.from_numpy(a.view(np.int16)).to(DEV).view(torch.bfloat16)
    return torch.from_numpy(a).to(DEV)


def N(t) -> np.ndarray:
    """A numpy copy of a tensor (bfloat16 as ml_dtypes.bfloat16)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).cpu().numpy().view(NP["bfloat16"])
    return t.cpu().numpy()


def bits(t):
    """The raw bits of a tensor, for bitwise comparisons (NaN == NaN)."""
    t = t.detach().contiguous()
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def same_bits(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


# -- one configuration -----------------------------------------------------------------------


@dataclass
class GpuCase:
    num_experts: int = 16
    top_k: int = 4
    hidden_size: int = 64
    intermediate_size: int = 32
    tokens: int = 40
    dtype: str = "bfloat16"
    routing: str = "softmax_topk"
    n_group: int = 1
    topk_group: int = 1
    scoring: str = "sigmoid"
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False
    latent_size: Optional[int] = None
    num_shared_experts: int = 0
    shared_intermediate_size: int = 24
    layout: str = "torch"
    source: str = "gate"  # "gate", "logits" (router_logits given) or "given" (routing="given")
    max_tokens: Optional[int] = None
    weight_dtype: Optional[str] = None  # a quantized format; None: dtype
    act_quant: str = "none"
    seed: int = 0

    def layer(self, device: str) -> fdmoe.MoELayer:
        return fdmoe.MoELayer(
            self.num_experts, self.top_k, self.hidden_size, self.intermediate_size,
            routing="given" if self.source == "given" else self.routing,
            n_group=self.n_group, topk_group=self.topk_group, scoring=self.scoring,
            renormalize=self.renormalize, routed_scaling_factor=self.routed_scaling_factor,
            latent_size=self.latent_size, num_shared_experts=self.num_shared_experts,
            shared_intermediate_size=self.shared_intermediate_size,
            act_dtype=self.dtype, weight_dtype=self.weight_dtype or self.dtype,
            max_tokens=self.max_tokens or self.tokens, device=device, act_quant=self.act_quant,
        )

    def inputs(self) -> dict:
        """numpy inputs in the TORCH orientation; dense matrices and x already in the dtype, so
        both backends compute from exactly these values."""
        rng = np.random.default_rng(self.seed)
        E, H, I, Tn = self.num_experts, self.hidden_size, self.intermediate_size, self.tokens
        L = self.latent_size or H
        S = self.num_shared_experts * self.shared_intermediate_size
        dt = NP[self.dtype]

        def mat(*shape):
            return (rng.normal(0.0, 1.0, shape) / np.sqrt(shape[-1])).astype(np.float32).astype(dt)

        d = {"x": rng.normal(0.0, 1.0, (Tn, H)).astype(np.float32).astype(dt),
             "w13": mat(E, 2 * I, L), "w2": mat(E, L, I)}
        if self.source == "gate":
            d["gate"] = (rng.normal(0.0, 1.0, (E, H)) / np.sqrt(H)).astype(np.float32)
        if self.source == "logits":
            d["router_logits"] = rng.normal(0.0, 1.5, (Tn, E)).astype(np.float32)
        if self.source == "given":
            d["topk_ids"] = rng.integers(0, E, (Tn, self.top_k)).astype(np.int32)
            d["topk_weights"] = rng.uniform(0.1, 1.0, (Tn, self.top_k)).astype(np.float32)
        if self.latent_size:
            d["fc1"] = mat(L, H)
            d["fc2"] = mat(H, L)
        if S:
            d["shared_w13"] = mat(2 * S, H)
            d["shared_w2"] = mat(H, S)
        if self.correction_bias:
            d["correction_bias"] = rng.normal(0.0, 0.3, (E,)).astype(np.float32)
        return d

    def weights(self, d: dict, kind: str) -> dict:
        """load_weights keywords in self.layout, as numpy arrays or torch CUDA tensors."""
        conv = T if kind == "torch" else (lambda a: a)
        kw = {"layout": self.layout}
        for name in ("w13", "w2", "fc1", "fc2", "shared_w13", "shared_w2"):
            if name in d:
                a = d[name]
                if self.layout == "paddle":
                    a = np.ascontiguousarray(np.swapaxes(a, -1, -2))
                kw[name] = conv(a)
        if "gate" in d:
            g = d["gate"] if self.layout == "torch" else np.ascontiguousarray(d["gate"].T)
            kw["gate"] = conv(g)
        if "correction_bias" in d:
            kw["correction_bias"] = conv(d["correction_bias"])
        return kw

    def routing_params(self, d: dict) -> ref.Routing:
        return ref.Routing(
            mode=self.routing, top_k=self.top_k, n_group=self.n_group,
            topk_group=self.topk_group, scoring=self.scoring, renormalize=self.renormalize,
            routed_scaling_factor=self.routed_scaling_factor,
            correction_bias=d.get("correction_bias"),
        )

    def routing_args(self, d: dict, conv):
        if self.source == "logits":
            return {"router_logits": conv(d["router_logits"])}
        if self.source == "given":
            return {"topk_ids": conv(d["topk_ids"]), "topk_weights": conv(d["topk_weights"])}
        return {}


def check_against_cpu(case: GpuCase, d: dict, cpu: fdmoe.MoELayer, out, ids=None, weights=None) -> float:
    """Asserts a GPU result (numpy arrays) against the cpu backend; returns the rel L2 error."""
    x = d["x"]
    assert np.isfinite(out.astype(np.float32)).all(), "non-finite GPU output"
    if case.source == "given":
        want = cpu.forward(x, topk_ids=d["topk_ids"], topk_weights=d["topk_weights"])
    else:
        E, k = case.num_experts, case.top_k
        assert ids.shape == (case.tokens, k) and ids.dtype == np.int32
        assert ((ids >= 0) & (ids < E)).all()
        if case.source == "logits":
            logits = d["router_logits"].astype(np.float64)
        else:
            logits = x.astype(np.float64) @ d["gate"].astype(np.float64).T
        ref_ids, ref_w, gap = ref.route(logits, case.routing_params(d))
        clear = gap > ROUTING_GAP
        got_sorted, want_sorted = np.sort(ids, 1), np.sort(ref_ids, 1)
        bad = np.nonzero(clear & (got_sorted != want_sorted).any(1))[0]
        assert bad.size == 0, f"routing differs on tokens {bad[:5]}: {ids[bad[:5]]} vs {ref_ids[bad[:5]]}"
        go, wo = np.argsort(ids, 1), np.argsort(ref_ids, 1)
        np.testing.assert_allclose(
            np.take_along_axis(weights, go, 1)[clear], np.take_along_axis(ref_w, wo, 1)[clear],
            rtol=1e-4, atol=1e-6, err_msg="routing weights",
        )
        _, cpu_ids, _ = cpu.forward(x, **case.routing_args(d, lambda a: a), return_routing=True)
        assert (np.sort(cpu_ids, 1)[clear] == got_sorted[clear]).all()
        # The cpu backend on the GPU's routing: near-tied choices do not count.
        want = cpu.forward(x, topk_ids=ids, topk_weights=weights)
    err = ref.rel_l2(out.astype(np.float64), want.astype(np.float64))
    tol = QUANTIZED_TOLERANCE if case.weight_dtype else TOLERANCE
    assert err <= tol, f"relative L2 error vs the cpu backend {err:.3e} > {tol:.0e}"
    return err


def run_case(case: GpuCase, weights_kind: str = "torch", expect_borrowed: Optional[bool] = None):
    """Runs `case` on both backends with torch tensors in place; checks, determinism, record."""
    d = case.inputs()
    with case.layer("cpu") as cpu, case.layer(DEV) as gpu:
        cpu.load_weights(**case.weights(d, "numpy"))
        gpu.load_weights(**case.weights(d, weights_kind))
        if expect_borrowed is not None:
            assert gpu.weights_borrowed == expect_borrowed
        x = T(d["x"])
        rargs = case.routing_args(d, T)
        poison = torch.full((case.tokens, case.hidden_size), float("nan"), dtype=x.dtype, device=DEV)
        res = gpu.forward(x, **rargs, out=poison, return_routing=True)
        assert res[0] is poison
        again = gpu.forward(x, **rargs, return_routing=True)
        torch.cuda.synchronize()
        for a, b in zip(res, again):
            assert a.device == x.device
            assert same_bits(a, b), "two GPU runs differ"
        out, ids, w = (N(t) for t in res)
        assert out.dtype == NP[case.dtype]
        err = check_against_cpu(case, d, cpu, out, ids, w)
        if case.source != "given":
            # Replaying the record on the GPU gives the same bits.
            replay = gpu.forward(x, topk_ids=res[1], topk_weights=res[2])
            assert same_bits(replay, res[0])
        else:
            # The record of given routing is the routing given.
            assert (ids == d["topk_ids"]).all() and w.tobytes() == d["topk_weights"].tobytes()
        return err


ROUTINGS = {
    "softmax": dict(routing="softmax_topk"),
    "softmax_norenorm_scaled": dict(routing="softmax_topk", renormalize=False, routed_scaling_factor=2.5),
    "sigmoid": dict(routing="sigmoid_topk"),
    "grouped": dict(routing="grouped_topk", n_group=4, topk_group=2),
    "grouped_bias": dict(routing="grouped_topk", n_group=4, topk_group=2, correction_bias=True,
                         routed_scaling_factor=2.5),
    "grouped_softmax": dict(routing="grouped_topk", n_group=2, topk_group=1, scoring="softmax"),
    "logits": dict(routing="sigmoid_topk", source="logits"),
    "given": dict(source="given"),
}


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(ROUTINGS))
def test_routing_modes_match_cpu(name, dtype):
    run_case(GpuCase(dtype=dtype, seed=_seed(name, dtype), **ROUTINGS[name]), expect_borrowed=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["softmax", "grouped_bias", "given"])
def test_latent_and_shared_experts(name, dtype):
    case = GpuCase(dtype=dtype, latent_size=48, num_shared_experts=2, seed=_seed("ls", name, dtype),
                   **ROUTINGS[name])
    run_case(case, weights_kind="numpy", expect_borrowed=False)
    run_case(replace(case, latent_size=None), expect_borrowed=True)
    run_case(replace(case, num_shared_experts=0), expect_borrowed=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("layout", ["torch", "paddle"])
def test_layouts(layout, dtype):
    # Torch CUDA tensors either way: borrowed in the torch layout, copied (OWN) in paddle's.
    case = GpuCase(dtype=dtype, layout=layout, latent_size=32, num_shared_experts=1,
                   seed=_seed("layout", dtype), **ROUTINGS["grouped_bias"])
    run_case(case, weights_kind="torch", expect_borrowed=(layout == "torch"))


QUANTIZED = dict(hidden_size=256, intermediate_size=128, tokens=33)
# The quantized modes: each format, and MXFP4 experts on FP8 activations (act_quant="fp8_mx").
MODES = {"fp8_block": {}, "mxfp4": {}, "nvfp4": {}, "mxfp4_fp8_mx": dict(act_quant="fp8_mx")}


def _mode(name):
    return dict(weight_dtype=name.replace("_fp8_mx", ""), **MODES[name])


@pytest.mark.parametrize("fmt", list(MODES))
@pytest.mark.parametrize("name", ["softmax", "grouped_bias", "given"])
def test_quantized_experts_match_cpu(fmt, name):
    # Quantize-on-load of the same host arrays on both backends.
    case = GpuCase(seed=_seed("q", fmt, name), **_mode(fmt), **QUANTIZED, **ROUTINGS[name])
    run_case(case, weights_kind="numpy", expect_borrowed=False)
    run_case(replace(case, latent_size=128, num_shared_experts=1, tokens=1),
             weights_kind="numpy", expect_borrowed=False)


@pytest.mark.parametrize("fmt", list(MODES))
def test_pre_quantized_experts_match_cpu(fmt):
    case = GpuCase(seed=_seed("pq", fmt), **_mode(fmt), **QUANTIZED)
    d = case.inputs()
    q13 = fdmoe.quantize(d["w13"], case.weight_dtype)
    q2 = fdmoe.quantize(d["w2"], case.weight_dtype)
    with case.layer("cpu") as cpu, case.layer(DEV) as gpu:
        for layer in (cpu, gpu):
            layer.load_quantized_weights(q13, q2, gate=d["gate"])
        out, ids, w = (N(t) for t in gpu.forward(T(d["x"]), return_routing=True))
        check_against_cpu(case, d, cpu, out, ids, w)


def test_quantized_f16_activations():
    # FP8_BLOCK takes float16 activations; FP4 formats decode to bfloat16 and refuse them.
    run_case(GpuCase(dtype="float16", weight_dtype="fp8_block", seed=5, **QUANTIZED),
             weights_kind="numpy")
    with pytest.raises(fdmoe.UnsupportedError, match="bfloat16"):
        GpuCase(dtype="float16", weight_dtype="mxfp4", **QUANTIZED).layer(DEV)


def test_weights_of_another_dtype_are_copied():
    case = GpuCase(seed=3)
    d = case.inputs()
    kw = case.weights(d, "torch")
    kw["w13"] = kw["w13"].float()  # float32 on a bfloat16 layer: OWN, rounded by the library
    with case.layer(DEV) as gpu, case.layer(DEV) as borrowed:
        gpu.load_weights(**kw)
        assert not gpu.weights_borrowed
        with pytest.raises(fdmoe.InvalidArgumentError, match="borrow"):
            gpu.load_weights(**kw, borrow=True)
        gpu.load_weights(**kw)
        borrowed.load_weights(**case.weights(d, "torch"))
        assert borrowed.weights_borrowed
        x = T(d["x"])
        assert same_bits(gpu.forward(x), borrowed.forward(x))


def test_numpy_round_trip_equals_torch_in_place():
    case = GpuCase(seed=4, **ROUTINGS["grouped_bias"])
    d = case.inputs()
    with case.layer(DEV) as gpu:
        gpu.load_weights(**case.weights(d, "numpy"))
        got = gpu.forward(d["x"], return_routing=True)
        assert all(isinstance(a, np.ndarray) for a in got)
        want = gpu.forward(T(d["x"]), return_routing=True)
        for a, b in zip(got, want):
            assert a.tobytes() == N(b).tobytes()
        # float32 numpy x is rounded like torch rounds a float32 tensor.
        x32 = d["x"].astype(np.float32)
        assert gpu.forward(x32).tobytes() == N(gpu.forward(T(x32))).tobytes()
        out = np.empty_like(got[0])
        assert gpu.forward(d["x"], out=out) is out and out.tobytes() == got[0].tobytes()


def test_conversions_in_place():
    case = GpuCase(seed=5)
    d = case.inputs()
    with case.layer(DEV) as gpu:
        gpu.load_weights(**case.weights(d, "torch"))
        x = T(d["x"])
        want = gpu.forward(x)
        # float32 x: rounded on the device; a strided view: made contiguous; an x starting
        # mid-buffer (not 16-byte aligned): copied.
        assert same_bits(gpu.forward(x.float()), want)
        wide = torch.repeat_interleave(x, 2, dim=1)[:, ::2]
        assert not wide.is_contiguous()
        assert same_bits(gpu.forward(wide), want)
        buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=DEV)
        mis = buf[1:].view(x.shape)
        mis.copy_(x)
        assert mis.data_ptr() % 16
        assert same_bits(gpu.forward(mis), want)
        # Routing given as int64 ids (converted on the device).
        _, ids, w = gpu.forward(x, return_routing=True)
        assert same_bits(gpu.forward(x, topk_ids=ids.long(), topk_weights=w), want)


def test_explicit_stream():
    case = GpuCase(seed=6)
    d = case.inputs()
    with case.layer(DEV) as gpu:
        gpu.load_weights(**case.weights(d, "torch"))
        x = T(d["x"])
        want = gpu.forward(x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # the current stream
            a = gpu.forward(x)
        b = gpu.forward(x, stream=s)  # an explicit one
        c = gpu.forward(x, stream=s.cuda_stream)
        s.synchronize()
        for got in (a, b, c):
            assert same_bits(got, want)


def test_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    for dtype in ("float16", "bfloat16"):
        case = GpuCase(dtype=dtype, seed=7)
        d = case.inputs()
        with case.layer(DEV) as gpu:
            gpu.load_weights(**case.weights(d, "numpy"))
            want = gpu.forward(T(d["x"]), return_routing=True)
            torch.cuda.synchronize()
            if dtype == "float16":
                x = cupy.asarray(d["x"])
            else:  # cupy has no bfloat16: float32 in, rounded on the device to bf16 bits
                x = cupy.asarray(d["x"].astype(np.float32))
            got = gpu.forward(x, return_routing=True)
            cupy.cuda.get_current_stream().synchronize()
            assert all(isinstance(a, cupy.ndarray) for a in got)
            assert got[0].dtype == (np.float16 if dtype == "float16" else np.uint16)
            for a, b in zip(got, want):
                assert a.get().tobytes() == N(b).tobytes()


def test_host_pointers_are_refused():
    case = GpuCase(seed=8)
    d = case.inputs()
    with case.layer(DEV) as gpu:
        gpu.load_weights(**case.weights(d, "torch"))
        x_host = np.ascontiguousarray(d["x"])
        out_host = np.empty_like(x_host)
        with pytest.raises(fdmoe.InvalidArgumentError, match="host pointer"):
            gpu.forward_raw(case.tokens, x_host.ctypes.data, out_host.ctypes.data)
        x = T(d["x"])
        with pytest.raises(fdmoe.InvalidArgumentError, match="host pointer"):
            gpu.forward_raw(case.tokens, x.data_ptr(), out_host.ctypes.data)
        out = torch.empty_like(x)
        ids_host = np.empty((case.tokens, case.top_k), np.int32)
        with pytest.raises(fdmoe.InvalidArgumentError, match="host pointer"):
            gpu.forward_raw(case.tokens, x.data_ptr(), out.data_ptr(), topk_ids_out=ids_host.ctypes.data)
        # Device pointers through the same path work, and match forward.
        gpu.forward_raw(case.tokens, x.data_ptr(), out.data_ptr(),
                        stream=torch.cuda.current_stream().cuda_stream)
        assert same_bits(out, gpu.forward(x))


def test_tokens_above_max_tokens():
    case = GpuCase(seed=9, tokens=16)
    d = case.inputs()
    with case.layer(DEV) as gpu:
        gpu.load_weights(**case.weights(d, "torch"))
        gpu.forward(T(d["x"]))
        x = torch.zeros(17, case.hidden_size, dtype=torch.bfloat16, device=DEV)
        with pytest.raises(fdmoe.CapacityExceededError, match="max_tokens"):
            gpu.forward(x)
        with pytest.raises(fdmoe.CapacityExceededError):
            gpu.forward(N(x))


def _tied_and_nonfinite_logits(E: int, seed: int) -> np.ndarray:
    """Router logits whose top k only the tie and NaN rules decide (SPEC §3: larger first, lower
    index on ties, NaN below every finite value)."""
    rng = np.random.default_rng(seed)
    rows = [np.full(E, 0.37), np.full(E, -2.0), rng.normal(0.0, 1.5, E), rng.normal(0.0, 1.5, E),
            np.round(rng.normal(0.0, 1.5, E) * 2) / 2, np.full(E, np.nan), np.full(E, -np.inf),
            rng.normal(0.0, 1.5, E)]
    rows[1][[E - 1, 3, E // 2, 7, 1, E - 2]] = 3.0  # six equal maxima, more than k
    rows[2][rng.choice(E, E // 3, replace=False)] = np.nan
    rows[3][[2, E - 3]] = np.inf
    rows[3][rng.choice(E, E // 4, replace=False)] = -np.inf
    rows[7][:] = rows[7][0]
    rows[7][E - 1] = np.nan
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("num_experts", [16, 200, 320])
@pytest.mark.parametrize("name", ["softmax", "sigmoid", "grouped", "grouped_bias"])
def test_tied_and_nonfinite_logits_route_like_the_cpu(name, num_experts):
    """Each pick path of the GPU routing (8, 4 and 16 keys a lane for 200, 16 and 320 experts)
    on rows of equal logits, partial ties, NaN and infinities: the same ids in the same slot
    order as the cpu backend, and the same weights (NaN where the cpu's are NaN)."""
    case = GpuCase(num_experts=num_experts, source="logits", tokens=8, seed=_seed("ties", name), **ROUTINGS[name])
    d = case.inputs()
    d["router_logits"] = _tied_and_nonfinite_logits(num_experts, case.seed)
    with case.layer("cpu") as cpu, case.layer(DEV) as gpu:
        cpu.load_weights(**case.weights(d, "numpy"))
        gpu.load_weights(**case.weights(d, "torch"))
        _, want_ids, want_w = cpu.forward(d["x"], router_logits=d["router_logits"], return_routing=True)
        _, ids, w = gpu.forward(T(d["x"]), router_logits=T(d["router_logits"]), return_routing=True)
    ids, w = N(ids), N(w)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-7, equal_nan=True)
    if not case.correction_bias:  # (a bias breaks the ties of equal logits)
        assert ids[0].tolist() == list(range(case.top_k))
    if case.n_group == 1:  # (grouped: tied groups keep the lowest, which need not hold all maxima)
        assert ids[1].tolist() == sorted([num_experts - 1, 3, num_experts // 2, 7, 1, num_experts - 2])[:case.top_k]


@pytest.mark.parametrize("name", ["grouped_bias", "given"])
def test_forward_inside_a_torch_cuda_graph(name):
    case = GpuCase(seed=_seed("graph", name), latent_size=32, num_shared_experts=1, **ROUTINGS[name])
    d = case.inputs()
    with case.layer(DEV) as gpu:
        gpu.load_weights(**case.weights(d, "torch"))
        static_x = T(d["x"])
        static_r = case.routing_args(d, T)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture, as torch recommends
            gpu.forward(static_x, **static_r, return_routing=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_out, g_ids, g_w = gpu.forward(static_x, **static_r, return_routing=True)
        for seed in (1, 2, 3):
            fresh = replace(case, seed=seed).inputs()
            static_x.copy_(T(fresh["x"]))
            for key, value in case.routing_args(fresh, T).items():
                static_r[key].copy_(value)
            graph.replay()
            e_out, e_ids, e_w = gpu.forward(static_x, **static_r, return_routing=True)
            torch.cuda.synchronize()
            assert same_bits(g_out, e_out) and same_bits(g_ids, e_ids) and same_bits(g_w, e_w)
        # The last replay against the cpu backend: the layer's weights, the last inputs.
        last = dict(d, **{key: fresh[key] for key in ("x", "router_logits", "topk_ids", "topk_weights")
                          if key in fresh})
        with case.layer("cpu") as cpu:
            cpu.load_weights(**case.weights(d, "numpy"))
            check_against_cpu(case, last, cpu, N(g_out), N(g_ids), N(g_w))


def test_qwen3_sized_layer():
    # Qwen3-30B-A3B's MoE layer (E=128, k=8, H=2048, I=768) at 64 tokens, weights borrowed.
    E, k, H, I, Tn = 128, 8, 2048, 768, 64
    gen = torch.Generator(device=DEV).manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device=DEV, generator=gen) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device=DEV, generator=gen) / I ** 0.5).to(torch.bfloat16)
    gate = torch.randn(E, H, device=DEV, generator=gen) / H ** 0.5
    x = torch.randn(Tn, H, device=DEV, generator=gen).to(torch.bfloat16)
    case = GpuCase(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I, tokens=Tn)
    d = {"x": N(x), "gate": N(gate)}
    with case.layer(DEV) as gpu:
        gpu.load_weights(w13, w2, gate=gate, borrow=True)
        out, ids, w = gpu.forward(x, return_routing=True)
        again = gpu.forward(x)
        torch.cuda.synchronize()
        assert same_bits(out, again)
        with case.layer("cpu") as cpu:
            cpu.load_weights(N(w13), N(w2), gate=d["gate"])
            check_against_cpu(case, d, cpu, N(out), N(ids), N(w))


@pytest.mark.parametrize("name", ["softmax", "grouped_bias", "given"])
def test_library_graphs_replay_bitwise_like_eager(name):
    # layer.capture_graphs(): buckets 1..64 and a custom one; every T from 1 to 70 (between
    # buckets, on a bucket, above the largest: eager) replays bitwise like force_eager, with
    # the routing record, for torch inputs and numpy round trips.
    case = GpuCase(seed=_seed("lib-graphs", name), max_tokens=96, latent_size=32, **ROUTINGS[name])
    with case.layer(DEV) as gpu:
        d0 = case.inputs()
        gpu.load_weights(**case.weights(d0, "torch"))
        gpu.capture_graphs([1, 2, 4, 8, 16, 32, 48, 64])
        for tokens in (1, 3, 8, 17, 33, 48, 63, 64, 70):
            d = replace(case, tokens=tokens, seed=tokens).inputs()
            x, r = T(d["x"]), case.routing_args(d, T)
            eager = gpu.forward(x, **r, return_routing=True, force_eager=True)
            replay = gpu.forward(x, **r, return_routing=True)
            torch.cuda.synchronize()
            assert all(same_bits(a, b) for a, b in zip(eager, replay)), f"T={tokens}"
        d = replace(case, tokens=5, seed=99).inputs()
        out_np = gpu.forward(d["x"], **case.routing_args(d, lambda a: a))
        out_t = gpu.forward(T(d["x"]), **case.routing_args(d, T), force_eager=True)
        assert np.array_equal(out_np.view(np.uint16), N(out_t).view(np.uint16))


@pytest.mark.parametrize("fmt", [None] + list(MODES))
def test_default_buckets_replay_bitwise_like_eager_at_prefill(fmt):
    # capture_graphs() with no list: SPEC §6's default buckets up to max_tokens = 2048. H = 1280
    # is two full 512-wide gate rounds and a partial one, E = 72 leaves the last expert tile
    # partial, so T = 1-64 (fused decode gate), 300 (split 16-token gate), 1100 and 2048 (tiled
    # gate split by rounds, 1100 replayed in the 2048 bucket) all run; each replay, with its
    # routing record, is bitwise the eager forward, and T = 300's output matches the cpu backend.
    case = GpuCase(num_experts=72, top_k=4, hidden_size=1280, intermediate_size=128, tokens=300,
                   max_tokens=2048, num_shared_experts=1, **(_mode(fmt) if fmt else {}),
                   seed=_seed("default-buckets", fmt))
    d0 = case.inputs()
    with case.layer(DEV) as gpu:
        gpu.load_weights(**case.weights(d0, "numpy"))
        gpu.capture_graphs()
        for tokens in (1, 40, 64, 65, 300, 1100, 2048):
            d = replace(case, tokens=tokens, seed=tokens).inputs()
            x = T(d["x"])
            eager = gpu.forward(x, return_routing=True, force_eager=True)
            replay = gpu.forward(x, return_routing=True)
            torch.cuda.synchronize()
            assert all(same_bits(a, b) for a, b in zip(eager, replay)), f"T={tokens}"
        with case.layer("cpu") as cpu:
            cpu.load_weights(**case.weights(d0, "numpy"))
            out, ids, w = (N(t) for t in gpu.forward(T(d0["x"]), return_routing=True))
            check_against_cpu(case, d0, cpu, out, ids, w)


def test_pre_dispatch_on_the_gpu_is_bitwise_the_cpu():
    rng = np.random.default_rng(_seed("pre-dispatch"))
    x = (rng.normal(0.0, 3.0, (37, 512)) * rng.choice([1e-30, 1.0, 1e20], (37, 512), p=[0.02, 0.96, 0.02]))
    x = x.astype(np.float32).astype(NP["bfloat16"])
    x[5, 40] = np.inf
    x[9, 300] = np.nan
    ids = rng.integers(0, 64, (37, 4)).astype(np.int32)
    wts = rng.uniform(0.0, 1.0, (37, 4)).astype(np.float32)
    host = fdmoe.pre_dispatch(x, ids, wts, 64)
    round_trip = fdmoe.pre_dispatch(x, ids, wts, 64, device="cuda")
    in_place = fdmoe.pre_dispatch(T(x), T(ids), T(wts), 64, device=DEV)
    torch.cuda.synchronize()
    for h, r, d in zip(host, round_trip, in_place):
        assert np.array_equal(h.view(np.uint8), r.view(np.uint8))
        assert np.array_equal(h.view(np.uint8), N(d).view(np.uint8))


# -- dependent launch ---------------------------------------------------------------------------

DEPENDENT_LAUNCH_CASES = {
    "softmax_latent_shared": dict(routing="softmax_topk", latent_size=32, num_shared_experts=1),
    "grouped_bias": ROUTINGS["grouped_bias"],
    "given": ROUTINGS["given"],
    "fp8_block": dict(weight_dtype="fp8_block", **QUANTIZED),
    "mxfp4": dict(weight_dtype="mxfp4", latent_size=128, **QUANTIZED),
}


def write_forwards(path: str):
    """Every DEPENDENT_LAUNCH_CASES case at T = 1, 5, 33 (decode and prefill kernels), eager
    and under the library's graphs, with its routing record, into an .npz at `path`."""
    results = {}
    for name, kw in DEPENDENT_LAUNCH_CASES.items():
        case = GpuCase(seed=_seed("pdl", name), max_tokens=64, **{"tokens": 33, **kw})
        with case.layer(DEV) as gpu:
            gpu.load_weights(**case.weights(case.inputs(), "numpy"))
            gpu.capture_graphs([1, 8, 64])
            for tokens in (1, 5, 33):
                d = replace(case, tokens=tokens, seed=tokens).inputs()
                x, r = T(d["x"]), case.routing_args(d, T)
                for mode in ("eager", "graph"):
                    res = gpu.forward(x, **r, return_routing=True, force_eager=mode == "eager")
                    for part, t in zip(("out", "ids", "weights"), res):
                        results[f"{name}/{tokens}/{mode}/{part}"] = N(t).view(np.uint8)
    np.savez(path, **results)


def test_dependent_launch_changes_no_bit(tmp_path):
    # Kernels are launched as programmatic dependents (sm_90+); GEMM 2 starts copying its
    # weights before its wait. With that off (FDMOE_NO_DEPENDENT_LAUNCH, read at create), every
    # output and routing record is bitwise the same. Two processes: the switch is read once.
    import os
    import subprocess
    import sys

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("dependent launch needs sm_90")
    here = os.path.dirname(os.path.abspath(__file__))
    files = {}
    for label, off in (("on", False), ("off", True)):
        env = {k: v for k, v in os.environ.items() if k != "FDMOE_NO_DEPENDENT_LAUNCH"}
        if off:
            env["FDMOE_NO_DEPENDENT_LAUNCH"] = "1"
        files[label] = str(tmp_path / f"{label}.npz")
        # The paths conftest.py gives pytest: the package from this tree, then the tests.
        paths = [os.path.dirname(here), here]
        code = (f"import sys; sys.path[:0] = {paths!r}; import test_cuda; "
                f"test_cuda.write_forwards({files[label]!r})")
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    on, off = np.load(files["on"]), np.load(files["off"])
    assert sorted(on.files) == sorted(off.files) and len(on.files) == 5 * 3 * 2 * 3
    for key in on.files:
        assert np.array_equal(on[key], off[key]), key
