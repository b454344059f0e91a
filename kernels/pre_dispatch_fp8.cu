// FP8 pre-dispatch (SPEC §5, the MegaMoE input format): x [T, H] (f32, bf16 or f16) becomes
// E4M3 [T_max, H] with one UE8M0 scale per 32 channels, four packed per int32 along H, and the
// top-k ids/weights are copied beside it; rows T..T_max are padding (zero data and scales, id
// -1, weight 0). Bitwise the same as src/quant/pre_dispatch.rs: per group amax = max |x| (NaN
// skipped, as fmaxf does), a group holding ±inf gets scale 0xFF and zero codes; otherwise
// exponent = ceil(log2(max(amax, 1e-4) / 448)) taken exactly from the f32 bits, codes =
// RNE-saturate(x * 2^-exponent) by the same bit-level E4M3 encoder as the CPU.
//
// One warp per 32-channel group (lane = channel), so the amax is one warp reduction and every
// load and store is coalesced. Grid: (T_max); block 128.
#include "common/fp8.cuh"

__device__ __forceinline__ float load_x(const void* x, i64 i, int dtype) {
    if (dtype == 0) return ((const float*)x)[i];
    const u16 v = ((const u16*)x)[i];
    if (dtype == 1) return __uint_as_float(((u32)v) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}

extern "C" __global__ void __launch_bounds__(128)
    pre_dispatch_fp8(const void* __restrict__ x, int x_dtype, const int* __restrict__ topk_ids,
                     const float* __restrict__ topk_weights, unsigned char* __restrict__ out_x,
                     int* __restrict__ out_scales, int* __restrict__ out_ids, float* __restrict__ out_weights,
                     int num_tokens, int hidden, int top_k) {
    begin_dependent();
    const int t = blockIdx.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int groups = hidden / 32;
    unsigned char* scale_bytes = (unsigned char*)out_scales + (i64)t * groups;
    for (int g = warp; g < groups; g += 4) {
        const i64 i = (i64)t * hidden + g * 32 + lane;
        u32 code = 0;
        u32 scale = 0;
        if (t < num_tokens) {
            int e;
            bool inf_group;
            code = pre_dispatch_code(load_x(x, i, x_dtype), e, inf_group);
            scale = inf_group ? 0xFFu : (u32)(e + 127);
        }
        out_x[i] = (unsigned char)code;
        if (lane == 0) scale_bytes[g] = (unsigned char)scale;
    }
    for (int j = threadIdx.x; j < top_k; j += blockDim.x) {
        const i64 s = (i64)t * top_k + j;
        out_ids[s] = t < num_tokens ? topk_ids[s] : -1;
        out_weights[s] = t < num_tokens ? topk_weights[s] : 0.0f;
    }
}
