// Routing (SPEC §3), one warp per token: reads the token's logits (from gate_logits, adding
// its decode round partials in order, or the caller's), scores them (softmax / sigmoid),
// optionally keeps the best expert groups (DeepSeek-V3 grouped top-k), picks the top k with one
// warp arg-max per pick over 64-bit rank keys (value desc, NaN lowest, lower index on ties),
// and writes the ids and final weights to the workspace and, when asked, to the caller's
// routing record. After the block has loaded its logits, a warp per token needs no block
// barriers: decode routing is a chain of dependent reductions, so its latency is what counts.
// Exactness over speed otherwise: expf, sums in a fixed order, the same formulas as
// src/routing.rs.
//
// Grid: (ceil(max_tokens / tokens_per_block)); tokens past the true T exit. Block: 256 threads,
// all loading the logits, then one warp per token. Dynamic smem per token: see Kernels::route.
// The body is common/routing.cuh; for decode the gate kernel runs it itself (gate_logits.cu).
#include "common/routing.cuh"
#include "common/sort.cuh"

extern "C" __global__ void route_topk(RouteParams p) {
    begin_dependent();
    resolve_route_args(p);
    extern __shared__ float smem[];
    route_tokens(p, blockIdx.x * (int)p.tokens_per_block, (int)p.tokens_per_block, smem);
}

// Given routing: copies the caller's ids and weights into the workspace and the routing record
// (common/sort.cuh); at decode sort_by_expert.cu's given_sort does it in the sort's launch.
extern "C" __global__ void given_topk(GivenSlots g, const int* num_tokens_dev, int num_tokens, int top_k) {
    begin_dependent();
    const i64 slots = (i64)token_count(num_tokens_dev, num_tokens) * top_k;
    copy_given_slots(g, slots, (i64)blockIdx.x * blockDim.x + threadIdx.x, (i64)gridDim.x * blockDim.x);
}

// Graph replay prologue: one launch writes the call's pointers and true T where the captured
// kernels read them (kernel parameters travel by value, so nothing races the next call).
extern "C" __global__ void set_forward_args(u64* args_block, int* num_tokens_dev, u64 x, u64 out, u64 logits,
                                            u64 topk_ids, u64 topk_weights, u64 record_ids, u64 record_weights,
                                            int num_tokens) {
    begin_dependent();  // the previous call's kernels may still read the block
    args_block[ARG_X] = x;
    args_block[ARG_OUT] = out;
    args_block[ARG_LOGITS] = logits;
    args_block[ARG_TOPK_IDS] = topk_ids;
    args_block[ARG_TOPK_WEIGHTS] = topk_weights;
    args_block[ARG_RECORD_IDS] = record_ids;
    args_block[ARG_RECORD_WEIGHTS] = record_weights;
    *num_tokens_dev = num_tokens;
}
