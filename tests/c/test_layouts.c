/* Numerical checks of fdmoe_forward on the CPU backend against the double-precision reference
 * in ref.h: every weight layout and ownership, every routing mode, latent, shared experts,
 * every activation, bf16/f16 activations and weights, given routing and the routing record.
 *
 * Each case builds a random layer, loads it (OWN copies are freed right after the load, so a
 * library that kept the caller's pointers would read freed memory, which valgrind reports),
 * poisons the outputs with NaN, runs one forward, and checks: every element written, relative
 * L2 error within tolerance (f32: 1e-5, bf16/f16: 1e-2), the recorded routing equal to the
 * reference, and a second forward bitwise equal to the first.
 */
#include "ref.h"

typedef struct {
    WeightOptions w;
    uint32_t act_dtype;    /* config.act_dtype */
    uint32_t weight_dtype; /* config.weight_dtype */
    int use_logits;        /* pass args.router_logits instead of computing them from the gate */
    int given;             /* pass random args.topk_ids / topk_weights */
    size_t T;
    uint32_t max_tokens;
    double x_scale;
    double tol;
} RunOptions;

static RunOptions run_options(uint32_t layout) {
    RunOptions o;
    memset(&o, 0, sizeof o);
    o.w = weight_options(layout);
    o.act_dtype = FDMOE_DTYPE_F32;
    o.weight_dtype = FDMOE_DTYPE_F32;
    o.T = 5;
    o.max_tokens = 16;
    o.x_scale = 1.0;
    o.tol = 1e-5;
    return o;
}

/* What one case produced, for comparisons across cases. */
typedef struct {
    float *out; /* [T, H] decoded to f32 */
    int32_t *ids;
    size_t n;
} RunResult;

static void result_free(RunResult *r) {
    free(r->out);
    free(r->ids);
    memset(r, 0, sizeof *r);
}

/* Runs one case. `seed` names the random stream: cases with the same seed and sizes see the
 * same layer and inputs, so their outputs can be compared with each other. */
static int run_case(const char *name, const char *seed, const LayerSpec *spec,
                    const RunOptions *o, RunResult *result) {
    long failed_before = *check_counter(1);
    Rng rng = rng_for(seed);
    Layer ly;
    layer_init(&ly, spec, &rng);
    /* The values the library keeps: the caller's dtype, then config.weight_dtype. */
    if (o->w.dtype != FDMOE_DTYPE_F32) {
        layer_round_weights(&ly, o->w.dtype);
    }
    if (o->weight_dtype != FDMOE_DTYPE_F32) {
        layer_round_weights(&ly, o->weight_dtype);
    }
    round_all(ly.gate, ly.E * ly.H, o->w.gate_dtype);
    size_t T = o->T, H = ly.H, E = ly.E, k = ly.k;

    FdmoeConfig cfg;
    layer_config(&ly, &cfg, o->max_tokens);
    cfg.act_dtype = o->act_dtype;
    cfg.weight_dtype = o->weight_dtype;
    FdmoeBackend *b = NULL;
    WeightSet ws;
    WeightOptions wo = o->w;
    if (o->use_logits || spec->routing == FDMOE_ROUTING_GIVEN) {
        wo.gate = GATE_NONE;
    }
    weightset_build(&ws, &ly, &wo);
    int ready = CHECK_OK(fdmoe_create_backend(&cfg, &b)) && CHECK_OK(fdmoe_load_weights(b, &ws.w));
    if (o->w.ownership == FDMOE_OWNERSHIP_OWN) {
        weightset_free(&ws, E); /* OWN: the library must not need them any more */
    }

    /* Inputs, resampled while some token's routing is too close to call in f32. */
    float *x = alloc_f32(T * H), *logits = alloc_f32(T * E), *given_w = alloc_f32(T * k);
    int32_t *given_ids = (int32_t *)xmalloc(T * k * sizeof(int32_t));
    double *ref = (double *)xmalloc(T * H * sizeof(double));
    double *ref_w = (double *)xmalloc(T * k * sizeof(double));
    int32_t *ref_ids = (int32_t *)xmalloc(T * k * sizeof(int32_t));
    int given = o->given || spec->routing == FDMOE_ROUTING_GIVEN;
    for (int attempt = 0; attempt < 20; ++attempt) {
        fill_normal(&rng, x, T * H, o->x_scale);
        round_all(x, T * H, o->act_dtype);
        fill_normal(&rng, logits, T * E, 1.0);
        for (size_t i = 0; i < T * k; ++i) {
            given_ids[i] = (int32_t)rng_below(&rng, (uint32_t)E); /* repeats allowed */
            given_w[i] = (float)rng_uniform(&rng);
        }
        double margin = ref_forward(&ly, T, x, o->use_logits ? logits : NULL,
                                    given ? given_ids : NULL, given_w, ref, ref_ids, ref_w);
        if (margin > 1e-4) {
            break;
        }
    }

    size_t esize = dtype_size(o->act_dtype);
    void *xin = encode(x, T * H, o->act_dtype);
    void *out = xmalloc(T * H * esize), *out2 = xmalloc(T * H * esize);
    memset(out, 0xff, T * H * esize); /* NaN in f32, bf16 and f16 */
    memset(out2, 0xff, T * H * esize);
    int32_t *ids = (int32_t *)xmalloc(T * k * sizeof(int32_t)), *ids2 = (int32_t *)xmalloc(T * k * sizeof(int32_t));
    float *wts = alloc_f32(T * k), *wts2 = alloc_f32(T * k);
    poison_i32(ids, T * k);
    poison_f32(wts, T * k);
    poison_i32(ids2, T * k);
    poison_f32(wts2, T * k);

    FdmoeForwardArgs args;
    fdmoe_forward_args_init(&args);
    args.num_tokens = (uint32_t)T;
    args.x = xin;
    args.out = out;
    args.router_logits = o->use_logits ? logits : NULL;
    args.topk_ids = given ? given_ids : NULL;
    args.topk_weights = given ? given_w : NULL;
    args.topk_ids_out = ids;
    args.topk_weights_out = wts;
    float *got = alloc_f32(T * H);
    if (ready && CHECK_OK(fdmoe_forward(b, &args))) {
        CHECK(strcmp(fdmoe_last_error_message(), "") == 0, "%s: message after success", name);
        decode(out, T * H, o->act_dtype, got);
        size_t bad = count_non_finite(got, T * H);
        CHECK(bad == 0, "%s: %zu of %zu outputs not written (or not finite)", name, bad, T * H);
        double err = rel_l2(got, ref, T * H);
        CHECK(err <= o->tol, "%s: relative L2 error %.3g > %.1g", name, err, o->tol);
        size_t id_mismatch = 0;
        double w_err = 0.0;
        for (size_t i = 0; i < T * k; ++i) {
            id_mismatch += ids[i] != ref_ids[i];
            double d = fabs((double)wts[i] - ref_w[i]);
            w_err = d > w_err ? d : w_err;
        }
        CHECK(id_mismatch == 0, "%s: %zu recorded ids differ from the reference (first %d vs %d)",
              name, id_mismatch, ids[0], ref_ids[0]);
        CHECK(w_err <= 1e-5, "%s: recorded weights differ from the reference by %.3g", name,
              w_err);
        /* Determinism: the same call again gives bitwise the same output and record. */
        args.out = out2;
        args.topk_ids_out = ids2;
        args.topk_weights_out = wts2;
        if (CHECK_OK(fdmoe_forward(b, &args))) {
            CHECK(memcmp(out, out2, T * H * esize) == 0, "%s: second forward differs", name);
            CHECK(memcmp(ids, ids2, T * k * sizeof(int32_t)) == 0 &&
                      memcmp(wts, wts2, T * k * sizeof(float)) == 0,
                  "%s: second routing record differs", name);
        }
    }
    fdmoe_destroy_backend(b);
    if (o->w.ownership == FDMOE_OWNERSHIP_BORROW) {
        weightset_free(&ws, E); /* BORROW: only after destroy */
    }
    if (result != NULL) {
        result->out = got;
        result->ids = ids;
        result->n = T * H;
    } else {
        free(got);
        free(ids);
    }
    free(x);
    free(xin);
    free(logits);
    free(given_w);
    free(given_ids);
    free(ref);
    free(ref_w);
    free(ref_ids);
    free(out);
    free(out2);
    free(ids2);
    free(wts);
    free(wts2);
    layer_free(&ly);
    int ok = *check_counter(1) == failed_before;
    if (!ok) {
        printf("  (in case %s)\n", name);
    }
    return ok;
}

/* Same layer in every layout and ownership: each matches the reference, BORROW is bitwise
 * equal to OWN, and the layouts agree with each other. */
static void test_layouts_agree(void) {
    LayerSpec spec = spec_small();
    const uint32_t layouts[3] = {FDMOE_LAYOUT_TORCH, FDMOE_LAYOUT_PADDLE, FDMOE_LAYOUT_PER_EXPERT};
    const char *names[3] = {"torch", "paddle", "per_expert"};
    RunResult own[3], borrow[3];
    for (int i = 0; i < 3; ++i) {
        char name[64];
        RunOptions o = run_options(layouts[i]);
        snprintf(name, sizeof name, "layout %s own", names[i]);
        run_case(name, "base", &spec, &o, &own[i]);
        o.w.ownership = FDMOE_OWNERSHIP_BORROW;
        snprintf(name, sizeof name, "layout %s borrow", names[i]);
        run_case(name, "base", &spec, &o, &borrow[i]);
        CHECK(own[i].out != NULL && borrow[i].out != NULL &&
                  memcmp(own[i].out, borrow[i].out, own[i].n * sizeof(float)) == 0,
              "layout %s: BORROW output differs from OWN", names[i]);
    }
    for (int i = 1; i < 3; ++i) {
        double d = rel_l2_f32(own[i].out, own[0].out, own[0].n);
        CHECK(d <= 1e-6, "layout %s differs from torch by %.3g", names[i], d);
        CHECK(memcmp(own[i].ids, own[0].ids, 5 * spec.top_k * sizeof(int32_t)) == 0,
              "layout %s routes differently from torch", names[i]);
    }
    for (int i = 0; i < 3; ++i) {
        result_free(&own[i]);
        result_free(&borrow[i]);
    }

    /* Gate/up interleaved rows (gpt-oss checkpoints), stacked layouts. */
    RunOptions o = run_options(FDMOE_LAYOUT_TORCH);
    o.w.interleaved = 1;
    run_case("torch interleaved", "base", &spec, &o, NULL);
    o = run_options(FDMOE_LAYOUT_PADDLE);
    o.w.interleaved = 1;
    run_case("paddle interleaved", "base", &spec, &o, NULL);
    o.w.ownership = FDMOE_OWNERSHIP_BORROW;
    run_case("paddle interleaved borrow", "base", &spec, &o, NULL);

    /* Gate [H, E] and a bf16 gate; router logits from the caller instead of a gate. */
    o = run_options(FDMOE_LAYOUT_TORCH);
    o.w.gate = GATE_HIDDEN_BY_EXPERTS;
    run_case("gate hidden_by_experts", "base", &spec, &o, NULL);
    o.w.gate_dtype = FDMOE_DTYPE_BF16;
    run_case("gate hidden_by_experts bf16", "base", &spec, &o, NULL);
    o = run_options(FDMOE_LAYOUT_TORCH);
    o.w.gate_dtype = FDMOE_DTYPE_F16;
    run_case("gate f16", "base", &spec, &o, NULL);
    o = run_options(FDMOE_LAYOUT_TORCH);
    o.use_logits = 1;
    run_case("router logits (no gate)", "base", &spec, &o, NULL);
}

static void test_routing_modes(void) {
    const uint32_t layouts[3] = {FDMOE_LAYOUT_TORCH, FDMOE_LAYOUT_PADDLE, FDMOE_LAYOUT_PER_EXPERT};
    LayerSpec spec = spec_small();
    RunOptions o = run_options(FDMOE_LAYOUT_TORCH);

    spec.renormalize = 0;
    run_case("softmax no renormalize", "routing", &spec, &o, NULL);
    spec.routed_scaling_factor = 0.5f;
    run_case("softmax scaled", "routing", &spec, &o, NULL);

    spec = spec_small();
    spec.routing = FDMOE_ROUTING_SIGMOID_TOPK;
    run_case("sigmoid renormalize", "routing", &spec, &o, NULL);
    spec.renormalize = 0;
    spec.routed_scaling_factor = 2.5f;
    run_case("sigmoid scaled", "routing", &spec, &o, NULL);
    o.use_logits = 1;
    run_case("sigmoid logits", "routing", &spec, &o, NULL);

    /* Grouped top-k: 8 experts in 4 groups, 2 groups kept, top-3. */
    spec = spec_small();
    spec.num_experts = 8;
    spec.top_k = 3;
    spec.routing = FDMOE_ROUTING_GROUPED_TOPK;
    spec.n_group = 4;
    spec.topk_group = 2;
    for (int l = 0; l < 3; ++l) {
        o = run_options(layouts[l]);
        run_case("grouped no bias", "grouped", &spec, &o, NULL);
    }
    spec.with_bias = 1;
    for (int l = 0; l < 3; ++l) {
        o = run_options(layouts[l]);
        run_case("grouped bias", "grouped", &spec, &o, NULL);
    }
    o = run_options(FDMOE_LAYOUT_TORCH);
    o.use_logits = 1;
    run_case("grouped bias logits", "grouped", &spec, &o, NULL);
    spec.scoring = FDMOE_SCORING_SOFTMAX;
    o.use_logits = 0;
    run_case("grouped softmax scoring bias", "grouped", &spec, &o, NULL);
    spec.with_bias = 0;
    run_case("grouped softmax scoring", "grouped", &spec, &o, NULL);
    spec.scoring = FDMOE_SCORING_SIGMOID;
    spec.with_bias = 1;
    spec.renormalize = 0;
    spec.routed_scaling_factor = 2.5f;
    run_case("grouped scaled no renormalize", "grouped", &spec, &o, NULL);
    /* One group per expert (n_group = E) and every group kept. */
    spec = spec_small();
    spec.routing = FDMOE_ROUTING_GROUPED_TOPK;
    spec.n_group = 4;
    spec.topk_group = 4;
    spec.with_bias = 1;
    run_case("grouped groups of one", "grouped", &spec, &o, NULL);

    /* Given routing: a GIVEN layer (no gate), and given ids overriding a softmax layer. */
    spec = spec_small();
    spec.routing = FDMOE_ROUTING_GIVEN;
    for (int l = 0; l < 3; ++l) {
        o = run_options(layouts[l]);
        run_case("given routing layer", "given", &spec, &o, NULL);
    }
    spec = spec_small();
    spec.routed_scaling_factor = 3.0f; /* given weights are final: never rescaled */
    o = run_options(FDMOE_LAYOUT_TORCH);
    o.given = 1;
    run_case("given ids on a softmax layer", "given", &spec, &o, NULL);
}

static void test_latent_shared_activations(void) {
    const uint32_t layouts[3] = {FDMOE_LAYOUT_TORCH, FDMOE_LAYOUT_PADDLE, FDMOE_LAYOUT_PER_EXPERT};
    for (int l = 0; l < 3; ++l) {
        RunOptions o = run_options(layouts[l]);
        LayerSpec spec = spec_small();
        spec.latent_size = 8;
        run_case("latent", "latent", &spec, &o, NULL);
        spec = spec_small();
        spec.shared_size = 12;
        run_case("shared", "shared", &spec, &o, NULL);
        spec.latent_size = 8;
        spec.num_experts = 8;
        spec.routing = FDMOE_ROUTING_GROUPED_TOPK;
        spec.n_group = 2;
        spec.topk_group = 1;
        spec.with_bias = 1;
        run_case("latent shared grouped", "latent shared", &spec, &o, NULL);
        o.w.ownership = FDMOE_OWNERSHIP_BORROW;
        run_case("latent shared grouped borrow", "latent shared", &spec, &o, NULL);
    }
    LayerSpec spec = spec_small();
    RunOptions o = run_options(FDMOE_LAYOUT_TORCH);
    spec.activation = FDMOE_ACTIVATION_GELU_TANH_AND_MUL;
    run_case("gelu_tanh_and_mul", "act", &spec, &o, NULL);
    spec.shared_size = 12;
    run_case("gelu_tanh_and_mul shared", "act", &spec, &o, NULL);
    spec = spec_small();
    spec.activation = FDMOE_ACTIVATION_SWIGLUOAI;
    o.x_scale = 6.0; /* large enough that the +-7 clamps engage */
    run_case("swigluoai", "act", &spec, &o, NULL);
    o = run_options(FDMOE_LAYOUT_PADDLE);
    o.w.interleaved = 1;
    run_case("swigluoai paddle interleaved", "act", &spec, &o, NULL);
}

static void test_dtypes_and_sizes(void) {
    LayerSpec spec = spec_small();
    RunOptions o = run_options(FDMOE_LAYOUT_TORCH);
    o.tol = 1e-2;
    o.act_dtype = FDMOE_DTYPE_BF16;
    run_case("bf16 activations f32 weights", "dtype", &spec, &o, NULL);
    o.weight_dtype = FDMOE_DTYPE_BF16;
    run_case("bf16 activations bf16 weights (converted at load)", "dtype", &spec, &o, NULL);
    o.w.dtype = FDMOE_DTYPE_BF16;
    run_case("bf16 activations bf16 weights (given as bf16)", "dtype", &spec, &o, NULL);
    o = run_options(FDMOE_LAYOUT_PER_EXPERT);
    o.tol = 1e-2;
    o.act_dtype = FDMOE_DTYPE_F16;
    o.weight_dtype = FDMOE_DTYPE_F16;
    o.w.dtype = FDMOE_DTYPE_F16;
    run_case("f16 per_expert", "dtype", &spec, &o, NULL);
    spec.latent_size = 8;
    spec.shared_size = 12;
    o = run_options(FDMOE_LAYOUT_PADDLE);
    o.tol = 1e-2;
    o.act_dtype = FDMOE_DTYPE_BF16;
    o.weight_dtype = FDMOE_DTYPE_BF16;
    o.w.dtype = FDMOE_DTYPE_F16; /* f16 in, kept as bf16 */
    run_case("bf16 latent shared paddle from f16", "dtype", &spec, &o, NULL);

    /* Sizes: one token, T = max_tokens, and enough tokens that experts span several tasks. */
    spec = spec_small();
    o = run_options(FDMOE_LAYOUT_TORCH);
    o.T = 1;
    run_case("one token", "sizes", &spec, &o, NULL);
    o.T = 16;
    run_case("T = max_tokens", "sizes", &spec, &o, NULL);
    o.T = 300;
    o.max_tokens = 300;
    run_case("300 tokens", "sizes", &spec, &o, NULL);
    spec.num_experts = 16;
    spec.top_k = 4;
    spec.hidden_size = 40;
    spec.intermediate_size = 24;
    o.T = 33;
    o.max_tokens = 64;
    run_case("E=16 k=4 H=40 I=24", "sizes", &spec, &o, NULL);
    spec.top_k = 16;
    o.T = 3;
    run_case("top_k = num_experts", "sizes", &spec, &o, NULL);
}

/* A second fdmoe_load_weights replaces the first set; a failed one leaves the current set. */
static void test_reload(void) {
    Rng rng = rng_for("reload");
    LayerSpec spec = spec_small();
    Layer a, b2;
    layer_init(&a, &spec, &rng);
    layer_init(&b2, &spec, &rng);
    size_t T = 5, H = a.H, k = a.k;
    FdmoeConfig cfg;
    layer_config(&a, &cfg, 8);
    FdmoeBackend *b = NULL;
    if (!CHECK_OK(fdmoe_create_backend(&cfg, &b))) {
        return;
    }
    WeightOptions wo = weight_options(FDMOE_LAYOUT_TORCH);
    WeightSet wa, wb;
    weightset_build(&wa, &a, &wo);
    wo.layout = FDMOE_LAYOUT_PER_EXPERT;
    weightset_build(&wb, &b2, &wo);
    float *x = alloc_f32(T * H), *out = alloc_f32(T * H);
    fill_normal(&rng, x, T * H, 1.0);
    double *ref_a = (double *)xmalloc(T * H * sizeof(double));
    double *ref_b = (double *)xmalloc(T * H * sizeof(double));
    double *rw = (double *)xmalloc(T * k * sizeof(double));
    int32_t *rid = (int32_t *)xmalloc(T * k * sizeof(int32_t));
    ref_forward(&a, T, x, NULL, NULL, NULL, ref_a, rid, rw);
    ref_forward(&b2, T, x, NULL, NULL, NULL, ref_b, rid, rw);
    FdmoeForwardArgs args;
    fdmoe_forward_args_init(&args);
    args.num_tokens = (uint32_t)T;
    args.x = x;
    args.out = out;

    CHECK_OK(fdmoe_load_weights(b, &wa.w));
    poison_f32(out, T * H);
    if (CHECK_OK(fdmoe_forward(b, &args))) {
        CHECK(rel_l2(out, ref_a, T * H) <= 1e-5, "first weights: error %.3g",
              rel_l2(out, ref_a, T * H));
    }
    CHECK_OK(fdmoe_load_weights(b, &wb.w));
    poison_f32(out, T * H);
    if (CHECK_OK(fdmoe_forward(b, &args))) {
        CHECK(rel_l2(out, ref_b, T * H) <= 1e-5, "second weights replace the first: error %.3g",
              rel_l2(out, ref_b, T * H));
    }
    /* A load that fails validation keeps the weights loaded before it. */
    FdmoeWeights broken = wa.w;
    broken.w2 = NULL;
    CHECK_STATUS(fdmoe_load_weights(b, &broken), FDMOE_STATUS_NULL_ARGUMENT);
    poison_f32(out, T * H);
    if (CHECK_OK(fdmoe_forward(b, &args))) {
        CHECK(rel_l2(out, ref_b, T * H) <= 1e-5, "failed load kept the previous weights: %.3g",
              rel_l2(out, ref_b, T * H));
    }
    /* Back to the first set, from a different layout. */
    weightset_free(&wa, a.E);
    wo.layout = FDMOE_LAYOUT_PADDLE;
    weightset_build(&wa, &a, &wo);
    CHECK_OK(fdmoe_load_weights(b, &wa.w));
    weightset_free(&wa, a.E);
    weightset_free(&wb, b2.E);
    poison_f32(out, T * H);
    if (CHECK_OK(fdmoe_forward(b, &args))) {
        CHECK(rel_l2(out, ref_a, T * H) <= 1e-5, "third load: error %.3g",
              rel_l2(out, ref_a, T * H));
    }
    fdmoe_destroy_backend(b);
    free(x);
    free(out);
    free(ref_a);
    free(ref_b);
    free(rw);
    free(rid);
    layer_free(&a);
    layer_free(&b2);
}

/* Routing replay: the record of one forward, passed back as given routing, reproduces the
 * output bitwise, on the same layer and on a GIVEN layer with the same expert weights. */
static void test_replay(void) {
    Rng rng = rng_for("replay");
    LayerSpec spec = spec_small();
    spec.num_experts = 8;
    spec.top_k = 3;
    spec.routing = FDMOE_ROUTING_GROUPED_TOPK;
    spec.n_group = 4;
    spec.topk_group = 2;
    spec.with_bias = 1;
    spec.routed_scaling_factor = 2.5f;
    spec.shared_size = 12;
    Layer ly;
    layer_init(&ly, &spec, &rng);
    size_t T = 7, H = ly.H, k = ly.k;
    FdmoeConfig cfg;
    layer_config(&ly, &cfg, 8);
    FdmoeBackend *routed = NULL, *given = NULL;
    WeightOptions wo = weight_options(FDMOE_LAYOUT_TORCH);
    WeightSet ws;
    weightset_build(&ws, &ly, &wo);
    CHECK_OK(fdmoe_create_backend(&cfg, &routed));
    CHECK_OK(fdmoe_load_weights(routed, &ws.w));
    cfg.routing = FDMOE_ROUTING_GIVEN;
    cfg.n_group = 1;
    cfg.topk_group = 1;
    FdmoeWeights gw = ws.w;
    gw.gate = NULL;
    gw.correction_bias = NULL;
    CHECK_OK(fdmoe_create_backend(&cfg, &given));
    CHECK_OK(fdmoe_load_weights(given, &gw));
    weightset_free(&ws, ly.E);

    float *x = alloc_f32(T * H), *out = alloc_f32(T * H), *out_same = alloc_f32(T * H);
    float *out_given = alloc_f32(T * H), *w = alloc_f32(T * k), *w2 = alloc_f32(T * k);
    int32_t *ids = (int32_t *)xmalloc(T * k * sizeof(int32_t));
    int32_t *ids2 = (int32_t *)xmalloc(T * k * sizeof(int32_t));
    fill_normal(&rng, x, T * H, 1.0);
    poison_f32(out, T * H);
    poison_f32(out_same, T * H);
    poison_f32(out_given, T * H);
    poison_i32(ids, T * k);
    poison_f32(w, T * k);
    FdmoeForwardArgs args;
    fdmoe_forward_args_init(&args);
    args.num_tokens = (uint32_t)T;
    args.x = x;
    args.out = out;
    args.topk_ids_out = ids;
    args.topk_weights_out = w;
    CHECK_OK(fdmoe_forward(routed, &args));
    CHECK(count_non_finite(out, T * H) == 0, "recorded forward wrote every output");

    args.out = out_same;
    args.topk_ids = ids;
    args.topk_weights = w;
    args.topk_ids_out = ids2; /* the record of a replay is the given routing */
    args.topk_weights_out = w2;
    poison_i32(ids2, T * k);
    poison_f32(w2, T * k);
    CHECK_OK(fdmoe_forward(routed, &args));
    CHECK(memcmp(out, out_same, T * H * sizeof(float)) == 0, "replay on the same layer is bitwise equal");
    CHECK(memcmp(ids, ids2, T * k * sizeof(int32_t)) == 0 && memcmp(w, w2, T * k * sizeof(float)) == 0,
          "the record of a replay equals the given routing");
    args.out = out_given;
    args.topk_ids_out = NULL;
    args.topk_weights_out = NULL;
    CHECK_OK(fdmoe_forward(given, &args));
    CHECK(memcmp(out, out_given, T * H * sizeof(float)) == 0, "replay on a GIVEN layer is bitwise equal");

    fdmoe_destroy_backend(routed);
    fdmoe_destroy_backend(given);
    free(x);
    free(out);
    free(out_same);
    free(out_given);
    free(w);
    free(w2);
    free(ids);
    free(ids2);
    layer_free(&ly);
}

/* Tokens are independent: one call over T tokens equals T calls of one token (to rounding),
 * and FORCE_EAGER changes nothing on the CPU. */
static void test_token_independence(void) {
    Rng rng = rng_for("independence");
    LayerSpec spec = spec_small();
    spec.shared_size = 12;
    Layer ly;
    layer_init(&ly, &spec, &rng);
    size_t T = 6, H = ly.H;
    FdmoeConfig cfg;
    layer_config(&ly, &cfg, 8);
    FdmoeBackend *b = NULL;
    WeightOptions wo = weight_options(FDMOE_LAYOUT_TORCH);
    WeightSet ws;
    weightset_build(&ws, &ly, &wo);
    CHECK_OK(fdmoe_create_backend(&cfg, &b));
    CHECK_OK(fdmoe_load_weights(b, &ws.w));
    weightset_free(&ws, ly.E);
    float *x = alloc_f32(T * H), *all = alloc_f32(T * H), *one = alloc_f32(T * H);
    float *eager = alloc_f32(T * H);
    fill_normal(&rng, x, T * H, 1.0);
    poison_f32(all, T * H);
    poison_f32(one, T * H);
    poison_f32(eager, T * H);
    FdmoeForwardArgs args;
    fdmoe_forward_args_init(&args);
    args.num_tokens = (uint32_t)T;
    args.x = x;
    args.out = all;
    CHECK_OK(fdmoe_forward(b, &args));
    args.flags = FDMOE_FORWARD_FORCE_EAGER;
    args.out = eager;
    CHECK_OK(fdmoe_forward(b, &args));
    CHECK(memcmp(all, eager, T * H * sizeof(float)) == 0, "FORCE_EAGER gives the same output");
    args.flags = 0;
    for (size_t t = 0; t < T; ++t) {
        args.num_tokens = 1;
        args.x = x + t * H;
        args.out = one + t * H;
        CHECK_OK(fdmoe_forward(b, &args));
    }
    double d = rel_l2_f32(one, all, T * H);
    CHECK(count_non_finite(one, T * H) == 0 && d <= 1e-6,
          "token by token vs all at once: %.3g", d);
    fdmoe_destroy_backend(b);
    free(x);
    free(all);
    free(one);
    free(eager);
    layer_free(&ly);
}

int main(void) {
    printf("test_layouts (seed %llu)\n", (unsigned long long)test_seed());
    test_layouts_agree();
    test_routing_modes();
    test_latent_shared_activations();
    test_dtypes_and_sizes();
    test_reload();
    test_replay();
    test_token_independence();
    return check_finish();
}
