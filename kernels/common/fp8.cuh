// E4M3 (OCP e4m3fn) encoding, bit for bit that of src/quant/e4m3.rs.
#pragma once
#include "common/types.cuh"

// E4M3 (OCP e4m3fn) round to nearest even, saturating to ±448, NaN -> 0x7F.
__device__ __forceinline__ u32 encode_e4m3(float x) {
    const u32 bits = __float_as_uint(x);
    const u32 sign = (bits >> 24) & 0x80u;
    const u32 magnitude = bits & 0x7FFFFFFFu;
    if (magnitude > 0x7F800000u) return 0x7Fu;
    if (magnitude >= 0x43E00000u) return sign | 0x7Eu;  // >= 448
    if (magnitude < 0x3C800000u) {                       // < 2^-6: subnormal codes
        const float steps = rintf(__uint_as_float(magnitude) * 512.0f);
        return sign | (u32)steps;
    }
    const u32 rounded = magnitude + 0x7FFFFu + ((magnitude >> 20) & 1u);
    const u32 exponent = (rounded >> 23) - 120u;
    const u32 mantissa = (rounded >> 20) & 0x7u;
    return sign | (exponent << 3) | mantissa;
}

// The value of an E4M3 code (NaN for ±0x7F).
__device__ __forceinline__ float decode_e4m3(u32 code) {
    if ((code & 0x7Fu) == 0x7Fu) return __uint_as_float(0x7FC00000u);
    const u32 e = (code >> 3) & 0xFu, m = code & 0x7u;
    const float magnitude = e ? __uint_as_float(((e + 120u) << 23) | (m << 20)) : (float)m * (1.0f / 512.0f);
    return __uint_as_float(__float_as_uint(magnitude) | ((code & 0x80u) << 24));
}

// ceil(log2(v)) of a positive normal f32, exactly from its bits.
__device__ __forceinline__ int ceil_log2_normal(float v) {
    const u32 bits = __float_as_uint(v);
    const int floor = (int)((bits >> 23) & 0xFFu) - 127;
    return floor + ((bits & 0x7FFFFFu) != 0u);
}

// The FP8 pre-dispatch rule (SPEC §5), bit for bit that of src/quant/pre_dispatch.rs, for one
// 32-channel group held one channel a lane by a whole warp: the group amax = max |x| (NaN
// skipped, as fmaxf does) is one warp reduction. Returns the lane's E4M3 code and sets
// `exponent` to the scale's, ceil(log2(max(amax, 1e-4) / 448)); a group holding ±inf returns
// code 0 with `inf_group` set (its scale is the UE8M0 NaN).
__device__ __forceinline__ u32 pre_dispatch_code(float v, int& exponent, bool& inf_group) {
    float amax = fabsf(v);
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    inf_group = isinf(amax);
    if (inf_group) {
        exponent = 0;
        return 0;
    }
    exponent = ceil_log2_normal(fmaxf(amax, 1.0e-4f) / 448.0f);
    return encode_e4m3(v * __uint_as_float((u32)(127 - exponent) << 23));
}
