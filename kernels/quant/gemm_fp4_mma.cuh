// W4A16 (MXFP4 / NVFP4 weights, bf16 tokens) on mma.sync: the decode and small-prefill tiles.
#pragma once
#include "quant/fp4_decode.cuh"
#include "common/gemm_tile.cuh"

// One packed 64-column block of the stage: decode each n8 block's B fragments, scale them and
// run the MMAs of its four k16 steps. PLAIN: every scale of the warp is plain (one multiply
// per register from precomputed multipliers).
template <int FMT, int MT, int NT, bool PLAIN>
__device__ __forceinline__ void fp4_block_mma(float (*acc)[NT][4], const u16* as, int lds_bytes, int row0, int k_col,
                                              const uint2* packed, const u32* raw) {
#pragma unroll
    for (int w = 0; w < 2; ++w) {
        // Word w holds the B fragments of k16 steps 2w and 2w + 1.
        u32 bf[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j) fp4_decode_word<FMT, PLAIN>(w == 0 ? packed[j].x : packed[j].y, raw[j], w, bf[j]);
#pragma unroll
        for (int step = 0; step < 2; ++step) {
            const int kk = k_col + (2 * w + step) * 16;
            u32 af[MT][4];
            load_a_fragments<MT>(af, as, lds_bytes, row0, kk * 2);
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) mma_16816(acc[i][j], af[i], &bf[j][2 * step]);
        }
    }
}

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, int FMT, int MODE, int ACT>
__device__ __forceinline__ void grouped_gemm_fp4(const GemmParams& p) {
    constexpr int THREADS = WARPS_M * WARPS_N * 32;
    constexpr int BK = 128;        // elements per stage: two packed 64-column blocks
    constexpr int KBS = BK / 64;   // packed blocks per stage
    constexpr int LDS = BK + 8;    // padded A row (elements)
    constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;
    constexpr int MT = WTM / 16, NT = WTN / 8;
    constexpr int NB = BN / 8;
    constexpr int SCALES = FMT == FMT_MXFP4 ? 2 : 4;  // per row of a packed block
    constexpr int SBLOCK = 8 * SCALES;                 // scale bytes per packed block
    static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must be a multiple of 16x16");
    // 16-byte chunks a thread copies per stage (the same ones every stage).
    constexpr int A_CHUNKS = BM * (BK / 8), B_CHUNKS = NB * KBS * 16, S_CHUNKS = NB * KBS * (SBLOCK / 16);
    constexpr int A_PER = (A_CHUNKS + THREADS - 1) / THREADS, B_PER = (B_CHUNKS + THREADS - 1) / THREADS;
    static_assert(S_CHUNKS <= THREADS, "one scale chunk per thread at most");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* As = (u16*)smem_raw;                                            // [STAGES][BM][LDS]
    unsigned char* Bq = (unsigned char*)(As + STAGES * BM * LDS);        // [STAGES][NB][KBS][256]
    unsigned char* Sq = Bq + STAGES * NB * KBS * 256;                    // [STAGES][NB][KBS][SBLOCK]
    i64* a_rows = (i64*)(Sq + STAGES * NB * KBS * SBLOCK);
    i64* b_rows = a_rows + BM;
    TileRange tr;
    if (!setup_tile<BM, BN, THREADS, MODE>(p, a_rows, b_rows, tr)) return;
    const int K = (int)p.k;
    const int kblocks = (K + 63) / 64;
    const int k_tiles = (kblocks + KBS - 1) / KBS;
    const unsigned char* b = (const unsigned char*)p.b + (i64)tr.expert * p.b_group_stride;
    const unsigned char* bs_global = (const unsigned char*)p.b_scale + (i64)tr.expert * p.b_scale_group_stride;

    // Each thread copies the same chunks every stage. Their sources at k-tile 0, whether they
    // zero-fill (a padding row or column block, pointed at a readable address) and
    // their shared addresses are set once per block, so a stage issues an add and a copy per
    // chunk and only a last, partial k-tile compares against K (the decode is bound by issued
    // instructions: SASS of the decode tile before this, ~17 per chunk, a quarter of a stage).
    // A's sources are kept only where a thread has few chunks: the 64-row tile's 8 would cost
    // it occupancy, so it computes them per stage.
    constexpr bool HOIST_A = A_PER <= 2;
    constexpr int A_KEPT = HOIST_A ? A_PER : 1;
    constexpr u32 A_STAGE = BM * LDS * 2, B_STAGE = NB * KBS * 256, S_STAGE = NB * KBS * SBLOCK;
    const u32 as_base = (u32)__cvta_generic_to_shared(As);
    const u32 bq_base = as_base + STAGES * A_STAGE, sq_base = bq_base + STAGES * B_STAGE;
    const u16* a_src[A_KEPT];
    bool a_none[A_KEPT];
#pragma unroll
    for (int n = 0; n < A_KEPT; ++n) {
        const int i = threadIdx.x + n * THREADS;
        const i64 row = HOIST_A && i < A_CHUNKS ? a_rows[i / (BK / 8)] : -1;
        a_src[n] = p.a + (row >= 0 ? row * p.lda + (i % (BK / 8)) * 8 : 0);
        a_none[n] = row < 0;
    }
    const unsigned char* b_src[B_PER];
    bool b_none[B_PER];
#pragma unroll
    for (int n = 0; n < B_PER; ++n) {
        const int i = threadIdx.x + n * THREADS;
        const int nb = i / (KBS * 16), chunk = i % 16, kb = (i / 16) % KBS;
        const i64 row = i < B_CHUNKS ? b_rows[nb * 8] : -1;
        b_src[n] = b + (row >= 0 ? ((row / 8) * kblocks + kb) * 256 + chunk * 16 : 0);
        b_none[n] = row < 0;
    }
    const unsigned char* s_src = bs_global;
    bool s_none = true;
    if (threadIdx.x < S_CHUNKS) {
        const int i = threadIdx.x;
        const int nb = i / (KBS * (SBLOCK / 16)), chunk = i % (SBLOCK / 16), kb = (i / (SBLOCK / 16)) % KBS;
        const i64 row = b_rows[nb * 8];
        if (row >= 0) {
            s_src = bs_global + ((row / 8) * kblocks + kb) * SBLOCK + chunk * 16;
            s_none = false;
        }
    }

    // Chunk n of this thread's A copies: its source at k = 0 and whether it is a padding row.
    auto a_chunk = [&](int n, int r, int kc, const u16*& src, bool& none) {
        if constexpr (HOIST_A) {
            src = a_src[n];
            none = a_none[n];
        } else {
            const i64 row = a_rows[r];
            src = p.a + (row >= 0 ? row * p.lda + kc : 0);
            none = row < 0;
        }
    };
    // Every k-tile but a last, partial one takes the first branch of each load: one copy per
    // chunk and no compare. Tested per chunk, the K bounds (with a second, zero-filling copy
    // each) and the skipped padding rows' branches were ~30 of the decode tile's ~100 copy
    // instructions a stage; without them DeepSeek-V3's MXFP4 / NVFP4 decode is 6-8% faster
    // (H200, BENCHMARKS.md, ninth session).
    auto load_a = [&](int stage, int kt) {
        const int k0 = kt * BK;
        const bool full = k0 + BK <= K;
        // A padding row's products only reach output rows that are never stored: a whole k-tile
        // zero-fills it (no read) with the same instruction as a real row's copy, a partial one
        // skips it.
        if (full) {
#pragma unroll
            for (int n = 0; n < A_PER; ++n) {
                const int i = threadIdx.x + n * THREADS;
                if (A_CHUNKS % THREADS != 0 && i >= A_CHUNKS) break;
                const int r = i / (BK / 8), kc = (i % (BK / 8)) * 8;
                const u16* src;
                bool none;
                a_chunk(n, r, kc, src, none);
                cp_async_16_zfill(as_base + stage * A_STAGE + (r * LDS + kc) * 2, src + k0, none);
            }
            return;
        }
#pragma unroll
        for (int n = 0; n < A_PER; ++n) {
            const int i = threadIdx.x + n * THREADS;
            if (A_CHUNKS % THREADS != 0 && i >= A_CHUNKS) break;
            const int r = i / (BK / 8), kc = (i % (BK / 8)) * 8;
            const u16* src;
            bool none;
            a_chunk(n, r, kc, src, none);
            if (none) continue;
            const u32 dst = as_base + stage * A_STAGE + (r * LDS + kc) * 2;
            if (k0 + kc < K)
                cp_async_16_zfill(dst, src + k0, false);
            else
                cp_async_16_zfill(dst, p.a, true);
        }
    };
    auto load_b = [&](int stage, int kt) {
        // Each 8-column block of the tile is one packed row block (its columns are 8
        // consecutive rows of B: GATED tiles alternate 8 gate and 8 up rows).
        const int step = kt * KBS;
        const u32 s_dst = sq_base + stage * S_STAGE + threadIdx.x * 16;
        if ((kt + 1) * KBS <= kblocks) {
#pragma unroll
            for (int n = 0; n < B_PER; ++n) {
                const int i = threadIdx.x + n * THREADS;
                if (B_CHUNKS % THREADS != 0 && i >= B_CHUNKS) break;
                cp_async_16_zfill(bq_base + stage * B_STAGE + i * 16, b_src[n] + step * 256, b_none[n]);
            }
            if (threadIdx.x < S_CHUNKS) cp_async_16_zfill(s_dst, s_src + step * SBLOCK, s_none);
            return;
        }
#pragma unroll
        for (int n = 0; n < B_PER; ++n) {
            const int i = threadIdx.x + n * THREADS;
            if (B_CHUNKS % THREADS != 0 && i >= B_CHUNKS) break;
            const u32 dst = bq_base + stage * B_STAGE + i * 16;
            if (step + (i / 16) % KBS < kblocks)
                cp_async_16_zfill(dst, b_src[n] + step * 256, b_none[n]);
            else
                cp_async_16_zfill(dst, b, true);
        }
        if (threadIdx.x < S_CHUNKS) {
            const int kb = (threadIdx.x / (SBLOCK / 16)) % KBS;
            if (step + kb < kblocks)
                cp_async_16_zfill(s_dst, s_src + step * SBLOCK, s_none);
            else
                cp_async_16_zfill(s_dst, bs_global, true);
        }
    };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    // Set at load when every scale byte of the matrix is plain: no block then checks its own.
    const bool all_plain = p.b_scales_plain != 0;
    float acc[MT][NT][4];
    zero_accumulators<MT, NT>(acc);

    cp_async_pipeline<STAGES, weights_before_wait(MODE)>(k_tiles, load_a, load_b, begin_dependent, [&](int stage, int) {
        const u16* as = As + stage * BM * LDS;
        const unsigned char* bq = Bq + stage * NB * KBS * 256;
        const unsigned char* sq = Sq + stage * NB * KBS * SBLOCK;
#pragma unroll
        for (int kb = 0; kb < KBS; ++kb) {
            // This lane's 8 packed bytes and its row's scale bytes for each n-block of the warp.
            uint2 packed[NT];
            u32 raw[NT];
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int nb = (wn * WTN) / 8 + j;
                packed[j] = *(const uint2*)(bq + (nb * KBS + kb) * 256 + lane * 8);
                const unsigned char* s = sq + (nb * KBS + kb) * SBLOCK + (lane / 4) * SCALES;
                raw[j] = FMT == FMT_MXFP4 ? (u32) * (const u16*)s : *(const u32*)s;
            }
            bool plain = all_plain;
            if (!all_plain) {
                plain = true;
#pragma unroll
                for (int j = 0; j < NT; ++j) plain = plain && fp4_scales_plain<FMT>(raw[j]);
                plain = __all_sync(0xffffffffu, plain);
            }
            if (plain)
                fp4_block_mma<FMT, MT, NT, true>(acc, as, LDS * 2, wm * WTM, kb * 64, packed, raw);
            else
                fp4_block_mma<FMT, MT, NT, false>(acc, as, LDS * 2, wm * WTM, kb * 64, packed, raw);
        }
    });
    if (FMT == FMT_NVFP4) {
        const float global = p.b_global[tr.expert] * 256.0f;  // and the 2^8 left out of the scales
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[i][j][q] *= global;
    }
    const int lane_row = lane / 4;
#pragma unroll
    for (int i = 0; i < MT; ++i) store_fragment<NT, MODE, ACT>(p, tr, acc[i], wm * WTM + i * 16 + lane_row, wn * WTN);
}
