//! The CUDA backend: the forward of SPEC §3 as a fixed sequence of kernels on the caller's
//! stream — gate logits and routing (or given routing), optional fc1, the stable sort by
//! expert, grouped GEMM 1 with the gated activation fused, grouped GEMM 2 with the router
//! weight fused, the shared experts, and a deterministic combine (plus fc2). Everything is
//! allocated and compiled at create; forward only launches (no allocation, no host sync, no
//! host read of device data), so an engine may capture it in its own graph.

pub mod compile;
pub mod driver;
pub mod graph;
pub mod kernels;
pub mod pre_dispatch;
pub mod quant_weights;
pub mod tiles;
pub mod weights;

use std::ffi::c_void;

use cudarc::driver::sys::CUdevice_attribute;

use self::compile::Element;
use self::driver::{
    dependent_launch, is_capturing, Context, DeviceBuffer, DevicePtr, OwnedStream, Stream,
};
use self::graph::{buckets, GraphBuffers, Graphs};
use self::kernels::{
    activation_scales_per_row, gate_logits_floats, gate_slices, input_scales_per_row,
    sort_starts_ints, FusedRouting, GemmParams, GivenSlots, Kernels, RouteParams, SortBuffers,
    SortParams, ARG_OUT, ARG_X, ROUTING_COUNTERS,
};
use self::quant_weights::QuantizedPart;
use self::tiles::{GemmKind, QuantFamily, QuantTile, Tile};
use self::weights::{require_device, weight_bytes, CudaWeights, DeviceExperts};
use super::{Backend, MemoryRequirements};
use crate::config::{
    ExpertInputQuant, FdmoeActQuant, FdmoeBackendKind, FdmoeDtype, FdmoeRouting, FdmoeScoring,
    MoeConfig,
};
use crate::error::{Error, Result};
use crate::forward::{ForwardArgs, RoutingSource};
use crate::weights::WeightSource;

/// Checks the parts of a config the kernels cannot take; each answer names the feature.
pub fn check_config(cfg: &MoeConfig) -> Result<()> {
    match (cfg.weight_dtype, cfg.act_dtype) {
        (_, FdmoeDtype::Bf16 | FdmoeDtype::F16) if cfg.weight_dtype == cfg.act_dtype => {}
        (FdmoeDtype::Fp8Block, FdmoeDtype::Bf16 | FdmoeDtype::F16) => {}
        (FdmoeDtype::Mxfp4 | FdmoeDtype::Nvfp4, FdmoeDtype::Bf16) => {}
        (FdmoeDtype::Mxfp4 | FdmoeDtype::Nvfp4, act) => {
            return Err(Error::unsupported(
                format!(
                    "{} experts with activations of {act} (FP4 weights are decoded to bfloat16; use bfloat16 activations)",
                    cfg.weight_dtype
                ),
                "cuda",
            ))
        }
        (_, FdmoeDtype::Bf16 | FdmoeDtype::F16) => {
            return Err(Error::unsupported(
                format!(
                    "weight format {} with activations of {} (they must match)",
                    cfg.weight_dtype, cfg.act_dtype
                ),
                "cuda",
            ))
        }
        (_, act) => {
            return Err(Error::unsupported(
                format!("activations of {act} (use bfloat16 or float16)"),
                "cuda",
            ))
        }
    }
    for (name, v) in [
        ("hidden_size", Some(cfg.hidden_size)),
        ("intermediate_size", Some(cfg.intermediate_size)),
        ("latent_size", cfg.latent_size),
        ("shared_intermediate_size", cfg.shared_intermediate_size),
    ] {
        if let Some(v) = v {
            if v % 8 != 0 {
                return Err(Error::unsupported(
                    format!("config.{name} = {v}, not a multiple of 8 (16-byte rows)"),
                    "cuda",
                ));
            }
        }
    }
    if cfg.num_experts > 1024 {
        return Err(Error::unsupported(
            format!("config.num_experts = {} above 1024", cfg.num_experts),
            "cuda",
        ));
    }
    if cfg.routing == FdmoeRouting::GroupedTopk && cfg.n_group > 64 {
        return Err(Error::unsupported(
            format!("config.n_group = {} above 64", cfg.n_group),
            "cuda",
        ));
    }
    if cfg.ep_size > 1 {
        return Err(Error::unsupported(
            "expert parallelism (config.ep_size > 1)",
            "cuda",
        ));
    }
    if cfg.num_threads != 0 {
        return Err(Error::invalid(
            "config.num_threads applies to the cpu backend; it must be 0 on backend cuda",
        ));
    }
    Ok(())
}

struct Workspace {
    logits: DeviceBuffer,
    topk_ids: DeviceBuffer,
    topk_weights: DeviceBuffer,
    expert_offsets: DeviceBuffer,
    sorted_slots: DeviceBuffer,
    slot_positions: DeviceBuffer,
    tile_expert: DeviceBuffer,
    tile_row: DeviceBuffer,
    num_tiles: DeviceBuffer,
    latent_in: DeviceBuffer,
    latent_out: DeviceBuffer,
    act: DeviceBuffer,
    y: DeviceBuffer,
    shared_act: DeviceBuffer,
    shared_out: DeviceBuffer,
    /// FP8_BLOCK: the expert GEMMs' inputs as E4M3 with f32 scales per 128 channels.
    inputs_fp8: DeviceBuffer,
    inputs_fp8_scales: DeviceBuffer,
    act_fp8: DeviceBuffer,
    /// Zeroed at create: FP8_MX rows' padding scales, which GEMM 1 never writes.
    act_fp8_scales: DeviceBuffer,
    /// Quantized expert inputs on the wgmma tiles: per row tile, FP8_BLOCK's arrival counters
    /// (one per 128 activation channels), then the tile's ready and consumer counts that let
    /// GEMM 2 start on it (`act_quant_counters` in kernels/quant/wgmma_epilogue.cuh; zero
    /// between launches).
    act_quant_arrivals: DeviceBuffer,
    /// The fused decode routing's counters (zero between launches).
    routing_counters: DeviceBuffer,
    /// The multi-block sort's arrival counter (zero between launches) and block starts.
    sort_starts: DeviceBuffer,
    /// The fused decode gate's warm-up outputs (`FusedRouting::new`), read by nothing else.
    routing_warm_up: DeviceBuffer,
}

impl Workspace {
    /// (bytes, purpose, zeroed at create) of every buffer, in field order: counters (zero
    /// between launches) and padding no kernel writes start as zeros.
    fn sizes(cfg: &MoeConfig) -> [(usize, &'static str, bool); 23] {
        let (t, e, k, h, i, l) = (
            cfg.max_tokens,
            cfg.num_experts,
            cfg.top_k,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.expert_hidden(),
        );
        let slots = t * k;
        let el = cfg.act_dtype.dense_size().unwrap_or(2);
        let latent = cfg.latent_size.is_some() as usize;
        let s = cfg.shared_intermediate_size.unwrap_or(0);
        // The tile table of the smallest row tile (the wgmma tiles' 8 tokens, else 16).
        let min_block_m =
            if cfg.act_quant == FdmoeActQuant::Fp8Mx || cfg.weight_dtype == FdmoeDtype::Fp8Block {
                QuantTile::WgmmaT8.block_m()
            } else {
                Tile::Small.block_m()
            };
        let max_tiles = slots.div_ceil(min_block_m) + e.min(slots) + 1;
        let quant = cfg.expert_input_quant();
        let fp8 = quant.is_some() as usize;
        let act_scales = |cols: usize| quant.map_or(0, |q| activation_scales_per_row(q, cols)) * 4;
        [
            (gate_logits_floats(t, h, e) * 4, "router logits", false),
            (slots * 4, "top-k ids", false),
            (slots * 4, "top-k weights", false),
            ((e + 1) * 4, "expert offsets", false),
            (slots * 4, "sorted slots", false),
            (slots * 4, "slot positions", false),
            (max_tiles * 4, "tile experts", false),
            (max_tiles * 4, "tile rows", false),
            (4, "tile count", false),
            // Quantized activations (FP8_BLOCK, FP8_MX) keep fc1's output and the expert
            // activations in f32 until they are quantized (one rounding, as in the CPU
            // reference).
            (latent * t * l * el.max(4 * fp8), "fc1 output", false),
            (latent * t * l * el, "combined latent output", false),
            (slots * i * el.max(4 * fp8), "expert activations", false),
            (slots * l * el, "expert outputs", false),
            (t * s * el, "shared-expert activations", false),
            (
                if s > 0 { t * h * 4 } else { 0 },
                "shared-expert output",
                false,
            ),
            (fp8 * t * l, "FP8 expert inputs", false),
            (
                fp8 * t * input_scales_per_row(l) * 4,
                "FP8 expert input scales",
                false,
            ),
            (fp8 * slots * i, "FP8 expert activations", false),
            (slots * act_scales(i), "FP8 expert activation scales", true),
            (
                if quant.is_some() {
                    max_tiles * (i.div_ceil(128) + 2) * 4
                } else {
                    0
                },
                "FP8 activation arrival counters",
                true,
            ),
            (ROUTING_COUNTERS * 4, "routing counters", true),
            (sort_starts_ints(slots, e) * 4, "sort block starts", true),
            (
                FusedRouting::warm_scratch_bytes(t, e, k),
                "routing warm-up scratch",
                true,
            ),
        ]
    }

    fn new(cfg: &MoeConfig) -> Result<Self> {
        let mut bufs = Self::sizes(cfg).into_iter().map(|(b, what, zeroed)| {
            if zeroed {
                DeviceBuffer::zeroed(b, what)
            } else {
                DeviceBuffer::alloc(b, what)
            }
        });
        let mut next = || bufs.next().expect("23 buffers");
        Ok(Workspace {
            logits: next()?,
            topk_ids: next()?,
            topk_weights: next()?,
            expert_offsets: next()?,
            sorted_slots: next()?,
            slot_positions: next()?,
            tile_expert: next()?,
            tile_row: next()?,
            num_tiles: next()?,
            latent_in: next()?,
            latent_out: next()?,
            act: next()?,
            y: next()?,
            shared_act: next()?,
            shared_out: next()?,
            inputs_fp8: next()?,
            inputs_fp8_scales: next()?,
            act_fp8: next()?,
            act_fp8_scales: next()?,
            act_quant_arrivals: next()?,
            routing_counters: next()?,
            sort_starts: next()?,
            routing_warm_up: next()?,
        })
    }
}

/// Device memory a CUDA backend of `cfg` allocates.
pub fn memory_requirements(cfg: &MoeConfig) -> Result<MemoryRequirements> {
    check_config(cfg)?;
    Ok(MemoryRequirements {
        device_weight_bytes: weight_bytes(cfg),
        device_workspace_bytes: Workspace::sizes(cfg).iter().map(|(b, ..)| b).sum(),
        device_graph_bytes: GraphBuffers::bytes().iter().map(|(b, _)| b).sum(),
        host_weight_bytes: 0,
        host_workspace_bytes: 0,
    })
}

pub struct CudaBackend {
    cfg: MoeConfig,
    // Field order is drop order: graphs, device memory and modules go before the context.
    graphs: Option<Graphs>,
    weights: Option<CudaWeights>,
    ws: Workspace,
    kernels: Kernels,
    ctx: Context,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl CudaBackend {
    pub fn new(cfg: &MoeConfig) -> Result<Self> {
        check_config(cfg)?;
        let ctx = Context::primary(cfg.device_ordinal)?;
        let _current = ctx.enter()?;
        let major =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        if major < 8 {
            return Err(Error::unsupported(
                format!("compute capability {major}.{minor} (needs 8.0 or newer)"),
                "cuda",
            ));
        }
        if cfg.weight_dtype == FdmoeDtype::Fp8Block && (major, minor) < (8, 9) {
            return Err(Error::unsupported(
                format!(
                    "fp8_block experts on compute capability {major}.{minor} (FP8 tensor cores need 8.9 or newer)"
                ),
                "cuda",
            ));
        }
        if cfg.act_quant == FdmoeActQuant::Fp8Mx && (major, minor) != (9, 0) {
            return Err(Error::unsupported(
                format!(
                    "act_quant fp8_mx on compute capability {major}.{minor} (its W4A8 GEMMs are FP8 wgmma, sm_90a)"
                ),
                "cuda",
            ));
        }
        let arch = if (major, minor) == (9, 0) {
            "sm_90a".to_string()
        } else {
            format!("sm_{major}{minor}")
        };
        let element = if cfg.act_dtype == FdmoeDtype::F16 {
            Element::F16
        } else {
            Element::Bf16
        };
        let kernels = Kernels::load(
            &arch,
            element,
            cfg.activation,
            cfg.num_experts,
            cfg.weight_dtype,
            cfg.expert_input_quant(),
            dependent_launch(major),
        )?;
        let ws = Workspace::new(cfg)?;
        drop(_current);
        Ok(CudaBackend {
            cfg: cfg.clone(),
            graphs: None,
            weights: None,
            ws,
            kernels,
            ctx,
        })
    }

    /// Checks every pointer of a forward call is device memory of our device, with the
    /// alignment the 16-byte loads need.
    fn check_pointers(&self, args: &ForwardArgs) -> Result<()> {
        let ord = self.cfg.device_ordinal;
        require_device(args.x, "args.x", ord)?;
        require_device(args.out as *const c_void, "args.out", ord)?;
        if (args.x as usize) % 16 != 0 || (args.out as usize) % 16 != 0 {
            return Err(Error::invalid(
                "args.x and args.out must be 16-byte aligned on backend cuda",
            ));
        }
        let optional: [(*const c_void, &str); 5] = [
            (args.router_logits.cast(), "args.router_logits"),
            (args.topk_ids.cast(), "args.topk_ids"),
            (args.topk_weights.cast(), "args.topk_weights"),
            (args.topk_ids_out as *const c_void, "args.topk_ids_out"),
            (
                args.topk_weights_out as *const c_void,
                "args.topk_weights_out",
            ),
        ];
        for (p, name) in optional {
            if !p.is_null() {
                require_device(p, name, ord)?;
            }
        }
        Ok(())
    }

    /// Enqueues the whole forward for `t` tokens. `num_tokens_dev` (0 in eager mode) lets a
    /// graph captured for a larger bucket see the true T. With an `args_block` (graph capture)
    /// the caller's pointers are not baked in: kernels read them from the block at run time,
    /// and `args` carries NULL for them.
    unsafe fn enqueue(
        &self,
        args: &ForwardArgs,
        source: RoutingSource,
        t: usize,
        num_tokens_dev: DevicePtr,
        args_block: DevicePtr,
        stream: Stream,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let w = self.weights.as_ref().expect("checked by Moe::forward");
        let ws = &self.ws;
        let k = &self.kernels;
        let (e, top_k, h, i, l) = (
            cfg.num_experts,
            cfg.top_k,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.expert_hidden(),
        );
        let x = args.x as DevicePtr;
        let out = args.out as DevicePtr;
        let record_ids = args.topk_ids_out as DevicePtr;
        let record_weights = args.topk_weights_out as DevicePtr;
        // GEMM operands that are the caller's x or out come from the block under capture.
        let via_block = |mut p: GemmParams| {
            if args_block != 0 {
                p.args_block = args_block;
                if p.a == x {
                    p.a_arg = ARG_X;
                }
                if p.c == out {
                    p.c_arg = ARG_OUT;
                }
            }
            p
        };

        // The sort's tiles: the grouped GEMMs' row tiles for this T.
        let slots = t * top_k;
        let rows_per_expert = slots.div_ceil(e.min(slots));
        let (tile, qtile) = (
            Tile::for_experts(rows_per_expert, l, k.hopper),
            k.forced_quant_tile.unwrap_or_else(|| {
                QuantTile::choose(
                    self.config().weight_dtype,
                    k.quant_family,
                    rows_per_expert,
                    slots,
                    k.hopper,
                )
            }),
        );
        let block_m = match w.experts {
            DeviceExperts::Dense { .. } => tile.block_m(),
            DeviceExperts::Quantized(_) => qtile.block_m(),
        };
        let sort = SortParams {
            topk_ids: ws.topk_ids.ptr,
            out: SortBuffers {
                expert_offsets: ws.expert_offsets.ptr,
                sorted_slots: ws.sorted_slots.ptr,
                slot_positions: ws.slot_positions.ptr,
                tile_expert: ws.tile_expert.ptr,
                tile_row: ws.tile_row.ptr,
                num_tiles: ws.num_tiles.ptr,
            },
            num_tokens_dev,
            num_tokens: t as i32,
            top_k: top_k as i32,
            num_experts: e as i32,
            block_m: block_m as i32,
        };

        // 1. Routing (for decode from the gate, the gate kernel routes and sorts itself).
        let mut sorted = false;
        match source {
            RoutingSource::Given => {
                sorted = Kernels::given_sort_applies(t);
                let g = GivenSlots {
                    ids: args.topk_ids as DevicePtr,
                    weights: args.topk_weights as DevicePtr,
                    topk_ids: ws.topk_ids.ptr,
                    topk_weights: ws.topk_weights.ptr,
                    record_ids,
                    record_weights,
                    args_block,
                };
                k.given(
                    &g,
                    num_tokens_dev,
                    t,
                    top_k,
                    sorted.then_some(&sort),
                    stream,
                )?;
            }
            RoutingSource::Logits | RoutingSource::GateWeight => {
                let (logits, logit_slices) = if source == RoutingSource::Logits {
                    (args.router_logits as DevicePtr, 1)
                } else {
                    (ws.logits.ptr, gate_slices(t, h, e))
                };
                let p = RouteParams {
                    logits,
                    logit_slices: logit_slices as i64,
                    slice_stride: (t * e) as i64,
                    tokens_per_block: 0,
                    correction_bias: w.correction_bias.as_ref().map_or(0, |b| b.ptr),
                    topk_ids: ws.topk_ids.ptr,
                    topk_weights: ws.topk_weights.ptr,
                    record_ids,
                    record_weights,
                    num_tokens_dev,
                    args_block,
                    num_tokens: t as i64,
                    num_experts: e as i64,
                    top_k: top_k as i64,
                    mode: match cfg.routing {
                        FdmoeRouting::SoftmaxTopk => 0,
                        FdmoeRouting::SigmoidTopk => 1,
                        _ => 2,
                    },
                    grouped_softmax: (cfg.scoring == FdmoeScoring::Softmax) as i64,
                    n_group: cfg.n_group.max(1) as i64,
                    topk_group: cfg.topk_group.max(1) as i64,
                    renormalize: cfg.renormalize as i64,
                    routed_scaling_factor: cfg.routed_scaling_factor,
                    pad: 0.0,
                };
                if source == RoutingSource::GateWeight {
                    let gate = w.gate_t.as_ref().expect("GateWeight implies a gate");
                    sorted = Kernels::fused_routing_applies(t, h, e);
                    let fused = sorted.then(|| {
                        FusedRouting::new(
                            p,
                            sort,
                            ws.routing_counters.ptr,
                            ws.routing_warm_up.ptr,
                            self.config().max_tokens,
                        )
                    });
                    k.gate_logits(
                        x,
                        gate.ptr,
                        ws.logits.ptr,
                        num_tokens_dev,
                        t,
                        h,
                        e,
                        args_block,
                        fused.as_ref(),
                        stream,
                    )?;
                }
                if !sorted {
                    k.route(&p, t, stream)?;
                }
            }
        }

        // 2. Latent fc1: u = x · fc1ᵀ.
        let dense_tile = Tile::for_rows(t, k.hopper);
        let dense = |a: DevicePtr, lda: usize, b: DevicePtr, kk: usize, n: usize, c: DevicePtr| {
            GemmParams {
                a,
                lda: lda as i64,
                b,
                ldb: kk as i64,
                c,
                ldc: n as i64,
                k: kk as i64,
                n: n as i64,
                num_tokens_dev,
                num_tokens: t as i64,
                ..Default::default()
            }
        };
        let tiles_dense = t.div_ceil(dense_tile.block_m());
        let fp8 = cfg.expert_input_quant().is_some();
        let inputs = match &w.fc1 {
            Some(fc1) => {
                let p = dense(x, h, fc1.ptr(), h, l, ws.latent_in.ptr);
                k.gemm(
                    dense_tile,
                    if fp8 {
                        GemmKind::DenseF32
                    } else {
                        GemmKind::Dense
                    },
                    &via_block(p),
                    tiles_dense,
                    stream,
                )?;
                ws.latent_in.ptr
            }
            None => x,
        };

        // 3. Sort slots by expert; tiles of the grouped GEMMs.
        if !sorted {
            k.sort(&sort, ws.sort_starts.ptr, stream)?;
        }
        let max_tiles = slots.div_ceil(block_m) + e.min(slots);
        let grouped = GemmParams {
            tile_expert: ws.tile_expert.ptr,
            tile_row: ws.tile_row.ptr,
            num_tiles: ws.num_tiles.ptr,
            expert_offsets: ws.expert_offsets.ptr,
            sorted_slots: ws.sorted_slots.ptr,
            top_k: top_k as i64,
            slot_weights: ws.topk_weights.ptr,
            num_tokens_dev,
            num_tokens: t as i64,
            ..Default::default()
        };
        // 4-5. GEMM 1 computes act = act(gate, up) of gathered rows · W13[e]ᵀ; GEMM 2
        // y = w_slot · act · W2[e]ᵀ, in sorted order.
        let gemm1 = GemmParams {
            a: inputs,
            lda: l as i64,
            ldb: l as i64,
            c: ws.act.ptr,
            ldc: i as i64,
            k: l as i64,
            n: i as i64,
            up_offset: i as i64,
            ..grouped
        };
        let gemm2 = GemmParams {
            a: ws.act.ptr,
            lda: i as i64,
            ldb: i as i64,
            c: ws.y.ptr,
            ldc: l as i64,
            k: i as i64,
            n: l as i64,
            ..grouped
        };
        match &w.experts {
            DeviceExperts::Dense { w13, w2 } => {
                let p = GemmParams {
                    b: w13.ptr(),
                    b_group_stride: (2 * i * l) as i64,
                    ..gemm1
                };
                let up_tile = Tile::for_up_projection(tile, slots);
                k.gemm(up_tile, GemmKind::UpGated, &via_block(p), max_tiles, stream)?;
                let p = GemmParams {
                    b: w2.ptr(),
                    b_group_stride: (l * i) as i64,
                    ..gemm2
                };
                k.gemm(tile, GemmKind::DownScaled, &via_block(p), max_tiles, stream)?;
            }
            DeviceExperts::Quantized(q) => {
                let weights = |p: GemmParams, part: &QuantizedPart| GemmParams {
                    b: part.data.ptr,
                    b_group_stride: part.data_stride as i64,
                    b_scale: part.scales.ptr,
                    b_scale_group_stride: part.scale_stride as i64,
                    b_global: part.global_ptr(),
                    b_scales_plain: part.scales_plain as i64,
                    ..p
                };
                let mut p = weights(gemm1, &q.w13);
                if fp8 {
                    let in_arg = if inputs == x { ARG_X } else { -1 };
                    k.quantize_fp8_rows(
                        inputs,
                        inputs != x,
                        ws.inputs_fp8.ptr,
                        ws.inputs_fp8_scales.ptr,
                        l,
                        num_tokens_dev,
                        t,
                        1,
                        args_block,
                        in_arg,
                        stream,
                    )?;
                    p.a = ws.inputs_fp8.ptr;
                    p.a_scale = ws.inputs_fp8_scales.ptr;
                }
                // The wgmma tiles quantize GEMM 1's activations in its epilogue.
                let fused_quant = fp8 && k.quant_family == QuantFamily::Wgmma;
                // GEMM 2 starts on each row tile once GEMM 1 has signalled it (`await_row_tile`),
                // with the counters set in both GEMMs or in neither: on W8A8 always (its GEMM 1
                // counts arrivals anyway); on W4A8, where every GEMM 1 block signals, only at the
                // 8-token tile. H100 A/B (BENCHMARKS.md, twenty-first session): W4A8 Qwen3-30B-A3B
                // T = 16 0.089 -> 0.086 ms, DeepSeek-V3 T = 16 / 64 0.797 / 1.694 -> 0.780 /
                // 1.679 at that tile, but 0.202 -> 0.208 and 2.071 -> 2.084 at T = 256 (16 tokens).
                let w8a8 = cfg.expert_input_quant() == Some(ExpertInputQuant::Fp8Block);
                let handoff = fused_quant && (w8a8 || qtile == QuantTile::WgmmaT8);
                if fused_quant {
                    p.c_fp8 = ws.act_fp8.ptr;
                    p.c_fp8_scale = ws.act_fp8_scales.ptr;
                }
                if handoff {
                    p.arrivals = ws.act_quant_arrivals.ptr;
                }
                k.qgemm(qtile, GemmKind::UpGated, &via_block(p), max_tiles, stream)?;
                let mut p = weights(gemm2, &q.w2);
                // Only FP8_BLOCK gets here (FP8_MX runs on the wgmma tiles alone), whose GEMM 2
                // inputs have the layout of GEMM 1's.
                if fp8 && !fused_quant {
                    k.quantize_fp8_rows(
                        ws.act.ptr,
                        true,
                        ws.act_fp8.ptr,
                        ws.act_fp8_scales.ptr,
                        i,
                        num_tokens_dev,
                        t,
                        top_k,
                        0,
                        -1,
                        stream,
                    )?;
                }
                if fp8 {
                    p.a = ws.act_fp8.ptr;
                    p.a_scale = ws.act_fp8_scales.ptr;
                }
                if handoff {
                    p.arrivals = ws.act_quant_arrivals.ptr;
                }
                let launched = k.qgemm(
                    qtile,
                    GemmKind::DownScaled,
                    &via_block(p),
                    max_tiles,
                    stream,
                );
                if launched.is_err() && handoff {
                    // GEMM 1's ready counts would otherwise pass the next forward's GEMM 2
                    // early; zeroed after GEMM 1 in stream order (best effort: the launch's
                    // error is the one reported).
                    // SAFETY: the caller's stream, as every launch of this forward.
                    let _ = unsafe { ws.act_quant_arrivals.zero_async(stream) };
                }
                launched?;
            }
        }

        // 6. Shared experts over the full hidden x, kept in f32 until the final rounding.
        let shared_out = match (&w.shared_w13, &w.shared_w2, cfg.shared_intermediate_size) {
            (Some(sw13), Some(sw2), Some(s)) => {
                let p = GemmParams {
                    up_offset: s as i64,
                    ..dense(x, h, sw13.ptr(), h, s, ws.shared_act.ptr)
                };
                k.gemm(
                    dense_tile,
                    GemmKind::DenseGated,
                    &via_block(p),
                    tiles_dense,
                    stream,
                )?;
                let p = dense(ws.shared_act.ptr, s, sw2.ptr(), s, h, ws.shared_out.ptr);
                k.gemm(
                    dense_tile,
                    GemmKind::DenseF32,
                    &via_block(p),
                    tiles_dense,
                    stream,
                )?;
                ws.shared_out.ptr
            }
            _ => 0,
        };

        // 7. Combine in slot order (+ fc2).
        match &w.fc2 {
            Some(fc2) => {
                k.combine(
                    ws.y.ptr,
                    ws.slot_positions.ptr,
                    0,
                    ws.latent_out.ptr,
                    num_tokens_dev,
                    t,
                    top_k,
                    l,
                    0,
                    -1,
                    stream,
                )?;
                let mut p = dense(ws.latent_out.ptr, l, fc2.ptr(), l, h, out);
                let kind = if shared_out != 0 {
                    p.residual = shared_out;
                    p.ld_residual = h as i64;
                    GemmKind::DenseResidual
                } else {
                    GemmKind::Dense
                };
                k.gemm(dense_tile, kind, &via_block(p), tiles_dense, stream)?;
            }
            None => k.combine(
                ws.y.ptr,
                ws.slot_positions.ptr,
                shared_out,
                out,
                num_tokens_dev,
                t,
                top_k,
                h,
                args_block,
                ARG_OUT,
                stream,
            )?,
        }
        Ok(())
    }
}

impl Backend for CudaBackend {
    fn kind(&self) -> FdmoeBackendKind {
        FdmoeBackendKind::Cuda
    }

    fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    fn load_weights(&mut self, src: &WeightSource) -> Result<()> {
        src.validate(&self.cfg)?;
        let _current = self.ctx.enter()?;
        // Graphs captured the old weights' pointers; free the old set first so a replacement
        // fits where the first one did.
        self.graphs = None;
        self.weights = None;
        self.weights = Some(CudaWeights::load(&self.cfg, src)?);
        Ok(())
    }

    fn has_weights(&self) -> bool {
        self.weights.is_some()
    }

    fn has_gate(&self) -> bool {
        self.weights.as_ref().is_some_and(|w| w.gate_t.is_some())
    }

    unsafe fn forward(&mut self, args: &ForwardArgs, source: RoutingSource) -> Result<()> {
        let _current = self.ctx.enter()?;
        self.check_pointers(args)?;
        let stream = args.stream as Stream;
        if let Some(graphs) = &self.graphs {
            // Inside the caller's own capture our kernels are captured directly instead.
            if !args.force_eager && graphs.source == source && !is_capturing(stream)? {
                if let Some(graph) = graphs.pick(args.num_tokens) {
                    return graphs.replay(graph, args, stream);
                }
            }
        }
        self.enqueue(args, source, args.num_tokens, 0, 0, stream)
    }

    fn capture_graphs(&mut self, token_counts: &[usize], stream: *mut c_void) -> Result<()> {
        if self.weights.is_none() {
            return Err(Error::state(
                "capture before load_weights: no weights are loaded",
            ));
        }
        let buckets = buckets(&self.cfg, token_counts)?;
        let _current = self.ctx.enter()?;
        let stream = stream as Stream;
        if !stream.is_null() && unsafe { is_capturing(stream)? } {
            return Err(Error::state("the stream is already capturing a graph; capture_prefill_graph needs a stream outside capture"));
        }
        // The legacy stream cannot capture: use one of ours, then order it before the caller's.
        let own = if stream.is_null() {
            Some(OwnedStream::new()?)
        } else {
            None
        };
        let capture_stream = own.as_ref().map_or(stream, |s| s.0);
        let source = if self.cfg.routing == FdmoeRouting::Given {
            RoutingSource::Given
        } else if self.has_gate() {
            RoutingSource::GateWeight
        } else {
            RoutingSource::Logits
        };
        self.graphs = None;
        let buffers = GraphBuffers::new()?;
        let mut graphs = Vec::with_capacity(buckets.len());
        for &bucket in &buckets {
            let args = GraphBuffers::capture_args(bucket);
            // SAFETY: the capture stream is live; the static buffers outlive the graphs.
            let graph = unsafe {
                Graphs::capture_bucket(&buffers, &self.kernels, bucket, capture_stream, || {
                    self.enqueue(
                        &args,
                        source,
                        bucket,
                        buffers.num_tokens.ptr,
                        buffers.args_block.ptr,
                        capture_stream,
                    )
                })?
            };
            graphs.push(graph);
        }
        if let Some(s) = &own {
            s.synchronize()?;
        }
        self.graphs = Some(Graphs {
            source,
            graphs,
            buffers,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FdmoeStatus;

    fn cfg(weight: FdmoeDtype, act: FdmoeDtype) -> MoeConfig {
        MoeConfig {
            backend: FdmoeBackendKind::Cuda,
            num_experts: 8,
            top_k: 2,
            hidden_size: 256,
            intermediate_size: 128,
            act_dtype: act,
            weight_dtype: weight,
            max_tokens: 64,
            ..Default::default()
        }
    }

    #[test]
    fn formats_and_activation_dtypes_the_kernels_take() {
        use FdmoeDtype::*;
        for (weight, act) in [
            (Bf16, Bf16),
            (F16, F16),
            (Fp8Block, Bf16),
            (Fp8Block, F16),
            (Mxfp4, Bf16),
            (Nvfp4, Bf16),
        ] {
            assert!(check_config(&cfg(weight, act)).is_ok(), "{weight} / {act}");
        }
        for (weight, act, says) in [
            (Mxfp4, F16, "use bfloat16 activations"),
            (Nvfp4, F16, "use bfloat16 activations"),
            (Fp8Block, F32, "use bfloat16 or float16"),
            (Bf16, F16, "they must match"),
            (F32, F32, "use bfloat16 or float16"),
        ] {
            let e = check_config(&cfg(weight, act)).unwrap_err();
            assert_eq!(e.status, FdmoeStatus::Unsupported, "{weight} / {act}");
            assert!(e.message.contains(says), "{weight} / {act}: {}", e.message);
        }
    }

    #[test]
    fn memory_query_counts_quantized_experts_and_fp8_buffers() {
        let bf16 = memory_requirements(&cfg(FdmoeDtype::Bf16, FdmoeDtype::Bf16)).unwrap();
        let fp8 = memory_requirements(&cfg(FdmoeDtype::Fp8Block, FdmoeDtype::Bf16)).unwrap();
        let mx = memory_requirements(&cfg(FdmoeDtype::Mxfp4, FdmoeDtype::Bf16)).unwrap();
        let dense_rest = 256 * 8 * 4 + 8 * 4; // gate [H, E] and bias, f32
        let experts = |r: &MemoryRequirements| r.device_weight_bytes - dense_rest;
        // 3 * I * H weights per expert: 2 bytes, 1 byte + f32 per 64 x 128, 0.5 byte + 1/32.
        assert_eq!(experts(&bf16), 8 * 3 * 128 * 256 * 2);
        assert_eq!(experts(&fp8), 8 * (3 * 128 * 256 + (4 * 2 + 4) * 4));
        assert_eq!(experts(&mx), 8 * (3 * 128 * 256 / 2 + 3 * 128 * 256 / 32));
        // FP8 adds its quantized inputs/activations and keeps the activations in f32.
        assert!(fp8.device_workspace_bytes > bf16.device_workspace_bytes);
        assert_eq!(mx.device_workspace_bytes, bf16.device_workspace_bytes);
    }

    #[test]
    fn quantized_input_workspace_holds_counters_per_row_tile() {
        let counters = |c: &MoeConfig| {
            Workspace::sizes(c)
                .into_iter()
                .find(|(_, what, _)| *what == "FP8 activation arrival counters")
                .map(|(bytes, _, zeroed)| (bytes, zeroed))
                .unwrap()
        };
        // 64 tokens x k 2 = 128 slots: 128 / 8 + 8 + 1 row tiles of the 8-token wgmma tile,
        // one counter per 128 of I = 128 each plus the ready and consumer counts, zeroed at
        // create.
        let fp8 = cfg(FdmoeDtype::Fp8Block, FdmoeDtype::Bf16);
        assert_eq!(counters(&fp8), ((128 / 8 + 8 + 1) * (1 + 2) * 4, true));
        let wide = MoeConfig {
            intermediate_size: 384,
            ..fp8
        };
        assert_eq!(counters(&wide), ((128 / 8 + 8 + 1) * (3 + 2) * 4, true));
        // W4A8 (FP8_MX inputs): only the ready and consumer counts.
        let w4a8 = MoeConfig {
            act_quant: FdmoeActQuant::Fp8Mx,
            ..cfg(FdmoeDtype::Mxfp4, FdmoeDtype::Bf16)
        };
        assert_eq!(counters(&w4a8), ((128 / 8 + 8 + 1) * (1 + 2) * 4, true));
        assert_eq!(counters(&cfg(FdmoeDtype::Mxfp4, FdmoeDtype::Bf16)).0, 0);
    }
}
