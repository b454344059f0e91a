// Combine: out[t, :] = sum_j y[position(t, j), :] (+ residual[t, :]), in f32, in slot order j,
// rounded once to the output type. y already carries the router weights (GEMM 2 epilogue).
// Slots with position -1 (ids dropped by the sort) add nothing. Each thread moves 8 columns
// with 16-byte loads; N must be a multiple of 8.
//
// Grid: (max_tokens, ceil(N / (8 * 128))); block 128; blocks past the true T exit.
#include "common/types.cuh"

#define COMBINE_BATCH 8

struct alignas(16) Vec8 {
    u32 w[4];
};

__device__ __forceinline__ void add8(float* acc, const Vec8& v) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        acc[2 * i] += elem_to_float((u16)(v.w[i] & 0xffffu));
        acc[2 * i + 1] += elem_to_float((u16)(v.w[i] >> 16));
    }
}

extern "C" __global__ void __launch_bounds__(128)
    combine_slots(const u16* __restrict__ y, const int* __restrict__ slot_positions, const float* __restrict__ residual,
                  u16* __restrict__ out, const int* num_tokens_dev, int num_tokens, int top_k, int n,
                  const u64* args_block, int out_arg) {
    // The argument block, the true T and the sort's slot positions were written two or more
    // kernels back (the sort, then GEMM 1 and GEMM 2 at least), so complete before the
    // previous kernel passed its own wait and let this one launch: they are read before this
    // kernel's wait, which then leaves only the rows of y (and the residual) on its chain.
    if (args_block && out_arg >= 0) out = (u16*)args_block[out_arg];
    const int T = token_count(num_tokens_dev, num_tokens);
    const int t = blockIdx.x;
    const int col = (blockIdx.y * 128 + threadIdx.x) * 8;
    if (t >= T || col >= n) return;
    int first[COMBINE_BATCH];
#pragma unroll
    for (int j = 0; j < COMBINE_BATCH; ++j) first[j] = j < top_k ? slot_positions[(i64)t * top_k + j] : -1;
    begin_dependent();
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    // Up to 8 slots at a time: their positions, then their rows, all in flight before the
    // sums (which stay in slot order); one slot at a time was two dependent loads per slot.
    for (int j0 = 0; j0 < top_k; j0 += COMBINE_BATCH) {
        int pos[COMBINE_BATCH];
#pragma unroll
        for (int j = 0; j < COMBINE_BATCH; ++j)
            pos[j] = j0 == 0 ? first[j] : j0 + j < top_k ? slot_positions[(i64)t * top_k + j0 + j] : -1;
        Vec8 rows[COMBINE_BATCH];
#pragma unroll
        for (int j = 0; j < COMBINE_BATCH; ++j)
            if (pos[j] >= 0) rows[j] = *(const Vec8*)(y + (i64)pos[j] * n + col);
#pragma unroll
        for (int j = 0; j < COMBINE_BATCH; ++j)
            if (pos[j] >= 0) add8(acc, rows[j]);
    }
    if (residual) {
        const float* res = residual + (i64)t * n + col;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += res[i];
    }
    Vec8 o;
#pragma unroll
    for (int i = 0; i < 4; ++i) o.w[i] = pack_elem2(acc[2 * i], acc[2 * i + 1]);
    *(Vec8*)(out + (i64)t * n + col) = o;
}
