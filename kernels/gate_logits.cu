// Router logits: partial[s][t][e] = sum over k in split s of x[t][k] * gate_t[k][e], in f32.
//
// The gate runs on the full hidden x (before any latent projection) with the f32 gate weight
// stored transposed, [H, E], so that the threads of a block (one expert each) read one row of
// it with coalesced loads while every x value they multiply is a shared-memory broadcast.
// A block covers TOKENS tokens, so each gate value loaded feeds TOKENS FMAs; splitting H over
// gridDim.z gives decode (T = 1) enough blocks to stream the gate at full bandwidth. Partial
// sums are summed later in split order by route_topk, never with atomics: deterministic.
//
// Grid: (ceil(T / TOKENS), ceil(E / 256), splits); block 256. k_per_split is a multiple of K_TILE.
#include "common/types.cuh"

#define K_TILE 64

template <int TOKENS>
__device__ void gate_logits_impl(const u16* __restrict__ x, const float* __restrict__ gate_t,
                                 float* __restrict__ partial, const int* num_tokens_dev, int num_tokens,
                                 int hidden, int num_experts, int k_per_split) {
    __shared__ float xs[TOKENS][K_TILE];
    const int T = token_count(num_tokens_dev, num_tokens);
    const int t0 = blockIdx.x * TOKENS;
    if (t0 >= T) return;
    const int e = blockIdx.y * 256 + threadIdx.x;
    const int split = blockIdx.z;
    const int k_begin = split * k_per_split;
    const int k_end = min(hidden, k_begin + k_per_split);
    float acc[TOKENS];
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) acc[t] = 0.0f;
    for (int k0 = k_begin; k0 < k_end; k0 += K_TILE) {
        __syncthreads();
        for (int i = threadIdx.x; i < TOKENS * K_TILE; i += 256) {
            int t = i / K_TILE, kk = i % K_TILE;
            int tok = t0 + t, k = k0 + kk;
            xs[t][kk] = (tok < T && k < k_end) ? elem_to_float(x[(i64)tok * hidden + k]) : 0.0f;
        }
        __syncthreads();
        if (e < num_experts) {
            const int kmax = min(K_TILE, k_end - k0);
            for (int kk = 0; kk < kmax; ++kk) {
                float w = gate_t[(i64)(k0 + kk) * num_experts + e];
#pragma unroll
                for (int t = 0; t < TOKENS; ++t) acc[t] = fmaf(xs[t][kk], w, acc[t]);
            }
        }
    }
    if (e < num_experts) {
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) {
            int tok = t0 + t;
            if (tok < T) partial[((i64)split * T + tok) * num_experts + e] = acc[t];
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) gate_logits_t4(const u16* x, const float* gate_t, float* partial,
                                                                 const int* num_tokens_dev, int num_tokens, int hidden,
                                                                 int num_experts, int k_per_split) {
    gate_logits_impl<4>(x, gate_t, partial, num_tokens_dev, num_tokens, hidden, num_experts, k_per_split);
}

extern "C" __global__ void __launch_bounds__(256) gate_logits_t32(const u16* x, const float* gate_t, float* partial,
                                                                  const int* num_tokens_dev, int num_tokens, int hidden,
                                                                  int num_experts, int k_per_split) {
    gate_logits_impl<32>(x, gate_t, partial, num_tokens_dev, num_tokens, hidden, num_experts, k_per_split);
}
