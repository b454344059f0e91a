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
//     scale_b(column) — DeepGEMM's scheme. On sm_90a W8A8 wgmma (quant/gemm_w8a8.cuh);
//     on sm_89 E4M3 converted exactly to f16 in registers for m16n8k16 f16 MMAs with f32
//     accumulate (quant/gemm_fp8_mma.cuh), exact up to f32 rounding against the CPU reference
//     (which dequantizes both sides).
//   - MXFP4 / NVFP4 (W4A16): A is bf16, B is E2M1 repacked at load (src/backend/cuda/
//     quant_weights.rs) so each lane's 8 bytes of a 8-row x 64-column block are the E2M1 codes of
//     its m16n8k16 B fragments, where the decode (quant/fp4_decode.cuh) takes them. Decoding is
//     bit moves: a nibble's sign and 3 magnitude bits land in a bf16's sign and low exponent/top
//     mantissa bits (value x 2^-126, subnormal for 0.5), and one bf16x2 multiply by the group scale with
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
//
// The tile bodies are in quant/ (one header per format and instruction family, and what the
// wgmma ones share); this file holds the activations' row quantizers and every entry point, with
// the tiles, stages and blocks per SM each is compiled for.
#include "common/block_arrive.cuh"
#include "common/gemm_tile.cuh"
#include "common/mma.cuh"
#include "common/fp8.cuh"
#ifdef FDMOE_SM90A
#include "common/wgmma.cuh"
#endif
#include "quant/fp8_act_groups.cuh"
#include "quant/gemm_fp8_mma.cuh"
#include "quant/fp4_decode.cuh"
#include "quant/gemm_fp4_mma.cuh"
#include "quant/gemm_fp4_wgmma.cuh"
#include "quant/wgmma_epilogue.cuh"
#include "quant/gemm_w4a8.cuh"
#include "quant/gemm_w8a8.cuh"

// ---------------------------------------------------------------------------------------------
#ifdef FDMOE_SM90A
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