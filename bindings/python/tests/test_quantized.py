"""Quantized formats through the binding: the codecs against numpy + ml_dtypes references
(float8_e4m3fn, float4_e2m1fn), quantize-on-load against pre-quantized loads and a float64
reference, the FP8 pre-dispatch, errors, and the accuracy of each format against the float32
layer (printed, not asserted)."""

import ctypes
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import fdmoe
from fdmoe import quant
import reference

FORMATS = ("fp8_block", "mxfp4", "nvfp4")
E4M3 = ml_dtypes.float8_e4m3fn
E2M1 = ml_dtypes.float4_e2m1fn
HEADER = Path(os.environ.get("FDMOE_HEADER", Path(__file__).resolve().parents[3] / "include" / "fdmoe.h"))


# ---------------------------------------------------------------------------------------------
# Codec references written with numpy + ml_dtypes.


def e4m3_codes(values):
    """E4M3 codes of float32 values already within +-448 (ml_dtypes rounds to nearest even)."""
    return np.asarray(values, np.float32).astype(E4M3).view(np.uint8)


def e2m1_codes(values):
    """E2M1 codes (0..15) of float32 values, saturating to +-6 and rounding to nearest even."""
    clipped = np.clip(np.asarray(values, np.float32), -6.0, 6.0)
    return clipped.astype(E2M1).view(np.uint8) & 0xF


def pack_nibbles(codes):
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(data):
    out = np.empty(data.shape[:-1] + (2 * data.shape[-1],), np.uint8)
    out[..., 0::2], out[..., 1::2] = data & 0xF, data >> 4
    return out


def e2m1_values(codes):
    return codes.astype(np.uint8).view(E2M1).astype(np.float32)


def ref_fp8_block(w):
    """DeepGEMM per_block_cast_to_fp8: amax per 128x128 block floored at 1e-4."""
    n, k = w.shape
    data = np.empty((n, k), np.uint8)
    scales = np.empty((-(-n // 128), -(-k // 128)), np.float32)
    for bi in range(scales.shape[0]):
        for bj in range(scales.shape[1]):
            blk = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            amax = max(np.float32(np.abs(blk).max()), np.float32(1e-4))
            mul = np.float32(448.0) / amax
            data[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128] = e4m3_codes(blk * mul)
            scales[bi, bj] = amax / np.float32(448.0)
    return data, scales


def ref_mxfp4(w):
    """OCP MX: shared exponent floor(log2 amax) - 2 per 32, elements E2M1(x / 2^e)."""
    n, k = w.shape
    g = w.reshape(n, k // 32, 32)
    amax = np.abs(g).max(axis=-1)
    _, e = np.frexp(amax)  # amax = m * 2^e, m in [0.5, 1): floor(log2) = e - 1
    exp = np.where(amax == 0, -127, e - 1 - 2)
    scaled = g * np.ldexp(np.float32(1.0), -exp)[..., None].astype(np.float32)
    codes = e2m1_codes(scaled).reshape(n, k)
    return pack_nibbles(codes), (exp + 127).astype(np.uint8)


def ref_nvfp4(w):
    """ModelOpt: global = amax / (6 * 448); block scale E4M3(amax_b / (6 * global)) per 16."""
    n, k = w.shape
    glob = np.float32(np.abs(w).max()) / np.float32(6.0 * 448.0)
    g = w.reshape(n, k // 16, 16)
    s = np.abs(g).max(axis=-1) / (np.float32(6.0) * glob)
    s = np.where(s == 0, np.float32(1.0), s)
    s_codes = e4m3_codes(np.clip(s, 2.0**-9, 448.0))
    denom = s_codes.view(E4M3).astype(np.float32) * glob
    codes = e2m1_codes(g / denom[..., None]).reshape(n, k)
    return pack_nibbles(codes), s_codes, glob


@pytest.mark.parametrize("fmt", FORMATS)
def test_codecs_match_numpy_ml_dtypes_references(fmt):
    rng = np.random.default_rng(3)
    w = (rng.normal(size=(2, 256, 384)) * rng.choice([1e-3, 1.0, 50.0], size=(2, 256, 1))).astype(np.float32)
    q = fdmoe.quantize(w, fmt)
    assert q.format == fmt and q.shape == w.shape
    back = fdmoe.dequantize(q)
    for m in range(2):
        if fmt == "fp8_block":
            data, scales = ref_fp8_block(w[m])
            np.testing.assert_array_equal(q.data[m], data)
            np.testing.assert_array_equal(q.scales[m], scales)
            want = data.view(E4M3).astype(np.float32) * np.repeat(np.repeat(scales, 128, 0), 128, 1)[:256, :384]
        elif fmt == "mxfp4":
            data, scales = ref_mxfp4(w[m])
            np.testing.assert_array_equal(q.data[m], data)
            np.testing.assert_array_equal(q.scales[m], scales)
            s = scales.astype(np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
            want = e2m1_values(unpack_nibbles(data)) * np.repeat(s, 32, axis=1)
        else:
            data, scales, glob = ref_nvfp4(w[m])
            np.testing.assert_array_equal(q.data[m], data)
            np.testing.assert_array_equal(q.scales[m], scales)
            assert q.global_scale[m] == glob
            s = scales.view(E4M3).astype(np.float32) * glob
            want = e2m1_values(unpack_nibbles(data)) * np.repeat(s, 16, axis=1)
        np.testing.assert_array_equal(back[m], want)
    # Parts given separately decode the same; bfloat16 input quantizes its exact values.
    again = fdmoe.dequantize(q.data, q.scales, fmt, q.global_scale)
    np.testing.assert_array_equal(again, back)
    wb = w.astype(ml_dtypes.bfloat16)
    qb, qf = fdmoe.quantize(wb, fmt), fdmoe.quantize(wb.astype(np.float32), fmt)
    np.testing.assert_array_equal(qb.data, qf.data)
    np.testing.assert_array_equal(qb.scales, qf.scales)


def test_codec_errors():
    w = np.ones((4, 40), np.float32)
    with pytest.raises(fdmoe.InvalidArgumentError, match="multiple of 16"):
        fdmoe.quantize(w, "nvfp4")
    with pytest.raises(fdmoe.InvalidArgumentError, match="format"):
        fdmoe.quantize(w, "int4")
    with pytest.raises(fdmoe.InvalidArgumentError, match="dimensions"):
        fdmoe.quantize(np.ones(32, np.float32), "mxfp4")
    q = fdmoe.quantize(np.ones((4, 64), np.float32), "mxfp4")
    with pytest.raises(fdmoe.InvalidArgumentError, match="scales has shape"):
        fdmoe.dequantize(q.data, q.scales[:, :1], "mxfp4")
    with pytest.raises(fdmoe.NullArgumentError, match="global_scale"):
        fdmoe.dequantize(q.data, np.ones((4, 4), np.uint8), "nvfp4")
    # Empty batches are fine.
    e = fdmoe.quantize(np.zeros((0, 8, 32), np.float32), "mxfp4")
    assert e.data.shape == (0, 8, 16) and fdmoe.dequantize(e).shape == (0, 8, 32)


# ---------------------------------------------------------------------------------------------
# The layer.

E, K, H, I, T = 6, 2, 256, 128, 9


def experts(seed=0, latent=None):
    rng = np.random.default_rng(seed)
    L = latent or H
    return (
        (rng.normal(size=(E, 2 * I, L)) / np.sqrt(L)).astype(np.float32),
        (rng.normal(size=(E, L, I)) / np.sqrt(I)).astype(np.float32),
    )


def routing(seed=1):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(E, size=K, replace=False) for _ in range(T)]).astype(np.int32)
    wts = rng.uniform(0.2, 1.0, size=(T, K)).astype(np.float32)
    x = rng.normal(size=(T, H)).astype(np.float32)
    return x, ids, wts


def layer(fmt, **kw):
    return fdmoe.MoELayer(E, K, H, I, routing="given", act_dtype="float32", weight_dtype=fmt,
                          max_tokens=16, num_threads=2, **kw)


def fp8_round_trip(a):
    """Per-row FP8 activation quantization (128-channel groups), written here."""
    a = np.asarray(a, np.float32)
    g = a.reshape(a.shape[:-1] + (a.shape[-1] // 128, 128))
    amax = np.maximum(np.abs(g).max(axis=-1, keepdims=True), np.float32(1e-4))
    q = e4m3_codes(g * (np.float32(448.0) / amax)).view(E4M3).astype(np.float32)
    return (q * (amax / np.float32(448.0))).reshape(a.shape)


def fp8_reference(x, ids, wts, w13, w2):
    """The FP8_BLOCK layer in float64 on dequantized weights, GEMM inputs rounded through FP8."""
    u = fp8_round_trip(x).astype(np.float64)
    h = np.einsum("tkol,tl->tko", w13[ids].astype(np.float64), u)
    a = reference.activate("swiglu", h[..., :I], h[..., I:])
    a = fp8_round_trip(a.astype(np.float32)).astype(np.float64)
    y = np.einsum("tkli,tki->tkl", w2[ids].astype(np.float64), a)
    return np.einsum("tk,tkl->tl", wts.astype(np.float64), y)


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_quantize_on_load_equals_pre_quantized_and_the_reference(fmt, capsys):
    w13, w2 = experts()
    x, ids, wts = routing()
    with layer(fmt) as a, layer(fmt) as b, layer("float32") as dense:
        a.load_weights(w13, w2)
        q13, q2 = fdmoe.quantize(w13, fmt), fdmoe.quantize(w2, fmt)
        b.load_quantized_weights(q13, q2)
        dense.load_weights(w13, w2)
        out_a = a.forward(x, topk_ids=ids, topk_weights=wts)
        out_b = b.forward(x, topk_ids=ids, topk_weights=wts)
        out_dense = dense.forward(x, topk_ids=ids, topk_weights=wts)
    np.testing.assert_array_equal(out_a, out_b)
    d13, d2 = fdmoe.dequantize(q13), fdmoe.dequantize(q2)
    if fmt == "fp8_block":
        want = fp8_reference(x, ids, wts, d13, d2)
        tol = 1e-4
    else:
        want = reference.moe(x, ids, wts, d13.astype(np.float64), d2.astype(np.float64))
        tol = 1e-5
    err = reference.rel_l2(out_a, want)
    assert err <= tol, f"{fmt}: {err:.3e}"
    with capsys.disabled():
        print(f"\n[accuracy] {fmt}: rel. L2 error vs the float32 layer "
              f"{reference.rel_l2(out_a, out_dense):.3e} (E={E}, k={K}, H={H}, I={I}, T={T}); "
              f"vs the reference on its own weights {err:.1e}")


def mx_round_trip(a):
    """act_quant="fp8_mx": SPEC §5's pre-dispatch rule (E4M3 per 32 channels, power-of-two
    scales), back to float32; written here with numpy and ml_dtypes."""
    a = np.asarray(a, np.float32)
    g = a.reshape(a.shape[:-1] + (a.shape[-1] // 32, 32))
    amax = np.maximum(np.abs(g).max(axis=-1, keepdims=True), np.float32(1e-4))
    m, e = np.frexp(amax / np.float32(448.0))
    scale = np.ldexp(np.float32(1.0), np.where(m == 0.5, e - 1, e)).astype(np.float32)
    q = e4m3_codes(g / scale).view(E4M3).astype(np.float32)
    return (q * scale).reshape(a.shape)


def test_mxfp4_with_fp8_mx_activations_matches_the_reference(capsys):
    w13, w2 = experts(seed=3)
    x, ids, wts = routing(seed=4)
    with layer("mxfp4", act_quant="fp8_mx") as lay, layer("mxfp4") as w4a16:
        assert lay.act_quant == "fp8_mx"
        lay.load_weights(w13, w2)
        w4a16.load_weights(w13, w2)
        out = lay.forward(x, topk_ids=ids, topk_weights=wts)
        out16 = w4a16.forward(x, topk_ids=ids, topk_weights=wts)
    d13 = fdmoe.dequantize(fdmoe.quantize(w13, "mxfp4")).astype(np.float64)
    d2 = fdmoe.dequantize(fdmoe.quantize(w2, "mxfp4")).astype(np.float64)
    u = mx_round_trip(x).astype(np.float64)
    h = np.einsum("tkol,tl->tko", d13[ids], u)
    a = reference.activate("swiglu", h[..., :I], h[..., I:])
    a = mx_round_trip(a.astype(np.float32)).astype(np.float64)
    want = np.einsum("tk,tkl->tl", wts.astype(np.float64), np.einsum("tkli,tki->tkl", d2[ids], a))
    err = reference.rel_l2(out, want)
    assert err <= 1e-5, f"{err:.3e}"
    # The activation rounding is real: W4A16 on the same weights is ~1e-2 away.
    assert reference.rel_l2(out, out16) > 100 * err
    with capsys.disabled():
        print(f"\n[accuracy] mxfp4 act_quant=fp8_mx: vs the reference {err:.1e}, "
              f"vs W4A16 {reference.rel_l2(out, out16):.2e}")


def test_act_quant_errors():
    with pytest.raises(fdmoe.InvalidArgumentError, match="act_quant"):
        layer("mxfp4", act_quant="int8")
    for fmt in ("float32", "fp8_block", "nvfp4"):
        with pytest.raises(fdmoe.UnsupportedError, match=f"act_quant = fp8_mx needs config.weight_dtype = mxfp4 \\(it is {fmt}\\)"):
            layer(fmt, act_quant="fp8_mx")
    assert "act_quant_fp8_mx" in fdmoe.query_features("cpu")


def test_pre_quantized_parts_interleaved_latent_and_shared():
    # MXFP4 as gpt-oss stores it: gate and up rows interleaved; a latent layer with shared
    # experts (dense, float32) and a gate.
    rng = np.random.default_rng(7)
    L, S = 128, 64
    w13, w2 = experts(seed=5, latent=L)
    fc1 = (rng.normal(size=(L, H)) / np.sqrt(H)).astype(np.float32)
    fc2 = (rng.normal(size=(H, L)) / np.sqrt(L)).astype(np.float32)
    sh13 = (rng.normal(size=(2 * S, H)) / np.sqrt(H)).astype(np.float32)
    sh2 = (rng.normal(size=(H, S)) / np.sqrt(S)).astype(np.float32)
    inter = np.empty_like(w13)
    inter[:, 0::2], inter[:, 1::2] = w13[:, :I], w13[:, I:]
    x, ids, wts = routing()
    kw = dict(latent_size=L, num_shared_experts=1, shared_intermediate_size=S)
    with layer("mxfp4", **kw) as a, layer("mxfp4", **kw) as b:
        a.load_weights(inter, w2, fc1=fc1, fc2=fc2, shared_w13=sh13, shared_w2=sh2,
                       gate_up_interleaved=True)
        q13, q2 = fdmoe.quantize(inter, "mxfp4"), fdmoe.quantize(w2, "mxfp4")
        # Scales as ml_dtypes float8_e8m0fnu (how a checkpoint reader may hand them over).
        b.load_quantized_weights(q13.data, q2.data, q13.scales.view(ml_dtypes.float8_e8m0fnu),
                                 q2.scales, fc1=fc1, fc2=fc2, shared_w13=sh13, shared_w2=sh2,
                                 gate_up_interleaved=True)
        out_a = a.forward(x, topk_ids=ids, topk_weights=wts)
        out_b = b.forward(x, topk_ids=ids, topk_weights=wts)
    np.testing.assert_array_equal(out_a, out_b)
    d13 = fdmoe.dequantize(q13)
    plain = np.concatenate([d13[:, 0::2], d13[:, 1::2]], axis=1)
    want = reference.moe(x, ids, wts, plain.astype(np.float64), fdmoe.dequantize(q2).astype(np.float64),
                         fc1=fc1.astype(np.float64), fc2=fc2.astype(np.float64),
                         shared_w13=sh13.astype(np.float64), shared_w2=sh2.astype(np.float64))
    assert reference.rel_l2(out_a, want) <= 1e-5


def test_nvfp4_deepseek_style_bf16_checkpoint_parts():
    # Pre-quantized NVFP4 with float8_e4m3fn-typed block scales and the gate in bfloat16.
    w13, w2 = experts(seed=11)
    x, ids, wts = routing(3)
    q13, q2 = fdmoe.quantize(w13, "nvfp4"), fdmoe.quantize(w2, "nvfp4")
    with layer("nvfp4") as a:
        a.load_quantized_weights(q13.data, q2.data, q13.scales.view(E4M3), q2.scales.view(E4M3),
                                 w13_global_scale=q13.global_scale, w2_global_scale=q2.global_scale)
        out = a.forward(x, topk_ids=ids, topk_weights=wts)
    want = reference.moe(x, ids, wts, fdmoe.dequantize(q13).astype(np.float64),
                         fdmoe.dequantize(q2).astype(np.float64))
    assert reference.rel_l2(out, want) <= 1e-5


def test_load_quantized_weights_errors():
    w13, w2 = experts()
    q13, q2 = fdmoe.quantize(w13, "fp8_block"), fdmoe.quantize(w2, "fp8_block")
    with layer("fp8_block") as a:
        with pytest.raises(fdmoe.InvalidArgumentError, match=r"w13_scale has shape \[6, 1, 2\]"):
            a.load_quantized_weights(q13.data, q2.data, q13.scales[:, :1], q2.scales)
        with pytest.raises(fdmoe.InvalidArgumentError, match=r"w2 has shape"):
            a.load_quantized_weights(q13.data, q2.data[:, :, :64], q13.scales, q2.scales)
        with pytest.raises(fdmoe.NullArgumentError, match="w2_scale"):
            a.load_quantized_weights(q13.data, q2.data, q13.scales)
        with pytest.raises(fdmoe.InvalidArgumentError, match="'mxfp4'"):
            a.load_quantized_weights(fdmoe.quantize(w13, "mxfp4"), q2)
        # The library checks the values: a NaN scale is named with its expert and block.
        bad = q2.scales.copy()
        bad[4, 0, 0] = np.nan
        with pytest.raises(fdmoe.InvalidArgumentError, match=r"w2_scale\[expert 4\]\[0, 0\]"):
            a.load_quantized_weights(q13.data, q2.data, q13.scales, bad)
        # Asking for another format than the layer's: the library names both.
        n13, n2 = fdmoe.quantize(w13, "nvfp4"), fdmoe.quantize(w2, "nvfp4")
        with pytest.raises(fdmoe.InvalidArgumentError, match="config.weight_dtype = fp8_block"):
            a.load_quantized_weights(n13, n2, format="nvfp4")
        a.load_quantized_weights(q13, q2)  # still usable after the failures
    with layer("float32") as d:
        with pytest.raises(fdmoe.InvalidArgumentError, match="weight_dtype"):
            d.load_quantized_weights(q13, q2)
    # Shapes the format cannot take are refused at create, naming the dimension.
    with pytest.raises(fdmoe.InvalidArgumentError, match=r"intermediate_size = 96 \(K of w2\)"):
        fdmoe.MoELayer(E, K, H, 96, weight_dtype="fp8_block")
    with pytest.raises(fdmoe.InvalidArgumentError, match=r"hidden_size = 24 \(K of w13\)"):
        fdmoe.MoELayer(E, K, 24, 32, weight_dtype="nvfp4")


def test_features():
    cpu = fdmoe.query_features("cpu")
    for name in ("weight_fp8_block", "weight_mxfp4", "weight_nvfp4", "fp8_pre_dispatch"):
        assert name in cpu


def test_accuracy_report(capsys):
    """Each format against the float32 layer on SPEC §8 inputs (reported, not asserted)."""
    rng = np.random.default_rng(2024)
    e, k, h, i, t = 16, 4, 512, 256, 64
    w13 = (rng.normal(size=(e, 2 * i, h)) / np.sqrt(h)).astype(np.float32)
    w2 = (rng.normal(size=(e, h, i)) / np.sqrt(i)).astype(np.float32)
    gate = (rng.normal(size=(e, h)) / np.sqrt(h)).astype(np.float32)
    x = rng.normal(size=(t, h)).astype(np.float32)
    outs = {}
    for wd in ("float32", "bfloat16") + FORMATS:
        with fdmoe.MoELayer(e, k, h, i, act_dtype="float32", weight_dtype=wd, max_tokens=t,
                            num_threads=2) as lay:
            lay.load_weights(w13, w2, gate=gate)
            outs[wd] = lay.forward(x)
    with capsys.disabled():
        print(f"\n[accuracy] rel. L2 error vs the float32 layer (E={e}, k={k}, H={h}, I={i}, T={t}, "
              "softmax top-k):")
        for wd in ("bfloat16",) + FORMATS:
            print(f"[accuracy]   {wd:9s} {reference.rel_l2(outs[wd], outs['float32']):.3e}")


# ---------------------------------------------------------------------------------------------
# Pre-dispatch.


def ref_pre_dispatch(x, ids, wts, t_max):
    x = np.asarray(x, np.float32)
    T, Hx = x.shape
    g = x.reshape(T, Hx // 32, 32)
    amax = np.maximum(np.abs(g).max(axis=-1), np.float32(1e-4))
    m, e = np.frexp(amax / np.float32(448.0))
    exp = np.where(m == 0.5, e - 1, e)  # ceil(log2) exactly
    data = np.zeros((t_max, Hx), np.uint8)
    data[:T] = e4m3_codes(g * np.ldexp(np.float32(1.0), -exp)[..., None].astype(np.float32)).reshape(T, Hx)
    scales = np.zeros((t_max, Hx // 32), np.uint8)
    scales[:T] = (exp + 127).astype(np.uint8)
    packed = scales.reshape(t_max, Hx // 128, 4).copy().view("<i4")[..., 0]
    out_ids = np.full((t_max, ids.shape[1]), -1, np.int32)
    out_ids[:T] = ids
    out_w = np.zeros((t_max, ids.shape[1]), np.float32)
    out_w[:T] = wts
    return data, packed, out_ids, out_w


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32])
def test_pre_dispatch_matches_the_reference(dtype):
    rng = np.random.default_rng(5)
    T, Hx, k, t_max = 7, 384, 4, 10
    x = (rng.normal(size=(T, Hx)) * rng.choice([1e-4, 1.0, 1e3], size=(T, Hx // 32)).repeat(32, 1)).astype(dtype)
    ids = rng.integers(0, 64, size=(T, k)).astype(np.int32)
    wts = rng.uniform(size=(T, k)).astype(np.float32)
    got = fdmoe.pre_dispatch(x, ids, wts, t_max)
    want = ref_pre_dispatch(x, ids, wts, t_max)
    assert [a.dtype for a in got] == [np.uint8, np.int32, np.int32, np.float32]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_pre_dispatch_errors():
    x = np.zeros((5, 256), ml_dtypes.bfloat16)
    ids, wts = np.zeros((5, 2), np.int32), np.zeros((5, 2), np.float32)
    with pytest.raises(fdmoe.CapacityExceededError, match="max_tokens = 4"):
        fdmoe.pre_dispatch(x, ids, wts, 4)
    with pytest.raises(fdmoe.InvalidArgumentError, match="hidden_size = 96"):
        fdmoe.pre_dispatch(np.zeros((5, 96), np.float32), ids, wts, 8)
    with pytest.raises(fdmoe.InvalidArgumentError, match="topk_weights has shape"):
        fdmoe.pre_dispatch(x, ids, wts[:, :1], 8)
    with pytest.raises(fdmoe.InvalidArgumentError, match="device"):
        fdmoe.pre_dispatch(x, ids, wts, 8, device="tpu")
    empty = fdmoe.pre_dispatch(np.zeros((0, 256), np.float32), np.zeros((0, 2), np.int32),
                               np.zeros((0, 2), np.float32), 3)
    assert (empty[2] == -1).all() and (empty[3] == 0).all() and (empty[0] == 0).all()


# ---------------------------------------------------------------------------------------------
# ABI of the new structs.


@pytest.mark.skipif(not HEADER.is_file(), reason="no header")
def test_new_struct_layouts_match_the_c_compiler(tmp_path):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    structs = {"FdmoeQuantizedTensor": quant.FdmoeQuantizedTensor,
               "FdmoePreDispatchArgs": quant.FdmoePreDispatchArgs}
    lines = []
    for name, cls in structs.items():
        lines.append(f'printf("{name} %zu\\n", sizeof({name}));')
        for field, _ in cls._fields_:
            lines.append(f'printf("{name}.{field} %zu\\n", offsetof({name}, {field}));')
    src = tmp_path / "layout.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include \"fdmoe.h\"\nint main(void) {\n"
                   + textwrap.indent("\n".join(lines), "    ") + "\n    return 0;\n}\n")
    exe = tmp_path / "layout"
    subprocess.run([cc, "-std=c11", "-I", str(HEADER.parent), str(src), "-o", str(exe)], check=True)
    got = dict(line.split() for line in subprocess.run([str(exe)], check=True, capture_output=True,
                                                       text=True).stdout.splitlines())
    for name, cls in structs.items():
        assert int(got[name]) == ctypes.sizeof(cls), name
        for field, _ in cls._fields_:
            assert int(got[f"{name}.{field}"]) == getattr(cls, field).offset, f"{name}.{field}"
        init = {"FdmoeQuantizedTensor": "fdmoe_quantized_tensor_init",
                "FdmoePreDispatchArgs": "fdmoe_pre_dispatch_args_init"}[name]
        assert fdmoe._lib.init_struct_raw_size(cls, init) == ctypes.sizeof(cls)
