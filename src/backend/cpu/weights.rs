//! CPU weight storage: every matrix as f32 (owned copies rounded to the configured weight
//! precision, or the caller's f32 memory under BORROW) and `Linear` views over it in the
//! caller's layout, so no layout needs a repack on the CPU.
//!
//! Quantized expert formats (config.weight_dtype FP8_BLOCK, MXFP4, NVFP4): the experts are
//! quantized at load or read pre-quantized (`crate::quant::experts`), then dequantized exactly
//! (`decode(q) · scale` in f32) into owned TORCH-orientation f32 matrices; the GEMMs over them
//! are the format's GEMM with f32 accumulation (up to summation order). The gate, fc1/fc2 and
//! shared experts stay dense at the precision they are given in. BORROW is not available: the
//! CPU computes from the dequantized copy.

use std::ffi::c_void;

use super::linear::Linear;
use crate::config::{
    FdmoeDtype, FdmoeGateLayout, FdmoeLayout, FdmoeMemory, FdmoeOwnership, MoeConfig,
};
use crate::dtype::{load_f32, round_to};
use crate::error::{Error, Result};
use crate::quant::experts::{for_each_quantized_expert, ExpertMatrix};
use crate::weights::{ExpertSource, WeightSource};

/// One expert's three projections.
#[derive(Debug, Clone, Copy)]
pub struct ExpertLinears {
    /// [I, L]
    pub gate: Linear,
    /// [I, L]
    pub up: Linear,
    /// [L, I]
    pub down: Linear,
}

/// The shared-expert MLP over the full hidden size.
#[derive(Debug, Clone, Copy)]
pub struct SharedLinears {
    /// [S, H]
    pub gate: Linear,
    /// [S, H]
    pub up: Linear,
    /// [H, S]
    pub down: Linear,
}

/// Everything one loaded layer reads on the CPU.
pub struct CpuWeights {
    /// Keeps the owned copies alive; the views below point into them.
    _owned: Vec<Vec<f32>>,
    pub experts: Vec<ExpertLinears>,
    /// [E, H], kept at the precision it was given in.
    pub gate: Option<Linear>,
    pub correction_bias: Option<Vec<f32>>,
    /// [L, H] and [H, L].
    pub fc1: Option<Linear>,
    pub fc2: Option<Linear>,
    pub shared: Option<SharedLinears>,
}

/// Copies (OWN) or adopts (BORROW) one buffer of `count` elements as f32.
struct Materializer<'a> {
    cfg: &'a MoeConfig,
    src: &'a WeightSource,
    owned: Vec<Vec<f32>>,
}

impl Materializer<'_> {
    fn matrix(&mut self, ptr: *const c_void, count: usize) -> *const f32 {
        match self.src.ownership {
            FdmoeOwnership::Borrow => ptr as *const f32,
            FdmoeOwnership::Own => {
                // Dense weights are rounded to the configured precision: weight_dtype, or next
                // to quantized experts the activation dtype (the precision a GPU backend holds
                // the layer's dense matrices in).
                let round = if self.cfg.weight_dtype.is_dense() {
                    self.cfg.weight_dtype
                } else {
                    self.cfg.act_dtype
                };
                self.copy(ptr, count, self.src.dtype, Some(round))
            }
        }
    }

    fn copy(
        &mut self,
        ptr: *const c_void,
        count: usize,
        dtype: FdmoeDtype,
        round: Option<FdmoeDtype>,
    ) -> *const f32 {
        let mut buf = vec![0.0f32; count];
        // SAFETY: the caller promises `count` elements of `dtype` at `ptr` (documented contract).
        unsafe { load_f32(dtype, ptr as *const u8, &mut buf) };
        if let Some(target) = round {
            round_to(target, &mut buf);
        }
        let p = buf.as_ptr();
        self.owned.push(buf);
        p
    }

    /// A [out, in] matrix in the source's layout orientation.
    fn linear(&mut self, ptr: *const c_void, out_features: usize, in_features: usize) -> Linear {
        let p = self.matrix(ptr, out_features * in_features);
        oriented(p, out_features, in_features, self.src.layout)
    }
}

impl CpuWeights {
    pub fn load(cfg: &MoeConfig, src: &WeightSource) -> Result<Self> {
        Self::load_parts(cfg, src, true)
    }

    /// Everything but the routed experts (`experts` left empty): what a backend that stores
    /// quantized experts in its own form needs from this loader.
    pub fn load_without_experts(cfg: &MoeConfig, src: &WeightSource) -> Result<Self> {
        Self::load_parts(cfg, src, false)
    }

    fn load_parts(cfg: &MoeConfig, src: &WeightSource, with_experts: bool) -> Result<Self> {
        if src.memory == FdmoeMemory::Device {
            return Err(Error::unsupported(
                "device weight pointers (weights.memory = device)",
                "cpu",
            ));
        }
        if src.ownership == FdmoeOwnership::Borrow && cfg.weight_dtype.is_quantized() {
            return Err(Error::unsupported(
                format!(
                    "borrowing weights with config.weight_dtype {} (the CPU dequantizes quantized experts into its own float32 copy; use ownership own)",
                    cfg.weight_dtype
                ),
                "cpu",
            ));
        }
        if src.ownership == FdmoeOwnership::Borrow
            && (src.dtype != FdmoeDtype::F32 || cfg.weight_dtype != FdmoeDtype::F32)
        {
            return Err(Error::unsupported(
                format!(
                    "borrowing {} weights as config.weight_dtype {} (the CPU computes from float32 memory; use ownership own)",
                    src.dtype, cfg.weight_dtype
                ),
                "cpu",
            ));
        }
        let (e, h, i, l) = (
            cfg.num_experts,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.expert_hidden(),
        );
        let mut m = Materializer {
            cfg,
            src,
            owned: Vec::new(),
        };
        let experts = match &src.experts {
            _ if !with_experts => Vec::new(),
            _ if cfg.weight_dtype.is_quantized() => {
                let (w13, w2) = dequantized_experts(cfg, src)?;
                let (w13_ptr, w2_ptr) = (w13.as_ptr(), w2.as_ptr());
                // Moving the Vecs keeps their heap buffers, and so the pointers, in place.
                m.owned.push(w13);
                m.owned.push(w2);
                // TORCH orientation whatever the source layout; W13's rows in the order given.
                (0..e)
                    .map(|x| {
                        let w13 = Linear::row_major(w13_ptr.wrapping_add(x * 2 * i * l), 2 * i, l);
                        let (gate, up) = if src.gate_up_interleaved {
                            (w13.out_rows_strided(0, 2, i), w13.out_rows_strided(1, 2, i))
                        } else {
                            (w13.out_rows(0, i), w13.out_rows(i, i))
                        };
                        ExpertLinears {
                            gate,
                            up,
                            down: Linear::row_major(w2_ptr.wrapping_add(x * l * i), l, i),
                        }
                    })
                    .collect()
            }
            ExpertSource::Quantized { .. } => {
                unreachable!("validate: pre-quantized experts need a quantized weight_dtype")
            }
            ExpertSource::Stacked { w13, w2 } => {
                let w13 = m.matrix(*w13, e * 2 * i * l);
                let w2 = m.matrix(*w2, e * l * i);
                (0..e)
                    .map(|x| {
                        let w13 = oriented(w13.wrapping_add(x * 2 * i * l), 2 * i, l, src.layout);
                        let (gate, up) = if src.gate_up_interleaved {
                            (w13.out_rows_strided(0, 2, i), w13.out_rows_strided(1, 2, i))
                        } else {
                            (w13.out_rows(0, i), w13.out_rows(i, i))
                        };
                        ExpertLinears {
                            gate,
                            up,
                            down: oriented(w2.wrapping_add(x * l * i), l, i, src.layout),
                        }
                    })
                    .collect()
            }
            ExpertSource::PerExpert {
                gate_proj,
                up_proj,
                down_proj,
            } => (0..e)
                .map(|x| ExpertLinears {
                    gate: m.linear(gate_proj[x], i, l),
                    up: m.linear(up_proj[x], i, l),
                    down: m.linear(down_proj[x], l, i),
                })
                .collect(),
        };
        let gate = src.gate.map(|g| {
            let p = m.copy(g.ptr, e * h, g.dtype, None);
            match g.layout {
                FdmoeGateLayout::ExpertsByHidden => Linear::row_major(p, e, h),
                FdmoeGateLayout::HiddenByExperts => Linear::transposed(p, e, h),
            }
        });
        // SAFETY: the caller promises E f32 values at the bias pointer.
        let correction_bias = src
            .correction_bias
            .map(|b| unsafe { std::slice::from_raw_parts(b, e) }.to_vec());
        let fc1 = src.fc1.map(|p| m.linear(p, l, h));
        let fc2 = src.fc2.map(|p| m.linear(p, h, l));
        let shared = match (src.shared_w13, src.shared_w2, cfg.shared_intermediate_size) {
            (Some(w13), Some(w2), Some(s)) => {
                let w13 = m.linear(w13, 2 * s, h);
                Some(SharedLinears {
                    gate: w13.out_rows(0, s),
                    up: w13.out_rows(s, s),
                    down: m.linear(w2, h, s),
                })
            }
            _ => None,
        };
        Ok(CpuWeights {
            _owned: m.owned,
            experts,
            gate,
            correction_bias,
            fc1,
            fc2,
            shared,
        })
    }
}

/// A [out, in] matrix at `ptr` as the layout stores it: TORCH and PER_EXPERT row-major
/// [out, in]; PADDLE row-major [in, out].
fn oriented(
    ptr: *const f32,
    out_features: usize,
    in_features: usize,
    layout: FdmoeLayout,
) -> Linear {
    match layout {
        FdmoeLayout::Paddle => Linear::transposed(ptr, out_features, in_features),
        FdmoeLayout::Torch | FdmoeLayout::PerExpert => {
            Linear::row_major(ptr, out_features, in_features)
        }
    }
}

/// Every expert's W13 [2I, L] and W2 [L, I] in config.weight_dtype, dequantized to f32:
/// `[E, 2I, L]` and `[E, L, I]`, TORCH orientation.
fn dequantized_experts(cfg: &MoeConfig, src: &WeightSource) -> Result<(Vec<f32>, Vec<f32>)> {
    let (e, i, l) = (cfg.num_experts, cfg.intermediate_size, cfg.expert_hidden());
    let mut w13 = vec![0.0f32; e * 2 * i * l];
    let mut w2 = vec![0.0f32; e * l * i];
    for_each_quantized_expert(cfg, src, |x, which, matrix| match which {
        ExpertMatrix::W13 => matrix.dequantize_into(&mut w13[x * 2 * i * l..(x + 1) * 2 * i * l]),
        ExpertMatrix::W2 => matrix.dequantize_into(&mut w2[x * l * i..(x + 1) * l * i]),
    })?;
    Ok((w13, w2))
}
