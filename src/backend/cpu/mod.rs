//! The CPU backend: the reference every GPU path is checked against, and a usable engine in
//! its own right (multi-threaded, cache-blocked GEMMs through the `gemm` crate). It computes
//! SPEC §3 in f32 from the given inputs and rounds the output once.
//!
//! Quantized experts (SPEC §5) run on weights dequantized exactly at load (`weights`). With
//! FP8_BLOCK the inputs of both expert GEMMs are also quantized per token per 128 channels to
//! E4M3 and dequantized before the GEMM (the rows of u for GEMM 1, once per token, which is the
//! same as per gathered row; the activation rows for GEMM 2, in the expert stage), so each GEMM
//! computes what the FP8 GEMM computes with f32 accumulation.

mod experts;
pub(crate) mod linear;
pub(crate) mod weights;

use std::sync::Arc;

use parking_lot::Mutex;
use rayon::prelude::*;

use self::experts::{combine, ExpertSort, ExpertStage, ExpertTask, TaskScratch, ROWS_PER_TASK};
use self::weights::CpuWeights;
use super::{Backend, MemoryRequirements};
use crate::activation::apply_gated;
use crate::config::{ExpertInputQuant, FdmoeBackendKind, FdmoeDtype, MoeConfig};
use crate::dtype::{load_f32, store_f32};
use crate::error::{Error, FdmoeStatus, Result};
use crate::forward::{ForwardArgs, RoutingSource};
use crate::quant::{fake_pre_dispatch_row, fake_quantize_fp8_activation_row};
use crate::routing::RoutingParams;
use crate::weights::WeightSource;

/// Buffers of one forward, sized by max_tokens at create.
struct Workspace {
    /// x as f32 when act_dtype is not f32, [T, H].
    x_f32: Vec<f32>,
    /// [T, E]
    logits: Vec<f32>,
    /// [T, k]
    topk_ids: Vec<i32>,
    topk_weights: Vec<f32>,
    /// Per routing thread: scores, biased scores, group scores.
    routing_scratch: Vec<Mutex<Vec<f32>>>,
    /// fc1 output [T, L] (latent only).
    latent_in: Vec<f32>,
    /// The experts' input rows [T, L] after the FP8 round trip (FP8_BLOCK only).
    fp8_inputs: Vec<f32>,
    sort: ExpertSort,
    tasks: Vec<ExpertTask>,
    task_scratch: Vec<Mutex<TaskScratch>>,
    /// [T·k, L] expert outputs in sorted order.
    y_sorted: Vec<f32>,
    /// Combined expert output [T, L] (latent only; otherwise combined straight into `out_f32`).
    latent_out: Vec<f32>,
    /// [T, H]
    out_f32: Vec<f32>,
    /// Shared experts: gate and up [T, S].
    shared_gate: Vec<f32>,
    shared_up: Vec<f32>,
}

/// The rounding the routed-expert GEMMs apply to each input row (SPEC §5's FP8_BLOCK
/// activations, or `act_quant = FP8_MX`'s pre-dispatch format), as an in-place f32 round trip.
fn activation_round_trip(cfg: &MoeConfig) -> Option<fn(&mut [f32])> {
    cfg.expert_input_quant().map(|q| match q {
        ExpertInputQuant::Fp8Block => fake_quantize_fp8_activation_row as fn(&mut [f32]),
        ExpertInputQuant::Fp8Mx => fake_pre_dispatch_row,
    })
}

impl Workspace {
    fn sizes(cfg: &MoeConfig) -> [(usize, usize); 11] {
        let (t, e, h, k, l) = (
            cfg.max_tokens,
            cfg.num_experts,
            cfg.hidden_size,
            cfg.top_k,
            cfg.expert_hidden(),
        );
        let latent = cfg.latent_size.is_some() as usize;
        let s = cfg.shared_intermediate_size.unwrap_or(0);
        let x = (cfg.act_dtype != FdmoeDtype::F32) as usize;
        let fp8 = activation_round_trip(cfg).is_some() as usize;
        // (elements, bytes per element)
        [
            (x * t * h, 4),
            (t * e, 4),
            (t * k, 4),
            (t * k, 4),
            (latent * t * l, 4),
            (t * k * l, 4),
            (latent * t * l, 4),
            (t * h, 4),
            (2 * t * s, 4),
            (2 * t * k + 3 * e, 8),
            (fp8 * t * l, 4),
        ]
    }

    fn bytes(cfg: &MoeConfig, threads: usize) -> usize {
        let buffers: usize = Self::sizes(cfg).iter().map(|(n, b)| n * b).sum();
        let per_thread = TaskScratch::bytes(cfg.expert_hidden(), cfg.intermediate_size)
            + RoutingParams::from_config(cfg).scratch_len() * 4;
        buffers + threads * per_thread
    }

    fn new(cfg: &MoeConfig, threads: usize) -> Self {
        let [x, logits, ids, w, lin, y, lout, out, shared, _, fp8] = Self::sizes(cfg);
        let max_slots = cfg.max_tokens * cfg.top_k;
        let max_tasks = cfg.num_experts + max_slots / ROWS_PER_TASK + 1;
        let scratch = RoutingParams::from_config(cfg).scratch_len();
        Workspace {
            x_f32: vec![0.0; x.0],
            logits: vec![0.0; logits.0],
            topk_ids: vec![0; ids.0],
            topk_weights: vec![0.0; w.0],
            routing_scratch: (0..threads)
                .map(|_| Mutex::new(vec![0.0; scratch]))
                .collect(),
            latent_in: vec![0.0; lin.0],
            fp8_inputs: vec![0.0; fp8.0],
            sort: ExpertSort::with_capacity(cfg.num_experts, max_slots),
            tasks: Vec::with_capacity(max_tasks),
            task_scratch: (0..threads)
                .map(|_| Mutex::new(TaskScratch::new(cfg.expert_hidden(), cfg.intermediate_size)))
                .collect(),
            y_sorted: vec![0.0; y.0],
            latent_out: vec![0.0; lout.0],
            out_f32: vec![0.0; out.0],
            shared_gate: vec![0.0; shared.0 / 2],
            shared_up: vec![0.0; shared.0 / 2],
        }
    }
}

pub struct CpuBackend {
    cfg: MoeConfig,
    routing: RoutingParams,
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    weights: Option<CpuWeights>,
    ws: Workspace,
}

fn thread_count(cfg: &MoeConfig) -> usize {
    if cfg.num_threads > 0 {
        cfg.num_threads
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

/// Checks the parts of a config this backend cannot take (create and the memory query).
pub fn check_config(cfg: &MoeConfig) -> Result<()> {
    if cfg.ep_size > 1 {
        return Err(Error::unsupported(
            "expert parallelism (config.ep_size > 1)",
            "cpu",
        ));
    }
    if cfg.device_ordinal != 0 {
        return Err(Error::invalid(format!(
            "config.device_ordinal = {} applies to the cuda backend; it must be 0 on backend cpu",
            cfg.device_ordinal
        )));
    }
    Ok(())
}

/// What a CPU backend of this config allocates (host memory; nothing on a device).
pub fn memory_requirements(cfg: &MoeConfig) -> Result<MemoryRequirements> {
    check_config(cfg)?;
    let (e, h, i, l) = (
        cfg.num_experts,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.expert_hidden(),
    );
    let mut weights = e * 3 * i * l + e * h + e;
    if let Some(latent) = cfg.latent_size {
        weights += 2 * latent * h;
    }
    if let Some(s) = cfg.shared_intermediate_size {
        weights += 3 * s * h;
    }
    Ok(MemoryRequirements {
        device_weight_bytes: 0,
        device_workspace_bytes: 0,
        device_graph_bytes: 0,
        host_weight_bytes: weights * 4,
        host_workspace_bytes: Workspace::bytes(cfg, thread_count(cfg)),
    })
}

impl CpuBackend {
    pub fn new(cfg: &MoeConfig) -> Result<Self> {
        check_config(cfg)?;
        let threads = thread_count(cfg);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("fdmoe-cpu-{i}"))
            .build()
            .map_err(|e| {
                Error::new(
                    FdmoeStatus::Internal,
                    format!("cannot start {threads} CPU threads: {e}"),
                )
            })?;
        Ok(CpuBackend {
            routing: RoutingParams::from_config(cfg),
            cfg: cfg.clone(),
            pool: Arc::new(pool),
            threads,
            weights: None,
            ws: Workspace::new(cfg, threads),
        })
    }

    fn route(
        &mut self,
        args: &ForwardArgs,
        source: RoutingSource,
        x: &[f32],
        t: usize,
    ) -> Result<()> {
        let (e, k, h) = (self.cfg.num_experts, self.cfg.top_k, self.cfg.hidden_size);
        let w = self.weights.as_ref().expect("checked by caller");
        let ids = &mut self.ws.topk_ids[..t * k];
        let weights = &mut self.ws.topk_weights[..t * k];
        match source {
            RoutingSource::Given => {
                // SAFETY: the caller promises [T, k] ids and weights.
                let (given_ids, given_w) = unsafe {
                    (
                        std::slice::from_raw_parts(args.topk_ids, t * k),
                        std::slice::from_raw_parts(args.topk_weights, t * k),
                    )
                };
                if let Some((slot, &id)) = given_ids
                    .iter()
                    .enumerate()
                    .find(|(_, &id)| id < 0 || id as usize >= e)
                {
                    return Err(Error::invalid(format!(
                        "args.topk_ids[token {}, slot {}] = {id} is outside [0, num_experts = {e})",
                        slot / k,
                        slot % k
                    )));
                }
                ids.copy_from_slice(given_ids);
                weights.copy_from_slice(given_w);
                return Ok(());
            }
            RoutingSource::Logits => {}
            RoutingSource::GateWeight => {
                let gate = w.gate.expect("RoutingSource::GateWeight implies a gate");
                // SAFETY: x has T·H values, logits T·E.
                unsafe {
                    gate.apply(
                        t,
                        x.as_ptr(),
                        h,
                        self.ws.logits.as_mut_ptr(),
                        e,
                        false,
                        self.threads,
                    )
                };
            }
        }
        let logits: &[f32] = match source {
            // SAFETY: the caller promises [T, E] f32 logits.
            RoutingSource::Logits => unsafe {
                std::slice::from_raw_parts(args.router_logits, t * e)
            },
            _ => &self.ws.logits[..t * e],
        };
        let params = &self.routing;
        let bias = w.correction_bias.as_deref();
        let scratch = &self.ws.routing_scratch;
        ids.par_chunks_mut(k)
            .zip(weights.par_chunks_mut(k))
            .enumerate()
            .for_each(|(tok, (ids, wts))| {
                let slot = rayon::current_thread_index().unwrap_or(0) % scratch.len();
                let mut s = scratch[slot].lock();
                params.route_token(&logits[tok * e..(tok + 1) * e], bias, &mut s, ids, wts);
            });
        Ok(())
    }

    fn forward_tokens(&mut self, args: &ForwardArgs, source: RoutingSource) -> Result<()> {
        let cfg = self.cfg.clone();
        let (t, h, k, l, i) = (
            args.num_tokens,
            cfg.hidden_size,
            cfg.top_k,
            cfg.expert_hidden(),
            cfg.intermediate_size,
        );
        let threads = self.threads;
        // x as f32: borrowed in place when it already is.
        let x: &[f32] = if cfg.act_dtype == FdmoeDtype::F32 {
            // SAFETY: the caller promises [T, H] f32.
            unsafe { std::slice::from_raw_parts(args.x as *const f32, t * h) }
        } else {
            // SAFETY: the caller promises [T, H] of act_dtype.
            unsafe {
                load_f32(
                    cfg.act_dtype,
                    args.x as *const u8,
                    &mut self.ws.x_f32[..t * h],
                )
            };
            &self.ws.x_f32[..t * h]
        };
        // Lifetimes: x may borrow ws.x_f32, which `route` does not touch.
        let x: &[f32] = unsafe { std::slice::from_raw_parts(x.as_ptr(), x.len()) };
        self.route(args, source, x, t)?;
        let ws = &mut self.ws;
        let w = self.weights.as_ref().expect("checked by caller");
        // SAFETY (all raw writes below): the optional record buffers hold [T, k] values.
        if !args.topk_ids_out.is_null() {
            unsafe { std::slice::from_raw_parts_mut(args.topk_ids_out, t * k) }
                .copy_from_slice(&ws.topk_ids[..t * k]);
        }
        if !args.topk_weights_out.is_null() {
            unsafe { std::slice::from_raw_parts_mut(args.topk_weights_out, t * k) }
                .copy_from_slice(&ws.topk_weights[..t * k]);
        }
        let inputs: &[f32] = match w.fc1 {
            Some(fc1) => {
                unsafe {
                    fc1.apply(
                        t,
                        x.as_ptr(),
                        h,
                        ws.latent_in.as_mut_ptr(),
                        l,
                        false,
                        threads,
                    )
                };
                &ws.latent_in[..t * l]
            }
            None => x,
        };
        let round_trip = activation_round_trip(&cfg);
        let inputs: &[f32] = match round_trip {
            Some(transform) => {
                let q = &mut ws.fp8_inputs[..t * l];
                q.copy_from_slice(inputs);
                q.par_chunks_mut(l).for_each(transform);
                q
            }
            None => inputs,
        };
        ws.sort.sort(&ws.topk_ids[..t * k]);
        let stage = ExpertStage {
            experts: &w.experts,
            activation: cfg.activation,
            top_k: k,
            expert_hidden: l,
            intermediate: i,
            threads,
            row_transform: round_trip,
        };
        stage.plan(&ws.sort, &mut ws.tasks);
        stage.run(
            &ws.sort,
            &ws.tasks,
            inputs,
            &mut ws.y_sorted[..t * k * l],
            &ws.task_scratch,
        );
        let out = &mut ws.out_f32[..t * h];
        match w.fc2 {
            Some(fc2) => {
                let z = &mut ws.latent_out[..t * l];
                combine(&ws.sort, &ws.topk_weights, &ws.y_sorted, k, l, z);
                unsafe { fc2.apply(t, z.as_ptr(), l, out.as_mut_ptr(), h, false, threads) };
            }
            None => combine(&ws.sort, &ws.topk_weights, &ws.y_sorted, k, h, out),
        }
        if let Some(shared) = &w.shared {
            let s = shared.gate.out_features;
            let (g, u) = (&mut ws.shared_gate[..t * s], &mut ws.shared_up[..t * s]);
            unsafe {
                shared
                    .gate
                    .apply(t, x.as_ptr(), h, g.as_mut_ptr(), s, false, threads);
                shared
                    .up
                    .apply(t, x.as_ptr(), h, u.as_mut_ptr(), s, false, threads);
            }
            g.par_chunks_mut(s)
                .zip(u.par_chunks(s))
                .for_each(|(g, u)| apply_gated(cfg.activation, g, u));
            unsafe {
                shared
                    .down
                    .apply(t, g.as_ptr(), s, out.as_mut_ptr(), h, true, threads)
            };
        }
        // SAFETY: the caller promises [T, H] of act_dtype at out.
        unsafe { store_f32(cfg.act_dtype, out, args.out as *mut u8) };
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn kind(&self) -> FdmoeBackendKind {
        FdmoeBackendKind::Cpu
    }

    fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    fn load_weights(&mut self, src: &WeightSource) -> Result<()> {
        src.validate(&self.cfg)?;
        self.weights = Some(CpuWeights::load(&self.cfg, src)?);
        Ok(())
    }

    fn has_weights(&self) -> bool {
        self.weights.is_some()
    }

    fn has_gate(&self) -> bool {
        self.weights.as_ref().is_some_and(|w| w.gate.is_some())
    }

    unsafe fn forward(&mut self, args: &ForwardArgs, source: RoutingSource) -> Result<()> {
        if !args.stream.is_null() {
            return Err(Error::invalid(
                "args.stream must be NULL on backend cpu (streams belong to the cuda backend)",
            ));
        }
        let pool = Arc::clone(&self.pool);
        pool.install(|| self.forward_tokens(args, source))
    }

    fn capture_graphs(
        &mut self,
        _token_counts: &[usize],
        _stream: *mut std::ffi::c_void,
    ) -> Result<()> {
        Err(Error::unsupported(
            "CUDA graph capture (graphs need the cuda backend)",
            "cpu",
        ))
    }
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("cfg", &self.cfg)
            .field("threads", &self.threads)
            .finish()
    }
}
