// FP4 prefill on sm_90a (MXFP4 / NVFP4 weights, bf16 tokens): 128 tokens (two warpgroups, wgmma
// M) x 256 weight rows (N), 64 of K a stage. cp.async brings each stage's tokens (128-byte
// swizzled rows, as grouped_gemm_wgmma) and its 32 packed row blocks with their scales (the
// mma.sync tiles' layout) into a ring; each thread then decodes 64 weights of the next stage
// (fp4_decode_word: the same bf16 weights as the mma.sync tiles) into one of two swizzled bf16
// tiles that wgmma m64n256k16 reads as B. An output's chain is the mma.sync tiles' (k16 steps in
// order from zero, each the tensor cores' sum of 16 products of the same bf16 values), so the
// tile choice changes no bit (a GPU test compares them).
//
// Why it is fast: the mma.sync 64 x 128 tile decodes every weight once per 32 tokens in each of
// its two row warps and issues ~15 decode instructions per 8 weights beside each warp's MMAs,
// which bound it at prefill (Qwen3-30B-A3B T = 4096 about twice the bf16 time); here a weight
// is decoded once per 128 tokens, 64 a thread a stage with 32 conflict-free 4-byte shared
// stores, while the tensor cores run the previous stage's asynchronous wgmma. H200 MXFP4:
// Qwen3-30B-A3B T = 4096 1.61 -> 1.07 ms, DeepSeek-V3 14.50 -> 9.11 (bf16 0.90 / 8.51).
// 195 registers, no spills.
#pragma once
#ifdef FDMOE_SM90A
#include "quant/fp4_decode.cuh"
#include "common/gemm_tile.cuh"
#include "common/wgmma.cuh"

template <int STAGES, int FMT, int MODE, int ACT>
__device__ __forceinline__ void grouped_gemm_fp4_wgmma(const GemmParams& p) {
    constexpr int BM = 128, BN = 256, THREADS = 256;
    constexpr int NB = BN / 8;  // packed row blocks (8 weight rows x 64 of K) a stage
    constexpr int SCALES = FMT == FMT_MXFP4 ? 2 : 4, SBLOCK = 8 * SCALES;
    constexpr u32 A_STAGE = BM * 128, D_TILE = BN * 128, Q_STAGE = NB * 256, S_STAGE = NB * SBLOCK;
    constexpr int A_PER = BM * 8 / THREADS, Q_PER = Q_STAGE / 16 / THREADS, S_CHUNKS = S_STAGE / 16;
    constexpr u32 ROW_STEP = THREADS / 8 * 128;  // bytes between a thread's token chunks
    static_assert(STAGES >= 3 && S_CHUNKS <= THREADS && Q_PER * THREADS * 16 == Q_STAGE, "tile shape");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    // Offset from smem_raw (not a rounded integer) so the compiler keeps shared loads.
    unsigned char* As = smem_raw + ((1024u - ((u32)__cvta_generic_to_shared(smem_raw) & 1023u)) & 1023u);  // [STAGES][A_STAGE]
    unsigned char* Ds = As + STAGES * A_STAGE;  // [2][D_TILE]: decoded weights, swizzled rows
    unsigned char* Qs = Ds + 2 * D_TILE;        // [STAGES][NB][256]: packed codes
    unsigned char* Ss = Qs + STAGES * Q_STAGE;  // [STAGES][NB][SBLOCK]: their scales
    i64* a_rows = (i64*)(Ss + STAGES * S_STAGE);
    i64* b_rows = a_rows + BM;
    TileRange tr;
    if (!setup_tile<BM, BN, THREADS, MODE>(p, a_rows, b_rows, tr)) return;
    const int K = (int)p.k;
    const int k_tiles = (K + 63) / 64;  // a stage is one packed block column (zero-padded past K)
    const unsigned char* b = (const unsigned char*)p.b + (i64)tr.expert * p.b_group_stride;
    const unsigned char* bs_global = (const unsigned char*)p.b_scale + (i64)tr.expert * p.b_scale_group_stride;

    // Copy sources at stage 0 and zero-fill bits, set once per block (see grouped_gemm_wgmma).
    const int c = threadIdx.x % 8;
    const u16* a_src[A_PER];
    const unsigned char* q_src[Q_PER];
    u32 zero_fill = 0;  // bit n: token chunk n, bit A_PER + n: packed chunk n
#pragma unroll
    for (int n = 0; n < A_PER; ++n) {
        const i64 row = a_rows[threadIdx.x / 8 + n * (THREADS / 8)];
        a_src[n] = p.a + (row >= 0 ? row * p.lda + c * 8 : 0);
        zero_fill |= (u32)(row < 0) << n;
    }
#pragma unroll
    for (int n = 0; n < Q_PER; ++n) {
        const int i = threadIdx.x + n * THREADS;
        const i64 row = b_rows[(i / 16) * 8];  // GATED tiles alternate 8 gate and 8 up rows
        q_src[n] = b + (row >= 0 ? (row / 8) * k_tiles * 256 + (i % 16) * 16 : 0);
        zero_fill |= (u32)(row < 0) << (A_PER + n);
    }
    const unsigned char* s_src = bs_global;
    bool s_none = true;
    if (threadIdx.x < S_CHUNKS) {
        const int per_block = SBLOCK / 16;
        const i64 row = b_rows[(threadIdx.x / per_block) * 8];
        if (row >= 0) {
            s_src = bs_global + (row / 8) * k_tiles * SBLOCK + (threadIdx.x % per_block) * 16;
            s_none = false;
        }
    }
    const u32 a_dst = (u32)__cvta_generic_to_shared(As) + swizzle_128b(threadIdx.x / 8, c);
    const u32 q_dst = (u32)__cvta_generic_to_shared(Qs) + threadIdx.x * 16;
    const u32 s_dst = (u32)__cvta_generic_to_shared(Ss) + threadIdx.x * 16;
    auto load_stage = [&](int slot, int kt) {
        const int k0 = kt * 64;
        // Only a last, partial k-tile has token chunks past K: this thread's column.
        const bool past_k = k0 + c * 8 >= K;
#pragma unroll
        for (int n = 0; n < A_PER; ++n)
            cp_async_16_zfill(a_dst + slot * A_STAGE + n * ROW_STEP, past_k ? (const void*)p.a : a_src[n] + k0,
                              past_k || ((zero_fill >> n) & 1));
#pragma unroll
        for (int n = 0; n < Q_PER; ++n)
            cp_async_16_zfill(q_dst + slot * Q_STAGE + n * THREADS * 16, q_src[n] + kt * 256, (zero_fill >> (A_PER + n)) & 1);
        if (threadIdx.x < S_CHUNKS) cp_async_16_zfill(s_dst + slot * S_STAGE, s_src + kt * SBLOCK, s_none);
    };

    // Warp w decodes row blocks 4w .. 4w + 3; lane (g, t) the k-pairs of its fragment registers
    // (fp4_fragment_k) of row g, stored at the swizzled place: for one store the warp's 32 lanes
    // cover 8 rows' same chunk (rotated by the row) x 4 words, 32 banks.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const bool all_plain = p.b_scales_plain != 0;
    auto decode = [&](int slot, int buf) {
        const unsigned char* qs = Qs + slot * Q_STAGE;
        const unsigned char* ss = Ss + slot * S_STAGE;
        uint2 packed[4];
        u32 raw[4];
        bool plain = true;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int nb = warp * 4 + j;
            packed[j] = *(const uint2*)(qs + nb * 256 + lane * 8);
            const unsigned char* s = ss + nb * SBLOCK + g * SCALES;
            raw[j] = FMT == FMT_MXFP4 ? (u32) * (const u16*)s : *(const u32*)s;
            plain = plain && fp4_scales_plain<FMT>(raw[j]);
        }
        plain = all_plain || __all_sync(0xffffffffu, plain);
        unsigned char* ds = Ds + buf * D_TILE;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = (warp * 4 + j) * 8 + g;
#pragma unroll
            for (int w = 0; w < 2; ++w) {
                u32 bf[4];
                const u32 q = w == 0 ? packed[j].x : packed[j].y;
                if (plain) fp4_decode_word<FMT, true>(q, raw[j], w, bf);
                else fp4_decode_word<FMT, false>(q, raw[j], w, bf);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int k = 16 * (2 * w + e / 2) + 8 * (e % 2) + 2 * t;
                    *(u32*)(ds + n * 128 + (((k / 8) ^ g) << 4) + (k % 8) * 2) = bf[e];
                }
            }
        }
    };

    const int warpgroup = threadIdx.x / 128;
    float acc[32][4];
#pragma unroll
    for (int j = 0; j < 32; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[j][q] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage(s, s);
        cp_async_commit();
    }
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    decode(0, 0);
    for (int kt = 0; kt < k_tiles; ++kt) {
        // Stage kt's decoded tile (generic stores) and tokens (cp.async), for the async proxy.
        fence_proxy_async();
        __syncthreads();
        const u64 da = wgmma_desc(As + (kt % STAGES) * A_STAGE + warpgroup * 64 * 128);
        const u64 db = wgmma_desc(Ds + (kt % 2) * D_TILE);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16(&acc[0][0], da + 2 * kk, db + 2 * kk);
        wgmma_commit();
        // Stage kt - 1's MMAs done in this warpgroup, stage kt + 1's copies in this thread; the
        // barrier extends both to the block, so slot kt - 1 and decoded tile kt + 1 may be
        // written while stage kt's MMAs run.
        wgmma_wait_one();
        cp_async_wait<STAGES - 3>();
        __syncthreads();
        const int next = kt + STAGES - 1;
        if (next < k_tiles) load_stage(next % STAGES, next);
        cp_async_commit();
        if (kt + 1 < k_tiles) decode((kt + 1) % STAGES, (kt + 1) % 2);
    }
    wgmma_wait_all();
    cp_async_wait<0>();
    if (FMT == FMT_NVFP4) {
        const float global = p.b_global[tr.expert] * 256.0f;  // and the 2^8 left out of the scales
#pragma unroll
        for (int j = 0; j < 32; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[j][q] *= global;
    }
    // Accumulator layout: warp w of a warpgroup holds rows 16w + lane/4 (+8), n8 block j.
    store_fragment<32, MODE, ACT>(p, tr, acc, warpgroup * 64 + (warp % 4) * 16 + g, 0);
}
#endif
