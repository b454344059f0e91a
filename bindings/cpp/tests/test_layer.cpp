// Tests of bindings/cpp/include/fdmoe.hpp on the CPU backend: a small f32 layer's output and
// routing record against a double-precision reference of SPEC §3 written out here, the
// errors each wrapper turns into fdmoe::Error (status and the argument named), and Layer's
// ownership (moves, moved-from use). Exits non-zero on the first failed check.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "check.hpp"
#include "fdmoe.hpp"

namespace {

using check::expect;
using check::expect_error;

constexpr int E = 8, K = 2, H = 64, I = 32, T = 5;

struct Weights {
    std::vector<float> w13, w2, gate;  // TORCH: [E, 2I, H] (gate rows, then up), [E, H, I], [E, H]
};

// SPEC §3, softmax top-k renormalized, SwiGLU, for token x: out[H], ids[K] best first.
void reference(const Weights& w, const float* x, std::vector<double>& out, std::vector<int>& ids) {
    std::vector<double> logits(E), probs(E);
    for (int e = 0; e < E; ++e) {
        double acc = 0.0;
        for (int h = 0; h < H; ++h) acc += static_cast<double>(w.gate[e * H + h]) * x[h];
        logits[e] = acc;
    }
    double max = logits[0], sum = 0.0;
    for (int e = 1; e < E; ++e) max = std::fmax(max, logits[e]);
    for (int e = 0; e < E; ++e) sum += probs[e] = std::exp(logits[e] - max);
    ids.assign(K, -1);
    std::vector<double> weights(K);
    double chosen = 0.0;
    for (int j = 0; j < K; ++j) {
        for (int e = 0; e < E; ++e) {
            bool taken = false;
            for (int q = 0; q < j; ++q) taken = taken || ids[q] == e;
            if (!taken && (ids[j] < 0 || probs[e] > probs[ids[j]])) ids[j] = e;
        }
        chosen += weights[j] = probs[ids[j]] / sum;
    }
    out.assign(H, 0.0);
    std::vector<double> act(I);
    for (int j = 0; j < K; ++j) {
        const float* w13 = &w.w13[static_cast<size_t>(ids[j]) * 2 * I * H];
        const float* w2 = &w.w2[static_cast<size_t>(ids[j]) * H * I];
        for (int i = 0; i < I; ++i) {
            double g = 0.0, u = 0.0;
            for (int h = 0; h < H; ++h) {
                g += static_cast<double>(w13[i * H + h]) * x[h];
                u += static_cast<double>(w13[(I + i) * H + h]) * x[h];
            }
            act[i] = g / (1.0 + std::exp(-g)) * u;
        }
        for (int h = 0; h < H; ++h) {
            double y = 0.0;
            for (int i = 0; i < I; ++i) y += static_cast<double>(w2[h * I + i]) * act[i];
            out[h] += weights[j] / chosen * y;
        }
    }
}

FdmoeConfig small_config() {
    FdmoeConfig c = fdmoe::default_config();
    c.backend = FDMOE_BACKEND_KIND_CPU;
    c.num_experts = E;
    c.top_k = K;
    c.hidden_size = H;
    c.intermediate_size = I;
    c.act_dtype = FDMOE_DTYPE_F32;
    c.weight_dtype = FDMOE_DTYPE_F32;
    c.max_tokens = T;
    c.num_threads = 1;
    return c;
}

FdmoeWeights host_weights(const Weights& w) {
    FdmoeWeights fw = fdmoe::default_weights();
    fw.dtype = FDMOE_DTYPE_F32;
    fw.w13 = w.w13.data();
    fw.w2 = w.w2.data();
    fw.gate = w.gate.data();
    return fw;
}

}  // namespace

int main() {
    fdmoe::require_compatible_library();
    expect((fdmoe::query_features(FDMOE_BACKEND_KIND_CPU) & FDMOE_FEATURE_ROUTING_RECORD) != 0,
           "the CPU backend records routing");

    check::Rng rng(0x2545f4914f6cdd1dull);
    Weights w;
    w.w13.resize(static_cast<size_t>(E) * 2 * I * H);
    w.w2.resize(static_cast<size_t>(E) * H * I);
    w.gate.resize(static_cast<size_t>(E) * H);
    for (float& v : w.w13) v = rng.next(1.0 / std::sqrt(H));
    for (float& v : w.w2) v = rng.next(1.0 / std::sqrt(I));
    for (float& v : w.gate) v = rng.next(1.0 / std::sqrt(H));
    std::vector<float> x(T * H), out(T * H, NAN);
    for (float& v : x) v = rng.next(1.0);

    const FdmoeConfig cfg = small_config();
    const FdmoeMemoryRequirements mem = fdmoe::query_memory(cfg);
    expect(mem.host_weight_bytes >= sizeof(float) * (w.w13.size() + w.w2.size()),
           "query_memory counts the f32 experts");

    fdmoe::Layer layer(cfg);
    expect_error([&] { layer.forward(T, x.data(), out.data()); }, FDMOE_STATUS_INVALID_STATE, "weights",
                 "forward before load_weights");
    {
        // OWN: the library copies, so these buffers may go before the forward.
        Weights copy = w;
        layer.load_weights(host_weights(copy));
    }
    layer.forward(T, x.data(), out.data());

    // The routing record through the full FdmoeForwardArgs, into a second output.
    std::vector<float> out2(T * H, NAN);
    std::vector<int32_t> ids(T * K, -1);
    std::vector<float> weights(T * K, NAN);
    FdmoeForwardArgs args = fdmoe::default_forward_args();
    args.num_tokens = T;
    args.x = x.data();
    args.out = out2.data();
    args.topk_ids_out = ids.data();
    args.topk_weights_out = weights.data();
    layer.forward(args);

    double err = 0.0, norm = 0.0;
    for (int t = 0; t < T; ++t) {
        std::vector<double> ref;
        std::vector<int> ref_ids;
        reference(w, &x[t * H], ref, ref_ids);
        for (int h = 0; h < H; ++h) {
            err += (out[t * H + h] - ref[h]) * (out[t * H + h] - ref[h]);
            norm += ref[h] * ref[h];
            expect(out2[t * H + h] == out[t * H + h], "the two forwards agree bitwise");
        }
        double weight_sum = 0.0;
        for (int j = 0; j < K; ++j) {
            expect(ids[t * K + j] == ref_ids[j], "token " + std::to_string(t) + " slot " + std::to_string(j) +
                                                     ": expert " + std::to_string(ids[t * K + j]) + ", reference " +
                                                     std::to_string(ref_ids[j]));
            weight_sum += weights[t * K + j];
        }
        expect(std::fabs(weight_sum - 1.0) < 1e-6, "renormalized weights sum to 1");
    }
    const double rel = std::sqrt(err / norm);
    expect(norm > 0.0 && rel <= 1e-5, "f32 output within 1e-5 of the reference (relative L2 " + std::to_string(rel) + ")");

    // Errors carry the status and the argument's name.
    expect_error([&] { layer.forward(T + 1, x.data(), out.data()); }, FDMOE_STATUS_CAPACITY_EXCEEDED, "max_tokens",
                 "more tokens than max_tokens");
    expect_error([&] { layer.forward(T, nullptr, out.data()); }, FDMOE_STATUS_NULL_ARGUMENT, "x",
                 "forward without x");
    expect_error([&] { layer.capture_prefill_graph(); }, FDMOE_STATUS_UNSUPPORTED, "cpu",
                 "graphs on the CPU backend");
    FdmoeConfig bad = small_config();
    bad.num_experts = 0;
    expect_error([&] { fdmoe::Layer l(bad); }, FDMOE_STATUS_INVALID_ARGUMENT, "num_experts", "zero experts");
    expect_error([&] { fdmoe::query_memory(bad); }, FDMOE_STATUS_INVALID_ARGUMENT, "num_experts",
                 "query_memory validates as create does");

    // Ownership: a move carries the handle, the moved-from layer refuses calls, and
    // move-assignment destroys what it replaces (valgrind would report the leak otherwise).
    fdmoe::Layer moved(std::move(layer));
    expect(layer.get() == nullptr && moved.get() != nullptr, "move construction transfers the handle");
    expect_error([&] { layer.forward(T, x.data(), out.data()); }, FDMOE_STATUS_INVALID_STATE, "moved",
                 "a moved-from layer");
    std::vector<float> out3(T * H, NAN);
    moved.forward(T, x.data(), out3.data());
    expect(out3 == out, "the moved layer keeps its weights");
    fdmoe::Layer other(small_config());
    other = std::move(moved);
    other.forward(T, x.data(), out3.data());
    expect(out3 == out, "move assignment keeps the moved layer's weights");

    std::printf("fdmoe.hpp: %d checks passed (relative L2 error %.2e)\n", check::count, rel);
    return 0;
}
