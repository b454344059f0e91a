// Element types and conversions shared by every kernel.
//
// Kernels are compiled by NVRTC without the CUDA headers, so 16-bit floats are carried as raw
// `u16` bits and converted with single PTX instructions. One build of a kernel serves one
// element type: bf16 by default, IEEE half when FDMOE_F16 is defined.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

__device__ __forceinline__ float elem_to_float(u16 v) {
#ifdef FDMOE_F16
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
#else
    return __uint_as_float(((u32)v) << 16);
#endif
}

// Round to nearest even, once.
__device__ __forceinline__ u16 float_to_elem(float f) {
    u16 v;
#ifdef FDMOE_F16
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
#endif
    return v;
}

__device__ __forceinline__ u32 pack_elem2(float lo, float hi) {
    return (u32)float_to_elem(lo) | ((u32)float_to_elem(hi) << 16);
}

// Slots of the forward argument block (graph replay): the caller's pointers of one call,
// written by set_forward_args before the graph runs, so captured kernels read them instead of
// pointers baked in at capture and no input or output needs copying.
#define ARG_X 0
#define ARG_OUT 1
#define ARG_LOGITS 2
#define ARG_TOPK_IDS 3
#define ARG_TOPK_WEIGHTS 4
#define ARG_RECORD_IDS 5
#define ARG_RECORD_WEIGHTS 6
#define ARG_SLOTS 7

// The pointer in `slot` of the argument block when there is one, else `direct`.
template <typename T>
__device__ __forceinline__ T* forward_arg(const u64* args_block, int slot, T* direct) {
    return args_block ? (T*)args_block[slot] : direct;
}

// Programmatic dependent launch (sm_90 and newer; src/backend/cuda/driver.rs, Function::launch):
// waits until the previous kernel on the stream has completed and its writes are visible, then
// lets the next kernel's blocks be scheduled, so their start-up overlaps this kernel's work.
// Every kernel calls it before it reads what the kernel before it wrote. What nothing on the
// stream writes (the layer's weights: GEMM 2's first weight tiles, the split decode gate's)
// and what a kernel two or more back wrote (GEMM 2's tile table, the combine's argument block,
// true T and slot positions) may be read before it: that kernel completed before the previous
// one passed its own wait and let this one launch. Without the launch attribute, or before
// sm_90, it does nothing.
__device__ __forceinline__ void begin_dependent() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The two halves of begin_dependent, for a kernel whose input was complete before the forward
// began (the caller's x): it may read it before waiting, since every kernel of the forward waits
// before it lets its dependents launch, so everything before its predecessor has completed by
// the time it runs. It lets its dependents launch first and waits last, so that its completion
// still implies its predecessor's (what begin_dependent's readers of older writes rely on).
__device__ __forceinline__ void allow_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_previous() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Phase stamps of the decode gate's chain (bench/gate_trace.cu defines them): nothing here.
#ifndef FDMOE_TRACE
#define FDMOE_TRACE(i)
#define FDMOE_TRACE_START()
#endif

// Phase stamps of the W8A8 GEMMs' blocks (bench/gemm_trace.py; W4A8's get only the entry and
// wait stamps of the wrapper they share): compiled in only when FDMOE_GEMM_TRACE is the device
// address of a [2][FDMOE_GEMM_TRACE_BLOCKS][8] u64 buffer (compile.rs passes $FDMOE_GEMM_TRACE
// to grouped_gemm_quant.cu). Stamp i of a block of GEMM `gemm` (0: up, 1: down) is
// globaltimer ns at [gemm][blockIdx.x][i], written by thread 0.
#define FDMOE_GEMM_TRACE_BLOCKS 16384
#ifdef FDMOE_GEMM_TRACE
__device__ __forceinline__ void gemm_stamp_value(int gemm, int i, u64 value) {
    if (threadIdx.x == 0 && blockIdx.x < FDMOE_GEMM_TRACE_BLOCKS)
        ((volatile u64*)FDMOE_GEMM_TRACE)[((u64)gemm * FDMOE_GEMM_TRACE_BLOCKS + blockIdx.x) * 8 + i] = value;
}
__device__ __forceinline__ void gemm_stamp(int gemm, int i) {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    gemm_stamp_value(gemm, i, t);
}
__device__ __forceinline__ u64 sm_id() {
    u32 id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    return id;
}
#define FDMOE_GEMM_STAMP(gemm, i) gemm_stamp(gemm, i)
#define FDMOE_GEMM_STAMP_VALUE(gemm, i, value) gemm_stamp_value(gemm, i, value)
#else
#define FDMOE_GEMM_STAMP(gemm, i)
#define FDMOE_GEMM_STAMP_VALUE(gemm, i, value)
#endif

// The true token count: device memory when graphs replay a padded bucket, else the argument.
__device__ __forceinline__ int token_count(const int* num_tokens_dev, int num_tokens) {
    return num_tokens_dev ? *num_tokens_dev : num_tokens;
}

// A total order for top-k: larger value first, NaN below everything, ties to the lower index.
// Eligible entries always map above 0, so 0 can mark "not selectable".
__device__ __forceinline__ u64 rank_key(float value, int index) {
    u32 bits = __float_as_uint(value);
    u32 ordered;
    if (value != value) {
        ordered = 0u;
    } else {
        ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    }
    return ((u64)ordered << 32) | (u64)(0xFFFFFFFFu - (u32)index);
}

__device__ __forceinline__ int key_index(u64 key) {
    return (int)(0xFFFFFFFFu - (u32)(key & 0xFFFFFFFFull));
}
