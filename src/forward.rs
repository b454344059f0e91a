//! The arguments of one forward call and the checks every backend shares.

use std::ffi::c_void;

use crate::config::{FdmoeRouting, MoeConfig};
use crate::error::{ensure, Error, FdmoeStatus, Result};

/// One forward call. Pointers are host pointers on the CPU backend and device pointers on
/// the CUDA backend; the caller keeps them valid until the call (CPU) or the stream's work
/// (CUDA) completes.
#[derive(Debug, Clone, Copy)]
pub struct ForwardArgs {
    pub num_tokens: usize,
    /// [T, H] of config.act_dtype.
    pub x: *const c_void,
    /// [T, H] of config.act_dtype; must not overlap `x`.
    pub out: *mut c_void,
    /// [T, E] f32, or NULL to compute them with the gate weight.
    pub router_logits: *const f32,
    /// [T, k] int32 and [T, k] f32: given routing (replay). Both or neither.
    pub topk_ids: *const i32,
    pub topk_weights: *const f32,
    /// [T, k] outputs of the routing record; each optional.
    pub topk_ids_out: *mut i32,
    pub topk_weights_out: *mut f32,
    /// cudaStream_t (CUDA backend); must be NULL on the CPU backend.
    pub stream: *mut c_void,
    /// Run eagerly even if a captured graph covers `num_tokens`.
    pub force_eager: bool,
}

// SAFETY: the pointers are the caller's buffers, valid for the whole call by contract; the
// backend's worker threads read and write disjoint parts of them while the call runs.
unsafe impl Send for ForwardArgs {}
unsafe impl Sync for ForwardArgs {}

/// Where routing comes from in one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingSource {
    Logits,
    GateWeight,
    Given,
}

impl ForwardArgs {
    /// A call on `num_tokens` rows of `x` into `out` with every optional pointer NULL (routing
    /// by the gate, no record), the default stream and graphs allowed; set the rest with
    /// struct update syntax.
    pub fn new(num_tokens: usize, x: *const c_void, out: *mut c_void) -> Self {
        ForwardArgs {
            num_tokens,
            x,
            out,
            router_logits: std::ptr::null(),
            topk_ids: std::ptr::null(),
            topk_weights: std::ptr::null(),
            topk_ids_out: std::ptr::null_mut(),
            topk_weights_out: std::ptr::null_mut(),
            stream: std::ptr::null_mut(),
            force_eager: false,
        }
    }

    /// Checks shared by every backend, before any work: capacity, pointers, routing source.
    /// Returns `None` for T = 0, a valid no-op.
    pub fn validate(&self, cfg: &MoeConfig, has_gate: bool) -> Result<Option<RoutingSource>> {
        if self.num_tokens > cfg.max_tokens {
            return Err(Error::new(
                FdmoeStatus::CapacityExceeded,
                format!(
                    "args.num_tokens = {} exceeds config.max_tokens = {}",
                    self.num_tokens, cfg.max_tokens
                ),
            ));
        }
        if self.num_tokens == 0 {
            return Ok(None);
        }
        if self.x.is_null() {
            return Err(Error::null("args.x"));
        }
        if self.out.is_null() {
            return Err(Error::null("args.out"));
        }
        let bytes = self.num_tokens * cfg.hidden_size * cfg.act_dtype.dense_size().unwrap_or(1);
        let (x0, o0) = (self.x as usize, self.out as usize);
        ensure!(
            x0 + bytes <= o0 || o0 + bytes <= x0,
            "args.out overlaps args.x; the output needs its own buffer"
        );
        ensure!(
            self.topk_ids.is_null() == self.topk_weights.is_null(),
            "args.topk_ids and args.topk_weights must be given together (given routing)"
        );
        let source = if !self.topk_ids.is_null() {
            ensure!(
                self.router_logits.is_null(),
                "args.router_logits and args.topk_ids are both given; pass one routing source"
            );
            RoutingSource::Given
        } else if cfg.routing == FdmoeRouting::Given {
            ensure!(
                self.router_logits.is_null(),
                "args.router_logits is given but config.routing is given: pass args.topk_ids and args.topk_weights"
            );
            return Err(Error::null("args.topk_ids (config.routing is given)"));
        } else if !self.router_logits.is_null() {
            RoutingSource::Logits
        } else if has_gate {
            RoutingSource::GateWeight
        } else {
            return Err(Error::null(
                "args.router_logits (no gate weight was loaded)",
            ));
        };
        Ok(Some(source))
    }
}
