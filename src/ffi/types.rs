//! The `#[repr(C)]` structs of the C API and their conversion into the safe core's types.
//! Fields are only ever appended; enum-valued fields are `uint32_t` and validated on entry.

use std::ffi::c_void;

use super::boundary::Versioned;
use crate::backend::MemoryRequirements;
use crate::config::*;
use crate::error::{ensure, Error, FdmoeStatus, Result};
use crate::forward::ForwardArgs;
use crate::quant::experts::{part_sizes, PartSizes};
use crate::weights::{ExpertSource, GateSource, WeightSource};

/// Layer configuration. Initialise with `fdmoe_config_init`, then set the fields you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FdmoeConfig {
    /// sizeof(FdmoeConfig) as the caller compiled it (set by fdmoe_config_init).
    pub struct_size: u32,
    /// FdmoeBackendKind. Default FDMOE_BACKEND_KIND_CPU.
    pub backend: u32,
    /// CUDA device ordinal (cuda backend); must be 0 on the cpu backend.
    pub device_ordinal: i32,
    /// E: routed experts (all ranks together under expert parallelism).
    pub num_experts: u32,
    /// k: experts per token.
    pub top_k: u32,
    /// H: hidden size of x and out.
    pub hidden_size: u32,
    /// I: intermediate size of one expert.
    pub intermediate_size: u32,
    /// L: latent size the experts run at through fc1 [L,H] / fc2 [H,L]; 0 = no latent.
    pub latent_size: u32,
    /// S: intermediate size of the shared-expert MLP (n shared experts of S1 each: n*S1); 0 = none.
    pub shared_intermediate_size: u32,
    /// FdmoeRouting. Default SOFTMAX_TOPK.
    pub routing: u32,
    /// FdmoeScoring, GROUPED_TOPK only. Default SIGMOID.
    pub scoring: u32,
    /// Expert groups (GROUPED_TOPK); must be 0 or 1 otherwise. Default 1.
    pub n_group: u32,
    /// Groups kept per token (GROUPED_TOPK); must be 0 or 1 otherwise. Default 1.
    pub topk_group: u32,
    /// Non-zero: divide the top-k weights by their sum. Default 1.
    pub renormalize: u32,
    /// Multiplies every routing weight. Default 1.0.
    pub routed_scaling_factor: f32,
    /// FdmoeActivation. Default SWIGLU.
    pub activation: u32,
    /// FdmoeDtype of x and out: F32, BF16 or F16. Default BF16.
    pub act_dtype: u32,
    /// FdmoeDtype the expert weights are kept in. Default BF16.
    pub weight_dtype: u32,
    /// Largest T a forward may pass; every buffer is sized by it. Default 4096.
    pub max_tokens: u32,
    /// CPU worker threads; 0 = one per core. Must be 0 on the cuda backend.
    pub num_threads: u32,
    /// Expert-parallel ranks. Default 1.
    pub ep_size: u32,
    /// This backend's rank in [0, ep_size). Default 0.
    pub ep_rank: u32,
    /// FdmoeActQuant: how the routed experts' GEMM inputs are rounded. Default NONE; FP8_MX
    /// (MXFP4 weights only) runs both GEMMs in FP8 on activations in the pre-dispatch format.
    pub act_quant: u32,
}

/// The weights of one layer. Initialise with `fdmoe_weights_init`.
///
/// Shapes (E experts, H hidden, I intermediate, L = latent_size or H, S shared):
/// - layout TORCH: w13 [E, 2I, L] (gate rows, then up rows), w2 [E, L, I]; fc1 [L, H],
///   fc2 [H, L], shared_w13 [2S, H], shared_w2 [H, S].
/// - layout PADDLE: every matrix transposed: w13 [E, L, 2I], w2 [E, I, L], fc1 [H, L],
///   fc2 [L, H], shared_w13 [H, 2S], shared_w2 [S, H].
/// - layout PER_EXPERT: gate_proj / up_proj / down_proj are arrays of E pointers to [I, L],
///   [I, L], [L, I]; fc1/fc2/shared as TORCH.
/// - gate: [E, H] or [H, E] per gate_layout, of gate_dtype; may be NULL when every forward
///   passes router logits. correction_bias: [E] f32, GROUPED_TOPK only.
///
/// Quantized experts (config.weight_dtype FP8_BLOCK, MXFP4 or NVFP4; SPEC §5) apply to the
/// routed experts w13/w2 only: fc1/fc2 and the shared experts stay dense, rounded to
/// config.act_dtype (what the cuda backend computes them in), and the gate keeps the precision it
/// is given in (the cuda backend holds it in f32). Two ways in:
/// - quantize-on-load: dense experts (dtype F32, BF16 or F16, any layout) are quantized by the
///   library with the format's codec (round to nearest even, saturating), each expert's w13
///   [2I, L] (rows in the order given) and w2 [L, I] as one matrix in TORCH orientation, exactly
///   as fdmoe_quantize_weights does for [E, 2I, L] and [E, L, I] arrays;
/// - pre-quantized: dtype = the format (it must equal config.weight_dtype), layout TORCH, w13
///   and w2 hold the packed data and w13_scale / w2_scale (and NVFP4's global scales) their
///   scales; dense_dtype gives the dtype of fc1/fc2/shared. With N x K = 2I x L for w13 and
///   L x I for w2 (K, the last dimension, is the one packed and scaled):
///   FP8_BLOCK: data [E, N, K] E4M3 bytes, scale [E, N/128, K/128] f32 (DeepSeek-V3
///   weight_scale_inv: dequantization multipliers);
///   MXFP4: data [E, N, K/2] bytes (two E2M1 per byte, element 2i in the low nibble), scale
///   [E, N, K/32] UE8M0 bytes (OCP MX; gpt-oss blocks/scales);
///   NVFP4: data [E, N, K/2] bytes as MXFP4, scale [E, N, K/16] E4M3 bytes, global scale [E]
///   f32 per matrix (ModelOpt weight_scale_2: w = e2m1 * e4m3(scale) * global).
///   gate_up_interleaved applies (w13's rows alternate gate and up; scales follow their rows).
///   Scales are checked at load: NaN or negative scales are INVALID_ARGUMENT naming the field
///   and position.
///
/// config.weight_dtype needs K to be a multiple of 128 (FP8_BLOCK), 32 (MXFP4) or 16 (NVFP4) for
/// both matrices (L and I), checked at create. The cpu backend dequantizes the experts into its
/// own f32 copy at load (so ownership must be OWN) and, for FP8_BLOCK, quantizes the inputs of
/// both expert GEMMs per token per 128 channels to E4M3 on the fly (SPEC §5). The cuda backend
/// repacks the experts for its kernels at load (host memory, OWN) and never dequantizes them
/// into device memory: FP8_BLOCK runs on FP8 tensor cores (compute capability 8.9 or newer;
/// act_dtype BF16 or F16), MXFP4 and NVFP4 are decoded to BF16 in registers (act_dtype BF16);
/// other combinations are UNSUPPORTED at create.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FdmoeWeights {
    pub struct_size: u32,
    /// FdmoeLayout. Default TORCH.
    pub layout: u32,
    /// FdmoeDtype of w13, w2, fc1, fc2 and the shared matrices (F32, BF16, F16), or the format
    /// of pre-quantized w13/w2 (FP8_BLOCK, MXFP4, NVFP4; fc1/fc2/shared are then of
    /// dense_dtype). Default BF16.
    pub dtype: u32,
    /// FdmoeMemory of every pointer below. Default HOST.
    pub memory: u32,
    /// FdmoeOwnership. Default OWN.
    pub ownership: u32,
    /// Non-zero: w13 alternates gate and up rows (PADDLE: columns), as gpt-oss stores them.
    pub gate_up_interleaved: u32,
    /// FdmoeDtype of gate (F32, BF16, F16). Default F32.
    pub gate_dtype: u32,
    /// FdmoeGateLayout. Default EXPERTS_BY_HIDDEN ([E, H]).
    pub gate_layout: u32,
    pub w13: *const c_void,
    pub w2: *const c_void,
    pub gate_proj: *const *const c_void,
    pub up_proj: *const *const c_void,
    pub down_proj: *const *const c_void,
    pub gate: *const c_void,
    pub correction_bias: *const f32,
    pub fc1: *const c_void,
    pub fc2: *const c_void,
    pub shared_w13: *const c_void,
    pub shared_w2: *const c_void,
    /// Scales of pre-quantized w13 / w2 (dtype FP8_BLOCK, MXFP4, NVFP4): required then, NULL
    /// otherwise. Layouts above.
    pub w13_scale: *const c_void,
    pub w2_scale: *const c_void,
    /// NVFP4 only: [E] f32 global scale of each expert's w13 / w2. NULL otherwise.
    pub w13_global_scale: *const f32,
    pub w2_global_scale: *const f32,
    /// FdmoeDtype (F32, BF16, F16) of fc1, fc2, shared_w13 and shared_w2 when dtype is a
    /// quantized format; ignored otherwise (they are of dtype). Default BF16.
    /// (w13_scale .. dense_dtype were appended after the first release: a caller compiled
    /// before them passes the smaller struct_size and gets these defaults.)
    pub dense_dtype: u32,
}

/// One forward. Initialise with `fdmoe_forward_args_init`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FdmoeForwardArgs {
    pub struct_size: u32,
    /// T: tokens in this call, 0 ..= max_tokens (0 is a no-op).
    pub num_tokens: u32,
    /// [T, H] of act_dtype.
    pub x: *const c_void,
    /// [T, H] of act_dtype; must not overlap x.
    pub out: *mut c_void,
    /// [T, E] f32 router logits, or NULL to compute them with the loaded gate weight.
    pub router_logits: *const f32,
    /// [T, k] int32 expert ids and [T, k] f32 weights to use instead of routing (replay);
    /// both or neither; required when config.routing is GIVEN.
    pub topk_ids: *const i32,
    pub topk_weights: *const f32,
    /// Optional [T, k] outputs: the ids and final weights used (the routing record).
    pub topk_ids_out: *mut i32,
    pub topk_weights_out: *mut f32,
    /// cudaStream_t / CUstream for the cuda backend; must be NULL on the cpu backend.
    pub stream: *mut c_void,
    /// FDMOE_FORWARD_FORCE_EAGER and future bits; unknown bits are rejected.
    pub flags: u32,
}

/// Bytes a backend of a given config allocates. Initialise `struct_size` before the query.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FdmoeMemoryRequirements {
    pub struct_size: u32,
    /// Expert, gate, latent and shared weights on the device (OWN).
    pub device_weight_bytes: u64,
    /// Workspace on the device, sized by max_tokens.
    pub device_workspace_bytes: u64,
    /// Static buffers of captured graphs (the default buckets).
    pub device_graph_bytes: u64,
    /// Weights kept in host memory (cpu backend).
    pub host_weight_bytes: u64,
    /// Workspace in host memory (cpu backend).
    pub host_workspace_bytes: u64,
}

/// FP8 pre-dispatch (SPEC §5, the MegaMoE input format sent before the expert-parallel
/// transfer): x [T, H] becomes E4M3 [T_max, H] with one UE8M0 scale per 32 channels (packed
/// four to an int32), and the routing is copied beside it; rows T..T_max are padding (zero
/// data and scales, id -1, weight 0). Initialise with `fdmoe_pre_dispatch_args_init`.
///
/// Per token and group of 32 channels: amax = max |x| (NaN skipped) clamped below at 1e-4;
/// exponent = ceil(log2(amax / 448)); the scale 2^exponent is stored as its biased byte
/// exponent + 127; data = E4M3(x / 2^exponent), round to nearest even, saturating to ±448;
/// a group holding ±inf gets the NaN scale 0xFF. out_scales[t, c] holds, little-endian, the
/// bytes of channel groups 4c, 4c+1, 4c+2, 4c+3 (byte 0 = group 4c). The outputs must not
/// overlap the inputs or each other.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FdmoePreDispatchArgs {
    pub struct_size: u32,
    /// FdmoeMemory of every pointer. HOST: computed on the CPU before return (stream must be
    /// NULL). DEVICE: a CUDA kernel enqueued on `stream`, bitwise equal to HOST. Default HOST.
    pub memory: u32,
    /// FdmoeDtype of x: BF16 (default), F16 or F32.
    pub x_dtype: u32,
    /// T: tokens in x, 0 ..= max_tokens.
    pub num_tokens: u32,
    /// H: channels per token; a positive multiple of 128 (four 32-channel scales per int32).
    pub hidden_size: u32,
    /// k: routed slots per token, at least 1.
    pub top_k: u32,
    /// T_max: the rows of every output buffer. T > T_max is CAPACITY_EXCEEDED, before any write.
    pub max_tokens: u32,
    /// [T, H] of x_dtype.
    pub x: *const c_void,
    /// [T, k] int32 expert ids and [T, k] f32 weights, copied as they are.
    pub topk_ids: *const i32,
    pub topk_weights: *const f32,
    /// [T_max, H] E4M3 bytes.
    pub out_x: *mut u8,
    /// [T_max, H/128] int32: four UE8M0 bytes each.
    pub out_scales: *mut i32,
    /// [T_max, k] int32 ids (padding -1) and [T_max, k] f32 weights (padding 0).
    pub out_topk_ids: *mut i32,
    pub out_topk_weights: *mut f32,
    /// cudaStream_t for memory DEVICE; must be NULL for HOST.
    pub stream: *mut c_void,
}

/// B matrices [B, N, K] in one quantized format, laid out as FdmoeWeights' pre-quantized experts
/// (one matrix = one expert's w13 or w2): FP8_BLOCK data [B, N, K] E4M3 bytes and scales
/// [B, ceil(N/128), ceil(K/128)] f32; MXFP4 data [B, N, K/2] bytes (element 2i in the low
/// nibble) and scales [B, N, K/32] UE8M0 bytes; NVFP4 data [B, N, K/2] bytes, scales
/// [B, N, K/16] E4M3 bytes and global_scales [B] f32. Initialise with
/// `fdmoe_quantized_tensor_init`. fdmoe_quantize_weights writes the buffers,
/// fdmoe_dequantize_weights reads them.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FdmoeQuantizedTensor {
    pub struct_size: u32,
    /// FdmoeDtype: FP8_BLOCK, MXFP4 or NVFP4. Default FP8_BLOCK.
    pub format: u32,
    /// B: number of matrices (e.g. experts).
    pub num_matrices: u32,
    /// N: rows (output features) of each matrix.
    pub rows: u32,
    /// K: columns of each matrix, the contiguous dimension that is packed and scaled; a
    /// multiple of 32 (MXFP4) or 16 (NVFP4); any value for FP8_BLOCK (edge blocks partial).
    pub cols: u32,
    /// The packed elements.
    pub data: *mut c_void,
    /// The scales.
    pub scales: *mut c_void,
    /// NVFP4: [B] f32 global scales (dequantization multipliers); must be NULL otherwise.
    pub global_scales: *mut f32,
}

unsafe impl Versioned for FdmoePreDispatchArgs {
    const FIRST_SIZE: usize = std::mem::size_of::<FdmoePreDispatchArgs>();
    fn defaults() -> Self {
        FdmoePreDispatchArgs {
            struct_size: std::mem::size_of::<FdmoePreDispatchArgs>() as u32,
            memory: FdmoeMemory::Host as u32,
            x_dtype: FdmoeDtype::Bf16 as u32,
            num_tokens: 0,
            hidden_size: 0,
            top_k: 0,
            max_tokens: 0,
            x: std::ptr::null(),
            topk_ids: std::ptr::null(),
            topk_weights: std::ptr::null(),
            out_x: std::ptr::null_mut(),
            out_scales: std::ptr::null_mut(),
            out_topk_ids: std::ptr::null_mut(),
            out_topk_weights: std::ptr::null_mut(),
            stream: std::ptr::null_mut(),
        }
    }
}

unsafe impl Versioned for FdmoeQuantizedTensor {
    const FIRST_SIZE: usize = std::mem::size_of::<FdmoeQuantizedTensor>();
    fn defaults() -> Self {
        FdmoeQuantizedTensor {
            struct_size: std::mem::size_of::<FdmoeQuantizedTensor>() as u32,
            format: FdmoeDtype::Fp8Block as u32,
            num_matrices: 0,
            rows: 0,
            cols: 0,
            data: std::ptr::null_mut(),
            scales: std::ptr::null_mut(),
            global_scales: std::ptr::null_mut(),
        }
    }
}

unsafe impl Versioned for FdmoeConfig {
    /// The size of the first release: up to ep_rank, before act_quant.
    const FIRST_SIZE: usize = std::mem::offset_of!(FdmoeConfig, act_quant);
    fn defaults() -> Self {
        let d = MoeConfig::default();
        FdmoeConfig {
            struct_size: std::mem::size_of::<FdmoeConfig>() as u32,
            backend: d.backend as u32,
            device_ordinal: d.device_ordinal,
            num_experts: 0,
            top_k: 0,
            hidden_size: 0,
            intermediate_size: 0,
            latent_size: 0,
            shared_intermediate_size: 0,
            routing: d.routing as u32,
            scoring: d.scoring as u32,
            n_group: d.n_group as u32,
            topk_group: d.topk_group as u32,
            renormalize: d.renormalize as u32,
            routed_scaling_factor: d.routed_scaling_factor,
            activation: d.activation as u32,
            act_dtype: d.act_dtype as u32,
            weight_dtype: d.weight_dtype as u32,
            max_tokens: d.max_tokens as u32,
            num_threads: 0,
            ep_size: 1,
            ep_rank: 0,
            act_quant: d.act_quant as u32,
        }
    }
}

unsafe impl Versioned for FdmoeWeights {
    /// The size of the first release: up to shared_w2, before the quantized-expert fields.
    const FIRST_SIZE: usize = std::mem::offset_of!(FdmoeWeights, w13_scale);
    fn defaults() -> Self {
        let null = std::ptr::null();
        FdmoeWeights {
            struct_size: std::mem::size_of::<FdmoeWeights>() as u32,
            layout: FdmoeLayout::Torch as u32,
            dtype: FdmoeDtype::Bf16 as u32,
            memory: FdmoeMemory::Host as u32,
            ownership: FdmoeOwnership::Own as u32,
            gate_up_interleaved: 0,
            gate_dtype: FdmoeDtype::F32 as u32,
            gate_layout: FdmoeGateLayout::ExpertsByHidden as u32,
            w13: null,
            w2: null,
            gate_proj: std::ptr::null(),
            up_proj: std::ptr::null(),
            down_proj: std::ptr::null(),
            gate: null,
            correction_bias: std::ptr::null(),
            fc1: null,
            fc2: null,
            shared_w13: null,
            shared_w2: null,
            w13_scale: null,
            w2_scale: null,
            w13_global_scale: std::ptr::null(),
            w2_global_scale: std::ptr::null(),
            dense_dtype: FdmoeDtype::Bf16 as u32,
        }
    }
}

unsafe impl Versioned for FdmoeForwardArgs {
    const FIRST_SIZE: usize = std::mem::size_of::<FdmoeForwardArgs>();
    fn defaults() -> Self {
        FdmoeForwardArgs {
            struct_size: std::mem::size_of::<FdmoeForwardArgs>() as u32,
            num_tokens: 0,
            x: std::ptr::null(),
            out: std::ptr::null_mut(),
            router_logits: std::ptr::null(),
            topk_ids: std::ptr::null(),
            topk_weights: std::ptr::null(),
            topk_ids_out: std::ptr::null_mut(),
            topk_weights_out: std::ptr::null_mut(),
            stream: std::ptr::null_mut(),
            flags: 0,
        }
    }
}

unsafe impl Versioned for FdmoeMemoryRequirements {
    const FIRST_SIZE: usize = std::mem::size_of::<FdmoeMemoryRequirements>();
    fn defaults() -> Self {
        FdmoeMemoryRequirements {
            struct_size: std::mem::size_of::<FdmoeMemoryRequirements>() as u32,
            device_weight_bytes: 0,
            device_workspace_bytes: 0,
            device_graph_bytes: 0,
            host_weight_bytes: 0,
            host_workspace_bytes: 0,
        }
    }
}

impl FdmoeConfig {
    pub fn to_config(&self) -> Result<MoeConfig> {
        let opt = |v: u32| if v == 0 { None } else { Some(v as usize) };
        Ok(MoeConfig {
            backend: FdmoeBackendKind::from_raw(self.backend, "config.backend")?,
            device_ordinal: self.device_ordinal,
            num_experts: self.num_experts as usize,
            top_k: self.top_k as usize,
            hidden_size: self.hidden_size as usize,
            intermediate_size: self.intermediate_size as usize,
            latent_size: opt(self.latent_size),
            shared_intermediate_size: opt(self.shared_intermediate_size),
            routing: FdmoeRouting::from_raw(self.routing, "config.routing")?,
            scoring: FdmoeScoring::from_raw(self.scoring, "config.scoring")?,
            n_group: self.n_group as usize,
            topk_group: self.topk_group as usize,
            renormalize: self.renormalize != 0,
            routed_scaling_factor: self.routed_scaling_factor,
            activation: FdmoeActivation::from_raw(self.activation, "config.activation")?,
            act_dtype: FdmoeDtype::from_raw(self.act_dtype, "config.act_dtype")?,
            weight_dtype: FdmoeDtype::from_raw(self.weight_dtype, "config.weight_dtype")?,
            max_tokens: self.max_tokens as usize,
            num_threads: self.num_threads as usize,
            ep_size: self.ep_size as usize,
            ep_rank: self.ep_rank as usize,
            act_quant: FdmoeActQuant::from_raw(self.act_quant, "config.act_quant")?,
        })
    }
}

fn optional(p: *const c_void) -> Option<*const c_void> {
    (!p.is_null()).then_some(p)
}

impl FdmoeWeights {
    /// # Safety
    /// The per-expert pointer arrays, when non-NULL, hold `num_experts` pointers.
    pub unsafe fn to_source(&self, num_experts: usize) -> Result<WeightSource> {
        let layout = FdmoeLayout::from_raw(self.layout, "weights.layout")?;
        let dtype = FdmoeDtype::from_raw(self.dtype, "weights.dtype")?;
        let dense_dtype = if dtype.is_quantized() {
            let d = FdmoeDtype::from_raw(self.dense_dtype, "weights.dense_dtype")?;
            ensure!(
                d.is_dense(),
                "weights.dense_dtype = {d} must be float32, bfloat16 or float16 (the dtype of fc1, fc2 and the shared experts next to pre-quantized experts)"
            );
            d
        } else {
            ensure!(
                dtype.is_dense(),
                "weights.dtype = {dtype} is not a weight element type"
            );
            for (name, p) in [
                ("w13_scale", self.w13_scale),
                ("w2_scale", self.w2_scale),
                ("w13_global_scale", self.w13_global_scale as *const c_void),
                ("w2_global_scale", self.w2_global_scale as *const c_void),
            ] {
                ensure!(
                    p.is_null(),
                    "weights.{name} is given but weights.dtype = {dtype} is not a quantized format (set weights.dtype to the format of pre-quantized w13/w2)"
                );
            }
            dtype
        };
        let experts = if layout == FdmoeLayout::PerExpert {
            ensure!(
                self.w13.is_null() && self.w2.is_null(),
                "weights.w13/w2 are given but weights.layout is per_expert (pass gate_proj/up_proj/down_proj)"
            );
            if dtype.is_quantized() {
                return Err(Error::new(
                    FdmoeStatus::Unsupported,
                    format!("pre-quantized experts (weights.dtype = {dtype}) in layout per_expert are not supported; stack them as w13 [E, 2I, L] and w2 [E, L, I] in layout torch"),
                ));
            }
            let list = |p: *const *const c_void, name: &str| -> Result<Vec<*const c_void>> {
                if p.is_null() {
                    return Err(Error::null(&format!("weights.{name} (layout per_expert)")));
                }
                Ok(std::slice::from_raw_parts(p, num_experts).to_vec())
            };
            ExpertSource::PerExpert {
                gate_proj: list(self.gate_proj, "gate_proj")?,
                up_proj: list(self.up_proj, "up_proj")?,
                down_proj: list(self.down_proj, "down_proj")?,
            }
        } else {
            ensure!(
                self.gate_proj.is_null() && self.up_proj.is_null() && self.down_proj.is_null(),
                "weights.gate_proj/up_proj/down_proj are given but weights.layout is {layout} (pass w13/w2)"
            );
            if dtype.is_quantized() {
                ExpertSource::Quantized {
                    format: dtype,
                    w13: self.w13,
                    w2: self.w2,
                    w13_scale: self.w13_scale,
                    w2_scale: self.w2_scale,
                    w13_global_scale: self.w13_global_scale,
                    w2_global_scale: self.w2_global_scale,
                }
            } else {
                ExpertSource::Stacked {
                    w13: self.w13,
                    w2: self.w2,
                }
            }
        };
        let gate = match optional(self.gate) {
            Some(ptr) => Some(GateSource {
                ptr,
                dtype: FdmoeDtype::from_raw(self.gate_dtype, "weights.gate_dtype")?,
                layout: FdmoeGateLayout::from_raw(self.gate_layout, "weights.gate_layout")?,
            }),
            None => None,
        };
        Ok(WeightSource {
            layout,
            dtype: dense_dtype,
            memory: FdmoeMemory::from_raw(self.memory, "weights.memory")?,
            ownership: FdmoeOwnership::from_raw(self.ownership, "weights.ownership")?,
            gate_up_interleaved: self.gate_up_interleaved != 0,
            experts,
            gate,
            correction_bias: (!self.correction_bias.is_null()).then_some(self.correction_bias),
            fc1: optional(self.fc1),
            fc2: optional(self.fc2),
            shared_w13: optional(self.shared_w13),
            shared_w2: optional(self.shared_w2),
        })
    }
}

/// The validated shape of an FdmoeQuantizedTensor.
pub struct QuantizedTensorShape {
    pub format: FdmoeDtype,
    pub matrices: usize,
    pub rows: usize,
    pub cols: usize,
    /// Sizes of one matrix's parts.
    pub sizes: PartSizes,
}

impl QuantizedTensorShape {
    /// B * N * K (0 when any is 0).
    pub fn elements(&self) -> usize {
        self.matrices * self.rows * self.cols
    }
}

impl FdmoeQuantizedTensor {
    /// Checks the format, the shape and the pointers a non-empty tensor needs; `name` names
    /// the argument in messages.
    pub fn shape(&self, name: &str) -> Result<QuantizedTensorShape> {
        let format = FdmoeDtype::from_raw(self.format, &format!("{name}->format"))?;
        ensure!(
            format.is_quantized(),
            "{name}->format = {format} is not a quantized format (fp8_block, mxfp4, nvfp4)"
        );
        let (matrices, rows, cols) = (
            self.num_matrices as usize,
            self.rows as usize,
            self.cols as usize,
        );
        let sizes = part_sizes(format, rows, cols)
            .map_err(|e| Error::invalid(format!("{name}: {}", e.message)))?;
        let shape = QuantizedTensorShape {
            format,
            matrices,
            rows,
            cols,
            sizes,
        };
        ensure!(
            matrices
                .checked_mul(rows)
                .and_then(|v| v.checked_mul(cols))
                .is_some_and(|v| v <= isize::MAX as usize / 4),
            "{name}: num_matrices ({matrices}) x rows ({rows}) x cols ({cols}) is too large"
        );
        if format != FdmoeDtype::Nvfp4 {
            ensure!(
                self.global_scales.is_null(),
                "{name}->global_scales applies only to format nvfp4 (format is {format})"
            );
        }
        if shape.elements() > 0 {
            if self.data.is_null() {
                return Err(Error::null(&format!("{name}->data")));
            }
            if self.scales.is_null() {
                return Err(Error::null(&format!("{name}->scales")));
            }
            if format == FdmoeDtype::Nvfp4 && self.global_scales.is_null() {
                return Err(Error::null(&format!(
                    "{name}->global_scales (format nvfp4)"
                )));
            }
        }
        Ok(shape)
    }
}

impl FdmoeForwardArgs {
    pub fn to_args(&self) -> Result<ForwardArgs> {
        ensure!(
            self.flags & !FDMOE_FORWARD_FORCE_EAGER == 0,
            "args.flags = {:#x} has bits this library does not know",
            self.flags
        );
        Ok(ForwardArgs {
            num_tokens: self.num_tokens as usize,
            x: self.x,
            out: self.out,
            router_logits: self.router_logits,
            topk_ids: self.topk_ids,
            topk_weights: self.topk_weights,
            topk_ids_out: self.topk_ids_out,
            topk_weights_out: self.topk_weights_out,
            stream: self.stream,
            force_eager: self.flags & FDMOE_FORWARD_FORCE_EAGER != 0,
        })
    }
}

impl FdmoeMemoryRequirements {
    pub fn from_requirements(m: &MemoryRequirements) -> Self {
        FdmoeMemoryRequirements {
            device_weight_bytes: m.device_weight_bytes as u64,
            device_workspace_bytes: m.device_workspace_bytes as u64,
            device_graph_bytes: m.device_graph_bytes as u64,
            host_weight_bytes: m.host_weight_bytes as u64,
            host_workspace_bytes: m.host_workspace_bytes as u64,
            ..FdmoeMemoryRequirements::defaults()
        }
    }
}
