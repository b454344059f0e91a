// Grouped GEMM over expert-sorted rows: C[r, n] = sum_k A[row(r), k] * B_e[n, k], f32 accumulate,
// with the MoE epilogues fused in. One kernel body serves every GEMM of the forward:
//   - GEMM 1 (GATHER | GATED): A rows gathered from the tokens (sorted slot / k), B = W13[e]
//     [2I, L] read as gate and up rows side by side, so one tile holds matching gate and up
//     columns and the epilogue writes act(g) * v (bf16/f16) without a round trip through memory;
//   - GEMM 2 (SCALE): A = activations in sorted order, B = W2[e] [L, I]; the epilogue multiplies
//     by the router weight of the row's slot;
//   - dense GEMMs (DENSE: fc1, fc2, shared experts): one group, rows are tokens, optional f32
//     output and an f32 residual added before the single rounding.
// Layouts: A rows are K-contiguous (row stride lda), B is [N, K] K-contiguous per group
// (row stride ldb, group stride b_group_stride) — the TORCH layout, so weights need no repack.
// K must be a multiple of 8 (16-byte rows); N, I and the number of rows are arbitrary.
//
// Why it is fast enough: tiles of BM x BN with BK-deep stages streamed by cp.async (STAGES in
// flight), ldmatrix into tensor-core m16n8k16 MMAs, padded shared rows (no bank conflicts), and
// a device-side tile table (from sort_by_expert) so blocks past the real work exit at once —
// no host sync and graph-safe. Decode uses BM = 16 so a token row does not pay for 64.
// The body is plain sm_80 PTX; a wgmma/TMA body for sm_90a can replace `mainloop` alone.
#include "common/activation.cuh"
#include "common/mma.cuh"

#define MODE_GATHER 1
#define MODE_GATED 2
#define MODE_SCALE 4
#define MODE_DENSE 8
#define MODE_OUT_F32 16
#define MODE_RESIDUAL 32

// Field order and sizes match GemmParams in src/backend/cuda/kernels.rs (8-byte fields only).
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
};

template <int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES, int MODE, int ACT>
__device__ __forceinline__ void grouped_gemm_body(const GemmParams& p) {
    constexpr int THREADS = WARPS_M * WARPS_N * 32;
    constexpr int WTM = BM / WARPS_M;
    constexpr int WTN = BN / WARPS_N;
    constexpr int MT = WTM / 16;
    constexpr int NT = WTN / 8;
    constexpr int LDS = BK + 8;  // padded shared row (elements): conflict-free ldmatrix
    static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must be a multiple of 16x16");
    static_assert(BK % 16 == 0, "BK must be a multiple of 16");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* As = (u16*)smem_raw;                  // [STAGES][BM][LDS]
    u16* Bs = As + STAGES * BM * LDS;          // [STAGES][BN][LDS]
    i64* a_row_offset = (i64*)(Bs + STAGES * BN * LDS);  // [BM] element offset of each A row, -1 = none
    i64* b_row_offset = a_row_offset + BM;               // [BN]

    // Which rows this tile covers.
    int expert = 0, row0, rows;
    if (MODE & MODE_DENSE) {
        const int T = token_count(p.num_tokens_dev, (int)p.num_tokens);
        row0 = blockIdx.x * BM;
        if (row0 >= T) return;
        rows = min(BM, T - row0);
    } else {
        if ((int)blockIdx.x >= *p.num_tiles) return;
        expert = p.tile_expert[blockIdx.x];
        row0 = p.tile_row[blockIdx.x];
        rows = min(BM, p.expert_offsets[expert + 1] - row0);
    }
    const int K = (int)p.k;
    const int N = (int)p.n;
    // Accumulator column c of this tile -> output column / B row.
    //   GATED: columns come in 16s: 8 gate then the matching 8 up columns.
    const int col_base = (MODE & MODE_GATED) ? blockIdx.y * (BN / 2) : blockIdx.y * BN;

    for (int r = threadIdx.x; r < BM; r += THREADS) {
        i64 off = -1;
        if (r < rows) {
            const int row = row0 + r;
            if (MODE & MODE_GATHER) {
                off = (i64)(p.sorted_slots[row] / (int)p.top_k) * p.lda;
            } else {
                off = (i64)row * p.lda;
            }
        }
        a_row_offset[r] = off;
    }
    const u16* b_base = p.b + (i64)expert * p.b_group_stride;
    for (int c = threadIdx.x; c < BN; c += THREADS) {
        int out_col, b_row;
        if (MODE & MODE_GATED) {
            out_col = col_base + (c / 16) * 8 + (c % 8);
            b_row = out_col + ((c % 16) >= 8 ? (int)p.up_offset : 0);
        } else {
            out_col = col_base + c;
            b_row = out_col;
        }
        b_row_offset[c] = out_col < N ? (i64)b_row * p.ldb : -1;
    }
    __syncthreads();

    auto load_stage = [&](int stage, int k0) {
        constexpr int A_CHUNKS = BM * BK / 8;
        constexpr int B_CHUNKS = BN * BK / 8;
        u16* as = As + stage * BM * LDS;
        u16* bs = Bs + stage * BN * LDS;
        for (int i = threadIdx.x; i < A_CHUNKS; i += THREADS) {
            const int r = i / (BK / 8), kc = (i % (BK / 8)) * 8;
            const i64 off = a_row_offset[r];
            const bool valid = off >= 0 && k0 + kc < K;
            cp_async_16(as + r * LDS + kc, valid ? (const void*)(p.a + off + k0 + kc) : (const void*)p.a, valid);
        }
        for (int i = threadIdx.x; i < B_CHUNKS; i += THREADS) {
            const int c = i / (BK / 8), kc = (i % (BK / 8)) * 8;
            const i64 off = b_row_offset[c];
            const bool valid = off >= 0 && k0 + kc < K;
            cp_async_16(bs + c * LDS + kc, valid ? (const void*)(b_base + off + k0 + kc) : (const void*)b_base, valid);
        }
    };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

    const int k_tiles = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage(s, s * BK);
        cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = kt + STAGES - 1;
        if (next < k_tiles) load_stage(next % STAGES, next * BK);
        cp_async_commit();
        const u16* as = As + (kt % STAGES) * BM * LDS;
        const u16* bs = Bs + (kt % STAGES) * BN * LDS;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            u32 af[MT][4];
            u32 bf[NT][2];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int r = wm * WTM + i * 16 + (lane % 16);
                ldmatrix_x4(af[i], as + r * LDS + kk + (lane / 16) * 8);
            }
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                // x4: n-block j (k 0-7, 8-15) then n-block j+1.
                const int c = wn * WTN + j * 8 + (lane % 8) + (lane / 16) * 8;
                const int kc = kk + ((lane / 8) % 2) * 8;
                u32 r4[4];
                ldmatrix_x4(r4, bs + c * LDS + kc);
                bf[j][0] = r4[0];
                bf[j][1] = r4[1];
                bf[j + 1][0] = r4[2];
                bf[j + 1][1] = r4[3];
            }
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) mma_16816(acc[i][j], af[i], bf[j]);
        }
    }
    cp_async_wait<0>();

    // Epilogue. Accumulator (i, j, q): row wm*WTM + i*16 + lane/4 + (q >= 2 ? 8 : 0),
    // column wn*WTN + j*8 + (lane%4)*2 + (q & 1).
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = wm * WTM + i * 16 + lane / 4 + h * 8;
            if (r >= rows) continue;
            const int row = row0 + r;
            float scale = 1.0f;
            if (MODE & MODE_SCALE) scale = p.slot_weights[p.sorted_slots[row]];
            if (MODE & MODE_GATED) {
                u16* out = (u16*)p.c + (i64)row * p.ldc;
#pragma unroll
                for (int j = 0; j < NT; j += 2) {
                    const int col = col_base + ((wn * WTN + j * 8) / 16) * 8 + (lane % 4) * 2;
                    const float a0 = gated_activation<ACT>(acc[i][j][h * 2], acc[i][j + 1][h * 2]);
                    const float a1 = gated_activation<ACT>(acc[i][j][h * 2 + 1], acc[i][j + 1][h * 2 + 1]);
                    if (col + 1 < N && ((p.ldc | col) & 1) == 0) {
                        *(u32*)(out + col) = pack_elem2(a0, a1);
                    } else {
                        if (col < N) out[col] = float_to_elem(a0);
                        if (col + 1 < N) out[col + 1] = float_to_elem(a1);
                    }
                }
            } else {
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    const int col = col_base + wn * WTN + j * 8 + (lane % 4) * 2;
                    float v0 = acc[i][j][h * 2] * scale;
                    float v1 = acc[i][j][h * 2 + 1] * scale;
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
}

template <int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES>
constexpr int gemm_smem_bytes() {
    return STAGES * (BM + BN) * (BK + 8) * 2 + (BM + BN) * 8;
}

// Entry points: one per (tile config, mode, activation). Names: gemm_<tile>_<mode>[_<act>].
// Tile configs: s = decode (16 rows), m = mid (64), l = prefill (128).
#define FDMOE_TILE_s 16, 128, 64, 1, 4, 4
#define FDMOE_TILE_m 64, 128, 32, 2, 2, 4
#define FDMOE_TILE_l 128, 128, 32, 2, 4, 4
#define FDMOE_THREADS_s 128
#define FDMOE_THREADS_m 128
#define FDMOE_THREADS_l 256

#define FDMOE_GEMM(tile, name, mode, act)                                                         \
    extern "C" __global__ void __launch_bounds__(FDMOE_THREADS_##tile) gemm_##tile##_##name(GemmParams p) { \
        grouped_gemm_body<FDMOE_TILE_##tile, mode, act>(p);                                       \
    }

#define FDMOE_GEMM_TILE(tile)                                                                      \
    FDMOE_GEMM(tile, up_swiglu, MODE_GATHER | MODE_GATED, FDMOE_ACT_SWIGLU)                         \
    FDMOE_GEMM(tile, up_gelu_tanh, MODE_GATHER | MODE_GATED, FDMOE_ACT_GELU_TANH)                   \
    FDMOE_GEMM(tile, up_swigluoai, MODE_GATHER | MODE_GATED, FDMOE_ACT_SWIGLUOAI)                   \
    FDMOE_GEMM(tile, down_scaled, MODE_SCALE, 0)                                                    \
    FDMOE_GEMM(tile, dense, MODE_DENSE, 0)                                                          \
    FDMOE_GEMM(tile, dense_f32, MODE_DENSE | MODE_OUT_F32, 0)                                       \
    FDMOE_GEMM(tile, dense_residual, MODE_DENSE | MODE_RESIDUAL, 0)                                 \
    FDMOE_GEMM(tile, dense_swiglu, MODE_DENSE | MODE_GATED, FDMOE_ACT_SWIGLU)                       \
    FDMOE_GEMM(tile, dense_gelu_tanh, MODE_DENSE | MODE_GATED, FDMOE_ACT_GELU_TANH)                 \
    FDMOE_GEMM(tile, dense_swigluoai, MODE_DENSE | MODE_GATED, FDMOE_ACT_SWIGLUOAI)

FDMOE_GEMM_TILE(s)
FDMOE_GEMM_TILE(m)
FDMOE_GEMM_TILE(l)
