// The activation quantizers' warp-level groups, shared by the row kernels of
// grouped_gemm_quant.cu and the wgmma tiles' fused GEMM 1 epilogue (wgmma_epilogue.cuh), and the
// L2-only loads with which that epilogue reads what other blocks of the launch stored.
#pragma once
#include "common/fp8.cuh"

// One FP8_BLOCK activation group: a warp's 128 channels of a row (4 a lane, `v`) as E4M3
// (the lane's 4 bytes at `out4`) and the group's f32 scale, exactly as src/quant/fp8_act.rs:
// amax over the finite values (at least 1e-4), codes = RNE-saturate(x * (448 / amax)),
// scale = amax / 448.
__device__ __forceinline__ void quantize_fp8_block_group(const float (&v)[4], unsigned char* out4, float* scale, int lane) {
    float amax = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q)
        if (isfinite(v[q])) amax = fmaxf(amax, fabsf(v[q]));
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    amax = fmaxf(amax, 1.0e-4f);
    const float multiplier = 448.0f / amax;
    u32 codes = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) codes |= encode_e4m3(v[q] * multiplier) << (8 * q);
    *(u32*)out4 = codes;
    if (lane == 0) *scale = amax / 448.0f;
}

// One FP8_MX activation group: a warp's 32 channels (one a lane) by the pre-dispatch rule, the
// scale stored as the f32 2^(exponent + 6) (the 2^-6 of the W4A8 weights' decode undone; NaN
// for a group holding ±inf).
__device__ __forceinline__ void quantize_mx_group(float v, unsigned char* out, float* scale, int lane) {
    int e;
    bool inf_group;
    *out = (unsigned char)pre_dispatch_code(v, e, inf_group);
    if (lane == 0) *scale = inf_group ? __uint_as_float(0x7FC00000u) : __uint_as_float((u32)(e + 127 + 6) << 23);
}

// Loads through L2 only: values other blocks stored in this launch, after the acquire that
// made them visible (L1 is not coherent).
__device__ __forceinline__ float load_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ float4 load_cg4(const float* p) {
    float4 v;
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
    return v;
}
