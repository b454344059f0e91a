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
#include "common/gemm_tile.cuh"
#include "common/mma.cuh"
#ifdef FDMOE_SM90A
#include "common/wgmma.cuh"
#endif

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
    i64* a_rows = (i64*)(Bs + STAGES * BN * LDS);  // [BM] A row, then its element offset; -1 = none
    i64* b_rows = a_rows + BM;                     // [BN] B row, then its element offset
    TileRange tr;
    if (!setup_tile<BM, BN, THREADS, MODE>(p, a_rows, b_rows, tr)) return;
    rows_to_offsets<BM, BN, THREADS>(p, a_rows, b_rows);
    const int K = (int)p.k;
    const u16* b_base = p.b + (i64)tr.expert * p.b_group_stride;
    // Every thread copies the same chunks each stage: their sources at k = 0 (a padding row's
    // pointing at the matrix base, zero-filled) are computed once, so a stage only adds its k
    // offset. A decode block is bound by its issued instructions, and the copies' address math
    // was most of them: hoisted, Qwen3 T = 1's two expert GEMMs went from 35.8 to 27.9 us on the
    // H200.
    constexpr int CHUNKS_PER_ROW = BK / 8;
    constexpr int A_CHUNKS = BM * CHUNKS_PER_ROW, B_CHUNKS = BN * CHUNKS_PER_ROW;
    constexpr int A_PER = (A_CHUNKS + THREADS - 1) / THREADS, B_PER = (B_CHUNKS + THREADS - 1) / THREADS;
    static_assert(A_PER + B_PER <= 32, "one zero-fill bit per chunk");
    const u16* a_src[A_PER];
    const u16* b_src[B_PER];
    u32 zero_fill = 0;  // bit n: A chunk n, bit A_PER + n: B chunk n
#pragma unroll
    for (int n = 0; n < A_PER; ++n) {
        const int i = threadIdx.x + n * THREADS;
        const i64 off = i < A_CHUNKS ? a_rows[i / CHUNKS_PER_ROW] : -1;
        a_src[n] = p.a + (off >= 0 ? off + (i % CHUNKS_PER_ROW) * 8 : 0);
        zero_fill |= (u32)(off < 0) << n;
    }
#pragma unroll
    for (int n = 0; n < B_PER; ++n) {
        const int i = threadIdx.x + n * THREADS;
        const i64 off = i < B_CHUNKS ? b_rows[i / CHUNKS_PER_ROW] : -1;
        b_src[n] = b_base + (off >= 0 ? off + (i % CHUNKS_PER_ROW) * 8 : 0);
        zero_fill |= (u32)(off < 0) << (A_PER + n);
    }
    const u32 as_base = (u32)__cvta_generic_to_shared(As), bs_base = (u32)__cvta_generic_to_shared(Bs);
    // Only a last, partial k-tile compares against K.
    auto load_a = [&](int stage, int kt) {
        const int k0 = kt * BK;
        const bool full = k0 + BK <= K;
#pragma unroll
        for (int n = 0; n < A_PER; ++n) {
            const int i = threadIdx.x + n * THREADS;
            if (A_CHUNKS % THREADS != 0 && i >= A_CHUNKS) break;
            const int kc = (i % CHUNKS_PER_ROW) * 8;
            const u32 dst = as_base + (stage * BM * LDS + (i / CHUNKS_PER_ROW) * LDS + kc) * 2;
            if (full || k0 + kc < K)
                cp_async_16_zfill(dst, a_src[n] + k0, (zero_fill >> n) & 1);
            else
                cp_async_16_zfill(dst, p.a, true);
        }
    };
    auto load_b = [&](int stage, int kt) {
        const int k0 = kt * BK;
        const bool full = k0 + BK <= K;
#pragma unroll
        for (int n = 0; n < B_PER; ++n) {
            const int i = threadIdx.x + n * THREADS;
            if (B_CHUNKS % THREADS != 0 && i >= B_CHUNKS) break;
            const int kc = (i % CHUNKS_PER_ROW) * 8;
            const u32 dst = bs_base + (stage * BN * LDS + (i / CHUNKS_PER_ROW) * LDS + kc) * 2;
            if (full || k0 + kc < K)
                cp_async_16_zfill(dst, b_src[n] + k0, (zero_fill >> (A_PER + n)) & 1);
            else
                cp_async_16_zfill(dst, b_base, true);
        }
    };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    float acc[MT][NT][4];
    zero_accumulators<MT, NT>(acc);

    cp_async_pipeline<STAGES, weights_before_wait(MODE)>((K + BK - 1) / BK, load_a, load_b, begin_dependent, [&](int stage, int) {
        const u16* as = As + stage * BM * LDS;
        const u16* bs = Bs + stage * BN * LDS;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            u32 af[MT][4];
            u32 bf[NT][2];
            load_a_fragments<MT>(af, as, LDS * 2, wm * WTM, kk * 2);
            load_b_fragments<NT>(bf, bs, LDS * 2, wn * WTN, kk * 2);
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) mma_16816(acc[i][j], af[i], bf[j]);
        }
    });

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
    i64* a_rows = (i64*)(Bs + STAGES * B_STAGE);
    i64* b_rows = a_rows + BM;
    TileRange tr;
    if (!setup_tile<BM, BN, THREADS, MODE>(p, a_rows, b_rows, tr)) return;
    rows_to_offsets<BM, BN, THREADS>(p, a_rows, b_rows);
    const int K = (int)p.k;
    const u16* b_base = p.b + (i64)tr.expert * p.b_group_stride;

    // Each thread copies the same 16-byte chunk column c of rows r0, r0 + THREADS / 8, ... every
    // stage: those rows share r % 8, so their swizzled shared addresses are one stride apart,
    // and their sources at k = 0 are set once per block (a padding row's zero-filled), so a
    // stage issues an add and a copy per chunk. Computed per chunk (a shared offset load, the
    // swizzle and K compares each), the copies were most of the loop's ~510 instructions, and
    // the 64-row tile has one warp per scheduler to issue them.
    constexpr int A_PER = BM * 8 / THREADS, B_PER = BN * 8 / THREADS;
    constexpr u32 ROW_STEP = THREADS / 8 * 128;  // bytes between a thread's chunks
    static_assert(A_PER + B_PER <= 32, "one zero-fill bit per chunk");
    const int c = threadIdx.x % 8;
    const u16* a_src[A_PER];
    const u16* b_src[B_PER];
    u32 zero_fill = 0;  // bit n: A chunk n, bit A_PER + n: B chunk n
#pragma unroll
    for (int n = 0; n < A_PER; ++n) {
        const i64 off = a_rows[threadIdx.x / 8 + n * (THREADS / 8)];
        a_src[n] = p.a + (off >= 0 ? off + c * 8 : 0);
        zero_fill |= (u32)(off < 0) << n;
    }
#pragma unroll
    for (int n = 0; n < B_PER; ++n) {
        const i64 off = b_rows[threadIdx.x / 8 + n * (THREADS / 8)];
        b_src[n] = b_base + (off >= 0 ? off + c * 8 : 0);
        zero_fill |= (u32)(off < 0) << (A_PER + n);
    }
    const u32 a_dst = (u32)__cvta_generic_to_shared(As) + swizzle_128b(threadIdx.x / 8, c);
    const u32 b_dst = (u32)__cvta_generic_to_shared(Bs) + swizzle_128b(threadIdx.x / 8, c);
    auto load_stage = [&](int stage, int k0) {
        // Only a last, partial k-tile has chunks past K: this thread's column, for all its rows.
        const bool past_k = k0 + c * 8 >= K;
#pragma unroll
        for (int n = 0; n < A_PER; ++n)
            cp_async_16_zfill(a_dst + stage * A_STAGE + n * ROW_STEP, past_k ? (const void*)p.a : a_src[n] + k0,
                              past_k || ((zero_fill >> n) & 1));
#pragma unroll
        for (int n = 0; n < B_PER; ++n)
            cp_async_16_zfill(b_dst + stage * B_STAGE + n * ROW_STEP, past_k ? (const void*)b_base : b_src[n] + k0,
                              past_k || ((zero_fill >> (A_PER + n)) & 1));
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
// Tile configs: s = decode (16 rows), d = decode at 13-24 rows per expert (32: one tile where
// 16-row tiles would read about 40% of the experts' weights twice, with as many blocks), m =
// mid (64), l = prefill (128); w = prefill with wgmma and v = 64-row wgmma (sm_90a builds
// only). Shared memory sizes and the choice are in src/backend/cuda/tiles.rs.
#define FDMOE_TILE_s 16, 64, 64, 1, 4, 4
// The up-projection of the smallest decode grids (Tile::Thin): one warp, one 16-wide column
// group (8 gate and the matching 8 up columns), 8 stages. At Qwen3 T = 1 the 16 x 64 tile
// gives GEMM 1 192 blocks on 132 SMs, so 60 SMs hold two and the rest one; 16-wide blocks are
// 768 there, 6 an SM at most, which evens the SMs' shares out. Each output's MMA chain is the
// 16 x 64 tile's, so the bits are the same. H200 (BENCHMARKS.md, eighth session): Qwen3 T = 1
// 0.5-0.8 us faster; the uneven shares were not what holds an 8-expert forward at ~2.5 TB/s.
#define FDMOE_TILE_t 16, 16, 64, 1, 1, 8
#define FDMOE_TILE_d 32, 64, 64, 2, 2, 4
#define FDMOE_TILE_m 64, 128, 32, 2, 2, 4
#define FDMOE_TILE_l 128, 128, 32, 2, 4, 4
#define FDMOE_THREADS_s 128
#define FDMOE_THREADS_t 32
#define FDMOE_THREADS_d 128
#define FDMOE_THREADS_m 128
#define FDMOE_THREADS_l 256

#define FDMOE_GEMM(tile, name, mode, act)                                                         \
    extern "C" __global__ void __launch_bounds__(FDMOE_THREADS_##tile) gemm_##tile##_##name(GemmParams p) { \
        FDMOE_BODY_##tile<FDMOE_TILE_##tile, mode, act>(                                          \
            resolve_args<!(FDMOE_WAITS_LATE_##tile && weights_before_wait(mode))>(p));               \
    }
// Bodies that call begin_dependent themselves when weights_before_wait (the mma.sync ones).
#define FDMOE_WAITS_LATE_s 1
#define FDMOE_WAITS_LATE_t 1
#define FDMOE_WAITS_LATE_d 1
#define FDMOE_WAITS_LATE_m 1
#define FDMOE_WAITS_LATE_l 1
#define FDMOE_WAITS_LATE_w 0
#define FDMOE_WAITS_LATE_v 0
#define FDMOE_BODY_s grouped_gemm_body
#define FDMOE_BODY_t grouped_gemm_body
#define FDMOE_BODY_d grouped_gemm_body
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
FDMOE_GEMM(t, up_swiglu, MODE_GATHER | MODE_GATED, FDMOE_ACT_SWIGLU)
FDMOE_GEMM(t, up_gelu_tanh, MODE_GATHER | MODE_GATED, FDMOE_ACT_GELU_TANH)
FDMOE_GEMM(t, up_swigluoai, MODE_GATHER | MODE_GATED, FDMOE_ACT_SWIGLUOAI)
FDMOE_GEMM_TILE(d)
FDMOE_GEMM_TILE(m)
FDMOE_GEMM_TILE(l)
#ifdef FDMOE_SM90A
FDMOE_GEMM_TILE(v)
FDMOE_GEMM_TILE(w)
#endif
