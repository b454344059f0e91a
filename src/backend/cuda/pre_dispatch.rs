//! FP8 pre-dispatch on device memory (`fdmoe_pre_dispatch_fp8` with memory = device): the
//! kernel of kernels/pre_dispatch_fp8.cu, bitwise equal to the CPU reference. It needs no
//! layer, so each device's kernel is compiled (through the disk cache) and loaded on the first
//! call for that device and kept for the process; later calls only check pointers and launch.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use once_cell::sync::Lazy;
use parking_lot::Mutex;

use super::compile::{compile, Element, PRE_DISPATCH_FP8};
use super::driver::{
    arg, dependent_launch, pointer_kind, Context, DevicePtr, Function, Module, PointerKind, Stream,
};
use super::weights::require_device;
use crate::config::FdmoeDtype;
use crate::error::{Error, Result};

struct Loaded {
    function: Function,
    _module: Module,
    ctx: Context,
}

static LOADED: Lazy<Mutex<HashMap<i32, Arc<Loaded>>>> = Lazy::new(|| Mutex::new(HashMap::new()));

fn loaded(ordinal: i32) -> Result<Arc<Loaded>> {
    let mut map = LOADED.lock();
    if let Some(l) = map.get(&ordinal) {
        return Ok(Arc::clone(l));
    }
    let ctx = Context::primary(ordinal)?;
    let _current = ctx.enter()?;
    let major = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let arch = if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    };
    let module = Module::load(
        &compile(PRE_DISPATCH_FP8, &arch, Element::Bf16)?.image,
        PRE_DISPATCH_FP8.name,
        dependent_launch(major),
    )?;
    let function = module.function("pre_dispatch_fp8", 0)?;
    drop(_current);
    let l = Arc::new(Loaded {
        function,
        _module: module,
        ctx,
    });
    map.insert(ordinal, Arc::clone(&l));
    Ok(l)
}

/// Device pointers of one pre-dispatch call (validated sizes: H % 128 == 0, T <= T_max).
pub struct PreDispatchDevice {
    pub x: *const c_void,
    pub x_dtype: FdmoeDtype,
    pub topk_ids: *const i32,
    pub topk_weights: *const f32,
    pub out_x: *mut u8,
    pub out_scales: *mut i32,
    pub out_topk_ids: *mut i32,
    pub out_topk_weights: *mut f32,
    pub num_tokens: usize,
    pub hidden_size: usize,
    pub top_k: usize,
    pub max_tokens: usize,
    pub stream: *mut c_void,
}

/// Enqueues the pre-dispatch on `stream` (the device is the one holding the outputs).
///
/// # Safety
/// Every pointer covers its documented extent in device memory.
pub unsafe fn pre_dispatch_fp8_device(a: &PreDispatchDevice) -> Result<()> {
    if a.max_tokens == 0 {
        return Ok(());
    }
    super::driver::init()?;
    let ordinal = match pointer_kind(a.out_x as *const c_void)? {
        PointerKind::Device { ordinal } => ordinal,
        PointerKind::Host => {
            return Err(Error::invalid(
                "args->out_x is a host pointer but args->memory is device",
            ));
        }
    };
    let l = loaded(ordinal)?;
    let _current = l.ctx.enter()?;
    let outputs: [(*const c_void, &str); 3] = [
        (a.out_scales as *const c_void, "args->out_scales"),
        (a.out_topk_ids as *const c_void, "args->out_topk_ids"),
        (
            a.out_topk_weights as *const c_void,
            "args->out_topk_weights",
        ),
    ];
    for (p, name) in outputs {
        require_device(p, name, ordinal)?;
    }
    if a.num_tokens > 0 {
        for (p, name) in [
            (a.x, "args->x"),
            (a.topk_ids as *const c_void, "args->topk_ids"),
            (a.topk_weights as *const c_void, "args->topk_weights"),
        ] {
            require_device(p, name, ordinal)?;
        }
    }
    let mut x = a.x as DevicePtr;
    let mut dtype: i32 = match a.x_dtype {
        FdmoeDtype::F32 => 0,
        FdmoeDtype::Bf16 => 1,
        _ => 2,
    };
    let (mut ids, mut w) = (a.topk_ids as DevicePtr, a.topk_weights as DevicePtr);
    let (mut ox, mut os, mut oi, mut ow) = (
        a.out_x as DevicePtr,
        a.out_scales as DevicePtr,
        a.out_topk_ids as DevicePtr,
        a.out_topk_weights as DevicePtr,
    );
    let (mut t, mut h, mut k) = (a.num_tokens as i32, a.hidden_size as i32, a.top_k as i32);
    l.function.launch(
        (a.max_tokens as u32, 1, 1),
        128,
        0,
        a.stream as Stream,
        &mut [
            arg(&mut x),
            arg(&mut dtype),
            arg(&mut ids),
            arg(&mut w),
            arg(&mut ox),
            arg(&mut os),
            arg(&mut oi),
            arg(&mut ow),
            arg(&mut t),
            arg(&mut h),
            arg(&mut k),
        ],
    )
}
