// FP8_BLOCK on Hopper (W8A8 wgmma, sm_90a): the weights' E4M3 rows are the wgmma's A operand
// and the tokens' rows its B operand, both straight from 128-byte-swizzled shared tiles that
// cp.async fills from the checkpoint's [N, K] layout (no repack). A warpgroup computes 64
// weight rows (wgmma M) x BT tokens (N); a stage's four k32 wgmma chain into one partial (the
// tensor cores' own accumulation over 128 of K), promoted once per stage as partial *
// scale_w(row) * scale_x(token), the stage being one scale group of both — DeepGEMM's scheme.
//
// Why it is fast: the mma.sync FP8 tiles (gemm_fp8_mma.cuh, sm_89) convert every weight to f16 (F2FP) for
// two m16n8k16 MMAs per k32, ~1.1x the bytes' time at DeepSeek-V3 decode, bound by issued
// instructions; here a stage of 64 x 128 weights is four wgmma and, per thread, four 16-byte
// copies, a few for the tokens and ~2 instructions per accumulator, so the weights' stream is
// what is left (H200, DeepSeek-V3 T = 16-256: 0.50-0.52x the bf16 floor against 0.56-0.58x).
// Prefill swaps the operands (TOKENS_M: 64 tokens as wgmma M against 128 weight rows as N, so a
// thread's accumulators need two token and two weight scales, one multiply-add each to promote,
// and come out in store_fragment's [token][column] layout; two blocks share an SM, so one's
// promotion and epilogue overlap the other's MMAs). Each output's chain is the same in every tile (the
// tensor cores compute an element from its own row and column whatever N is, and whichever
// operand holds which: a GPU test compares the tiles bitwise), so tile choice changes no bit.
#pragma once
#ifdef FDMOE_SM90A
#include "common/gemm_tile.cuh"
#include "common/wgmma.cuh"
#include "quant/wgmma_epilogue.cuh"

template <int BT, int STAGES, int MODE, int ACT, bool TOKENS_M = false>
__device__ __forceinline__ void grouped_gemm_w8a8(const GemmParams& p) {
    // One warpgroup: BT = 64 tokens (wgmma M) x 128 weight rows (N) if TOKENS_M, else 64 weight
    // rows (M) x BT tokens (N). (128 weight rows x 32 tokens, two wgmma M tiles at three blocks
    // an SM, tied the 64-row tile at Qwen3-30B-A3B T = 256 on the H100: 0.228 against 0.227 ms,
    // BENCHMARKS.md twenty-third session; branch w8a8-wide-tile.)
    constexpr int THREADS = 128, BW = TOKENS_M ? 128 : 64, BK = 128;
    constexpr int NB = (TOKENS_M ? BW : BT) / 8;  // n8 blocks of the wgmma
    static_assert(!TOKENS_M || BT == 64, "tokens as M: one warpgroup's 64 rows");
    constexpr int X_STAGE = BT * BK, W_STAGE = BW * BK;  // swizzled E4M3 rows
    constexpr int X_CHUNKS = X_STAGE / 16, W_CHUNKS = W_STAGE / 16;
    constexpr int X_PER = (X_CHUNKS + THREADS - 1) / THREADS, W_PER = W_CHUNKS / THREADS;
    static_assert(BT % 8 == 0 && BT <= THREADS && W_CHUNKS % THREADS == 0, "tile shape");
    static_assert(X_STAGE % 1024 == 0, "every stage's tiles stay 1024-byte aligned");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    // Offset from smem_raw (not a rounded integer) so the compiler keeps shared loads.
    unsigned char* Xs = smem_raw + ((1024u - ((u32)__cvta_generic_to_shared(smem_raw) & 1023u)) & 1023u);  // [STAGES][X_STAGE]
    unsigned char* Ws = Xs + STAGES * X_STAGE;           // [STAGES][W_STAGE]
    float* XSs = (float*)(Ws + STAGES * W_STAGE);        // [STAGES][BT] token scales
    float* WSs = XSs + STAGES * BT;                      // [STAGES][BW] weight row scales
    i64* a_rows = (i64*)(WSs + STAGES * BW);
    i64* b_rows = a_rows + BT;
    [[maybe_unused]] constexpr int GEMM = (MODE & MODE_GATED) ? 0 : 1;  // trace stamps only
    TileRange tr;
    const bool has_work = setup_tile<BT, BW, THREADS, MODE>(p, a_rows, b_rows, tr);
    FDMOE_GEMM_STAMP(GEMM, 2);
    FDMOE_GEMM_STAMP_VALUE(GEMM, 7, sm_id() | (u64)has_work << 32 | (u64)tr.expert << 40);
    if (!has_work) return;
    [[maybe_unused]] WeightRowTileScales<BT> row_scales;
    if constexpr (!TOKENS_M) row_scales = load_weight_row_tile_scales<BT, MODE>(p, tr);
    const int groups = (int)p.k / BK;  // K is a multiple of 128 (validated at create)
    const unsigned char* x = (const unsigned char*)p.a;
    const unsigned char* b = (const unsigned char*)p.b + (i64)tr.expert * p.b_group_stride;
    const float* b_scale = (const float*)((const unsigned char*)p.b_scale + (i64)tr.expert * p.b_scale_group_stride);

    // Copy sources at group 0, shared addresses and zero-fill predicates, set once per block.
    const u32 xs_base = (u32)__cvta_generic_to_shared(Xs), ws_base = (u32)__cvta_generic_to_shared(Ws);
    const unsigned char* x_src[X_PER];
    const unsigned char* w_src[W_PER];
    u32 x_dst[X_PER], w_dst[W_PER];
    u32 zero_fill = 0;  // bit n: token chunk n, bit X_PER + n: weight chunk n
#pragma unroll
    for (int n = 0; n < X_PER; ++n) {
        const int i = threadIdx.x + n * THREADS;
        const i64 row = i < X_CHUNKS ? a_rows[i / 8] : -1;
        x_src[n] = x + (row >= 0 ? row * p.lda + (i % 8) * 16 : 0);
        x_dst[n] = xs_base + swizzle_128b(i / 8, i % 8);
        zero_fill |= (u32)(row < 0) << n;
    }
#pragma unroll
    for (int n = 0; n < W_PER; ++n) {
        const int i = threadIdx.x + n * THREADS;
        const i64 row = b_rows[i / 8];
        w_src[n] = b + (row >= 0 ? row * p.ldb + (i % 8) * 16 : 0);
        w_dst[n] = ws_base + swizzle_128b(i / 8, i % 8);
        zero_fill |= (u32)(row < 0) << (X_PER + n);
    }
    const float* sx_src = nullptr;
    const float* sw_src = nullptr;
    if (threadIdx.x < BT && a_rows[threadIdx.x] >= 0) sx_src = p.a_scale + a_rows[threadIdx.x] * groups;
    if (threadIdx.x < BW && b_rows[threadIdx.x] >= 0) sw_src = b_scale + (b_rows[threadIdx.x] / 64) * groups;

    auto load_tokens = [&](int stage, int kt) {
        const int k0 = kt * BK;
#pragma unroll
        for (int n = 0; n < X_PER; ++n) {
            if (X_CHUNKS % THREADS != 0 && threadIdx.x + n * THREADS >= X_CHUNKS) break;
            cp_async_16_zfill(x_dst[n] + stage * X_STAGE, x_src[n] + k0, (zero_fill >> n) & 1);
        }
        if (threadIdx.x < BT)
            cp_async_4(XSs + stage * BT + threadIdx.x, sx_src ? (const void*)(sx_src + kt) : (const void*)p.a_scale, sx_src != nullptr);
    };
    auto load_weights = [&](int stage, int kt) {
        const int k0 = kt * BK;
#pragma unroll
        for (int n = 0; n < W_PER; ++n)
            cp_async_16_zfill(w_dst[n] + stage * W_STAGE, w_src[n] + k0, (zero_fill >> (X_PER + n)) & 1);
        if (threadIdx.x < BW)
            cp_async_4(WSs + stage * BW + threadIdx.x, sw_src ? (const void*)(sw_src + kt) : (const void*)b_scale, sw_src != nullptr);
    };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    float acc[NB][4];
    zero_accumulators<1, NB>(&acc);

    // A stage's four k32 wgmma, chained into `part` (committed as one group).
    auto issue = [&](int stage, float* part) {
        const u64 w_desc = wgmma_desc(Ws + stage * W_STAGE), x_desc = wgmma_desc(Xs + stage * X_STAGE);
        const u64 a_desc = TOKENS_M ? x_desc : w_desc, b_desc = TOKENS_M ? w_desc : x_desc;
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < 4; ++s) wgmma_e4m3_ss<NB>(part, a_desc + 2 * s, b_desc + 2 * s, s > 0);  // +32 bytes: k + 32
        wgmma_commit();
    };
    // The stage's partial, once its group is done, promoted with its row and token scales.
    auto promote = [&](int stage, float* part) {
#pragma unroll
        for (int q = 0; q < NB * 4; ++q) wgmma_keep(part[q]);
        const float* sw = WSs + stage * BW;
        const float* sx = XSs + stage * BT;
        if constexpr (TOKENS_M) {
            // Rows are tokens 16 warp + g and + 8; an n8 block's weight rows share one scale,
            // and the tile has two: gate / up rows (alternate n8 blocks) or its two 64-row
            // halves. The products are the decode tiles' (weight scale * token scale).
            const float x0 = sx[16 * warp + g], x1 = sx[16 * warp + g + 8];
            const float s0 = sw[0], s1 = sw[(MODE & MODE_GATED) ? 8 : 64];
#pragma unroll
            for (int j = 0; j < NB; ++j) {
                const float w = ((MODE & MODE_GATED) ? (j & 1) : (j >= NB / 2)) ? s1 : s0;
                acc[j][0] += part[4 * j + 0] * (w * x0);
                acc[j][1] += part[4 * j + 1] * (w * x0);
                acc[j][2] += part[4 * j + 2] * (w * x1);
                acc[j][3] += part[4 * j + 3] * (w * x1);
            }
        } else {
            // Rows are weight rows 16 warp + g and + 8, columns tokens.
            const float w0 = sw[16 * warp + g], w1 = sw[16 * warp + g + 8];
#pragma unroll
            for (int j = 0; j < NB; ++j) {
                const float x0 = sx[8 * j + 2 * t], x1 = sx[8 * j + 2 * t + 1];
                acc[j][0] += part[4 * j + 0] * (w0 * x0);
                acc[j][1] += part[4 * j + 1] * (w0 * x1);
                acc[j][2] += part[4 * j + 2] * (w1 * x0);
                acc[j][3] += part[4 * j + 3] * (w1 * x1);
            }
        }
    };

    const bool handoff = !(MODE & MODE_GATED) && p.arrivals;
    int consumed = 0;
    auto wait_previous = [&] {
        if (handoff)
            consumed = await_row_tile(p, tr.tile, (int)p.k, row_tile_signals(false, (int)p.k));
        else
            begin_dependent();
        FDMOE_GEMM_STAMP(GEMM, 1);
    };
    cp_async_pipeline<STAGES, weights_before_wait(MODE), true>(groups, load_tokens, load_weights, wait_previous,
                                                               [&](int stage, int t) {
                                                                   if (t == 0) FDMOE_GEMM_STAMP(GEMM, 3);
                                                                   float part[NB * 4];
                                                                   issue(stage, part);
                                                                   wgmma_wait_all();
                                                                   promote(stage, part);
                                                               });
    FDMOE_GEMM_STAMP(GEMM, 4);
    if constexpr (TOKENS_M) {
        store_fragment<NB, MODE, ACT>(p, tr, acc, 16 * warp + g, 0);
    } else {
        // The transpose takes the token and weight buffers (contiguous), free after the last MMA.
        static_assert(weight_tile_transpose_bytes(BT) <= STAGES * (X_STAGE + W_STAGE), "transpose fits the tiles' buffers");
        store_weight_row_tile<BT, MODE, ACT>(p, tr, acc, (float*)Xs, row_scales);
    }
    FDMOE_GEMM_STAMP(GEMM, 5);
    if constexpr ((MODE & MODE_GATED) != 0) quantize_gated_tile<false, BT, BW / 2>(p, tr);
    if (handoff) finish_row_tile(p, tr.tile, (int)p.k, consumed, ((int)p.n + BW - 1) / BW);
    FDMOE_GEMM_STAMP(GEMM, 6);
}
#endif
