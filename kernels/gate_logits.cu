// Router logits: logits[t][e] = sum_k x[t][k] * gate_t[k][e], in f32.
//
// The gate runs on the full hidden x (before any latent projection) with the f32 gate weight
// stored transposed, [H, E], so the 32 lanes of a warp (32 consecutive experts) read one
// 128-byte line of it per k while the x values they multiply are shared-memory broadcasts;
// each gate value loaded feeds TOKENS FMAs. H is cut in rounds of 8 * 64: warp w sums the
// w-th 64-wide chunk of a round, the 8 warp sums are added in warp order into the round's
// partial, and a logit is the sum of the round partials in round order. That order is fixed by
// H alone, so a token's logits are bitwise the same whatever batch, bucket or grid computes
// them, and no atomics are used.
//
// Two variants keep that order. Prefill (gate_logits_t16) sums every round in one block: it
// is bound by the FMAs. Decode (gate_logits_split, T <= 64) gives each round its own block
// (grid z) and writes the round partials, [rounds][T][E], which route_topk adds in round
// order: one token's gate is then read by E/32 x rounds blocks instead of E/32, each with its
// 64 values a lane loaded at once, since a decode gate read is bound by load latency, not
// bandwidth (Qwen3 T = 1: 16 blocks instead of 4).
//
// Grid: (ceil(T / TOKENS), ceil(E / 32), split ? rounds : 1); block 256 (8 warps).
#include "common/routing.cuh"
#include "common/sort.cuh"

#define GATE_WARPS 8
#define GATE_CHUNK 64
#define GATE_ROUND (GATE_WARPS * GATE_CHUNK)

// Returns false when the block has no tokens (past the true T) and did nothing.
template <int TOKENS, bool SPLIT>
__device__ bool gate_logits_impl(const u16* __restrict__ x, const float* __restrict__ gate_t,
                                 float* __restrict__ logits, i64 slice_stride, const int* num_tokens_dev,
                                 int num_tokens, int hidden, int num_experts, const u64* args_block) {
    begin_dependent();
    FDMOE_TRACE_START();
    x = forward_arg(args_block, ARG_X, x);
    __shared__ float xs[TOKENS][GATE_ROUND];
    __shared__ float partial[GATE_WARPS][TOKENS][32];
    constexpr int OUTS = (TOKENS * 32 + 255) / 256;  // (token, expert) outputs per thread
    const int T = token_count(num_tokens_dev, num_tokens);
    const int t0 = blockIdx.x * TOKENS;
    if (t0 >= T) return false;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int e = blockIdx.y * 32 + lane;
    const int rounds = (hidden + GATE_ROUND - 1) / GATE_ROUND;
    const int r_begin = SPLIT ? blockIdx.z : 0, r_end = SPLIT ? blockIdx.z + 1 : rounds;
    float total[OUTS];
    for (int r = r_begin; r < r_end; ++r) {
        const int k0 = r * GATE_ROUND;
        const int kb = k0 + warp * GATE_CHUNK;
        const int kn = max(0, min(GATE_CHUNK, hidden - kb));
        const float* g = gate_t + (i64)kb * num_experts + e;
        float w[SPLIT ? GATE_CHUNK : 1];
        if (SPLIT) {
            // All 64 loads in flight before x is staged: this block's only round.
#pragma unroll
            for (int kk = 0; kk < GATE_CHUNK; ++kk) w[kk] = (e < num_experts && kk < kn) ? g[(i64)kk * num_experts] : 0.0f;
        }
        // x comes through the argument block as a generic pointer, which may alias xs: staged
        // load by load, each load waits behind the previous shared store. Decode (SPLIT) issues
        // all of a thread's loads first; prefill keeps its registers (two blocks per SM).
        constexpr int X_PER = TOKENS * GATE_ROUND / 256;
        u16 xv[SPLIT ? X_PER : 1];
        if (SPLIT) {
#pragma unroll
            for (int n = 0; n < X_PER; ++n) {
                const int i = threadIdx.x + n * 256;
                const int tok = t0 + i / GATE_ROUND, k = k0 + i % GATE_ROUND;
                xv[n] = (tok < T && k < hidden) ? x[(i64)tok * hidden + k] : (u16)0;
            }
        }
        __syncthreads();
        if (SPLIT) {
#pragma unroll
            for (int n = 0; n < X_PER; ++n) {
                const int i = threadIdx.x + n * 256;
                xs[i / GATE_ROUND][i % GATE_ROUND] = elem_to_float(xv[n]);
            }
        } else {
            for (int i = threadIdx.x; i < TOKENS * GATE_ROUND; i += 256) {
                const int t = i / GATE_ROUND, kk = i % GATE_ROUND;
                const int tok = t0 + t, k = k0 + kk;
                xs[t][kk] = (tok < T && k < hidden) ? elem_to_float(x[(i64)tok * hidden + k]) : 0.0f;
            }
        }
        __syncthreads();
        float acc[TOKENS];
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) acc[t] = 0.0f;
        if (SPLIT) {
#pragma unroll
            for (int kk = 0; kk < GATE_CHUNK; ++kk)
                if (kk < kn)
#pragma unroll
                    for (int t = 0; t < TOKENS; ++t) acc[t] = fmaf(xs[t][warp * GATE_CHUNK + kk], w[kk], acc[t]);
        } else if (e < num_experts) {
#pragma unroll 8
            for (int kk = 0; kk < kn; ++kk) {
                const float wk = g[(i64)kk * num_experts];
#pragma unroll
                for (int t = 0; t < TOKENS; ++t) acc[t] = fmaf(xs[t][warp * GATE_CHUNK + kk], wk, acc[t]);
            }
        }
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) partial[warp][t][lane] = acc[t];
        __syncthreads();
#pragma unroll
        for (int o = 0; o < OUTS; ++o) {
            const int i = threadIdx.x + o * 256;
            if (i >= TOKENS * 32) break;
            float s = 0.0f;
#pragma unroll
            for (int ww = 0; ww < GATE_WARPS; ++ww) s += partial[ww][i / 32][i % 32];
            total[o] = r == r_begin ? s : total[o] + s;
        }
    }
#pragma unroll
    for (int o = 0; o < OUTS; ++o) {
        const int i = threadIdx.x + o * 256;
        if (i >= TOKENS * 32) break;
        const int tok = t0 + i / 32, ex = blockIdx.y * 32 + i % 32;
        if (tok < T && ex < num_experts) logits[r_begin * slice_stride + (i64)tok * num_experts + ex] = total[o];
    }
    return true;
}

// One round per block (grid z): logits holds [rounds][slice_stride] round partials.
extern "C" __global__ void __launch_bounds__(256)
    gate_logits_split(const u16* x, const float* gate_t, float* logits, i64 slice_stride, const int* num_tokens_dev,
                      int num_tokens, int hidden, int num_experts, const u64* args_block) {
    gate_logits_impl<4, true>(x, gate_t, logits, slice_stride, num_tokens_dev, num_tokens, hidden, num_experts,
                              args_block);
}

// Decode with the routing and the sort fused in: the last block of a 4-token group (a counter
// per group) routes the group's tokens from the partials; the last group routed (a counter over
// groups) sorts all slots, in place of the route_topk and sort_by_expert launches (their
// start-up is most of their time at T <= 64). Counters (1 + groups ints, zero between
// launches): [0] groups routed, [1 + g] blocks of group g done; each last block resets its own.
// Memory order: a block's results are done at a barrier, then its thread 0 counts with one
// acq_rel atomic (block_arrive): the release publishes what the barrier ordered before it, and
// the last block's acquire makes every other block's results visible before a barrier lets
// its threads read them (CUTLASS's barrier pattern). The last block's work is a chain of
// latencies, so each link counts. Phase stamps (bench/gate_trace.cu, H200, Qwen3 T = 1, us
// after the first block starts): gate summed 3.4, counted 4.1, logits loaded 4.8, scores 5.8,
// 8 picks 7.4, weights written 7.8, sorted 9.4. A sequentially consistent __threadfence() by
// every thread in place of the one atomic cost ~1.5 us; with one group (T <= 4) there is no
// second count, and at most 32 slots sort in one warp (sort_slots_warp) from the picks still
// in shared memory. Needs E <= 256 (one sort thread per expert).
// Dynamic smem: max(4 tokens of routing scratch, 8 * E sort counts).
struct FusedRouting {
    RouteParams route;
    SortParams sort;
    int* counters;
};

__device__ __forceinline__ int atomic_add_acq_rel_gpu(int* counter, int v) {
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(counter), "r"(v) : "memory");
    return old;
}

// Whether this block is the last of `expected` to arrive at `counter` (every thread gets the
// answer); when it is, the others' results are visible to all its threads.
__device__ __forceinline__ bool block_arrive(int* counter, int expected) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) last = atomic_add_acq_rel_gpu(counter, 1) == expected - 1;
    __syncthreads();
    return last;
}

extern "C" __global__ void __launch_bounds__(256)
    gate_route_sort(const u16* x, const float* gate_t, float* logits, i64 slice_stride, const int* num_tokens_dev,
                    int num_tokens, int hidden, int num_experts, const u64* args_block, FusedRouting f) {
    if (!gate_logits_impl<4, true>(x, gate_t, logits, slice_stride, num_tokens_dev, num_tokens, hidden, num_experts,
                                   args_block))
        return;
    FDMOE_TRACE(1);
    extern __shared__ float smem[];
    if (!block_arrive(&f.counters[1 + blockIdx.x], gridDim.y * gridDim.z)) return;
    FDMOE_TRACE(2);
    resolve_route_args(f.route);
    route_tokens(f.route, blockIdx.x * 4, 4, smem);
    FDMOE_TRACE(7);
    if (threadIdx.x == 0) f.counters[1 + blockIdx.x] = 0;
    const int T = token_count(num_tokens_dev, num_tokens), groups = (T + 3) / 4;
    if (groups > 1 && !block_arrive(&f.counters[0], groups)) return;
    if (groups == 1) __syncthreads();  // the routing's writes, for the sort's threads
    if (T * f.sort.top_k <= 32) {
        // With one group its picks are all in this block's scratch, where routing put them (the
        // counts overlap only token 0's scores); with more, the other groups' are in global memory.
        const int per_token = route_scratch_floats(f.route);
        const int* picks = groups == 1 ? (const int*)smem + per_token - f.sort.top_k : nullptr;
        if (threadIdx.x < 32) sort_slots_warp(f.sort, (int*)smem, picks, per_token);
    } else {
        sort_slots<256>(f.sort, (int*)smem);
    }
    FDMOE_TRACE(10);
    if (threadIdx.x == 0) f.counters[0] = 0;
}

extern "C" __global__ void __launch_bounds__(256)
    gate_logits_t16(const u16* x, const float* gate_t, float* logits, i64 slice_stride, const int* num_tokens_dev,
                    int num_tokens, int hidden, int num_experts, const u64* args_block) {
    gate_logits_impl<16, false>(x, gate_t, logits, slice_stride, num_tokens_dev, num_tokens, hidden, num_experts,
                                args_block);
}
