// fdmoe.hpp: a header-only C++17 layer over the libfdmoe C API (include/fdmoe.h).
//
// What it adds, and nothing more: failed calls throw fdmoe::Error (the status and the
// thread's error message, which names the argument at fault); fdmoe::Layer owns a backend
// handle (move-only, destroyed with it); the structs come back initialised with their
// defaults and this header's struct sizes, so a newer library never reads or writes past
// them. Everything else (config fields, weight layouts, device pointers, streams) is the C
// API's own structs and semantics: see fdmoe.h.
//
//   fdmoe::require_compatible_library();
//   FdmoeConfig cfg = fdmoe::default_config();
//   cfg.num_experts = 128; ...
//   fdmoe::Layer layer(cfg);
//   FdmoeWeights w = fdmoe::default_weights();
//   w.w13 = ...; layer.load_weights(w);
//   layer.forward(num_tokens, x, out, stream);   // or forward(FdmoeForwardArgs) for routing
//
// Link with -lfdmoe. C++17, no exceptions thrown by destructors or moves.
#ifndef FDMOE_HPP
#define FDMOE_HPP

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "fdmoe.h"

namespace fdmoe {

// A libfdmoe call that did not return FDMOE_STATUS_OK.
class Error : public std::runtime_error {
  public:
    Error(FdmoeStatus status, const std::string& message) : std::runtime_error(message), status_(status) {}
    FdmoeStatus status() const noexcept { return status_; }

  private:
    FdmoeStatus status_;
};

// Throws Error for a failed status; `call` names the C function in the message.
inline void check(FdmoeStatus status, const char* call) {
    if (status != FDMOE_STATUS_OK) {
        throw Error(status, std::string(call) + ": " + fdmoe_status_string(status) + ": " + fdmoe_last_error_message());
    }
}

// Throws unless the loaded library implements this header's ABI (same major, minor at least
// the header's): call once before anything else when the library is found at run time.
inline void require_compatible_library() {
    const uint32_t abi = fdmoe_abi_version();
    if ((abi >> 16) != FDMOE_VERSION_MAJOR || (abi & 0xffffu) < FDMOE_VERSION_MINOR) {
        throw Error(FDMOE_STATUS_UNSUPPORTED, std::string("libfdmoe ") + fdmoe_version_string() +
                                                  " is older than or incompatible with fdmoe.h " +
                                                  std::to_string(FDMOE_VERSION_MAJOR) + "." +
                                                  std::to_string(FDMOE_VERSION_MINOR));
    }
}

inline FdmoeConfig default_config() {
    FdmoeConfig c;
    check(FDMOE_CONFIG_INIT(&c), "fdmoe_config_init_sized");
    return c;
}

inline FdmoeWeights default_weights() {
    FdmoeWeights w;
    check(FDMOE_WEIGHTS_INIT(&w), "fdmoe_weights_init_sized");
    return w;
}

inline FdmoeForwardArgs default_forward_args() {
    FdmoeForwardArgs a;
    check(FDMOE_FORWARD_ARGS_INIT(&a), "fdmoe_forward_args_init_sized");
    return a;
}

// Bytes a backend of `config` would allocate (validates the config as create does).
inline FdmoeMemoryRequirements query_memory(const FdmoeConfig& config) {
    FdmoeMemoryRequirements m{};
    m.struct_size = sizeof m;
    check(fdmoe_query_memory(&config, &m), "fdmoe_query_memory");
    return m;
}

// The FDMOE_FEATURE_* bits `backend` implements in this build.
inline uint64_t query_features(FdmoeBackendKind backend) {
    uint64_t features = 0;
    check(fdmoe_query_features(backend, &features), "fdmoe_query_features");
    return features;
}

// One MoE layer: owns the backend handle of fdmoe_create_backend. Calls on one Layer are
// serialised by the library; a moved-from Layer holds nothing and its calls throw
// INVALID_STATE.
class Layer {
  public:
    explicit Layer(const FdmoeConfig& config) { check(fdmoe_create_backend(&config, &handle_), "fdmoe_create_backend"); }
    Layer(const Layer&) = delete;
    Layer& operator=(const Layer&) = delete;
    Layer(Layer&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    Layer& operator=(Layer&& other) noexcept {
        if (this != &other) {
            fdmoe_destroy_backend(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
        }
        return *this;
    }
    ~Layer() { fdmoe_destroy_backend(handle_); }

    // See fdmoe_load_weights: OWN copies (the caller's buffers may go on return), BORROW keeps
    // the pointers until the layer is destroyed or reloaded.
    void load_weights(const FdmoeWeights& weights) { check(fdmoe_load_weights(live(), &weights), "fdmoe_load_weights"); }

    // One forward with every option of FdmoeForwardArgs (router logits, given routing, the
    // routing record, flags).
    void forward(const FdmoeForwardArgs& args) { check(fdmoe_forward(live(), &args), "fdmoe_forward"); }

    // The common case: routing by the loaded gate, on `stream` (nullptr on the CPU backend).
    void forward(uint32_t num_tokens, const void* x, void* out, void* stream = nullptr) {
        FdmoeForwardArgs args = default_forward_args();
        args.num_tokens = num_tokens;
        args.x = x;
        args.out = out;
        args.stream = stream;
        forward(args);
    }

    // CUDA graphs for the given token buckets (empty: the default buckets); CUDA backend only.
    void capture_prefill_graph(const std::vector<uint32_t>& token_counts = {}, void* stream = nullptr) {
        if (token_counts.size() > UINT32_MAX) {
            throw Error(FDMOE_STATUS_INVALID_ARGUMENT, "fdmoe::Layer::capture_prefill_graph: more than 2^32 buckets");
        }
        check(fdmoe_capture_prefill_graph(live(), token_counts.empty() ? nullptr : token_counts.data(),
                                          static_cast<uint32_t>(token_counts.size()), stream),
              "fdmoe_capture_prefill_graph");
    }

    // The C handle, for calls this header does not wrap; still owned by the Layer.
    FdmoeBackend* get() const noexcept { return handle_; }

  private:
    FdmoeBackend* live() const {
        if (handle_ == nullptr) throw Error(FDMOE_STATUS_INVALID_STATE, "fdmoe::Layer: the layer was moved from");
        return handle_;
    }

    FdmoeBackend* handle_ = nullptr;
};

}  // namespace fdmoe

#endif  // FDMOE_HPP
