//! What the caller hands to `load_weights`: pointers to its matrices, how they are laid out,
//! and who owns them afterwards. Backends turn this into their own storage; the checks that
//! do not depend on the backend live here.

use std::ffi::c_void;

use crate::config::{
    FdmoeDtype, FdmoeGateLayout, FdmoeLayout, FdmoeMemory, FdmoeOwnership, FdmoeRouting, MoeConfig,
};
use crate::error::{ensure, Error, FdmoeStatus, Result};

/// The expert matrices: stacked (TORCH / PADDLE) or one pointer per expert (PER_EXPERT).
#[derive(Debug, Clone)]
pub enum ExpertSource {
    /// TORCH: w13 [E, 2I, L], w2 [E, L, I]; PADDLE: w13 [E, L, 2I], w2 [E, I, L].
    Stacked {
        w13: *const c_void,
        w2: *const c_void,
    },
    /// gate_proj[e] [I, L], up_proj[e] [I, L], down_proj[e] [L, I].
    PerExpert {
        gate_proj: Vec<*const c_void>,
        up_proj: Vec<*const c_void>,
        down_proj: Vec<*const c_void>,
    },
    /// Pre-quantized experts in `format` (FP8_BLOCK, MXFP4, NVFP4), stacked in TORCH
    /// orientation: each expert's W13 [2I, L] and W2 [L, I] is one matrix, packed along K
    /// (its last dimension), with its scales. `crate::quant::experts` documents the layouts.
    Quantized {
        format: FdmoeDtype,
        w13: *const c_void,
        w2: *const c_void,
        w13_scale: *const c_void,
        w2_scale: *const c_void,
        /// NVFP4 only: [E] f32 global scale of each expert's W13 / W2.
        w13_global_scale: *const f32,
        w2_global_scale: *const f32,
    },
}

/// The router gate weight.
#[derive(Debug, Clone, Copy)]
pub struct GateSource {
    pub ptr: *const c_void,
    pub dtype: FdmoeDtype,
    pub layout: FdmoeGateLayout,
}

/// Everything `load_weights` reads. Dense matrices (the experts unless they are
/// `ExpertSource::Quantized`, fc1/fc2, shared) are of `dtype`; fc1/fc2/shared follow `layout`
/// (TORCH and PER_EXPERT: nn.Linear [out, in]; PADDLE: [in, out]).
///
/// Quantized expert formats (`config.weight_dtype` FP8_BLOCK, MXFP4, NVFP4) apply to the
/// routed experts only: dense experts are quantized at load (quantize-on-load), pre-quantized
/// ones come as `ExpertSource::Quantized`. The gate, fc1/fc2 and the shared experts stay dense
/// at the precision they are given in.
#[derive(Debug, Clone)]
pub struct WeightSource {
    pub layout: FdmoeLayout,
    /// Element type of the dense matrices: F32, BF16 or F16.
    pub dtype: FdmoeDtype,
    pub memory: FdmoeMemory,
    pub ownership: FdmoeOwnership,
    /// W13 rows (PADDLE: columns) alternate gate, up (gpt-oss) instead of gate block, up block.
    pub gate_up_interleaved: bool,
    pub experts: ExpertSource,
    pub gate: Option<GateSource>,
    /// [E] f32, grouped top-k only.
    pub correction_bias: Option<*const f32>,
    /// fc1 [L, H], fc2 [H, L] (TORCH orientation).
    pub fc1: Option<*const c_void>,
    pub fc2: Option<*const c_void>,
    /// shared w13 [2S, H] (gate rows then up rows), shared w2 [H, S] (TORCH orientation).
    pub shared_w13: Option<*const c_void>,
    pub shared_w2: Option<*const c_void>,
}

impl WeightSource {
    /// Checks presence and consistency of the pieces against the config.
    pub fn validate(&self, cfg: &MoeConfig) -> Result<()> {
        ensure!(
            self.dtype.is_dense(),
            "the dense weights' dtype = {} must be float32, bfloat16 or float16",
            self.dtype
        );
        match &self.experts {
            ExpertSource::Stacked { w13, w2 } => {
                ensure!(
                    self.layout != FdmoeLayout::PerExpert,
                    "weights.layout per_expert needs the per-expert pointer arrays"
                );
                non_null(*w13, "weights.w13")?;
                non_null(*w2, "weights.w2")?;
            }
            ExpertSource::PerExpert {
                gate_proj,
                up_proj,
                down_proj,
            } => {
                ensure!(
                    self.layout == FdmoeLayout::PerExpert,
                    "per-expert pointer arrays need weights.layout per_expert"
                );
                for (name, list) in [
                    ("gate_proj", gate_proj),
                    ("up_proj", up_proj),
                    ("down_proj", down_proj),
                ] {
                    ensure!(
                        list.len() == cfg.num_experts,
                        "weights.{name} has {} pointers, expected num_experts = {}",
                        list.len(),
                        cfg.num_experts
                    );
                    for (e, p) in list.iter().enumerate() {
                        non_null(*p, &format!("weights.{name}[{e}]"))?;
                    }
                }
                ensure!(
                    !self.gate_up_interleaved,
                    "weights.gate_up_interleaved applies to a stacked w13, not to per-expert gate_proj/up_proj"
                );
            }
            ExpertSource::Quantized {
                format,
                w13,
                w2,
                w13_scale,
                w2_scale,
                w13_global_scale,
                w2_global_scale,
            } => {
                let format = *format;
                ensure!(
                    format.is_quantized(),
                    "pre-quantized experts need a quantized format (fp8_block, mxfp4, nvfp4), got {format}"
                );
                ensure!(
                    format == cfg.weight_dtype,
                    "weights.dtype = {format} (pre-quantized experts) does not match config.weight_dtype = {}; pass weights of the configured format, or dense weights to quantize at load",
                    cfg.weight_dtype
                );
                match self.layout {
                    FdmoeLayout::Torch => {}
                    FdmoeLayout::Paddle => {
                        return Err(Error::invalid(format!(
                            "pre-quantized experts (weights.dtype = {format}) cannot be in layout paddle: the formats pack along K, the last dimension of layout torch; pass w13 [E, 2I, L] and w2 [E, L, I] in layout torch"
                        )))
                    }
                    FdmoeLayout::PerExpert => {
                        return Err(Error::new(
                            FdmoeStatus::Unsupported,
                            format!(
                                "pre-quantized experts (weights.dtype = {format}) in layout per_expert are not supported; stack them as w13 [E, 2I, L] and w2 [E, L, I] in layout torch"
                            ),
                        ))
                    }
                }
                non_null(*w13, "weights.w13")?;
                non_null(*w2, "weights.w2")?;
                non_null(
                    *w13_scale,
                    &format!("weights.w13_scale (weights.dtype = {format})"),
                )?;
                non_null(
                    *w2_scale,
                    &format!("weights.w2_scale (weights.dtype = {format})"),
                )?;
                let globals = [
                    ("w13_global_scale", *w13_global_scale),
                    ("w2_global_scale", *w2_global_scale),
                ];
                for (name, p) in globals {
                    if format == FdmoeDtype::Nvfp4 {
                        non_null(
                            p as *const c_void,
                            &format!("weights.{name} (weights.dtype = nvfp4)"),
                        )?;
                    } else {
                        ensure!(
                            p.is_null(),
                            "weights.{name} applies only to weights.dtype nvfp4 (weights.dtype is {format})"
                        );
                    }
                }
            }
        }
        if let Some(g) = &self.gate {
            non_null(g.ptr, "weights.gate")?;
            ensure!(
                g.dtype.is_dense(),
                "weights.gate_dtype = {} must be float32, bfloat16 or float16",
                g.dtype
            );
            ensure!(
                cfg.routing != FdmoeRouting::Given,
                "weights.gate is given but config.routing is given, so it would never be used"
            );
        }
        if let Some(b) = self.correction_bias {
            non_null(b as *const c_void, "weights.correction_bias")?;
            ensure!(
                cfg.routing == FdmoeRouting::GroupedTopk,
                "weights.correction_bias applies only to routing grouped_topk (routing is {})",
                cfg.routing
            );
        }
        match (cfg.latent_size, self.fc1, self.fc2) {
            (Some(_), Some(a), Some(b)) => {
                non_null(a, "weights.fc1")?;
                non_null(b, "weights.fc2")?;
            }
            (Some(l), _, _) => {
                return Err(Error::null(&format!(
                    "weights.fc1/fc2 (config.latent_size = {l})"
                )))
            }
            (None, None, None) => {}
            (None, _, _) => {
                return Err(Error::invalid(
                    "weights.fc1/fc2 are given but config.latent_size is 0",
                ))
            }
        }
        match (
            cfg.shared_intermediate_size,
            self.shared_w13,
            self.shared_w2,
        ) {
            (Some(_), Some(a), Some(b)) => {
                non_null(a, "weights.shared_w13")?;
                non_null(b, "weights.shared_w2")?;
            }
            (Some(s), _, _) => {
                return Err(Error::null(&format!(
                    "weights.shared_w13/shared_w2 (config.shared_intermediate_size = {s})"
                )))
            }
            (None, None, None) => {}
            (None, _, _) => return Err(Error::invalid(
                "weights.shared_w13/shared_w2 are given but config.shared_intermediate_size is 0",
            )),
        }
        Ok(())
    }
}

fn non_null(p: *const c_void, name: &str) -> Result<()> {
    if p.is_null() {
        Err(Error::null(name))
    } else {
        Ok(())
    }
}
