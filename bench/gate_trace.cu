// Where the fused decode gate's time goes (gate_route_sort, kernels/gate_logits.cu): a
// standalone nvcc build on the device that times the kernel with CUDA events (median of many
// launches, as in a graph: back to back) and reads phase stamps the kernel writes when
// FDMOE_TRACE is defined (globaltimer, ns). Qwen3-30B-A3B's router: E = 128, k = 8, H = 2048.
//
//   nvcc -O3 -arch=sm_90a -std=c++17 -I kernels -o /tmp/gate_trace bench/gate_trace.cu && /tmp/gate_trace [T [before [warm]]]
//
// `before` sets what runs ahead of each timed launch, to imitate what precedes the gate in a
// forward (where it is 14.6 us against ~9 here, Qwen3 T = 1): 0 nothing; 1 an L2 flush (a
// 256 MB memset, as the experts' weights stream through L2); 2 a kernel of ~256 KB of code on
// every SM (evicts the SMs' instruction caches, as the GEMMs' code does); 3 both; 4 a kernel
// holding 200 KB of shared memory on every SM (the GEMMs' carveout). `warm` (default 1) turns
// on the kernel's warm-up slice of blocks, as the library launches it.
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>

__device__ unsigned long long g_trace[64];
__device__ __forceinline__ unsigned long long trace_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// The warm-up slice (the grid's last x, when on) runs the same code on scratch: not stamped.
__constant__ int g_warm_on;
__device__ __forceinline__ bool trace_block() {
    return threadIdx.x == 0 && !(g_warm_on && blockIdx.x == gridDim.x - 1);
}
// Stamp i by thread 0 of the block that gets there (the last block, past the gate phase).
#define FDMOE_TRACE(i)                                 \
    do {                                               \
        if (trace_block()) g_trace[i] = trace_now(); \
    } while (0)
// Stamp 0: the earliest block start.
#define FDMOE_TRACE_START()                                      \
    do {                                                         \
        if (trace_block()) atomicMin(&g_trace[0], trace_now()); \
    } while (0)

#include "gate_logits.cu"

// ~16K distinct FFMA instructions (256 KB of SASS), run by every SM.
__global__ void __launch_bounds__(128) code_polluter(float* out, float a) {
    float v = threadIdx.x;
#pragma unroll
    for (int i = 0; i < 16384; ++i) v = fmaf(v, a, (float)i * 1.0001f);
    if (v == 12345.0f) out[threadIdx.x] = v;
}

__global__ void smem_hog(float* out) {
    extern __shared__ float hog[];
    for (int i = threadIdx.x; i < 200 * 256; i += blockDim.x) hog[i] = i;
    __syncthreads();
    if (hog[threadIdx.x * 7] == -1.0f) out[0] = 1.0f;
}

#define CHECK(x)                                                                       \
    do {                                                                               \
        cudaError_t e_ = (x);                                                          \
        if (e_ != cudaSuccess) {                                                       \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                   \
        }                                                                              \
    } while (0)

int main(int argc, char** argv) {
    const int T = argc > 1 ? atoi(argv[1]) : 1;
    const int before = argc > 2 ? atoi(argv[2]) : 0;
    const int warm = argc > 3 ? atoi(argv[3]) : 1;
    const int E = 128, K = 8, H = 2048, BLOCK_M = 16;
    const int rounds = (H + GATE_ROUND - 1) / GATE_ROUND;
    std::vector<unsigned short> x(T * H);
    std::vector<float> gate(H * E);
    srand(1);
    for (auto& v : x) { float f = (rand() / (float)RAND_MAX - 0.5f); unsigned u; memcpy(&u, &f, 4); v = u >> 16; }
    for (auto& v : gate) v = (rand() / (float)RAND_MAX - 0.5f) * 0.05f;
    unsigned short* dx; float *dg, *dlogits, *dw; int *dids, *doff, *dsorted, *dpos, *dte, *dtr, *dnt, *dcount;
    CHECK(cudaMalloc(&dx, x.size() * 2));
    CHECK(cudaMalloc(&dg, gate.size() * 4));
    CHECK(cudaMalloc(&dlogits, (size_t)rounds * T * E * 4));
    CHECK(cudaMalloc(&dw, T * K * 4));
    CHECK(cudaMalloc(&dids, T * K * 4));
    CHECK(cudaMalloc(&doff, (E + 1) * 4));
    CHECK(cudaMalloc(&dsorted, T * K * 4));
    CHECK(cudaMalloc(&dpos, T * K * 4));
    CHECK(cudaMalloc(&dte, (T * K + E) * 4));
    CHECK(cudaMalloc(&dtr, (T * K + E) * 4));
    CHECK(cudaMalloc(&dnt, 4));
    CHECK(cudaMalloc(&dcount, 64 * 4));
    CHECK(cudaMemset(dcount, 0, 64 * 4));
    CHECK(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dg, gate.data(), gate.size() * 4, cudaMemcpyHostToDevice));

    FusedRouting f{};
    f.route.logits = dlogits;
    f.route.logit_slices = rounds;
    f.route.slice_stride = (i64)T * E;
    f.route.tokens_per_block = 4;
    f.route.topk_ids = dids;
    f.route.topk_weights = dw;
    f.route.num_tokens = T;
    f.route.num_experts = E;
    f.route.top_k = K;
    f.route.mode = MODE_SOFTMAX;
    f.route.n_group = 1;
    f.route.topk_group = 1;
    f.route.renormalize = 1;
    f.route.routed_scaling_factor = 1.0f;
    f.sort = SortParams{dids, doff, dsorted, dpos, dte, dtr, dnt + 0, nullptr, T, K, E, BLOCK_M};
    int* dtiles;
    CHECK(cudaMalloc(&dtiles, 4));
    f.sort.num_tiles = dtiles;
    f.counters = dcount;
    // The warm-up's scratch outputs, as FusedRouting::new carves them
    // (src/backend/cuda/kernels/params.rs).
    int* scratch;
    const int slots = T * K;
    CHECK(cudaMalloc(&scratch, (4 * slots + E + 1 + 2 * (slots + E) + 1) * 4));
    CHECK(cudaMemset(scratch, 0, (4 * slots + E + 1 + 2 * (slots + E) + 1) * 4));
    f.warm_route = f.route;
    f.warm_route.topk_ids = scratch;
    f.warm_route.topk_weights = (float*)scratch + slots;
    f.warm_sort = SortParams{scratch, scratch + 2 * slots, scratch + 2 * slots + E + 1, scratch + 3 * slots + E + 1,
                             scratch + 4 * slots + E + 1, scratch + 5 * slots + 2 * E + 1, dnt + 0, nullptr, T, K, E,
                             BLOCK_M};
    f.warm_sort.num_tiles = scratch + 6 * slots + 3 * E + 1;
    f.warm_up = warm;
    CHECK(cudaMemcpyToSymbol(g_warm_on, &warm, sizeof(int)));
    const size_t smem = std::max<size_t>(4 * (2 * E + 1 + K) * 4, 8 * E * 4);
    dim3 grid((T + 3) / 4 + (warm ? 1 : 0), (E + 31) / 32, rounds);

    unsigned char* flush;
    const size_t flush_bytes = 256u << 20;
    CHECK(cudaMalloc(&flush, flush_bytes));
    float* sink;
    CHECK(cudaMalloc(&sink, 4096));
    CHECK(cudaFuncSetAttribute(smem_hog, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    int sms;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    auto run_before = [&](int it) {
        if (before & 2) code_polluter<<<sms * 4, 128>>>(sink, 1.0f + it * 1e-7f);
        if (before & 1) CHECK(cudaMemsetAsync(flush, it & 0xff, flush_bytes));
        if (before == 4) smem_hog<<<sms, 256, 200 * 1024>>>(sink);
        CHECK(cudaGetLastError());
    };

    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    std::vector<float> times;
    std::vector<std::vector<long long>> phases;
    for (int it = 0; it < 300; ++it) {
        unsigned long long reset[64] = {~0ull};
        CHECK(cudaMemcpyToSymbol(g_trace, reset, sizeof(reset)));
        run_before(it);
        CHECK(cudaEventRecord(a));
        gate_route_sort<<<grid, 256, smem>>>(dx, dg, dlogits, (i64)T * E, nullptr, T, H, E, nullptr, f);
        CHECK(cudaGetLastError());
        CHECK(cudaEventRecord(b));
        CHECK(cudaEventSynchronize(b));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, a, b));
        unsigned long long tr[64];
        CHECK(cudaMemcpyFromSymbol(tr, g_trace, sizeof(tr)));
        if (it >= 50) {
            times.push_back(ms * 1000.0f);
            std::vector<long long> p;
            for (int i = 1; i <= 10; ++i) p.push_back(tr[i] ? (long long)(tr[i] - tr[0]) : -1);
            phases.push_back(p);
        }
    }
    // Back to back (no sync between launches): the per-launch cost a graph of these sees.
    CHECK(cudaEventRecord(a));
    for (int it = 0; it < 1000; ++it)
        gate_route_sort<<<grid, 256, smem>>>(dx, dg, dlogits, (i64)T * E, nullptr, T, H, E, nullptr, f);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float total;
    CHECK(cudaEventElapsedTime(&total, a, b));
    std::sort(times.begin(), times.end());
    int ids[64];
    CHECK(cudaMemcpy(ids, dids, T * K * 4, cudaMemcpyDeviceToHost));
    printf("before=%d warm=%d: T=%d gate_route_sort: one launch (event pair) median %.2f us, back to back %.2f us per "
           "launch\n",
           before, warm, T, times[times.size() / 2], total);
    printf("ids of token 0:");
    for (int j = 0; j < K; ++j) printf(" %d", ids[j]);
    printf("\nphase stamps, ns after stamp 0 (the first block's start), median of %zu (-1: not reached):\n"
           "  1 a gate block done (the last to write), 2 last block past its count, 3 logits loaded,\n"
           "  4 scores, 5 picks, 6 weights written, 7 routing done, 8 sort counted, 9 sort scanned, 10 sorted\n",
           phases.size());
    for (size_t i = 0; i < phases[0].size(); ++i) {
        std::vector<long long> v;
        for (auto& p : phases) if (i < p.size()) v.push_back(p[i]);
        std::sort(v.begin(), v.end());
        printf("  stamp %zu: %lld\n", i + 1, v[v.size() / 2]);
    }
    return 0;
}
