/* Quantized experts and the FP8 pre-dispatch through the C API, on the cpu backend:
 * - fdmoe_quantize_weights / fdmoe_dequantize_weights against element decoders written here,
 *   and hand-computed codes;
 * - every format (FP8_BLOCK, MXFP4, NVFP4) loaded both ways (quantize-on-load from dense f32,
 *   pre-quantized from the codec's output): bitwise equal outputs, and a double reference on
 *   the weights dequantized here (FP8_BLOCK: inputs of both GEMMs quantized per token per 128
 *   channels, with an E4M3 rounding written here);
 * - the accuracy of each format against the dense f32 layer, printed (not asserted);
 * - fdmoe_pre_dispatch_fp8 against a reference written here, padding, capacity and errors;
 * - the errors of the new FdmoeWeights fields and codec calls, and old struct sizes.
 */
#include <stddef.h>

#include "ref.h"

static const uint32_t FORMATS[3] = {FDMOE_DTYPE_FP8_BLOCK, FDMOE_DTYPE_MXFP4, FDMOE_DTYPE_NVFP4};

static const char *format_name(uint32_t f) {
    return f == FDMOE_DTYPE_FP8_BLOCK ? "fp8_block" : f == FDMOE_DTYPE_MXFP4 ? "mxfp4" : "nvfp4";
}

/* ---- Element codecs written here (independent of the library). ---- */

static float e4m3_value(uint8_t b) {
    int e = (b >> 3) & 15, m = b & 7;
    if (e == 15 && m == 7) {
        return NAN;
    }
    float v = e == 0 ? ldexpf((float)m, -9) : ldexpf(1.0f + (float)m / 8.0f, e - 7);
    return (b & 0x80) ? -v : v;
}

/* Round to nearest even on the E4M3 grid, saturating to +-448 (finite input). */
static float e4m3_round(float v) {
    float a = fabsf(v);
    if (a >= 448.0f) {
        return copysignf(448.0f, v);
    }
    int e;
    frexpf(a, &e); /* a = m * 2^e, m in [0.5, 1): floor(log2 a) = e - 1 */
    int ex = e - 1 < -6 ? -6 : e - 1;
    float step = ldexpf(1.0f, ex - 3);
    return copysignf(rintf(a / step) * step, v);
}

/* The code of an E4M3 value on the grid (sign from the sign bit, so -0 is 0x80). */
static uint8_t e4m3_code(float v) {
    float a = fabsf(v);
    for (int c = 0; c < 127; ++c) {
        if (e4m3_value((uint8_t)c) == a) {
            return (uint8_t)(c | (signbit(v) ? 0x80 : 0));
        }
    }
    return 0x7F;
}

static float e2m1_value(uint8_t nibble) {
    static const float v[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    return (nibble & 8) ? -v[nibble & 7] : v[nibble & 7];
}

static float ue8m0_value(uint8_t b) { return b == 0xFF ? NAN : ldexpf(1.0f, (int)b - 127); }

/* Scales per matrix part: bytes of data and of scales for an [n, k] matrix. */
static size_t data_bytes(uint32_t f, size_t n, size_t k) {
    return f == FDMOE_DTYPE_FP8_BLOCK ? n * k : n * k / 2;
}

static size_t scale_bytes(uint32_t f, size_t n, size_t k) {
    if (f == FDMOE_DTYPE_FP8_BLOCK) {
        return ((n + 127) / 128) * ((k + 127) / 128) * 4;
    }
    return f == FDMOE_DTYPE_MXFP4 ? n * k / 32 : n * k / 16;
}

/* Dequantizes one [n, k] matrix from its parts with the decoders above. */
static void decode_here(uint32_t f, size_t n, size_t k, const uint8_t *data,
                        const uint8_t *scales, float global, float *out) {
    for (size_t r = 0; r < n; ++r) {
        for (size_t c = 0; c < k; ++c) {
            float v;
            if (f == FDMOE_DTYPE_FP8_BLOCK) {
                float s;
                memcpy(&s, scales + ((r / 128) * ((k + 127) / 128) + c / 128) * 4, 4);
                v = e4m3_value(data[r * k + c]) * s;
            } else {
                uint8_t byte = data[(r * k + c) / 2];
                uint8_t nib = (c % 2 == 0) ? (byte & 15) : (byte >> 4);
                float s = f == FDMOE_DTYPE_MXFP4 ? ue8m0_value(scales[r * (k / 32) + c / 32])
                                                 : e4m3_value(scales[r * (k / 16) + c / 16]) * global;
                v = e2m1_value(nib) * s;
            }
            out[r * k + c] = v;
        }
    }
}

/* FP8 per-token activation round trip of one row (groups of 128, amax floored at 1e-4). */
static void fp8_round_trip(float *row, size_t n) {
    for (size_t g = 0; g < n; g += 128) {
        size_t end = g + 128 < n ? g + 128 : n;
        float amax = 0.0f;
        for (size_t i = g; i < end; ++i) {
            amax = fabsf(row[i]) > amax ? fabsf(row[i]) : amax;
        }
        amax = amax > 1e-4f ? amax : 1e-4f;
        float mul = 448.0f / amax, scale = amax / 448.0f;
        for (size_t i = g; i < end; ++i) {
            row[i] = e4m3_round(row[i] * mul) * scale;
        }
    }
}

/* ---- A quantized copy of a layer's experts, made with fdmoe_quantize_weights. ---- */

typedef struct {
    uint32_t format;
    uint8_t *data[2], *scales[2];
    float *globals[2];
    float *deq[2]; /* decoded here: [E, 2I, L], [E, L, I] */
} Packed;

static int pack(Packed *p, uint32_t format, const Layer *ly) {
    memset(p, 0, sizeof *p);
    p->format = format;
    size_t E = ly->E, shapes[2][2] = {{2 * ly->I, ly->L}, {ly->L, ly->I}};
    const float *src[2] = {ly->w13, ly->w2};
    int ok = 1;
    for (int m = 0; m < 2; ++m) {
        size_t n = shapes[m][0], k = shapes[m][1];
        size_t db = data_bytes(format, n, k), sb = scale_bytes(format, n, k);
        p->data[m] = (uint8_t *)xmalloc(E * db);
        p->scales[m] = (uint8_t *)xmalloc(E * sb);
        p->globals[m] = format == FDMOE_DTYPE_NVFP4 ? alloc_f32(E) : NULL;
        p->deq[m] = alloc_f32(E * n * k);
        FdmoeQuantizedTensor t;
        CHECK_OK(fdmoe_quantized_tensor_init(&t));
        t.format = format;
        t.num_matrices = (uint32_t)E;
        t.rows = (uint32_t)n;
        t.cols = (uint32_t)k;
        t.data = p->data[m];
        t.scales = p->scales[m];
        t.global_scales = p->globals[m];
        ok &= CHECK_OK(fdmoe_quantize_weights(src[m], FDMOE_DTYPE_F32, &t));
        for (size_t e = 0; e < E; ++e) {
            decode_here(format, n, k, p->data[m] + e * db, p->scales[m] + e * sb,
                        p->globals[m] != NULL ? p->globals[m][e] : 1.0f, p->deq[m] + e * n * k);
        }
        /* The library's decoder agrees bit for bit with the one written here. */
        float *lib = alloc_f32(E * n * k);
        poison_f32(lib, E * n * k);
        ok &= CHECK_OK(fdmoe_dequantize_weights(&t, lib));
        CHECK(memcmp(lib, p->deq[m], E * n * k * sizeof(float)) == 0, "%s matrix %d: decoders differ",
              format_name(format), m);
        free(lib);
    }
    return ok;
}

static void packed_free(Packed *p) {
    for (int m = 0; m < 2; ++m) {
        free(p->data[m]);
        free(p->scales[m]);
        free(p->globals[m]);
        free(p->deq[m]);
    }
    memset(p, 0, sizeof *p);
}

/* FdmoeWeights of pre-quantized experts (TORCH). */
static FdmoeWeights packed_weights(const Packed *p) {
    FdmoeWeights w;
    fdmoe_weights_init(&w);
    w.dtype = p->format;
    w.dense_dtype = FDMOE_DTYPE_F32;
    w.w13 = p->data[0];
    w.w2 = p->data[1];
    w.w13_scale = p->scales[0];
    w.w2_scale = p->scales[1];
    w.w13_global_scale = p->globals[0];
    w.w2_global_scale = p->globals[1];
    return w;
}

/* ---- The layer and its reference. ---- */

static LayerSpec spec_quantized(void) {
    LayerSpec s = spec_small();
    s.num_experts = 4;
    s.top_k = 2;
    s.hidden_size = 128;
    s.intermediate_size = 128;
    s.routing = FDMOE_ROUTING_GIVEN;
    return s;
}

/* Given routing: distinct experts per token, positive weights. */
static void given_routing(Rng *r, const Layer *ly, size_t T, int32_t *ids, float *w) {
    for (size_t t = 0; t < T; ++t) {
        uint32_t first = rng_below(r, (uint32_t)ly->E);
        for (size_t j = 0; j < ly->k; ++j) {
            ids[t * ly->k + j] = (int32_t)((first + j) % ly->E);
            w[t * ly->k + j] = 0.25f + (float)rng_uniform(r);
        }
    }
}

/* out [T, H] in double with experts w13 [E, 2I, L] / w2 [E, L, I] (no latent, no shared). */
static void reference(const Layer *ly, const float *w13, const float *w2, int act_quant,
                      size_t T, const float *x, const int32_t *ids, const float *wts,
                      double *out) {
    size_t H = ly->H, I = ly->I, L = ly->L, k = ly->k;
    float *u = alloc_f32(L), *a32 = alloc_f32(I);
    double *ud = (double *)xmalloc(L * sizeof(double)), *gu = (double *)xmalloc(2 * I * sizeof(double));
    double *a = (double *)xmalloc(I * sizeof(double)), *y = (double *)xmalloc(L * sizeof(double));
    for (size_t t = 0; t < T; ++t) {
        memcpy(u, x + t * H, L * sizeof(float));
        if (act_quant) {
            fp8_round_trip(u, L);
        }
        for (size_t c = 0; c < L; ++c) {
            ud[c] = u[c];
        }
        double *o = out + t * H;
        for (size_t c = 0; c < H; ++c) {
            o[c] = 0.0;
        }
        for (size_t j = 0; j < k; ++j) {
            size_t e = (size_t)ids[t * k + j];
            ref_matvec(w13 + e * 2 * I * L, 2 * I, L, ud, gu);
            for (size_t i = 0; i < I; ++i) {
                a32[i] = (float)ref_activation(ly->s.activation, gu[i], gu[I + i]);
            }
            if (act_quant) {
                fp8_round_trip(a32, I);
            }
            for (size_t i = 0; i < I; ++i) {
                a[i] = act_quant ? a32[i] : ref_activation(ly->s.activation, gu[i], gu[I + i]);
            }
            ref_matvec(w2 + e * L * I, L, I, a, y);
            for (size_t c = 0; c < H; ++c) {
                o[c] += wts[t * k + j] * y[c];
            }
        }
    }
    free(u);
    free(a32);
    free(ud);
    free(gu);
    free(a);
    free(y);
}

/* Creates a layer of `weight_dtype`, loads `w`, runs one forward into `out` (poisoned first). */
static int run_layer(const Layer *ly, uint32_t weight_dtype, const FdmoeWeights *w, size_t T,
                     const float *x, const int32_t *ids, const float *wts, float *out) {
    FdmoeConfig cfg;
    layer_config(ly, &cfg, 8);
    cfg.weight_dtype = weight_dtype;
    FdmoeBackend *b = NULL;
    int ok = CHECK_OK(fdmoe_create_backend(&cfg, &b));
    ok = ok && CHECK_OK(fdmoe_load_weights(b, w));
    poison_f32(out, T * ly->H);
    if (ok) {
        FdmoeForwardArgs a;
        fdmoe_forward_args_init(&a);
        a.num_tokens = (uint32_t)T;
        a.x = x;
        a.out = out;
        a.topk_ids = ids;
        a.topk_weights = wts;
        ok = CHECK_OK(fdmoe_forward(b, &a));
        CHECK(count_non_finite(out, T * ly->H) == 0, "every output element written");
    }
    fdmoe_destroy_backend(b);
    return ok;
}

static void test_formats(void) {
    LayerSpec spec = spec_quantized();
    Rng rng = rng_for("formats");
    Layer ly;
    layer_init(&ly, &spec, &rng);
    const size_t T = 5, H = ly.H;
    float *x = alloc_f32(T * H), *wts = alloc_f32(T * ly.k);
    int32_t *ids = (int32_t *)xmalloc(T * ly.k * sizeof(int32_t));
    fill_normal(&rng, x, T * H, 1.0);
    given_routing(&rng, &ly, T, ids, wts);
    float *dense = alloc_f32(T * H), *a = alloc_f32(T * H), *b = alloc_f32(T * H);
    double *want = (double *)xmalloc(T * H * sizeof(double));

    WeightOptions o = weight_options(FDMOE_LAYOUT_TORCH);
    o.gate = GATE_NONE;
    WeightSet ws;
    weightset_build(&ws, &ly, &o);
    run_layer(&ly, FDMOE_DTYPE_F32, &ws.w, T, x, ids, wts, dense);
    double *dense64 = (double *)xmalloc(T * H * sizeof(double));
    for (size_t i = 0; i < T * H; ++i) {
        dense64[i] = dense[i];
    }
    for (int q = 0; q < 3; ++q) {
        uint32_t f = FORMATS[q];
        Packed p;
        if (!pack(&p, f, &ly)) {
            packed_free(&p);
            continue;
        }
        /* quantize-on-load and the pre-quantized codec output: the same layer, bit for bit. */
        run_layer(&ly, f, &ws.w, T, x, ids, wts, a);
        FdmoeWeights pw = packed_weights(&p);
        run_layer(&ly, f, &pw, T, x, ids, wts, b);
        CHECK(memcmp(a, b, T * H * sizeof(float)) == 0, "%s: quantize-on-load == pre-quantized",
              format_name(f));
        int fp8 = f == FDMOE_DTYPE_FP8_BLOCK;
        reference(&ly, p.deq[0], p.deq[1], fp8, T, x, ids, wts, want);
        double err = rel_l2(a, want, T * H);
        CHECK(err <= (fp8 ? 1e-4 : 1e-5), "%s: rel. error %.3e vs the reference", format_name(f), err);
        if (fp8) {
            /* ... and the activation quantization is really there. */
            reference(&ly, p.deq[0], p.deq[1], 0, T, x, ids, wts, want);
            double without = rel_l2(a, want, T * H);
            CHECK(without > 100.0 * err, "fp8_block without activation quantization: %.3e", without);
        }
        printf("%s: rel. error %.2e vs reference, %.2e vs the float32 layer (reported)\n",
               format_name(f), err, rel_l2(a, dense64, T * H));
        packed_free(&p);
    }
    weightset_free(&ws, ly.E);
    free(x);
    free(wts);
    free(ids);
    free(dense);
    free(dense64);
    free(a);
    free(b);
    free(want);
    layer_free(&ly);
}

/* ---- Codec entry points. ---- */

static void test_codec_values_and_errors(void) {
    /* FP8_BLOCK: one 1 x 4 matrix; amax 448 gives scale 1, so codes are the values' own. */
    float fp8_in[4] = {448.0f, -1.5f, 0.0f, 3.1f};
    uint8_t data[32];
    float fscale = 0.0f;
    FdmoeQuantizedTensor t;
    CHECK_OK(fdmoe_quantized_tensor_init(&t));
    CHECK(t.struct_size == sizeof t && t.format == FDMOE_DTYPE_FP8_BLOCK, "defaults");
    t.num_matrices = 1;
    t.rows = 1;
    t.cols = 4;
    t.data = data;
    t.scales = &fscale;
    CHECK_OK(fdmoe_quantize_weights(fp8_in, FDMOE_DTYPE_F32, &t));
    CHECK(fscale == 1.0f, "fp8 scale %g", fscale);
    CHECK(data[0] == 0x7E && data[1] == 0xBC && data[2] == 0x00 && data[3] == e4m3_code(e4m3_round(3.1f)),
          "fp8 codes %02x %02x %02x %02x", data[0], data[1], data[2], data[3]);

    /* MXFP4: one group of 32 with amax 6: scale 2^0 (byte 127), elements on the E2M1 grid. */
    float mx_in[32];
    for (int i = 0; i < 32; ++i) {
        mx_in[i] = e2m1_value((uint8_t)(i % 16));
    }
    mx_in[0] = 6.0f;
    uint8_t mx_scale = 0;
    t.format = FDMOE_DTYPE_MXFP4;
    t.cols = 32;
    t.scales = &mx_scale;
    CHECK_OK(fdmoe_quantize_weights(mx_in, FDMOE_DTYPE_F32, &t));
    CHECK(mx_scale == 127, "mxfp4 scale byte %u", mx_scale);
    CHECK(data[0] == (7 | (1 << 4)) && data[1] == (2 | (3 << 4)), "mxfp4 nibbles %02x %02x",
          data[0], data[1]);
    float back[32];
    CHECK_OK(fdmoe_dequantize_weights(&t, back));
    int same = 1;
    for (int i = 0; i < 32; ++i) {
        same &= back[i] == mx_in[i]; /* values on the grid come back exactly */
    }
    CHECK(same, "mxfp4 round trip");

    /* NVFP4 with bf16 input: the global scale is amax / (6 * 448). */
    uint16_t nv_in[16];
    for (int i = 0; i < 16; ++i) {
        nv_in[i] = f32_to_bf16((float)(i - 8) * 0.25f);
    }
    uint8_t nv_scale = 0;
    float global = 0.0f;
    t.format = FDMOE_DTYPE_NVFP4;
    t.cols = 16;
    t.scales = &nv_scale;
    t.global_scales = &global;
    CHECK_OK(fdmoe_quantize_weights(nv_in, FDMOE_DTYPE_BF16, &t));
    CHECK(global == 2.0f / (6.0f * 448.0f), "nvfp4 global %g", global);
    CHECK(nv_scale == 0x7E, "nvfp4 block scale %02x (448)", nv_scale);

    /* Errors: each names the argument. */
    t.cols = 40; /* not a multiple of 16 */
    CHECK_STATUS(fdmoe_quantize_weights(nv_in, FDMOE_DTYPE_BF16, &t), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("cols = 40");
    t.cols = 16;
    t.global_scales = NULL;
    CHECK_STATUS(fdmoe_quantize_weights(nv_in, FDMOE_DTYPE_BF16, &t), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("global_scales");
    t.format = FDMOE_DTYPE_MXFP4;
    t.cols = 32;
    t.scales = &mx_scale;
    t.global_scales = &global;
    CHECK_STATUS(fdmoe_quantize_weights(mx_in, FDMOE_DTYPE_F32, &t), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("global_scales");
    t.global_scales = NULL;
    t.format = FDMOE_DTYPE_BF16;
    CHECK_STATUS(fdmoe_quantize_weights(mx_in, FDMOE_DTYPE_F32, &t), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("format");
    t.format = 77;
    CHECK_STATUS(fdmoe_dequantize_weights(&t, back), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("format");
    t.format = FDMOE_DTYPE_MXFP4;
    CHECK_STATUS(fdmoe_quantize_weights(mx_in, FDMOE_DTYPE_MXFP4, &t), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("src_dtype");
    CHECK_STATUS(fdmoe_quantize_weights(NULL, FDMOE_DTYPE_F32, &t), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("src");
    CHECK_STATUS(fdmoe_quantize_weights(mx_in, FDMOE_DTYPE_F32, NULL), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("dst");
    CHECK_STATUS(fdmoe_dequantize_weights(&t, NULL), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("dst");
    t.data = NULL;
    CHECK_STATUS(fdmoe_dequantize_weights(&t, back), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("src->data");
    t.num_matrices = 0; /* empty: nothing to read or write */
    CHECK_OK(fdmoe_dequantize_weights(&t, NULL));
    t.struct_size = 4;
    CHECK_STATUS(fdmoe_dequantize_weights(&t, back), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("struct_size");
}

/* ---- Weight loading errors of the new fields. ---- */

static void test_weight_errors(void) {
    LayerSpec spec = spec_quantized();
    Rng rng = rng_for("weight errors");
    Layer ly;
    layer_init(&ly, &spec, &rng);
    Packed p;
    pack(&p, FDMOE_DTYPE_NVFP4, &ly);
    FdmoeConfig cfg;
    layer_config(&ly, &cfg, 8);
    cfg.weight_dtype = FDMOE_DTYPE_NVFP4;
    FdmoeBackend *b = NULL;
    if (!CHECK_OK(fdmoe_create_backend(&cfg, &b))) {
        packed_free(&p);
        layer_free(&ly);
        return;
    }
    FdmoeWeights w = packed_weights(&p);
    CHECK_OK(fdmoe_load_weights(b, &w));

#define EXPECT_LOAD(weights, status, needle)                   \
    do {                                                       \
        CHECK_STATUS(fdmoe_load_weights(b, &(weights)), status); \
        CHECK_MESSAGE_HAS(needle);                             \
    } while (0)

    w = packed_weights(&p);
    w.w13_scale = NULL;
    EXPECT_LOAD(w, FDMOE_STATUS_NULL_ARGUMENT, "weights.w13_scale");
    w = packed_weights(&p);
    w.w2_global_scale = NULL;
    EXPECT_LOAD(w, FDMOE_STATUS_NULL_ARGUMENT, "weights.w2_global_scale");
    w = packed_weights(&p);
    w.dtype = FDMOE_DTYPE_MXFP4; /* config.weight_dtype is nvfp4 */
    EXPECT_LOAD(w, FDMOE_STATUS_INVALID_ARGUMENT, "config.weight_dtype = nvfp4");
    CHECK_MESSAGE_HAS("weights.dtype = mxfp4");
    w = packed_weights(&p);
    w.layout = FDMOE_LAYOUT_PADDLE;
    EXPECT_LOAD(w, FDMOE_STATUS_INVALID_ARGUMENT, "paddle");
    w = packed_weights(&p);
    w.layout = FDMOE_LAYOUT_PER_EXPERT;
    w.w13 = w.w2 = NULL;
    EXPECT_LOAD(w, FDMOE_STATUS_UNSUPPORTED, "per_expert");
    w = packed_weights(&p);
    w.dense_dtype = FDMOE_DTYPE_MXFP4;
    EXPECT_LOAD(w, FDMOE_STATUS_INVALID_ARGUMENT, "weights.dense_dtype");
    w = packed_weights(&p);
    w.dense_dtype = 99;
    EXPECT_LOAD(w, FDMOE_STATUS_INVALID_ARGUMENT, "weights.dense_dtype");
    w = packed_weights(&p);
    w.ownership = FDMOE_OWNERSHIP_BORROW;
    EXPECT_LOAD(w, FDMOE_STATUS_UNSUPPORTED, "borrow");
    /* A NaN block scale is rejected with its expert and position. */
    uint8_t saved = p.scales[1][3 * (ly.L * ly.I / 16) + 2 * (ly.I / 16) + 1];
    p.scales[1][3 * (ly.L * ly.I / 16) + 2 * (ly.I / 16) + 1] = 0x7F;
    w = packed_weights(&p);
    EXPECT_LOAD(w, FDMOE_STATUS_INVALID_ARGUMENT, "weights.w2_scale[expert 3][2, 1]");
    p.scales[1][3 * (ly.L * ly.I / 16) + 2 * (ly.I / 16) + 1] = saved;
    float saved_global = p.globals[0][1];
    p.globals[0][1] = NAN;
    w = packed_weights(&p);
    EXPECT_LOAD(w, FDMOE_STATUS_INVALID_ARGUMENT, "weights.w13_global_scale[1]");
    p.globals[0][1] = saved_global;

    /* Dense experts with scale pointers: the scales would be ignored, so it is an error. */
    WeightOptions o = weight_options(FDMOE_LAYOUT_TORCH);
    o.gate = GATE_NONE;
    WeightSet ws;
    weightset_build(&ws, &ly, &o);
    w = ws.w;
    w.w2_scale = p.scales[1];
    EXPECT_LOAD(w, FDMOE_STATUS_INVALID_ARGUMENT, "weights.w2_scale");
    /* A caller compiled before the quantized fields (struct_size up to shared_w2) still loads
     * dense weights, here quantized at load. */
    w = ws.w;
    w.struct_size = (uint32_t)offsetof(FdmoeWeights, w13_scale);
    CHECK_OK(fdmoe_load_weights(b, &w));
    w.struct_size = (uint32_t)offsetof(FdmoeWeights, w13_scale) - 8;
    EXPECT_LOAD(w, FDMOE_STATUS_INVALID_ARGUMENT, "struct_size");
    /* The layer still works after the failures. */
    w = packed_weights(&p);
    CHECK_OK(fdmoe_load_weights(b, &w));
#undef EXPECT_LOAD

    weightset_free(&ws, ly.E);
    fdmoe_destroy_backend(b);
    packed_free(&p);
    layer_free(&ly);

    uint64_t features = 0;
    CHECK_OK(fdmoe_query_features(FDMOE_BACKEND_KIND_CPU, &features));
    const uint64_t want = FDMOE_FEATURE_WEIGHT_FP8_BLOCK | FDMOE_FEATURE_WEIGHT_MXFP4 |
                          FDMOE_FEATURE_WEIGHT_NVFP4 | FDMOE_FEATURE_FP8_PRE_DISPATCH;
    CHECK((features & want) == want, "cpu features %#llx", (unsigned long long)features);
}

/* ---- FP8 pre-dispatch. ---- */

typedef struct {
    size_t T, T_max, H, k;
    uint16_t *x; /* bf16 */
    int32_t *ids;
    float *wts;
    uint8_t *out_x;
    int32_t *out_scales, *out_ids;
    float *out_wts;
} PreDispatch;

static void pd_init(PreDispatch *p, Rng *rng, size_t T, size_t T_max, size_t H, size_t k) {
    p->T = T;
    p->T_max = T_max;
    p->H = H;
    p->k = k;
    p->x = (uint16_t *)xmalloc(T * H * 2);
    for (size_t i = 0; i < T * H; ++i) {
        /* Groups of very different ranges. */
        double range = ((i / 32) % 3 == 0) ? 1e-3 : ((i / 32) % 3 == 1) ? 1.0 : 300.0;
        p->x[i] = f32_to_bf16((float)(rng_normal(rng) * range));
    }
    p->ids = (int32_t *)xmalloc(T * k * sizeof(int32_t));
    p->wts = alloc_f32(T * k);
    for (size_t i = 0; i < T * k; ++i) {
        p->ids[i] = (int32_t)rng_below(rng, 64);
        p->wts[i] = (float)rng_uniform(rng);
    }
    p->out_x = (uint8_t *)xmalloc(T_max * H);
    p->out_scales = (int32_t *)xmalloc(T_max * (H / 128) * sizeof(int32_t));
    p->out_ids = (int32_t *)xmalloc(T_max * k * sizeof(int32_t));
    p->out_wts = alloc_f32(T_max * k);
    memset(p->out_x, 0xA5, T_max * H);
    memset(p->out_scales, 0xA5, T_max * (H / 128) * sizeof(int32_t));
    poison_i32(p->out_ids, T_max * k);
    poison_f32(p->out_wts, T_max * k);
}

static void pd_free(PreDispatch *p) {
    free(p->x);
    free(p->ids);
    free(p->wts);
    free(p->out_x);
    free(p->out_scales);
    free(p->out_ids);
    free(p->out_wts);
}

static FdmoePreDispatchArgs pd_args(const PreDispatch *p) {
    FdmoePreDispatchArgs a;
    fdmoe_pre_dispatch_args_init(&a);
    a.num_tokens = (uint32_t)p->T;
    a.hidden_size = (uint32_t)p->H;
    a.top_k = (uint32_t)p->k;
    a.max_tokens = (uint32_t)p->T_max;
    a.x = p->x;
    a.topk_ids = p->ids;
    a.topk_weights = p->wts;
    a.out_x = p->out_x;
    a.out_scales = p->out_scales;
    a.out_topk_ids = p->out_ids;
    a.out_topk_weights = p->out_wts;
    return a;
}

/* The untouched-output check: every byte still holds the poison. */
static int pd_untouched(const PreDispatch *p) {
    for (size_t i = 0; i < p->T_max * p->H; ++i) {
        if (p->out_x[i] != 0xA5) {
            return 0;
        }
    }
    for (size_t i = 0; i < p->T_max * p->k; ++i) {
        if (p->out_ids[i] != INT32_MIN || !isnan(p->out_wts[i])) {
            return 0;
        }
    }
    return 1;
}

static void test_pre_dispatch(void) {
    Rng rng = rng_for("pre-dispatch");
    PreDispatch p;
    pd_init(&p, &rng, 5, 8, 256, 3);
    FdmoePreDispatchArgs a = pd_args(&p);
    CHECK(a.memory == FDMOE_MEMORY_HOST && a.x_dtype == FDMOE_DTYPE_BF16, "defaults");
    CHECK_OK(fdmoe_pre_dispatch_fp8(&a));
    size_t mismatches = 0, groups = p.H / 32;
    for (size_t t = 0; t < p.T_max; ++t) {
        for (size_t g = 0; g < groups; ++g) {
            uint8_t byte = (uint8_t)((uint32_t)p.out_scales[t * (p.H / 128) + g / 4] >> (8 * (g % 4)));
            if (t >= p.T) {
                mismatches += byte != 0;
                for (size_t c = 0; c < 32; ++c) {
                    mismatches += p.out_x[t * p.H + g * 32 + c] != 0;
                }
                continue;
            }
            /* Reference: amax floored at 1e-4, exponent = ceil(log2(amax / 448)). */
            float amax = 0.0f;
            for (size_t c = 0; c < 32; ++c) {
                float v = fabsf(bf16_to_f32(p.x[t * p.H + g * 32 + c]));
                amax = v > amax ? v : amax;
            }
            amax = amax > 1e-4f ? amax : 1e-4f;
            int e;
            float m = frexpf(amax / 448.0f, &e);
            int exponent = m == 0.5f ? e - 1 : e;
            mismatches += byte != (uint8_t)(exponent + 127);
            for (size_t c = 0; c < 32; ++c) {
                float v = bf16_to_f32(p.x[t * p.H + g * 32 + c]);
                uint8_t want = e4m3_code(e4m3_round(ldexpf(v, -exponent)));
                mismatches += p.out_x[t * p.H + g * 32 + c] != want;
            }
        }
        for (size_t j = 0; j < p.k; ++j) {
            int32_t id = t < p.T ? p.ids[t * p.k + j] : -1;
            float w = t < p.T ? p.wts[t * p.k + j] : 0.0f;
            mismatches += p.out_ids[t * p.k + j] != id || p.out_wts[t * p.k + j] != w;
        }
    }
    CHECK(mismatches == 0, "%zu pre-dispatch elements differ from the reference", mismatches);

    /* Errors, each before any write. */
    pd_free(&p);
    pd_init(&p, &rng, 5, 4, 256, 3);
    a = pd_args(&p);
    CHECK_STATUS(fdmoe_pre_dispatch_fp8(&a), FDMOE_STATUS_CAPACITY_EXCEEDED);
    CHECK_MESSAGE_HAS("max_tokens = 4");
    CHECK(pd_untouched(&p), "capacity is checked before any write");
    a = pd_args(&p);
    a.max_tokens = 8;
    a.hidden_size = 96;
    CHECK_STATUS(fdmoe_pre_dispatch_fp8(&a), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("hidden_size = 96");
    a = pd_args(&p);
    a.num_tokens = 3;
    a.top_k = 0;
    CHECK_STATUS(fdmoe_pre_dispatch_fp8(&a), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("top_k");
    a = pd_args(&p);
    a.num_tokens = 3;
    a.out_scales = NULL;
    CHECK_STATUS(fdmoe_pre_dispatch_fp8(&a), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("out_scales");
    a = pd_args(&p);
    a.num_tokens = 3;
    a.topk_weights = NULL;
    CHECK_STATUS(fdmoe_pre_dispatch_fp8(&a), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_MESSAGE_HAS("topk_weights");
    a = pd_args(&p);
    a.num_tokens = 3;
    a.memory = FDMOE_MEMORY_DEVICE; /* host buffers: no driver here, or not device memory */
    {
        FdmoeStatus st = fdmoe_pre_dispatch_fp8(&a);
        CHECK(st == FDMOE_STATUS_NO_DEVICE || st == FDMOE_STATUS_INVALID_ARGUMENT, "status %u", st);
        CHECK(strstr(fdmoe_last_error_message(), "CUDA") != NULL ||
                  strstr(fdmoe_last_error_message(), "host pointer") != NULL,
              "message: %s", fdmoe_last_error_message());
    }
    a = pd_args(&p);
    a.num_tokens = 3;
    a.stream = (void *)(uintptr_t)0x10;
    CHECK_STATUS(fdmoe_pre_dispatch_fp8(&a), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("stream");
    a = pd_args(&p);
    a.num_tokens = 3;
    a.x_dtype = FDMOE_DTYPE_NVFP4;
    CHECK_STATUS(fdmoe_pre_dispatch_fp8(&a), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("x_dtype");
    a.struct_size = 8;
    CHECK_STATUS(fdmoe_pre_dispatch_fp8(&a), FDMOE_STATUS_INVALID_ARGUMENT);
    CHECK_MESSAGE_HAS("struct_size");
    CHECK_STATUS(fdmoe_pre_dispatch_fp8(NULL), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(fdmoe_pre_dispatch_args_init(NULL), FDMOE_STATUS_NULL_ARGUMENT);
    CHECK(pd_untouched(&p), "failed calls write nothing");
    /* T = 0: every row is padding. */
    a = pd_args(&p);
    a.num_tokens = 0;
    a.x = NULL;
    a.topk_ids = NULL;
    a.topk_weights = NULL;
    CHECK_OK(fdmoe_pre_dispatch_fp8(&a));
    CHECK(p.out_ids[0] == -1 && p.out_wts[p.T_max * p.k - 1] == 0.0f && p.out_x[7] == 0 &&
              p.out_scales[1] == 0,
          "padding rows");
    pd_free(&p);
}

int main(void) {
    printf("test_quantized (seed %llu)\n", (unsigned long long)test_seed());
    test_codec_values_and_errors();
    test_formats();
    test_weight_errors();
    test_pre_dispatch();
    return check_finish();
}
