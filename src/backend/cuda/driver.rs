//! The slice of the CUDA driver API this backend uses, through cudarc's dynamically loaded
//! bindings (so the library loads and answers NO_DEVICE on machines without a driver). Every
//! call's status is checked and turned into `CUDA_ERROR` with the driver's error name. The
//! caller's stream is used as a raw handle: never owned, never synchronised, no event tracking.

use std::ffi::c_void;

use cudarc::driver::sys::{self, CUresult};

use super::compile::c_str;
use crate::error::{Error, FdmoeStatus, Result};

pub type DevicePtr = sys::CUdeviceptr;
pub type Stream = sys::CUstream;

/// Turns a driver status into our error, naming the operation.
pub fn check(result: CUresult, what: &str) -> Result<()> {
    if result == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut name = std::ptr::null();
    // SAFETY: cuGetErrorName writes a static string pointer.
    unsafe { sys::cuGetErrorName(result, &mut name) };
    let status = if result == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        FdmoeStatus::OutOfMemory
    } else {
        FdmoeStatus::CudaError
    };
    Err(Error::new(
        status,
        format!("{what} failed: {}", c_str(name)),
    ))
}

/// Loads libcuda and initialises the driver once; NO_DEVICE when there is none.
pub fn init() -> Result<()> {
    // SAFETY: probing for the library by name.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::new(
            FdmoeStatus::NoDevice,
            "no CUDA driver (libcuda.so.1) on this machine (backend cuda)",
        ));
    }
    // SAFETY: cuInit may be called any number of times.
    let r = unsafe { sys::cuInit(0) };
    if r == CUresult::CUDA_ERROR_NO_DEVICE {
        return Err(Error::new(
            FdmoeStatus::NoDevice,
            "the CUDA driver reports no device (backend cuda)",
        ));
    }
    check(r, "cuInit")
}

/// The device's primary context (shared with the CUDA runtime), retained for our lifetime.
pub struct Context {
    pub device: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a CUcontext may be made current on any thread.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

/// Makes a context current for a scope, restoring the caller's afterwards.
pub struct CurrentGuard;

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        let mut old = std::ptr::null_mut();
        // SAFETY: pops the context pushed by `Context::enter`.
        unsafe { sys::cuCtxPopCurrent_v2(&mut old) };
    }
}

impl Context {
    pub fn primary(ordinal: i32) -> Result<Self> {
        init()?;
        let mut count = 0;
        // SAFETY: out-parameters.
        check(
            unsafe { sys::cuDeviceGetCount(&mut count) },
            "cuDeviceGetCount",
        )?;
        if ordinal >= count {
            return Err(Error::new(
                FdmoeStatus::NoDevice,
                format!(
                    "config.device_ordinal = {ordinal} but only {count} CUDA device(s) are visible"
                ),
            ));
        }
        let mut device = 0;
        check(
            unsafe { sys::cuDeviceGet(&mut device, ordinal) },
            "cuDeviceGet",
        )?;
        let mut ctx = std::ptr::null_mut();
        check(
            unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, device) },
            "cuDevicePrimaryCtxRetain",
        )?;
        Ok(Context { device, ctx })
    }

    pub fn enter(&self) -> Result<CurrentGuard> {
        // SAFETY: ctx is retained until drop.
        check(
            unsafe { sys::cuCtxPushCurrent_v2(self.ctx) },
            "cuCtxPushCurrent",
        )?;
        Ok(CurrentGuard)
    }

    pub fn attribute(&self, attribute: sys::CUdevice_attribute) -> Result<i32> {
        let mut v = 0;
        check(
            unsafe { sys::cuDeviceGetAttribute(&mut v, attribute, self.device) },
            "cuDeviceGetAttribute",
        )?;
        Ok(v)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `primary`.
        unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) };
    }
}

/// Device memory owned by the library. Freed on drop (the owning context must be current or
/// retained; `CudaBackend` drops buffers before its context).
pub struct DeviceBuffer {
    pub ptr: DevicePtr,
    pub bytes: usize,
}

impl DeviceBuffer {
    pub fn alloc(bytes: usize, what: &str) -> Result<Self> {
        if bytes == 0 {
            return Ok(DeviceBuffer { ptr: 0, bytes: 0 });
        }
        let mut ptr = 0;
        // SAFETY: out-parameter.
        check(
            unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) },
            &format!("cuMemAlloc of {bytes} bytes for {what}"),
        )?;
        Ok(DeviceBuffer { ptr, bytes })
    }

    /// Allocates and copies `data` in (synchronous; used at load time only).
    pub fn from_host<T: Copy>(data: &[T], what: &str) -> Result<Self> {
        let bytes = std::mem::size_of_val(data);
        let buf = Self::alloc(bytes, what)?;
        if bytes > 0 {
            copy_to_device(buf.ptr, data)?;
        }
        Ok(buf)
    }

    /// Allocates `bytes` of zeros (synchronous; create and load time only).
    pub fn zeroed(bytes: usize, what: &str) -> Result<Self> {
        let buf = Self::alloc(bytes, what)?;
        if bytes > 0 {
            // SAFETY: the buffer holds `bytes` bytes.
            check(
                unsafe { sys::cuMemsetD8_v2(buf.ptr, 0, bytes) },
                &format!("cuMemsetD8 of {bytes} bytes for {what}"),
            )?;
        }
        Ok(buf)
    }

    /// Zeroes the buffer in stream order (its bytes are a multiple of 4).
    ///
    /// # Safety
    /// `stream` is a live stream of the buffer's context (or null, the legacy stream).
    pub unsafe fn zero_async(&self, stream: Stream) -> Result<()> {
        if self.bytes == 0 {
            return Ok(());
        }
        // SAFETY: the buffer holds `bytes` bytes, 4-byte aligned (a cuMemAlloc allocation); the
        // caller vouches for the stream.
        check(
            unsafe { sys::cuMemsetD32Async(self.ptr, 0, self.bytes / 4, stream) },
            "cuMemsetD32Async",
        )
    }

    /// Copies `data` in at byte `offset` (synchronous; load time only).
    pub fn write_at<T: Copy>(&self, offset: usize, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        assert!(
            offset + bytes <= self.bytes,
            "write_at: {bytes} bytes at {offset} past a buffer of {}",
            self.bytes
        );
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the range is inside the buffer (asserted); data is a valid host slice.
        check(
            unsafe {
                sys::cuMemcpyHtoD_v2(
                    self.ptr + offset as DevicePtr,
                    data.as_ptr() as *const c_void,
                    bytes,
                )
            },
            "cuMemcpyHtoD",
        )
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: allocated by cuMemAlloc and freed once.
            unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}

/// Synchronous host-to-device copy (load time only); `dst` holds at least `src`'s bytes.
pub fn copy_to_device<T: Copy>(dst: DevicePtr, src: &[T]) -> Result<()> {
    let bytes = std::mem::size_of_val(src);
    // SAFETY: src is a valid host slice of `bytes` bytes.
    check(
        unsafe { sys::cuMemcpyHtoD_v2(dst, src.as_ptr() as *const c_void, bytes) },
        "cuMemcpyHtoD",
    )
}

/// Synchronous device-to-host copy (load-time checks and tests only).
pub fn copy_to_host<T: Copy>(src: DevicePtr, dst: &mut [T]) -> Result<()> {
    let bytes = std::mem::size_of_val(dst);
    // SAFETY: dst is a valid host slice of `bytes` bytes.
    check(
        unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr() as *mut c_void, src, bytes) },
        "cuMemcpyDtoH",
    )
}

/// Where a pointer points, as the driver sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointerKind {
    /// Device (or managed) memory on `ordinal`.
    Device { ordinal: i32 },
    /// Plain host memory the driver does not know.
    Host,
}

pub fn pointer_kind(p: *const c_void) -> Result<PointerKind> {
    let mut memory_type: u32 = 0;
    // SAFETY: out-parameter of the size the attribute defines (an unsigned int).
    let r = unsafe {
        sys::cuPointerGetAttribute(
            &mut memory_type as *mut u32 as *mut c_void,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            p as DevicePtr,
        )
    };
    if r == CUresult::CUDA_ERROR_INVALID_VALUE {
        return Ok(PointerKind::Host);
    }
    check(r, "cuPointerGetAttribute")?;
    if memory_type == sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32 {
        return Ok(PointerKind::Host);
    }
    let mut ordinal: i32 = -1;
    let r = unsafe {
        sys::cuPointerGetAttribute(
            &mut ordinal as *mut i32 as *mut c_void,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            p as DevicePtr,
        )
    };
    check(r, "cuPointerGetAttribute")?;
    Ok(PointerKind::Device { ordinal })
}

/// Whether kernels on a device of compute capability `major` are launched as programmatic
/// dependents ([`Function::launch`]): sm_90 and newer, unless `FDMOE_NO_DEPENDENT_LAUNCH` is
/// set (a diagnostic switch, read once per backend or module load).
pub fn dependent_launch(major: i32) -> bool {
    major >= 9 && std::env::var_os("FDMOE_NO_DEPENDENT_LAUNCH").is_none()
}

/// A loaded module (one cubin) and its entry points.
pub struct Module {
    module: sys::CUmodule,
    dependent_launch: bool,
}

// SAFETY: modules and functions are context-wide handles usable from any thread.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

impl Module {
    /// `dependent_launch`: its kernels are launched as programmatic dependents of the
    /// previous kernel on the stream (sm_90 and newer; see [`Function::launch`]).
    pub fn load(image: &[u8], name: &str, dependent_launch: bool) -> Result<Self> {
        let mut module = std::ptr::null_mut();
        // SAFETY: image is a complete cubin.
        check(
            unsafe { sys::cuModuleLoadData(&mut module, image.as_ptr() as *const c_void) },
            &format!("loading {name}"),
        )?;
        Ok(Module {
            module,
            dependent_launch,
        })
    }

    /// An entry point, with its dynamic shared memory limit raised to `smem_bytes`.
    pub fn function(&self, name: &str, smem_bytes: usize) -> Result<Function> {
        let cname = std::ffi::CString::new(name).expect("kernel names have no NUL");
        let mut f = std::ptr::null_mut();
        check(
            unsafe { sys::cuModuleGetFunction(&mut f, self.module, cname.as_ptr()) },
            &format!("finding kernel {name}"),
        )?;
        if smem_bytes > 48 * 1024 {
            check(
                unsafe {
                    sys::cuFuncSetAttribute(
                        f,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem_bytes as i32,
                    )
                },
                &format!("raising the shared memory of {name}"),
            )?;
        }
        Ok(Function {
            f,
            name: name.to_string(),
            dependent_launch: self.dependent_launch,
        })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: loaded once, unloaded once.
        unsafe { sys::cuModuleUnload(self.module) };
    }
}

pub struct Function {
    f: sys::CUfunction,
    name: String,
    dependent_launch: bool,
}

// SAFETY: see Module.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

impl Function {
    /// Enqueues the kernel on `stream`. `params` points at each argument, in order.
    ///
    /// With dependent launch (programmatic stream serialization) the kernel may be scheduled
    /// while the previous kernel on the stream still runs, once every block of that one has
    /// passed its `griddepcontrol.launch_dependents`; every kernel of ours begins with
    /// `griddepcontrol.wait` (common/types.cuh, `begin_dependent`), which returns when the
    /// previous grids have completed and their memory is visible. A decode forward is a chain
    /// of small kernels, so this hides each launch's start-up behind its predecessor's tail.
    /// Under stream capture the driver records it as a programmatic graph edge.
    ///
    /// # Safety
    /// The argument types must match the kernel's signature.
    pub unsafe fn launch(
        &self,
        grid: (u32, u32, u32),
        block: u32,
        smem_bytes: usize,
        stream: Stream,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attribute.id =
            sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attribute.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem_bytes as u32,
            hStream: stream,
            attrs: &mut attribute,
            numAttrs: u32::from(self.dependent_launch),
        };
        check(
            sys::cuLaunchKernelEx(&config, self.f, params.as_mut_ptr(), std::ptr::null_mut()),
            &format!("launching {}", self.name),
        )
    }
}

/// `&mut value` as a kernel parameter pointer.
pub fn arg<T>(value: &mut T) -> *mut c_void {
    value as *mut T as *mut c_void
}

/// Whether work enqueued on `stream` is being captured into a graph right now.
/// # Safety
/// `stream` is a live stream of the current context (NULL: the legacy stream).
pub unsafe fn is_capturing(stream: Stream) -> Result<bool> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    check(
        unsafe { sys::cuStreamIsCapturing(stream, &mut status) },
        "cuStreamIsCapturing",
    )?;
    Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// A stream the library owns (graph capture when the caller gave the legacy stream).
pub struct OwnedStream(pub Stream);

impl OwnedStream {
    pub fn new() -> Result<Self> {
        let mut s = std::ptr::null_mut();
        check(
            unsafe {
                sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
            },
            "cuStreamCreate",
        )?;
        Ok(OwnedStream(s))
    }

    pub fn synchronize(&self) -> Result<()> {
        check(
            unsafe { sys::cuStreamSynchronize(self.0) },
            "cuStreamSynchronize",
        )
    }
}

impl Drop for OwnedStream {
    fn drop(&mut self) {
        unsafe { sys::cuStreamDestroy_v2(self.0) };
    }
}

/// An instantiated graph, with the graph it was instantiated from (kept: its nodes name what
/// a replay updates).
pub struct GraphExec {
    exec: sys::CUgraphExec,
    graph: sys::CUgraph,
}

// SAFETY: an executable graph may be launched from any thread (we serialise launches).
unsafe impl Send for GraphExec {}
unsafe impl Sync for GraphExec {}

/// A kernel node of a graph and the launch it was captured with.
pub struct KernelNode {
    node: sys::CUgraphNode,
    params: sys::CUDA_KERNEL_NODE_PARAMS,
}

// SAFETY: node handles and the function handle in the parameters are context-wide.
unsafe impl Send for KernelNode {}
unsafe impl Sync for KernelNode {}

impl GraphExec {
    /// Captures what `body` enqueues on `stream` (thread-local capture mode) and instantiates
    /// it. The capture is always ended, also when `body` fails.
    /// # Safety
    /// `stream` is a live, non-legacy stream of the current context.
    pub unsafe fn capture(stream: Stream, body: impl FnOnce() -> Result<()>) -> Result<Self> {
        check(
            unsafe {
                sys::cuStreamBeginCapture_v2(
                    stream,
                    sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
            },
            "cuStreamBeginCapture",
        )?;
        let enqueued = body();
        let mut graph = std::ptr::null_mut();
        let ended = check(
            unsafe { sys::cuStreamEndCapture(stream, &mut graph) },
            "cuStreamEndCapture",
        );
        let result = enqueued.and(ended).and_then(|()| {
            let mut exec = std::ptr::null_mut();
            check(
                unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) },
                "cuGraphInstantiate",
            )?;
            Ok(exec)
        });
        match result {
            Ok(exec) => Ok(GraphExec { exec, graph }),
            Err(e) => {
                if !graph.is_null() {
                    unsafe { sys::cuGraphDestroy(graph) };
                }
                Err(e)
            }
        }
    }

    /// The graph's only root, which must be a kernel (the first launch of the capture).
    pub fn root_kernel(&self) -> Result<KernelNode> {
        let mut nodes = [std::ptr::null_mut(); 2];
        let mut count = nodes.len();
        // SAFETY: out-parameters sized by `count`.
        check(
            unsafe { sys::cuGraphGetRootNodes(self.graph, nodes.as_mut_ptr(), &mut count) },
            "cuGraphGetRootNodes",
        )?;
        if count != 1 {
            return Err(Error::internal(format!(
                "a captured forward has {count} root nodes, expected 1"
            )));
        }
        let mut params: sys::CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
        // SAFETY: the node is a kernel node of a live graph (an error otherwise).
        check(
            unsafe { sys::cuGraphKernelNodeGetParams_v2(nodes[0], &mut params) },
            "cuGraphKernelNodeGetParams",
        )?;
        Ok(KernelNode {
            node: nodes[0],
            params,
        })
    }

    /// Sets the arguments of `node` (same kernel and launch shape) for the next launches.
    ///
    /// # Safety
    /// `args` point at values matching the kernel's signature; `node` is of this graph.
    pub unsafe fn set_kernel_args(
        &self,
        node: &KernelNode,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let mut params = node.params;
        params.kernelParams = args.as_mut_ptr();
        params.extra = std::ptr::null_mut();
        check(
            unsafe { sys::cuGraphExecKernelNodeSetParams_v2(self.exec, node.node, &params) },
            "cuGraphExecKernelNodeSetParams",
        )
    }

    /// # Safety
    /// `stream` is a live stream of the graph's context.
    pub unsafe fn launch(&self, stream: Stream) -> Result<()> {
        check(
            unsafe { sys::cuGraphLaunch(self.exec, stream) },
            "cuGraphLaunch",
        )
    }
}

impl Drop for GraphExec {
    fn drop(&mut self) {
        unsafe {
            sys::cuGraphExecDestroy(self.exec);
            sys::cuGraphDestroy(self.graph);
        }
    }
}
