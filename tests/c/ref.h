/* A naive double-precision reference of SPEC §3 and the helpers that turn one random layer
 * into the weight layouts and dtypes the C API accepts.
 *
 * A `Layer` holds one layer's weights in the canonical TORCH orientation as f32:
 *   w13 [E, 2I, L] (gate rows then up rows), w2 [E, L, I], gate [E, H], bias [E],
 *   fc1 [L, H], fc2 [H, L], shared w13 [2S, H], shared w2 [H, S]   (L = latent or H).
 * `weightset_build` derives the caller-side buffers of any layout / dtype from it, and
 * `ref_forward` computes the expected output from the same canonical values in double, so a
 * layout or dtype conversion bug shows up as a mismatch. Everything is `static inline`.
 */
#ifndef FDMOE_TEST_REF_H
#define FDMOE_TEST_REF_H

#include "check.h"

/* ---- Dtype conversions (round to nearest even), as the library's `half` crate does. ---- */

static inline uint16_t f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
    }
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return (uint16_t)(sign | 0x7e00u);
    }
    if (a >= 0x477ff000u) { /* >= 65520 rounds to infinity */
        return (uint16_t)(sign | 0x7c00u);
    }
    if (a < 0x38800000u) { /* below 2^-14: a subnormal half; count units of 2^-24 */
        float mag;
        memcpy(&mag, &a, 4);
        return (uint16_t)(sign | (uint32_t)rintf(mag * 16777216.0f));
    }
    uint32_t h = ((((a >> 23) - 127u + 15u) << 10) | ((a & 0x7fffffu) >> 13));
    uint32_t rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) {
        ++h;
    }
    return (uint16_t)(sign | h);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    float mag;
    if (e == 0) {
        mag = (float)m * 5.9604644775390625e-8f; /* m * 2^-24 */
    } else if (e == 31) {
        mag = m != 0 ? NAN : INFINITY;
    } else {
        uint32_t bits = ((e - 15u + 127u) << 23) | (m << 13);
        memcpy(&mag, &bits, 4);
    }
    uint32_t bits;
    memcpy(&bits, &mag, 4);
    bits |= sign;
    memcpy(&mag, &bits, 4);
    return mag;
}

static inline size_t dtype_size(uint32_t dtype) { return dtype == FDMOE_DTYPE_F32 ? 4 : 2; }

/* The value `f` has after a round trip through `dtype`. */
static inline float round_to_dtype(float f, uint32_t dtype) {
    switch (dtype) {
    case FDMOE_DTYPE_BF16:
        return bf16_to_f32(f32_to_bf16(f));
    case FDMOE_DTYPE_F16:
        return f16_to_f32(f32_to_f16(f));
    default:
        return f;
    }
}

static inline void round_all(float *p, size_t n, uint32_t dtype) {
    for (size_t i = 0; i < n; ++i) {
        p[i] = round_to_dtype(p[i], dtype);
    }
}

/* A new buffer holding `n` floats stored as `dtype`. */
static inline void *encode(const float *src, size_t n, uint32_t dtype) {
    void *dst = xmalloc(n * dtype_size(dtype));
    for (size_t i = 0; i < n; ++i) {
        if (dtype == FDMOE_DTYPE_F32) {
            ((float *)dst)[i] = src[i];
        } else if (dtype == FDMOE_DTYPE_BF16) {
            ((uint16_t *)dst)[i] = f32_to_bf16(src[i]);
        } else {
            ((uint16_t *)dst)[i] = f32_to_f16(src[i]);
        }
    }
    return dst;
}

static inline void decode(const void *src, size_t n, uint32_t dtype, float *dst) {
    for (size_t i = 0; i < n; ++i) {
        if (dtype == FDMOE_DTYPE_F32) {
            dst[i] = ((const float *)src)[i];
        } else if (dtype == FDMOE_DTYPE_BF16) {
            dst[i] = bf16_to_f32(((const uint16_t *)src)[i]);
        } else {
            dst[i] = f16_to_f32(((const uint16_t *)src)[i]);
        }
    }
}

/* ---- The layer. ---- */

typedef struct {
    uint32_t num_experts, top_k, hidden_size, intermediate_size;
    uint32_t latent_size; /* 0 = none */
    uint32_t shared_size; /* shared_intermediate_size; 0 = none */
    uint32_t routing, scoring, n_group, topk_group, renormalize;
    float routed_scaling_factor;
    uint32_t activation;
    int with_bias; /* a correction bias (GROUPED_TOPK only) */
} LayerSpec;

/* E=4, k=2, H=24, I=16, softmax top-k, renormalized, SwiGLU. */
static inline LayerSpec spec_small(void) {
    LayerSpec s;
    memset(&s, 0, sizeof s);
    s.num_experts = 4;
    s.top_k = 2;
    s.hidden_size = 24;
    s.intermediate_size = 16;
    s.routing = FDMOE_ROUTING_SOFTMAX_TOPK;
    s.scoring = FDMOE_SCORING_SIGMOID;
    s.n_group = 1;
    s.topk_group = 1;
    s.renormalize = 1;
    s.routed_scaling_factor = 1.0f;
    s.activation = FDMOE_ACTIVATION_SWIGLU;
    return s;
}

typedef struct {
    LayerSpec s;
    size_t E, k, H, I, L, S;
    float *w13, *w2, *gate, *bias, *fc1, *fc2, *sh13, *sh2;
} Layer;

/* Random weights scaled 1/sqrt(fan_in), as SPEC §8 draws them. */
static inline void layer_init(Layer *ly, const LayerSpec *spec, Rng *rng) {
    memset(ly, 0, sizeof *ly);
    ly->s = *spec;
    ly->E = spec->num_experts;
    ly->k = spec->top_k;
    ly->H = spec->hidden_size;
    ly->I = spec->intermediate_size;
    ly->L = spec->latent_size != 0 ? spec->latent_size : spec->hidden_size;
    ly->S = spec->shared_size;
    size_t E = ly->E, H = ly->H, I = ly->I, L = ly->L, S = ly->S;
    ly->w13 = alloc_f32(E * 2 * I * L);
    fill_normal(rng, ly->w13, E * 2 * I * L, 1.0 / sqrt((double)L));
    ly->w2 = alloc_f32(E * L * I);
    fill_normal(rng, ly->w2, E * L * I, 1.0 / sqrt((double)I));
    ly->gate = alloc_f32(E * H);
    fill_normal(rng, ly->gate, E * H, 1.0 / sqrt((double)H));
    if (spec->with_bias) {
        ly->bias = alloc_f32(E);
        fill_normal(rng, ly->bias, E, 0.1);
    }
    if (spec->latent_size != 0) {
        ly->fc1 = alloc_f32(L * H);
        fill_normal(rng, ly->fc1, L * H, 1.0 / sqrt((double)H));
        ly->fc2 = alloc_f32(H * L);
        fill_normal(rng, ly->fc2, H * L, 1.0 / sqrt((double)L));
    }
    if (S != 0) {
        ly->sh13 = alloc_f32(2 * S * H);
        fill_normal(rng, ly->sh13, 2 * S * H, 1.0 / sqrt((double)H));
        ly->sh2 = alloc_f32(H * S);
        fill_normal(rng, ly->sh2, H * S, 1.0 / sqrt((double)S));
    }
}

/* Rounds the dense matrices (not gate or bias) to `dtype`, so that the reference sees the
 * values the library keeps when config.weight_dtype is bf16/f16. */
static inline void layer_round_weights(Layer *ly, uint32_t dtype) {
    round_all(ly->w13, ly->E * 2 * ly->I * ly->L, dtype);
    round_all(ly->w2, ly->E * ly->L * ly->I, dtype);
    if (ly->fc1 != NULL) {
        round_all(ly->fc1, ly->L * ly->H, dtype);
        round_all(ly->fc2, ly->H * ly->L, dtype);
    }
    if (ly->sh13 != NULL) {
        round_all(ly->sh13, 2 * ly->S * ly->H, dtype);
        round_all(ly->sh2, ly->H * ly->S, dtype);
    }
}

static inline void layer_free(Layer *ly) {
    free(ly->w13);
    free(ly->w2);
    free(ly->gate);
    free(ly->bias);
    free(ly->fc1);
    free(ly->fc2);
    free(ly->sh13);
    free(ly->sh2);
    memset(ly, 0, sizeof *ly);
}

/* A config for the layer: f32 activations and weights, 2 CPU threads. */
static inline void layer_config(const Layer *ly, FdmoeConfig *cfg, uint32_t max_tokens) {
    fdmoe_config_init(cfg);
    cfg->num_experts = ly->s.num_experts;
    cfg->top_k = ly->s.top_k;
    cfg->hidden_size = ly->s.hidden_size;
    cfg->intermediate_size = ly->s.intermediate_size;
    cfg->latent_size = ly->s.latent_size;
    cfg->shared_intermediate_size = ly->s.shared_size;
    cfg->routing = ly->s.routing;
    cfg->scoring = ly->s.scoring;
    cfg->n_group = ly->s.n_group;
    cfg->topk_group = ly->s.topk_group;
    cfg->renormalize = ly->s.renormalize;
    cfg->routed_scaling_factor = ly->s.routed_scaling_factor;
    cfg->activation = ly->s.activation;
    cfg->act_dtype = FDMOE_DTYPE_F32;
    cfg->weight_dtype = FDMOE_DTYPE_F32;
    cfg->max_tokens = max_tokens;
    cfg->num_threads = 2;
}

/* ---- Caller-side weight buffers in one layout / dtype. ---- */

enum { GATE_NONE = 0, GATE_EXPERTS_BY_HIDDEN = 1, GATE_HIDDEN_BY_EXPERTS = 2 };

typedef struct {
    uint32_t layout;      /* FdmoeLayout */
    uint32_t dtype;       /* weights.dtype of the dense matrices */
    int interleaved;      /* gate/up rows (PADDLE: columns) alternate */
    int gate;             /* GATE_* */
    uint32_t gate_dtype;  /* weights.gate_dtype */
    uint32_t ownership;   /* FdmoeOwnership */
} WeightOptions;

static inline WeightOptions weight_options(uint32_t layout) {
    WeightOptions o = {layout, FDMOE_DTYPE_F32, 0, GATE_EXPERTS_BY_HIDDEN, FDMOE_DTYPE_F32,
                       FDMOE_OWNERSHIP_OWN};
    return o;
}

typedef struct {
    FdmoeWeights w;
    void *bufs[16];
    size_t nbufs;
    const void **gate_proj, **up_proj, **down_proj;
} WeightSet;

static inline const void *ws_keep(WeightSet *ws, void *p) {
    ws->bufs[ws->nbufs++] = p;
    return p;
}

/* [rows, cols] -> [cols, rows] */
static inline float *transposed(const float *src, size_t rows, size_t cols) {
    float *dst = alloc_f32(rows * cols);
    for (size_t r = 0; r < rows; ++r) {
        for (size_t c = 0; c < cols; ++c) {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
    return dst;
}

/* One matrix [rows, cols] (TORCH orientation) as the layout stores it, encoded as dtype. */
static inline const void *ws_matrix(WeightSet *ws, const float *m, size_t rows, size_t cols,
                                    uint32_t layout, uint32_t dtype) {
    if (layout == FDMOE_LAYOUT_PADDLE) {
        float *t = transposed(m, rows, cols);
        void *enc = encode(t, rows * cols, dtype);
        free(t);
        return ws_keep(ws, enc);
    }
    return ws_keep(ws, encode(m, rows * cols, dtype));
}

/* Builds the FdmoeWeights (and every buffer it points to) for `ly` in the given options. */
static inline void weightset_build(WeightSet *ws, const Layer *ly, const WeightOptions *o) {
    memset(ws, 0, sizeof *ws);
    fdmoe_weights_init(&ws->w);
    size_t E = ly->E, H = ly->H, I = ly->I, L = ly->L, S = ly->S;
    ws->w.layout = o->layout;
    ws->w.dtype = o->dtype;
    ws->w.ownership = o->ownership;
    ws->w.gate_up_interleaved = (uint32_t)o->interleaved;
    if (o->layout == FDMOE_LAYOUT_PER_EXPERT) {
        ws->gate_proj = (const void **)xmalloc(E * sizeof(void *));
        ws->up_proj = (const void **)xmalloc(E * sizeof(void *));
        ws->down_proj = (const void **)xmalloc(E * sizeof(void *));
        for (size_t e = 0; e < E; ++e) {
            const float *w13 = ly->w13 + e * 2 * I * L;
            /* Owned through the pointer arrays (freed in weightset_free). */
            ws->gate_proj[e] = encode(w13, I * L, o->dtype);
            ws->up_proj[e] = encode(w13 + I * L, I * L, o->dtype);
            ws->down_proj[e] = encode(ly->w2 + e * L * I, L * I, o->dtype);
        }
        ws->w.gate_proj = ws->gate_proj;
        ws->w.up_proj = ws->up_proj;
        ws->w.down_proj = ws->down_proj;
    } else {
        /* Stacked: every expert's [2I, L] w13 and [L, I] w2, each oriented per layout. */
        float *w13 = alloc_f32(E * 2 * I * L), *w2 = alloc_f32(E * L * I);
        for (size_t e = 0; e < E; ++e) {
            const float *src = ly->w13 + e * 2 * I * L;
            float *rows = alloc_f32(2 * I * L);
            for (size_t r = 0; r < 2 * I; ++r) {
                /* interleaved: row 2i is gate row i, row 2i+1 is up row i */
                size_t from = o->interleaved ? (r % 2) * I + r / 2 : r;
                memcpy(rows + r * L, src + from * L, L * sizeof(float));
            }
            if (o->layout == FDMOE_LAYOUT_PADDLE) {
                float *t = transposed(rows, 2 * I, L);
                memcpy(w13 + e * 2 * I * L, t, 2 * I * L * sizeof(float));
                free(t);
                t = transposed(ly->w2 + e * L * I, L, I);
                memcpy(w2 + e * L * I, t, L * I * sizeof(float));
                free(t);
            } else {
                memcpy(w13 + e * 2 * I * L, rows, 2 * I * L * sizeof(float));
                memcpy(w2 + e * L * I, ly->w2 + e * L * I, L * I * sizeof(float));
            }
            free(rows);
        }
        ws->w.w13 = ws_keep(ws, encode(w13, E * 2 * I * L, o->dtype));
        ws->w.w2 = ws_keep(ws, encode(w2, E * L * I, o->dtype));
        free(w13);
        free(w2);
    }
    /* fc1/fc2/shared: PADDLE transposed, TORCH and PER_EXPERT as nn.Linear. */
    uint32_t dense_layout = o->layout == FDMOE_LAYOUT_PADDLE ? FDMOE_LAYOUT_PADDLE
                                                             : FDMOE_LAYOUT_TORCH;
    if (ly->fc1 != NULL) {
        ws->w.fc1 = ws_matrix(ws, ly->fc1, L, H, dense_layout, o->dtype);
        ws->w.fc2 = ws_matrix(ws, ly->fc2, H, L, dense_layout, o->dtype);
    }
    if (ly->sh13 != NULL) {
        ws->w.shared_w13 = ws_matrix(ws, ly->sh13, 2 * S, H, dense_layout, o->dtype);
        ws->w.shared_w2 = ws_matrix(ws, ly->sh2, H, S, dense_layout, o->dtype);
    }
    if (o->gate != GATE_NONE) {
        ws->w.gate_dtype = o->gate_dtype;
        if (o->gate == GATE_HIDDEN_BY_EXPERTS) {
            ws->w.gate_layout = FDMOE_GATE_LAYOUT_HIDDEN_BY_EXPERTS;
            ws->w.gate = ws_matrix(ws, ly->gate, E, H, FDMOE_LAYOUT_PADDLE, o->gate_dtype);
        } else {
            ws->w.gate_layout = FDMOE_GATE_LAYOUT_EXPERTS_BY_HIDDEN;
            ws->w.gate = ws_matrix(ws, ly->gate, E, H, FDMOE_LAYOUT_TORCH, o->gate_dtype);
        }
    }
    if (ly->bias != NULL) {
        float *b = alloc_f32(E);
        memcpy(b, ly->bias, E * sizeof(float));
        ws->w.correction_bias = (const float *)ws_keep(ws, b);
    }
}

static inline void weightset_free(WeightSet *ws, size_t num_experts) {
    for (size_t i = 0; i < ws->nbufs; ++i) {
        free(ws->bufs[i]);
    }
    if (ws->gate_proj != NULL) {
        for (size_t e = 0; e < num_experts; ++e) {
            free((void *)ws->gate_proj[e]);
            free((void *)ws->up_proj[e]);
            free((void *)ws->down_proj[e]);
        }
    }
    free(ws->gate_proj);
    free(ws->up_proj);
    free(ws->down_proj);
    memset(ws, 0, sizeof *ws);
}

/* ---- The reference forward (double precision). ---- */

/* (a, ia) ranks above (b, ib): larger first, NaN below everything, ties to the lower index. */
static inline int ref_ranks_above(double a, size_t ia, double b, size_t ib) {
    int an = isnan(a), bn = isnan(b);
    if (an || bn) {
        return an && bn ? ia < ib : bn;
    }
    return a > b || (a == b && ia < ib);
}

/* Indices of the `k` best eligible values, best first; returns how many were found. */
static inline size_t ref_top_k(const double *v, size_t n, const int *eligible, size_t k,
                               size_t *out) {
    size_t found = 0;
    for (size_t j = 0; j < k; ++j) {
        size_t best = n;
        for (size_t i = 0; i < n; ++i) {
            int taken = 0;
            for (size_t q = 0; q < found; ++q) {
                taken |= out[q] == i;
            }
            if (taken || (eligible != NULL && !eligible[i])) {
                continue;
            }
            if (best == n || ref_ranks_above(v[i], i, v[best], best)) {
                best = i;
            }
        }
        if (best == n) {
            break;
        }
        out[found++] = best;
    }
    return found;
}

static inline double ref_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

/* Routes one token from its logits. Returns the selection margin: how far the worst chosen
 * candidate is above the best rejected one (in the score that decides the choice); a tiny
 * margin means f32 and double may legitimately choose differently. */
static inline double ref_route(const Layer *ly, const double *logits, int32_t *ids,
                               double *weights) {
    size_t E = ly->E, k = ly->k;
    double *score = (double *)xmalloc(E * sizeof(double));
    double *choice = (double *)xmalloc(E * sizeof(double));
    int *eligible = (int *)xmalloc(E * sizeof(int));
    size_t *order = (size_t *)xmalloc(E * sizeof(size_t));
    int softmax = ly->s.routing == FDMOE_ROUTING_SOFTMAX_TOPK ||
                  (ly->s.routing == FDMOE_ROUTING_GROUPED_TOPK &&
                   ly->s.scoring == FDMOE_SCORING_SOFTMAX);
    if (softmax) {
        double max = -INFINITY, sum = 0.0;
        for (size_t e = 0; e < E; ++e) {
            max = logits[e] > max ? logits[e] : max;
        }
        for (size_t e = 0; e < E; ++e) {
            score[e] = exp(logits[e] - max);
            sum += score[e];
        }
        for (size_t e = 0; e < E; ++e) {
            score[e] /= sum;
        }
    } else {
        for (size_t e = 0; e < E; ++e) {
            score[e] = ref_sigmoid(logits[e]);
        }
    }
    double margin = INFINITY;
    for (size_t e = 0; e < E; ++e) {
        choice[e] = score[e] + (ly->bias != NULL ? ly->bias[e] : 0.0);
        eligible[e] = 1;
    }
    if (ly->s.routing == FDMOE_ROUTING_GROUPED_TOPK) {
        size_t G = ly->s.n_group, per = E / G, kept = ly->s.topk_group;
        double *group = (double *)xmalloc(G * sizeof(double));
        size_t *gorder = (size_t *)xmalloc(G * sizeof(size_t));
        for (size_t g = 0; g < G; ++g) {
            size_t top[2];
            size_t n = ref_top_k(choice + g * per, per, NULL, ly->bias != NULL ? 2 : 1, top);
            group[g] = 0.0;
            for (size_t j = 0; j < n; ++j) {
                group[g] += choice[g * per + top[j]];
            }
        }
        ref_top_k(group, G, NULL, G, gorder);
        if (kept < G) {
            margin = group[gorder[kept - 1]] - group[gorder[kept]];
        }
        for (size_t e = 0; e < E; ++e) {
            eligible[e] = 0;
            for (size_t j = 0; j < kept; ++j) {
                eligible[e] |= e / per == gorder[j];
            }
        }
        free(group);
        free(gorder);
    }
    size_t n = ref_top_k(choice, E, eligible, k + 1 <= E ? k + 1 : E, order);
    if (n > k) {
        double m = choice[order[k - 1]] - choice[order[k]];
        margin = m < margin ? m : margin;
    }
    double sum = 0.0;
    for (size_t j = 0; j < k; ++j) {
        ids[j] = (int32_t)order[j];
        weights[j] = score[order[j]];
        sum += weights[j];
    }
    if (ly->s.renormalize) {
        double eps = ly->s.routing == FDMOE_ROUTING_GROUPED_TOPK ? 1e-20 : 0.0;
        for (size_t j = 0; j < k; ++j) {
            weights[j] /= sum + eps;
        }
    }
    for (size_t j = 0; j < k; ++j) {
        weights[j] *= ly->s.routed_scaling_factor;
    }
    free(score);
    free(choice);
    free(eligible);
    free(order);
    return isnan(margin) ? 0.0 : margin;
}

static inline double ref_activation(uint32_t activation, double g, double v) {
    switch (activation) {
    case FDMOE_ACTIVATION_GELU_TANH_AND_MUL:
        return 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))) * v;
    case FDMOE_ACTIVATION_SWIGLUOAI: {
        double gc = g < 7.0 ? g : 7.0;
        double vc = v < -7.0 ? -7.0 : (v > 7.0 ? 7.0 : v);
        return (vc + 1.0) * gc * ref_sigmoid(1.702 * gc);
    }
    default:
        return g * ref_sigmoid(g) * v;
    }
}

/* y[out] = W[out, in] · x[in] */
static inline void ref_matvec(const float *w, size_t out, size_t in, const double *x,
                              double *y) {
    for (size_t o = 0; o < out; ++o) {
        double acc = 0.0;
        for (size_t i = 0; i < in; ++i) {
            acc += (double)w[o * in + i] * x[i];
        }
        y[o] = acc;
    }
}

/* The expected forward for T tokens of x [T, H] (the values the library reads, i.e. already
 * rounded to act_dtype). Routing: given ids/weights if non-NULL, else `logits` [T, E] if
 * non-NULL, else x · gateᵀ. Writes out [T, H] and the routing [T, k]; returns the smallest
 * routing margin over the tokens (INFINITY under given routing). */
static inline double ref_forward(const Layer *ly, size_t T, const float *x, const float *logits,
                                 const int32_t *given_ids, const float *given_weights,
                                 double *out, int32_t *ids_out, double *weights_out) {
    size_t E = ly->E, k = ly->k, H = ly->H, I = ly->I, L = ly->L, S = ly->S;
    double *xt = (double *)xmalloc(H * sizeof(double));
    double *u = (double *)xmalloc(L * sizeof(double));
    double *gu = (double *)xmalloc(2 * (I > S ? I : S) * sizeof(double));
    double *a = (double *)xmalloc((I > S ? I : S) * sizeof(double));
    double *y = (double *)xmalloc((L > H ? L : H) * sizeof(double));
    double *z = (double *)xmalloc(L * sizeof(double));
    double *lg = (double *)xmalloc(E * sizeof(double));
    double min_margin = INFINITY;
    for (size_t t = 0; t < T; ++t) {
        for (size_t h = 0; h < H; ++h) {
            xt[h] = x[t * H + h];
        }
        int32_t *ids = ids_out + t * k;
        double *w = weights_out + t * k;
        if (given_ids != NULL) {
            for (size_t j = 0; j < k; ++j) {
                ids[j] = given_ids[t * k + j];
                w[j] = given_weights[t * k + j];
            }
        } else {
            if (logits != NULL) {
                for (size_t e = 0; e < E; ++e) {
                    lg[e] = logits[t * E + e];
                }
            } else {
                ref_matvec(ly->gate, E, H, xt, lg);
            }
            double m = ref_route(ly, lg, ids, w);
            min_margin = m < min_margin ? m : min_margin;
        }
        if (ly->fc1 != NULL) {
            ref_matvec(ly->fc1, L, H, xt, u);
        } else {
            memcpy(u, xt, H * sizeof(double));
        }
        for (size_t l = 0; l < L; ++l) {
            z[l] = 0.0;
        }
        for (size_t j = 0; j < k; ++j) {
            size_t e = (size_t)ids[j];
            ref_matvec(ly->w13 + e * 2 * I * L, 2 * I, L, u, gu);
            for (size_t i = 0; i < I; ++i) {
                a[i] = ref_activation(ly->s.activation, gu[i], gu[I + i]);
            }
            ref_matvec(ly->w2 + e * L * I, L, I, a, y);
            for (size_t l = 0; l < L; ++l) {
                z[l] += w[j] * y[l];
            }
        }
        double *o = out + t * H;
        if (ly->fc2 != NULL) {
            ref_matvec(ly->fc2, H, L, z, o);
        } else {
            memcpy(o, z, H * sizeof(double));
        }
        if (ly->sh13 != NULL) {
            ref_matvec(ly->sh13, 2 * S, H, xt, gu);
            for (size_t s = 0; s < S; ++s) {
                a[s] = ref_activation(ly->s.activation, gu[s], gu[S + s]);
            }
            ref_matvec(ly->sh2, H, S, a, y);
            for (size_t h = 0; h < H; ++h) {
                o[h] += y[h];
            }
        }
    }
    free(xt);
    free(u);
    free(gu);
    free(a);
    free(y);
    free(z);
    free(lg);
    return min_margin;
}

#endif /* FDMOE_TEST_REF_H */
