/* moe_forward: one Qwen3-30B-A3B-sized MoE layer on the CPU through the libfdmoe C API.
 *
 *   E = 128 experts, top-8, hidden H = 2048, expert intermediate I = 768, softmax top-k with
 *   renormalized weights, SwiGLU; activations and weights float32.
 *
 * It creates the layer, loads random weights (TORCH layout: w13 [E, 2I, H], w2 [E, H, I],
 * gate [E, H]), forwards 64 tokens, checks the first tokens against a plain double-precision
 * reference computed here, prints their routing and the median time of a forward.
 * Exits non-zero if any call fails or the check does.
 *
 * Build and run: make -C examples-c run LIBDIR=$PWD/target/release
 * Memory: about 2.4 GB of weights (the caller's copy is freed once the library has its own).
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fdmoe.h"

enum {
    NUM_EXPERTS = 128,
    TOP_K = 8,
    HIDDEN = 2048,
    INTERMEDIATE = 768,
    TOKENS = 64,      /* tokens per forward (also the layer's max_tokens) */
    CHECKED = 3,      /* tokens checked against the reference */
    TIMED_RUNS = 7,   /* forwards timed; the median is reported */
};

/* Every libfdmoe call returns a status; on failure the thread's last error message says which
 * argument or feature was at fault. */
static void check(FdmoeStatus status, const char *what) {
    if (status != FDMOE_STATUS_OK) {
        fprintf(stderr, "%s failed: %s: %s\n", what, fdmoe_status_string(status),
                fdmoe_last_error_message());
        exit(1);
    }
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes);
    if (p == NULL) {
        fprintf(stderr, "out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

/* Random numbers: xorshift64*, and uniform values of variance scale^2 (fast enough for the
 * 600 million weights; the layer does not care that they are not normal). */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static double uniform01(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}

static void fill_random(float *dst, size_t n, double scale) {
    const double half_width = sqrt(3.0) * scale; /* uniform(-a, a) has variance a^2 / 3 */
    for (size_t i = 0; i < n; ++i) {
        dst[i] = (float)((2.0 * uniform01() - 1.0) * half_width);
    }
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ---- Reference: SPEC §3 for one token, written out plainly in double precision. ---- */

/* y[rows] = W[rows, cols] · x[cols] */
static void matvec(const float *w, size_t rows, size_t cols, const double *x, double *y) {
    for (size_t r = 0; r < rows; ++r) {
        double acc = 0.0;
        for (size_t c = 0; c < cols; ++c) {
            acc += (double)w[r * cols + c] * x[c];
        }
        y[r] = acc;
    }
}

static void reference_token(const float *x, const float *gate, const float *w13, const float *w2,
                            double *out, int32_t *ids, double *weights) {
    double xd[HIDDEN], logits[NUM_EXPERTS], probs[NUM_EXPERTS];
    static double gate_up[2 * INTERMEDIATE], act[INTERMEDIATE], y[HIDDEN];
    for (size_t h = 0; h < HIDDEN; ++h) {
        xd[h] = x[h];
        out[h] = 0.0;
    }
    /* Router: logits = x · gateᵀ, softmax, top-k (ties to the lower id), renormalize. */
    matvec(gate, NUM_EXPERTS, HIDDEN, xd, logits);
    double max = logits[0], sum = 0.0;
    for (size_t e = 1; e < NUM_EXPERTS; ++e) {
        max = logits[e] > max ? logits[e] : max;
    }
    for (size_t e = 0; e < NUM_EXPERTS; ++e) {
        probs[e] = exp(logits[e] - max);
        sum += probs[e];
    }
    double chosen_sum = 0.0;
    for (size_t j = 0; j < TOP_K; ++j) {
        int best = -1;
        for (int e = 0; e < NUM_EXPERTS; ++e) {
            int taken = 0;
            for (size_t q = 0; q < j; ++q) {
                taken |= ids[q] == e;
            }
            if (!taken && (best < 0 || probs[e] > probs[best])) {
                best = e;
            }
        }
        ids[j] = best;
        weights[j] = probs[best] / sum;
        chosen_sum += weights[j];
    }
    /* Experts: silu(gate half) * up half, down projection, weighted sum. */
    for (size_t j = 0; j < TOP_K; ++j) {
        weights[j] /= chosen_sum;
        size_t e = (size_t)ids[j];
        matvec(w13 + e * 2 * INTERMEDIATE * HIDDEN, 2 * INTERMEDIATE, HIDDEN, xd, gate_up);
        for (size_t i = 0; i < INTERMEDIATE; ++i) {
            double g = gate_up[i], v = gate_up[INTERMEDIATE + i];
            act[i] = g / (1.0 + exp(-g)) * v;
        }
        matvec(w2 + e * HIDDEN * INTERMEDIATE, HIDDEN, INTERMEDIATE, act, y);
        for (size_t h = 0; h < HIDDEN; ++h) {
            out[h] += weights[j] * y[h];
        }
    }
}

int main(void) {
    printf("libfdmoe %s (ABI %#x, header %#x)\n", fdmoe_version_string(), fdmoe_abi_version(),
           (unsigned)FDMOE_ABI_VERSION);
    if (fdmoe_abi_version() >> 16 != FDMOE_VERSION_MAJOR ||
        (fdmoe_abi_version() & 0xffff) < FDMOE_VERSION_MINOR) {
        fprintf(stderr, "the loaded library is older than the header this was built with\n");
        return 1;
    }

    /* 1. Describe the layer. config_init fills the defaults; set the sizes and dtypes. */
    FdmoeConfig cfg;
    check(fdmoe_config_init(&cfg), "fdmoe_config_init");
    cfg.backend = FDMOE_BACKEND_KIND_CPU;
    cfg.num_experts = NUM_EXPERTS;
    cfg.top_k = TOP_K;
    cfg.hidden_size = HIDDEN;
    cfg.intermediate_size = INTERMEDIATE;
    cfg.routing = FDMOE_ROUTING_SOFTMAX_TOPK; /* Qwen3-MoE: softmax, norm_topk_prob = true */
    cfg.renormalize = 1;
    cfg.activation = FDMOE_ACTIVATION_SWIGLU;
    cfg.act_dtype = FDMOE_DTYPE_F32;
    cfg.weight_dtype = FDMOE_DTYPE_F32;
    cfg.max_tokens = TOKENS; /* every buffer is sized for this many tokens */
    cfg.num_threads = 0;     /* one per core */

    FdmoeMemoryRequirements mem;
    memset(&mem, 0, sizeof mem);
    mem.struct_size = sizeof mem;
    check(fdmoe_query_memory(&cfg, &mem), "fdmoe_query_memory");
    printf("layer: E=%d top-%d H=%d I=%d, f32; host memory: %.1f MiB weights, %.1f MiB workspace\n",
           NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE, (double)mem.host_weight_bytes / 1048576.0,
           (double)mem.host_workspace_bytes / 1048576.0);

    /* 2. Create the layer: validates the config and allocates everything forward needs. */
    FdmoeBackend *layer = NULL;
    check(fdmoe_create_backend(&cfg, &layer), "fdmoe_create_backend");

    /* 3. Random weights scaled 1/sqrt(fan_in), and random input tokens. */
    const size_t w13_count = (size_t)NUM_EXPERTS * 2 * INTERMEDIATE * HIDDEN;
    const size_t w2_count = (size_t)NUM_EXPERTS * HIDDEN * INTERMEDIATE;
    float *w13 = xmalloc(w13_count * sizeof(float));
    float *w2 = xmalloc(w2_count * sizeof(float));
    float *gate = xmalloc((size_t)NUM_EXPERTS * HIDDEN * sizeof(float));
    float *x = xmalloc((size_t)TOKENS * HIDDEN * sizeof(float));
    float *out = xmalloc((size_t)TOKENS * HIDDEN * sizeof(float));
    fill_random(w13, w13_count, 1.0 / sqrt((double)HIDDEN));
    fill_random(w2, w2_count, 1.0 / sqrt((double)INTERMEDIATE));
    fill_random(gate, (size_t)NUM_EXPERTS * HIDDEN, 1.0 / sqrt((double)HIDDEN));
    fill_random(x, (size_t)TOKENS * HIDDEN, 1.0);

    /* The reference for the first tokens, while we still hold the weights. */
    static double ref_out[CHECKED][HIDDEN], ref_weights[CHECKED][TOP_K];
    int32_t ref_ids[CHECKED][TOP_K];
    for (size_t t = 0; t < CHECKED; ++t) {
        reference_token(x + t * HIDDEN, gate, w13, w2, ref_out[t], ref_ids[t], ref_weights[t]);
    }

    /* 4. Load the weights. OWN (the default) copies them into the library, so our buffers
     * can be freed right away; BORROW would keep our f32 pointers instead (no copy). */
    FdmoeWeights weights;
    check(fdmoe_weights_init(&weights), "fdmoe_weights_init");
    weights.layout = FDMOE_LAYOUT_TORCH;
    weights.dtype = FDMOE_DTYPE_F32;
    weights.ownership = FDMOE_OWNERSHIP_OWN;
    weights.w13 = w13;
    weights.w2 = w2;
    weights.gate = gate; /* [E, H] f32 (gate_layout / gate_dtype defaults) */
    double t0 = now_seconds();
    check(fdmoe_load_weights(layer, &weights), "fdmoe_load_weights");
    printf("weights loaded in %.2f s\n", now_seconds() - t0);
    free(w13);
    free(w2);
    free(gate);

    /* 5. Forward. The routing record (ids and final weights per token) is optional. */
    int32_t *topk_ids = xmalloc((size_t)TOKENS * TOP_K * sizeof(int32_t));
    float *topk_weights = xmalloc((size_t)TOKENS * TOP_K * sizeof(float));
    for (size_t i = 0; i < (size_t)TOKENS * HIDDEN; ++i) {
        out[i] = NAN; /* poison: every element must be written */
    }
    FdmoeForwardArgs args;
    check(fdmoe_forward_args_init(&args), "fdmoe_forward_args_init");
    args.num_tokens = TOKENS;
    args.x = x;
    args.out = out;
    args.topk_ids_out = topk_ids;
    args.topk_weights_out = topk_weights;
    check(fdmoe_forward(layer, &args), "fdmoe_forward");

    /* 6. Check against the reference. */
    size_t unwritten = 0;
    for (size_t i = 0; i < (size_t)TOKENS * HIDDEN; ++i) {
        unwritten += !isfinite(out[i]);
    }
    double diff2 = 0.0, ref2 = 0.0;
    int routing_matches = 1;
    for (size_t t = 0; t < CHECKED; ++t) {
        for (size_t h = 0; h < HIDDEN; ++h) {
            double d = (double)out[t * HIDDEN + h] - ref_out[t][h];
            diff2 += d * d;
            ref2 += ref_out[t][h] * ref_out[t][h];
        }
        for (size_t j = 0; j < TOP_K; ++j) {
            routing_matches &= topk_ids[t * TOP_K + j] == ref_ids[t][j];
        }
    }
    double rel_err = sqrt(diff2 / ref2);

    printf("routing of the first %d tokens (expert id: weight):\n", CHECKED);
    for (size_t t = 0; t < CHECKED; ++t) {
        printf("  token %zu:", t);
        for (size_t j = 0; j < TOP_K; ++j) {
            printf(" %3d:%.3f", topk_ids[t * TOP_K + j], topk_weights[t * TOP_K + j]);
        }
        printf("\n");
    }
    printf("check vs double reference (%d tokens): relative L2 error %.2e, routing %s, %zu unwritten\n",
           CHECKED, rel_err, routing_matches ? "identical" : "DIFFERENT", unwritten);

    /* 7. Time it: one warm-up, then the median of several forwards. */
    double times[TIMED_RUNS];
    check(fdmoe_forward(layer, &args), "fdmoe_forward (warm-up)");
    for (int r = 0; r < TIMED_RUNS; ++r) {
        double start = now_seconds();
        check(fdmoe_forward(layer, &args), "fdmoe_forward (timed)");
        times[r] = now_seconds() - start;
    }
    qsort(times, TIMED_RUNS, sizeof times[0], compare_doubles);
    double median = times[TIMED_RUNS / 2];
    double flops = 2.0 * TOKENS * TOP_K * 3.0 * HIDDEN * INTERMEDIATE;
    printf("forward of %d tokens: %.2f ms median of %d (%.0f tokens/s, %.1f GFLOP/s)\n", TOKENS,
           median * 1e3, TIMED_RUNS, TOKENS / median, flops / median * 1e-9);

    /* 8. Free the layer (weights, workspace, threads). */
    fdmoe_destroy_backend(layer);
    free(x);
    free(out);
    free(topk_ids);
    free(topk_weights);

    int ok = unwritten == 0 && routing_matches && rel_err <= 1e-4;
    printf("moe_forward: %s\n", ok ? "OK" : "FAILED");
    return ok ? 0 : 1;
}
