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
template <int STAGES, bool WEIGHTS_FIRST = false, typename LoadA, typename LoadB, typename Wait, typename Compute>
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
    for (int t = 0; t < tiles; ++t) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = t + STAGES - 1;
        if (next < tiles) load(next % STAGES, next);
        cp_async_commit();
        compute(t % STAGES, t);
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

// d += a (16x16, row-major) * b (16x8, column-major)
__device__ __forceinline__ void mma_16816(float* d, const u32* a, const u32* b) {
#ifdef FDMOE_F16
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

#if __CUDA_ARCH__ >= 890
// d += a (16x32 E4M3, row-major) * b (32x8 E4M3, column-major). The fragments hold the same
// bytes per thread as m16n8k16's 16-bit ones, so the same ldmatrix addressing loads them.
__device__ __forceinline__ void mma_16832_e4m3(float* d, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// a * b per bf16 lane, exact when the product is representable (subnormals included).
__device__ __forceinline__ u32 mul_bf16x2(u32 a, u32 b) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
}
