// Router logits: logits[t][e] = sum_k x[t][k] * gate_t[k][e], in f32.
//
// The gate runs on the full hidden x (before any latent projection) with the f32 gate weight
// stored transposed, [H, E], so the 32 lanes of a warp (32 consecutive experts) read one
// 128-byte line of it per k while the x values they multiply are shared-memory broadcasts;
// each gate value loaded feeds TOKENS FMAs. H is cut in rounds of 8 * 64; warp w of the block
// sums the w-th 64-wide chunk of every round, and the 8 warp partials are added in warp order
// at the end. The order of every sum is therefore fixed by H alone: a token's logits are
// bitwise the same whatever batch, bucket or grid it is computed in, and no atomics are used.
// For decode (TOKENS = 4) a warp's 64 gate values of a round are loaded into registers
// together, and the next round's while this one is summed: the grid is then a handful of
// blocks, so the gate read is bound by load latency, not bandwidth, and 64 loads in flight per
// warp instead of a few cut it by an order of magnitude. Prefill (TOKENS = 16) is bound by the
// FMAs and keeps the registers for occupancy. The FMA order is the same either way.
//
// Grid: (ceil(T / TOKENS), ceil(E / 32)); block 256 (8 warps).
#include "common/types.cuh"

#define GATE_WARPS 8
#define GATE_CHUNK 64
#define GATE_ROUND (GATE_WARPS * GATE_CHUNK)

template <int TOKENS>
__device__ void gate_logits_impl(const u16* __restrict__ x, const float* __restrict__ gate_t,
                                 float* __restrict__ logits, const int* num_tokens_dev, int num_tokens,
                                 int hidden, int num_experts, const u64* args_block) {
    x = forward_arg(args_block, ARG_X, x);
    __shared__ float xs[TOKENS][GATE_ROUND];
    __shared__ float partial[GATE_WARPS][TOKENS][32];
    const int T = token_count(num_tokens_dev, num_tokens);
    const int t0 = blockIdx.x * TOKENS;
    if (t0 >= T) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int e = blockIdx.y * 32 + lane;
    float acc[TOKENS];
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) acc[t] = 0.0f;
    // This warp's chunk of the round starting at k0: gate rows kb .. kb + kn.
    auto load_chunk = [&](float* w, int k0) {
        const int kb = k0 + warp * GATE_CHUNK;
        const int kn = min(GATE_CHUNK, hidden - kb);
        const float* g = gate_t + (i64)kb * num_experts + e;
#pragma unroll
        for (int kk = 0; kk < GATE_CHUNK; ++kk) w[kk] = (e < num_experts && kk < kn) ? g[(i64)kk * num_experts] : 0.0f;
    };
    constexpr bool PREFETCH = TOKENS <= 4;
    float w_cur[PREFETCH ? GATE_CHUNK : 1], w_next[PREFETCH ? GATE_CHUNK : 1];
    if (PREFETCH) load_chunk(w_cur, 0);
    for (int k0 = 0; k0 < hidden; k0 += GATE_ROUND) {
        __syncthreads();
        for (int i = threadIdx.x; i < TOKENS * GATE_ROUND; i += 256) {
            const int t = i / GATE_ROUND, kk = i % GATE_ROUND;
            const int tok = t0 + t, k = k0 + kk;
            xs[t][kk] = (tok < T && k < hidden) ? elem_to_float(x[(i64)tok * hidden + k]) : 0.0f;
        }
        __syncthreads();
        const int kb = k0 + warp * GATE_CHUNK;
        const int kn = min(GATE_CHUNK, hidden - kb);
        if (PREFETCH) {
            if (k0 + GATE_ROUND < hidden) load_chunk(w_next, k0 + GATE_ROUND);
            if (e < num_experts) {
#pragma unroll
                for (int kk = 0; kk < GATE_CHUNK; ++kk) {
                    if (kk < kn) {
#pragma unroll
                        for (int t = 0; t < TOKENS; ++t) acc[t] = fmaf(xs[t][warp * GATE_CHUNK + kk], w_cur[kk], acc[t]);
                    }
                }
            }
#pragma unroll
            for (int kk = 0; kk < GATE_CHUNK; ++kk) w_cur[kk] = w_next[kk];
        } else if (e < num_experts && kn > 0) {
            const float* g = gate_t + (i64)kb * num_experts + e;
#pragma unroll 8
            for (int kk = 0; kk < kn; ++kk) {
                const float w = g[(i64)kk * num_experts];
#pragma unroll
                for (int t = 0; t < TOKENS; ++t) acc[t] = fmaf(xs[t][warp * GATE_CHUNK + kk], w, acc[t]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) partial[warp][t][lane] = acc[t];
    __syncthreads();
    for (int i = threadIdx.x; i < TOKENS * 32; i += 256) {
        const int t = i / 32, l = i % 32;
        const int tok = t0 + t, ex = blockIdx.y * 32 + l;
        if (tok >= T || ex >= num_experts) continue;
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < GATE_WARPS; ++w) s += partial[w][t][l];
        logits[(i64)tok * num_experts + ex] = s;
    }
}

extern "C" __global__ void __launch_bounds__(256) gate_logits_t4(const u16* x, const float* gate_t, float* logits,
                                                                 const int* num_tokens_dev, int num_tokens, int hidden,
                                                                 int num_experts, const u64* args_block) {
    gate_logits_impl<4>(x, gate_t, logits, num_tokens_dev, num_tokens, hidden, num_experts, args_block);
}

extern "C" __global__ void __launch_bounds__(256) gate_logits_t16(const u16* x, const float* gate_t, float* logits,
                                                                  const int* num_tokens_dev, int num_tokens, int hidden,
                                                                  int num_experts, const u64* args_block) {
    gate_logits_impl<16>(x, gate_t, logits, num_tokens_dev, num_tokens, hidden, num_experts, args_block);
}
