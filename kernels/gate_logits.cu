// Router logits: logits[t][e] = sum_k x[t][k] * gate_t[k][e], in f32.
//
// The gate runs on the full hidden x (before any latent projection) with the f32 gate weight
// stored transposed, [H, E], so consecutive experts are consecutive floats. Every variant sums
// a logit in one fixed order: H is cut in rounds of 8 chunks of 64; a chunk's sum is an fmaf
// chain from 0 over its 64 products in k order, a round's sum adds its chunks in order to 0,
// and a logit is the round sums added in round order. That order is fixed by H alone, so a
// token's logits are bitwise the same whatever batch, bucket, grid or variant computes them,
// and no atomics are used.
//
// Three variants keep that order:
//   - decode (gate_logits_split, T <= 64; gate_logits_split16 for mid-size batches too small to
//     fill the GPU with 16-token blocks, src/backend/cuda/kernels/launch_shapes.rs) gives each
//     round its own block (grid z) and writes the round sums, [rounds][T][E], which route_topk adds
//     in round order: one token's gate is then read by E/32 x rounds blocks instead of E/32, each
//     with its 64 values a lane loaded at once, since such a gate read is bound by load latency,
//     not bandwidth (Qwen3 T = 1: 16 blocks instead of 4). Warp w sums the w-th chunk of the round
//     for 32 experts (a lane each) and the 8 warp sums are added in warp order.
//   - gates of fewer than 32 experts past those (gate_logits_t16): the same block shape over
//     16 tokens, every round in one block; x is staged [k][token] so a lane's 16 x values of
//     one k are four 16-byte shared broadcasts (one shared load per FMA before).
//   - prefill, 32 experts or more (gate_logits_tiled_split up to 4096 tokens, each round its
//     own block and partials as the decode gate's; gate_logits_tiled over all of H above): a
//     plain tiled SGEMM, 64 tokens x 64 experts per block and 4 x 8 per thread, x and the gate
//     staged through shared memory a chunk at a time, so each gate value read from L2 feeds 64
//     tokens and each x value 64 experts (16 and 32 in t16, whose gate reads L2 bandwidth
//     bounds), and a thread runs the chunk chains, round sums and round order itself. Split
//     by rounds, its grid has rounds times the blocks: 1792 instead of 128 for DeepSeek-V3
//     T = 2048, where one pass left a wave of 128 blocks on 132 SMs at 3 a SM.
//
// Grid: (ceil(T / TOKENS), ceil(E / 32), split ? rounds : 1); block 256 (8 warps); tiled:
// (ceil(T / 64), ceil(E / 64), split ? rounds : 1), block 128.
#include "common/routing.cuh"
#include "common/sort.cuh"
#include "common/mma.cuh"

#define GATE_WARPS 8
#define GATE_CHUNK 64
#define GATE_ROUND (GATE_WARPS * GATE_CHUNK)

// Returns false when the block has no tokens (past the true T) and did nothing.
template <int TOKENS, bool SPLIT>
__device__ bool gate_logits_impl(const u16* __restrict__ x, const float* __restrict__ gate_t,
                                 float* __restrict__ logits, i64 slice_stride, const int* num_tokens_dev,
                                 int num_tokens, int hidden, int num_experts, const u64* args_block) {
    static_assert(TOKENS % 4 == 0, "x is read four tokens at a time");
    FDMOE_TRACE_START();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int e = blockIdx.y * 32 + lane;
    const int rounds = (hidden + GATE_ROUND - 1) / GATE_ROUND;
    const int r_begin = SPLIT ? blockIdx.z : 0, r_end = SPLIT ? blockIdx.z + 1 : rounds;
    // Split, the block's only round of the gate: its 64 loads a thread are issued before the
    // dependent-launch wait, under the previous kernel's tail, since the gate is the layer's
    // own weight, written at load (nothing on the stream writes it). In decode these loads
    // are the gate's longest wait. Blocks past T issue them too (an L2 hit after the first).
    float w[SPLIT ? GATE_CHUNK : 1];
    if (SPLIT) {
        const int kb = r_begin * GATE_ROUND + warp * GATE_CHUNK;
        const int kn = max(0, min(GATE_CHUNK, hidden - kb));
        const float* g = gate_t + (i64)kb * num_experts + e;
#pragma unroll
        for (int kk = 0; kk < GATE_CHUNK; ++kk) w[kk] = (e < num_experts && kk < kn) ? g[(i64)kk * num_experts] : 0.0f;
    }
    begin_dependent();
    x = forward_arg(args_block, ARG_X, x);
    __shared__ __align__(16) float xs[GATE_ROUND][TOKENS];  // [k][token]: a k's tokens in 16-byte loads
    __shared__ float partial[GATE_WARPS][TOKENS][32];
    constexpr int OUTS = (TOKENS * 32 + 255) / 256;  // (token, expert) outputs per thread
    const int T = token_count(num_tokens_dev, num_tokens);
    const int t0 = blockIdx.x * TOKENS;
    if (t0 >= T) return false;
    float total[OUTS];
    for (int r = r_begin; r < r_end; ++r) {
        const int k0 = r * GATE_ROUND;
        const int kb = k0 + warp * GATE_CHUNK;
        const int kn = max(0, min(GATE_CHUNK, hidden - kb));
        const float* g = gate_t + (i64)kb * num_experts + e;
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
                xs[i % GATE_ROUND][i / GATE_ROUND] = elem_to_float(xv[n]);
            }
        } else {
            // Consecutive threads take consecutive tokens: conflict-free stores.
            for (int i = threadIdx.x; i < TOKENS * GATE_ROUND; i += 256) {
                const int t = i % TOKENS, kk = i / TOKENS;
                const int tok = t0 + t, k = k0 + kk;
                xs[kk][t] = (tok < T && k < hidden) ? elem_to_float(x[(i64)tok * hidden + k]) : 0.0f;
            }
        }
        __syncthreads();
        float acc[TOKENS];
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) acc[t] = 0.0f;
        // A k's x values for the block's tokens, as 16-byte broadcasts.
        auto fma_k = [&](int kk, float wk) {
            const float4* xk = (const float4*)xs[warp * GATE_CHUNK + kk];
#pragma unroll
            for (int q = 0; q < TOKENS / 4; ++q) {
                const float4 v = xk[q];
                acc[4 * q] = fmaf(v.x, wk, acc[4 * q]);
                acc[4 * q + 1] = fmaf(v.y, wk, acc[4 * q + 1]);
                acc[4 * q + 2] = fmaf(v.z, wk, acc[4 * q + 2]);
                acc[4 * q + 3] = fmaf(v.w, wk, acc[4 * q + 3]);
            }
        };
        if (SPLIT) {
#pragma unroll
            for (int kk = 0; kk < GATE_CHUNK; ++kk)
                if (kk < kn) fma_k(kk, w[kk]);
        } else if (e < num_experts) {
#pragma unroll 8
            for (int kk = 0; kk < kn; ++kk) fma_k(kk, g[(i64)kk * num_experts]);
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

// Mid-size batches: the same over 16 tokens a block, which reads the gate from L2 a quarter as
// often (156 registers: one block per SM).
extern "C" __global__ void __launch_bounds__(256)
    gate_logits_split16(const u16* x, const float* gate_t, float* logits, i64 slice_stride, const int* num_tokens_dev,
                        int num_tokens, int hidden, int num_experts, const u64* args_block) {
    gate_logits_impl<16, true>(x, gate_t, logits, slice_stride, num_tokens_dev, num_tokens, hidden, num_experts,
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
// after the first block starts): gate summed 3.4, counted 4.1, logits loaded 4.8 (2026-12-01);
// scores 5.1, 8 picks 6.1, weights written 6.6, sorted 8.3 (2026-12-03). A sequentially
// consistent __threadfence() by every thread in place of the one atomic cost ~1.5 us; with
// one group (T <= 4) there is no second count, and at most 32 slots sort in one warp
// (sort_slots_warp) from the picks still in shared memory. Needs E <= 256 (one sort thread
// per expert).
// Dynamic smem: max(4 tokens of routing scratch, 8 * E sort counts).
//
// Warm-up: when the routing block's code is cold, in neither the SMs' instruction caches nor
// L2 (in an engine each layer runs its own copy of these kernels once a decode step, every
// other layer's weights streamed through L2 since), that block fetches its ~10 K instructions
// from DRAM, branch after branch: gate_trace.cu after a 256 KB-code kernel on every SM and an
// L2 flush, H200, Qwen3 T = 1: sorted 15.7 us after the first block's start against 8.8 with
// the L2 flush only and 9.9 with the code kernel only. So the grid has one more slice of
// blocks (blockIdx.x == gridDim.x - 1, when warm_up is set) that run the routing's and the
// sort's code at once, in parallel (one part a block), on the real logits but into scratch
// outputs (warm_route, warm_sort: same parameters, private buffers, no routing record and no
// argument block), so that the instructions are in L2 by the time the last gate block needs
// them: -5.5 us cold on an H100, no cost hot. The parts are not inlined, so that both run the
// same instructions.
struct FusedRouting {
    RouteParams route;
    SortParams sort;
    int* counters;
    RouteParams warm_route;
    SortParams warm_sort;
    i64 warm_up;
};

// One 4-token group's routing (route_tokens) into p's outputs.
__device__ __noinline__ void fused_route(const RouteParams* p, int t_base) {
    extern __shared__ float smem[];
    route_tokens(*p, t_base, 4, smem);
}

// The sort of all slots, once every group is routed: with at most 32 slots by one warp
// (with one group from the picks still in shared memory, where routing put them: the counts
// overlap only token 0's scores; with more, the other groups' are in global memory), else
// by the block.
__device__ __noinline__ void fused_sort(const SortParams* s, int per_token) {
    extern __shared__ float smem[];
    const int T = token_count(s->num_tokens_dev, s->num_tokens), groups = (T + 3) / 4;
    if (T * s->top_k <= 32) {
        const int* picks = groups == 1 ? (const int*)smem + per_token - s->top_k : nullptr;
        if (threadIdx.x < 32) sort_slots_warp(*s, (int*)smem, picks, per_token);
    } else {
        sort_slots<256>(*s, (int*)smem);
    }
}

// A warm-up block's part: its share of the routing and sort code, run on scratch.
__device__ __forceinline__ void warm_routing_code(const FusedRouting& f, int part) {
    extern __shared__ float smem[];
    const RouteParams& p = f.warm_route;
    const int per_token = route_scratch_floats(p);
    if (part == 0) {
        fused_route(&f.warm_route, 0);
    } else if (part == 1) {
        fused_sort(&f.warm_sort, per_token);
    } else if (part == 2 && threadIdx.x < 32) {
        // The picks on whatever the scratch holds (any floats pick valid experts).
        const int E = (int)p.num_experts;
        float* choice = smem + E;
        pick_for_experts(choice, (const int*)(choice + E), E, false, E, (int)p.top_k,
                         (int*)(choice + E) + p.n_group);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    gate_route_sort(const u16* x, const float* gate_t, float* logits, i64 slice_stride, const int* num_tokens_dev,
                    int num_tokens, int hidden, int num_experts, const u64* args_block,
                    const __grid_constant__ FusedRouting f) {
    if (f.warm_up && blockIdx.x == gridDim.x - 1) {
        warm_routing_code(f, blockIdx.y * gridDim.z + blockIdx.z);
        return;
    }
    if (!gate_logits_impl<4, true>(x, gate_t, logits, slice_stride, num_tokens_dev, num_tokens, hidden, num_experts,
                                   args_block))
        return;
    FDMOE_TRACE(1);
    if (!block_arrive(&f.counters[1 + blockIdx.x], gridDim.y * gridDim.z)) return;
    FDMOE_TRACE(2);
    RouteParams route = f.route;
    resolve_route_args(route);
    fused_route(&route, blockIdx.x * 4);
    FDMOE_TRACE(7);
    if (threadIdx.x == 0) f.counters[1 + blockIdx.x] = 0;
    const int T = token_count(num_tokens_dev, num_tokens), groups = (T + 3) / 4;
    if (groups > 1 && !block_arrive(&f.counters[0], groups)) return;
    if (groups == 1) __syncthreads();  // the routing's writes, for the sort's threads
    fused_sort(&f.sort, route_scratch_floats(f.route));
    FDMOE_TRACE(10);
    if (threadIdx.x == 0) f.counters[0] = 0;
}

extern "C" __global__ void __launch_bounds__(256)
    gate_logits_t16(const u16* x, const float* gate_t, float* logits, i64 slice_stride, const int* num_tokens_dev,
                    int num_tokens, int hidden, int num_experts, const u64* args_block) {
    gate_logits_impl<16, false>(x, gate_t, logits, slice_stride, num_tokens_dev, num_tokens, hidden, num_experts,
                                args_block);
}

// Prefill of 32 experts or more (Kernels::gate_logits). Block: 64 tokens x 64 experts, 128
// threads; thread (ty, tx) owns tokens 4ty.. and experts 4tx.. and 32 + 4tx.. (so a warp's
// 16-byte gate loads cover 128 consecutive bytes: no bank conflict). Each step stages one chunk
// (64 of k): x converted to f32 as [k][token] (each thread 32 values of one token, four 16-byte
// loads held in registers over the step's FMAs) and the gate as [k][expert] by cp.async,
// double-buffered, so a step's loads are in flight while the previous step's 2048 FMAs per
// thread run; per k a thread issues 3 shared loads for 32 FMAs. A round ends every eighth step
// (or at H). Dynamic smem: GATE_TILED_SMEM (launch_shapes.rs), 64 KiB.
#define TILED_TOKENS 64
#define TILED_EXPERTS 64
#define TILED_K GATE_CHUNK  // a step is a chunk: its end needs no test

// SPLIT: one round per block (grid z), its partial into slice z, as the split decode gate.
template <bool SPLIT>
__device__ __forceinline__ void gate_tiled_impl(const u16* x, const float* gate_t, float* logits, i64 slice_stride,
                                                const int* num_tokens_dev, int num_tokens, int hidden,
                                                int num_experts, const u64* args_block) {
    constexpr int GROUPS = TILED_EXPERTS / 32;  // of 4 experts per thread, 32 apart
    begin_dependent();
    x = forward_arg(args_block, ARG_X, x);
    extern __shared__ __align__(16) float tiled_smem[];
    float(*xs)[TILED_K][TILED_TOKENS] = (float(*)[TILED_K][TILED_TOKENS])tiled_smem;               // [2]
    float(*gs)[TILED_K][TILED_EXPERTS] = (float(*)[TILED_K][TILED_EXPERTS])(tiled_smem + 2 * TILED_K * TILED_TOKENS);
    const int T = token_count(num_tokens_dev, num_tokens);
    const int t0 = blockIdx.x * TILED_TOKENS, e0 = blockIdx.y * TILED_EXPERTS;
    if (t0 >= T) return;
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
    constexpr int ROUND_STEPS = GATE_ROUND / TILED_K;
    const int all_steps = (hidden + TILED_K - 1) / TILED_K;
    const int s_begin = SPLIT ? blockIdx.z * ROUND_STEPS : 0;
    const int steps = SPLIT ? min(all_steps, s_begin + ROUND_STEPS) : all_steps;
    if (SPLIT) logits += blockIdx.z * slice_stride;

    // Staging roles: x token xt's 32 values from k = 32 xh; the gate's rows gk and gk + 32,
    // TILED_EXPERTS / 4 experts from ge.
    constexpr int G_PER_ROW = TILED_EXPERTS / 4;
    const int xt = threadIdx.x % TILED_TOKENS, xh = threadIdx.x / TILED_TOKENS;
    const bool x_row = t0 + xt < T;
    const u16* x_src = x + (i64)(x_row ? t0 + xt : 0) * hidden + xh * 32;
    const int gk = threadIdx.x / 4, ge = (threadIdx.x % 4) * G_PER_ROW;
    uint4 xv[4];
    auto fetch_x = [&](int step) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int k = step * TILED_K + xh * 32 + j * 8;  // H is a multiple of 8
            xv[j] = x_row && k < hidden ? *(const uint4*)(x_src + step * TILED_K + j * 8) : make_uint4(0, 0, 0, 0);
        }
    };
    auto store_x = [&](int buf) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32 w[4] = {xv[j].x, xv[j].y, xv[j].z, xv[j].w};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                xs[buf][xh * 32 + j * 8 + 2 * q][xt] = elem_to_float((u16)(w[q] & 0xFFFFu));
                xs[buf][xh * 32 + j * 8 + 2 * q + 1][xt] = elem_to_float((u16)(w[q] >> 16));
            }
        }
    };
    // Zeros past H and E. Rows of a gate whose E is a multiple of 4 are 16-byte aligned;
    // any other E takes 4-byte copies.
    const bool rows_aligned = num_experts % 4 == 0;
    auto load_g = [&](int buf, int step) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = gk + 32 * h, k = step * TILED_K + row;
            const float* src = gate_t + (i64)k * num_experts + e0 + ge;
            if (rows_aligned) {
#pragma unroll
                for (int c = 0; c < G_PER_ROW / 4; ++c) {
                    const bool ok = k < hidden && e0 + ge + 4 * c < num_experts;
                    cp_async_16(&gs[buf][row][ge + 4 * c], ok ? (const void*)(src + 4 * c) : (const void*)gate_t, ok);
                }
            } else {
#pragma unroll
                for (int j = 0; j < G_PER_ROW; ++j) {
                    const bool ok = k < hidden && e0 + ge + j < num_experts;
                    cp_async_4(&gs[buf][row][ge + j], ok ? (const void*)(src + j) : (const void*)gate_t, ok);
                }
            }
        }
        cp_async_commit();
    };

    constexpr int TE = 4 * GROUPS;
    float chunk[4][TE], round[4][TE], total[4][TE];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < TE; ++j) chunk[i][j] = round[i][j] = total[i][j] = 0.0f;
    load_g(0, s_begin);
    fetch_x(s_begin);
    store_x(0);
    for (int step = s_begin; step < steps; ++step) {
        const int buf = (step - s_begin) & 1;
        const bool more = step + 1 < steps;
        if (more) {
            load_g(buf ^ 1, step + 1);
            fetch_x(step + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TILED_K; ++kk) {
            const float4 xa = *(const float4*)&xs[buf][kk][ty * 4];
            const float xr[4] = {xa.x, xa.y, xa.z, xa.w};
            float gr[TE];
#pragma unroll
            for (int g = 0; g < GROUPS; ++g) {
                const float4 ga = *(const float4*)&gs[buf][kk][g * 32 + tx * 4];
                gr[4 * g] = ga.x, gr[4 * g + 1] = ga.y, gr[4 * g + 2] = ga.z, gr[4 * g + 3] = ga.w;
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < TE; ++j) chunk[i][j] = fmaf(xr[i], gr[j], chunk[i][j]);
        }
        // Zero-filled k past H added +0 to each chain: a chain from +0 is never -0, so no bit
        // changed.
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < TE; ++j) {
                round[i][j] += chunk[i][j];
                chunk[i][j] = 0.0f;
            }
        const int k_end = (step + 1) * TILED_K;
        if (k_end % GATE_ROUND == 0 || !more) {
            const bool first = k_end <= (s_begin + ROUND_STEPS) * TILED_K;
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < TE; ++j) {
                    total[i][j] = first ? round[i][j] : total[i][j] + round[i][j];
                    round[i][j] = 0.0f;
                }
        }
        __syncthreads();  // every thread is done with buffer buf ^ 1's previous contents
        if (more) store_x(buf ^ 1);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int tok = t0 + ty * 4 + i;
        if (tok >= T) break;
#pragma unroll
        for (int j = 0; j < TE; ++j) {
            const int e = e0 + (j / 4) * 32 + tx * 4 + j % 4;
            if (e < num_experts) logits[(i64)tok * num_experts + e] = total[i][j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(128, 3)
    gate_logits_tiled(const u16* x, const float* gate_t, float* logits, i64 slice_stride, const int* num_tokens_dev,
                      int num_tokens, int hidden, int num_experts, const u64* args_block) {
    gate_tiled_impl<false>(x, gate_t, logits, slice_stride, num_tokens_dev, num_tokens, hidden, num_experts,
                           args_block);
}

extern "C" __global__ void __launch_bounds__(128, 3)
    gate_logits_tiled_split(const u16* x, const float* gate_t, float* logits, i64 slice_stride,
                            const int* num_tokens_dev, int num_tokens, int hidden, int num_experts,
                            const u64* args_block) {
    gate_tiled_impl<true>(x, gate_t, logits, slice_stride, num_tokens_dev, num_tokens, hidden, num_experts,
                          args_block);
}
