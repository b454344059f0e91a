// What the E4M3-activation wgmma tiles (W8A8, W4A8; sm_90a) share after their main loops: the
// transpose of [weight row][token] accumulators into store_fragment's layout, GEMM 1's fused
// quantization of its activations for GEMM 2, and the per-row-tile handoff that lets GEMM 2's
// blocks start on a row tile as soon as those activations are ready.
#pragma once
#ifdef FDMOE_SM90A
#include "common/block_arrive.cuh"
#include "common/gemm_tile.cuh"
#include "quant/fp8_act_groups.cuh"

// Shared bytes store_weight_row_tile needs: [tokens, at least 16][64 + 4] f32.
__host__ __device__ constexpr int weight_tile_transpose_bytes(int bt) { return (bt < 16 ? 16 : bt) * (64 + 4) * 4; }

// GEMM 1's activations quantized where the wgmma bodies make them (the f32 tile they just
// stored, read back from L2), by quantize_mx_fp8_rows' rule (MX) or quantize_fp8_rows' (else),
// so that no launch sits between the GEMMs and GEMM 2's blocks copy their first weights while
// GEMM 1 drains. An FP8_MX group (32 channels) is one block's columns; an FP8_BLOCK group (128)
// spans four column tiles of a row tile, and the last of their blocks to arrive quantizes it
// (the values are the same whoever does, so the bits do not depend on the order). A warp's
// rows are all loaded before any is quantized: one L2 round trip a block, not one a row (one
// a row cost ~20 us at Qwen3-30B-A3B T = 256, 32-row tiles), eight rows a warp at a time on
// the prefill tiles.
// BT: the tile's tokens; COLS: its gated output columns (half its weight rows); one warpgroup.
//
// The counters of a row tile of `channels` activations (`act_quant_arrivals`): FP8_BLOCK's
// arrival counter per 128-channel group, then the tile's ready count (GEMM 1's signals: one
// per FP8_BLOCK group, from its last arriver; one per FP8_MX block, each quantizing its own 32
// channels) and its consumer count, with which GEMM 2's blocks start on a row tile as soon as
// its activations are done (await_row_tile) instead of waiting for all of GEMM 1.
__device__ __forceinline__ int* act_quant_counters(const GemmParams& p, int tile, int channels) {
    return p.arrivals + (i64)tile * ((channels + 127) / 128 + 2);
}
__device__ __forceinline__ int* row_tile_ready(const GemmParams& p, int tile, int channels) {
    return act_quant_counters(p, tile, channels) + (channels + 127) / 128;
}
__host__ __device__ constexpr int row_tile_signals(bool mx, int channels) { return mx ? (channels + 31) / 32 : channels / 128; }
template <bool MX, int BT, int COLS>
__device__ __forceinline__ void quantize_gated_tile(const GemmParams& p, const TileRange& tr) {
    constexpr int WARPS = 4, ROWS_A_WARP = (BT + WARPS - 1) / WARPS;
    static_assert(MX ? COLS == 32 : 128 % COLS == 0, "a tile holds one FP8_MX group, a part of an FP8_BLOCK one");
    const int N = (int)p.n, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float* act = (const float*)p.c;
    int g;
    if (MX) {
        __syncthreads();  // the block's own stores, visible to all its threads
        g = tr.col_base / 32;
    } else {
        // 128 / COLS gated tiles make a group.
        int* counter = act_quant_counters(p, tr.tile, N) + tr.col_tile / (128 / COLS);
        if (!block_arrive(counter, 128 / COLS)) return;
        if (threadIdx.x == 0) *counter = 0;
        g = tr.col_tile / (128 / COLS);
    }
    const int channel = MX ? g * 32 + lane : g * 128 + lane * 4;
    // Up to 8 rows a warp in flight (all of them for the decode tiles).
    constexpr int BATCH = ROWS_A_WARP < 8 ? ROWS_A_WARP : 8;
#pragma unroll 1
    for (int j0 = 0; j0 < ROWS_A_WARP; j0 += BATCH) {
        float4 v[BATCH];
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
            const int r = warp + WARPS * (j0 + j);
            if (r >= tr.rows) continue;
            const float* src = act + (i64)(tr.row0 + r) * p.ldc + channel;
            if (MX) v[j].x = load_cg(src);
            else v[j] = load_cg4(src);
        }
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
            const int r = warp + WARPS * (j0 + j);
            if (r >= tr.rows) continue;
            const i64 row = tr.row0 + r, i = row * p.ldc + channel;
            if (MX) {
                quantize_mx_group(v[j].x, p.c_fp8 + i, p.c_fp8_scale + row * ((N + 127) / 128 * 4) + g, lane);
            } else {
                const float q[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
                quantize_fp8_block_group(q, p.c_fp8 + i, p.c_fp8_scale + row * (N / 128) + g, lane);
            }
        }
    }
    if (p.arrivals) signal_release_gpu(row_tile_ready(p, tr.tile, N));
}

// GEMM 2 on the wgmma tiles, in place of its dependent-launch wait: waits until GEMM 1 has
// quantized all of its row tile's activations (their signals, quantize_gated_tile). GEMM 2's
// blocks are resident only once every GEMM 1 block has been (dependent launch), so none can
// hold an SM that a GEMM 1 block still needs; and those of early row tiles stream their
// weights through GEMM 1's tail, when its last round leaves most SMs idle (bench/
// gemm_trace.py, H100 Qwen3-30B-A3B FP8 T = 16: 12 of its 105 us). Nothing GEMM 2 reads that
// GEMM 1 wrote is outside the signalled tiles; what it reads from older kernels was complete
// before GEMM 1 let it launch. It still lets its own dependents launch. Returns (to thread 0)
// the tile's consumer count before this block, which finish_row_tile reads at the block's
// end, so that the count's round trip is off the block's path.
__device__ __forceinline__ int await_row_tile(const GemmParams& p, int tile, int channels, int signals) {
    allow_dependents();
    int* ready = row_tile_ready(p, tile, channels);
    int consumed = 0;
    if (threadIdx.x == 0) {
        while (load_acquire_gpu(ready) < signals) __nanosleep(64);
        consumed = atomicAdd(ready + 1, 1);
    }
    __syncthreads();
    return consumed;
}
// The tile's last consumer (of `consumers` column tiles) zeroes its counts for the next launch.
__device__ __forceinline__ void finish_row_tile(const GemmParams& p, int tile, int channels, int consumed, int consumers) {
    if (threadIdx.x == 0 && consumed == consumers - 1) {
        int* ready = row_tile_ready(p, tile, channels);
        ready[0] = 0;
        ready[1] = 0;
    }
}

// The epilogue of the wgmma tiles whose accumulators hold [64 weight rows][BT tokens] (as every
// wgmma accumulator: warp w's rows 16w + g and + 8, tokens 8j + 2t and + 1): store_fragment takes
// [token][column] fragments, so they go through shared memory `cs` (the pipeline's buffers, free
// once its last MMAs are done).
// The router weights (GEMM 2) of the rows a thread stores there, loaded by the W8A8 body right
// after its set-up: at the store they were two dependent L2 round trips at the end of every
// block (~1 of the 10 us a Qwen3-30B-A3B T = 256 GEMM 2 block lives).
template <int BT>
struct WeightRowTileScales {
    float row[(BT < 16 ? 16 : BT) / 16][2];
};
template <int BT, int MODE>
__device__ __forceinline__ WeightRowTileScales<BT> load_weight_row_tile_scales(const GemmParams& p, const TileRange& tr) {
    WeightRowTileScales<BT> s;
#pragma unroll
    for (int half = 0; half < (BT < 16 ? 16 : BT) / 16; ++half) load_row_scales<MODE>(p, tr, 16 * half + (threadIdx.x % 32) / 4, s.row[half]);
    return s;
}
template <int BT, int MODE, int ACT>
__device__ __forceinline__ void store_weight_row_tile(const GemmParams& p, const TileRange& tr, float (*acc)[4], float* cs,
                                                      const WeightRowTileScales<BT>& scales) {
    constexpr int CLD = 64 + 4;  // conflict-free stores below
    constexpr int C_ROWS = BT < 16 ? 16 : BT;
    const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    __syncthreads();
    const int row_x = 16 * warp + g;
#pragma unroll
    for (int j = 0; j < BT / 8; ++j) {
        const int c0 = 8 * j + 2 * t;
        cs[c0 * CLD + row_x] = acc[j][0];
        cs[(c0 + 1) * CLD + row_x] = acc[j][1];
        cs[c0 * CLD + row_x + 8] = acc[j][2];
        cs[(c0 + 1) * CLD + row_x + 8] = acc[j][3];
    }
    if (BT < 16)
        for (int i = threadIdx.x; i < (16 - BT) * CLD; i += 128) cs[BT * CLD + i] = 0.0f;
    __syncthreads();
#pragma unroll
    for (int half = 0; half < C_ROWS / 16; ++half) {
        float frag[2][4];
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                for (int q = 0; q < 2; ++q)
                    frag[jj][hh * 2 + q] = cs[(16 * half + g + 8 * hh) * CLD + 16 * warp + 8 * jj + 2 * t + q];
        store_fragment<2, MODE, ACT>(p, tr, frag, 16 * half + g, 16 * warp, scales.row[half]);
    }
}
#endif
