//! The compiled kernels of one backend (one device architecture, one element type) and typed
//! launch helpers: the argument structs they take are in `params`, how the gate and sort
//! launches are shaped for a T (and what workspace that needs) in `launch_shapes`.

mod launch_shapes;
mod params;

use super::compile::{
    compile, Element, COMBINE, GATE_LOGITS, GROUPED_GEMM, GROUPED_GEMM_QUANT, ROUTE_TOPK,
    SORT_BY_EXPERT,
};
use super::driver::{arg, DevicePtr, Function, Module, Stream};
use super::tiles::{gemm_name, qgemm_name, GemmKind, QuantFamily, QuantTile, Tile, GEMM_KINDS};
use crate::config::{ExpertInputQuant, FdmoeActivation, FdmoeDtype};
use crate::error::{Error, Result};
use launch_shapes::*;
pub use launch_shapes::{
    gate_logits_floats, gate_slices, sort_starts_ints, ROUTING_COUNTERS, SORT_THREADS,
};
pub use params::*;

/// Every kernel a backend launches, loaded once at create.
pub struct Kernels {
    _modules: Vec<Module>,
    /// sm_90a: the wgmma tiles are available.
    pub hopper: bool,
    /// Quantized experts: which kernels run them.
    pub quant_family: QuantFamily,
    /// `FDMOE_QUANT_TILE` (read at create; tile sweeps in benchmarks): the quantized experts'
    /// tile at every T instead of the one chosen by rows per expert.
    pub forced_quant_tile: Option<QuantTile>,
    /// The fused decode gate's warm-up slice runs, unless `FDMOE_NO_GATE_WARM_UP` is set at
    /// create (a diagnostic switch: A/B of the warm-up in one build).
    gate_warm_up: bool,
    gate_split: Function,
    gate_split_mid: Function,
    gate_fused: Function,
    gate_t16: Function,
    gate_tiled: Function,
    gate_tiled_split: Function,
    route: Function,
    given: Function,
    /// Given routing and the sort in one launch: 1024 threads, or 256 for E <= 256.
    given_sort: Function,
    given_sort_256: Function,
    set_args: Function,
    sort: Function,
    sort_count: Function,
    sort_place: Function,
    combine: Function,
    gemms: Vec<((Tile, GemmKind), Function)>,
    /// Quantized experts: the expert GEMMs of the format, and the activation quantizer.
    qgemms: Vec<((QuantTile, GemmKind), Function)>,
    quantize: Option<(ExpertInputQuant, Function)>,
    weight_format: FdmoeDtype,
}

/// f32 scales per row of `cols` channels of GEMM 1's quantized inputs: one per 128, by both
/// `quantize_fp8_rows` and `quantize_mx_fp8_rows` (which re-expresses each 128's four
/// pre-dispatch exponents at the largest).
pub fn input_scales_per_row(cols: usize) -> usize {
    cols.div_ceil(128)
}

/// f32 scales per row of `cols` channels of GEMM 2's quantized activations (GEMM 1's epilogue
/// or `quantize_fp8_rows`): one per 128 (FP8_BLOCK), or one per 32 padded to whole 128s
/// (FP8_MX).
pub fn activation_scales_per_row(quant: ExpertInputQuant, cols: usize) -> usize {
    match quant {
        ExpertInputQuant::Fp8Block => cols.div_ceil(128),
        ExpertInputQuant::Fp8Mx => cols.div_ceil(128) * 4,
    }
}

impl Kernels {
    pub fn load(
        arch: &str,
        element: Element,
        activation: FdmoeActivation,
        num_experts: usize,
        weight_format: FdmoeDtype,
        input_quant: Option<ExpertInputQuant>,
        dependent_launch: bool,
    ) -> Result<Self> {
        let load = |file| -> Result<Module> {
            Module::load(
                &compile(file, arch, element)?.image,
                file.name,
                dependent_launch,
            )
        };
        let gate = load(GATE_LOGITS)?;
        let route = load(ROUTE_TOPK)?;
        let sort = load(SORT_BY_EXPERT)?;
        let gemm = load(GROUPED_GEMM)?;
        let combine = load(COMBINE)?;
        let mut gemms = Vec::new();
        let hopper = arch == "sm_90a";
        for tile in Tile::ALL
            .into_iter()
            .filter(|t| hopper || !t.needs_hopper())
        {
            for kind in GEMM_KINDS.into_iter().filter(|&k| tile.has_kind(k)) {
                gemms.push((
                    (tile, kind),
                    gemm.function(&gemm_name(tile, kind, activation), tile.smem_bytes())?,
                ));
            }
        }
        let gate_split = gate.function("gate_logits_split", 0)?;
        let gate_split_mid = gate.function("gate_logits_split16", 0)?;
        let gate_fused = gate.function("gate_route_sort", 0)?;
        let gate_t16 = gate.function("gate_logits_t16", 0)?;
        let gate_tiled = gate.function("gate_logits_tiled", GATE_TILED_SMEM)?;
        let gate_tiled_split = gate.function("gate_logits_tiled_split", GATE_TILED_SMEM)?;
        let route_fn = route.function("route_topk", 0)?;
        let given = route.function("given_topk", 0)?;
        let set_args = route.function("set_forward_args", 0)?;
        let sort_fn =
            sort.function("sort_by_expert", sort_smem_bytes(SORT_THREADS, num_experts))?;
        let sort_count = sort.function(
            "sort_count_blocks",
            sort_smem_bytes(SORT_THREADS, num_experts),
        )?;
        let sort_place = sort.function(
            "sort_place_blocks",
            sort_smem_bytes(SORT_THREADS, num_experts),
        )?;
        let given_sort = sort.function("given_sort", sort_smem_bytes(SORT_THREADS, num_experts))?;
        let given_sort_256 = sort.function("given_sort_256", sort_smem_bytes(256, num_experts))?;
        let combine_fn = combine.function("combine_slots", 0)?;
        let mut modules = vec![gate, route, sort, gemm, combine];
        let mut qgemms = Vec::new();
        let mut quantize = None;
        let quant_family = QuantFamily::of(weight_format, input_quant, hopper);
        let forced_quant_tile = match std::env::var("FDMOE_QUANT_TILE") {
            Ok(name) if weight_format.is_quantized() => {
                let tiles = QuantTile::all(weight_format, quant_family, hopper);
                Some(*tiles.iter().find(|t| t.suffix() == name).ok_or_else(|| {
                    Error::invalid(format!(
                        "FDMOE_QUANT_TILE={name}: this backend's {weight_format:?} tiles are {:?}",
                        tiles.iter().map(|t| t.suffix()).collect::<Vec<_>>()
                    ))
                })?)
            }
            _ => None,
        };
        if weight_format.is_quantized() {
            let quant = load(GROUPED_GEMM_QUANT)?;
            for &tile in QuantTile::all(weight_format, quant_family, hopper) {
                for kind in [GemmKind::UpGated, GemmKind::DownScaled] {
                    let name = qgemm_name(weight_format, tile, kind, activation);
                    qgemms.push((
                        (tile, kind),
                        quant.function(&name, tile.smem_bytes(weight_format))?,
                    ));
                }
            }
            if let Some(q) = input_quant {
                let name = match q {
                    ExpertInputQuant::Fp8Block => "quantize_fp8_rows",
                    ExpertInputQuant::Fp8Mx => "quantize_mx_fp8_rows",
                };
                quantize = Some((q, quant.function(name, 0)?));
            }
            modules.push(quant);
        }
        Ok(Kernels {
            weight_format,
            qgemms,
            quantize,
            gate_split,
            gate_split_mid,
            gate_fused,
            gate_t16,
            gate_tiled,
            gate_tiled_split,
            route: route_fn,
            given,
            given_sort,
            given_sort_256,
            set_args,
            sort: sort_fn,
            sort_count,
            sort_place,
            combine: combine_fn,
            gemms,
            hopper,
            quant_family,
            forced_quant_tile,
            gate_warm_up: std::env::var_os("FDMOE_NO_GATE_WARM_UP").is_none(),
            _modules: modules,
        })
    }

    fn gemm_fn(&self, tile: Tile, kind: GemmKind) -> &Function {
        &self
            .gemms
            .iter()
            .find(|((t, k), _)| *t == tile && *k == kind)
            .expect("every (tile, kind) is loaded")
            .1
    }

    /// Launches a GEMM over `tiles_m` row tiles and the output columns `n_cols` (GATED: the
    /// activation columns; each tile covers half of BN there).
    ///
    /// # Safety
    /// Every pointer in `p` covers the extents the kernel reads and writes.
    pub unsafe fn gemm(
        &self,
        tile: Tile,
        kind: GemmKind,
        p: &GemmParams,
        tiles_m: usize,
        stream: Stream,
    ) -> Result<()> {
        let shape = (tile.block_n(), tile.threads(), tile.smem_bytes());
        launch_gemm(self.gemm_fn(tile, kind), kind, shape, p, tiles_m, stream)
    }

    /// Launches a quantized expert GEMM (`UpGated` or `DownScaled`) over `tiles_m` row tiles.
    ///
    /// # Safety
    /// Every pointer in `p` covers the extents the kernel reads and writes.
    pub unsafe fn qgemm(
        &self,
        tile: QuantTile,
        kind: GemmKind,
        p: &GemmParams,
        tiles_m: usize,
        stream: Stream,
    ) -> Result<()> {
        let f = &self
            .qgemms
            .iter()
            .find(|((t, k), _)| *t == tile && *k == kind)
            .expect("loaded with a quantized format")
            .1;
        let format = self.weight_format;
        let shape = (
            tile.block_n(format),
            tile.threads(),
            tile.smem_bytes(format),
        );
        launch_gemm(f, kind, shape, p, tiles_m, stream)
    }

    /// Quantized activations (the loaded `ExpertInputQuant`): rows `T * rows_per_token` of
    /// `input` ([rows, cols] elements, or f32 with `input_f32`) to E4M3 `out` and f32 `scales`
    /// [rows, `input_scales_per_row(cols)`].
    ///
    /// # Safety
    /// Pointers cover `max_rows` rows.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn quantize_fp8_rows(
        &self,
        input: DevicePtr,
        input_f32: bool,
        out: DevicePtr,
        scales: DevicePtr,
        cols: usize,
        num_tokens_dev: DevicePtr,
        num_tokens: usize,
        rows_per_token: usize,
        args_block: DevicePtr,
        in_arg: i64,
        stream: Stream,
    ) -> Result<()> {
        let (quant, kernel) = self
            .quantize
            .as_ref()
            .expect("loaded with quantized activations");
        // 128-channel groups a block: FP8_BLOCK runs a warp per group, 4 a block; FP8_MX a warp
        // per 32 channels (those past K write nothing), one group and its one scale a block.
        let groups_per_block = match quant {
            ExpertInputQuant::Fp8Block => 4,
            ExpertInputQuant::Fp8Mx => 1,
        };
        let grid = (
            (num_tokens * rows_per_token) as u32,
            cols.div_ceil(128).div_ceil(groups_per_block) as u32,
            1,
        );
        let (mut i, mut o, mut s, mut nd, mut ab) =
            (input, out, scales, num_tokens_dev, args_block);
        let mut f = input_f32 as i32;
        let (mut c, mut t, mut r, mut ia) = (
            cols as i32,
            num_tokens as i32,
            rows_per_token as i32,
            in_arg as i32,
        );
        kernel.launch(
            grid,
            128,
            0,
            stream,
            &mut [
                arg(&mut i),
                arg(&mut f),
                arg(&mut o),
                arg(&mut s),
                arg(&mut c),
                arg(&mut nd),
                arg(&mut t),
                arg(&mut r),
                arg(&mut ab),
                arg(&mut ia),
            ],
        )
    }

    /// Launches the gate GEMM. Up to GATE_TILED_SPLIT_MAX_TOKENS tokens it leaves one partial
    /// per 512 of H in `logits` (`gate_slices`; slices of `T * E` floats) for the routing to add,
    /// and at decode runs the routing and the sort itself when `fused` is given and
    /// `fused_routing_applies`.
    ///
    /// # Safety
    /// Pointers cover [T, H] x, [H, E] gate and `gate_logits_floats(T, H, E)` floats of logits;
    /// those in `fused` their documented extents for T tokens.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gate_logits(
        &self,
        x: DevicePtr,
        gate_t: DevicePtr,
        logits: DevicePtr,
        num_tokens_dev: DevicePtr,
        num_tokens: usize,
        hidden: usize,
        num_experts: usize,
        args_block: DevicePtr,
        fused: Option<&FusedRouting>,
        stream: Stream,
    ) -> Result<()> {
        let slices = gate_slices(num_tokens, hidden, num_experts);
        let tiled_split = gate_runs_tiled_split(num_tokens, num_experts);
        let tiled = tiled_split || gate_runs_tiled(num_tokens, num_experts);
        let (f, tokens_per_block, experts_per_block, threads) = if tiled {
            (
                if tiled_split {
                    &self.gate_tiled_split
                } else {
                    &self.gate_tiled
                },
                GATE_TILED_TOKENS,
                GATE_TILED_EXPERTS,
                GATE_TILED_THREADS,
            )
        } else if slices == 1 {
            (
                &self.gate_t16,
                GATE_T16_TOKENS,
                GATE_BLOCK_EXPERTS,
                GATE_THREADS,
            )
        } else if fused.is_some() {
            (
                &self.gate_fused,
                GATE_DECODE_TOKENS,
                GATE_BLOCK_EXPERTS,
                GATE_THREADS,
            )
        } else if num_tokens > GATE_SPLIT_MAX_TOKENS {
            (
                &self.gate_split_mid,
                GATE_T16_TOKENS,
                GATE_BLOCK_EXPERTS,
                GATE_THREADS,
            )
        } else {
            (
                &self.gate_split,
                GATE_DECODE_TOKENS,
                GATE_BLOCK_EXPERTS,
                GATE_THREADS,
            )
        };
        // The fused kernel's last slice of blocks warms its routing code (gate_logits.cu).
        let warm_up = fused.is_some() && self.gate_warm_up;
        let grid = (
            num_tokens.div_ceil(tokens_per_block) as u32 + warm_up as u32,
            num_experts.div_ceil(experts_per_block) as u32,
            slices as u32,
        );
        let (mut x, mut g, mut l, mut nd, mut ab) = (x, gate_t, logits, num_tokens_dev, args_block);
        let mut stride = (num_tokens * num_experts) as i64;
        let (mut t, mut h, mut e) = (num_tokens as i32, hidden as i32, num_experts as i32);
        let mut fused = fused.copied().map(|f| FusedRouting {
            route: RouteParams {
                tokens_per_block: GATE_DECODE_TOKENS as i64,
                ..f.route
            },
            warm_up: warm_up as i64,
            ..f
        });
        let mut args = [
            arg(&mut x),
            arg(&mut g),
            arg(&mut l),
            arg(&mut stride),
            arg(&mut nd),
            arg(&mut t),
            arg(&mut h),
            arg(&mut e),
            arg(&mut ab),
            std::ptr::null_mut(),
        ];
        // The fused kernel takes one argument more: the routing and sort.
        let (n_args, smem) = match &mut fused {
            Some(f) => {
                args[9] = arg(f);
                (
                    10,
                    (GATE_DECODE_TOKENS * route_scratch_bytes(&f.route))
                        .max(sort_smem_bytes(GATE_THREADS, num_experts)),
                )
            }
            None if tiled => (9, GATE_TILED_SMEM),
            None => (9, 0),
        };
        f.launch(grid, threads, smem, stream, &mut args[..n_args])
    }

    /// Whether `gate_logits` runs the routing and the sort itself for `num_tokens` tokens.
    pub fn fused_routing_applies(num_tokens: usize, hidden: usize, num_experts: usize) -> bool {
        num_tokens <= GATE_SPLIT_MAX_TOKENS
            && gate_slices(num_tokens, hidden, num_experts) > 1
            && num_experts <= FUSED_MAX_EXPERTS
    }

    /// # Safety
    /// Pointers in `p` cover their documented extents for `grid_tokens` tokens.
    pub unsafe fn route(&self, p: &RouteParams, grid_tokens: usize, stream: Stream) -> Result<()> {
        // A warp per token, as many to a block as their scratch lets fit the default 48 KiB;
        // one when the logits are partials, so that a decode token's loads spread over the block.
        let per_token = route_scratch_bytes(p);
        let tokens_per_block = if p.logit_slices > 1 {
            1
        } else {
            (48 * 1024 / per_token).clamp(1, ROUTE_THREADS as usize / 32)
        };
        let mut params = RouteParams {
            tokens_per_block: tokens_per_block as i64,
            ..*p
        };
        self.route.launch(
            (grid_tokens.div_ceil(tokens_per_block) as u32, 1, 1),
            ROUTE_THREADS,
            tokens_per_block * per_token,
            stream,
            &mut [arg(&mut params)],
        )
    }

    /// Whether `given` sorts too (one launch) for `num_tokens` tokens.
    pub fn given_sort_applies(num_tokens: usize) -> bool {
        num_tokens <= GATE_SPLIT_MAX_TOKENS
    }

    /// Copies the given routing into the workspace; with `sort` (when `given_sort_applies`),
    /// sorts it in the same launch.
    ///
    /// # Safety
    /// Pointers in `g` cover [T, k] ids and weights (records optional); those of `sort` its
    /// outputs for T * k slots.
    pub unsafe fn given(
        &self,
        g: &GivenSlots,
        num_tokens_dev: DevicePtr,
        num_tokens: usize,
        top_k: usize,
        sort: Option<&SortParams>,
        stream: Stream,
    ) -> Result<()> {
        let mut g = *g;
        if let Some(p) = sort {
            let mut p = *p;
            let e = p.num_experts as usize;
            let threads = given_sort_threads(e);
            let f = if threads == SORT_THREADS {
                &self.given_sort
            } else {
                &self.given_sort_256
            };
            return f.launch(
                (1, 1, 1),
                threads,
                sort_smem_bytes(threads, e),
                stream,
                &mut [arg(&mut g), arg(&mut p)],
            );
        }
        let slots = num_tokens * top_k;
        let blocks = slots.div_ceil(256).clamp(1, 4096) as u32;
        let (mut nd, mut t, mut k) = (num_tokens_dev, num_tokens as i32, top_k as i32);
        self.given.launch(
            (blocks, 1, 1),
            256,
            0,
            stream,
            &mut [arg(&mut g), arg(&mut nd), arg(&mut t), arg(&mut k)],
        )
    }

    /// The stable sort by expert and the GEMMs' tile table: one block, or above `SORT_CHUNK`
    /// slots a count and a place launch over a block per chunk.
    ///
    /// # Safety
    /// Pointers cover the sort outputs for `num_tokens * top_k` slots and `max_tiles` tiles,
    /// `starts` `sort_starts_ints(num_tokens * top_k, num_experts)` ints, the first zero.
    pub unsafe fn sort(&self, p: &SortParams, starts: DevicePtr, stream: Stream) -> Result<()> {
        let smem = sort_smem_bytes(SORT_THREADS, p.num_experts as usize);
        let slots = p.num_tokens as usize * p.top_k as usize;
        if slots > SORT_CHUNK {
            let grid = (slots.div_ceil(SORT_CHUNK) as u32, 1, 1);
            let (mut params, mut s) = (*p, starts);
            self.sort_count.launch(
                grid,
                SORT_THREADS,
                smem,
                stream,
                &mut [arg(&mut params), arg(&mut s)],
            )?;
            return self.sort_place.launch(
                grid,
                SORT_THREADS,
                smem,
                stream,
                &mut [arg(&mut params), arg(&mut s)],
            );
        }
        let mut p = *p;
        let o = &mut p.out;
        let (mut ids, mut nd) = (p.topk_ids, p.num_tokens_dev);
        let (mut t, mut k, mut e, mut bm) = (p.num_tokens, p.top_k, p.num_experts, p.block_m);
        self.sort.launch(
            (1, 1, 1),
            SORT_THREADS,
            smem,
            stream,
            &mut [
                arg(&mut ids),
                arg(&mut o.expert_offsets),
                arg(&mut o.sorted_slots),
                arg(&mut o.slot_positions),
                arg(&mut o.tile_expert),
                arg(&mut o.tile_row),
                arg(&mut o.num_tiles),
                arg(&mut nd),
                arg(&mut t),
                arg(&mut k),
                arg(&mut e),
                arg(&mut bm),
            ],
        )
    }

    /// # Safety
    /// Pointers cover y [T*k, n], positions [T*k], residual [T, n] (optional), out [T, n].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn combine(
        &self,
        y: DevicePtr,
        slot_positions: DevicePtr,
        residual: DevicePtr,
        out: DevicePtr,
        num_tokens_dev: DevicePtr,
        num_tokens: usize,
        top_k: usize,
        n: usize,
        args_block: DevicePtr,
        out_arg: i64,
        stream: Stream,
    ) -> Result<()> {
        let grid = (num_tokens as u32, n.div_ceil(8 * 128) as u32, 1);
        let (mut a, mut b, mut c, mut d, mut e) =
            (y, slot_positions, residual, out, num_tokens_dev);
        let (mut t, mut k, mut nn) = (num_tokens as i32, top_k as i32, n as i32);
        let (mut ab, mut oa) = (args_block, out_arg as i32);
        self.combine.launch(
            grid,
            128,
            0,
            stream,
            &mut [
                arg(&mut a),
                arg(&mut b),
                arg(&mut c),
                arg(&mut d),
                arg(&mut e),
                arg(&mut t),
                arg(&mut k),
                arg(&mut nn),
                arg(&mut ab),
                arg(&mut oa),
            ],
        )
    }

    /// Graph replay prologue: writes the call's pointers and T into the argument block.
    ///
    /// # Safety
    /// `values.args_block` holds ARG_SLOTS u64s and `values.num_tokens_dev` one int, in
    /// device memory.
    pub unsafe fn set_forward_args(
        &self,
        values: &mut ForwardArgValues,
        stream: Stream,
    ) -> Result<()> {
        self.set_args
            .launch((1, 1, 1), 1, 0, stream, &mut values.params())
    }
}

/// Launches one GEMM entry point of `(block_n, threads, shared memory bytes)` over `tiles_m`
/// row tiles and the tiles of `p.n` output columns (a gated tile covers half of its BN there:
/// gate and up columns side by side).
///
/// # Safety
/// `f` takes a `GemmParams`; every pointer in `p` covers the extents the kernel reads and writes.
unsafe fn launch_gemm(
    f: &Function,
    kind: GemmKind,
    (block_n, threads, smem): (usize, u32, usize),
    p: &GemmParams,
    tiles_m: usize,
    stream: Stream,
) -> Result<()> {
    let gated = matches!(kind, GemmKind::UpGated | GemmKind::DenseGated);
    let cols_per_tile = if gated { block_n / 2 } else { block_n };
    let tiles_n = (p.n as usize).div_ceil(cols_per_tile);
    let mut params = *p;
    // One dimension, column tiles fastest (setup_tile in kernels/common/gemm_tile.cuh).
    let blocks = u32::try_from(tiles_m * tiles_n)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| {
            Error::unsupported(
                format!("{tiles_m} x {tiles_n} GEMM tiles (more than 2^31 blocks in one grid)"),
                "cuda",
            )
        })?;
    f.launch(
        (blocks, 1, 1),
        threads,
        smem,
        stream,
        &mut [arg(&mut params)],
    )
}

/// Shared scratch of one routed token (kernels/common/routing.cuh).
fn route_scratch_bytes(p: &RouteParams) -> usize {
    (2 * p.num_experts as usize + p.n_group as usize + p.top_k as usize) * 4
}

/// Threads of the given-routing sort: 256 (`given_sort_256`) while one per expert suffices.
fn given_sort_threads(num_experts: usize) -> u32 {
    if num_experts <= FUSED_MAX_EXPERTS {
        GATE_THREADS
    } else {
        SORT_THREADS
    }
}

/// The sort's per-warp counts on `threads` threads (kernels/common/sort.cuh).
fn sort_smem_bytes(threads: u32, num_experts: usize) -> usize {
    (threads / 32) as usize * num_experts * 4
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::compile::{define_values, kernel_source};

    /// The host's copies of the kernels' launch constants (block shapes, slots, rounds).
    #[test]
    fn launch_constants_are_the_kernels() {
        let one = |source: &str, name: &str| define_values(source, name)[0];
        let types = kernel_source("common/types.cuh");
        assert_eq!(one(types, "ARG_X"), ARG_X as usize);
        assert_eq!(one(types, "ARG_OUT"), ARG_OUT as usize);
        assert_eq!(one(types, "ARG_SLOTS"), ARG_SLOTS);
        let sort = kernel_source("sort_by_expert.cu");
        assert_eq!(one(sort, "SORT_CHUNK"), SORT_CHUNK);
        assert_eq!(one(sort, "SORT_THREADS"), SORT_THREADS as usize);
        let gate = kernel_source("gate_logits.cu");
        let (warps, chunk) = (one(gate, "GATE_WARPS"), one(gate, "GATE_CHUNK"));
        assert_eq!(warps * chunk, GATE_ROUND);
        assert_eq!(warps * 32, GATE_THREADS as usize);
        assert_eq!(one(gate, "TILED_TOKENS"), GATE_TILED_TOKENS);
        assert_eq!(one(gate, "TILED_EXPERTS"), GATE_TILED_EXPERTS);
    }

    #[test]
    fn decode_gate_leaves_one_partial_per_512_of_hidden() {
        assert_eq!(gate_slices(1, 1288, 72), 3);
        assert_eq!(gate_slices(64, 1288, 72), 3);
        assert_eq!(gate_slices(1, 512, 72), 1);
        assert_eq!(gate_slices(1, 7168, 256), 14);
        // Mid-size batches split while the 16-token grid has fewer than 256 blocks.
        assert_eq!(gate_slices(256, 2048, 128), 4, "Qwen3 T = 256: 64 blocks");
        assert_eq!(gate_slices(512, 2048, 128), 4, "32 x 4 blocks");
        assert_eq!(gate_slices(1008, 2048, 128), 4, "63 x 4 blocks");
        assert_eq!(
            gate_slices(1024, 2048, 128),
            4,
            "64 x 4 blocks: tiled, split"
        );
        assert_eq!(gate_slices(4096, 2048, 128), 4, "tiled, split");
        assert_eq!(gate_slices(4097, 2048, 128), 1, "tiled, one pass");
        assert_eq!(gate_slices(1024, 4096, 8), 8, "Mixtral T = 1024: 64 blocks");
        assert_eq!(
            gate_slices(1025, 4096, 8),
            1,
            "past the 16-token partials' bound"
        );
        assert_eq!(
            gate_slices(256, 7168, 256),
            14,
            "DeepSeek-V3 T = 256: 128 blocks"
        );
        assert_eq!(
            gate_slices(512, 7168, 256),
            14,
            "DeepSeek-V3 T = 512: tiled, split"
        );
        assert!(
            !Kernels::fused_routing_applies(65, 2048, 128),
            "fused routing: T <= 64"
        );
        // At most one of the split, tiled split and one-pass tiled gates applies.
        for e in [8, 32, 72, 128, 256, 512] {
            for t in 1..=9000 {
                let runs = [
                    gate_runs_split(t, e),
                    gate_runs_tiled_split(t, e),
                    gate_runs_tiled(t, e),
                ];
                assert!(runs.iter().filter(|&&r| r).count() <= 1, "T = {t}, E = {e}");
            }
        }
    }

    #[test]
    fn warm_up_outputs_are_disjoint_and_inside_their_scratch() {
        const BASE: DevicePtr = 0x7000_0000;
        for (max_tokens, e, k) in [(1, 128, 8), (3, 72, 6), (64, 256, 8), (5000, 8, 2)] {
            let route = RouteParams {
                logits: 0x100,
                num_experts: e as i64,
                top_k: k as i64,
                record_ids: 0x200,
                record_weights: 0x300,
                args_block: 0x400,
                ..RouteParams::default()
            };
            let sort = SortParams {
                topk_ids: 0x500,
                out: SortBuffers {
                    expert_offsets: 0x600,
                    sorted_slots: 0x700,
                    slot_positions: 0x800,
                    tile_expert: 0x900,
                    tile_row: 0xa00,
                    num_tiles: 0xb00,
                },
                num_tokens_dev: 0xc00,
                num_tokens: 1,
                top_k: k as i32,
                num_experts: e as i32,
                block_m: 16,
            };
            let f = FusedRouting::new(route, sort, 0xd00, BASE, max_tokens);
            let bytes = FusedRouting::warm_scratch_bytes(max_tokens, e, k) as DevicePtr;
            // What the routing and the sort write for T <= min(max_tokens, 64) tokens: ints.
            let slots = max_tokens.min(64) * k;
            let (w, o) = (&f.warm_route, &f.warm_sort.out);
            let mut spans = [
                (w.topk_ids, slots),
                (w.topk_weights, slots),
                (o.expert_offsets, e + 1),
                (o.sorted_slots, slots),
                (o.slot_positions, slots),
                (o.tile_expert, slots + e),
                (o.tile_row, slots + e),
                (o.num_tiles, 1),
            ];
            spans.sort();
            let mut end = BASE;
            for (start, ints) in spans {
                assert!(
                    start >= end,
                    "max {max_tokens}, E = {e}: overlapping outputs"
                );
                end = start + 4 * ints as DevicePtr;
            }
            assert!(
                end <= BASE + bytes,
                "max {max_tokens}, E = {e}: past the scratch"
            );
            assert_eq!(
                f.warm_sort.topk_ids, w.topk_ids,
                "the sort reads the warm ids"
            );
            assert_eq!((w.record_ids, w.record_weights, w.args_block), (0, 0, 0));
            assert_eq!((w.logits, f.warm_sort.num_tokens_dev), (0x100, 0xc00));
            assert_eq!((f.route.topk_ids, f.sort.out.num_tiles), (0, 0xb00));
            assert_eq!(f.warm_up, 1);
        }
    }

    #[test]
    fn logits_workspace_holds_the_partials_of_every_token_count() {
        for max_tokens in [1, 3, 40, 64, 65, 100, 300, 1500, 5000] {
            for hidden in [8, 512, 520, 1288, 7168] {
                for e in [8, 72, 256] {
                    let floats = gate_logits_floats(max_tokens, hidden, e);
                    for t in 1..=max_tokens {
                        assert!(
                            t * e * gate_slices(t, hidden, e) <= floats,
                            "T = {t} of max {max_tokens}, H = {hidden}, E = {e}: {floats} floats"
                        );
                    }
                }
            }
        }
        // E = 24: 16-token grids of a block per 16 tokens would split up to T = 4080; the
        // 16-token partials' bound stops them at 1024. E = 72 splits tiled up to 4096.
        assert_eq!(gate_logits_floats(100, 1288, 24), 100 * 3 * 24);
        assert_eq!(gate_logits_floats(1500, 1288, 24), 1024 * 3 * 24);
        assert_eq!(gate_logits_floats(1500, 1288, 72), 1500 * 3 * 72);
        assert_eq!(gate_logits_floats(5000, 1288, 72), 4096 * 3 * 72);
        assert_eq!(gate_logits_floats(1500, 512, 72), 1500 * 72);
    }

    #[test]
    fn routing_is_fused_into_the_decode_gate_up_to_256_experts() {
        assert!(Kernels::fused_routing_applies(1, 2048, 128));
        assert!(Kernels::fused_routing_applies(64, 7168, 256));
        assert!(!Kernels::fused_routing_applies(64, 7168, 257));
        assert!(!Kernels::fused_routing_applies(65, 7168, 256));
        assert!(
            !Kernels::fused_routing_applies(1, 512, 8),
            "one round: no partials"
        );
    }

    #[test]
    fn multi_block_sort_keeps_a_start_per_block_and_expert() {
        assert_eq!(sort_starts_ints(2048, 128), 1 + 128);
        assert_eq!(sort_starts_ints(2049, 128), 1 + 2 * 128);
        assert_eq!(sort_starts_ints(16384 * 8, 256), 1 + 64 * 256);
    }

    #[test]
    fn prefill_gate_runs_tiled_from_32_experts() {
        assert!(
            !gate_runs_tiled_split(64, 4096),
            "decode splits H in its own kernel"
        );
        assert!(gate_runs_tiled_split(1024, 128), "Qwen3 T = 1024");
        assert!(gate_runs_tiled_split(2048, 256), "DeepSeek-V3 T = 2048");
        assert!(!gate_runs_tiled_split(4097, 256) && gate_runs_tiled(4097, 256));
        assert!(
            !gate_runs_tiled_split(1100, 24) && !gate_runs_tiled(16384, 24),
            "24 experts of a 64-wide tile: the 16-token gate"
        );
        // Past the split's bound a grid under one block per SM keeps the 16-token gate.
        assert!(!gate_runs_tiled(8128, 40) && gate_runs_tiled(8129, 40));
    }

    #[test]
    fn given_routing_sorts_in_its_copy_launch_at_decode() {
        assert!(Kernels::given_sort_applies(1));
        assert!(Kernels::given_sort_applies(64));
        assert!(
            !Kernels::given_sort_applies(65),
            "prefill copies with a grid, then sorts"
        );
        // One sort thread per expert: 256 up to 256 experts, the 1024-thread sort above.
        assert_eq!(given_sort_threads(128), 256);
        assert_eq!(given_sort_threads(256), 256);
        assert_eq!(given_sort_threads(257), SORT_THREADS);
        assert_eq!(sort_smem_bytes(256, 128), 8 * 128 * 4);
    }
}
