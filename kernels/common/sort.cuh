// The stable counting sort of sort_by_expert.cu as a device function of THREADS threads, so
// the decode gate kernel's last block can run it in place of a launch (gate_logits.cu), and its
// two passes, which the multi-block sort (sort_count_blocks, sort_place_blocks) runs per block.
#pragma once
#include "common/block_arrive.cuh"

struct SortParams {
    const int* topk_ids;
    int* expert_offsets;
    int* sorted_slots;
    int* slot_positions;
    int* tile_expert;
    int* tile_row;
    int* num_tiles;
    const int* num_tokens_dev;
    int num_tokens;
    int top_k;
    int num_experts;
    int block_m;
};

// Given routing: the caller's ids and weights (graph replay: from the forward argument block)
// into the workspace and the routing record, slots begin, begin + step, ... Ids outside [0, E)
// are kept: the sort drops those slots (no work, no write).
struct GivenSlots {
    const int* ids;
    const float* weights;
    int* topk_ids;
    float* topk_weights;
    int* record_ids;
    float* record_weights;
    const u64* args_block;
};

__device__ __forceinline__ void copy_given_slots(GivenSlots g, i64 slots, i64 begin, i64 step) {
    const int* ids = forward_arg(g.args_block, ARG_TOPK_IDS, g.ids);
    const float* weights = forward_arg(g.args_block, ARG_TOPK_WEIGHTS, g.weights);
    int* record_ids = forward_arg(g.args_block, ARG_RECORD_IDS, g.record_ids);
    float* record_weights = forward_arg(g.args_block, ARG_RECORD_WEIGHTS, g.record_weights);
    for (i64 i = begin; i < slots; i += step) {
        const int id = ids[i];
        const float w = weights[i];
        g.topk_ids[i] = id;
        g.topk_weights[i] = w;
        if (record_ids) record_ids[i] = id;
        if (record_weights) record_weights[i] = w;
    }
}

template <int WARPS>
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
        int s = lane < WARPS ? scratch[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        if (lane < WARPS) scratch[lane] = s;
    }
    __syncthreads();
    int before = warp > 0 ? scratch[warp - 1] : 0;
    *total = scratch[WARPS - 1];
    return before + x - v;
}

// Expert e's row offset and its tiles of block_m rows, from its first row and first tile.
__device__ __forceinline__ void write_expert_tiles(const SortParams& p, int e, int row_start, int tile_start, int tiles) {
    p.expert_offsets[e] = row_start;
    for (int i = 0; i < tiles; ++i) {
        p.tile_expert[tile_start + i] = e;
        p.tile_row[tile_start + i] = row_start + i * p.block_m;
    }
}

// Gives the lane's slot its position: starts[id] (its expert's next free position) plus its
// rank among the warp's slots of the same id, or -1 when the id is dropped (or `in_range` is
// false: no slot). Returns the lanes that share its id.
__device__ __forceinline__ u32 place_slot(const SortParams& p, int slot, bool in_range, int id, bool valid,
                                          const int* starts) {
    const int lane = threadIdx.x % 32;
    const u32 peers = __match_any_sync(0xffffffffu, valid ? id : -1);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    int pos = -1;
    if (valid) {
        pos = starts[id] + rank;
        p.sorted_slots[pos] = slot;
    }
    if (in_range) p.slot_positions[slot] = pos;
    return peers;
}

// Pass 1 of the sort: warp w counts the slots [begin, end) of its chunk per expert into
// warp_counts[w][E] (zeroed here), __match_any_sync grouping equal ids, so no atomics.
template <int THREADS>
__device__ void count_warp_chunks(const SortParams& p, int begin, int end, int* warp_counts) {
    const int E = p.num_experts, lane = threadIdx.x % 32;
    int* my_counts = warp_counts + (threadIdx.x / 32) * E;
    for (int i = threadIdx.x; i < THREADS / 32 * E; i += THREADS) warp_counts[i] = 0;
    __syncthreads();
    for (int base = begin; base < end; base += 32) {
        const int slot = base + lane;
        const int id = slot < end ? p.topk_ids[slot] : -1;
        const bool valid = id >= 0 && id < E;
        const u32 peers = __match_any_sync(0xffffffffu, valid ? id : -1);
        const int leader = __ffs(peers) - 1;
        if (valid && lane == leader) my_counts[id] += __popc(peers);
        __syncwarp();
    }
    __syncthreads();
}

// Pass 2: the warp re-walks its chunk in slot order and places each slot at its expert's next
// position, my_counts[id] (the warp's start for that expert, advanced as slots are placed).
__device__ __forceinline__ void place_warp_chunk(const SortParams& p, int begin, int end, int* my_counts) {
    const int E = p.num_experts, lane = threadIdx.x % 32;
    for (int base = begin; base < end; base += 32) {
        const int slot = base + lane;
        const int id = slot < end ? p.topk_ids[slot] : -1;
        const bool valid = id >= 0 && id < E;
        const u32 peers = place_slot(p, slot, slot < end, id, valid, my_counts);
        __syncwarp();
        if (valid && lane == __ffs(peers) - 1) my_counts[id] += __popc(peers);
        __syncwarp();
    }
}

// warp_counts: [THREADS / 32][E] ints of shared memory. E <= THREADS (checked by the caller).
template <int THREADS>
__device__ void sort_slots(const SortParams& p, int* warp_counts) {
    constexpr int WARPS = THREADS / 32;
    __shared__ int scan_scratch[WARPS];
    const int T = token_count(p.num_tokens_dev, p.num_tokens);
    const int slots = T * p.top_k;
    const int E = p.num_experts, block_m = p.block_m;
    const int warp = threadIdx.x / 32;
    const int chunk = ((slots + WARPS - 1) / WARPS + 31) / 32 * 32;
    const int begin = warp * chunk;
    const int end = min(slots, begin + chunk);
    int* my_counts = warp_counts + warp * E;

    count_warp_chunks<THREADS>(p, begin, end, warp_counts);
    FDMOE_TRACE(8);

    // Per expert: total rows, then each warp's start in the sorted order; tiles of block_m rows.
    int expert_rows = 0, expert_tiles = 0;
    const int e = threadIdx.x;
    if (e < E) {
        for (int w = 0; w < WARPS; ++w) expert_rows += warp_counts[w * E + e];
        expert_tiles = (expert_rows + block_m - 1) / block_m;
    }
    int total_rows, total_tiles;
    const int row_start = block_exclusive_scan<WARPS>(expert_rows, scan_scratch, &total_rows);
    const int tile_start = block_exclusive_scan<WARPS>(expert_tiles, scan_scratch, &total_tiles);
    if (e < E) {
        int running = row_start;
        for (int w = 0; w < WARPS; ++w) {
            int c = warp_counts[w * E + e];
            warp_counts[w * E + e] = running;
            running += c;
        }
        write_expert_tiles(p, e, row_start, tile_start, expert_tiles);
    }
    if (threadIdx.x == 0) {
        p.expert_offsets[E] = total_rows;
        *p.num_tiles = total_tiles;
    }
    __syncthreads();
    FDMOE_TRACE(9);

    place_warp_chunk(p, begin, end, my_counts);
}

// The same sort when there are at most 32 slots (decode, T * k <= 32), by one warp: lane s
// holds slot s, so a slot's rank among equal ids is a warp vote and the per-expert starts are
// one warp scan, with no block barriers (sort_slots<256> was 1.6 us of Qwen3 T = 1's fused
// gate, most of it its barriers and two block scans). Lane l scans experts l * per ...
// (contiguous, so the lanes' sums scan in expert order). counts: E ints of shared memory.
// ids_smem: null, or the ids already in shared memory (the fused gate's picks), token t's at
// ids_smem + t * ids_stride, which spares a read of what was just written to global memory.
__device__ void sort_slots_warp(const SortParams& p, int* counts, const int* ids_smem = nullptr, int ids_stride = 0) {
    const int lane = threadIdx.x % 32;
    const int slots = token_count(p.num_tokens_dev, p.num_tokens) * p.top_k;  // <= 32
    const int E = p.num_experts, block_m = p.block_m;
    for (int e = lane; e < E; e += 32) counts[e] = 0;
    __syncwarp();
    const int id = lane >= slots ? -1
                   : ids_smem   ? ids_smem[(lane / p.top_k) * ids_stride + lane % p.top_k]
                                : p.topk_ids[lane];
    const bool valid = id >= 0 && id < E;
    if (valid) atomicAdd(&counts[id], 1);
    __syncwarp();
    FDMOE_TRACE(8);
    const int per = (E + 31) / 32, e0 = lane * per;
    int rows = 0, tiles = 0;
    for (int e = e0; e < min(E, e0 + per); ++e) {
        rows += counts[e];
        tiles += (counts[e] + block_m - 1) / block_m;
    }
    int row_start = rows, tile_start = tiles;  // inclusive scans over the lanes
    for (int o = 1; o < 32; o <<= 1) {
        const int r = __shfl_up_sync(0xffffffffu, row_start, o);
        const int t = __shfl_up_sync(0xffffffffu, tile_start, o);
        if (lane >= o) {
            row_start += r;
            tile_start += t;
        }
    }
    const int total_rows = __shfl_sync(0xffffffffu, row_start, 31);
    const int total_tiles = __shfl_sync(0xffffffffu, tile_start, 31);
    row_start -= rows;
    tile_start -= tiles;
    FDMOE_TRACE(9);
    for (int e = e0; e < min(E, e0 + per); ++e) {
        const int c = counts[e], expert_tiles = (c + block_m - 1) / block_m;
        counts[e] = row_start;  // from here on: the expert's first position
        write_expert_tiles(p, e, row_start, tile_start, expert_tiles);
        row_start += c;
        tile_start += expert_tiles;
    }
    if (lane == 0) {
        p.expert_offsets[E] = total_rows;
        *p.num_tiles = total_tiles;
    }
    __syncwarp();
    place_slot(p, lane, lane < slots, id, valid, counts);
}

