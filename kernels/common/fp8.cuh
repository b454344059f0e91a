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
