// W8A8 (FP8_BLOCK) on mma.sync, for sm_89 and up without wgmma: E4M3 converted exactly to f16
// in registers, DeepGEMM's per-128 scale promotion (grouped_gemm_quant.cu says why).
#pragma once
#include "common/gemm_tile.cuh"
#include "common/mma.cuh"

// FP8_BLOCK: A and B are E4M3 bytes, K a multiple of 128 (validated at create).
#if __CUDA_ARCH__ >= 890
template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, int MODE, int ACT>
__device__ __forceinline__ void grouped_gemm_fp8(const GemmParams& p) {
    constexpr int THREADS = WARPS_M * WARPS_N * 32;
    constexpr int BK = 128;       // bytes = elements = one scale group
    constexpr int LDS = BK + 16;  // padded shared row (bytes): conflict-free ldmatrix
    constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;
    constexpr int MT = WTM / 16, NT = WTN / 8;
    static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must be a multiple of 16x16");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* As = smem_raw;                       // [STAGES][BM][LDS]
    unsigned char* Bs = As + STAGES * BM * LDS;         // [STAGES][BN][LDS]
    float* Sa = (float*)(Bs + STAGES * BN * LDS);       // [STAGES][BM]
    float* Sb = Sa + STAGES * BM;                       // [STAGES][BN]
    i64* a_rows = (i64*)(Sb + STAGES * BN);             // [BM]
    i64* b_rows = a_rows + BM;                          // [BN]
    TileRange tr;
    if (!setup_tile<BM, BN, THREADS, MODE>(p, a_rows, b_rows, tr)) return;
    const int K = (int)p.k;
    const int groups = K / BK;
    const unsigned char* a = (const unsigned char*)p.a;
    const unsigned char* b = (const unsigned char*)p.b + (i64)tr.expert * p.b_group_stride;
    const float* b_scale = (const float*)((const unsigned char*)p.b_scale + (i64)tr.expert * p.b_scale_group_stride);

    // Every thread copies the same chunks each stage: their sources at group 0 (a padding
    // row's pointing at the matrix base, zero-filled) and shared addresses are set once, so a
    // stage only adds its k offset. The loads were most of this kernel's issued instructions,
    // and decode is bound by issue (H200 ncu: 76% of issue slots busy at 64% of the DRAM rate
    // before the sources were hoisted).
    constexpr int CHUNKS_PER_ROW = BK / 16;
    constexpr int A_CHUNKS = BM * CHUNKS_PER_ROW, B_CHUNKS = BN * CHUNKS_PER_ROW;
    constexpr int A_PER = (A_CHUNKS + THREADS - 1) / THREADS, B_PER = (B_CHUNKS + THREADS - 1) / THREADS;
    static_assert(BM <= THREADS && BN <= THREADS, "one scale per thread at most");
    static_assert(A_PER + B_PER <= 32, "one zero-fill bit per chunk");
    const unsigned char* a_src[A_PER];
    const unsigned char* b_src[B_PER];
    u32 zero_fill = 0;  // bit n: A chunk n, bit A_PER + n: B chunk n (one register, not 5 bools:
                        // the decode tile's 64-register cap)
#pragma unroll
    for (int n = 0; n < A_PER; ++n) {
        const int i = threadIdx.x + n * THREADS;
        const i64 row = i < A_CHUNKS ? a_rows[i / CHUNKS_PER_ROW] : -1;
        a_src[n] = a + (row >= 0 ? row * p.lda + (i % CHUNKS_PER_ROW) * 16 : 0);
        zero_fill |= (u32)(row < 0) << n;
    }
#pragma unroll
    for (int n = 0; n < B_PER; ++n) {
        const int i = threadIdx.x + n * THREADS;
        const i64 row = i < B_CHUNKS ? b_rows[i / CHUNKS_PER_ROW] : -1;
        b_src[n] = b + (row >= 0 ? row * p.ldb + (i % CHUNKS_PER_ROW) * 16 : 0);
        zero_fill |= (u32)(row < 0) << (A_PER + n);
    }
    const float* sa_src = nullptr;
    const float* sb_src = nullptr;
    if (threadIdx.x < BM && a_rows[threadIdx.x] >= 0) sa_src = p.a_scale + a_rows[threadIdx.x] * groups;
    if (threadIdx.x < BN && b_rows[threadIdx.x] >= 0) sb_src = b_scale + (b_rows[threadIdx.x] / 64) * groups;
    const u32 as_base = (u32)__cvta_generic_to_shared(As), bs_base = (u32)__cvta_generic_to_shared(Bs);

    auto load_a = [&](int stage, int g) {
        const int k0 = g * BK;
#pragma unroll
        for (int n = 0; n < A_PER; ++n) {
            const int i = threadIdx.x + n * THREADS;
            if (A_CHUNKS % THREADS != 0 && i >= A_CHUNKS) break;
            const u32 dst = as_base + stage * BM * LDS + (i / CHUNKS_PER_ROW) * LDS + (i % CHUNKS_PER_ROW) * 16;
            cp_async_16_zfill(dst, a_src[n] + k0, (zero_fill >> n) & 1);
        }
        if (threadIdx.x < BM)
            cp_async_4(Sa + stage * BM + threadIdx.x, sa_src ? (const void*)(sa_src + g) : (const void*)p.a_scale, sa_src != nullptr);
    };
    auto load_b = [&](int stage, int g) {
        const int k0 = g * BK;
#pragma unroll
        for (int n = 0; n < B_PER; ++n) {
            const int i = threadIdx.x + n * THREADS;
            if (B_CHUNKS % THREADS != 0 && i >= B_CHUNKS) break;
            const u32 dst = bs_base + stage * BN * LDS + (i / CHUNKS_PER_ROW) * LDS + (i % CHUNKS_PER_ROW) * 16;
            cp_async_16_zfill(dst, b_src[n] + k0, (zero_fill >> (A_PER + n)) & 1);
        }
        if (threadIdx.x < BN)
            cp_async_4(Sb + stage * BN + threadIdx.x, sb_src ? (const void*)(sb_src + g) : (const void*)b_scale, sb_src != nullptr);
    };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    float acc[MT][NT][4];
    zero_accumulators<MT, NT>(acc);

    cp_async_pipeline<STAGES, weights_before_wait(MODE)>(groups, load_a, load_b, begin_dependent, [&](int stage, int) {
        const unsigned char* as = As + stage * BM * LDS;
        const unsigned char* bs = Bs + stage * BN * LDS;
        float part[MT][NT][4];
        zero_accumulators<MT, NT>(part);
#pragma unroll
        for (int kk = 0; kk < BK; kk += 32) {
            u32 af[MT][4];
            u32 bf[NT][2];
            load_a_fragments<MT>(af, as, LDS, wm * WTM, kk);
            load_b_fragments<NT>(bf, bs, LDS, wn * WTN, kk);
            // sm_90 has no E4M3 mma.sync: ptxas would turn each m16n8k32 into the same
            // conversions and two f16 MMAs from zero plus 4 FADDs into the sum. Converted here,
            // the MMAs chain into the stage's partial sums and the FADDs go.
            u32 ah[MT][8];
#pragma unroll
            for (int i = 0; i < MT; ++i) e4m3_a_to_f16(af[i], ah[i]);
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                u32 bh[4];
                e4m3_b_to_f16(bf[j], bh);
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    mma_16816_f16(part[i][j], ah[i], bh);
                    mma_16816_f16(part[i][j], ah[i] + 4, bh + 2);
                }
            }
        }
        // Scale promotion: this group's sums times the row's and the column's scales.
        const float* sa = Sa + stage * BM;
        const float* sb = Sb + stage * BN;
#pragma unroll
        for (int i = 0; i < MT; ++i) {
            const int r = wm * WTM + i * 16 + lane / 4;
            const float sa0 = sa[r], sa1 = sa[r + 8];
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int c = wn * WTN + j * 8 + (lane % 4) * 2;
                const float sb0 = sb[c], sb1 = sb[c + 1];
                acc[i][j][0] += part[i][j][0] * (sa0 * sb0);
                acc[i][j][1] += part[i][j][1] * (sa0 * sb1);
                acc[i][j][2] += part[i][j][2] * (sa1 * sb0);
                acc[i][j][3] += part[i][j][3] * (sa1 * sb1);
            }
        }
    });
    const int lane_row = lane / 4;
#pragma unroll
    for (int i = 0; i < MT; ++i) store_fragment<NT, MODE, ACT>(p, tr, acc[i], wm * WTM + i * 16 + lane_row, wn * WTN);
}
#endif
