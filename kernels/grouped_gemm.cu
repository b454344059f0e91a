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
// Two main loops share the tile setup and the epilogues: an sm_80 one (mma.sync m16n8k16 from
// ldmatrix fragments) for every architecture, and on sm_90a (FDMOE_SM90A) a Hopper one where
// each warpgroup issues wgmma m64n128k16 straight from 128-byte-swizzled shared tiles.
#include "common/activation.cuh"
#include "common/mma.cuh"
#ifdef FDMOE_SM90A
#include "common/wgmma.cuh"
#endif

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
    const u64* args_block;      // graph replay: a and/or c come from slots a_arg / c_arg
    i64 a_arg;                  // -1: use a
    i64 c_arg;                  // -1: use c
};

// Resolves the operands that graph replay passes through the argument block.
__device__ __forceinline__ GemmParams resolve_args(GemmParams p) {
    if (p.args_block) {
        if (p.a_arg >= 0) p.a = (const u16*)p.args_block[p.a_arg];
        if (p.c_arg >= 0) p.c = (void*)p.args_block[p.c_arg];
    }
    return p;
}

// The rows and columns one block covers, and each tile row's / column's source offset.
struct TileRange {
    int expert, row0, rows, col_base;
};

// Returns false when the block has no work (past the real T or the real tile count).
template <int BM, int BN, int THREADS, int MODE>
__device__ __forceinline__ bool setup_tile(const GemmParams& p, i64* a_row_offset, i64* b_row_offset, TileRange& tr) {
    tr.expert = 0;
    if (MODE & MODE_DENSE) {
        const int T = token_count(p.num_tokens_dev, (int)p.num_tokens);
        tr.row0 = blockIdx.x * BM;
        if (tr.row0 >= T) return false;
        tr.rows = min(BM, T - tr.row0);
    } else {
        if ((int)blockIdx.x >= *p.num_tiles) return false;
        tr.expert = p.tile_expert[blockIdx.x];
        tr.row0 = p.tile_row[blockIdx.x];
        tr.rows = min(BM, p.expert_offsets[tr.expert + 1] - tr.row0);
    }
    const int N = (int)p.n;
    // Accumulator column c of this tile -> output column / B row.
    //   GATED: columns come in 16s: 8 gate then the matching 8 up columns.
    tr.col_base = (MODE & MODE_GATED) ? blockIdx.y * (BN / 2) : blockIdx.y * BN;
    for (int r = threadIdx.x; r < BM; r += THREADS) {
        i64 off = -1;
        if (r < tr.rows) {
            const int row = tr.row0 + r;
            off = (MODE & MODE_GATHER) ? (i64)(p.sorted_slots[row] / (int)p.top_k) * p.lda : (i64)row * p.lda;
        }
        a_row_offset[r] = off;
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
        b_row_offset[c] = out_col < N ? (i64)b_row * p.ldb : -1;
    }
    __syncthreads();
    return true;
}

// Writes one warp's accumulator fragment: NT blocks of 8 columns starting at tile column
// `col0`, rows `r0` and `r0 + 8` of the tile (the m16n8 / wgmma accumulator layout).
template <int NT, int MODE, int ACT>
__device__ __forceinline__ void store_fragment(const GemmParams& p, const TileRange& tr, float (*acc)[4], int r0, int col0) {
    const int lane = threadIdx.x % 32;
    const int N = (int)p.n;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = r0 + h * 8;
        if (r >= tr.rows) continue;
        const int row = tr.row0 + r;
        float scale = 1.0f;
        if (MODE & MODE_SCALE) scale = p.slot_weights[p.sorted_slots[row]];
        if (MODE & MODE_GATED) {
            u16* out = (u16*)p.c + (i64)row * p.ldc;
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                const int col = tr.col_base + ((col0 + j * 8) / 16) * 8 + (lane % 4) * 2;
                const float a0 = gated_activation<ACT>(acc[j][h * 2], acc[j + 1][h * 2]);
                const float a1 = gated_activation<ACT>(acc[j][h * 2 + 1], acc[j + 1][h * 2 + 1]);
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
    TileRange tr;
    if (!setup_tile<BM, BN, THREADS, MODE>(p, a_row_offset, b_row_offset, tr)) return;
    const int K = (int)p.k;
    const u16* b_base = p.b + (i64)tr.expert * p.b_group_stride;
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

    // Epilogue: warp (wm, wn) holds rows wm*WTM + i*16 + lane/4 (+8), columns wn*WTN + j*8 + ....
    const int lane_row = lane / 4;
#pragma unroll
    for (int i = 0; i < MT; ++i) store_fragment<NT, MODE, ACT>(p, tr, acc[i], wm * WTM + i * 16 + lane_row, wn * WTN);
}

#ifdef FDMOE_SM90A
// Hopper main loop: BM/64 warpgroups, each computing 64 x 256 with wgmma m64n256k16 from
// 128-byte-swizzled K-major tiles of 64 columns (one swizzle atom per row), STAGES deep. The
// MMAs of one stage run while the next stage's copies are issued: a warpgroup waits only for
// the previous stage's MMAs, and a barrier makes sure both warpgroups are past them before
// that stage's buffer is refilled.
template <int BM, int STAGES, int MODE, int ACT>
__device__ __forceinline__ void grouped_gemm_wgmma(const GemmParams& p) {
    constexpr int BN = 256, BK = 64;
    constexpr int THREADS = BM / 64 * 128;
    constexpr int A_STAGE = BM * BK * 2, B_STAGE = BN * BK * 2;  // bytes
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* base = (unsigned char*)(((size_t)smem_raw + 1023) & ~(size_t)1023);
    unsigned char* As = base;                        // [STAGES][BM rows x 128 B], swizzled
    unsigned char* Bs = base + STAGES * A_STAGE;     // [STAGES][BN rows x 128 B], swizzled
    i64* a_row_offset = (i64*)(Bs + STAGES * B_STAGE);
    i64* b_row_offset = a_row_offset + BM;
    TileRange tr;
    if (!setup_tile<BM, BN, THREADS, MODE>(p, a_row_offset, b_row_offset, tr)) return;
    const int K = (int)p.k;
    const u16* b_base = p.b + (i64)tr.expert * p.b_group_stride;

    auto load_stage = [&](int stage, int k0) {
        unsigned char* as = As + stage * A_STAGE;
        unsigned char* bs = Bs + stage * B_STAGE;
        for (int i = threadIdx.x; i < BM * 8; i += THREADS) {
            const int r = i / 8, c = i % 8, kc = c * 8;
            const i64 off = a_row_offset[r];
            const bool valid = off >= 0 && k0 + kc < K;
            cp_async_16(as + swizzle_128b(r, c), valid ? (const void*)(p.a + off + k0 + kc) : (const void*)p.a, valid);
        }
        for (int i = threadIdx.x; i < BN * 8; i += THREADS) {
            const int r = i / 8, c = i % 8, kc = c * 8;
            const i64 off = b_row_offset[r];
            const bool valid = off >= 0 && k0 + kc < K;
            cp_async_16(bs + swizzle_128b(r, c), valid ? (const void*)(b_base + off + k0 + kc) : (const void*)b_base, valid);
        }
    };

    const int warpgroup = threadIdx.x / 128;
    float acc[32][4];
#pragma unroll
    for (int j = 0; j < 32; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[j][q] = 0.0f;

    const int k_tiles = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage(s, s * BK);
        cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        fence_proxy_async();
        __syncthreads();
        const u64 da = wgmma_desc(As + (kt % STAGES) * A_STAGE + warpgroup * 64 * 128);
        const u64 db = wgmma_desc(Bs + (kt % STAGES) * B_STAGE);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) wgmma_m64n256k16(&acc[0][0], da + 2 * kk, db + 2 * kk);
        wgmma_commit();
        // This warpgroup's MMAs of stage kt-1 are done; the barrier extends that to both
        // warpgroups, so stage kt-1's buffer may be refilled while stage kt's MMAs run.
        wgmma_wait_one();
        __syncthreads();
        const int next = kt + STAGES - 1;
        if (next < k_tiles) load_stage(next % STAGES, next * BK);
        cp_async_commit();
    }
    wgmma_wait_all();
    cp_async_wait<0>();

    // Accumulator layout: warp w of a warpgroup holds rows 16w + lane/4 (+8), n8 block j.
    const int warp_in_group = (threadIdx.x % 128) / 32;
    const int lane = threadIdx.x % 32;
    store_fragment<32, MODE, ACT>(p, tr, acc, warpgroup * 64 + warp_in_group * 16 + lane / 4, 0);
}
#endif

// Entry points: one per (tile config, mode, activation). Names: gemm_<tile>_<mode>[_<act>].
// Tile configs: s = decode (16 rows), m = mid (64), l = prefill (128); w = prefill with wgmma
// and v = 64-row wgmma (sm_90a builds only). Shared memory sizes are computed in src/backend/cuda/kernels.rs.
#define FDMOE_TILE_s 16, 64, 64, 1, 4, 6
#define FDMOE_TILE_m 64, 128, 32, 2, 2, 4
#define FDMOE_TILE_l 128, 128, 32, 2, 4, 4
#define FDMOE_THREADS_s 128
#define FDMOE_THREADS_m 128
#define FDMOE_THREADS_l 256

#define FDMOE_GEMM(tile, name, mode, act)                                                         \
    extern "C" __global__ void __launch_bounds__(FDMOE_THREADS_##tile) gemm_##tile##_##name(GemmParams p) { \
        FDMOE_BODY_##tile<FDMOE_TILE_##tile, mode, act>(resolve_args(p));                         \
    }
#define FDMOE_BODY_s grouped_gemm_body
#define FDMOE_BODY_m grouped_gemm_body
#define FDMOE_BODY_l grouped_gemm_body
#define FDMOE_BODY_w grouped_gemm_wgmma
#define FDMOE_TILE_w 128, 4
#define FDMOE_THREADS_w 256
#define FDMOE_BODY_v grouped_gemm_wgmma
#define FDMOE_TILE_v 64, 4
#define FDMOE_THREADS_v 128

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
#ifdef FDMOE_SM90A
FDMOE_GEMM_TILE(v)
FDMOE_GEMM_TILE(w)
#endif
