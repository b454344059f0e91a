//! The backend interface every engine implements, and the features each one offers.

// The C header (cbindgen) skips the engines: their constants and types are internal.
/// cbindgen:ignore
pub mod cpu;
/// cbindgen:ignore
#[cfg(feature = "cuda")]
pub mod cuda;

use std::ffi::c_void;

use crate::config::{FdmoeBackendKind, MoeConfig};
use crate::error::Result;
use crate::forward::{ForwardArgs, RoutingSource};
use crate::weights::WeightSource;

/// Bytes a backend of a given config allocates, by place and purpose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryRequirements {
    pub device_weight_bytes: usize,
    pub device_workspace_bytes: usize,
    pub device_graph_bytes: usize,
    pub host_weight_bytes: usize,
    pub host_workspace_bytes: usize,
}

/// One engine instance: a layer's weights, workspace and kernels.
pub trait Backend: Send + std::fmt::Debug {
    fn kind(&self) -> FdmoeBackendKind;
    fn config(&self) -> &MoeConfig;
    /// Loads (replacing any earlier weights).
    fn load_weights(&mut self, src: &WeightSource) -> Result<()>;
    fn has_weights(&self) -> bool;
    fn has_gate(&self) -> bool;
    /// Computes one forward whose arguments already passed `ForwardArgs::validate`.
    ///
    /// # Safety
    /// Every non-NULL pointer in `args` covers the extent documented on `ForwardArgs`.
    unsafe fn forward(&mut self, args: &ForwardArgs, source: RoutingSource) -> Result<()>;
    fn capture_graphs(&mut self, token_counts: &[usize], stream: *mut c_void) -> Result<()>;
}

/// Feature bits of `fdmoe_query_features`. Numbers are ABI and never reused.
pub mod feature {
    pub const FDMOE_FEATURE_ROUTING_SOFTMAX_TOPK: u64 = 1 << 0;
    pub const FDMOE_FEATURE_ROUTING_SIGMOID_TOPK: u64 = 1 << 1;
    pub const FDMOE_FEATURE_ROUTING_GROUPED_TOPK: u64 = 1 << 2;
    pub const FDMOE_FEATURE_ROUTING_GIVEN: u64 = 1 << 3;
    pub const FDMOE_FEATURE_ROUTING_RECORD: u64 = 1 << 4;
    pub const FDMOE_FEATURE_LATENT: u64 = 1 << 5;
    pub const FDMOE_FEATURE_SHARED_EXPERTS: u64 = 1 << 6;
    pub const FDMOE_FEATURE_ACT_F32: u64 = 1 << 7;
    pub const FDMOE_FEATURE_ACT_BF16: u64 = 1 << 8;
    pub const FDMOE_FEATURE_ACT_F16: u64 = 1 << 9;
    pub const FDMOE_FEATURE_WEIGHT_F32: u64 = 1 << 10;
    pub const FDMOE_FEATURE_WEIGHT_BF16: u64 = 1 << 11;
    pub const FDMOE_FEATURE_WEIGHT_F16: u64 = 1 << 12;
    pub const FDMOE_FEATURE_WEIGHT_FP8_BLOCK: u64 = 1 << 13;
    pub const FDMOE_FEATURE_WEIGHT_MXFP4: u64 = 1 << 14;
    pub const FDMOE_FEATURE_WEIGHT_NVFP4: u64 = 1 << 15;
    pub const FDMOE_FEATURE_LAYOUT_TORCH: u64 = 1 << 16;
    pub const FDMOE_FEATURE_LAYOUT_PADDLE: u64 = 1 << 17;
    pub const FDMOE_FEATURE_LAYOUT_PER_EXPERT: u64 = 1 << 18;
    pub const FDMOE_FEATURE_WEIGHTS_OWN: u64 = 1 << 19;
    pub const FDMOE_FEATURE_WEIGHTS_BORROW: u64 = 1 << 20;
    pub const FDMOE_FEATURE_CUDA_GRAPHS: u64 = 1 << 21;
    pub const FDMOE_FEATURE_EXPERT_PARALLEL: u64 = 1 << 22;
    pub const FDMOE_FEATURE_FP8_PRE_DISPATCH: u64 = 1 << 23;
    /// `act_quant = FP8_MX` (MXFP4 experts on FP8 activations).
    pub const FDMOE_FEATURE_ACT_QUANT_FP8_MX: u64 = 1 << 24;
}

/// The features `kind` implements in this build.
pub fn features(kind: FdmoeBackendKind) -> u64 {
    use feature::*;
    // What both backends do: every routing mode and record, latent, shared experts, 16-bit
    // activations and weights, every layout, OWN and BORROW.
    let common = FDMOE_FEATURE_ROUTING_SOFTMAX_TOPK
        | FDMOE_FEATURE_ROUTING_SIGMOID_TOPK
        | FDMOE_FEATURE_ROUTING_GROUPED_TOPK
        | FDMOE_FEATURE_ROUTING_GIVEN
        | FDMOE_FEATURE_ROUTING_RECORD
        | FDMOE_FEATURE_LATENT
        | FDMOE_FEATURE_SHARED_EXPERTS
        | FDMOE_FEATURE_ACT_BF16
        | FDMOE_FEATURE_ACT_F16
        | FDMOE_FEATURE_WEIGHT_BF16
        | FDMOE_FEATURE_WEIGHT_F16
        | FDMOE_FEATURE_LAYOUT_TORCH
        | FDMOE_FEATURE_LAYOUT_PADDLE
        | FDMOE_FEATURE_LAYOUT_PER_EXPERT
        | FDMOE_FEATURE_WEIGHTS_OWN
        | FDMOE_FEATURE_WEIGHTS_BORROW;
    match kind {
        FdmoeBackendKind::Cpu => {
            common
                | FDMOE_FEATURE_ACT_F32
                | FDMOE_FEATURE_WEIGHT_F32
                | FDMOE_FEATURE_WEIGHT_FP8_BLOCK
                | FDMOE_FEATURE_WEIGHT_MXFP4
                | FDMOE_FEATURE_WEIGHT_NVFP4
                // fdmoe_pre_dispatch_fp8 on host memory.
                | FDMOE_FEATURE_FP8_PRE_DISPATCH
                | FDMOE_FEATURE_ACT_QUANT_FP8_MX
        }
        #[cfg(feature = "cuda")]
        FdmoeBackendKind::Cuda => {
            // FP8_BLOCK experts also need an sm_89+ device, act_quant FP8_MX an sm_90 one
            // (UNSUPPORTED at create otherwise).
            common
                | FDMOE_FEATURE_WEIGHT_FP8_BLOCK
                | FDMOE_FEATURE_WEIGHT_MXFP4
                | FDMOE_FEATURE_WEIGHT_NVFP4
                | FDMOE_FEATURE_CUDA_GRAPHS
                | FDMOE_FEATURE_FP8_PRE_DISPATCH
                | FDMOE_FEATURE_ACT_QUANT_FP8_MX
        }
        #[cfg(not(feature = "cuda"))]
        FdmoeBackendKind::Cuda => {
            let _ = common;
            0
        }
    }
}
