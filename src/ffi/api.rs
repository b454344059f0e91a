//! The exported C functions. Each body is one `boundary::run` (panics caught, last error set)
//! around a call into the safe core; pointer checks happen before anything is read.
//!
//! Safety contract of every function (the header's doc comments say it per argument): each
//! non-NULL pointer points to the extent its struct field or argument documents.
#![allow(clippy::missing_safety_doc)]

use std::ffi::c_char;

use super::boundary::{
    last_error_ptr, read_versioned, run, run_silent, write_defaults, write_versioned,
};
use super::handles::{lookup, register, release, FdmoeBackend};
use super::types::{FdmoeConfig, FdmoeForwardArgs, FdmoeMemoryRequirements, FdmoeWeights};
use crate::backend::features;
use crate::config::FdmoeBackendKind;
use crate::error::{Error, FdmoeStatus};
use crate::moe::Moe;
use crate::{FDMOE_VERSION_MAJOR, FDMOE_VERSION_MINOR};

/// ABI version of the loaded library: major << 16 | minor. A caller built against header
/// version M.m works with any library of the same major and minor >= m.
/// Thread-safe; never fails.
#[no_mangle]
pub extern "C" fn fdmoe_abi_version() -> u32 {
    (FDMOE_VERSION_MAJOR << 16) | FDMOE_VERSION_MINOR
}

/// The library version as a static NUL-terminated string ("0.1.0"). Thread-safe; never fails.
#[no_mangle]
pub extern "C" fn fdmoe_version_string() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// Static name of a status code ("INVALID_ARGUMENT"); "UNKNOWN_STATUS" for numbers this
/// library does not know. Thread-safe; never fails.
#[no_mangle]
pub extern "C" fn fdmoe_status_string(status: u32) -> *const c_char {
    const NAMES: [&str; 11] = [
        "OK\0",
        "INVALID_ARGUMENT\0",
        "NULL_ARGUMENT\0",
        "UNSUPPORTED\0",
        "CAPACITY_EXCEEDED\0",
        "NO_DEVICE\0",
        "CUDA_ERROR\0",
        "NCCL_ERROR\0",
        "OUT_OF_MEMORY\0",
        "INVALID_STATE\0",
        "INTERNAL\0",
    ];
    NAMES
        .get(status as usize)
        .copied()
        .unwrap_or("UNKNOWN_STATUS\0")
        .as_ptr() as *const c_char
}

/// Message of the last failed `fdmoe_*` call on this thread, naming the argument or feature
/// at fault; "" after a successful call. The pointer stays valid until the next `fdmoe_*`
/// call on the same thread. Never NULL.
#[no_mangle]
pub extern "C" fn fdmoe_last_error_message() -> *const c_char {
    last_error_ptr()
}

/// Fills `config` with the defaults (cpu backend, softmax top-k, renormalize, SwiGLU, bf16
/// activations and weights, max_tokens 4096) and sets `struct_size`. Sizes stay 0: set
/// num_experts, top_k, hidden_size and intermediate_size. Thread-safe.
/// Errors: NULL_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn fdmoe_config_init(config: *mut FdmoeConfig) -> FdmoeStatus {
    run(|| write_defaults(config, "config"))
}

/// Fills `weights` with the defaults (TORCH layout, bf16, host memory, OWN, f32 gate [E, H],
/// all pointers NULL) and sets `struct_size`. Thread-safe. Errors: NULL_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn fdmoe_weights_init(weights: *mut FdmoeWeights) -> FdmoeStatus {
    run(|| write_defaults(weights, "weights"))
}

/// Fills `args` with the defaults (all pointers NULL, 0 tokens, no flags) and sets
/// `struct_size`. Thread-safe. Errors: NULL_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn fdmoe_forward_args_init(args: *mut FdmoeForwardArgs) -> FdmoeStatus {
    run(|| write_defaults(args, "args"))
}

/// Validates `config` and creates a layer: opens the device (cuda), compiles or loads every
/// kernel the config needs and allocates every buffer (sized by max_tokens). Nothing later
/// compiles or allocates. On success `*backend` receives a handle the caller owns and frees
/// with `fdmoe_destroy_backend`; on failure it is set to NULL. Thread-safe.
/// Errors: NULL_ARGUMENT, INVALID_ARGUMENT (sizes, enum values, struct_size), UNSUPPORTED
/// (feature not on this backend), NO_DEVICE, CUDA_ERROR, OUT_OF_MEMORY.
#[no_mangle]
pub unsafe extern "C" fn fdmoe_create_backend(
    config: *const FdmoeConfig,
    backend: *mut *mut FdmoeBackend,
) -> FdmoeStatus {
    run(|| {
        if backend.is_null() {
            return Err(Error::null("backend (the output handle pointer)"));
        }
        *backend = std::ptr::null_mut();
        let cfg = read_versioned(config, "config")?.to_config()?;
        *backend = register(Moe::new(&cfg)?);
        Ok(())
    })
}

/// Loads the layer's weights (see FdmoeWeights for shapes and layouts). OWN copies (and
/// converts or repacks) into library memory, so the caller's buffers may be freed on return;
/// BORROW keeps the caller's pointers, which must stay valid and unchanged until destroy.
/// Calling it again replaces the previous weights (a forward in flight on another thread
/// finishes first). Serialised per handle.
/// Errors: NULL_ARGUMENT, INVALID_ARGUMENT, UNSUPPORTED (format, layout, memory or ownership
/// not on this backend), INVALID_STATE (dead handle), OUT_OF_MEMORY, CUDA_ERROR.
#[no_mangle]
pub unsafe extern "C" fn fdmoe_load_weights(
    backend: *mut FdmoeBackend,
    weights: *const FdmoeWeights,
) -> FdmoeStatus {
    run(|| {
        let moe = lookup(backend)?;
        let w = read_versioned(weights, "weights")?;
        let mut moe = moe.lock();
        let src = w.to_source(moe.config().num_experts)?;
        moe.load_weights(&src)
    })
}

/// Computes out = MoE(x) for args->num_tokens tokens (SPEC §3). cpu backend: host pointers,
/// computed before return, args->stream must be NULL. cuda backend: device pointers, enqueued
/// on args->stream with no host synchronisation or allocation (capture-safe).
/// T = 0 is a no-op. T > max_tokens fails with CAPACITY_EXCEEDED before any work.
/// Routing comes from args->topk_ids/topk_weights if given (replay), else args->router_logits,
/// else the loaded gate weight. Serialised per handle.
/// Errors: NULL_ARGUMENT, INVALID_ARGUMENT (ids outside [0, E), overlapping x/out, two routing
/// sources, unknown flags), CAPACITY_EXCEEDED, INVALID_STATE (no weights, dead handle),
/// CUDA_ERROR.
#[no_mangle]
pub unsafe extern "C" fn fdmoe_forward(
    backend: *mut FdmoeBackend,
    args: *const FdmoeForwardArgs,
) -> FdmoeStatus {
    run(|| {
        let moe = lookup(backend)?;
        let args = read_versioned(args, "args")?.to_args()?;
        let mut moe = moe.lock();
        moe.forward(&args)
    })
}

/// Captures one CUDA graph per token bucket on `stream` (token_counts NULL and n = 0: the
/// default buckets 1, 2, 4, ..., 8192 capped by max_tokens); later forwards with T up to the
/// largest bucket replay the smallest bucket >= T. Calling it again replaces the graphs.
/// cuda backend only: the cpu backend answers UNSUPPORTED. Serialised per handle.
/// Errors: NULL_ARGUMENT, INVALID_ARGUMENT (bucket 0 or above max_tokens), UNSUPPORTED,
/// INVALID_STATE, CUDA_ERROR.
#[no_mangle]
pub unsafe extern "C" fn fdmoe_capture_prefill_graph(
    backend: *mut FdmoeBackend,
    token_counts: *const u32,
    n: u32,
    stream: *mut std::ffi::c_void,
) -> FdmoeStatus {
    run(|| {
        let moe = lookup(backend)?;
        if token_counts.is_null() && n != 0 {
            return Err(Error::null("token_counts (n > 0)"));
        }
        let counts: Vec<usize> = if n == 0 {
            Vec::new()
        } else {
            std::slice::from_raw_parts(token_counts, n as usize)
                .iter()
                .map(|&c| c as usize)
                .collect()
        };
        let mut moe = moe.lock();
        moe.capture_graphs(&counts, stream)
    })
}

/// Frees the layer and everything it owns (weights, workspace, graphs, kernels). NULL is a
/// no-op; a handle that is not live (already destroyed) is ignored. Must not be called while
/// another thread is inside a call on the same handle. Never fails.
#[no_mangle]
pub unsafe extern "C" fn fdmoe_destroy_backend(backend: *mut FdmoeBackend) {
    if !backend.is_null() {
        run_silent(|| {
            release(backend);
        });
    }
}

/// Reports the memory a backend of `config` would allocate, without allocating; set
/// `out->struct_size` first. Validates the config like fdmoe_create_backend. Thread-safe.
/// Errors: NULL_ARGUMENT, INVALID_ARGUMENT, UNSUPPORTED.
#[no_mangle]
pub unsafe extern "C" fn fdmoe_query_memory(
    config: *const FdmoeConfig,
    out: *mut FdmoeMemoryRequirements,
) -> FdmoeStatus {
    run(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let cfg = read_versioned(config, "config")?.to_config()?;
        let req = Moe::memory_requirements(&cfg)?;
        write_versioned(
            out,
            &FdmoeMemoryRequirements::from_requirements(&req),
            "out",
        )
    })
}

/// Writes the FDMOE_FEATURE_* bits the given FdmoeBackendKind implements in this build.
/// Thread-safe. Errors: NULL_ARGUMENT, INVALID_ARGUMENT (unknown backend).
#[no_mangle]
pub unsafe extern "C" fn fdmoe_query_features(
    backend_kind: u32,
    features_out: *mut u64,
) -> FdmoeStatus {
    run(|| {
        if features_out.is_null() {
            return Err(Error::null("features_out"));
        }
        let kind = FdmoeBackendKind::from_raw(backend_kind, "backend_kind")?;
        *features_out = features(kind);
        Ok(())
    })
}
