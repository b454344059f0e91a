//! What a backend is asked to compute: the enums of the contract (their numbers are ABI) and
//! the validated `MoeConfig` that every backend is built from.

use crate::error::{ensure, Error, FdmoeStatus, Result};

/// Implements the conversions every ABI enum needs on an explicitly written enum (cbindgen
/// reads the enum itself, so its variants stay outside the macro).
macro_rules! abi_enum {
    ($name:ident, $field:literal { $($variant:ident => $text:literal,)+ }) => {
        impl $name {
            /// Every value, in numeric order.
            /// cbindgen:ignore
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// Validates a raw `uint32_t` field; `field` names the argument in the error.
            pub fn from_raw(value: u32, field: &str) -> Result<Self> {
                $(if value == $name::$variant as u32 {
                    return Ok($name::$variant);
                })+
                Err(Error::invalid(format!("{field} = {value} is not a valid {} value", $field)))
            }

            /// Lower-case name used in messages and by the bindings.
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }

            /// Parses the lower-case name.
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

/// Which engine computes the layer.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdmoeBackendKind {
    /// Multi-threaded CPU reference backend; runs everywhere.
    Cpu = 0,
    /// NVIDIA GPU backend (sm_90a first, sm_80 working).
    Cuda = 1,
}

abi_enum!(
    FdmoeBackendKind, "backend" {
        Cpu => "cpu",
        Cuda => "cuda",
    }
);

/// How each token picks its experts (SPEC §3).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdmoeRouting {
    /// softmax over all experts, top-k of the probabilities.
    SoftmaxTopk = 0,
    /// sigmoid per expert, top-k of the scores.
    SigmoidTopk = 1,
    /// DeepSeek-V3 "noaux_tc" grouped top-k with optional correction bias.
    GroupedTopk = 2,
    /// The caller passes top-k ids and weights on every forward.
    Given = 3,
}

abi_enum!(
    FdmoeRouting, "routing" {
        SoftmaxTopk => "softmax_topk",
        SigmoidTopk => "sigmoid_topk",
        GroupedTopk => "grouped_topk",
        Given => "given",
    }
);

/// Score function of `GROUPED_TOPK` (the other modes fix their own).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdmoeScoring {
    Sigmoid = 0,
    Softmax = 1,
}

abi_enum!(
    FdmoeScoring, "scoring" {
        Sigmoid => "sigmoid",
        Softmax => "softmax",
    }
);

/// Gated activation applied to the gate (g) and up (v) halves of the first expert GEMM.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdmoeActivation {
    /// silu(g) * v
    Swiglu = 0,
    /// gelu_tanh(g) * v
    GeluTanhAndMul = 1,
    /// gpt-oss: (clamp(v,-7,7) + 1) * min(g,7) * sigmoid(1.702 * min(g,7))
    Swigluoai = 2,
}

abi_enum!(
    FdmoeActivation, "activation" {
        Swiglu => "swiglu",
        GeluTanhAndMul => "gelu_tanh_and_mul",
        Swigluoai => "swigluoai",
    }
);

/// Element type or quantized weight format.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdmoeDtype {
    F32 = 0,
    Bf16 = 1,
    F16 = 2,
    /// E4M3 weights with one f32 scale per 128x128 block (DeepSeek-V3 `weight_scale_inv`).
    Fp8Block = 3,
    /// E2M1 weights, two per byte, one UE8M0 scale per 32 along K (OCP MX).
    Mxfp4 = 4,
    /// E2M1 weights with one E4M3 scale per 16 along K and one f32 global scale per matrix.
    Nvfp4 = 5,
}

abi_enum!(
    FdmoeDtype, "dtype" {
        F32 => "float32",
        Bf16 => "bfloat16",
        F16 => "float16",
        Fp8Block => "fp8_block",
        Mxfp4 => "mxfp4",
        Nvfp4 => "nvfp4",
    }
);

/// How the routed experts' GEMM inputs are rounded before the tensor cores take them.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdmoeActQuant {
    /// The format's own rule: activations as given (bf16 against FP4 weights: W4A16),
    /// FP8_BLOCK's per-128 E4M3 (SPEC §5).
    None = 0,
    /// MXFP4 weights only: each GEMM input row (x or fc1's output for the up projection, the
    /// activated intermediate for the down projection) becomes E4M3 with one UE8M0 scale per
    /// 32 channels by the FP8 pre-dispatch rule (SPEC §5, the MegaMoE format), and the GEMMs
    /// run in FP8 (W4A8).
    Fp8Mx = 1,
}

abi_enum!(
    FdmoeActQuant, "act_quant" {
        None => "none",
        Fp8Mx => "fp8_mx",
    }
);

/// How the routed experts' GEMM inputs are rounded, as a config implies it (not ABI): FP8_BLOCK
/// weights always quantize them (SPEC §5), `act_quant = FP8_MX` by the pre-dispatch rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertInputQuant {
    /// E4M3 per token per 128 channels, f32 scale amax / 448.
    Fp8Block,
    /// E4M3 per token per 32 channels, power-of-two scale (the pre-dispatch rule).
    Fp8Mx,
}

/// How the expert matrices are laid out in the caller's memory (SPEC §4).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdmoeLayout {
    /// w13 [E, 2I, L] (gate rows then up rows), w2 [E, L, I]: vLLM, HF stacked.
    Torch = 0,
    /// up_gate [E, L, 2I], down [E, I, L]: FastDeploy (every matrix transposed).
    Paddle = 1,
    /// One pointer per expert per matrix: gate_proj [I, L], up_proj [I, L], down_proj [L, I].
    PerExpert = 2,
}

abi_enum!(
    FdmoeLayout, "layout" {
        Torch => "torch",
        Paddle => "paddle",
        PerExpert => "per_expert",
    }
);

/// Orientation of the router gate weight.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdmoeGateLayout {
    /// [E, H] (torch nn.Linear)
    ExpertsByHidden = 0,
    /// [H, E] (paddle)
    HiddenByExperts = 1,
}

abi_enum!(
    FdmoeGateLayout, "gate layout" {
        ExpertsByHidden => "experts_by_hidden",
        HiddenByExperts => "hidden_by_experts",
    }
);

/// Who owns the weight memory after `fdmoe_load_weights`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdmoeOwnership {
    /// The library copies (and repacks/converts) into memory it owns.
    Own = 0,
    /// The library keeps the caller's pointers; the caller keeps them alive until destroy.
    Borrow = 1,
}

abi_enum!(
    FdmoeOwnership, "ownership" {
        Own => "own",
        Borrow => "borrow",
    }
);

/// Where a pointer points.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdmoeMemory {
    Host = 0,
    Device = 1,
}

abi_enum!(
    FdmoeMemory, "memory" {
        Host => "host",
        Device => "device",
    }
);

impl FdmoeDtype {
    /// Dense element types: usable for activations and as unquantized weights.
    pub fn is_dense(self) -> bool {
        matches!(self, FdmoeDtype::F32 | FdmoeDtype::Bf16 | FdmoeDtype::F16)
    }

    /// Quantized weight formats (SPEC §5): FP8_BLOCK, MXFP4, NVFP4.
    pub fn is_quantized(self) -> bool {
        matches!(
            self,
            FdmoeDtype::Fp8Block | FdmoeDtype::Mxfp4 | FdmoeDtype::Nvfp4
        )
    }

    /// The multiple a quantized format needs along K (the reduction dimension, contiguous in
    /// TORCH orientation): 128 for FP8_BLOCK (whole 128x128 weight blocks and whole 128-channel
    /// activation groups, as the FP8 GEMM kernels take them), 32 for MXFP4, 16 for NVFP4.
    /// `None` for dense types.
    pub fn k_multiple(self) -> Option<usize> {
        match self {
            FdmoeDtype::Fp8Block => Some(128),
            FdmoeDtype::Mxfp4 => Some(32),
            FdmoeDtype::Nvfp4 => Some(16),
            _ => None,
        }
    }

    /// Bytes per element of a dense type.
    pub fn dense_size(self) -> Option<usize> {
        match self {
            FdmoeDtype::F32 => Some(4),
            FdmoeDtype::Bf16 | FdmoeDtype::F16 => Some(2),
            _ => None,
        }
    }
}

/// `fdmoe_forward` flag bit: run eagerly even when a captured graph covers the token count.
pub const FDMOE_FORWARD_FORCE_EAGER: u32 = 1;

/// A validated layer description. Every backend is created from one.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub backend: FdmoeBackendKind,
    pub device_ordinal: i32,
    pub num_experts: usize,
    pub top_k: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// `Some(L)` when the experts run in a latent space through fc1/fc2.
    pub latent_size: Option<usize>,
    /// `Some(S)` when a dense shared-expert MLP of intermediate size S is added.
    pub shared_intermediate_size: Option<usize>,
    pub routing: FdmoeRouting,
    pub scoring: FdmoeScoring,
    pub n_group: usize,
    pub topk_group: usize,
    pub renormalize: bool,
    pub routed_scaling_factor: f32,
    pub activation: FdmoeActivation,
    pub act_dtype: FdmoeDtype,
    pub weight_dtype: FdmoeDtype,
    pub act_quant: FdmoeActQuant,
    pub max_tokens: usize,
    /// CPU worker threads; 0 means one per available core.
    pub num_threads: usize,
    pub ep_size: usize,
    pub ep_rank: usize,
}

impl Default for MoeConfig {
    fn default() -> Self {
        MoeConfig {
            backend: FdmoeBackendKind::Cpu,
            device_ordinal: 0,
            num_experts: 0,
            top_k: 0,
            hidden_size: 0,
            intermediate_size: 0,
            latent_size: None,
            shared_intermediate_size: None,
            routing: FdmoeRouting::SoftmaxTopk,
            scoring: FdmoeScoring::Sigmoid,
            n_group: 1,
            topk_group: 1,
            renormalize: true,
            routed_scaling_factor: 1.0,
            activation: FdmoeActivation::Swiglu,
            act_dtype: FdmoeDtype::Bf16,
            weight_dtype: FdmoeDtype::Bf16,
            act_quant: FdmoeActQuant::None,
            max_tokens: 4096,
            num_threads: 0,
            ep_size: 1,
            ep_rank: 0,
        }
    }
}

impl MoeConfig {
    /// The rounding of the routed experts' GEMM inputs, if any.
    pub fn expert_input_quant(&self) -> Option<ExpertInputQuant> {
        if self.weight_dtype == FdmoeDtype::Fp8Block {
            Some(ExpertInputQuant::Fp8Block)
        } else if self.act_quant == FdmoeActQuant::Fp8Mx {
            Some(ExpertInputQuant::Fp8Mx)
        } else {
            None
        }
    }

    /// Hidden size the experts run at: the latent size when there is one.
    pub fn expert_hidden(&self) -> usize {
        self.latent_size.unwrap_or(self.hidden_size)
    }

    /// Checks everything that does not depend on the backend.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.num_experts >= 1,
            "config.num_experts must be at least 1"
        );
        ensure!(
            self.hidden_size >= 1,
            "config.hidden_size must be at least 1"
        );
        ensure!(
            self.intermediate_size >= 1,
            "config.intermediate_size must be at least 1"
        );
        ensure!(self.max_tokens >= 1, "config.max_tokens must be at least 1");
        ensure!(
            self.top_k >= 1 && self.top_k <= self.num_experts,
            "config.top_k = {} must be in [1, num_experts = {}]",
            self.top_k,
            self.num_experts
        );
        ensure!(
            self.num_experts <= i32::MAX as usize,
            "config.num_experts = {} does not fit the int32 expert ids",
            self.num_experts
        );
        ensure!(
            self.max_tokens
                .checked_mul(self.top_k)
                .is_some_and(|n| n <= i32::MAX as usize),
            "config.max_tokens * top_k = {} * {} exceeds 2^31 - 1 routed slots",
            self.max_tokens,
            self.top_k
        );
        if let Some(l) = self.latent_size {
            ensure!(l >= 1, "config.latent_size must be at least 1 when given");
        }
        if let Some(s) = self.shared_intermediate_size {
            ensure!(
                s >= 1,
                "config.shared_intermediate_size must be at least 1 when given"
            );
        }
        ensure!(
            self.routed_scaling_factor.is_finite(),
            "config.routed_scaling_factor = {} must be finite",
            self.routed_scaling_factor
        );
        ensure!(
            self.act_dtype.is_dense(),
            "config.act_dtype = {} must be float32, bfloat16 or float16",
            self.act_dtype
        );
        if self.routing == FdmoeRouting::GroupedTopk {
            ensure!(self.n_group >= 1, "config.n_group must be at least 1");
            ensure!(
                self.num_experts % self.n_group == 0,
                "config.num_experts = {} is not divisible by config.n_group = {}",
                self.num_experts,
                self.n_group
            );
            ensure!(
                self.topk_group >= 1 && self.topk_group <= self.n_group,
                "config.topk_group = {} must be in [1, n_group = {}]",
                self.topk_group,
                self.n_group
            );
            let selectable = self.topk_group * (self.num_experts / self.n_group);
            ensure!(
                self.top_k <= selectable,
                "config.top_k = {} exceeds the {} experts in topk_group = {} groups",
                self.top_k,
                selectable,
                self.topk_group
            );
        } else {
            ensure!(
                self.n_group <= 1 && self.topk_group <= 1,
                "config.n_group and config.topk_group apply only to routing grouped_topk (routing is {})",
                self.routing
            );
        }
        if let Some(multiple) = self.weight_dtype.k_multiple() {
            // K of w13 is the expert hidden size L, K of w2 the intermediate size I.
            let (l_name, l) = match self.latent_size {
                Some(l) => ("latent_size", l),
                None => ("hidden_size", self.hidden_size),
            };
            for (name, k, matrix) in [
                (l_name, l, "w13"),
                ("intermediate_size", self.intermediate_size, "w2"),
            ] {
                ensure!(
                    k % multiple == 0,
                    "config.{name} = {k} (K of {matrix}) is not a multiple of {multiple}, which config.weight_dtype = {} needs along K",
                    self.weight_dtype
                );
            }
        }
        if self.act_quant == FdmoeActQuant::Fp8Mx && self.weight_dtype != FdmoeDtype::Mxfp4 {
            return Err(Error::new(
                FdmoeStatus::Unsupported,
                format!(
                    "config.act_quant = fp8_mx needs config.weight_dtype = mxfp4 (it is {})",
                    self.weight_dtype
                ),
            ));
        }
        ensure!(self.ep_size >= 1, "config.ep_size must be at least 1");
        ensure!(
            self.ep_rank < self.ep_size,
            "config.ep_rank = {} must be below config.ep_size = {}",
            self.ep_rank,
            self.ep_size
        );
        ensure!(
            self.device_ordinal >= 0,
            "config.device_ordinal = {} is negative",
            self.device_ordinal
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> MoeConfig {
        MoeConfig {
            num_experts: 8,
            top_k: 2,
            hidden_size: 16,
            intermediate_size: 8,
            ..Default::default()
        }
    }

    #[test]
    fn enum_from_raw_names_the_field() {
        let e = FdmoeRouting::from_raw(17, "config.routing").unwrap_err();
        assert!(e.message.contains("config.routing = 17"), "{}", e.message);
        assert_eq!(
            FdmoeRouting::from_raw(2, "x").unwrap(),
            FdmoeRouting::GroupedTopk
        );
        for d in FdmoeDtype::ALL {
            assert_eq!(FdmoeDtype::from_name(d.name()), Some(*d));
        }
    }

    #[test]
    fn fp8_mx_activations_need_mxfp4_weights() {
        let mut c = base();
        c.intermediate_size = 128;
        c.hidden_size = 128;
        c.act_quant = FdmoeActQuant::Fp8Mx;
        for w in [FdmoeDtype::Bf16, FdmoeDtype::Fp8Block, FdmoeDtype::Nvfp4] {
            c.weight_dtype = w;
            let e = c.validate().unwrap_err();
            assert_eq!(e.status, FdmoeStatus::Unsupported, "{w}");
            assert!(
                e.message.contains("act_quant") && e.message.contains(w.name()),
                "{}",
                e.message
            );
        }
        c.weight_dtype = FdmoeDtype::Mxfp4;
        c.validate().unwrap();
    }

    #[test]
    fn grouped_constraints() {
        let mut c = base();
        c.routing = FdmoeRouting::GroupedTopk;
        c.n_group = 3;
        assert!(c.validate().unwrap_err().message.contains("not divisible"));
        c.n_group = 4;
        c.topk_group = 5;
        assert!(c.validate().unwrap_err().message.contains("topk_group"));
        c.topk_group = 1;
        c.top_k = 3;
        assert!(c
            .validate()
            .unwrap_err()
            .message
            .contains("exceeds the 2 experts"));
        c.top_k = 2;
        c.validate().unwrap();
    }

    #[test]
    fn sizes_are_checked() {
        let mut c = base();
        c.top_k = 9;
        assert!(c.validate().unwrap_err().message.contains("top_k"));
        let mut c = base();
        c.hidden_size = 0;
        assert!(c.validate().unwrap_err().message.contains("hidden_size"));
        let mut c = base();
        c.n_group = 2;
        assert!(c.validate().unwrap_err().message.contains("apply only"));
        let mut c = base();
        c.act_dtype = FdmoeDtype::Mxfp4;
        assert!(c.validate().unwrap_err().message.contains("act_dtype"));
    }

    #[test]
    fn quantized_formats_need_k_multiples() {
        // base(): H = 16, I = 8.
        let mut c = base();
        c.weight_dtype = FdmoeDtype::Nvfp4;
        let m = c.validate().unwrap_err().message;
        assert!(
            m.contains("config.intermediate_size = 8 (K of w2)") && m.contains("16"),
            "{m}"
        );
        c.intermediate_size = 32;
        c.validate().unwrap();
        c.weight_dtype = FdmoeDtype::Mxfp4;
        let m = c.validate().unwrap_err().message;
        assert!(m.contains("config.hidden_size = 16 (K of w13)"), "{m}");
        c.latent_size = Some(64);
        c.validate().unwrap();
        c.weight_dtype = FdmoeDtype::Fp8Block;
        let m = c.validate().unwrap_err().message;
        assert!(
            m.contains("config.latent_size = 64") && m.contains("128"),
            "{m}"
        );
        c.latent_size = Some(128);
        c.intermediate_size = 256;
        c.validate().unwrap();
        assert!(FdmoeDtype::ALL
            .iter()
            .all(|d| d.is_quantized() != d.is_dense()));
    }
}
