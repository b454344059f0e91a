// MXFP4 weights x FP8 activations (act_quant = FP8_MX, sm_90a): W4A8 on the FP8 tensor cores.
// The activations are E4M3 by the pre-dispatch rule, each scale stored as an f32 times 2^6:
// GEMM 1's with one scale per 128 channels (quantize_mx_fp8_rows re-expresses a 128's four
// exponents at the largest), GEMM 2's with one per 32 (GEMM 1's epilogue); the weights MXFP4
// repacked at load into the FP4 blocks of fp4_decode.cuh (8 rows x 64 columns, 256 bytes, scales
// [8 rows][2] UE8M0) with each lane's 8 bytes of a block holding its wgmma A-fragment codes, and
// the blocks of a tile's k-tile consecutive (src/backend/cuda/quant_weights.rs, tile_w4a8), so
// that one thread copies a stage's weights with two bulk copies (TMA) that complete on the
// stage's mbarrier. A warpgroup computes 64 weight rows (wgmma M) x BT tokens (N) from the
// weights decoded in registers and the tokens in 128-byte-swizzled shared rows; since the weights
// have a scale per 32 of K, each k32 wgmma sums into a fresh partial, promoted into the accumulator as
// partial * scale_w(row) * scale_x(token) (GEMM 2), or in GEMM 1 as the sum of a stage's four
// partial * scale_w(row) times its one scale_x(token).
//
// Why it is fast: an E2M1 code becomes an E4M3 byte by moving bits (its sign, exponent and
// mantissa bits at E4M3's sign and lowest exponent / highest mantissa bits give the value times
// 2^-6, exactly, subnormal 0.5 included), so a packed word of 8 codes is 4 bytes of the
// fragment by a mask and 4 by two shifts and two masks, with no scale multiply on the weights:
// ~5 instructions per 8 weights where the W4A16 decode needs ~15 and twice the MMAs. What is
// left per weight is the promotion (GEMM 2: a multiply and an FMA per accumulator per k32;
// GEMM 1: an FMA, and one more per stage), which grows with the token tile, hence three of
// them. SASS of the 8-token tile with a scale per 32 of both: ~165 instructions a stage of 64
// weights a lane (W4A16: ~232); H200, DeepSeek-V3 T = 16 / 64 at 0.30x / 0.31x the bf16 floor
// against W4A16's 0.40x (BENCHMARKS.md, tenth session), but at 16 rows per expert
// (Qwen3-30B-A3B T = 256) slower than W4A16 (0.211 against 0.189 ms) until GEMM 1's token
// scales went to one per 128 (H100: 0.194 -> 0.187 ms, twenty-sixth session).
// Decoding tile kt + 1's weights while tile kt's wgmma run (a second fragment set) was 2-18 us
// slower on the H100 at Qwen3-30B-A3B T = 16-256 (branch w4a8-overlap, BENCHMARKS.md
// twenty-fifth session): the MMAs' latency is not what bounds it.
#pragma once
#ifdef FDMOE_SM90A
#include "common/gemm_tile.cuh"
#include "common/wgmma.cuh"
#include "quant/wgmma_epilogue.cuh"

// Bytes 0-3 of the fragment register at word bits 8i + {7, 4, 3, 2} (sign, e1, e0, m): a mask.
__device__ __forceinline__ u32 e2m1x4_low_to_e4m3(u32 w) { return w & 0x9C9C9C9Cu; }
// The word's other 4 codes, at bits 8i + {5, 6, 1, 0}: 5, 1, 0 move up by 2, 6 down by 2.
__device__ __forceinline__ u32 e2m1x4_high_to_e4m3(u32 w) { return ((w << 2) & 0x8C8C8C8Cu) | ((w >> 2) & 0x10101010u); }

template <int BT, int STAGES, int MODE, int ACT>
__device__ __forceinline__ void grouped_gemm_w4a8(const GemmParams& p) {
    constexpr int THREADS = 128, BW = 64, BK = 128, KBS = BK / 64;
    constexpr int NB = BT / 8;  // n8 token blocks of a wgmma
    constexpr int X_STAGE = BT * 128;             // tokens: 128-byte swizzled E4M3 rows
    constexpr int W_STAGE = (BW / 8) * KBS * 256;  // packed weights
    constexpr int S_STAGE = (BW / 8) * KBS * 16;   // weight scales
    // GEMM 1's tokens have one scale per 128 of K (quantize_mx_fp8_rows), GEMM 2's one per 32.
    constexpr bool X128 = (MODE & MODE_GATED) != 0;
    constexpr int XS_STAGE = BT * (X128 ? 4 : 16);  // token scales (f32)
    constexpr int X_CHUNKS = X_STAGE / 16;
    constexpr int X_PER = (X_CHUNKS + THREADS - 1) / THREADS;
    static_assert(BT % 8 == 0 && BT <= 32 && BT <= THREADS, "tile shape");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    // Offset from smem_raw (not a rounded integer) so the compiler keeps shared loads.
    unsigned char* Xs = smem_raw + ((1024u - ((u32)__cvta_generic_to_shared(smem_raw) & 1023u)) & 1023u);  // [STAGES][X_STAGE]
    unsigned char* Wq = Xs + STAGES * X_STAGE;         // [STAGES][8 blocks][KBS][256]
    unsigned char* Sq = Wq + STAGES * W_STAGE;         // [STAGES][8 blocks][KBS][16]
    float* XSs = (float*)(Sq + STAGES * S_STAGE);      // [STAGES][BT][1 or 4]
    u64* bars = (u64*)((unsigned char*)XSs + STAGES * XS_STAGE);  // [STAGES]: the weights' copies
    i64* a_rows = (i64*)(bars + STAGES);
    i64* b_rows = a_rows + BT;
    TileRange tr;
    if (!setup_tile<BT, BW, THREADS, MODE>(p, a_rows, b_rows, tr)) return;
    const int K = (int)p.k;
    const int k_tiles = (K + BK - 1) / BK;
    const int xs_ld = k_tiles * (X128 ? 1 : 4);  // token scales per row (GEMM 2's padded to whole k-tiles)
    const unsigned char* x = (const unsigned char*)p.a;
    const unsigned char* b = (const unsigned char*)p.b + (i64)tr.expert * p.b_group_stride;
    const unsigned char* bs_global = (const unsigned char*)p.b_scale + (i64)tr.expert * p.b_scale_group_stride;

    // Copy sources at k-tile 0 and shared addresses, set once per block (see grouped_gemm_fp4).
    const u32 xs_base = (u32)__cvta_generic_to_shared(Xs), xss_base = (u32)__cvta_generic_to_shared(XSs);
    const u32 wq_base = (u32)__cvta_generic_to_shared(Wq), sq_base = (u32)__cvta_generic_to_shared(Sq);
    // The weights: the repack put a tile's k-tile (its 8 row blocks' 2 column blocks, and their
    // scales) in one run each, so one thread bulk-copies a stage with two instructions.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const i64 w_run = ((i64)(tr.col_base / ((MODE & MODE_GATED) ? BW / 2 : BW)) * k_tiles) * W_STAGE;
    const unsigned char* w_src = b + w_run;
    const unsigned char* s_src = bs_global + w_run / (W_STAGE / S_STAGE);
    const u32 bar_base = (u32)__cvta_generic_to_shared(bars);
    if (threadIdx.x == 0)
        for (int s = 0; s < STAGES; ++s) mbarrier_init(bar_base + 8 * s, 1);
    fence_mbarrier_init();
    __syncthreads();
    const unsigned char* x_src[X_PER];
    bool x_none[X_PER];
    u32 x_dst[X_PER];
#pragma unroll
    for (int n = 0; n < X_PER; ++n) {
        const int i = threadIdx.x + n * THREADS;
        const int r = i / 8, c = i % 8;
        const i64 row = i < X_CHUNKS ? a_rows[r] : -1;
        x_src[n] = x + (row >= 0 ? row * p.lda + c * 16 : 0);
        x_none[n] = row < 0;
        x_dst[n] = xs_base + swizzle_128b(r, c);
    }
    const float* xs_src = p.a_scale;
    bool xs_none = true;
    if (threadIdx.x < BT && a_rows[threadIdx.x] >= 0) {
        xs_src = p.a_scale + a_rows[threadIdx.x] * xs_ld;
        xs_none = false;
    }

    // Every k-tile but a last, partial one takes the first branch of each: one copy per chunk,
    // no compare (as grouped_gemm_fp4's loads).
    auto load_tokens = [&](int stage, int kt) {
        const int k0 = kt * BK;
        if (X128) {
            if (threadIdx.x < BT) cp_async_4(XSs + stage * BT + threadIdx.x, xs_src + kt, !xs_none);
        } else if (threadIdx.x < BT) {
            cp_async_16_zfill(xss_base + stage * XS_STAGE + threadIdx.x * 16, xs_src + kt * 4, xs_none);
        }
        if (k0 + BK <= K) {
#pragma unroll
            for (int n = 0; n < X_PER; ++n) {
                if (X_CHUNKS % THREADS != 0 && threadIdx.x + n * THREADS >= X_CHUNKS) break;
                cp_async_16_zfill(x_dst[n] + stage * X_STAGE, x_src[n] + k0, x_none[n]);
            }
            return;
        }
#pragma unroll
        for (int n = 0; n < X_PER; ++n) {
            const int i = threadIdx.x + n * THREADS;
            if (X_CHUNKS % THREADS != 0 && i >= X_CHUNKS) break;
            // K is a multiple of 32: a chunk is wholly inside or past it.
            const bool past_k = k0 + (i % 8) * 16 >= K;
            cp_async_16_zfill(x_dst[n] + stage * X_STAGE, past_k ? (const void*)x : x_src[n] + k0, past_k || x_none[n]);
        }
    };
    auto load_weights = [&](int stage, int kt) {
        if (threadIdx.x != 0) return;
        const u32 bar = bar_base + 8 * stage;
        mbarrier_arrive_expect_tx(bar, W_STAGE + S_STAGE);
        bulk_copy_to_shared(wq_base + stage * W_STAGE, w_src + kt * W_STAGE, W_STAGE, bar);
        bulk_copy_to_shared(sq_base + stage * S_STAGE, s_src + kt * S_STAGE, S_STAGE, bar);
    };

    const int g = lane / 4, t = lane % 4;
    float acc[NB][4];
    zero_accumulators<1, NB>(&acc);

    u32 parity = 0;  // bit s: the phase of stage s's barrier to wait for
    auto compute = [&](int stage) {
        mbarrier_wait(bar_base + 8 * stage, (parity >> stage) & 1);
        parity ^= 1u << stage;
        // This warp's 16 weight rows are packed blocks 2w (fragment rows g) and 2w + 1 (g + 8).
        const unsigned char* wq = Wq + stage * W_STAGE;
        const unsigned char* sq = Sq + stage * S_STAGE;
        u32 a[4][4];  // k32 step s = 2 kb + word
        u32 sw[2][KBS];  // scale bytes of rows g / g + 8, per kb: steps 2 kb, 2 kb + 1
#pragma unroll
        for (int kb = 0; kb < KBS; ++kb) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint2 q = *(const uint2*)(wq + ((2 * warp + h) * KBS + kb) * 256 + lane * 8);
                a[2 * kb][h] = e2m1x4_low_to_e4m3(q.x);
                a[2 * kb][h + 2] = e2m1x4_high_to_e4m3(q.x);
                a[2 * kb + 1][h] = e2m1x4_low_to_e4m3(q.y);
                a[2 * kb + 1][h + 2] = e2m1x4_high_to_e4m3(q.y);
                sw[h][kb] = *(const u16*)(sq + ((2 * warp + h) * KBS + kb) * 16 + g * 2);
            }
        }
        const u64 desc = wgmma_desc(Xs + stage * X_STAGE);
        float part[4][NB * 4];
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < 4; ++s) wgmma_e4m3_rs<NB>(part[s], a[s], desc + 2 * s);  // +32 bytes: k + 32
        wgmma_commit();
        wgmma_wait_all();
#pragma unroll
        for (int s = 0; s < 4; ++s) {
#pragma unroll
            for (int q = 0; q < 4; ++q) wgmma_keep(a[s][q]);
#pragma unroll
            for (int q = 0; q < NB * 4; ++q) wgmma_keep(part[s][q]);
        }
        const float* xs = (const float*)((const unsigned char*)XSs + stage * XS_STAGE);
        // The UE8M0 byte as an f32's exponent field is the scale 2^(e - 127) (byte 0 gives 0
        // instead of 2^-127; 255, NaN's, gives inf, NaN in the product). Rows g / g + 8, step s.
        float w0[4], w1[4];
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            const u32 shift = (s % 2) ? 15 : 23;
            w0[s] = __uint_as_float((sw[0][s / 2] << shift) & 0x7F800000u);
            w1[s] = __uint_as_float((sw[1][s / 2] << shift) & 0x7F800000u);
        }
#pragma unroll
        for (int j = 0; j < NB; ++j) {
            if constexpr (X128) {
                // The stage's partials by their weight scales, then the token's scale once:
                // 5 instructions an accumulator where a scale per 32 of both needs 8.
                const float2 x = *(const float2*)(xs + 8 * j + 2 * t);
                float r[4];
#pragma unroll
                for (int q = 0; q < 4; ++q) r[q] = part[0][4 * j + q] * (q < 2 ? w0[0] : w1[0]);
#pragma unroll
                for (int s = 1; s < 4; ++s)
#pragma unroll
                    for (int q = 0; q < 4; ++q) r[q] = fmaf(part[s][4 * j + q], q < 2 ? w0[s] : w1[s], r[q]);
                acc[j][0] = fmaf(r[0], x.x, acc[j][0]);
                acc[j][1] = fmaf(r[1], x.y, acc[j][1]);
                acc[j][2] = fmaf(r[2], x.x, acc[j][2]);
                acc[j][3] = fmaf(r[3], x.y, acc[j][3]);
            } else {
                const float4 x0 = *(const float4*)(xs + (8 * j + 2 * t) * 4);
                const float4 x1 = *(const float4*)(xs + (8 * j + 2 * t + 1) * 4);
                const float fx0[4] = {x0.x, x0.y, x0.z, x0.w}, fx1[4] = {x1.x, x1.y, x1.z, x1.w};
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    acc[j][0] += part[s][4 * j + 0] * (w0[s] * fx0[s]);
                    acc[j][1] += part[s][4 * j + 1] * (w0[s] * fx1[s]);
                    acc[j][2] += part[s][4 * j + 2] * (w1[s] * fx0[s]);
                    acc[j][3] += part[s][4 * j + 3] * (w1[s] * fx1[s]);
                }
            }
        }
    };

    const bool handoff = !(MODE & MODE_GATED) && p.arrivals;  // GEMM 2 of W4A8: await_row_tile
    int consumed = 0;
    auto wait_previous = [&] {
        if (handoff) consumed = await_row_tile(p, tr.tile, K, row_tile_signals(true, K));
        else begin_dependent();
    };
    cp_async_pipeline<STAGES, weights_before_wait(MODE), true>(k_tiles, load_tokens, load_weights, wait_previous,
                                                               [&](int stage, int) { compute(stage); });

    static_assert(weight_tile_transpose_bytes(BT) <= STAGES * W_STAGE, "transpose fits the weight buffers");
    // Loaded here, not at set-up: held through the W4A8 main loop they made its 8-token tile
    // 2-3 us slower on the H100 (twenty-second session), more than the round trips they hide.
    store_weight_row_tile<BT, MODE, ACT>(p, tr, acc, (float*)Wq, load_weight_row_tile_scales<BT, MODE>(p, tr));
    if constexpr ((MODE & MODE_GATED) != 0) quantize_gated_tile<true, BT, BW / 2>(p, tr);
    if (handoff) finish_row_tile(p, tr.tile, K, consumed, ((int)p.n + BW - 1) / BW);
}
#endif
