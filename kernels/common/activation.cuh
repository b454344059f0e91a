// The gated activations of SPEC §3, in f32 (same formulas as src/activation.rs).
#pragma once

#define FDMOE_ACT_SWIGLU 0
#define FDMOE_ACT_GELU_TANH 1
#define FDMOE_ACT_SWIGLUOAI 2

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

template <int ACT>
__device__ __forceinline__ float gated_activation(float g, float v) {
    if (ACT == FDMOE_ACT_SWIGLU) {
        return g * sigmoid_f(g) * v;
    } else if (ACT == FDMOE_ACT_GELU_TANH) {
        const float k = 0.7978845608f;
        return 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g))) * v;
    } else {
        float gc = fminf(g, 7.0f);
        float vc = fminf(fmaxf(v, -7.0f), 7.0f);
        return (vc + 1.0f) * gc * sigmoid_f(1.702f * gc);
    }
}
