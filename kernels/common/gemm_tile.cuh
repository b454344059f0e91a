// The tile setup and epilogues every grouped-GEMM body shares (the BF16/F16 bodies in
// grouped_gemm.cu, the quantized ones in grouped_gemm_quant.cu): the parameter block, which
// rows and columns a block covers, and how an accumulator fragment is written out.
#pragma once
#include "common/types.cuh"
#include "common/activation.cuh"

#define MODE_GATHER 1
#define MODE_GATED 2
#define MODE_SCALE 4
#define MODE_DENSE 8
#define MODE_OUT_F32 16
#define MODE_RESIDUAL 32

// Field order and sizes match GemmParams in src/backend/cuda/kernels/params.rs (8-byte fields only).
struct GemmParams {
    const u16* a;
    i64 lda;
    const u16* b;
    i64 ldb;
    i64 b_group_stride;
    void* c;
    i64 ldc;
    const float* residual;  // [rows, N] f32 (DENSE | RESIDUAL)
    i64 ld_residual;
    i64 k;
    i64 n;                  // output columns (GATED: I, the activation columns)
    i64 up_offset;          // GATED: first up row of B (= I)
    const int* tile_expert; // grouped: tile -> expert
    const int* tile_row;    // grouped: tile -> first sorted row
    const int* num_tiles;
    const int* expert_offsets;  // [E + 1]: bounds a tile's rows to its expert
    const int* sorted_slots;    // sorted row -> slot t * top_k + j
    i64 top_k;
    const float* slot_weights;  // [T * k] router weights (SCALE)
    const int* num_tokens_dev;  // DENSE: true T
    i64 num_tokens;
    const u64* args_block;      // graph replay: a and/or c come from slots a_arg / c_arg
    i64 a_arg;                  // -1: use a
    i64 c_arg;                  // -1: use c
    // Quantized bodies only (grouped_gemm_quant.cu); a, b and strides are then in bytes.
    const float* a_scale;       // FP8_BLOCK: [rows of A, K/128] f32 activation scales
    const void* b_scale;        // per format, see grouped_gemm_quant.cu
    i64 b_scale_group_stride;   // bytes per expert
    const float* b_global;      // NVFP4: [E] f32 global scales
    i64 b_scales_plain;         // FP4: 1 when every scale byte of B is plain (fp4_scales_plain)
    // The wgmma bodies' GEMM 1 (GATED): its f32 output also as E4M3 with scales (the layouts of
    // quantize_fp8_rows / quantize_mx_fp8_rows), and FP8_BLOCK's arrival counters, one per row
    // tile per 128 output columns (zero between launches).
    unsigned char* c_fp8;
    float* c_fp8_scale;
    int* arrivals;
};

// GEMM 2 (SCALE) may copy its first weight tiles before its begin_dependent: what it reads
// until then, the sort's tile table and the argument block, was written two or more kernels
// back, complete before the previous kernel (GEMM 1) passed its own wait and so before this
// one could launch. Its activations come from GEMM 1 and are read after the wait.
__device__ constexpr bool weights_before_wait(int mode) { return (mode & MODE_SCALE) && !(mode & MODE_DENSE); }

// Resolves the operands that graph replay passes through the argument block; first, unless
// the body waits itself (WAIT false), the kernel's begin_dependent.
template <bool WAIT = true>
__device__ __forceinline__ GemmParams resolve_args(GemmParams p) {
    if (WAIT) begin_dependent();
    if (p.args_block) {
        if (p.a_arg >= 0) p.a = (const u16*)p.args_block[p.a_arg];
        if (p.c_arg >= 0) p.c = (void*)p.args_block[p.c_arg];
    }
    return p;
}

// The rows and columns one block covers, and each tile row's / column's source offset.
struct TileRange {
    int expert, row0, rows, col_base;
    int tile, col_tile;  // the block's entry of the tile table and its column tile
};

// Returns false when the block has no work (past the real T or the real tile count). Fills
// a_rows[BM] with each tile row's source row of A (the token under GATHER) and b_rows[BN] with
// each tile column's row of B; -1 where there is none.
//
// The grid is one-dimensional, column tiles fastest: a row tile's column tiles run together,
// so its rows of A are read from DRAM once and from L2 by the rest, and an expert's weights
// stream in one sweep. Row tiles fastest (the previous order) swept every expert's rows once
// per column tile, and with the weights streaming through L2 those rows were evicted between
// sweeps: H200 ncu, FP8 DeepSeek-V3 T = 256 down-projection, 3.98 GB from DRAM against 3.76 GB
// of weights.
template <int BM, int BN, int THREADS, int MODE>
__device__ __forceinline__ bool setup_tile(const GemmParams& p, i64* a_rows, i64* b_rows, TileRange& tr) {
    const int N = (int)p.n;
    constexpr int COLS = (MODE & MODE_GATED) ? BN / 2 : BN;  // output columns per tile
    const int col_tiles = (N + COLS - 1) / COLS;
    const int tile = (int)(blockIdx.x / col_tiles), col_tile = (int)(blockIdx.x % col_tiles);
    tr.tile = tile;
    tr.col_tile = col_tile;
    tr.expert = 0;
    if (MODE & MODE_DENSE) {
        const int T = token_count(p.num_tokens_dev, (int)p.num_tokens);
        tr.row0 = tile * BM;
        if (tr.row0 >= T) return false;
        tr.rows = min(BM, T - tr.row0);
    } else {
        // All three loads in one L2 round trip: the tile arrays hold max_tiles entries (the
        // grid's rows), so an index past num_tiles reads a stale entry that is never used.
        const int num_tiles = *p.num_tiles, expert = p.tile_expert[tile], row0 = p.tile_row[tile];
        if (tile >= num_tiles) return false;
        tr.expert = expert;
        tr.row0 = row0;
        tr.rows = min(BM, p.expert_offsets[tr.expert + 1] - tr.row0);
    }
    // Accumulator column c of this tile -> output column / B row.
    //   GATED: columns come in 16s: 8 gate then the matching 8 up columns.
    tr.col_base = col_tile * COLS;
    for (int r = threadIdx.x; r < BM; r += THREADS) {
        i64 off = -1;
        if (r < tr.rows) {
            const int row = tr.row0 + r;
            off = (MODE & MODE_GATHER) ? (i64)(p.sorted_slots[row] / (int)p.top_k) : (i64)row;
        }
        a_rows[r] = off;
    }
    for (int c = threadIdx.x; c < BN; c += THREADS) {
        int out_col, b_row;
        if (MODE & MODE_GATED) {
            out_col = tr.col_base + (c / 16) * 8 + (c % 8);
            b_row = out_col + ((c % 16) >= 8 ? (int)p.up_offset : 0);
        } else {
            out_col = tr.col_base + c;
            b_row = out_col;
        }
        b_rows[c] = out_col < N ? (i64)b_row : -1;
    }
    __syncthreads();
    return true;
}

// Turns setup_tile's row indices into element offsets (row * ld), so the 16-bit bodies'
// copy loops add an offset instead of multiplying per 16-byte chunk.
template <int BM, int BN, int THREADS>
__device__ __forceinline__ void rows_to_offsets(const GemmParams& p, i64* a_rows, i64* b_rows) {
    for (int r = threadIdx.x; r < BM; r += THREADS)
        if (a_rows[r] >= 0) a_rows[r] *= p.lda;
    for (int c = threadIdx.x; c < BN; c += THREADS)
        if (b_rows[c] >= 0) b_rows[c] *= p.ldb;
    __syncthreads();
}

// Writes one warp's accumulator fragment: NT blocks of 8 columns starting at tile column
// `col0`, rows `r0` and `r0 + 8` of the tile (the m16n8 / wgmma accumulator layout).
// MODE_SCALE's router weights of rows r0 and r0 + 8 (two dependent loads each), which a body
// can load before its main loop instead of at the store.
template <int MODE>
__device__ __forceinline__ void load_row_scales(const GemmParams& p, const TileRange& tr, int r0, float (&scale)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = r0 + h * 8;
        scale[h] = (MODE & MODE_SCALE) && r < tr.rows ? p.slot_weights[p.sorted_slots[tr.row0 + r]] : 1.0f;
    }
}
template <int NT, int MODE, int ACT>
__device__ __forceinline__ void store_fragment(const GemmParams& p, const TileRange& tr, float (*acc)[4], int r0, int col0,
                                               const float (&row_scale)[2]) {
    const int lane = threadIdx.x % 32;
    const int N = (int)p.n;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = r0 + h * 8;
        if (r >= tr.rows) continue;
        const int row = tr.row0 + r;
        const float scale = row_scale[h];
        if (MODE & MODE_GATED) {
            u16* out = (u16*)p.c + (i64)row * p.ldc;
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                const int col = tr.col_base + ((col0 + j * 8) / 16) * 8 + (lane % 4) * 2;
                const float a0 = gated_activation<ACT>(acc[j][h * 2], acc[j + 1][h * 2]);
                const float a1 = gated_activation<ACT>(acc[j][h * 2 + 1], acc[j + 1][h * 2 + 1]);
                if (MODE & MODE_OUT_F32) {
                    float* out32 = (float*)p.c + (i64)row * p.ldc;
                    if (col < N) out32[col] = a0;
                    if (col + 1 < N) out32[col + 1] = a1;
                } else if (col + 1 < N && ((p.ldc | col) & 1) == 0) {
                    *(u32*)(out + col) = pack_elem2(a0, a1);
                } else {
                    if (col < N) out[col] = float_to_elem(a0);
                    if (col + 1 < N) out[col + 1] = float_to_elem(a1);
                }
            }
        } else {
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int col = tr.col_base + col0 + j * 8 + (lane % 4) * 2;
                float v0 = acc[j][h * 2] * scale;
                float v1 = acc[j][h * 2 + 1] * scale;
                if (MODE & MODE_RESIDUAL) {
                    const float* res = p.residual + (i64)row * p.ld_residual;
                    if (col < N) v0 += res[col];
                    if (col + 1 < N) v1 += res[col + 1];
                }
                if (MODE & MODE_OUT_F32) {
                    float* out = (float*)p.c + (i64)row * p.ldc;
                    if (col < N) out[col] = v0;
                    if (col + 1 < N) out[col + 1] = v1;
                } else {
                    u16* out = (u16*)p.c + (i64)row * p.ldc;
                    if (col + 1 < N && ((p.ldc | col) & 1) == 0) {
                        *(u32*)(out + col) = pack_elem2(v0, v1);
                    } else {
                        if (col < N) out[col] = float_to_elem(v0);
                        if (col + 1 < N) out[col + 1] = float_to_elem(v1);
                    }
                }
            }
        }
    }
}
template <int NT, int MODE, int ACT>
__device__ __forceinline__ void store_fragment(const GemmParams& p, const TileRange& tr, float (*acc)[4], int r0, int col0) {
    float row_scale[2];
    load_row_scales<MODE>(p, tr, r0, row_scale);
    store_fragment<NT, MODE, ACT>(p, tr, acc, r0, col0, row_scale);
}
