// E2M1 weights (MXFP4 / NVFP4) decoded to exact bf16 B fragments by bit moves from the layout
// the loader repacks them into (src/backend/cuda/quant_weights.rs), and their scale multipliers:
// what the W4A16 tiles (gemm_fp4_mma.cuh, gemm_fp4_wgmma.cuh) multiply.
#pragma once
#include "common/mma.cuh"

// MXFP4 / NVFP4: A bf16 [rows, K], B repacked per expert as [N/8][KB][256] bytes with KB =
// ceil(K/64) blocks of 64 columns (zero-padded), scales [N/8][KB][8 rows][SCALES] bytes with
// SCALES = 2 (UE8M0 per 32) or 4 (E4M3 per 16).

#define FMT_MXFP4 1
#define FMT_NVFP4 2

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
