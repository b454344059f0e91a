//! How the gate, routing and sort launches are shaped for a batch of T tokens (which gate
//! kernel, how many partial sums of H, how many sort blocks), and the workspaces those shapes
//! need at the largest T: one place, so that create sizes exactly what forward will use.

/// Counters of the fused decode routing: one per 4-token group of T <= 64, and one over groups.
pub const ROUTING_COUNTERS: usize = 1 + GATE_SPLIT_MAX_TOKENS / GATE_DECODE_TOKENS;
/// Sorts on 256 threads (the fused gate kernel's, `given_sort_256`) take one thread per expert.
pub(super) const FUSED_MAX_EXPERTS: usize = GATE_THREADS as usize;

pub(super) const ROUTE_THREADS: u32 = 256;

/// H is summed in rounds of 512 (kernels/gate_logits.cu); decode (T <= 64) gives each round its
/// own blocks and leaves one partial per round for route_topk to add.
pub(super) const GATE_ROUND: usize = 512;
pub(super) const GATE_SPLIT_MAX_TOKENS: usize = 64;
/// Mid-size batches (up to GATE_SPLIT_MID_MAX_TOKENS, which bounds the partials' workspace)
/// take the split gate too, 16 tokens a block, while the 16-token kernel would have fewer than
/// this many blocks: that one's loop waits on each gate load with 8 warps per SM, so at one
/// block per SM it is latency-bound (H200, fifth session: 70.9 us for Qwen3 T = 256's 64
/// blocks, 147 us for Mixtral's 16; the split one keeps 64 loads a thread in flight). Sixth
/// session: at 128 blocks the split one still gained (Qwen3 T = 512 -35 us, DeepSeek-V3
/// T = 256 -0.11 ms), at 256 (Qwen3 T = 1024, DeepSeek-V3 T = 512) it lost 5-20 us.
pub(super) const GATE_SPLIT_MID_MAX_TOKENS: usize = 1024;
pub(super) const GATE_SPLIT_MIN_T16_BLOCKS: usize = 256;
/// Tokens per block of the decode gate kernels (their TOKENS): one routing group of the fused one.
pub(super) const GATE_DECODE_TOKENS: usize = 4;
/// Tokens per block of the 16-token gate, and experts per block (a lane each) of both.
pub(super) const GATE_T16_TOKENS: usize = 16;
pub(super) const GATE_BLOCK_EXPERTS: usize = 32;
/// Threads of every gate kernel (the fused sort's too) but the tiled one.
pub(super) const GATE_THREADS: u32 = 256;
/// The tiled prefill gate (kernels/gate_logits.cu): tokens and experts per block, threads.
/// Gates of fewer than 32 experts never take it (a 64-wide tile would waste over half its FMAs).
pub(super) const GATE_TILED_TOKENS: usize = 64;
pub(super) const GATE_TILED_EXPERTS: usize = 64;
pub(super) const GATE_TILED_THREADS: u32 = 128;
/// Its dynamic shared memory: two stages of 64 of H for x and the gate, as f32.
pub(super) const GATE_TILED_SMEM: usize = 2 * 64 * (GATE_TILED_TOKENS + GATE_TILED_EXPERTS) * 4;
/// Up to this many tokens the tiled gate, too, gives each round of H its own blocks (partials
/// as the split gate's), in place of the 16-token gate and of its own one-pass form: H200,
/// seventh session, routed column: Qwen3 T = 1024-3072 -18 to -73 us, T = 4096 -38 us,
/// DeepSeek-V3 T = 512-4096 -0.12 to -0.28 ms; at 8192 the two forms were within the runs'
/// noise, and the partials' workspace (T x E x rounds floats, 59 MB for DeepSeek-V3 at 4096)
/// stops growing here.
pub(super) const GATE_TILED_SPLIT_MAX_TOKENS: usize = 4096;
/// Larger batches take the one-pass tiled gate from this many blocks (about one per SM of a
/// Hopper GPU: with fewer, the 16-token kernel's warps that split H keep more SMs busy).
pub(super) const GATE_TILED_MIN_BLOCKS: usize = 128;

/// Whether the gate for `num_tokens` tokens gives each round of H its own blocks of the 4- or
/// 16-token kernel.
pub(super) fn gate_runs_split(num_tokens: usize, num_experts: usize) -> bool {
    num_tokens <= GATE_SPLIT_MAX_TOKENS
        || (num_tokens <= GATE_SPLIT_MID_MAX_TOKENS
            && num_tokens.div_ceil(GATE_T16_TOKENS) * num_experts.div_ceil(GATE_BLOCK_EXPERTS)
                < GATE_SPLIT_MIN_T16_BLOCKS)
}

/// Whether the gate for `num_tokens` tokens runs tiled, each round of H in its own blocks.
pub(super) fn gate_runs_tiled_split(num_tokens: usize, num_experts: usize) -> bool {
    num_tokens <= GATE_TILED_SPLIT_MAX_TOKENS
        && num_experts >= GATE_TILED_EXPERTS / 2
        && !gate_runs_split(num_tokens, num_experts)
}

/// Whether the gate for `num_tokens` tokens runs tiled over all of H in a block.
pub(super) fn gate_runs_tiled(num_tokens: usize, num_experts: usize) -> bool {
    num_tokens > GATE_TILED_SPLIT_MAX_TOKENS
        && num_experts >= GATE_TILED_EXPERTS / 2
        && num_tokens.div_ceil(GATE_TILED_TOKENS) * num_experts.div_ceil(GATE_TILED_EXPERTS)
            >= GATE_TILED_MIN_BLOCKS
}

/// How many slices of `T * E` floats the gate leaves for `num_tokens` tokens.
pub fn gate_slices(num_tokens: usize, hidden: usize, num_experts: usize) -> usize {
    if gate_runs_split(num_tokens, num_experts) || gate_runs_tiled_split(num_tokens, num_experts) {
        hidden.div_ceil(GATE_ROUND)
    } else {
        1
    }
}

/// Floats of the logits workspace for up to `max_tokens` tokens: the logits, or the round
/// partials of the largest batch that splits (none past GATE_TILED_SPLIT_MAX_TOKENS).
pub fn gate_logits_floats(max_tokens: usize, hidden: usize, num_experts: usize) -> usize {
    let cap = max_tokens.min(GATE_TILED_SPLIT_MAX_TOKENS.max(GATE_SPLIT_MID_MAX_TOKENS));
    let partials = (1..=cap)
        .rev()
        .find(|&t| gate_slices(t, hidden, num_experts) > 1)
        .map_or(0, |t| t * gate_slices(t, hidden, num_experts));
    num_experts * max_tokens.max(partials)
}
pub const SORT_THREADS: u32 = 1024;
/// Slots per block of the multi-block sort (SORT_CHUNK in kernels/sort_by_expert.cu); more
/// slots than this sort over ceil(slots / SORT_CHUNK) blocks.
pub(super) const SORT_CHUNK: usize = 2048;

/// Ints of the multi-block sort's workspace for up to `max_slots` slots: its arrival counter,
/// then each block's start per expert.
pub fn sort_starts_ints(max_slots: usize, num_experts: usize) -> usize {
    1 + max_slots.div_ceil(SORT_CHUNK) * num_experts
}
