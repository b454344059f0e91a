//! The launch argument structs, each mirroring a `struct` of `kernels/` field for field (the
//! kernels take them by value), and the forward argument block's slots.

use super::launch_shapes::GATE_SPLIT_MAX_TOKENS;
use crate::backend::cuda::driver::{arg, DevicePtr};

/// Mirrors `GemmParams` in kernels/common/gemm_tile.cuh.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GemmParams {
    pub a: DevicePtr,
    pub lda: i64,
    pub b: DevicePtr,
    pub ldb: i64,
    pub b_group_stride: i64,
    pub c: DevicePtr,
    pub ldc: i64,
    pub residual: DevicePtr,
    pub ld_residual: i64,
    pub k: i64,
    pub n: i64,
    pub up_offset: i64,
    pub tile_expert: DevicePtr,
    pub tile_row: DevicePtr,
    pub num_tiles: DevicePtr,
    pub expert_offsets: DevicePtr,
    pub sorted_slots: DevicePtr,
    pub top_k: i64,
    pub slot_weights: DevicePtr,
    pub num_tokens_dev: DevicePtr,
    pub num_tokens: i64,
    /// Graph replay: the forward argument block; `a_arg`/`c_arg` (slots, -1 = none) name the
    /// operands read from it instead of `a`/`c`.
    pub args_block: DevicePtr,
    pub a_arg: i64,
    pub c_arg: i64,
    /// Quantized GEMMs (a, b and strides in bytes there): FP8_BLOCK activation scales, the
    /// weights' scales and their per-expert stride, NVFP4 global scales; FP4: 1 when every
    /// scale byte is plain (`QuantizedPart::scales_plain`).
    pub a_scale: DevicePtr,
    pub b_scale: DevicePtr,
    pub b_scale_group_stride: i64,
    pub b_global: DevicePtr,
    pub b_scales_plain: i64,
    /// The wgmma bodies' GEMM 1: its output quantized as GEMM 2 takes it (E4M3 and scales).
    /// Both GEMMs, or neither: the per-row-tile counters (`act_quant_arrivals`, zero between
    /// launches) of FP8_BLOCK's group arrivals and of the handoff to GEMM 2.
    pub c_fp8: DevicePtr,
    pub c_fp8_scale: DevicePtr,
    pub arrivals: DevicePtr,
}

impl Default for GemmParams {
    fn default() -> Self {
        GemmParams {
            a: 0,
            lda: 0,
            b: 0,
            ldb: 0,
            b_group_stride: 0,
            c: 0,
            ldc: 0,
            residual: 0,
            ld_residual: 0,
            k: 0,
            n: 0,
            up_offset: 0,
            tile_expert: 0,
            tile_row: 0,
            num_tiles: 0,
            expert_offsets: 0,
            sorted_slots: 0,
            top_k: 0,
            slot_weights: 0,
            num_tokens_dev: 0,
            num_tokens: 0,
            args_block: 0,
            a_arg: -1,
            c_arg: -1,
            a_scale: 0,
            b_scale: 0,
            b_scale_group_stride: 0,
            b_global: 0,
            b_scales_plain: 0,
            c_fp8: 0,
            c_fp8_scale: 0,
            arrivals: 0,
        }
    }
}

/// Slots of the forward argument block (ARG_* in kernels/common/types.cuh).
pub const ARG_X: i64 = 0;
pub const ARG_OUT: i64 = 1;
pub const ARG_SLOTS: usize = 7;

/// Mirrors `RouteParams` in kernels/common/routing.cuh.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteParams {
    pub logits: DevicePtr,
    /// `logits` holds this many slices `slice_stride` floats apart, added in order (the gate's
    /// decode round partials); 1 for the logits themselves.
    pub logit_slices: i64,
    pub slice_stride: i64,
    /// Set by `Kernels::route`.
    pub tokens_per_block: i64,
    pub correction_bias: DevicePtr,
    pub topk_ids: DevicePtr,
    pub topk_weights: DevicePtr,
    pub record_ids: DevicePtr,
    pub record_weights: DevicePtr,
    pub num_tokens_dev: DevicePtr,
    pub args_block: DevicePtr,
    pub num_tokens: i64,
    pub num_experts: i64,
    pub top_k: i64,
    pub mode: i64,
    pub grouped_softmax: i64,
    pub n_group: i64,
    pub topk_group: i64,
    pub renormalize: i64,
    pub routed_scaling_factor: f32,
    pub pad: f32,
}

/// Mirrors `SortParams` in kernels/common/sort.cuh.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SortParams {
    pub topk_ids: DevicePtr,
    pub out: SortBuffers,
    pub num_tokens_dev: DevicePtr,
    pub num_tokens: i32,
    pub top_k: i32,
    pub num_experts: i32,
    pub block_m: i32,
}

/// Mirrors `FusedRouting` in kernels/gate_logits.cu: the routing and sort that the decode gate
/// kernel runs itself, its counters (`ROUTING_COUNTERS` ints, zero between launches), and the
/// same routing and sort over scratch outputs, which its warm-up blocks run so that the code
/// is in L2 when the routing block needs it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FusedRouting {
    pub route: RouteParams,
    pub sort: SortParams,
    pub counters: DevicePtr,
    pub warm_route: RouteParams,
    pub warm_sort: SortParams,
    pub warm_up: i64,
}

impl FusedRouting {
    /// Ints of each warm-up output for up to `max_tokens` tokens, in scratch order: ids,
    /// weights, expert offsets, sorted slots, slot positions, the two tile tables, the tile count.
    fn warm_scratch_ints(max_tokens: usize, num_experts: usize, top_k: usize) -> [usize; 8] {
        let (slots, e) = (max_tokens.min(GATE_SPLIT_MAX_TOKENS) * top_k, num_experts);
        [slots, slots, e + 1, slots, slots, slots + e, slots + e, 1]
    }

    /// Bytes of the warm-up blocks' scratch outputs for up to `max_tokens` tokens.
    pub fn warm_scratch_bytes(max_tokens: usize, num_experts: usize, top_k: usize) -> usize {
        Self::warm_scratch_ints(max_tokens, num_experts, top_k)
            .iter()
            .sum::<usize>()
            * 4
    }

    /// `route` and `sort` with their warm-up copies writing into `scratch`
    /// (`warm_scratch_bytes(max_tokens, ..)` bytes): no routing record, no argument block.
    pub fn new(
        route: RouteParams,
        sort: SortParams,
        counters: DevicePtr,
        scratch: DevicePtr,
        max_tokens: usize,
    ) -> Self {
        let ints =
            Self::warm_scratch_ints(max_tokens, route.num_experts as usize, route.top_k as usize);
        let mut at = [scratch; 8];
        for i in 1..8 {
            at[i] = at[i - 1] + (ints[i - 1] * 4) as DevicePtr;
        }
        let [ids, weights, expert_offsets, sorted_slots, slot_positions, tile_expert, tile_row, num_tiles] =
            at;
        let warm_sort = SortParams {
            topk_ids: ids,
            out: SortBuffers {
                expert_offsets,
                sorted_slots,
                slot_positions,
                tile_expert,
                tile_row,
                num_tiles,
            },
            ..sort
        };
        FusedRouting {
            route,
            sort,
            counters,
            warm_route: RouteParams {
                topk_ids: ids,
                topk_weights: weights,
                record_ids: 0,
                record_weights: 0,
                args_block: 0,
                ..route
            },
            warm_sort,
            warm_up: 1,
        }
    }
}

/// The arguments of `set_forward_args` (kernels/route_topk.cu), in its order: launched on
/// capture, and written into the graph's node of it at each replay.
pub struct ForwardArgValues {
    pub args_block: DevicePtr,
    pub num_tokens_dev: DevicePtr,
    pub pointers: [DevicePtr; ARG_SLOTS],
    pub num_tokens: i32,
}

impl ForwardArgValues {
    /// Pointers to each argument (valid while `self` is neither moved nor dropped).
    pub fn params(&mut self) -> [*mut std::ffi::c_void; 3 + ARG_SLOTS] {
        let [p0, p1, p2, p3, p4, p5, p6] = &mut self.pointers;
        [
            arg(&mut self.args_block),
            arg(&mut self.num_tokens_dev),
            arg(p0),
            arg(p1),
            arg(p2),
            arg(p3),
            arg(p4),
            arg(p5),
            arg(p6),
            arg(&mut self.num_tokens),
        ]
    }
}

/// Mirrors `GivenSlots` in kernels/common/sort.cuh: the caller's routing (or, under graph
/// replay, the argument block it is read from) and where it is copied.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GivenSlots {
    pub ids: DevicePtr,
    pub weights: DevicePtr,
    pub topk_ids: DevicePtr,
    pub topk_weights: DevicePtr,
    pub record_ids: DevicePtr,
    pub record_weights: DevicePtr,
    pub args_block: DevicePtr,
}

/// Where the sort writes (in `SortParams`' field order).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SortBuffers {
    pub expert_offsets: DevicePtr,
    pub sorted_slots: DevicePtr,
    pub slot_positions: DevicePtr,
    pub tile_expert: DevicePtr,
    pub tile_row: DevicePtr,
    pub num_tiles: DevicePtr,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::compile::kernel_source;
    use std::mem::size_of;

    /// Bytes of `struct NAME { ... };` in `source` as nvcc lays it out: each field at its
    /// natural alignment (pointers and 64-bit integers 8, int and float 4, the `nested` structs
    /// by their given sizes at 8), the end rounded to the largest.
    fn c_struct_size(source: &str, name: &str, nested: &[(&str, usize)]) -> usize {
        let start = source
            .find(&format!("struct {name} {{"))
            .unwrap_or_else(|| panic!("struct {name} not found"));
        let body = &source[start..];
        let body = &body[body.find('{').unwrap() + 1..body.find("};").unwrap()];
        let (mut size, mut align) = (0usize, 1usize);
        for line in body.lines() {
            let decl = line.split("//").next().unwrap().trim();
            let Some(decl) = decl.strip_suffix(';') else {
                continue;
            };
            let ty = decl.rsplit_once([' ', '*']).unwrap().0;
            let ty = ty.trim();
            let (bytes, field_align) =
                if decl.contains('*') || ["i64", "u64", "double"].contains(&ty) {
                    (8, 8)
                } else if ["int", "float", "u32", "i32"].contains(&ty) {
                    (4, 4)
                } else if let Some(&(_, bytes)) = nested.iter().find(|(n, _)| *n == ty) {
                    (bytes, 8)
                } else {
                    panic!("{name}: no size for field `{decl}`")
                };
            size = size.next_multiple_of(field_align) + bytes;
            align = align.max(field_align);
        }
        size.next_multiple_of(align)
    }

    /// The kernels take these by value: a field added, dropped or resized on one side only
    /// would shift every field after it.
    #[test]
    fn argument_structs_have_the_kernels_size() {
        let gemm = kernel_source("common/gemm_tile.cuh");
        let routing = kernel_source("common/routing.cuh");
        let sort = kernel_source("common/sort.cuh");
        let gate = kernel_source("gate_logits.cu");
        let route = c_struct_size(routing, "RouteParams", &[]);
        let sort_params = c_struct_size(sort, "SortParams", &[]);
        let nested = [("RouteParams", route), ("SortParams", sort_params)];
        for (rust, c, name) in [
            (
                size_of::<GemmParams>(),
                c_struct_size(gemm, "GemmParams", &[]),
                "GemmParams",
            ),
            (size_of::<RouteParams>(), route, "RouteParams"),
            (size_of::<SortParams>(), sort_params, "SortParams"),
            (
                size_of::<GivenSlots>(),
                c_struct_size(sort, "GivenSlots", &[]),
                "GivenSlots",
            ),
            (
                size_of::<FusedRouting>(),
                c_struct_size(gate, "FusedRouting", &nested),
                "FusedRouting",
            ),
        ] {
            assert_eq!(rust, c, "{name}");
        }
    }
}
