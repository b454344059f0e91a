/* The C API surface outside the numerics: versions, status strings, the thread-local last
 * error message, the *_init defaults, feature and memory queries, graph capture on the cpu
 * backend, the handle lifecycle (destroy NULL / twice / use after destroy), and concurrent
 * use from several threads.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>

#include "ref.h"

static void test_versions_and_strings(void) {
    CHECK(fdmoe_abi_version() == FDMOE_ABI_VERSION, "abi %#x, header %#x", fdmoe_abi_version(),
          (unsigned)FDMOE_ABI_VERSION);
    CHECK(fdmoe_abi_version() >> 16 == FDMOE_VERSION_MAJOR, "major version");
    const char *v = fdmoe_version_string();
    char expected[64];
    snprintf(expected, sizeof expected, "%d.%d.%d", FDMOE_VERSION_MAJOR, FDMOE_VERSION_MINOR,
             FDMOE_VERSION_PATCH);
    CHECK(v != NULL && strcmp(v, expected) == 0, "version string \"%s\", header %s",
          v != NULL ? v : "(null)", expected);
    CHECK(fdmoe_version_string() == v, "version string is static");

    const char *names[] = {"OK",           "INVALID_ARGUMENT", "NULL_ARGUMENT",
                           "UNSUPPORTED",  "CAPACITY_EXCEEDED", "NO_DEVICE",
                           "CUDA_ERROR",   "NCCL_ERROR",        "OUT_OF_MEMORY",
                           "INVALID_STATE", "INTERNAL"};
    const uint32_t codes[] = {FDMOE_STATUS_OK,           FDMOE_STATUS_INVALID_ARGUMENT,
                              FDMOE_STATUS_NULL_ARGUMENT, FDMOE_STATUS_UNSUPPORTED,
                              FDMOE_STATUS_CAPACITY_EXCEEDED, FDMOE_STATUS_NO_DEVICE,
                              FDMOE_STATUS_CUDA_ERROR,   FDMOE_STATUS_NCCL_ERROR,
                              FDMOE_STATUS_OUT_OF_MEMORY, FDMOE_STATUS_INVALID_STATE,
                              FDMOE_STATUS_INTERNAL};
    for (uint32_t i = 0; i < 11; ++i) {
        CHECK(codes[i] == i, "status %s has the number %u", names[i], i); /* ABI numbers */
        const char *s = fdmoe_status_string(codes[i]);
        CHECK(s != NULL && strcmp(s, names[i]) == 0, "status %u is \"%s\", expected \"%s\"", i,
              s != NULL ? s : "(null)", names[i]);
    }
    const uint32_t unknown[] = {11, 12, 100, 0x10000u, 0x7fffffffu, 0xffffffffu};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; ++i) {
        const char *s = fdmoe_status_string(unknown[i]);
        CHECK(s != NULL && strcmp(s, "UNKNOWN_STATUS") == 0, "status %u is \"%s\"", unknown[i],
              s != NULL ? s : "(null)");
    }
}

static void test_last_error_message(void) {
    const char *m = fdmoe_last_error_message();
    CHECK(m != NULL && strcmp(m, "") == 0, "before any call the message is empty");
    CHECK_STATUS(fdmoe_config_init(NULL), FDMOE_STATUS_NULL_ARGUMENT);
    m = fdmoe_last_error_message();
    CHECK(m != NULL && strstr(m, "config") != NULL, "the message names the argument: \"%s\"",
          m != NULL ? m : "(null)");
    /* Reading it does not clear it, and version/string calls do not touch it. */
    (void)fdmoe_status_string(3);
    (void)fdmoe_abi_version();
    CHECK(strstr(fdmoe_last_error_message(), "config") != NULL, "message persists");
    FdmoeConfig cfg;
    CHECK_OK(fdmoe_config_init(&cfg));
    m = fdmoe_last_error_message();
    CHECK(m != NULL && strcmp(m, "") == 0, "a successful call clears the message: \"%s\"",
          m != NULL ? m : "(null)");
    cfg.num_experts = 4;
    cfg.top_k = 2;
    cfg.hidden_size = 8;
    cfg.intermediate_size = 8;
    cfg.routing = 99;
    FdmoeBackend *b = NULL;
    CHECK_STATUS(fdmoe_create_backend(&cfg, &b), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("config.routing");
    CHECK_MESSAGE_HAS("99");
    uint64_t features = 0;
    CHECK_OK(fdmoe_query_features(FDMOE_BACKEND_KIND_CPU, &features));
    CHECK(strcmp(fdmoe_last_error_message(), "") == 0, "cleared by query_features");
}

static void test_init_defaults(void) {
    FdmoeConfig cfg;
    memset(&cfg, 0xab, sizeof cfg); /* init writes every field */
    CHECK_OK(fdmoe_config_init(&cfg));
    CHECK(cfg.struct_size == sizeof cfg, "config.struct_size %u", cfg.struct_size);
    CHECK(cfg.backend == FDMOE_BACKEND_KIND_CPU && cfg.device_ordinal == 0, "cpu, device 0");
    CHECK(cfg.num_experts == 0 && cfg.top_k == 0 && cfg.hidden_size == 0 &&
              cfg.intermediate_size == 0 && cfg.latent_size == 0 &&
              cfg.shared_intermediate_size == 0,
          "sizes start at 0");
    CHECK(cfg.routing == FDMOE_ROUTING_SOFTMAX_TOPK && cfg.scoring == FDMOE_SCORING_SIGMOID,
          "softmax top-k, sigmoid scoring");
    CHECK(cfg.n_group == 1 && cfg.topk_group == 1 && cfg.renormalize == 1, "groups 1/1, renormalize");
    CHECK(cfg.routed_scaling_factor == 1.0f, "scaling 1.0");
    CHECK(cfg.activation == FDMOE_ACTIVATION_SWIGLU, "swiglu");
    CHECK(cfg.act_dtype == FDMOE_DTYPE_BF16 && cfg.weight_dtype == FDMOE_DTYPE_BF16, "bf16");
    CHECK(cfg.max_tokens == 4096 && cfg.num_threads == 0, "max_tokens 4096, threads 0");
    CHECK(cfg.ep_size == 1 && cfg.ep_rank == 0, "no expert parallel");
    CHECK(cfg.act_quant == FDMOE_ACT_QUANT_NONE, "act_quant none");

    FdmoeWeights w;
    memset(&w, 0xab, sizeof w);
    CHECK_OK(fdmoe_weights_init(&w));
    CHECK(w.struct_size == sizeof w, "weights.struct_size %u", w.struct_size);
    CHECK(w.layout == FDMOE_LAYOUT_TORCH && w.dtype == FDMOE_DTYPE_BF16 &&
              w.memory == FDMOE_MEMORY_HOST && w.ownership == FDMOE_OWNERSHIP_OWN &&
              w.gate_up_interleaved == 0 && w.gate_dtype == FDMOE_DTYPE_F32 &&
              w.gate_layout == FDMOE_GATE_LAYOUT_EXPERTS_BY_HIDDEN,
          "weights defaults");
    CHECK(w.w13 == NULL && w.w2 == NULL && w.gate_proj == NULL && w.up_proj == NULL &&
              w.down_proj == NULL && w.gate == NULL && w.correction_bias == NULL &&
              w.fc1 == NULL && w.fc2 == NULL && w.shared_w13 == NULL && w.shared_w2 == NULL,
          "weights pointers NULL");

    FdmoeForwardArgs a;
    memset(&a, 0xab, sizeof a);
    CHECK_OK(fdmoe_forward_args_init(&a));
    CHECK(a.struct_size == sizeof a, "args.struct_size %u", a.struct_size);
    CHECK(a.num_tokens == 0 && a.flags == 0, "args: 0 tokens, no flags");
    CHECK(a.x == NULL && a.out == NULL && a.router_logits == NULL && a.topk_ids == NULL &&
              a.topk_weights == NULL && a.topk_ids_out == NULL && a.topk_weights_out == NULL &&
              a.stream == NULL,
          "args pointers NULL");
}

static void test_queries(void) {
    uint64_t cpu = 0;
    CHECK_OK(fdmoe_query_features(FDMOE_BACKEND_KIND_CPU, &cpu));
    const uint64_t required = FDMOE_FEATURE_ROUTING_SOFTMAX_TOPK | FDMOE_FEATURE_ROUTING_SIGMOID_TOPK |
                              FDMOE_FEATURE_ROUTING_GROUPED_TOPK | FDMOE_FEATURE_ROUTING_GIVEN |
                              FDMOE_FEATURE_ROUTING_RECORD | FDMOE_FEATURE_LATENT |
                              FDMOE_FEATURE_SHARED_EXPERTS | FDMOE_FEATURE_ACT_F32 |
                              FDMOE_FEATURE_ACT_BF16 | FDMOE_FEATURE_ACT_F16 |
                              FDMOE_FEATURE_WEIGHT_F32 | FDMOE_FEATURE_WEIGHT_BF16 |
                              FDMOE_FEATURE_WEIGHT_F16 | FDMOE_FEATURE_LAYOUT_TORCH |
                              FDMOE_FEATURE_LAYOUT_PADDLE | FDMOE_FEATURE_LAYOUT_PER_EXPERT |
                              FDMOE_FEATURE_WEIGHTS_OWN | FDMOE_FEATURE_WEIGHTS_BORROW;
    CHECK((cpu & required) == required, "cpu features %#llx lack %#llx",
          (unsigned long long)cpu, (unsigned long long)(required & ~cpu));
    /* The cpu backend answers UNSUPPORTED to graph capture and expert parallel (tested below
     * and in test_errors), so it must not advertise them. */
    CHECK((cpu & (FDMOE_FEATURE_CUDA_GRAPHS | FDMOE_FEATURE_EXPERT_PARALLEL)) == 0,
          "cpu advertises graphs or expert parallel: %#llx", (unsigned long long)cpu);
    uint64_t cuda = 0xdead;
    CHECK_OK(fdmoe_query_features(FDMOE_BACKEND_KIND_CUDA, &cuda));
    CHECK(cuda != 0xdead, "cuda features written (%#llx)", (unsigned long long)cuda);

    /* Memory: the cpu keeps f32 weights in host memory and allocates nothing on a device. */
    FdmoeConfig cfg;
    fdmoe_config_init(&cfg);
    cfg.num_experts = 8;
    cfg.top_k = 2;
    cfg.hidden_size = 64;
    cfg.intermediate_size = 32;
    cfg.max_tokens = 16;
    FdmoeMemoryRequirements m;
    memset(&m, 0xab, sizeof m);
    m.struct_size = (uint32_t)sizeof m;
    if (CHECK_OK(fdmoe_query_memory(&cfg, &m))) {
        CHECK(m.struct_size == sizeof m, "struct_size kept");
        CHECK(m.device_weight_bytes == 0 && m.device_workspace_bytes == 0 &&
                  m.device_graph_bytes == 0,
              "cpu: no device memory");
        uint64_t experts = 8ull * 3 * 64 * 32 * 4;
        CHECK(m.host_weight_bytes >= experts && m.host_weight_bytes < 2 * experts,
              "host weights %llu for %llu bytes of f32 experts",
              (unsigned long long)m.host_weight_bytes, (unsigned long long)experts);
        CHECK(m.host_workspace_bytes > 0, "host workspace");
        FdmoeMemoryRequirements bigger;
        cfg.max_tokens = 1024;
        bigger.struct_size = (uint32_t)sizeof bigger;
        CHECK_OK(fdmoe_query_memory(&cfg, &bigger));
        CHECK(bigger.host_workspace_bytes > m.host_workspace_bytes,
              "workspace grows with max_tokens");
        CHECK(bigger.host_weight_bytes == m.host_weight_bytes, "weights do not");
        cfg.latent_size = 16;
        cfg.shared_intermediate_size = 48;
        CHECK_OK(fdmoe_query_memory(&cfg, &bigger));
        CHECK(bigger.host_weight_bytes < m.host_weight_bytes + 3ull * 48 * 64 * 4 + 2ull * 16 * 64 * 4,
              "a latent layer has smaller experts");
    }
    /* A caller with a newer, larger struct: its tail is left alone. */
    struct {
        FdmoeMemoryRequirements m;
        uint64_t tail[2];
    } future;
    memset(&future, 0x5c, sizeof future);
    future.m.struct_size = (uint32_t)sizeof future;
    cfg.latent_size = 0;
    cfg.shared_intermediate_size = 0;
    cfg.max_tokens = 16;
    CHECK_OK(fdmoe_query_memory(&cfg, &future.m));
    CHECK(future.m.struct_size == sizeof future && future.m.host_weight_bytes == m.host_weight_bytes &&
              future.tail[0] == 0x5c5c5c5c5c5c5c5cull && future.tail[1] == 0x5c5c5c5c5c5c5c5cull,
          "larger struct: known fields written, tail untouched");
    /* An older, smaller struct that still holds the first field set. */
    FdmoeMemoryRequirements old;
    memset(&old, 0x5c, sizeof old);
    old.struct_size = (uint32_t)offsetof(FdmoeMemoryRequirements, device_weight_bytes);
    uint32_t st = fdmoe_query_memory(&cfg, &old);
    CHECK(st == FDMOE_STATUS_INVALID_ARGUMENT, "a struct without any field: %s",
          fdmoe_status_string(st));
}

/* One small layer and the expected result of one forward, for the lifecycle and thread tests. */
typedef struct {
    Layer ly;
    FdmoeConfig cfg;
    WeightSet ws;
    size_t T;
    float *x;
    double *ref;
} Job;

static void job_init(Job *j, const char *seed, size_t T) {
    Rng rng = rng_for(seed);
    LayerSpec spec = spec_small();
    spec.shared_size = 8;
    layer_init(&j->ly, &spec, &rng);
    layer_config(&j->ly, &j->cfg, 16);
    WeightOptions wo = weight_options(FDMOE_LAYOUT_TORCH);
    weightset_build(&j->ws, &j->ly, &wo);
    j->T = T;
    j->x = alloc_f32(T * j->ly.H);
    fill_normal(&rng, j->x, T * j->ly.H, 1.0);
    j->ref = (double *)xmalloc(T * j->ly.H * sizeof(double));
    int32_t *ids = (int32_t *)xmalloc(T * j->ly.k * sizeof(int32_t));
    double *w = (double *)xmalloc(T * j->ly.k * sizeof(double));
    ref_forward(&j->ly, T, j->x, NULL, NULL, NULL, j->ref, ids, w);
    free(ids);
    free(w);
}

static void job_free(Job *j) {
    weightset_free(&j->ws, j->ly.E);
    layer_free(&j->ly);
    free(j->x);
    free(j->ref);
}

/* One forward of the job on `b`; returns the relative error (INFINITY on failure). */
static double job_forward(const Job *j, FdmoeBackend *b) {
    size_t n = j->T * j->ly.H;
    float *out = alloc_f32(n);
    poison_f32(out, n);
    FdmoeForwardArgs a;
    fdmoe_forward_args_init(&a);
    a.num_tokens = (uint32_t)j->T;
    a.x = j->x;
    a.out = out;
    uint32_t st = fdmoe_forward(b, &a);
    double err = st == FDMOE_STATUS_OK && count_non_finite(out, n) == 0 ? rel_l2(out, j->ref, n)
                                                                        : INFINITY;
    free(out);
    return err;
}

static void test_lifecycle(void) {
    Job j;
    job_init(&j, "lifecycle", 5);
    FdmoeBackend *b = NULL;
    CHECK_OK(fdmoe_create_backend(&j.cfg, &b));
    CHECK(b != NULL, "a handle");
    /* Graph capture needs weights, then the cuda backend. */
    CHECK_OK(fdmoe_load_weights(b, &j.ws.w));
    CHECK(job_forward(&j, b) <= 1e-5, "forward matches the reference");
    uint32_t buckets[3] = {1, 2, 4};
    CHECK_STATUS(fdmoe_capture_prefill_graph(b, NULL, 0, NULL), FDMOE_STATUS_UNSUPPORTED);
    CHECK_MESSAGE_HAS("cuda");
    CHECK_STATUS(fdmoe_capture_prefill_graph(b, buckets, 3, NULL), FDMOE_STATUS_UNSUPPORTED);
    CHECK_MESSAGE_HAS("cuda");
    CHECK(job_forward(&j, b) <= 1e-5, "the handle works after a failed capture");

    fdmoe_destroy_backend(b);
    fdmoe_destroy_backend(b); /* a second destroy is ignored */
    fdmoe_destroy_backend(NULL);
    CHECK_STATUS(fdmoe_load_weights(b, &j.ws.w), FDMOE_STATUS_INVALID_STATE);
    CHECK_MESSAGE_HAS("backend");
    CHECK(job_forward(&j, b) == INFINITY, "forward on a destroyed handle fails");
    CHECK_STATUS(fdmoe_capture_prefill_graph(b, NULL, 0, NULL), FDMOE_STATUS_INVALID_STATE);
    /* A handle the library never made. */
    int not_a_handle = 0;
    CHECK_STATUS(fdmoe_load_weights((FdmoeBackend *)&not_a_handle, &j.ws.w),
                 FDMOE_STATUS_INVALID_STATE);
    fdmoe_destroy_backend((FdmoeBackend *)&not_a_handle); /* ignored, no free() */

    /* Many handles, destroyed in an interleaved order; each stays independent. */
    FdmoeBackend *many[6] = {NULL};
    for (int i = 0; i < 6; ++i) {
        CHECK_OK(fdmoe_create_backend(&j.cfg, &many[i]));
        if (i % 2 == 0) {
            CHECK_OK(fdmoe_load_weights(many[i], &j.ws.w));
        }
    }
    for (int i = 0; i < 6; i += 3) {
        fdmoe_destroy_backend(many[i]);
    }
    for (int i = 0; i < 6; ++i) {
        if (i % 3 == 0) {
            continue;
        }
        if (i % 2 == 0) {
            CHECK(job_forward(&j, many[i]) <= 1e-5, "handle %d forward", i);
        } else {
            FdmoeForwardArgs a;
            fdmoe_forward_args_init(&a);
            float out[24];
            a.num_tokens = 1;
            a.x = j.x;
            a.out = out;
            CHECK_STATUS(fdmoe_forward(many[i], &a), FDMOE_STATUS_INVALID_STATE);
        }
        fdmoe_destroy_backend(many[i]);
    }
    /* Default thread count (0 = one per core) works too. */
    j.cfg.num_threads = 0;
    CHECK_OK(fdmoe_create_backend(&j.cfg, &b));
    CHECK_OK(fdmoe_load_weights(b, &j.ws.w));
    CHECK(job_forward(&j, b) <= 1e-5, "num_threads 0");
    fdmoe_destroy_backend(b);
    job_free(&j);
}

/* ---- Threads ---- */

typedef struct {
    const Job *job;
    FdmoeBackend *backend; /* shared, or NULL to create a private one */
    int iterations;
    int failures;
    int message_was_empty;
    int message_is_own;
} Worker;

static void *worker_main(void *arg) {
    Worker *w = (Worker *)arg;
    /* A fresh thread starts with an empty message, whatever other threads did. */
    w->message_was_empty = strcmp(fdmoe_last_error_message(), "") == 0;
    FdmoeBackend *b = w->backend;
    if (b == NULL) {
        if (fdmoe_create_backend(&w->job->cfg, &b) != FDMOE_STATUS_OK ||
            fdmoe_load_weights(b, &w->job->ws.w) != FDMOE_STATUS_OK) {
            w->failures = w->iterations;
            return NULL;
        }
    }
    for (int i = 0; i < w->iterations; ++i) {
        w->failures += !(job_forward(w->job, b) <= 1e-5);
    }
    /* Leave this thread's own error behind. */
    w->message_is_own = fdmoe_query_features(7, NULL) == FDMOE_STATUS_NULL_ARGUMENT &&
                        strstr(fdmoe_last_error_message(), "features_out") != NULL;
    if (w->backend == NULL) {
        fdmoe_destroy_backend(b);
    }
    return NULL;
}

static void test_threads(void) {
    Job j;
    job_init(&j, "threads", 7);
    /* The main thread's error must survive the workers' calls. */
    CHECK_STATUS(fdmoe_forward(NULL, NULL), FDMOE_STATUS_NULL_ARGUMENT);
    FdmoeBackend *shared = NULL;
    CHECK_OK(fdmoe_create_backend(&j.cfg, &shared));
    CHECK_OK(fdmoe_load_weights(shared, &j.ws.w));
    CHECK_STATUS(fdmoe_forward(NULL, NULL), FDMOE_STATUS_NULL_ARGUMENT);
    enum { N = 4 };
    Worker workers[N];
    pthread_t threads[N];
    for (int i = 0; i < N; ++i) {
        Worker w = {&j, i < 2 ? shared : NULL, 6, 0, 0, 0};
        workers[i] = w;
        CHECK(pthread_create(&threads[i], NULL, worker_main, &workers[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < N; ++i) {
        pthread_join(threads[i], NULL);
        CHECK(workers[i].failures == 0, "thread %d (%s handle): %d of %d forwards wrong", i,
              i < 2 ? "shared" : "own", workers[i].failures, workers[i].iterations);
        CHECK(workers[i].message_was_empty, "thread %d started with an empty message", i);
        CHECK(workers[i].message_is_own, "thread %d saw its own error message", i);
    }
    CHECK_MESSAGE_HAS("backend is NULL");
    fdmoe_destroy_backend(shared);
    job_free(&j);
}

/* The sized initialisers write no more than the caller's struct and equal the unsized ones. */
static void test_sized_init(void) {
    FdmoeConfig a, b;
    memset(&a, 0xab, sizeof a);
    memset(&b, 0xcd, sizeof b);
    CHECK_OK(fdmoe_config_init(&a));
    CHECK_OK(FDMOE_CONFIG_INIT(&b));
    CHECK(memcmp(&a, &b, sizeof a) == 0, "FDMOE_CONFIG_INIT equals fdmoe_config_init");
    FdmoeForwardArgs fa, fb;
    memset(&fa, 0, sizeof fa);
    memset(&fb, 0x11, sizeof fb);
    CHECK_OK(fdmoe_forward_args_init(&fa));
    CHECK_OK(FDMOE_FORWARD_ARGS_INIT(&fb));
    CHECK(fb.struct_size == sizeof fb && fb.num_tokens == fa.num_tokens && fb.x == NULL &&
              fb.out == NULL && fb.stream == NULL && fb.flags == fa.flags,
          "FDMOE_FORWARD_ARGS_INIT equals fdmoe_forward_args_init");

    /* An older caller's smaller FdmoeWeights (v1 ended before w13_scale): the bytes past it
       stay untouched, and struct_size says how many were written. */
    const size_t v1 = offsetof(FdmoeWeights, w13_scale);
    unsigned char buf[sizeof(FdmoeWeights) + 16];
    memset(buf, 0x5a, sizeof buf);
    CHECK_OK(fdmoe_weights_init_sized((FdmoeWeights *)buf, v1));
    FdmoeWeights w;
    memcpy(&w, buf, v1);
    CHECK(w.struct_size == v1, "struct_size %u, expected %zu", w.struct_size, v1);
    CHECK(w.layout == FDMOE_LAYOUT_TORCH && w.w13 == NULL && w.shared_w2 == NULL, "v1 defaults");
    int untouched = 1;
    for (size_t i = v1; i < sizeof buf; ++i) untouched &= buf[i] == 0x5a;
    CHECK(untouched, "bytes past the caller's struct were written");
    CHECK_STATUS(fdmoe_weights_init_sized((FdmoeWeights *)buf, v1 - 8), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("size");
    CHECK_STATUS(fdmoe_config_init_sized(NULL, sizeof a), FDMOE_STATUS_NULL_ARGUMENT);
}

int main(void) {
    printf("test_api (seed %llu)\n", (unsigned long long)test_seed());
    test_last_error_message(); /* first: checks the message before any call */
    test_versions_and_strings();
    test_init_defaults();
    test_sized_init();
    test_queries();
    test_lifecycle();
    test_threads();
    return check_finish();
}
