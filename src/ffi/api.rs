//! The exported C functions. Each body is one `boundary::run` (panics caught, last error set)
//! around a call into the safe core; pointer checks happen before anything is read.
//!
//! Safety contract of every function (the header's doc comments say it per argument): each
//! non-NULL pointer points to the extent its struct field or argument documents.
#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_char, c_void};

use super::boundary::{
    last_error_ptr, read_versioned, run, run_silent, write_defaults, write_defaults_sized,
    write_versioned,
};
use super::handles::{lookup, register, release, FdmoeBackend};
use super::types::{
    FdmoeConfig, FdmoeForwardArgs, FdmoeMemoryRequirements, FdmoePreDispatchArgs,
    FdmoeQuantizedTensor, FdmoeWeights,
};
use crate::backend::features;
use crate::config::{FdmoeBackendKind, FdmoeDtype, FdmoeMemory};
use crate::error::{ensure, Error, FdmoeStatus};
use crate::moe::Moe;
use crate::quant::experts::QuantizedMatrix;
use crate::quant::{pre_dispatch_fp8_into, PreDispatchOutput};
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

/// Like fdmoe_config_init, but writes only the first `size` bytes (pass `sizeof *config` as
/// your header defines it): a program built against an older header stays safe with a newer
/// library, whose FdmoeConfig may be larger. FDMOE_CONFIG_INIT(&cfg) does this. Thread-safe.
/// Errors: NULL_ARGUMENT, INVALID_ARGUMENT (size below the first release's struct size).
#[no_mangle]
pub unsafe extern "C" fn fdmoe_config_init_sized(
    config: *mut FdmoeConfig,
    size: usize,
) -> FdmoeStatus {
    run(|| write_defaults_sized(config, size, "config"))
}

/// fdmoe_weights_init writing only the first `size` bytes (see fdmoe_config_init_sized);
/// FDMOE_WEIGHTS_INIT(&w) does this. Thread-safe. Errors: NULL_ARGUMENT, INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn fdmoe_weights_init_sized(
    weights: *mut FdmoeWeights,
    size: usize,
) -> FdmoeStatus {
    run(|| write_defaults_sized(weights, size, "weights"))
}

/// fdmoe_forward_args_init writing only the first `size` bytes (see fdmoe_config_init_sized);
/// FDMOE_FORWARD_ARGS_INIT(&a) does this. Thread-safe. Errors: NULL_ARGUMENT, INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn fdmoe_forward_args_init_sized(
    args: *mut FdmoeForwardArgs,
    size: usize,
) -> FdmoeStatus {
    run(|| write_defaults_sized(args, size, "args"))
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

/// Fills `args` with the defaults (host memory, bf16 x, sizes 0, pointers NULL) and sets
/// `struct_size`. Thread-safe. Errors: NULL_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn fdmoe_pre_dispatch_args_init(
    args: *mut FdmoePreDispatchArgs,
) -> FdmoeStatus {
    run(|| write_defaults(args, "args"))
}

/// FP8 pre-dispatch of x [T, H] and its routing into the caller's [T_max, ...] buffers (see
/// FdmoePreDispatchArgs for the format). Every argument, the capacity T <= T_max included, is
/// checked before the first write: on error the outputs are untouched. On success every output
/// element is written (rows past T are padding). Needs no backend handle; thread-safe, and calls
/// on disjoint outputs may run concurrently. Host memory: computed before return on the CPU.
/// Device memory: enqueued on args->stream (no sync), bitwise equal to the host result; the
/// first call for a device compiles and loads the kernel (disk-cached), later calls only launch.
/// Errors: NULL_ARGUMENT, INVALID_ARGUMENT (hidden_size not a positive multiple of 128,
/// top_k 0, x_dtype or memory values, a stream on host memory, host pointers with memory =
/// device), CAPACITY_EXCEEDED, NO_DEVICE, CUDA_ERROR, UNSUPPORTED (device memory in a build
/// without the cuda feature).
#[no_mangle]
pub unsafe extern "C" fn fdmoe_pre_dispatch_fp8(args: *const FdmoePreDispatchArgs) -> FdmoeStatus {
    run(|| {
        let a = read_versioned(args, "args")?;
        let memory = FdmoeMemory::from_raw(a.memory, "args->memory")?;
        let x_dtype = FdmoeDtype::from_raw(a.x_dtype, "args->x_dtype")?;
        ensure!(
            x_dtype.is_dense(),
            "args->x_dtype = {x_dtype} must be bfloat16, float16 or float32"
        );
        let (t, h, k, t_max) = (
            a.num_tokens as usize,
            a.hidden_size as usize,
            a.top_k as usize,
            a.max_tokens as usize,
        );
        ensure!(
            h > 0 && h % 128 == 0,
            "args->hidden_size = {h} must be a positive multiple of 128 (four 32-channel UE8M0 scales per int32)"
        );
        ensure!(k >= 1, "args->top_k must be at least 1");
        if t > t_max {
            return Err(Error::new(
                FdmoeStatus::CapacityExceeded,
                format!("args->num_tokens = {t} exceeds args->max_tokens = {t_max}"),
            ));
        }
        for (name, p, needed) in [
            ("args->x", a.x, t > 0),
            ("args->topk_ids", a.topk_ids.cast(), t > 0),
            ("args->topk_weights", a.topk_weights.cast(), t > 0),
            ("args->out_x", a.out_x.cast_const().cast(), t_max > 0),
            (
                "args->out_scales",
                a.out_scales.cast_const().cast(),
                t_max > 0,
            ),
            (
                "args->out_topk_ids",
                a.out_topk_ids.cast_const().cast(),
                t_max > 0,
            ),
            (
                "args->out_topk_weights",
                a.out_topk_weights.cast_const().cast(),
                t_max > 0,
            ),
        ] {
            if needed && p.is_null() {
                return Err(Error::null(name));
            }
        }
        if memory == FdmoeMemory::Device {
            return pre_dispatch_on_device(&a, x_dtype);
        }
        ensure!(
            a.stream.is_null(),
            "args->stream must be NULL for host memory (streams belong to device memory)"
        );
        let out = PreDispatchOutput {
            data: slice_mut(a.out_x, t_max * h),
            scales: slice_mut(a.out_scales, t_max * (h / 128)),
            topk_ids: slice_mut(a.out_topk_ids, t_max * k),
            topk_weights: slice_mut(a.out_topk_weights, t_max * k),
        };
        let ids = slice(a.topk_ids, t * k);
        let weights = slice(a.topk_weights, t * k);
        match x_dtype {
            FdmoeDtype::Bf16 => {
                let x = slice(a.x as *const half::bf16, t * h);
                pre_dispatch_fp8_into(x, ids, weights, h, k, out)
            }
            FdmoeDtype::F16 => {
                let x = slice(a.x as *const half::f16, t * h);
                pre_dispatch_fp8_into(x, ids, weights, h, k, out)
            }
            _ => {
                let x = slice(a.x as *const f32, t * h);
                pre_dispatch_fp8_into(x, ids, weights, h, k, out)
            }
        }
        .map(|_| ())
    })
}

/// Fills `tensor` with the defaults (format FP8_BLOCK, sizes 0, pointers NULL) and sets
/// `struct_size`. Thread-safe. Errors: NULL_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn fdmoe_quantized_tensor_init(
    tensor: *mut FdmoeQuantizedTensor,
) -> FdmoeStatus {
    run(|| write_defaults(tensor, "tensor"))
}

/// Quantizes `src` (B row-major [N, K] matrices of `src_dtype`: F32, BF16 or F16, aligned to
/// its element; B, N, K from `dst`) into dst's buffers with the codec of dst->format, each
/// matrix on its own (SPEC §5: round to nearest even, saturating; FP8_BLOCK scale = amax/448
/// per 128x128 block, amax floored at 1e-4; MXFP4 scale 2^(floor(log2 amax) - 2) per 32;
/// NVFP4 global scale amax/(6*448) per matrix, E4M3 scale per 16). The same codec quantizes
/// dense experts at load, so loading its output as pre-quantized weights gives bitwise the
/// same layer. Thread-safe; host memory. Errors: NULL_ARGUMENT, INVALID_ARGUMENT (format,
/// src_dtype, K not a multiple of the format's group, a global_scales pointer outside NVFP4).
#[no_mangle]
pub unsafe extern "C" fn fdmoe_quantize_weights(
    src: *const c_void,
    src_dtype: u32,
    dst: *const FdmoeQuantizedTensor,
) -> FdmoeStatus {
    run(|| {
        let tensor = read_versioned(dst, "dst")?;
        let dtype = FdmoeDtype::from_raw(src_dtype, "src_dtype")?;
        ensure!(
            dtype.is_dense(),
            "src_dtype = {dtype} must be float32, bfloat16 or float16"
        );
        let shape = tensor.shape("dst")?;
        if shape.elements() == 0 {
            return Ok(());
        }
        if src.is_null() {
            return Err(Error::null("src"));
        }
        let (n, k) = (shape.rows, shape.cols);
        for m in 0..shape.matrices {
            let matrix = match dtype {
                FdmoeDtype::F32 => QuantizedMatrix::quantize(
                    shape.format,
                    slice(src.cast::<f32>().add(m * n * k), n * k),
                    n,
                    k,
                ),
                FdmoeDtype::Bf16 => QuantizedMatrix::quantize(
                    shape.format,
                    slice(src.cast::<half::bf16>().add(m * n * k), n * k),
                    n,
                    k,
                ),
                _ => QuantizedMatrix::quantize(
                    shape.format,
                    slice(src.cast::<half::f16>().add(m * n * k), n * k),
                    n,
                    k,
                ),
            }?;
            let scales = matrix.scale_bytes();
            std::ptr::copy_nonoverlapping(
                matrix.data().as_ptr(),
                tensor.data.cast::<u8>().add(m * shape.sizes.data_bytes),
                shape.sizes.data_bytes,
            );
            std::ptr::copy_nonoverlapping(
                scales.as_ptr(),
                tensor
                    .scales
                    .cast::<u8>()
                    .add(m * shape.sizes.scale_bytes()),
                scales.len(),
            );
            if let Some(g) = matrix.global_scale() {
                tensor.global_scales.add(m).write_unaligned(g);
            }
        }
        Ok(())
    })
}

/// Dequantizes `src` into `dst`, B row-major [N, K] f32 matrices: decode(q) * scale exactly in
/// f32 (NVFP4: * (e4m3 scale * global scale), the product of the scales rounded first); NaN
/// scales give NaN values. Thread-safe; host memory. Errors: NULL_ARGUMENT, INVALID_ARGUMENT
/// (format, K not a multiple of the format's group, a non-finite NVFP4 global scale).
#[no_mangle]
pub unsafe extern "C" fn fdmoe_dequantize_weights(
    src: *const FdmoeQuantizedTensor,
    dst: *mut f32,
) -> FdmoeStatus {
    run(|| {
        let tensor = read_versioned(src, "src")?;
        let shape = tensor.shape("src")?;
        if shape.elements() == 0 {
            return Ok(());
        }
        if dst.is_null() {
            return Err(Error::null("dst"));
        }
        let (n, k) = (shape.rows, shape.cols);
        let globals: Vec<f32> = (0..shape.matrices)
            .map(|m| {
                if shape.format == FdmoeDtype::Nvfp4 {
                    tensor.global_scales.add(m).read_unaligned()
                } else {
                    1.0
                }
            })
            .collect();
        if let Some((m, g)) = globals.iter().enumerate().find(|(_, g)| !g.is_finite()) {
            return Err(Error::invalid(format!(
                "src->global_scales[{m}] = {g} is not finite"
            )));
        }
        for (m, &global) in globals.iter().enumerate() {
            let matrix = QuantizedMatrix::from_raw(
                shape.format,
                n,
                k,
                tensor.data.cast::<u8>().add(m * shape.sizes.data_bytes),
                tensor
                    .scales
                    .cast::<u8>()
                    .add(m * shape.sizes.scale_bytes()),
                global,
            )?;
            matrix.dequantize_into(slice_mut(dst.add(m * n * k), n * k))?;
        }
        Ok(())
    })
}

/// `n` elements at `p` (an empty slice for n = 0, where `p` may be NULL).
///
/// # Safety
/// For n > 0, `p` points to n readable, aligned elements.
unsafe fn slice<'a, T>(p: *const T, n: usize) -> &'a [T] {
    if n == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(p, n)
    }
}

/// `n` writable elements at `p` (an empty slice for n = 0, where `p` may be NULL).
///
/// # Safety
/// For n > 0, `p` points to n writable, aligned elements nobody else accesses meanwhile.
unsafe fn slice_mut<'a, T>(p: *mut T, n: usize) -> &'a mut [T] {
    if n == 0 {
        &mut []
    } else {
        std::slice::from_raw_parts_mut(p, n)
    }
}

#[cfg(feature = "cuda")]
unsafe fn pre_dispatch_on_device(
    a: &FdmoePreDispatchArgs,
    x_dtype: FdmoeDtype,
) -> crate::error::Result<()> {
    crate::backend::cuda::pre_dispatch::pre_dispatch_fp8_device(
        &crate::backend::cuda::pre_dispatch::PreDispatchDevice {
            x: a.x,
            x_dtype,
            topk_ids: a.topk_ids,
            topk_weights: a.topk_weights,
            out_x: a.out_x,
            out_scales: a.out_scales,
            out_topk_ids: a.out_topk_ids,
            out_topk_weights: a.out_topk_weights,
            num_tokens: a.num_tokens as usize,
            hidden_size: a.hidden_size as usize,
            top_k: a.top_k as usize,
            max_tokens: a.max_tokens as usize,
            stream: a.stream,
        },
    )
}

#[cfg(not(feature = "cuda"))]
unsafe fn pre_dispatch_on_device(
    _a: &FdmoePreDispatchArgs,
    _x_dtype: FdmoeDtype,
) -> crate::error::Result<()> {
    Err(Error::new(
        FdmoeStatus::Unsupported,
        "FP8 pre-dispatch on device memory needs the cuda backend (built without the cuda feature)",
    ))
}
