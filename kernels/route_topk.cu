// Routing (SPEC §3) for one token per block: reads the token's logits (from gate_logits or
// the caller), scores them (softmax / sigmoid), optionally keeps the
// best expert groups (DeepSeek-V3 grouped top-k), picks the top k with one block-wide arg-max
// per pick over 64-bit rank keys (value desc, NaN lowest, lower index on ties), and writes the
// ids and final weights to the workspace and, when asked, to the caller's routing record.
// Routing is a few microseconds of work, so it favours exactness over speed: expf, ordered
// sums, the same formulas as src/routing.rs.
//
// Grid: (max_tokens); blocks past the true T exit. Block: 256. Dynamic smem: see route_smem_bytes.
#include "common/types.cuh"

#define ROUTE_THREADS 256
#define MODE_SOFTMAX 0
#define MODE_SIGMOID 1
#define MODE_GROUPED 2

struct RouteParams {
    const float* logits;        // [T][E]
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

__device__ u64 block_max_key(u64 key, u64* scratch) {
    for (int o = 16; o > 0; o >>= 1) {
        u64 other = __shfl_xor_sync(0xffffffffu, key, o);
        key = other > key ? other : key;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = key;
    __syncthreads();
    u64 best = scratch[0];
    for (int w = 1; w < ROUTE_THREADS / 32; ++w) best = scratch[w] > best ? scratch[w] : best;
    return best;
}

__device__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float s = 0.0f;
    for (int w = 0; w < ROUTE_THREADS / 32; ++w) s += scratch[w];
    return s;
}

__device__ float block_max(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = scratch[0];
    for (int w = 1; w < ROUTE_THREADS / 32; ++w) m = fmaxf(m, scratch[w]);
    return m;
}

// Dynamic shared memory: scores[E], choice[E], group_keep[n_group] (as int), picked ids[k].
extern "C" __global__ void __launch_bounds__(ROUTE_THREADS) route_topk(RouteParams p) {
    if (p.args_block) {
        // NULL logits: the caller's, from the block; else the gate GEMM's workspace.
        if (!p.logits) p.logits = (const float*)p.args_block[ARG_LOGITS];
        p.record_ids = forward_arg(p.args_block, ARG_RECORD_IDS, p.record_ids);
        p.record_weights = forward_arg(p.args_block, ARG_RECORD_WEIGHTS, p.record_weights);
    }
    extern __shared__ float smem[];
    __shared__ u64 key_scratch[ROUTE_THREADS / 32];
    __shared__ float f_scratch[ROUTE_THREADS / 32];
    const int T = token_count(p.num_tokens_dev, (int)p.num_tokens);
    const int t = blockIdx.x;
    if (t >= T) return;
    const int E = (int)p.num_experts, K = (int)p.top_k;
    float* scores = smem;
    float* choice = smem + E;
    int* group_keep = (int*)(smem + 2 * E);
    int* picked = group_keep + p.n_group;

    float local_max = __int_as_float(0xff800000);  // -inf
    for (int e = threadIdx.x; e < E; e += ROUTE_THREADS) {
        const float r = p.logits[(i64)t * E + e];
        scores[e] = r;
        local_max = fmaxf(local_max, r);
    }
    const bool use_softmax = p.mode == MODE_SOFTMAX || (p.mode == MODE_GROUPED && p.grouped_softmax);
    if (use_softmax) {
        const float m = block_max(local_max, f_scratch);
        float local_sum = 0.0f;
        for (int e = threadIdx.x; e < E; e += ROUTE_THREADS) {
            float v = expf(scores[e] - m);
            scores[e] = v;
            local_sum += v;
        }
        const float sum = block_sum(local_sum, f_scratch);
        for (int e = threadIdx.x; e < E; e += ROUTE_THREADS) scores[e] = scores[e] / sum;
    } else {
        for (int e = threadIdx.x; e < E; e += ROUTE_THREADS) scores[e] = 1.0f / (1.0f + expf(-scores[e]));
    }
    for (int e = threadIdx.x; e < E; e += ROUTE_THREADS)
        choice[e] = scores[e] + ((p.mode == MODE_GROUPED && p.correction_bias) ? p.correction_bias[e] : 0.0f);
    __syncthreads();

    const int group_size = p.mode == MODE_GROUPED ? E / (int)p.n_group : E;
    if (p.mode == MODE_GROUPED) {
        // Group scores: max of the group, or the sum of its two best biased scores.
        for (int g = threadIdx.x; g < p.n_group; g += ROUTE_THREADS) {
            u64 best = 0, second = 0;
            for (int i = 0; i < group_size; ++i) {
                u64 k = rank_key(choice[g * group_size + i], i);
                if (k > best) {
                    second = best;
                    best = k;
                } else if (k > second) {
                    second = k;
                }
            }
            float s = choice[g * group_size + key_index(best)];
            if (p.correction_bias && group_size > 1) s += choice[g * group_size + key_index(second)];
            group_keep[g] = __float_as_int(s);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            // Keep the topk_group best groups (n_group <= 64, checked at create: one thread).
            u64 taken_mask_keys[64];
            int n = (int)p.n_group;
            for (int g = 0; g < n && g < 64; ++g) taken_mask_keys[g] = rank_key(__int_as_float(group_keep[g]), g);
            for (int g = 0; g < n; ++g) group_keep[g] = 0;
            for (int pick = 0; pick < p.topk_group; ++pick) {
                u64 best = 0;
                for (int g = 0; g < n; ++g) best = taken_mask_keys[g] > best ? taken_mask_keys[g] : best;
                int g = key_index(best);
                group_keep[g] = 1;
                taken_mask_keys[g] = 0;
            }
        }
        __syncthreads();
    }

    for (int j = 0; j < K; ++j) {
        u64 key = 0;
        for (int e = threadIdx.x; e < E; e += ROUTE_THREADS) {
            bool eligible = p.mode != MODE_GROUPED || group_keep[e / group_size];
            for (int q = 0; q < j && eligible; ++q) eligible = picked[q] != e;
            u64 k = eligible ? rank_key(choice[e], e) : 0;
            key = k > key ? k : key;
        }
        u64 best = block_max_key(key, key_scratch);
        if (threadIdx.x == 0) picked[j] = key_index(best);
        __syncthreads();
    }

    if (threadIdx.x == 0) {
        // Sum in slot order, as the reference does.
        float sum = 0.0f;
        for (int j = 0; j < K; ++j) sum += scores[picked[j]];
        if (p.mode == MODE_GROUPED) sum += 1e-20f;
        for (int j = 0; j < K; ++j) {
            float v = p.renormalize ? scores[picked[j]] / sum : scores[picked[j]];
            v *= p.routed_scaling_factor;
            const i64 slot = (i64)t * K + j;
            p.topk_ids[slot] = picked[j];
            p.topk_weights[slot] = v;
            if (p.record_ids) p.record_ids[slot] = picked[j];
            if (p.record_weights) p.record_weights[slot] = v;
        }
    }
}

// Given routing (replay): copies the caller's ids and weights into the workspace and the
// routing record. Ids outside [0, E) are kept: the sort drops those slots (no work, no write).
extern "C" __global__ void given_topk(const int* ids, const float* weights, int* topk_ids, float* topk_weights,
                                      int* record_ids, float* record_weights, const int* num_tokens_dev,
                                      int num_tokens, int top_k, const u64* args_block) {
    ids = forward_arg(args_block, ARG_TOPK_IDS, ids);
    weights = forward_arg(args_block, ARG_TOPK_WEIGHTS, weights);
    record_ids = forward_arg(args_block, ARG_RECORD_IDS, record_ids);
    record_weights = forward_arg(args_block, ARG_RECORD_WEIGHTS, record_weights);
    const int T = token_count(num_tokens_dev, num_tokens);
    const i64 n = (i64)T * top_k;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        int id = ids[i];
        float w = weights[i];
        topk_ids[i] = id;
        topk_weights[i] = w;
        if (record_ids) record_ids[i] = id;
        if (record_weights) record_weights[i] = w;
    }
}

// Graph replay prologue: one launch writes the call's pointers and true T where the captured
// kernels read them (kernel parameters travel by value, so nothing races the next call).
extern "C" __global__ void set_forward_args(u64* args_block, int* num_tokens_dev, u64 x, u64 out, u64 logits,
                                            u64 topk_ids, u64 topk_weights, u64 record_ids, u64 record_weights,
                                            int num_tokens) {
    args_block[ARG_X] = x;
    args_block[ARG_OUT] = out;
    args_block[ARG_LOGITS] = logits;
    args_block[ARG_TOPK_IDS] = topk_ids;
    args_block[ARG_TOPK_WEIGHTS] = topk_weights;
    args_block[ARG_RECORD_IDS] = record_ids;
    args_block[ARG_RECORD_WEIGHTS] = record_weights;
    *num_tokens_dev = num_tokens;
}
