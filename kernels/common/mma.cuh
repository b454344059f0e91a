// Thin wrappers over the PTX this project's GEMMs use: cp.async (sm_80+), ldmatrix and the
// m16n8k16 tensor-core MMA with f32 accumulation. Valid on sm_80 and sm_90a.
#pragma once
#include "common/types.cuh"

// 16-byte async copy global -> shared; `valid == false` writes zeros instead of reading.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
    u32 dst = (u32)__cvta_generic_to_shared(smem);
    int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}

// 16-byte async copy to a shared address, zero-filling instead of reading when `zero_fill`:
// for copies whose validity is settled once per block, so that a stage issues no compare or
// select (the predicate form; a register byte count costs address arithmetic per copy).
__device__ __forceinline__ void cp_async_16_zfill(u32 smem_addr, const void* gmem, bool zero_fill) {
    asm volatile(
        "{\n .reg .pred z;\n setp.ne.b32 z, %2, 0;\n cp.async.cg.shared.global [%0], [%1], 16, z;\n}\n" ::"r"(smem_addr),
        "l"(gmem), "r"((int)zero_fill));
}

// 4-byte async copy (scales); `valid == false` writes zeros.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
    u32 dst = (u32)__cvta_generic_to_shared(smem);
    int src_bytes = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* smem) {
    u32 a = (u32)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void ldmatrix_x2(u32* r, const void* smem) {
    u32 a = (u32)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
}

// The multi-stage cp.async main loop of the mma.sync bodies: tile t's copies are issued
// STAGES - 1 tiles ahead of its use; load_a(stage, t) and load_b(stage, t) fill buffer `stage`
// with tile t's activations and weights (one commit group), compute(stage, t) consumes it. The
// barrier after each wait also orders the refill of a buffer after every warp's reads of it.
//
// With WEIGHTS_FIRST, the first tiles' weight copies (load_b) are issued before `wait` (the
// kernel's begin_dependent), since the weights do not depend on the previous kernel, whose
// tail they then overlap; each tile's A copies (load_a) follow the wait. Tile t's commit group
// is then A(t) plus, for t = 0, every early B: a wait for group t still covers tile t.
//
// With ASYNC_PROXY (sm_90, for compute that reads the tiles through wgmma), each thread fences
// its copies into the async proxy between its wait and the barrier.
template <int STAGES, bool WEIGHTS_FIRST = false, bool ASYNC_PROXY = false, typename LoadA, typename LoadB,
          typename Wait, typename Compute>
__device__ __forceinline__ void cp_async_pipeline(int tiles, LoadA&& load_a, LoadB&& load_b, Wait&& wait,
                                                  Compute&& compute) {
    auto load = [&](int stage, int t) {
        load_a(stage, t);
        load_b(stage, t);
    };
    if (WEIGHTS_FIRST) {
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s)
            if (s < tiles) load_b(s, s);
        wait();
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < tiles) load_a(s, s);
            cp_async_commit();
        }
    } else {
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < tiles) load(s, s);
            cp_async_commit();
        }
    }
    // The buffers in use and to refill rotate by a compare each, not t % STAGES (a multiply and
    // two shifts per use at 3 stages, in loops bound by issued instructions).
    int fill = STAGES - 1, use = 0;
    for (int t = 0; t < tiles; ++t) {
        cp_async_wait<STAGES - 2>();
        if constexpr (ASYNC_PROXY) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        const int next = t + STAGES - 1;
        if (next < tiles) load(fill, next);
        cp_async_commit();
        compute(use, t);
        fill = fill + 1 == STAGES ? 0 : fill + 1;
        use = use + 1 == STAGES ? 0 : use + 1;
    }
    cp_async_wait<0>();
}

// A fragments of a warp's MT m16 row tiles (rows row0 + 16i ..) at byte column `kb` of a shared
// tile with rows `lds` bytes apart: 16 rows x 32 bytes each (k16 of 16-bit, k32 of 8-bit types).
template <int MT>
__device__ __forceinline__ void load_a_fragments(u32 (*af)[4], const void* tile, int lds, int row0, int kb) {
    const int lane = threadIdx.x % 32;
    const unsigned char* t = (const unsigned char*)tile;
#pragma unroll
    for (int i = 0; i < MT; ++i) ldmatrix_x4(af[i], t + (row0 + i * 16 + lane % 16) * lds + kb + (lane / 16) * 16);
}

// B fragments of NT n8 column blocks (columns col0 + 8j ..) of a K-contiguous shared tile, two
// blocks per ldmatrix.x4: 8 columns x 32 bytes each.
template <int NT>
__device__ __forceinline__ void load_b_fragments(u32 (*bf)[2], const void* tile, int lds, int col0, int kb) {
    const int lane = threadIdx.x % 32;
    const unsigned char* t = (const unsigned char*)tile;
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
        const int c = col0 + j * 8 + (lane % 8) + (lane / 16) * 8;
        u32 r4[4];
        ldmatrix_x4(r4, t + c * lds + kb + ((lane / 8) % 2) * 16);
        bf[j][0] = r4[0];
        bf[j][1] = r4[1];
        bf[j + 1][0] = r4[2];
        bf[j + 1][1] = r4[3];
    }
}

template <int MT, int NT>
__device__ __forceinline__ void zero_accumulators(float (*acc)[NT][4]) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;
}

// d += a * b in IEEE half (16x16 row-major times 16x8 column-major), f32 accumulate.
__device__ __forceinline__ void mma_16816_f16(float* d, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += a (16x16, row-major) * b (16x8, column-major) in the element type.
__device__ __forceinline__ void mma_16816(float* d, const u32* a, const u32* b) {
#ifdef FDMOE_F16
    mma_16816_f16(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

#if __CUDA_ARCH__ >= 890
// Two E4M3 codes, bytes 0-1 (HIGH: 2-3) of `v`, as an f16x2, exactly (E4M3 is a subset of f16).
template <bool HIGH>
__device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 v) {
    u32 r;
    if (HIGH)
        asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.rn.f16x2.e4m3x2 %0, hi;\n}\n" : "=r"(r) : "r"(v));
    else
        asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.rn.f16x2.e4m3x2 %0, lo;\n}\n" : "=r"(r) : "r"(v));
    return r;
}

// An m16n8k32 E4M3 fragment (A: 4 registers, B: 2, ldmatrix-loaded as for 16-bit types) as the
// f16 fragments of two m16n8k16 MMAs over the same 32 k. Each E4M3 register holds 4
// consecutive k; its low pair takes the f16 fragment's first k pair, its high pair the second
// (k + 8). The k order inside an MMA does not change the sum as long as A and B agree, so
// mma 0 takes A registers 0, 1 and B register 0, mma 1 registers 2, 3 and 1.
__device__ __forceinline__ void e4m3_a_to_f16(const u32* a, u32* h) {
#pragma unroll
    for (int m = 0; m < 2; ++m) {
        h[4 * m + 0] = e4m3x2_to_f16x2<false>(a[2 * m]);
        h[4 * m + 1] = e4m3x2_to_f16x2<false>(a[2 * m + 1]);
        h[4 * m + 2] = e4m3x2_to_f16x2<true>(a[2 * m]);
        h[4 * m + 3] = e4m3x2_to_f16x2<true>(a[2 * m + 1]);
    }
}
__device__ __forceinline__ void e4m3_b_to_f16(const u32* b, u32* h) {
#pragma unroll
    for (int m = 0; m < 2; ++m) {
        h[2 * m] = e4m3x2_to_f16x2<false>(b[m]);
        h[2 * m + 1] = e4m3x2_to_f16x2<true>(b[m]);
    }
}

#endif

// a * b per bf16 lane, exact when the product is representable (subnormals included).
__device__ __forceinline__ u32 mul_bf16x2(u32 a, u32 b) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
}
