// Stable counting sort of the T·k routed slots by expert, and the tile table of the grouped
// GEMMs, in one block of 1024 threads (one launch, no host sync, deterministic).
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
// Dynamic smem: 32 * E ints (per-warp counts, then starts).
#include "common/types.cuh"

#define SORT_THREADS 1024
#define SORT_WARPS 32

__device__ int block_exclusive_scan(int v, int* scratch, int* total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int x = v;
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int s = scratch[lane];
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        scratch[lane] = s;
    }
    __syncthreads();
    int before = warp > 0 ? scratch[warp - 1] : 0;
    *total = scratch[SORT_WARPS - 1];
    return before + x - v;
}

extern "C" __global__ void __launch_bounds__(SORT_THREADS)
    sort_by_expert(const int* __restrict__ topk_ids, int* __restrict__ expert_offsets, int* __restrict__ sorted_slots,
                   int* __restrict__ slot_positions, int* __restrict__ tile_expert, int* __restrict__ tile_row,
                   int* __restrict__ num_tiles, const int* num_tokens_dev, int num_tokens, int top_k,
                   int num_experts, int block_m) {
    extern __shared__ int warp_counts[];  // [SORT_WARPS][E]
    __shared__ int scan_scratch[SORT_WARPS];
    const int T = token_count(num_tokens_dev, num_tokens);
    const int slots = T * top_k;
    const int E = num_experts;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int chunk = ((slots + SORT_WARPS - 1) / SORT_WARPS + 31) / 32 * 32;
    const int begin = warp * chunk;
    const int end = min(slots, begin + chunk);
    int* my_counts = warp_counts + warp * E;

    for (int i = threadIdx.x; i < SORT_WARPS * E; i += SORT_THREADS) warp_counts[i] = 0;
    __syncthreads();
    for (int base = begin; base < end; base += 32) {
        const int slot = base + lane;
        const int id = slot < end ? topk_ids[slot] : -1;
        const bool valid = id >= 0 && id < E;
        const u32 peers = __match_any_sync(0xffffffffu, valid ? id : -1);
        const int leader = __ffs(peers) - 1;
        if (valid && lane == leader) my_counts[id] += __popc(peers);
        __syncwarp();
    }
    __syncthreads();

    // Per expert: total rows, then each warp's start in the sorted order; tiles of block_m rows.
    int expert_rows = 0, expert_tiles = 0;
    const int e = threadIdx.x;  // E <= 1024 (checked at create)
    if (e < E) {
        for (int w = 0; w < SORT_WARPS; ++w) expert_rows += warp_counts[w * E + e];
        expert_tiles = (expert_rows + block_m - 1) / block_m;
    }
    int total_rows, total_tiles;
    const int row_start = block_exclusive_scan(expert_rows, scan_scratch, &total_rows);
    const int tile_start = block_exclusive_scan(expert_tiles, scan_scratch, &total_tiles);
    if (e < E) {
        int running = row_start;
        for (int w = 0; w < SORT_WARPS; ++w) {
            int c = warp_counts[w * E + e];
            warp_counts[w * E + e] = running;
            running += c;
        }
        expert_offsets[e] = row_start;
        for (int i = 0; i < expert_tiles; ++i) {
            tile_expert[tile_start + i] = e;
            tile_row[tile_start + i] = row_start + i * block_m;
        }
    }
    if (threadIdx.x == 0) {
        expert_offsets[E] = total_rows;
        *num_tiles = total_tiles;
    }
    __syncthreads();

    for (int base = begin; base < end; base += 32) {
        const int slot = base + lane;
        const int id = slot < end ? topk_ids[slot] : -1;
        const bool valid = id >= 0 && id < E;
        const u32 peers = __match_any_sync(0xffffffffu, valid ? id : -1);
        const int leader = __ffs(peers) - 1;
        const int rank = __popc(peers & ((1u << lane) - 1u));
        int pos = -1;
        if (valid) {
            pos = my_counts[id] + rank;
            sorted_slots[pos] = slot;
        }
        if (slot < end) slot_positions[slot] = pos;
        __syncwarp();
        if (valid && lane == leader) my_counts[id] += __popc(peers);
        __syncwarp();
    }
}
