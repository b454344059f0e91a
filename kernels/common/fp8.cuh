// E4M3 (OCP e4m3fn) conversions, bit for bit those of src/quant/e4m3.rs.
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

// Exact E4M3 value of a code (0x7F / 0xFF are NaN).
__device__ __forceinline__ float decode_e4m3(u32 code) {
    const u32 exponent = (code >> 3) & 0xFu, mantissa = code & 0x7u;
    float v;
    if ((code & 0x7Fu) == 0x7Fu) {
        v = __uint_as_float(0x7FC00000u);
    } else if (exponent == 0) {
        v = (float)mantissa * 0.001953125f;  // 2^-9
    } else {
        v = __uint_as_float(((exponent + 120u) << 23) | (mantissa << 20));
    }
    return (code & 0x80u) ? -v : v;
}
