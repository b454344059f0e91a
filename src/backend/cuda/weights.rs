//! Device weights of the CUDA backend, all in the TORCH orientation the kernels read:
//! W13 [E, 2I, L] (gate rows then up rows), W2 [E, L, I], fc1 [L, H], fc2 [H, L], shared
//! W13 [2S, H] and W2 [H, S] in the element type; the gate as f32 [H, E] (transposed so the
//! gate kernel's threads read it coalesced) and the correction bias as f32 [E].
//!
//! OWN from host memory goes through the CPU backend's loader, which already reads every
//! layout (TORCH, PADDLE, PER_EXPERT, interleaved) and dtype into f32 views; those views are
//! written out in TORCH order, rounded once to the element type, and uploaded. BORROW keeps the
//! caller's device pointers where they already are what the kernels read. Quantized experts
//! (FP8_BLOCK, MXFP4, NVFP4) are read by their own reader and repacked (`quant_weights`); the
//! dense matrices beside them go through the loader as above, in the activation dtype.

use std::ffi::c_void;

use half::{bf16, f16};

use super::driver::{pointer_kind, DeviceBuffer, DevicePtr, PointerKind};
use super::quant_weights::{self, QuantizedExperts};
use crate::backend::cpu::linear::Linear;
use crate::backend::cpu::weights::CpuWeights;
use crate::config::{FdmoeDtype, FdmoeLayout, FdmoeMemory, FdmoeOwnership, MoeConfig};
use crate::error::{Error, Result};
use crate::weights::{ExpertSource, WeightSource};

/// A device matrix: owned, or the caller's (BORROW).
pub enum DeviceMatrix {
    Owned(DeviceBuffer),
    Borrowed(DevicePtr),
}

impl DeviceMatrix {
    pub fn ptr(&self) -> DevicePtr {
        match self {
            DeviceMatrix::Owned(b) => b.ptr,
            DeviceMatrix::Borrowed(p) => *p,
        }
    }
}

/// The routed experts: dense W13 [E, 2I, L] and W2 [E, L, I], or repacked quantized ones.
pub enum DeviceExperts {
    Dense { w13: DeviceMatrix, w2: DeviceMatrix },
    Quantized(QuantizedExperts),
}

pub struct CudaWeights {
    pub experts: DeviceExperts,
    pub gate_t: Option<DeviceBuffer>,
    pub correction_bias: Option<DeviceBuffer>,
    pub fc1: Option<DeviceMatrix>,
    pub fc2: Option<DeviceMatrix>,
    pub shared_w13: Option<DeviceMatrix>,
    pub shared_w2: Option<DeviceMatrix>,
}

/// Writes `rows` linears one after another, each [out, in] row-major, as the element type.
fn pack(linears: &[Linear], element: FdmoeDtype) -> Vec<u16> {
    let total: usize = linears.iter().map(|l| l.out_features * l.in_features).sum();
    let mut out = Vec::with_capacity(total);
    for l in linears {
        for o in 0..l.out_features {
            for i in 0..l.in_features {
                // SAFETY: (o, i) is inside the view, which points into live loader memory.
                let v = unsafe {
                    *l.ptr
                        .offset(o as isize * l.out_stride + i as isize * l.in_stride)
                };
                out.push(match element {
                    FdmoeDtype::F16 => f16::from_f32(v).to_bits(),
                    _ => bf16::from_f32(v).to_bits(),
                });
            }
        }
    }
    out
}

fn upload(linears: &[Linear], element: FdmoeDtype, what: &str) -> Result<DeviceMatrix> {
    Ok(DeviceMatrix::Owned(DeviceBuffer::from_host(
        &pack(linears, element),
        what,
    )?))
}

/// Checks that `p` is device memory on `ordinal`.
pub fn require_device(p: *const c_void, name: &str, ordinal: i32) -> Result<DevicePtr> {
    match pointer_kind(p)? {
        PointerKind::Device { ordinal: o } if o == ordinal => Ok(p as DevicePtr),
        PointerKind::Device { ordinal: o } => Err(Error::invalid(format!(
            "{name} points to memory of CUDA device {o}, but the backend runs on device {ordinal}"
        ))),
        PointerKind::Host => Err(Error::invalid(format!(
            "{name} is a host pointer; backend cuda needs device memory here"
        ))),
    }
}

impl CudaWeights {
    pub fn load(cfg: &MoeConfig, src: &WeightSource) -> Result<Self> {
        match (src.memory, src.ownership) {
            (FdmoeMemory::Host, FdmoeOwnership::Own) => Self::upload_from_host(cfg, src),
            (FdmoeMemory::Device, FdmoeOwnership::Borrow) => Self::borrow(cfg, src),
            (FdmoeMemory::Host, FdmoeOwnership::Borrow) => {
                Err(Error::invalid("weights.ownership borrow needs device memory (weights.memory = device) on backend cuda"))
            }
            (FdmoeMemory::Device, FdmoeOwnership::Own) => Err(Error::unsupported(
                "copying weights from device memory (weights.memory = device with ownership own; pass host memory, or borrow)",
                "cuda",
            )),
        }
    }

    fn upload_from_host(cfg: &MoeConfig, src: &WeightSource) -> Result<Self> {
        // The CPU loader reads any layout and dtype into f32 (rounded to weight_dtype when it
        // is dense); quantized experts are repacked from their own reader instead.
        let mut f32_cfg = cfg.clone();
        f32_cfg.backend = crate::config::FdmoeBackendKind::Cpu;
        let el = cfg.act_dtype;
        let (host, experts) = if cfg.weight_dtype.is_quantized() {
            let host = CpuWeights::load_without_experts(&f32_cfg, src)?;
            let experts = DeviceExperts::Quantized(QuantizedExperts::load(cfg, src)?);
            (host, experts)
        } else {
            let host = CpuWeights::load(&f32_cfg, src)?;
            let w13: Vec<Linear> = host.experts.iter().flat_map(|x| [x.gate, x.up]).collect();
            let w2: Vec<Linear> = host.experts.iter().map(|x| x.down).collect();
            let experts = DeviceExperts::Dense {
                w13: upload(&w13, el, "w13")?,
                w2: upload(&w2, el, "w2")?,
            };
            (host, experts)
        };
        let gate_t = match host.gate {
            Some(g) => {
                // [H, E]: transposed view of the [E, H] gate.
                let mut t = vec![0.0f32; g.in_features * g.out_features];
                for e in 0..g.out_features {
                    for h in 0..g.in_features {
                        // SAFETY: inside the view.
                        t[h * g.out_features + e] = unsafe {
                            *g.ptr
                                .offset(e as isize * g.out_stride + h as isize * g.in_stride)
                        };
                    }
                }
                Some(DeviceBuffer::from_host(&t, "the gate weight")?)
            }
            None => None,
        };
        let correction_bias = match &host.correction_bias {
            Some(b) => Some(DeviceBuffer::from_host(b, "the correction bias")?),
            None => None,
        };
        Ok(CudaWeights {
            experts,
            gate_t,
            correction_bias,
            fc1: host.fc1.map(|l| upload(&[l], el, "fc1")).transpose()?,
            fc2: host.fc2.map(|l| upload(&[l], el, "fc2")).transpose()?,
            shared_w13: host
                .shared
                .map(|s| upload(&[s.gate, s.up], el, "shared_w13"))
                .transpose()?,
            shared_w2: host
                .shared
                .map(|s| upload(&[s.down], el, "shared_w2"))
                .transpose()?,
        })
    }

    fn borrow(cfg: &MoeConfig, src: &WeightSource) -> Result<Self> {
        if cfg.weight_dtype.is_quantized() {
            return Err(Error::unsupported(
                format!(
                    "borrowing {} experts (they are repacked for the kernels at load; use ownership own with host memory)",
                    cfg.weight_dtype
                ),
                "cuda",
            ));
        }
        if src.layout != FdmoeLayout::Torch || src.gate_up_interleaved {
            return Err(Error::unsupported(
                format!(
                    "borrowing weights in layout {}{} (the kernels read TORCH layout without interleave; use ownership own)",
                    src.layout,
                    if src.gate_up_interleaved { " with gate_up_interleaved" } else { "" }
                ),
                "cuda",
            ));
        }
        if src.dtype != cfg.weight_dtype {
            return Err(Error::invalid(format!(
                "borrowed weights must already be config.weight_dtype {} (weights.dtype is {})",
                cfg.weight_dtype, src.dtype
            )));
        }
        let ord = cfg.device_ordinal;
        let ExpertSource::Stacked { w13, w2 } = &src.experts else {
            unreachable!("per_expert layout was rejected above")
        };
        let borrow =
            |p: *const c_void, name: &str| require_device(p, name, ord).map(DeviceMatrix::Borrowed);
        // The small pieces are copied: the gate must be f32 [H, E] for the gate kernel.
        let (gate_t, correction_bias) = copy_small_pieces(cfg, src, ord)?;
        Ok(CudaWeights {
            experts: DeviceExperts::Dense {
                w13: borrow(*w13, "weights.w13")?,
                w2: borrow(*w2, "weights.w2")?,
            },
            gate_t,
            correction_bias,
            fc1: src.fc1.map(|p| borrow(p, "weights.fc1")).transpose()?,
            fc2: src.fc2.map(|p| borrow(p, "weights.fc2")).transpose()?,
            shared_w13: src
                .shared_w13
                .map(|p| borrow(p, "weights.shared_w13"))
                .transpose()?,
            shared_w2: src
                .shared_w2
                .map(|p| borrow(p, "weights.shared_w2"))
                .transpose()?,
        })
    }
}

/// Gate and bias of a BORROW load live in device memory too: copy them to the host, then
/// transpose/convert like an OWN load.
fn copy_small_pieces(
    cfg: &MoeConfig,
    src: &WeightSource,
    ordinal: i32,
) -> Result<(Option<DeviceBuffer>, Option<DeviceBuffer>)> {
    let (e, h) = (cfg.num_experts, cfg.hidden_size);
    let gate_t = match &src.gate {
        Some(g) => {
            let dptr = require_device(g.ptr, "weights.gate", ordinal)?;
            let size = g.dtype.dense_size().expect("validated dense");
            let mut bytes = vec![0u8; e * h * size];
            super::driver::copy_to_host(dptr, &mut bytes)?;
            let mut vals = vec![0.0f32; e * h];
            // SAFETY: bytes holds E*H elements of the gate dtype.
            unsafe { crate::dtype::load_f32(g.dtype, bytes.as_ptr(), &mut vals) };
            let mut t = vec![0.0f32; e * h];
            for ex in 0..e {
                for hh in 0..h {
                    t[hh * e + ex] = match g.layout {
                        crate::config::FdmoeGateLayout::ExpertsByHidden => vals[ex * h + hh],
                        crate::config::FdmoeGateLayout::HiddenByExperts => vals[hh * e + ex],
                    };
                }
            }
            Some(DeviceBuffer::from_host(&t, "the gate weight")?)
        }
        None => None,
    };
    let bias = match src.correction_bias {
        Some(b) => {
            let dptr = require_device(b as *const c_void, "weights.correction_bias", ordinal)?;
            let mut v = vec![0.0f32; e];
            super::driver::copy_to_host(dptr, &mut v)?;
            Some(DeviceBuffer::from_host(&v, "the correction bias")?)
        }
        None => None,
    };
    Ok((gate_t, bias))
}

/// Device bytes an OWN load of `cfg` takes.
pub fn weight_bytes(cfg: &MoeConfig) -> usize {
    let (e, h, i, l) = (
        cfg.num_experts,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.expert_hidden(),
    );
    let el = cfg.act_dtype.dense_size().unwrap_or(2);
    let experts = if cfg.weight_dtype.is_quantized() {
        quant_weights::device_bytes(cfg)
    } else {
        e * 3 * i * l * el
    };
    let mut n = experts + h * e * 4 + e * 4;
    if let Some(latent) = cfg.latent_size {
        n += 2 * latent * h * el;
    }
    if let Some(s) = cfg.shared_intermediate_size {
        n += 3 * s * h * el;
    }
    n
}
