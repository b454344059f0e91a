// Grouped expert GEMMs on quantized weights (SPEC §5), the same tiles, row gathering, tile
// table and fused epilogues as grouped_gemm.cu (common/gemm_tile.cuh), with B read in its
// quantized form and never dequantized into global memory:
//
//   - FP8_BLOCK (W8A8): A is E4M3 with one f32 scale per row per 128 channels (produced by
//     quantize_fp8_rows, or for GEMM 2 on sm_90a by GEMM 1 itself), B is E4M3 [N, K] with one
//     f32 scale per 64 rows x 128 columns (the checkpoint's 128x128 blocks, expanded at load so
//     de-interleaved gate/up rows keep theirs).
//     One pipeline stage is one 128-deep scale group: the tensor cores sum the stage into a
//     partial accumulator, which is then promoted into the main one as partial * scale_a(row) *
//     scale_b(column) — DeepGEMM's scheme. On sm_90a W8A8 wgmma (grouped_gemm_w8a8, below);
//     on sm_89 E4M3 converted exactly to f16 in registers for m16n8k16 f16 MMAs with f32
//     accumulate (grouped_gemm_fp8), exact up to f32 rounding against the CPU reference
//     (which dequantizes both sides).
//   - MXFP4 / NVFP4 (W4A16): A is bf16, B is E2M1 repacked at load (src/backend/cuda/
//     quant_weights.rs) so each lane's 8 bytes of a 8-row x 64-column block are the E2M1 codes of
//     its m16n8k16 B fragments, where the decode below takes them. Decoding is bit moves:
//     a nibble's sign and 3 magnitude bits land in a bf16's sign and low exponent/top mantissa
//     bits (value x 2^-126, subnormal for 0.5), and one bf16x2 multiply by the group scale with
//     the 2^126 folded in (UE8M0 2^(e-1); NVFP4's E4M3 scale x 2^118, the last 2^8 going with
//     the per-matrix global scale onto the accumulator) gives the exact weight, since E2M1 x
//     scale needs at most 6 significant bits.
//
// Why it is fast: decode reads 1 (FP8) or ~0.53 (FP4) bytes per weight with cp.async, and
// the rest is keeping each weight's other costs below that. Each thread's copy sources, shared
// addresses and zero-fill predicates are set once per block, so a stage issues an add and a
// copy per 16 bytes; the FP8 decode tile is compiled for 8 blocks per SM and the pipelines stay
// shallow (deeper ones cost blocks per SM and were slower). On sm_90 E4M3 has no mma.sync: its
// codes are converted exactly to f16 in registers (F2FP) for chained m16n8k16 f16 MMAs. FP4's
// decode is bit moves from a layout chosen for them (6 masks on the integer ALU and 5 shifts
// as multiplies on the FMA pipe per 8 weights), and, when the matrix's scales are all plain
// (real checkpoints), one bf16x2 multiply per register by multipliers made once per block; its
// decode tile is 128 wide, which halves the activation tile's shared reads (every warp reads
// all of it) and the fixed instructions per weight. On the H200 at DeepSeek-V3 T = 16-256
// (BENCHMARKS.md) the mma.sync FP8 tiles stream at 1.09-1.13x their byte floor (the W8A8 wgmma
// ones at 1.00-1.04x), MXFP4 at 1.43-1.58x (0.38-0.42x the bf16 floor, whose bytes it has
// 0.27x of), there with 5 warps per scheduler, 65% of issue
// slots busy and its two decode pipes (integer ALU, FMA) about evenly loaded (ncu): bound by the
// instructions per weight at that occupancy. A stage of the decode tile issues ~465 a warp for
// 128 weights a lane: ~305 decode and MMA, ~70 copies, ~90 fragment loads, scale set-up and
// loop control (SASS of the executed path).
#include "common/block_arrive.cuh"
#include "common/gemm_tile.cuh"
#include "common/mma.cuh"
#include "common/fp8.cuh"
#ifdef FDMOE_SM90A
#include "common/wgmma.cuh"
#endif

#define FMT_MXFP4 1
#define FMT_NVFP4 2

// One FP8_BLOCK activation group: a warp's 128 channels of a row (4 a lane, `v`) as E4M3
// (the lane's 4 bytes at `out4`) and the group's f32 scale, exactly as src/quant/fp8_act.rs:
// amax over the finite values (at least 1e-4), codes = RNE-saturate(x * (448 / amax)),
// scale = amax / 448.
__device__ __forceinline__ void quantize_fp8_block_group(const float (&v)[4], unsigned char* out4, float* scale, int lane) {
    float amax = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q)
        if (isfinite(v[q])) amax = fmaxf(amax, fabsf(v[q]));
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    amax = fmaxf(amax, 1.0e-4f);
    const float multiplier = 448.0f / amax;
    u32 codes = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) codes |= encode_e4m3(v[q] * multiplier) << (8 * q);
    *(u32*)out4 = codes;
    if (lane == 0) *scale = amax / 448.0f;
}

// One FP8_MX activation group: a warp's 32 channels (one a lane) by the pre-dispatch rule, the
// scale stored as the f32 2^(exponent + 6) (the 2^-6 of the W4A8 weights' decode undone; NaN
// for a group holding ±inf).
__device__ __forceinline__ void quantize_mx_group(float v, unsigned char* out, float* scale, int lane) {
    int e;
    bool inf_group;
    *out = (unsigned char)pre_dispatch_code(v, e, inf_group);
    if (lane == 0) *scale = inf_group ? __uint_as_float(0x7FC00000u) : __uint_as_float((u32)(e + 127 + 6) << 23);
}

// Loads through L2 only: values other blocks stored in this launch, after the acquire that
// made them visible (L1 is not coherent).
__device__ __forceinline__ float load_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ float4 load_cg4(const float* p) {
    float4 v;
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
    return v;
}

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
// MXFP4 / NVFP4: A bf16 [rows, K], B repacked per expert as [N/8][KB][256] bytes with KB =
// ceil(K/64) blocks of 64 columns (zero-padded), scales [N/8][KB][8 rows][SCALES] bytes with
// SCALES = 2 (UE8M0 per 32) or 4 (E4M3 per 16).

// The 4 bf16x2 B-fragment registers one packed word holds, each the exact weights times
// 2^-126. Register e's two sign bits are the word's bits 15 and 31 after rotating it right by
// FP4_SIGN_ROT[e], its two 3-bit magnitudes bits 6-8 and 22-24 after rotating by FP4_MAG_ROT[e]:
// the repack (src/backend/cuda/quant_weights.rs, same tables) put them there. The integer
// ALU pipe issues a warp every other cycle, and its throttle was the decode's largest stall
// (H200 ncu: LOP3 and SHF 42% of the instructions), so the layout is one whose rotations never
// wrap the bits kept: each is then a shift, and a shift is a multiply (left) or a multiply's
// high half (right) on the FMA pipe, which leaves the ALU the 6 masks a word needs (of the
// layouts of a sign bit and a 3-bit field per weight, none needs fewer). Gained 2-3%.
#define FP4_SIGN_ROT {0, 31, 27, 26}
#define FP4_MAG_ROT {0, 5, 29, 26}

// The word rotated right by R where it matters: the bits the mask keeps of each 16-bit half,
// LOW..HIGH, come from inside the word, so one shift gives them, done as an integer multiply.
template <int R, int LOW, int HIGH>
__device__ __forceinline__ u32 fp4_view(u32 q) {
    if constexpr (R == 0) {
        return q;
    } else if constexpr (HIGH + 16 + R <= 31) {
        u32 r;
        asm("mul.hi.u32 %0, %1, %2;" : "=r"(r) : "r"(q), "n"(1u << (32 - R)));
        return r;
    } else {
        static_assert(LOW + R >= 32, "the layout would wrap a kept bit");
        u32 r;
        asm("mul.lo.u32 %0, %1, %2;" : "=r"(r) : "r"(q), "n"(1u << (32 - R)));
        return r;
    }
}

template <int SIGN_ROT, int MAG_ROT>
__device__ __forceinline__ u32 unpack_e2m1_pair(u32 q) {
    if constexpr (SIGN_ROT == MAG_ROT) return fp4_view<SIGN_ROT, 6, 15>(q) & 0x81C081C0u;
    return (fp4_view<SIGN_ROT, 15, 15>(q) & 0x80008000u) | (fp4_view<MAG_ROT, 6, 8>(q) & 0x01C001C0u);
}

__device__ __forceinline__ void unpack_e2m1_word(u32 q, u32* out) {
    constexpr int sign_rot[4] = FP4_SIGN_ROT, mag_rot[4] = FP4_MAG_ROT;
    out[0] = unpack_e2m1_pair<sign_rot[0], mag_rot[0]>(q);
    out[1] = unpack_e2m1_pair<sign_rot[1], mag_rot[1]>(q);
    out[2] = unpack_e2m1_pair<sign_rot[2], mag_rot[2]>(q);
    out[3] = unpack_e2m1_pair<sign_rot[3], mag_rot[3]>(q);
}

// Scale multipliers for one packed word: the unpacked values times `first` (then times
// `second` when `two`) are the exact weights. The 2^126 that the unpacking leaves out is folded
// into the scale where the product stays a bf16 (MXFP4 exponents up to 128; NVFP4 always, with
// 2^118 here and 2^8 in the epilogue), so one multiply per register suffices.
struct Fp4Scale {
    u32 first, second;
    bool two;
};

__device__ __forceinline__ u32 bf16x2_from_bits(u32 bits) { return bits | (bits << 16); }

// UE8M0 exponent byte e: 2^(e - 127) * 2^126 = 2^(e - 1).
__device__ __forceinline__ Fp4Scale mxfp4_scale(u32 e) {
    if (e <= 128) return {bf16x2_from_bits((e + 126) << 7), 0, false};
    return {0x7E807E80u /* 2^126 */, bf16x2_from_bits(e << 7), true};
}

// E4M3 scale code times 2^118 (exact, at most 4 significant bits, below 2^127).
__device__ __forceinline__ Fp4Scale nvfp4_scale(u32 code) {
    // The code's exponent/mantissa bits as an f32 with the value * 2^-120 (subnormal for the
    // E4M3 subnormals), brought up by 2^119 twice.
    float v = __uint_as_float((code & 0x7Fu) << 20) * 0x1p119f * 0x1p119f;
    const u32 bits = (__float_as_uint(v) >> 16) | ((code & 0x80u) << 8);
    return {bf16x2_from_bits(bits), 0, false};
}

// A lane's scale bytes of one packed block (MXFP4: 2 UE8M0, one per 32 columns; NVFP4: 4 E4M3,
// one per 16) are "plain" when their multipliers are single bf16s made by integer moves alone:
// MXFP4 exponents up to 128; NVFP4 positive normal codes (no zero, subnormal or NaN). Real
// checkpoints are plain throughout (the loader then sets GemmParams::b_scales_plain and no
// block checks), and when a whole warp is, the decode takes the fast path (fp4_plain_scales),
// else the general one (mxfp4_scale / nvfp4_scale) for that block.
template <int FMT>
__device__ __forceinline__ bool fp4_scales_plain(u32 raw) {
    if (FMT == FMT_MXFP4) {
        const u32 e = __byte_perm(raw, 0, 0x4140);  // e0, e1 in the two halves
        return ((e + 0x007F007Fu) & 0x01000100u) == 0;
    }
    const bool subnormal_or_zero = __vcmpeq4(raw & 0x78787878u, 0) != 0;
    const bool nan = __vcmpeq4(raw & 0x7F7F7F7Fu, 0x7F7F7F7Fu) != 0;
    return !subnormal_or_zero && !nan && (raw & 0x80808080u) == 0;
}

// The bf16x2 multipliers of a block's four k16 steps from plain scale bytes.
template <int FMT>
__device__ __forceinline__ void fp4_plain_scales(u32 raw, u32* step_scale) {
    if (FMT == FMT_MXFP4) {
        // e << 7 into both halves by one multiply, + 126 << 7 in each: the bf16x2 of 2^(e - 1),
        // on the FMA pipe (the ALU pipe is the decode's busiest).
        step_scale[0] = step_scale[1] = __byte_perm(raw, 0, 0x4440) * 0x00800080u + 0x3F003F00u;
        step_scale[2] = step_scale[3] = __byte_perm(raw, 0, 0x4441) * 0x00800080u + 0x3F003F00u;
    } else {
        // eeeemmm << 4 is a bf16 with exponent e and mantissa m; + 238 in the exponent field is
        // the E4M3 bias (7) undone and the 2^118 folded in.
        const u32 lo = ((__byte_perm(raw, 0, 0x4140) & 0x007F007Fu) << 4) + 0x77007700u;
        const u32 hi = ((__byte_perm(raw, 0, 0x4342) & 0x007F007Fu) << 4) + 0x77007700u;
        step_scale[0] = __byte_perm(lo, 0, 0x1010);
        step_scale[1] = __byte_perm(lo, 0, 0x3232);
        step_scale[2] = __byte_perm(hi, 0, 0x1010);
        step_scale[3] = __byte_perm(hi, 0, 0x3232);
    }
}

// Word w (0: k16 steps 0 and 1 of a packed block, 1: steps 2 and 3) of a lane's 8 packed bytes
// as its four bf16x2 B-fragment registers, the exact weights (`raw`: the lane's row's scale
// bytes of the block). PLAIN: raw is plain (fp4_scales_plain): one multiply per register from
// multipliers made by integer moves. Both the mma.sync and the wgmma tiles decode with this, so
// they multiply the same bf16 weights.
template <int FMT, bool PLAIN>
__device__ __forceinline__ void fp4_decode_word(u32 q, u32 raw, int w, u32 (&bf)[4]) {
    unpack_e2m1_word(q, bf);
    if (PLAIN) {
        u32 step_scale[4];
        fp4_plain_scales<FMT>(raw, step_scale);
#pragma unroll
        for (int e = 0; e < 4; ++e) bf[e] = mul_bf16x2(bf[e], step_scale[2 * w + e / 2]);
    } else if (FMT == FMT_MXFP4) {
        const Fp4Scale sc = mxfp4_scale((raw >> (8 * w)) & 0xFFu);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            bf[e] = mul_bf16x2(bf[e], sc.first);
            if (sc.two) bf[e] = mul_bf16x2(bf[e], sc.second);
        }
    } else {
        // Steps 2w and 2w + 1 have a scale each.
        const Fp4Scale lo = nvfp4_scale((raw >> (16 * w)) & 0xFFu);
        const Fp4Scale hi = nvfp4_scale((raw >> (16 * w + 8)) & 0xFFu);
        bf[0] = mul_bf16x2(bf[0], lo.first);
        bf[1] = mul_bf16x2(bf[1], lo.first);
        bf[2] = mul_bf16x2(bf[2], hi.first);
        bf[3] = mul_bf16x2(bf[3], hi.first);
    }
}

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
#ifdef FDMOE_SM90A
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

// ---------------------------------------------------------------------------------------------
// MXFP4 weights x FP8 activations (act_quant = FP8_MX, sm_90a): W4A8 on the FP8 tensor cores.
// The activations are E4M3 by the pre-dispatch rule, each scale stored as an f32 times 2^6:
// GEMM 1's with one scale per 128 channels (quantize_mx_fp8_rows re-expresses a 128's four
// exponents at the largest), GEMM 2's with one per 32 (GEMM 1's epilogue); the
// weights MXFP4 repacked at load into the FP4 blocks above (8 rows x 64 columns, 256 bytes,
// scales [8 rows][2] UE8M0) with each lane's 8 bytes of a block holding its wgmma A-fragment
// codes, and the blocks of a tile's k-tile consecutive (src/backend/cuda/quant_weights.rs, tile_w4a8), so that one thread copies
// a stage's weights with two bulk copies (TMA) that complete on the stage's mbarrier. A
// warpgroup computes 64 weight rows (wgmma M) x BT tokens (N) from the weights decoded in
// registers and the tokens in 128-byte-swizzled shared rows; since the weights have a scale
// per 32 of K, each k32 wgmma sums into a fresh partial, promoted into the accumulator as
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
#ifdef FDMOE_SM90A
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

// FP8_BLOCK on Hopper (W8A8 wgmma, sm_90a): the weights' E4M3 rows are the wgmma's A operand
// and the tokens' rows its B operand, both straight from 128-byte-swizzled shared tiles that
// cp.async fills from the checkpoint's [N, K] layout (no repack). A warpgroup computes 64
// weight rows (wgmma M) x BT tokens (N); a stage's four k32 wgmma chain into one partial (the
// tensor cores' own accumulation over 128 of K), promoted once per stage as partial *
// scale_w(row) * scale_x(token), the stage being one scale group of both — DeepGEMM's scheme.
//
// Why it is fast: the mma.sync FP8 tiles above (sm_89) convert every weight to f16 (F2FP) for
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

// GEMM 1's inputs for act_quant = FP8_MX: each row of a [rows, K] matrix (the element type, or
// f32 when `in_f32`, as quantize_fp8_rows) becomes E4M3 by the pre-dispatch rule, one exponent
// e per 32 channels; then each 128-channel group is re-expressed at its largest exponent S (a
// code times 2^(e - S), rounded to E4M3) with one scale, the f32 2^(S + 6) (the 2^-6 of the
// weights' decode undone; NaN for a group holding ±inf), in rows of ceil(K / 128). The values
// are the pre-dispatch ones wherever they stay in E4M3's normal range, i.e. all but elements
// under 2^(S - e - 14) of their 32's largest; those round to E4M3's subnormal steps, an error
// under 2^-18 of the group's largest value. One scale per 128 lets W4A8's GEMM 1 sum a
// stage's four k32 partials by their weight scales alone and apply the token's once
// (grouped_gemm_w4a8). One warp per 32 channels, a block per 128. Grid: (max rows,
// ceil(K / 128)); block 128.
__device__ __forceinline__ u32 rebase_e4m3(u32 code, int down) {
    if (down == 0) return code;
    return encode_e4m3(decode_e4m3(code) * __uint_as_float((u32)(127 - min(down, 32)) << 23));
}
__device__ __forceinline__ void quantize_mx_fp8_row(const void* in, int in_f32, unsigned char* out, float* scales, int cols,
                                                    const int* num_tokens_dev, int num_tokens, int rows_per_token,
                                                    const u64* args_block, int in_arg) {
    constexpr int ABSENT = -100000, INF_GROUP = 100000;  // past K; holding ±inf
    __shared__ int exponents[4];
    const int row = blockIdx.x;
    if (row >= token_count(num_tokens_dev, num_tokens) * rows_per_token) return;
    if (args_block && in_arg >= 0) in = (const void*)args_block[in_arg];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int c0 = blockIdx.y * 128 + warp * 32;
    const bool present = c0 < cols;  // K is a multiple of 32
    const i64 i = (i64)row * cols + c0 + lane;
    const float v = !present ? 0.0f : in_f32 ? ((const float*)in)[i] : elem_to_float(((const u16*)in)[i]);
    int e;
    bool inf_group;
    const u32 code = pre_dispatch_code(v, e, inf_group);
    if (lane == 0) exponents[warp] = !present ? ABSENT : inf_group ? INF_GROUP : e;
    __syncthreads();
    const int top = max(max(exponents[0], exponents[1]), max(exponents[2], exponents[3]));
    if (present) out[i] = (unsigned char)(top == INF_GROUP ? 0u : rebase_e4m3(code, top - e));
    if (threadIdx.x == 0)
        scales[(i64)row * gridDim.y + blockIdx.y] = top == INF_GROUP ? __uint_as_float(0x7FC00000u) : __uint_as_float((u32)(top + 127 + 6) << 23);
}

extern "C" __global__ void __launch_bounds__(128)
    quantize_mx_fp8_rows(const void* __restrict__ in, int in_f32, unsigned char* __restrict__ out,
                         float* __restrict__ scales, int cols, const int* num_tokens_dev, int num_tokens,
                         int rows_per_token, const u64* args_block, int in_arg) {
    // The caller's x is read before the wait (types.cuh, allow_dependents).
    const bool input_ready = in_arg == ARG_X;
    if (input_ready) allow_dependents();
    else begin_dependent();
    quantize_mx_fp8_row(in, in_f32, out, scales, cols, num_tokens_dev, num_tokens, rows_per_token, args_block, in_arg);
    if (input_ready) wait_for_previous();
}
#endif

// ---------------------------------------------------------------------------------------------
// FP8_BLOCK activations: each row of a [rows, K] matrix (the element type, or f32 when
// `in_f32`: fc1's output and the mma.sync tiles' GEMM 1 activations stay f32 until here (the
// wgmma tiles quantize theirs in GEMM 1, quantize_gated_tile), so they are rounded once, to
// E4M3, as in the CPU reference) becomes E4M3 with one f32 scale per 128 channels, exactly as
// src/quant/fp8_act.rs: amax over the finite values (at least 1e-4), codes =
// RNE-saturate(x * (448 / amax)), scale = amax / 448. One warp per group (4 channels a lane), so
// the amax is one warp reduction. rows = T * rows_per_token (T from the device when graphs
// replay). Grid: (max rows, ceil(K / 128 / 4)); block 128.
__device__ __forceinline__ void quantize_fp8_row(const void* in, int in_f32, unsigned char* out, float* scales, int cols,
                                                 const int* num_tokens_dev, int num_tokens, int rows_per_token,
                                                 const u64* args_block, int in_arg) {
    const int row = blockIdx.x;
    if (row >= token_count(num_tokens_dev, num_tokens) * rows_per_token) return;
    if (args_block && in_arg >= 0) in = (const void*)args_block[in_arg];
    const int groups = cols / 128;
    const int g = blockIdx.y * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (g >= groups) return;
    const i64 base = (i64)row * cols + g * 128 + lane * 4;
    float v[4];
    if (in_f32) {
        const float4 raw = *(const float4*)((const float*)in + base);
        v[0] = raw.x, v[1] = raw.y, v[2] = raw.z, v[3] = raw.w;
    } else {
        const uint2 raw = *(const uint2*)((const u16*)in + base);
        v[0] = elem_to_float(raw.x & 0xFFFFu), v[1] = elem_to_float(raw.x >> 16);
        v[2] = elem_to_float(raw.y & 0xFFFFu), v[3] = elem_to_float(raw.y >> 16);
    }
    quantize_fp8_block_group(v, out + base, scales + (i64)row * groups + g, lane);
}

extern "C" __global__ void __launch_bounds__(128)
    quantize_fp8_rows(const void* __restrict__ in, int in_f32, unsigned char* __restrict__ out, float* __restrict__ scales,
                      int cols, const int* num_tokens_dev, int num_tokens, int rows_per_token, const u64* args_block,
                      int in_arg) {
    // The caller's x is read before the wait (types.cuh, allow_dependents).
    const bool input_ready = in_arg == ARG_X;
    if (input_ready) allow_dependents();
    else begin_dependent();
    quantize_fp8_row(in, in_f32, out, scales, cols, num_tokens_dev, num_tokens, rows_per_token, args_block, in_arg);
    if (input_ready) wait_for_previous();
}

// Entry points: qgemm_<format>_<tile>_<up_act | down_scaled>. Tiles: s = 16 x 64 (FP8) or
// 16 x 128 (FP4) for decode, n = 16 x 64 (FP4) for decode grids the wide tile would leave
// underfilled, d = 32 x 64 (FP8) at 13-24 rows per expert, m = 64 x 128, w = 128 x 256 (FP4
// prefill on wgmma, sm_90a). Shared memory sizes
// and the choice are in src/backend/cuda/tiles.rs (QuantTile).
#define FDMOE_QTILE_fp8_s 16, 64, 1, 4
#define FDMOE_QTILE_fp8_d 32, 64, 2, 2
#define FDMOE_QTILE_fp4_s 16, 128, 1, 4
#define FDMOE_QTILE_fp4_n 16, 64, 1, 4
#define FDMOE_QTILE_fp8_m 64, 128, 2, 2
#define FDMOE_QTILE_fp4_m 64, 128, 2, 2
// Decode keeps few stages so that more blocks share an SM. H200 sweeps at DeepSeek-V3 T =
// 16-256, times over the bf16 floor: before the copy addresses were hoisted, FP8 2 stages
// 0.76-0.80, 3: 0.78-0.82, 4: 0.82-0.86, 5: 0.95-0.98, and FP4 3 stages the best of 3/4/6/8;
// after, FP8 2 stages at 8 blocks per SM 0.57-0.61, at 6 (80 registers) 0.69-0.72, 3 stages
// 0.59-0.63. FP4 after the decode and copy rework (2026-12-02, bitwise-equal outputs): 16 x 64
// at 3 / 4 / 6 stages 0.48-0.51 / 0.50-0.54 / 0.50-0.54; 16 x 128 at 3 stages and 5 blocks per
// SM 0.41-0.45, at 2 (6 blocks) 0.44-0.47, at 4 (4 blocks) 0.43-0.47. (27% fewer instructions
// per weight at 16 x 64 had gained 0-3%; the wide tile also halves the activation tile's shared
// reads per weight, since every warp reads all of it.)
#define FDMOE_QSTAGES_fp8_s 2
#define FDMOE_QSTAGES_fp8_d 2
#define FDMOE_QSTAGES_fp8_m 4
#define FDMOE_QSTAGES_fp4_s 3
#define FDMOE_QSTAGES_fp4_n 3
#define FDMOE_QSTAGES_fp4_m 4

// FP8's GEMM 1 writes f32 activations (rounded once, to E4M3: by quantize_fp8_rows after the
// mma.sync tiles, by quantize_gated_tile in the wgmma ones).
// Blocks per SM the tiles are compiled for: the FP8 decode tile at 8 (64 registers, no spills)
// instead of the 6 its 80 registers allowed: 16% faster on the H200 (DeepSeek-V3 T = 16-256);
// the FP4 one at 5 (its shared memory allows 5; 114-120 registers would give 4). The 32-row FP8
// tile at 5 (94 registers): at 6 it spills 36 bytes (2 x 2 warps) or 76 (1 x 4).
#define FDMOE_QMINBLOCKS_fp8_s 8
#define FDMOE_QMINBLOCKS_fp8_d 5
#define FDMOE_QMINBLOCKS_fp8_m 1
#define FDMOE_QMINBLOCKS_fp4_s 5
#define FDMOE_QMINBLOCKS_fp4_n 1
#define FDMOE_QMINBLOCKS_fp4_m 1
#define FDMOE_QGEMM_FP8(tile, name, mode, act)                                                      \
    extern "C" __global__ void __launch_bounds__(128, FDMOE_QMINBLOCKS_fp8_##tile) qgemm_fp8_block_##tile##_##name(GemmParams p) { \
        constexpr int m = (mode & MODE_GATED) ? ((mode) | MODE_OUT_F32) : (mode);                       \
        grouped_gemm_fp8<FDMOE_QTILE_fp8_##tile, FDMOE_QSTAGES_fp8_##tile, m, act>(resolve_args<!weights_before_wait(m)>(p)); \
    }
#define FDMOE_QGEMM_FP4(fmt, fmt_name, tile, name, mode, act)                                           \
    extern "C" __global__ void __launch_bounds__(128, FDMOE_QMINBLOCKS_fp4_##tile) qgemm_##fmt_name##_##tile##_##name(GemmParams p) { \
        grouped_gemm_fp4<FDMOE_QTILE_fp4_##tile, FDMOE_QSTAGES_fp4_##tile, fmt, mode, act>(                \
            resolve_args<!weights_before_wait(mode)>(p));                                              \
    }

// The wgmma tiles on E4M3 activations (sm_90a): 64 weight rows x 8 / 16 / 32 tokens; and for
// W8A8 prefill 64 tokens x 128 weight rows, two blocks an SM (by shared memory; 198-199
// registers). W4A8: MXFP4 with act_quant = FP8_MX, 4 stages, blocks per SM by registers; the
// 16-token tile is latency-bound: GEMM 2's at 5 (96 registers; at 6 it spills) instead of 4
// (104) gained 11 us at Qwen3-30B-A3B T = 256 (0.200 -> 0.189 ms) and 1% at DeepSeek-V3 T = 256
// on the H100 (BENCHMARKS.md, twenty-fifth session), GEMM 1's at 6 (80, no spills) instead of 5
// (87) 6 us more (0.187 -> 0.181, twenty-sixth session). The 8-token tile holds 7 blocks (GEMM
// 1, 72 registers) and 6 (GEMM 2, 79) by its registers. W8A8:
// FP8_BLOCK, 3 stages, so that shared memory holds 7 / 6 / 5 blocks an SM (4 stages: 5 / 5 / 4):
// a decode block streams only ~40% of its life (set-up, first stage and store are latency), and
// more resident blocks overlap more of those latencies than a deeper pipeline does (H100,
// Qwen3-30B-A3B T = 256: 0.231 -> 0.227 ms; T = 16 / 64 and DeepSeek-V3 within 1%, BENCHMARKS.md
// twenty-third session). QuantTile::stages mirrors the stages.
#define FDMOE_MINBLOCKS_w4a8_8 4
#define FDMOE_MINBLOCKS_w4a8_16 5
#define FDMOE_MINBLOCKS_w4a8_32 2
#define FDMOE_MINBLOCKS_w8a8_8 7
#define FDMOE_MINBLOCKS_w8a8_16 6
#define FDMOE_MINBLOCKS_w8a8_32 5
// GEMM 1's bounds (the gated kernels), where they differ from the tile's (GEMM 2's).
#define FDMOE_MINBLOCKS_UP_w4a8_16 6
#define FDMOE_MINBLOCKS_UP_w4a8_8 FDMOE_MINBLOCKS_w4a8_8
#define FDMOE_MINBLOCKS_UP_w4a8_32 FDMOE_MINBLOCKS_w4a8_32
#define FDMOE_MINBLOCKS_UP_w8a8_8 FDMOE_MINBLOCKS_w8a8_8
#define FDMOE_MINBLOCKS_UP_w8a8_16 FDMOE_MINBLOCKS_w8a8_16
#define FDMOE_MINBLOCKS_UP_w8a8_32 FDMOE_MINBLOCKS_w8a8_32
#define FDMOE_STAGES_w4a8 4
#define FDMOE_STAGES_w8a8 3
#define FDMOE_QGEMM_WGMMA(body, fmt_name, tokens, name, mode, act)                                      \
    extern "C" __global__ void __launch_bounds__(128, ((mode) & MODE_GATED) ? FDMOE_MINBLOCKS_UP_##body##_##tokens : FDMOE_MINBLOCKS_##body##_##tokens) qgemm_##fmt_name##_a##tokens##_##name(GemmParams p) { \
        constexpr int m = (mode & MODE_GATED) ? ((mode) | MODE_OUT_F32) : (mode);                       \
        FDMOE_GEMM_STAMP((m & MODE_GATED) ? 0 : 1, 0);                                                  \
        const GemmParams q = resolve_args<!weights_before_wait(m)>(p);                                  \
        FDMOE_GEMM_STAMP((m & MODE_GATED) ? 0 : 1, 1);                                                  \
        grouped_gemm_##body<tokens, FDMOE_STAGES_##body, m, act>(q);                                    \
    }
#define FDMOE_QGEMM_W8A8_PREFILL(tokens, name, mode, act)                                           \
    extern "C" __global__ void __launch_bounds__(128, 2) qgemm_fp8_block_p##tokens##_##name(GemmParams p) { \
        constexpr int m = (mode & MODE_GATED) ? ((mode) | MODE_OUT_F32) : (mode);                       \
        grouped_gemm_w8a8<tokens, 4, m, act, true>(resolve_args<!weights_before_wait(m)>(p));         \
    }

// FP4 prefill on wgmma (sm_90a): 128 tokens x 256 weight rows, one block an SM (~170 KB of
// shared memory).
#define FDMOE_QGEMM_FP4_WGMMA(fmt, fmt_name, name, mode, act)                                       \
    extern "C" __global__ void __launch_bounds__(256, 1) qgemm_##fmt_name##_w_##name(GemmParams p) { \
        grouped_gemm_fp4_wgmma<4, fmt, mode, act>(resolve_args<true>(p));                             \
    }

#define FDMOE_QGEMM_KINDS(GEN, ...)                                                       \
    GEN(__VA_ARGS__, up_swiglu, MODE_GATHER | MODE_GATED, FDMOE_ACT_SWIGLU)               \
    GEN(__VA_ARGS__, up_gelu_tanh, MODE_GATHER | MODE_GATED, FDMOE_ACT_GELU_TANH)         \
    GEN(__VA_ARGS__, up_swigluoai, MODE_GATHER | MODE_GATED, FDMOE_ACT_SWIGLUOAI)         \
    GEN(__VA_ARGS__, down_scaled, MODE_SCALE, 0)

#if __CUDA_ARCH__ >= 890
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_FP8, s)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_FP8, d)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_FP8, m)
#endif
#ifdef FDMOE_SM90A
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_WGMMA, w8a8, fp8_block, 8)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_WGMMA, w8a8, fp8_block, 16)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_WGMMA, w8a8, fp8_block, 32)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_W8A8_PREFILL, 64)
#endif
#if defined(FDMOE_SM90A) && !defined(FDMOE_F16)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_WGMMA, w4a8, mxfp4, 8)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_WGMMA, w4a8, mxfp4, 16)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_WGMMA, w4a8, mxfp4, 32)
#endif
#if defined(FDMOE_SM90A) && !defined(FDMOE_F16)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_FP4_WGMMA, FMT_MXFP4, mxfp4)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_FP4_WGMMA, FMT_NVFP4, nvfp4)
#endif
#ifndef FDMOE_F16
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_FP4, FMT_MXFP4, mxfp4, n)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_FP4, FMT_MXFP4, mxfp4, s)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_FP4, FMT_MXFP4, mxfp4, m)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_FP4, FMT_NVFP4, nvfp4, n)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_FP4, FMT_NVFP4, nvfp4, s)
FDMOE_QGEMM_KINDS(FDMOE_QGEMM_FP4, FMT_NVFP4, nvfp4, m)
#endif
