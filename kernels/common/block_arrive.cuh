// The last block of a grid to finish a phase, found without a second launch: a block's results
// are done at a barrier, then its thread 0 counts with one acq_rel atomic; the release
// publishes what the barrier ordered before it, and the last block's acquire makes every other
// block's results visible before a barrier lets its threads read them (CUTLASS's barrier
// pattern). Used by the fused decode gate (gate_logits.cu) and the multi-block sort.
#pragma once
#include "common/types.cuh"

__device__ __forceinline__ int atomic_add_acq_rel_gpu(int* counter, int v) {
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(counter), "r"(v) : "memory");
    return old;
}

// Whether this block is the last of `expected` to arrive at `counter` (every thread gets the
// answer); when it is, the others' results are visible to all its threads. The last block
// resets the counter (zero between launches) once it no longer needs it.
__device__ __forceinline__ bool block_arrive(int* counter, int expected) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) last = atomic_add_acq_rel_gpu(counter, 1) == expected - 1;
    __syncthreads();
    return last;
}

// A producer's signal, one release add by thread 0 after a barrier (so that it publishes every
// thread's results, as block_arrive's), and a consumer's acquire of it.
__device__ __forceinline__ void signal_release_gpu(int* counter) {
    __syncthreads();
    if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(counter) : "memory");
}
__device__ __forceinline__ int load_acquire_gpu(const int* counter) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
    return v;
}
