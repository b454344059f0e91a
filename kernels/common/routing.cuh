// Routing (SPEC §3) of a block's tokens, shared by route_topk (route_topk.cu) and the decode
// gate kernel's last block (gate_logits.cu). See route_topk.cu for what it computes.
#pragma once
#include "common/types.cuh"

#define MODE_SOFTMAX 0
#define MODE_SIGMOID 1
#define MODE_GROUPED 2
#define ROUTE_MAX_SLICES 16  // logit partials loaded together (more are added one by one)

struct RouteParams {
    const float* logits;        // [slices][T][E]
    i64 logit_slices;           // partials added in order (1: the logits)
    i64 slice_stride;
    i64 tokens_per_block;       // one warp each
    const float* correction_bias;  // [E] or null
    int* topk_ids;              // [T][k] workspace
    float* topk_weights;
    int* record_ids;            // [T][k] caller's routing record, or null
    float* record_weights;
    const int* num_tokens_dev;
    const u64* args_block;      // graph replay: the record (and NULL logits) come from here
    i64 num_tokens;
    i64 num_experts;
    i64 top_k;
    i64 mode;
    i64 grouped_softmax;        // grouped: scores by softmax instead of sigmoid
    i64 n_group;
    i64 topk_group;
    i64 renormalize;
    float routed_scaling_factor;
    float pad_;
};

__device__ __forceinline__ u32 warp_max_u32(u32 v) {
    u32 r;
    asm volatile("redux.sync.max.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(v));
    return r;
}

// The warp's largest key: the largest high word, then the largest low word among the lanes
// that hold it. Two redux instructions instead of five rounds of two 32-bit shuffles: a decode
// token's k picks are a chain of these.
__device__ __forceinline__ u64 warp_max_key(u64 key) {
    const u32 hi = warp_max_u32((u32)(key >> 32));
    const u32 lo = warp_max_u32((u32)(key >> 32) == hi ? (u32)key : 0u);
    return ((u64)hi << 32) | lo;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Graph replay: the call's routing record (and the caller's logits, when `logits` is NULL)
// come from the forward argument block.
__device__ __forceinline__ void resolve_route_args(RouteParams& p) {
    if (!p.args_block) return;
    if (!p.logits) p.logits = (const float*)p.args_block[ARG_LOGITS];
    p.record_ids = forward_arg(p.args_block, ARG_RECORD_IDS, p.record_ids);
    p.record_weights = forward_arg(p.args_block, ARG_RECORD_WEIGHTS, p.record_weights);
}

// The k best experts of one token by rank key (value desc, NaN lowest, lower index on ties)
// into picked[0..k), by one warp; experts of groups not kept (grouped) are not selectable.
// PER_LANE: E <= 32 * PER_LANE; lane l holds experts l, l + 32, ... (0: none or taken).
//
// A decode token's k picks are a dependent chain, so each pick is kept short: up to 8 keys a
// lane are sorted once (odd-even transposition, registers only), and a pick is the warp's
// largest head key, which the one lane holding it (keys are unique) drops by shifting its
// list, with selects instead of a branch. With more keys a lane keeps its best and the winning
// lane rescans, since sorting 16 or 32 would cost more than the picks.
//
// Not inlined: the decode gate's warm-up blocks (gate_logits.cu) run this very code early so
// that its instructions are in L2 when the routing block gets here.
template <int PER_LANE>
__device__ __noinline__ void pick_top_k(const float* choice, const int* group_keep, int group_size, bool grouped,
                                           int E, int K, int* picked) {
    const int lane = threadIdx.x % 32;
    u64 keys[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int e = lane + 32 * i;
        const bool selectable = e < E && (!grouped || group_keep[e / group_size]);
        keys[i] = selectable ? rank_key(choice[e], e) : 0;
    }
    if constexpr (PER_LANE <= 8) {
#pragma unroll
        for (int pass = 0; pass < PER_LANE; ++pass)
#pragma unroll
            for (int i = pass & 1; i + 1 < PER_LANE; i += 2) {
                const u64 a = keys[i], b = keys[i + 1];
                keys[i] = a > b ? a : b;
                keys[i + 1] = a > b ? b : a;
            }
        for (int j = 0; j < K; ++j) {
            const u64 best = warp_max_key(keys[0]);
            if (lane == 0) picked[j] = key_index(best);
            const bool won = keys[0] == best;
#pragma unroll
            for (int i = 0; i + 1 < PER_LANE; ++i) keys[i] = won ? keys[i + 1] : keys[i];
            keys[PER_LANE - 1] = won ? 0 : keys[PER_LANE - 1];
        }
    } else {
        u64 mine = 0;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) mine = keys[i] > mine ? keys[i] : mine;
        // Taken keys as a mask, not zeroed in `keys`: the compiler turns a store at the
        // winner's index into a dynamically indexed array (local memory).
        u32 taken = 0;
        for (int j = 0; j < K; ++j) {
            const int e = key_index(warp_max_key(mine));
            if (lane == 0) picked[j] = e;
            if (e % 32 == lane) {
                taken |= 1u << (e / 32);
                mine = 0;
#pragma unroll
                for (int i = 0; i < PER_LANE; ++i) {
                    const u64 k = (taken >> i) & 1u ? 0 : keys[i];
                    mine = k > mine ? k : mine;
                }
            }
        }
    }
}

// pick_top_k for E experts, by one warp.
__device__ __forceinline__ void pick_for_experts(const float* choice, const int* group_keep, int group_size,
                                                 bool grouped, int E, int K, int* picked) {
    if (E <= 128) {
        pick_top_k<4>(choice, group_keep, group_size, grouped, E, K, picked);
    } else if (E <= 256) {
        pick_top_k<8>(choice, group_keep, group_size, grouped, E, K, picked);
    } else if (E <= 512) {
        pick_top_k<16>(choice, group_keep, group_size, grouped, E, K, picked);
    } else {
        pick_top_k<32>(choice, group_keep, group_size, grouped, E, K, picked);  // E <= 1024
    }
}

// Routes tokens t_base .. t_base + tokens_per_block - 1 (those below the true T), one warp each
// (tokens_per_block <= warps of the block). smem: tokens_per_block * (2E + n_group + k) floats,
// per token scores[E], choice[E], group_keep[n_group] (as int), picked ids[k]. Every thread of
// the block calls it (one block barrier inside).
// A token's routing scratch in shared memory, in floats: scores[E], choice[E],
// group_keep[n_group], picked[k] (last).
__device__ __forceinline__ int route_scratch_floats(const RouteParams& p) {
    return (int)(2 * p.num_experts + p.n_group + p.top_k);
}

__device__ void route_tokens(const RouteParams& p, int t_base, int tokens_per_block, float* smem) {
    const int E = (int)p.num_experts, K = (int)p.top_k;
    const i64 per_token = route_scratch_floats(p);
    const int T = token_count(p.num_tokens_dev, (int)p.num_tokens);
    if (t_base >= T) return;

    // The block's logits (the gate's round partials added in order) into each token's scores,
    // by all threads, every load of a logit in flight at once: in decode this read is the
    // routing's longest wait.
    for (int i = threadIdx.x; i < tokens_per_block * E; i += blockDim.x) {
        const int tok = i / E, e = i % E;
        if (t_base + tok >= T) break;
        const float* l = p.logits + (i64)(t_base + tok) * E + e;
        float part[ROUTE_MAX_SLICES];
#pragma unroll
        for (int s = 0; s < ROUTE_MAX_SLICES; ++s) part[s] = s < p.logit_slices ? l[s * p.slice_stride] : 0.0f;
        float r = part[0];
#pragma unroll
        for (int s = 1; s < ROUTE_MAX_SLICES; ++s)
            if (s < p.logit_slices) r += part[s];
        for (i64 s = ROUTE_MAX_SLICES; s < p.logit_slices; ++s) r += l[s * p.slice_stride];
        smem[tok * per_token + e] = r;
    }
    __syncthreads();
    FDMOE_TRACE(3);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int t = t_base + warp;
    if (warp >= tokens_per_block || t >= T) return;
    float* scores = smem + warp * per_token;
    float* choice = scores + E;
    int* group_keep = (int*)(choice + E);
    int* picked = group_keep + p.n_group;

    float local_max = __int_as_float(0xff800000);  // -inf
#pragma unroll 4
    for (int e = lane; e < E; e += 32) local_max = fmaxf(local_max, scores[e]);
    const bool use_softmax = p.mode == MODE_SOFTMAX || (p.mode == MODE_GROUPED && p.grouped_softmax);
    if (use_softmax) {
        const float m = warp_max(local_max);
        float local_sum = 0.0f;
#pragma unroll 4
        for (int e = lane; e < E; e += 32) {
            const float v = expf(scores[e] - m);
            scores[e] = v;
            local_sum += v;
        }
        const float sum = warp_sum(local_sum);
#pragma unroll 4
        for (int e = lane; e < E; e += 32) scores[e] = scores[e] / sum;
    } else {
#pragma unroll 4
        for (int e = lane; e < E; e += 32) scores[e] = 1.0f / (1.0f + expf(-scores[e]));
    }
#pragma unroll 4
    for (int e = lane; e < E; e += 32)
        choice[e] = scores[e] + ((p.mode == MODE_GROUPED && p.correction_bias) ? p.correction_bias[e] : 0.0f);
    __syncwarp();
    FDMOE_TRACE(4);

    const int group_size = p.mode == MODE_GROUPED ? E / (int)p.n_group : E;
    if (p.mode == MODE_GROUPED) {
        // Group scores: max of the group, or the sum of its two best biased scores. `lanes`
        // lanes share a group (4 for DeepSeek-V3's 8 groups), each keeping the best two of its
        // share, merged by shuffles.
        const int n = (int)p.n_group;
        int lanes = 1;
        while (lanes * 2 * n <= 32) lanes *= 2;
        for (int g0 = 0; g0 < n; g0 += 32 / lanes) {
            const int g = g0 + lane / lanes, sub = lane % lanes;
            u64 best = 0, second = 0;
            if (g < n) {
                for (int i = sub; i < group_size; i += lanes) {
                    const u64 k = rank_key(choice[g * group_size + i], i);
                    if (k > best) {
                        second = best;
                        best = k;
                    } else if (k > second) {
                        second = k;
                    }
                }
            }
            for (int o = lanes / 2; o > 0; o >>= 1) {
                const u64 ob = __shfl_xor_sync(0xffffffffu, best, o);
                const u64 os = __shfl_xor_sync(0xffffffffu, second, o);
                const u64 lo = ob < best ? ob : best, hi_second = os > second ? os : second;
                best = ob > best ? ob : best;
                second = lo > hi_second ? lo : hi_second;
            }
            if (g < n && sub == 0) {
                float s = choice[g * group_size + key_index(best)];
                if (p.correction_bias && group_size > 1) s += choice[g * group_size + key_index(second)];
                group_keep[g] = __float_as_int(s);
            }
        }
        __syncwarp();
        // Keep the topk_group best groups (n_group <= 64, checked at create): lane g holds
        // groups g and g + 32.
        u64 lo = lane < n ? rank_key(__int_as_float(group_keep[lane]), lane) : 0;
        u64 hi = lane + 32 < n ? rank_key(__int_as_float(group_keep[lane + 32]), lane + 32) : 0;
        bool keep_lo = false, keep_hi = false;
        for (int pick = 0; pick < p.topk_group; ++pick) {
            const int g = key_index(warp_max_key(lo > hi ? lo : hi));
            if (g == lane) {
                keep_lo = true;
                lo = 0;
            }
            if (g == lane + 32) {
                keep_hi = true;
                hi = 0;
            }
        }
        __syncwarp();
        if (lane < n) group_keep[lane] = keep_lo;
        if (lane + 32 < n) group_keep[lane + 32] = keep_hi;
        __syncwarp();
    }

    // Picks: each lane keeps the keys of its experts (lane, lane + 32, ...) in registers, so a
    // pick is one warp arg-max (see pick_top_k). Qwen3 T = 1's 8 picks: 2.3 us rescanning
    // shared memory, 1.6 us with a register rescan by the winning lane, 1.0 us sorted lanes.
    pick_for_experts(choice, group_keep, group_size, p.mode == MODE_GROUPED, E, K, picked);
    __syncwarp();
    FDMOE_TRACE(5);

    // The picks' scores (into `choice`, no longer needed), then every lane sums them in slot
    // order, as the reference does, and writes its slots: one lane walking all k slots was
    // a chain of dependent loads.
    for (int j = lane; j < K; j += 32) choice[j] = scores[picked[j]];
    __syncwarp();
    float sum = 0.0f;
#pragma unroll 8
    for (int j = 0; j < K; ++j) sum += choice[j];
    if (p.mode == MODE_GROUPED) sum += 1e-20f;
    for (int j = lane; j < K; j += 32) {
        float v = p.renormalize ? choice[j] / sum : choice[j];
        v *= p.routed_scaling_factor;
        const i64 slot = (i64)t * K + j;
        p.topk_ids[slot] = picked[j];
        p.topk_weights[slot] = v;
        if (p.record_ids) p.record_ids[slot] = picked[j];
        if (p.record_weights) p.record_weights[slot] = v;
    }
    FDMOE_TRACE(6);
}
