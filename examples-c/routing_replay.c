/* routing_replay: record the routing of one forward and replay it (rollout routing replay).
 *
 * RL trainers replay, in the training forward, exactly the experts the rollout engine chose.
 * libfdmoe supports both halves:
 *   - record: args.topk_ids_out / args.topk_weights_out receive the ids [T, k] and the final
 *     weights [T, k] (after renormalization and routed_scaling_factor) of every forward;
 *   - replay: args.topk_ids / args.topk_weights pass them back; no routing runs, and the
 *     weights are used as given (not rescaled).
 *
 * This program builds a DeepSeek-V3-style layer (grouped top-k with a correction bias and a
 * routed scaling factor, one shared expert, bf16 activations and weights), records one
 * forward, and replays it (a) on the same layer and (b) on a second layer created with
 * routing FDMOE_ROUTING_GIVEN, which has no router at all. All three outputs must be bitwise
 * identical. Exits non-zero otherwise.
 *
 * Build and run: make -C examples-c run LIBDIR=$PWD/target/release
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fdmoe.h"

enum {
    NUM_EXPERTS = 64,
    TOP_K = 6,
    N_GROUP = 8,
    TOPK_GROUP = 4,
    HIDDEN = 512,
    INTERMEDIATE = 256,
    SHARED = 256, /* one shared expert of the same size */
    TOKENS = 32,
};

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

/* bf16 is the top 16 bits of an f32; round to nearest even. (Finite inputs only.) */
static uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

static double uniform01(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}

/* n bf16 values, uniform with standard deviation `scale`. */
static uint16_t *random_bf16(size_t n, double scale) {
    uint16_t *p = xmalloc(n * sizeof(uint16_t));
    for (size_t i = 0; i < n; ++i) {
        p[i] = to_bf16((float)((2.0 * uniform01() - 1.0) * sqrt(3.0) * scale));
    }
    return p;
}

static float *random_f32(size_t n, double scale) {
    float *p = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; ++i) {
        p[i] = (float)((2.0 * uniform01() - 1.0) * sqrt(3.0) * scale);
    }
    return p;
}

/* bf16 values that are NaN or infinite (exponent bits all ones): a poisoned element the
 * forward did not write stays NaN. */
static size_t count_non_finite_bf16(const uint16_t *p, size_t n) {
    size_t bad = 0;
    for (size_t i = 0; i < n; ++i) {
        bad += (p[i] & 0x7f80u) == 0x7f80u;
    }
    return bad;
}

static FdmoeBackend *create_layer(uint32_t routing) {
    FdmoeConfig cfg;
    check(fdmoe_config_init(&cfg), "fdmoe_config_init");
    cfg.num_experts = NUM_EXPERTS;
    cfg.top_k = TOP_K;
    cfg.hidden_size = HIDDEN;
    cfg.intermediate_size = INTERMEDIATE;
    cfg.shared_intermediate_size = SHARED;
    cfg.routing = routing;
    if (routing == FDMOE_ROUTING_GROUPED_TOPK) {
        cfg.scoring = FDMOE_SCORING_SIGMOID;
        cfg.n_group = N_GROUP;
        cfg.topk_group = TOPK_GROUP;
        cfg.renormalize = 1;
        cfg.routed_scaling_factor = 2.5f;
    }
    cfg.act_dtype = FDMOE_DTYPE_BF16; /* the default; spelled out for the reader */
    cfg.weight_dtype = FDMOE_DTYPE_BF16;
    cfg.max_tokens = TOKENS;
    FdmoeBackend *layer = NULL;
    check(fdmoe_create_backend(&cfg, &layer), "fdmoe_create_backend");
    return layer;
}

/* Runs one forward of TOKENS tokens; the routing pointers may be NULL. */
static void forward(FdmoeBackend *layer, const uint16_t *x, uint16_t *out, const int32_t *ids_in,
                    const float *weights_in, int32_t *ids_out, float *weights_out) {
    memset(out, 0xff, (size_t)TOKENS * HIDDEN * sizeof(uint16_t)); /* NaN poison */
    FdmoeForwardArgs args;
    check(fdmoe_forward_args_init(&args), "fdmoe_forward_args_init");
    args.num_tokens = TOKENS;
    args.x = x;
    args.out = out;
    args.topk_ids = ids_in;
    args.topk_weights = weights_in;
    args.topk_ids_out = ids_out;
    args.topk_weights_out = weights_out;
    check(fdmoe_forward(layer, &args), "fdmoe_forward");
}

int main(void) {
    const size_t out_bytes = (size_t)TOKENS * HIDDEN * sizeof(uint16_t);
    const size_t slots = (size_t)TOKENS * TOP_K;

    /* The layer's weights, TORCH layout, bf16; router gate [E, H] and bias [E] in f32. */
    uint16_t *w13 = random_bf16((size_t)NUM_EXPERTS * 2 * INTERMEDIATE * HIDDEN, 1.0 / sqrt(HIDDEN));
    uint16_t *w2 = random_bf16((size_t)NUM_EXPERTS * HIDDEN * INTERMEDIATE, 1.0 / sqrt(INTERMEDIATE));
    uint16_t *shared_w13 = random_bf16((size_t)2 * SHARED * HIDDEN, 1.0 / sqrt(HIDDEN));
    uint16_t *shared_w2 = random_bf16((size_t)HIDDEN * SHARED, 1.0 / sqrt(SHARED));
    float *gate = random_f32((size_t)NUM_EXPERTS * HIDDEN, 1.0 / sqrt(HIDDEN));
    float *bias = random_f32(NUM_EXPERTS, 0.1);
    uint16_t *x = random_bf16((size_t)TOKENS * HIDDEN, 1.0);

    FdmoeWeights weights;
    check(fdmoe_weights_init(&weights), "fdmoe_weights_init");
    weights.layout = FDMOE_LAYOUT_TORCH;
    weights.dtype = FDMOE_DTYPE_BF16;
    weights.w13 = w13;
    weights.w2 = w2;
    weights.shared_w13 = shared_w13;
    weights.shared_w2 = shared_w2;
    weights.gate = gate;
    weights.correction_bias = bias;

    /* Layer 1: routes with its own router. */
    FdmoeBackend *routed = create_layer(FDMOE_ROUTING_GROUPED_TOPK);
    check(fdmoe_load_weights(routed, &weights), "fdmoe_load_weights (routed)");

    /* Layer 2: the same experts, no router: every forward must pass the routing. */
    FdmoeBackend *replayer = create_layer(FDMOE_ROUTING_GIVEN);
    FdmoeWeights expert_weights = weights;
    expert_weights.gate = NULL;
    expert_weights.correction_bias = NULL;
    check(fdmoe_load_weights(replayer, &expert_weights), "fdmoe_load_weights (given)");

    /* 1. Rollout: forward and record the routing. */
    uint16_t *out_rollout = xmalloc(out_bytes), *out_same = xmalloc(out_bytes);
    uint16_t *out_given = xmalloc(out_bytes);
    int32_t *ids = xmalloc(slots * sizeof(int32_t)), *ids_again = xmalloc(slots * sizeof(int32_t));
    float *topk_weights = xmalloc(slots * sizeof(float));
    float *weights_again = xmalloc(slots * sizeof(float));
    forward(routed, x, out_rollout, NULL, NULL, ids, topk_weights);

    /* 2. Replay on the same layer; its record is the routing it was given. */
    forward(routed, x, out_same, ids, topk_weights, ids_again, weights_again);

    /* 3. Replay on the router-less layer. */
    forward(replayer, x, out_given, ids, topk_weights, NULL, NULL);

    size_t unwritten = count_non_finite_bf16(out_rollout, (size_t)TOKENS * HIDDEN);
    int same_layer = memcmp(out_rollout, out_same, out_bytes) == 0;
    int given_layer = memcmp(out_rollout, out_given, out_bytes) == 0;
    int record_kept = memcmp(ids, ids_again, slots * sizeof(int32_t)) == 0 &&
                      memcmp(topk_weights, weights_again, slots * sizeof(float)) == 0;

    printf("layer: E=%d top-%d grouped (%d groups, keep %d), scaling 2.5, H=%d I=%d, 1 shared, bf16\n",
           NUM_EXPERTS, TOP_K, N_GROUP, TOPK_GROUP, HIDDEN, INTERMEDIATE);
    printf("recorded routing of %d tokens; token 0:", TOKENS);
    float weight_sum = 0.0f;
    for (size_t j = 0; j < TOP_K; ++j) {
        printf(" %d:%.3f", ids[j], topk_weights[j]);
        weight_sum += topk_weights[j];
    }
    printf(" (weights sum to %.3f = routed_scaling_factor)\n", weight_sum);
    printf("replay on the same layer:   output %s\n", same_layer ? "bitwise identical" : "DIFFERENT");
    printf("replay on a GIVEN layer:    output %s\n", given_layer ? "bitwise identical" : "DIFFERENT");
    printf("record of the replay:       %s\n", record_kept ? "equals the given routing" : "DIFFERENT");
    printf("unwritten or non-finite outputs: %zu\n", unwritten);

    fdmoe_destroy_backend(routed);
    fdmoe_destroy_backend(replayer);
    free(w13);
    free(w2);
    free(shared_w13);
    free(shared_w2);
    free(gate);
    free(bias);
    free(x);
    free(out_rollout);
    free(out_same);
    free(out_given);
    free(ids);
    free(ids_again);
    free(topk_weights);
    free(weights_again);

    int ok = unwritten == 0 && same_layer && given_layer && record_kept;
    printf("routing_replay: %s\n", ok ? "OK" : "FAILED");
    return ok ? 0 : 1;
}
