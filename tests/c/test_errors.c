/* Every error path of the C API: each call returns the documented status, the thread's last
 * error message names the argument or feature at fault, failed calls write nothing (handles
 * stay NULL, outputs stay poisoned), and the handle keeps working after a failed call.
 */
#include "ref.h"

/* ---- Helpers: a valid small layer to break one field at a time. ---- */

static void base_config(FdmoeConfig *cfg) {
    fdmoe_config_init(cfg);
    cfg->num_experts = 4;
    cfg->top_k = 2;
    cfg->hidden_size = 24;
    cfg->intermediate_size = 16;
    cfg->act_dtype = FDMOE_DTYPE_F32;
    cfg->weight_dtype = FDMOE_DTYPE_F32;
    cfg->max_tokens = 8;
    cfg->num_threads = 2;
}

/* create_backend fails with `expected`, the message mentions `needle`, and the handle is
 * set to NULL; query_memory validates the same way. */
#define EXPECT_CREATE_FAILS(cfg, expected, needle)                                          \
    do {                                                                                    \
        FdmoeBackend *h_ = (FdmoeBackend *)(uintptr_t)0x1;                                  \
        CHECK_STATUS(fdmoe_create_backend((cfg), &h_), (expected));                         \
        CHECK_MESSAGE_HAS(needle);                                                          \
        CHECK(h_ == NULL, "a failed create sets *backend to NULL");                         \
        FdmoeMemoryRequirements m_;                                                         \
        memset(&m_, 0, sizeof m_);                                                          \
        m_.struct_size = (uint32_t)sizeof m_;                                               \
        CHECK_STATUS(fdmoe_query_memory((cfg), &m_), (expected));                           \
        CHECK_MESSAGE_HAS(needle);                                                          \
    } while (0)

/* A config with one unknown-but-larger tail: what a newer header's caller would pass. */
typedef struct {
    FdmoeConfig cfg;
    uint64_t tail[4];
} FutureConfig;

typedef struct {
    FdmoeWeights w;
    uint64_t tail[4];
} FutureWeights;

typedef struct {
    FdmoeForwardArgs a;
    uint64_t tail[4];
} FutureArgs;

static void test_config_errors(void) {
    FdmoeConfig cfg;
    FdmoeBackend *b = NULL;

    /* NULL pointers. */
    base_config(&cfg);
    CHECK_STATUS(fdmoe_create_backend(NULL, &b), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("config");
    CHECK(b == NULL, "no handle after NULL config");
    CHECK_STATUS(fdmoe_create_backend(&cfg, NULL), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("backend");
    CHECK_STATUS(fdmoe_config_init(NULL), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("config");
    CHECK_STATUS(fdmoe_weights_init(NULL), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("weights");
    CHECK_STATUS(fdmoe_forward_args_init(NULL), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("args");

    /* struct_size: too small is rejected; larger is accepted only with a zero tail. */
    base_config(&cfg);
    cfg.struct_size = 0;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "struct_size");
    cfg.struct_size = (uint32_t)offsetof(FdmoeConfig, act_quant) - 4; /* below the 0.1 size */
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "config->struct_size");
    FutureConfig future;
    memset(&future, 0, sizeof future);
    base_config(&future.cfg);
    future.cfg.struct_size = (uint32_t)sizeof future;
    if (CHECK_OK(fdmoe_create_backend(&future.cfg, &b))) {
        CHECK(b != NULL, "larger config with zero tail creates a backend");
        fdmoe_destroy_backend(b);
        b = NULL;
    }
    future.tail[3] = 1;
    EXPECT_CREATE_FAILS(&future.cfg, FDMOE_STATUS_UNSUPPORTED, "struct_size");

    /* Unknown enum values name the field. */
    struct {
        size_t offset;
        const char *field;
    } enums[] = {
        {offsetof(FdmoeConfig, backend), "config.backend"},
        {offsetof(FdmoeConfig, routing), "config.routing"},
        {offsetof(FdmoeConfig, scoring), "config.scoring"},
        {offsetof(FdmoeConfig, activation), "config.activation"},
        {offsetof(FdmoeConfig, act_dtype), "config.act_dtype"},
        {offsetof(FdmoeConfig, weight_dtype), "config.weight_dtype"},
    };
    const uint32_t bad_values[3] = {6, 1000, 0xffffffffu};
    for (size_t i = 0; i < sizeof enums / sizeof enums[0]; ++i) {
        for (int v = 0; v < 3; ++v) {
            base_config(&cfg);
            uint32_t value = bad_values[v];
            memcpy((char *)&cfg + enums[i].offset, &value, sizeof value);
            EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, enums[i].field);
        }
    }

    /* Zero and inconsistent sizes. */
    struct {
        size_t offset;
        const char *field;
    } sizes[] = {
        {offsetof(FdmoeConfig, num_experts), "num_experts"},
        {offsetof(FdmoeConfig, top_k), "top_k"},
        {offsetof(FdmoeConfig, hidden_size), "hidden_size"},
        {offsetof(FdmoeConfig, intermediate_size), "intermediate_size"},
        {offsetof(FdmoeConfig, max_tokens), "max_tokens"},
    };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; ++i) {
        base_config(&cfg);
        uint32_t zero = 0;
        memcpy((char *)&cfg + sizes[i].offset, &zero, sizeof zero);
        EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, sizes[i].field);
    }
    base_config(&cfg);
    cfg.top_k = 5;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "top_k");
    base_config(&cfg);
    cfg.max_tokens = 0x7fffffffu; /* max_tokens * top_k past int32 slots */
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "max_tokens");
    base_config(&cfg);
    cfg.routed_scaling_factor = NAN;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "routed_scaling_factor");
    base_config(&cfg);
    cfg.routed_scaling_factor = INFINITY;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "routed_scaling_factor");

    /* Grouped top-k constraints. */
    base_config(&cfg);
    cfg.num_experts = 8;
    cfg.routing = FDMOE_ROUTING_GROUPED_TOPK;
    cfg.n_group = 3;
    cfg.topk_group = 1;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "n_group");
    cfg.n_group = 4;
    cfg.topk_group = 5;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "topk_group");
    cfg.topk_group = 0;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "topk_group");
    cfg.n_group = 0;
    cfg.topk_group = 1;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "n_group");
    cfg.n_group = 4;
    cfg.topk_group = 1;
    cfg.top_k = 3; /* only 2 experts in the one kept group */
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "top_k");
    cfg.top_k = 2;
    if (CHECK_OK(fdmoe_create_backend(&cfg, &b))) {
        fdmoe_destroy_backend(b);
        b = NULL;
    }
    base_config(&cfg);
    cfg.n_group = 2; /* groups only mean something to grouped top-k */
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "n_group");
    base_config(&cfg);
    cfg.routing = FDMOE_ROUTING_SIGMOID_TOPK;
    cfg.topk_group = 2;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "topk_group");

    /* Dtypes: activations must be dense; quantized expert weights are not on the cpu. */
    base_config(&cfg);
    cfg.act_dtype = FDMOE_DTYPE_MXFP4;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "act_dtype");
    base_config(&cfg);
    cfg.act_dtype = FDMOE_DTYPE_FP8_BLOCK;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "act_dtype");

    /* act_quant: a known value, and FP8_MX only with MXFP4 experts. */
    base_config(&cfg);
    cfg.act_quant = 9;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "config.act_quant = 9");
    base_config(&cfg);
    cfg.act_quant = FDMOE_ACT_QUANT_FP8_MX;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_UNSUPPORTED, "act_quant = fp8_mx needs config.weight_dtype = mxfp4");
    /* A caller built against 0.1 (no act_quant field) gets its default, whatever follows. */
    {
        struct {
            FdmoeConfig cfg;
            uint32_t tail;
        } old;
        base_config(&old.cfg);
        old.cfg.struct_size = (uint32_t)offsetof(FdmoeConfig, act_quant);
        old.cfg.act_quant = FDMOE_ACT_QUANT_FP8_MX; /* past the caller's struct: ignored */
        FdmoeBackend *h = NULL;
        CHECK_OK(fdmoe_create_backend(&old.cfg, &h));
        fdmoe_destroy_backend(h);
    }

    /* Expert parallel, device ordinals and the cuda backend. */
    base_config(&cfg);
    cfg.ep_size = 2;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_UNSUPPORTED, "ep_size");
    base_config(&cfg);
    cfg.ep_size = 0;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "ep_size");
    base_config(&cfg);
    cfg.ep_rank = 1;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "ep_rank");
    base_config(&cfg);
    cfg.device_ordinal = -1;
    EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "device_ordinal");
    base_config(&cfg);
    cfg.device_ordinal = 1;
    {
        FdmoeBackend *h = NULL;
        CHECK_STATUS(fdmoe_create_backend(&cfg, &h), FDMOE_STATUS_INVALID_ARGUMENT);
        CHECK_MESSAGE_HAS("device_ordinal");
        CHECK(h == NULL, "no handle");
        /* query_memory "validates the config like fdmoe_create_backend" (fdmoe.h). */
        FdmoeMemoryRequirements m;
        memset(&m, 0, sizeof m);
        m.struct_size = (uint32_t)sizeof m;
        CHECK_STATUS(fdmoe_query_memory(&cfg, &m), FDMOE_STATUS_INVALID_ARGUMENT);
    }
    base_config(&cfg);
    cfg.backend = FDMOE_BACKEND_KIND_CUDA;
    cfg.num_threads = 0;
    {
        /* No cuda backend in this build, or no GPU here: either answer, never a crash. */
        FdmoeBackend *h = (FdmoeBackend *)(uintptr_t)0x1;
        uint32_t st = fdmoe_create_backend(&cfg, &h);
        if (st == FDMOE_STATUS_OK) {
            printf("note: a cuda backend was created (GPU present)\n");
            CHECK(h != NULL, "cuda handle");
            fdmoe_destroy_backend(h);
        } else {
            CHECK(st == FDMOE_STATUS_UNSUPPORTED || st == FDMOE_STATUS_NO_DEVICE,
                  "cuda backend: expected UNSUPPORTED or NO_DEVICE, got %s: %s",
                  fdmoe_status_string(st), fdmoe_last_error_message());
            CHECK_MESSAGE_HAS("cuda");
            CHECK(h == NULL, "no cuda handle");
        }
        FdmoeMemoryRequirements m;
        memset(&m, 0, sizeof m);
        m.struct_size = (uint32_t)sizeof m;
        st = fdmoe_query_memory(&cfg, &m);
        CHECK(st == FDMOE_STATUS_OK || st == FDMOE_STATUS_UNSUPPORTED ||
                  st == FDMOE_STATUS_NO_DEVICE,
              "query_memory(cuda): %s", fdmoe_status_string(st));
    }

    /* query_memory's own arguments. */
    base_config(&cfg);
    FdmoeMemoryRequirements mem;
    memset(&mem, 0, sizeof mem);
    mem.struct_size = (uint32_t)sizeof mem;
    CHECK_STATUS(fdmoe_query_memory(NULL, &mem), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("config");
    CHECK_STATUS(fdmoe_query_memory(&cfg, NULL), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("out");
    mem.struct_size = 4;
    CHECK_STATUS(fdmoe_query_memory(&cfg, &mem), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("struct_size");
    CHECK(mem.host_weight_bytes == 0, "a rejected query writes nothing");

    /* query_features' own arguments. */
    uint64_t features = 0x5a5a;
    CHECK_STATUS(fdmoe_query_features(FDMOE_BACKEND_KIND_CPU, NULL), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("features_out");
    CHECK_STATUS(fdmoe_query_features(2, &features), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("backend_kind");
    CHECK_STATUS(fdmoe_query_features(0xffffffffu, &features), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK(features == 0x5a5a, "a rejected query writes nothing");
}

/* ---- load_weights ---- */

typedef struct {
    Layer ly;
    WeightSet ws;
    FdmoeBackend *b;
} Fixture;

static int fixture_init(Fixture *f, const LayerSpec *spec, int load) {
    Rng rng = rng_for("errors fixture");
    layer_init(&f->ly, spec, &rng);
    WeightOptions wo = weight_options(FDMOE_LAYOUT_TORCH);
    if (spec->routing == FDMOE_ROUTING_GIVEN) {
        wo.gate = GATE_NONE;
    }
    weightset_build(&f->ws, &f->ly, &wo);
    FdmoeConfig cfg;
    layer_config(&f->ly, &cfg, 8);
    f->b = NULL;
    if (!CHECK_OK(fdmoe_create_backend(&cfg, &f->b))) {
        return 0;
    }
    return !load || CHECK_OK(fdmoe_load_weights(f->b, &f->ws.w));
}

static void fixture_free(Fixture *f) {
    fdmoe_destroy_backend(f->b);
    weightset_free(&f->ws, f->ly.E);
    layer_free(&f->ly);
}

#define EXPECT_LOAD_FAILS(b, w, expected, needle)                                           \
    do {                                                                                    \
        CHECK_STATUS(fdmoe_load_weights((b), (w)), (expected));                             \
        CHECK_MESSAGE_HAS(needle);                                                          \
    } while (0)

static void test_weight_errors(void) {
    LayerSpec spec = spec_small();
    Fixture f;
    if (!fixture_init(&f, &spec, 0)) {
        fixture_free(&f);
        return;
    }
    FdmoeWeights w;

    CHECK_STATUS(fdmoe_load_weights(NULL, &f.ws.w), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("backend");
    CHECK_STATUS(fdmoe_load_weights(f.b, NULL), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("weights");

    /* struct_size */
    w = f.ws.w;
    w.struct_size = 8;
    EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_INVALID_ARGUMENT, "struct_size");
    FutureWeights future;
    memset(&future, 0, sizeof future);
    future.w = f.ws.w;
    future.w.struct_size = (uint32_t)sizeof future;
    future.tail[0] = 0xff;
    EXPECT_LOAD_FAILS(f.b, &future.w, FDMOE_STATUS_UNSUPPORTED, "struct_size");

    /* Unknown enum values. */
    struct {
        size_t offset;
        const char *field;
    } enums[] = {
        {offsetof(FdmoeWeights, layout), "weights.layout"},
        {offsetof(FdmoeWeights, dtype), "weights.dtype"},
        {offsetof(FdmoeWeights, memory), "weights.memory"},
        {offsetof(FdmoeWeights, ownership), "weights.ownership"},
        {offsetof(FdmoeWeights, gate_dtype), "weights.gate_dtype"},
        {offsetof(FdmoeWeights, gate_layout), "weights.gate_layout"},
    };
    for (size_t i = 0; i < sizeof enums / sizeof enums[0]; ++i) {
        w = f.ws.w;
        uint32_t value = 77;
        memcpy((char *)&w + enums[i].offset, &value, sizeof value);
        EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_INVALID_ARGUMENT, enums[i].field);
    }

    /* Missing and misplaced pointers. */
    w = f.ws.w;
    w.w13 = NULL;
    EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_NULL_ARGUMENT, "weights.w13");
    w = f.ws.w;
    w.w2 = NULL;
    EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_NULL_ARGUMENT, "weights.w2");
    w = f.ws.w;
    w.layout = FDMOE_LAYOUT_PER_EXPERT; /* stacked pointers with the per-expert layout */
    EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_INVALID_ARGUMENT, "per_expert");
    {
        const void *gp[4], *up[4], *dp[4];
        for (int e = 0; e < 4; ++e) {
            gp[e] = f.ly.w13 + (size_t)e * 2 * f.ly.I * f.ly.L;
            up[e] = f.ly.w13 + ((size_t)e * 2 + 1) * f.ly.I * f.ly.L;
            dp[e] = f.ly.w2 + (size_t)e * f.ly.L * f.ly.I;
        }
        fdmoe_weights_init(&w);
        w.dtype = FDMOE_DTYPE_F32;
        w.layout = FDMOE_LAYOUT_PER_EXPERT;
        w.gate = f.ly.gate;
        w.gate_proj = gp;
        w.up_proj = up;
        EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_NULL_ARGUMENT, "weights.down_proj");
        w.down_proj = dp;
        up[2] = NULL;
        EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_NULL_ARGUMENT, "weights.up_proj[2]");
        up[2] = gp[2];
        w.gate_up_interleaved = 1;
        EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_INVALID_ARGUMENT, "gate_up_interleaved");
        w.gate_up_interleaved = 0;
        w.w13 = f.ly.w13; /* both kinds of expert pointers */
        EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_INVALID_ARGUMENT, "weights.w13");
        w.w13 = NULL;
        w.layout = FDMOE_LAYOUT_TORCH; /* per-expert pointers with a stacked layout */
        EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_INVALID_ARGUMENT, "gate_proj");
    }

    /* Dtypes and places this backend cannot take. */
    w = f.ws.w;
    w.dtype = FDMOE_DTYPE_FP8_BLOCK;
    EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_INVALID_ARGUMENT, "weights.dtype");
    w = f.ws.w;
    w.gate_dtype = FDMOE_DTYPE_NVFP4;
    EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_INVALID_ARGUMENT, "weights.gate_dtype");
    w = f.ws.w;
    w.memory = FDMOE_MEMORY_DEVICE;
    EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_UNSUPPORTED, "device");
    w = f.ws.w;
    w.ownership = FDMOE_OWNERSHIP_BORROW;
    w.dtype = FDMOE_DTYPE_BF16; /* the cpu computes from f32 memory: no bf16 borrow */
    EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_UNSUPPORTED, "borrow");

    /* Pieces the config does not have. */
    w = f.ws.w;
    w.correction_bias = f.ly.gate; /* any E floats */
    EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_INVALID_ARGUMENT, "correction_bias");
    w = f.ws.w;
    w.fc1 = f.ly.w2;
    w.fc2 = f.ly.w2;
    EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_INVALID_ARGUMENT, "fc1");
    w = f.ws.w;
    w.shared_w13 = f.ly.w2;
    w.shared_w2 = f.ly.w2;
    EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_INVALID_ARGUMENT, "shared");

    /* None of the failed loads loaded anything. */
    {
        float x[24 * 2], out[24 * 2];
        Rng rng = rng_for("weights fail");
        fill_normal(&rng, x, 48, 1.0);
        FdmoeForwardArgs a;
        fdmoe_forward_args_init(&a);
        a.num_tokens = 2;
        a.x = x;
        a.out = out;
        CHECK_STATUS(fdmoe_forward(f.b, &a), FDMOE_STATUS_INVALID_STATE);
        CHECK_MESSAGE_HAS("weights");
    }
    /* A larger struct with a zero tail loads fine. */
    memset(&future, 0, sizeof future);
    future.w = f.ws.w;
    future.w.struct_size = (uint32_t)sizeof future;
    CHECK_OK(fdmoe_load_weights(f.b, &future.w));
    fixture_free(&f);

    /* Latent and shared configs without their matrices. */
    spec = spec_small();
    spec.latent_size = 8;
    spec.shared_size = 12;
    if (fixture_init(&f, &spec, 1)) {
        w = f.ws.w;
        w.fc1 = NULL;
        EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_NULL_ARGUMENT, "fc1");
        CHECK_MESSAGE_HAS("latent_size");
        w = f.ws.w;
        w.fc1 = NULL;
        w.fc2 = NULL;
        EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_NULL_ARGUMENT, "fc2");
        w = f.ws.w;
        w.shared_w2 = NULL;
        EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_NULL_ARGUMENT, "shared_w2");
        CHECK_MESSAGE_HAS("shared_intermediate_size");
    }
    fixture_free(&f);

    /* Grouped: a bias is fine; a GIVEN layer has no use for a gate. */
    spec = spec_small();
    spec.routing = FDMOE_ROUTING_GIVEN;
    if (fixture_init(&f, &spec, 1)) {
        w = f.ws.w;
        w.gate = f.ly.gate;
        EXPECT_LOAD_FAILS(f.b, &w, FDMOE_STATUS_INVALID_ARGUMENT, "weights.gate");
    }
    fixture_free(&f);

    /* Quantized weight formats (create time): K of both expert matrices (hidden_size, or
     * latent_size, for w13; intermediate_size for w2) must be a multiple of the format's
     * group; the cpu backend runs every format (tests/c/test_quantized.c). */
    FdmoeConfig cfg;
    const uint32_t quantized[3] = {FDMOE_DTYPE_FP8_BLOCK, FDMOE_DTYPE_MXFP4, FDMOE_DTYPE_NVFP4};
    for (int q = 0; q < 3; ++q) {
        base_config(&cfg); /* H = 24, I = 16 */
        cfg.weight_dtype = quantized[q];
        EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "config.hidden_size = 24 (K of w13)");
        cfg.hidden_size = 128;
        if (quantized[q] == FDMOE_DTYPE_NVFP4) {
            FdmoeBackend *h = NULL;
            CHECK_OK(fdmoe_create_backend(&cfg, &h));
            fdmoe_destroy_backend(h);
        } else {
            EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT,
                                "config.intermediate_size = 16 (K of w2)");
        }
        cfg.intermediate_size = 128;
        if (quantized[q] == FDMOE_DTYPE_FP8_BLOCK) {
            cfg.latent_size = 96; /* K of w13 is then the latent size */
            EXPECT_CREATE_FAILS(&cfg, FDMOE_STATUS_INVALID_ARGUMENT, "config.latent_size = 96");
            cfg.latent_size = 0;
        }
        FdmoeBackend *h = NULL;
        CHECK_OK(fdmoe_create_backend(&cfg, &h));
        fdmoe_destroy_backend(h);
        FdmoeMemoryRequirements m;
        memset(&m, 0, sizeof m);
        m.struct_size = (uint32_t)sizeof m;
        CHECK_OK(fdmoe_query_memory(&cfg, &m));
    }
}

/* ---- forward ---- */

static void test_forward_errors(void) {
    LayerSpec spec = spec_small();
    Fixture f;
    size_t T = 5, H = 24, E = 4, k = 2;
    if (!fixture_init(&f, &spec, 0)) {
        fixture_free(&f);
        return;
    }
    Rng rng = rng_for("forward errors");
    float *buf = alloc_f32(2 * T * H + 8), *x = buf, *out = alloc_f32(T * H);
    float *logits = alloc_f32(T * E), *given_w = alloc_f32(T * k), *wts = alloc_f32(T * k);
    int32_t given_ids[10], ids[10];
    float *snapshot = alloc_f32(T * H);
    fill_normal(&rng, buf, 2 * T * H + 8, 1.0);
    fill_normal(&rng, logits, T * E, 1.0);
    for (size_t i = 0; i < T * k; ++i) {
        given_ids[i] = (int32_t)(i % E);
        given_w[i] = 0.5f;
    }
    FdmoeForwardArgs a;
    fdmoe_forward_args_init(&a);
    a.num_tokens = (uint32_t)T;
    a.x = x;
    a.out = out;

    /* Forward before weights. */
    CHECK_STATUS(fdmoe_forward(f.b, &a), FDMOE_STATUS_INVALID_STATE);
    CHECK_MESSAGE_HAS("load_weights");
    CHECK_OK(fdmoe_load_weights(f.b, &f.ws.w));

    CHECK_STATUS(fdmoe_forward(NULL, &a), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("backend");
    CHECK_STATUS(fdmoe_forward(f.b, NULL), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("args");

    /* struct_size */
    FdmoeForwardArgs small = a;
    small.struct_size = 4;
    CHECK_STATUS(fdmoe_forward(f.b, &small), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("args->struct_size");
    FutureArgs future;
    memset(&future, 0, sizeof future);
    future.a = a;
    future.a.struct_size = (uint32_t)sizeof future;
    poison_f32(out, T * H);
    CHECK_OK(fdmoe_forward(f.b, &future.a));
    CHECK(count_non_finite(out, T * H) == 0, "larger args with zero tail: output written");
    future.tail[1] = 1;
    poison_f32(out, T * H);
    CHECK_STATUS(fdmoe_forward(f.b, &future.a), FDMOE_STATUS_UNSUPPORTED);
    CHECK_MESSAGE_HAS("struct_size");
    CHECK(count_non_finite(out, T * H) == T * H, "rejected args: output untouched");

    /* NULL x / out. */
    FdmoeForwardArgs b = a;
    b.x = NULL;
    CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("args.x");
    b = a;
    b.out = NULL;
    CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("args.out");

    /* T = 0 is a no-op (even with NULL buffers); T > max_tokens writes nothing. */
    for (size_t i = 0; i < T * H; ++i) {
        out[i] = snapshot[i] = (float)i;
    }
    poison_i32(ids, T * k);
    b = a;
    b.num_tokens = 0;
    b.topk_ids_out = ids;
    CHECK_OK(fdmoe_forward(f.b, &b));
    CHECK(memcmp(out, snapshot, T * H * sizeof(float)) == 0, "T = 0 leaves out untouched");
    CHECK(ids[0] == INT32_MIN, "T = 0 leaves the record untouched");
    b.x = NULL;
    b.out = NULL;
    CHECK_OK(fdmoe_forward(f.b, &b));
    b = a;
    b.num_tokens = 9;
    b.topk_ids_out = ids;
    b.topk_weights_out = wts;
    poison_f32(wts, T * k);
    float *big_x = alloc_f32(9 * H), *big_out = alloc_f32(9 * H);
    fill_normal(&rng, big_x, 9 * H, 1.0);
    poison_f32(big_out, 9 * H);
    b.x = big_x;
    b.out = big_out;
    CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_CAPACITY_EXCEEDED);
    CHECK_MESSAGE_HAS("max_tokens");
    CHECK(count_non_finite(big_out, 9 * H) == 9 * H && ids[0] == INT32_MIN && isnan(wts[0]),
          "CAPACITY_EXCEEDED writes nothing");
    b.num_tokens = 0xffffffffu;
    CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_CAPACITY_EXCEEDED);
    free(big_x);
    free(big_out);

    /* Routing sources. */
    b = a;
    b.topk_ids = given_ids; /* ids without weights */
    CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("topk_weights");
    b = a;
    b.topk_weights = given_w;
    CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("topk_ids");
    b = a;
    b.topk_ids = given_ids;
    b.topk_weights = given_w;
    b.router_logits = logits;
    CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("router_logits");
    const int32_t bad_ids[3] = {-1, 4, INT32_MIN};
    for (int i = 0; i < 3; ++i) {
        int32_t ids_bad[10];
        memcpy(ids_bad, given_ids, sizeof ids_bad);
        ids_bad[7] = bad_ids[i];
        b = a;
        b.topk_ids = ids_bad;
        b.topk_weights = given_w;
        b.out = out;
        poison_f32(out, T * H);
        CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_INVALID_ARGUMENT);
        CHECK_MESSAGE_HAS("args.topk_ids");
        CHECK(count_non_finite(out, T * H) == T * H, "rejected given ids: output untouched");
    }

    /* Stream on the cpu, unknown flags, overlapping buffers. */
    b = a;
    b.stream = (void *)(uintptr_t)0x1234;
    CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("args.stream");
    const uint32_t bad_flags[3] = {2, 0x80000000u, FDMOE_FORWARD_FORCE_EAGER | 4};
    for (int i = 0; i < 3; ++i) {
        b = a;
        b.flags = bad_flags[i];
        CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_INVALID_ARGUMENT);
        CHECK_MESSAGE_HAS("args.flags");
    }
    b = a;
    b.out = x; /* out == x */
    CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("overlap");
    b.out = x + H / 2; /* partial overlap from above */
    CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_INVALID_ARGUMENT);
    b.out = x + T * H - 1; /* one element shared */
    CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_INVALID_ARGUMENT);
    b.x = x + 3;
    b.out = x; /* partial overlap from below */
    CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_INVALID_ARGUMENT);
    b.x = x;
    b.out = x + T * H; /* adjacent, not overlapping: fine */
    CHECK_OK(fdmoe_forward(f.b, &b));

    /* Non-finite inputs never crash or route out of range. */
    {
        float *xn = alloc_f32(T * H), *ln = alloc_f32(T * E);
        memcpy(xn, x, T * H * sizeof(float));
        memcpy(ln, logits, T * E * sizeof(float));
        xn[0] = NAN;
        xn[H + 3] = INFINITY;
        xn[2 * H + 1] = -INFINITY;
        ln[0] = NAN;
        ln[E + 1] = INFINITY;
        ln[2 * E + 2] = -INFINITY;
        for (size_t e = 0; e < E; ++e) {
            ln[3 * E + e] = NAN; /* a token of only NaN */
        }
        for (int src = 0; src < 2; ++src) {
            b = a;
            b.x = xn;
            b.router_logits = src == 1 ? ln : NULL;
            b.topk_ids_out = ids;
            b.topk_weights_out = wts;
            poison_i32(ids, T * k);
            CHECK_OK(fdmoe_forward(f.b, &b));
            int in_range = 1;
            for (size_t i = 0; i < T * k; ++i) {
                in_range &= ids[i] >= 0 && ids[i] < (int32_t)E;
            }
            CHECK(in_range, "%s: non-finite inputs give ids in [0, E)",
                  src == 1 ? "router logits" : "x");
            /* Tokens with finite inputs are unaffected by their neighbours: token 4 (and, when
             * routing from x, token 3) match the reference. */
            size_t first = src == 1 ? 4 : 3;
            double ref[2 * 24], rw[2 * 2];
            int32_t rid[2 * 2];
            ref_forward(&f.ly, T - first, xn + first * H, src == 1 ? ln + first * E : NULL, NULL,
                        NULL, ref, rid, rw);
            double err = rel_l2(out + first * H, ref, (T - first) * H);
            CHECK(count_non_finite(out + first * H, (T - first) * H) == 0 && err <= 1e-5,
                  "%s: finite tokens next to non-finite ones: error %.3g",
                  src == 1 ? "router logits" : "x", err);
        }
        /* NaN ranks below every finite value: sigmoid top-2 of [NaN, 1, NaN, 0] is {1, 3}. */
        spec = spec_small();
        spec.routing = FDMOE_ROUTING_SIGMOID_TOPK;
        Fixture g;
        if (fixture_init(&g, &spec, 1)) {
            const float row[4] = {NAN, 1.0f, NAN, 0.0f};
            b = a;
            b.num_tokens = 1;
            b.router_logits = row;
            b.topk_ids_out = ids;
            b.topk_weights_out = wts;
            CHECK_OK(fdmoe_forward(g.b, &b));
            CHECK(ids[0] == 1 && ids[1] == 3, "NaN ranks last: got ids %d %d", ids[0], ids[1]);
            CHECK(count_non_finite(out, H) == 0, "finite choice gives a finite output");
            const float ties[4] = {0.25f, 0.25f, 0.25f, 0.25f};
            b.router_logits = ties;
            CHECK_OK(fdmoe_forward(g.b, &b));
            CHECK(ids[0] == 0 && ids[1] == 1, "ties go to the lower index: got %d %d", ids[0],
                  ids[1]);
        }
        fixture_free(&g);
        free(xn);
        free(ln);
    }
    fixture_free(&f);

    /* Routing source errors that depend on the config. */
    spec = spec_small();
    spec.routing = FDMOE_ROUTING_GIVEN;
    if (fixture_init(&f, &spec, 1)) {
        b = a;
        CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_NULL_ARGUMENT);
        CHECK_MESSAGE_HAS("topk_ids");
        b.router_logits = logits;
        CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_INVALID_ARGUMENT);
        CHECK_MESSAGE_HAS("router_logits");
    }
    fixture_free(&f);
    spec = spec_small();
    if (fixture_init(&f, &spec, 0)) {
        FdmoeWeights w = f.ws.w;
        w.gate = NULL; /* no gate: every forward must pass logits */
        CHECK_OK(fdmoe_load_weights(f.b, &w));
        b = a;
        CHECK_STATUS(fdmoe_forward(f.b, &b), FDMOE_STATUS_NULL_ARGUMENT);
        CHECK_MESSAGE_HAS("router_logits");
        b.router_logits = logits;
        CHECK_OK(fdmoe_forward(f.b, &b));
    }
    fixture_free(&f);

    free(buf);
    free(out);
    free(logits);
    free(given_w);
    free(wts);
    free(snapshot);
}

/* ---- Lifecycle errors ---- */

static void test_lifecycle_errors(void) {
    LayerSpec spec = spec_small();
    Fixture f;
    if (!fixture_init(&f, &spec, 1)) {
        fixture_free(&f);
        return;
    }
    uint32_t buckets[2] = {1, 4};
    CHECK_STATUS(fdmoe_capture_prefill_graph(NULL, NULL, 0, NULL), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("backend");
    CHECK_STATUS(fdmoe_capture_prefill_graph(f.b, NULL, 2, NULL), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("token_counts");
    CHECK_STATUS(fdmoe_capture_prefill_graph(f.b, buckets, 2, NULL), FDMOE_STATUS_UNSUPPORTED);
    CHECK_MESSAGE_HAS("cuda");

    FdmoeBackend *dead = f.b;
    fdmoe_destroy_backend(f.b);
    f.b = NULL;
    float x[24], out[24];
    Rng rng = rng_for("dead");
    fill_normal(&rng, x, 24, 1.0);
    FdmoeForwardArgs a;
    fdmoe_forward_args_init(&a);
    a.num_tokens = 1;
    a.x = x;
    a.out = out;
    CHECK_STATUS(fdmoe_forward(dead, &a), FDMOE_STATUS_INVALID_STATE);
    CHECK_MESSAGE_HAS("backend");
    CHECK_STATUS(fdmoe_load_weights(dead, &f.ws.w), FDMOE_STATUS_INVALID_STATE);
    CHECK_STATUS(fdmoe_capture_prefill_graph(dead, NULL, 0, NULL), FDMOE_STATUS_INVALID_STATE);
    fdmoe_destroy_backend(dead); /* twice: ignored */
    fdmoe_destroy_backend(NULL);
    CHECK(1, "destroying twice and destroying NULL return");
    fixture_free(&f);
}

int main(void) {
    printf("test_errors (seed %llu)\n", (unsigned long long)test_seed());
    test_config_errors();
    test_weight_errors();
    test_forward_errors();
    test_lifecycle_errors();
    return check_finish();
}
