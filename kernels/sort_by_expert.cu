// Stable counting sort of the T·k routed slots by expert, and the tile table of the grouped
// GEMMs, in one block of 1024 threads (one launch, no host sync, deterministic); above
// SORT_CHUNK slots the same passes over a block per chunk (sort_count_blocks below).
//
// Warp w owns a contiguous chunk of slots. Pass 1 counts, per warp, how many of its slots go
// to each expert (__match_any_sync groups equal ids among 32 slots, so no atomics). A block scan
// turns the counts into each (expert, warp) start; pass 2 re-walks the chunks in slot order and
// gives each slot start + its rank among equal ids before it. Positions are therefore ordered by
// (expert, slot): the same ids always give the same order. Slots whose id is outside [0, E)
// (given routing from the caller) get position -1 and no row: skipped, never indexed.
//
// Outputs: expert_offsets[E + 1], sorted_slots[pos] = slot, slot_positions[slot] = pos,
// tile_expert / tile_row (one entry per block_m rows of an expert), num_tiles.
// Dynamic smem: 32 * E ints (per-warp counts, then starts). The body is common/sort.cuh.
#include "common/sort.cuh"

#define SORT_THREADS 1024

extern "C" __global__ void __launch_bounds__(SORT_THREADS)
    sort_by_expert(const int* __restrict__ topk_ids, int* __restrict__ expert_offsets, int* __restrict__ sorted_slots,
                   int* __restrict__ slot_positions, int* __restrict__ tile_expert, int* __restrict__ tile_row,
                   int* __restrict__ num_tiles, const int* num_tokens_dev, int num_tokens, int top_k,
                   int num_experts, int block_m) {
    extern __shared__ int warp_counts[];  // [SORT_THREADS / 32][E]
    begin_dependent();
    const SortParams p{topk_ids,       expert_offsets, sorted_slots, slot_positions, tile_expert, tile_row,
                       num_tiles,      num_tokens_dev, num_tokens,   top_k,          num_experts, block_m};
    sort_slots<SORT_THREADS>(p, warp_counts);  // E <= 1024 (checked at create)
}

// The same sort for many slots (Kernels::sort: more than SORT_CHUNK), over one block per
// SORT_CHUNK slots in two launches, since one block walking every slot was most of a prefill's
// routing (Qwen3 T = 8192: 133 us for 65536 slots on the H200). sort_count_blocks: block b
// counts its chunk per expert into starts[b][E] (per-warp counts, as above), then the last block
// to finish (block_arrive) turns the counts into each block's start within its expert (blocks
// in order) and writes the experts' offsets and tiles, as sort_by_expert does. sort_place_blocks:
// block b re-counts its chunk per warp, so warp w of block b starts an expert's slots at
// offset + starts[b] + the counts of the warps before it, and places them in slot order. The
// positions are the one-block sort's, bit for bit: ordered by (expert, slot).
// starts: [1 + blocks * E] ints, starts[0] the arrival counter (zero between launches).
#define SORT_CHUNK 2048

extern "C" __global__ void __launch_bounds__(SORT_THREADS) sort_count_blocks(SortParams p, int* starts) {
    extern __shared__ int warp_counts[];  // [SORT_THREADS / 32][E]
    __shared__ int scan_scratch[SORT_THREADS / 32];
    constexpr int PER_WARP = SORT_CHUNK / (SORT_THREADS / 32);
    begin_dependent();
    const int slots = token_count(p.num_tokens_dev, p.num_tokens) * p.top_k;
    const int E = p.num_experts, warp = threadIdx.x / 32;
    const int begin = blockIdx.x * SORT_CHUNK + warp * PER_WARP;
    count_warp_chunks<SORT_THREADS>(p, begin, min(slots, begin + PER_WARP), warp_counts);
    int* block_counts = starts + 1;
    const int e = threadIdx.x;  // E <= SORT_THREADS
    if (e < E) {
        int n = 0;
        for (int w = 0; w < SORT_THREADS / 32; ++w) n += warp_counts[w * E + e];
        block_counts[blockIdx.x * E + e] = n;
    }
    if (!block_arrive(starts, gridDim.x)) return;
    int expert_rows = 0, expert_tiles = 0;
    if (e < E) {
#pragma unroll 8
        for (int b = 0; b < (int)gridDim.x; ++b) {
            const int n = block_counts[b * E + e];
            block_counts[b * E + e] = expert_rows;
            expert_rows += n;
        }
        expert_tiles = (expert_rows + p.block_m - 1) / p.block_m;
    }
    int total_rows, total_tiles;
    const int row_start = block_exclusive_scan<SORT_THREADS / 32>(expert_rows, scan_scratch, &total_rows);
    const int tile_start = block_exclusive_scan<SORT_THREADS / 32>(expert_tiles, scan_scratch, &total_tiles);
    if (e < E) write_expert_tiles(p, e, row_start, tile_start, expert_tiles);
    if (threadIdx.x == 0) {
        p.expert_offsets[E] = total_rows;
        *p.num_tiles = total_tiles;
        starts[0] = 0;
    }
}

extern "C" __global__ void __launch_bounds__(SORT_THREADS) sort_place_blocks(SortParams p, const int* starts) {
    extern __shared__ int warp_counts[];  // [SORT_THREADS / 32][E]
    constexpr int PER_WARP = SORT_CHUNK / (SORT_THREADS / 32);
    begin_dependent();
    const int slots = token_count(p.num_tokens_dev, p.num_tokens) * p.top_k;
    const int E = p.num_experts, warp = threadIdx.x / 32;
    if (blockIdx.x * SORT_CHUNK >= slots) return;
    const int begin = blockIdx.x * SORT_CHUNK + warp * PER_WARP, end = min(slots, begin + PER_WARP);
    count_warp_chunks<SORT_THREADS>(p, begin, end, warp_counts);
    const int e = threadIdx.x;
    if (e < E) {
        int running = p.expert_offsets[e] + starts[1 + blockIdx.x * E + e];
        for (int w = 0; w < SORT_THREADS / 32; ++w) {
            const int n = warp_counts[w * E + e];
            warp_counts[w * E + e] = running;
            running += n;
        }
    }
    __syncthreads();
    place_warp_chunk(p, begin, end, warp_counts + warp * E);
}

// Given routing at decode (T <= 64, Kernels::given_sort_applies): given_topk's copy and the
// sort in one launch, since at that size each launch is mostly its start-up (the two were
// 5.4 us of a 38.7 us Qwen3 T = 1 forward on the H200); 256 threads when E <= 256, as the
// per-expert passes walk one count per warp. At most 32 slots (T * k) sort in one warp
// (sort_slots_warp: no block barriers).
template <int THREADS>
__device__ __forceinline__ void given_sort_impl(const GivenSlots& g, const SortParams& p) {
    extern __shared__ int given_counts[];  // not warp_counts: two extern __shared__ arrays of one name in a file conflict
    begin_dependent();
    copy_given_slots(g, (i64)token_count(p.num_tokens_dev, p.num_tokens) * p.top_k, threadIdx.x, THREADS);
    __syncthreads();  // the block's copies are visible to the block's sort
    if (token_count(p.num_tokens_dev, p.num_tokens) * p.top_k <= 32) {
        if (threadIdx.x < 32) sort_slots_warp(p, given_counts);
    } else {
        sort_slots<THREADS>(p, given_counts);
    }
}

extern "C" __global__ void __launch_bounds__(SORT_THREADS) given_sort(GivenSlots g, SortParams p) {
    given_sort_impl<SORT_THREADS>(g, p);
}

extern "C" __global__ void __launch_bounds__(256) given_sort_256(GivenSlots g, SortParams p) {
    given_sort_impl<256>(g, p);
}
