//! The grouped GEMMs' tile configurations (FDMOE_TILE_* and FDMOE_QTILE_* in kernels/*.cu),
//! which one a forward takes for its rows per expert, and the kernel entry point names.

use crate::config::{ExpertInputQuant, FdmoeActivation, FdmoeDtype};

/// A GEMM tile configuration (must match FDMOE_TILE_* in grouped_gemm.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// 16 x 64 x 64, 4 warps, 4 stages: decode (many blocks to stream the weights; 4 stages
    /// let 4 blocks share an SM, so DeepSeek-V3's 512 blocks at T = 1 run in one wave).
    Small,
    /// 16 x 16 x 64, 1 warp, 8 stages: GEMM 1 of the smallest decode grids in place of
    /// `Small` (`Tile::for_up_projection`), whose blocks would leave the SMs' shares uneven.
    Thin,
    /// 32 x 64 x 64, 4 warps (2 x 2), 4 stages: decode at 13-24 rows per expert, where 16-row
    /// tiles would give a second tile to ~40% of the experts and read their weights twice.
    Decode32,
    /// 64 x 128 x 32, 4 warps.
    Mid,
    /// 128 x 128 x 32, 8 warps: prefill on sm_80.
    Large,
    /// 64 x 256 x 64, 1 warpgroup of wgmma: mid-size groups on sm_90a, and decode of wide
    /// experts (`Tile::for_experts`).
    WgmmaMid,
    /// 128 x 256 x 64, 2 warpgroups of wgmma: prefill on sm_90a.
    Wgmma,
}

impl Tile {
    pub const ALL: [Tile; 7] = [
        Tile::Small,
        Tile::Thin,
        Tile::Decode32,
        Tile::Mid,
        Tile::Large,
        Tile::WgmmaMid,
        Tile::Wgmma,
    ];

    pub(super) fn needs_hopper(self) -> bool {
        matches!(self, Tile::WgmmaMid | Tile::Wgmma)
    }

    /// The epilogues a tile has kernels for (`Thin` only runs GEMM 1).
    pub(super) fn has_kind(self, kind: GemmKind) -> bool {
        self != Tile::Thin || kind == GemmKind::UpGated
    }

    pub fn block_m(self) -> usize {
        match self {
            Tile::Small | Tile::Thin => 16,
            Tile::Decode32 => 32,
            Tile::Mid | Tile::WgmmaMid => 64,
            Tile::Large | Tile::Wgmma => 128,
        }
    }
    pub fn block_n(self) -> usize {
        match self {
            Tile::Thin => 16,
            Tile::Small | Tile::Decode32 => 64,
            Tile::Wgmma | Tile::WgmmaMid => 256,
            _ => 128,
        }
    }
    pub fn threads(self) -> u32 {
        match self {
            Tile::Large | Tile::Wgmma => 256,
            Tile::Thin => 32,
            _ => 128,
        }
    }
    pub fn smem_bytes(self) -> usize {
        let offsets = (self.block_m() + self.block_n()) * 8;
        match self {
            Tile::Small => 4 * (16 + 64) * (64 + 8) * 2 + offsets,
            Tile::Thin => 8 * (16 + 16) * (64 + 8) * 2 + offsets,
            Tile::Decode32 => 4 * (32 + 64) * (64 + 8) * 2 + offsets,
            Tile::Mid => 4 * (64 + 128) * (32 + 8) * 2 + offsets,
            Tile::Large => 4 * (128 + 128) * (32 + 8) * 2 + offsets,
            // Swizzled stages need 1024-byte alignment: one extra KiB to align the base.
            Tile::WgmmaMid => 4 * (64 + 256) * 64 * 2 + 1024 + offsets,
            Tile::Wgmma => 4 * (128 + 256) * 64 * 2 + 1024 + offsets,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Tile::Small => "s",
            Tile::Thin => "t",
            Tile::Decode32 => "d",
            Tile::Mid => "m",
            Tile::Large => "l",
            Tile::WgmmaMid => "v",
            Tile::Wgmma => "w",
        }
    }

    /// The grouped expert GEMMs' tile at `rows` rows per expert, for experts whose hidden size
    /// (GEMM 1's K) is `expert_hidden`. On sm_90a, decode of wide experts takes the 64-row
    /// wgmma tile despite its padding rows: with its copies hoisted it streams the weights
    /// closer to the byte rate than the 16- and 32-row mma.sync tiles. H200 (BENCHMARKS.md, fifth
    /// session), bf16 given routing at T = 1 / 16 / 64 / 256: DeepSeek-V3 (H = 7168) 0.185 /
    /// 2.225 / 4.790 / 5.575 ms → 0.181 / 2.106 / 4.510 / 5.176; Mixtral (H = 4096) T = 16 / 64
    /// 0.706 / 0.784 → 0.665 / 0.688; but Qwen3 (H = 2048) 0.030 / 0.205 / 0.311 / 0.351 →
    /// 0.038 / 0.223 / 0.325 / 0.361: with short K a block's pipeline fill and drain, which
    /// nothing else on its SM overlaps (one 64-row block per SM), are a large share of its life.
    pub fn for_experts(rows: usize, expert_hidden: usize, hopper: bool) -> Tile {
        match Tile::for_rows(rows, hopper) {
            Tile::Small | Tile::Decode32 if hopper && expert_hidden >= WGMMA_DECODE_MIN_HIDDEN => {
                Tile::WgmmaMid
            }
            tile => tile,
        }
    }

    /// GEMM 1's tile when GEMM 2 takes `tile` for `slots` (T * k) routed rows: `Thin` for
    /// the 16-row tile up to `THIN_MAX_SLOTS`, whose grid of one row tile an expert is then at
    /// most slots x I / 8 blocks, one wave at 6 an SM for Qwen3 (768 at T = 1). Same bits as
    /// `Small`; H200, Qwen3 T = 1: 0.0299 → 0.0293 ms given, 0.0417 → 0.0409 routed.
    pub fn for_up_projection(tile: Tile, slots: usize) -> Tile {
        if tile == Tile::Small && slots <= THIN_MAX_SLOTS {
            Tile::Thin
        } else {
            tile
        }
    }

    /// Smallest tile that is not mostly padding for `rows` rows per group.
    pub fn for_rows(rows: usize, hopper: bool) -> Tile {
        match (rows, hopper) {
            (0..=DECODE16_MAX_ROWS, _) => Tile::Small,
            (0..=DECODE32_MAX_ROWS, _) => Tile::Decode32,
            // Measured on an H100: the 64-row wgmma tile wins at ~32 rows per expert
            // (DeepSeek-V3, T = 1024) and loses to the 128-row one from ~64 rows.
            (25..=48, true) => Tile::WgmmaMid,
            (_, true) => Tile::Wgmma,
            (25..=96, false) => Tile::Mid,
            (_, false) => Tile::Large,
        }
    }
}

/// Rows per expert up to which decode takes the 16-row tiles, then the 32-row ones (bf16 and
/// FP8): past 12 the 16-row tiles would give many experts a second tile.
const DECODE16_MAX_ROWS: usize = 12;
const DECODE32_MAX_ROWS: usize = 24;

/// Routed slots (T * k) up to which GEMM 1 takes `Tile::Thin` instead of `Tile::Small`.
pub const THIN_MAX_SLOTS: usize = 8;

/// Experts at least this wide (hidden size, GEMM 1's K) decode on the 64-row wgmma tile
/// (`Tile::for_experts`).
pub const WGMMA_DECODE_MIN_HIDDEN: usize = 4096;

/// The epilogue variants of the GEMM kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmKind {
    /// Grouped, gathered rows, gated activation.
    UpGated,
    /// Grouped, router weight applied.
    DownScaled,
    /// Dense, output of the element type.
    Dense,
    /// Dense, f32 output.
    DenseF32,
    /// Dense, f32 residual added.
    DenseResidual,
    /// Dense, gated activation.
    DenseGated,
}

pub(super) const GEMM_KINDS: [GemmKind; 6] = [
    GemmKind::UpGated,
    GemmKind::DownScaled,
    GemmKind::Dense,
    GemmKind::DenseF32,
    GemmKind::DenseResidual,
    GemmKind::DenseGated,
];

fn act_name(act: FdmoeActivation) -> &'static str {
    match act {
        FdmoeActivation::Swiglu => "swiglu",
        FdmoeActivation::GeluTanhAndMul => "gelu_tanh",
        FdmoeActivation::Swigluoai => "swigluoai",
    }
}

pub(super) fn gemm_name(tile: Tile, kind: GemmKind, act: FdmoeActivation) -> String {
    let act = act_name(act);
    let kind = match kind {
        GemmKind::UpGated => format!("up_{act}"),
        GemmKind::DownScaled => "down_scaled".to_string(),
        GemmKind::Dense => "dense".to_string(),
        GemmKind::DenseF32 => "dense_f32".to_string(),
        GemmKind::DenseResidual => "dense_residual".to_string(),
        GemmKind::DenseGated => format!("dense_{act}"),
    };
    format!("gemm_{}_{kind}", tile.suffix())
}

/// Which kernels run a quantized format's expert GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFamily {
    /// mma.sync tiles (sm_80 on): W4A16 for FP4, FP8 converted to f16 for FP8_BLOCK (sm_89).
    MmaSync,
    /// wgmma on E4M3 activations (sm_90a): W8A8 for FP8_BLOCK, W4A8 for MXFP4 with
    /// `act_quant = FP8_MX`.
    Wgmma,
}

impl QuantFamily {
    /// The family for `format` with the expert GEMMs' input quantization `input_quant`, on a
    /// device with (`hopper`) or without the wgmma kernels. `FDMOE_FP8_MMA_SYNC` (read at
    /// create) keeps FP8_BLOCK on the sm_89 tiles on Hopper too, so that the GPU tests reach
    /// them there.
    pub fn of(
        format: FdmoeDtype,
        input_quant: Option<ExpertInputQuant>,
        hopper: bool,
    ) -> QuantFamily {
        let w4a8 = input_quant == Some(ExpertInputQuant::Fp8Mx);
        let w8a8 = format == FdmoeDtype::Fp8Block
            && hopper
            && std::env::var_os("FDMOE_FP8_MMA_SYNC").is_none();
        if w4a8 || w8a8 {
            QuantFamily::Wgmma
        } else {
            QuantFamily::MmaSync
        }
    }
}

/// Tiles of the quantized expert GEMMs (FDMOE_QTILE_* in grouped_gemm_quant.cu), 4 warps each:
/// for decode 16 x 64 (FP8) or 16 x 128 (FP4), and for FP4 also 16 x 64 when the wide tile would
/// leave the GPU underfilled; for FP8 32 x 64 at 13-24 rows per expert; 64 x 128 otherwise. On
/// sm_90a FP8_BLOCK, and MXFP4 with `act_quant = FP8_MX`, take the wgmma tiles instead, at every
/// T. Within each family every tile sums each output in the same order, so the choice never
/// changes a bit (graph buckets and eager forwards at other T agree bitwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantTile {
    Narrow,
    Small,
    /// FP8 only: 16-row tiles would give ~40% of the experts a second tile at 13-24 rows and
    /// read their weights twice (as `Tile::Decode32` for bf16).
    Decode32,
    Mid,
    /// wgmma on E4M3 activations (sm_90a): W4A8 (`grouped_gemm_w4a8`, MXFP4 with `act_quant =
    /// FP8_MX`) and W8A8 (`grouped_gemm_w8a8`, FP8_BLOCK), 64 weight rows x 8 / 16 / 32 tokens,
    /// one warpgroup. W4A8's promotion cost grows with the token tile, so the smallest that
    /// gives most experts one tile: up to 4 / 24 rows per expert on average, then 32 (at 16
    /// rows, Qwen3-30B-A3B T = 256, two 16-token tiles of an expert, the second reading its
    /// weights from L2, beat one 32-token tile: H200 0.223 -> 0.211 ms; the 8-token tile up to
    /// 8 rows lost too: DeepSeek-V3 T = 256 2.04 -> 2.19 ms). W8A8 promotes once per 128 of K,
    /// so there one 32-token tile wins from 13 rows (Qwen3 T = 256 0.209 -> 0.197 ms).
    WgmmaT8,
    WgmmaT16,
    WgmmaT32,
    /// W8A8 prefill: 64 tokens (as wgmma M) x 128 weight rows, two blocks an SM, so an
    /// expert's weights are read once per 64 of its rows, not once per 32, and each byte copied
    /// into shared memory feeds 2-4x the MMAs. It beat a 64 x 64 tile with the weights as M and
    /// a two-warpgroup 128 x 128 one (one block an SM) at every prefill size measured (H200,
    /// BENCHMARKS.md fifteenth session: DeepSeek-V3 T = 1024 2.98 / 3.51 / 4.35 ms, Qwen3-30B-A3B
    /// T = 2048 0.518 / 0.641 / 0.575; a tie at DeepSeek-V3 T = 4096).
    WgmmaP64,
    /// FP4 (W4A16) prefill on sm_90a (`grouped_gemm_fp4_wgmma`): 128 tokens (two warpgroups,
    /// wgmma M) x 256 weight rows, the weights decoded once per block into shared bf16 tiles
    /// (the mma.sync tiles decode each weight once per 32 tokens in each row warp, which bounds
    /// them at prefill). Same bits as the mma.sync tiles. H200 MXFP4 (BENCHMARKS.md, sixteenth
    /// session), against the 64 x 128 mma.sync tile: Qwen3-30B-A3B T = 1024 / 2048 / 4096 0.559 /
    /// 0.922 / 1.614 -> 0.425 / 0.634 / 1.066 ms, DeepSeek-V3 T = 2048 / 4096 8.87 / 14.50 ->
    /// 6.29 / 9.11 (bf16 0.42 / 0.56 / 0.90 and 6.20 / 8.51).
    Fp4Wgmma,
}

/// Up to this many slots (T * k) the FP4 decode GEMMs use the narrow tile: the wide one would
/// give DeepSeek-V3's GEMM 1 at most 16 * 2I / 128 = 512 blocks for 660 resident ones (5 per SM
/// on 132 SMs). H200, T = 1: MXFP4 0.109 ms narrow against 0.118 wide, NVFP4 0.112 / 0.130.
pub const FP4_NARROW_MAX_SLOTS: usize = 16;

/// W8A8 rows per expert (on average) up to which the 32-token tile runs, then the 64-token
/// prefill one (H200 sweeps, BENCHMARKS.md fourteenth and fifteenth sessions: DeepSeek-V3 T =
/// 512 at 16 rows 2.76 against 2.84 ms, Qwen3-30B-A3B T = 512 at 32 rows 0.255 against 0.227).
const W8A8_T32_MAX_ROWS: usize = 31;

/// FP4 rows per expert (on average) from which sm_90a takes the 128-token wgmma tile: at 32 it
/// lost to the 64-row mma.sync tile (Qwen3-30B-A3B T = 512 0.413 against 0.391 ms; a tie at
/// DeepSeek-V3 T = 1024), at 64 it won (Qwen3 T = 1024 0.425 against 0.559).
pub const FP4_WGMMA_MIN_ROWS: usize = 64;

impl QuantTile {
    /// The tile for `slots` (T * k) routed rows, `rows` of them per expert on average, on a
    /// device with (`hopper`) or without the sm_90a kernels.
    pub fn choose(
        format: FdmoeDtype,
        family: QuantFamily,
        rows: usize,
        slots: usize,
        hopper: bool,
    ) -> QuantTile {
        let fp8 = format == FdmoeDtype::Fp8Block;
        if family == QuantFamily::Wgmma {
            match rows {
                0..=4 => QuantTile::WgmmaT8,
                13..=24 if fp8 => QuantTile::WgmmaT32,
                5..=24 => QuantTile::WgmmaT16,
                _ if !fp8 || rows <= W8A8_T32_MAX_ROWS => QuantTile::WgmmaT32,
                _ => QuantTile::WgmmaP64,
            }
        } else if !fp8 && hopper && rows >= FP4_WGMMA_MIN_ROWS {
            QuantTile::Fp4Wgmma
        } else if rows > DECODE32_MAX_ROWS {
            QuantTile::Mid
        } else if fp8 && rows > DECODE16_MAX_ROWS {
            QuantTile::Decode32
        } else if !fp8 && slots <= FP4_NARROW_MAX_SLOTS {
            QuantTile::Narrow
        } else {
            QuantTile::Small
        }
    }
    /// The tiles a format has kernels for in `family` (`hopper`: with the sm_90a ones).
    pub fn all(format: FdmoeDtype, family: QuantFamily, hopper: bool) -> &'static [QuantTile] {
        match format {
            FdmoeDtype::Fp8Block if family == QuantFamily::Wgmma => &[
                QuantTile::WgmmaT8,
                QuantTile::WgmmaT16,
                QuantTile::WgmmaT32,
                QuantTile::WgmmaP64,
            ],
            _ if family == QuantFamily::Wgmma => {
                &[QuantTile::WgmmaT8, QuantTile::WgmmaT16, QuantTile::WgmmaT32]
            }
            FdmoeDtype::Fp8Block => &[QuantTile::Small, QuantTile::Decode32, QuantTile::Mid],
            _ if hopper => &[
                QuantTile::Narrow,
                QuantTile::Small,
                QuantTile::Mid,
                QuantTile::Fp4Wgmma,
            ],
            _ => &[QuantTile::Narrow, QuantTile::Small, QuantTile::Mid],
        }
    }
    pub fn block_m(self) -> usize {
        match self {
            QuantTile::Narrow | QuantTile::Small | QuantTile::WgmmaT16 => 16,
            QuantTile::Decode32 | QuantTile::WgmmaT32 => 32,
            QuantTile::Mid | QuantTile::WgmmaP64 => 64,
            QuantTile::WgmmaT8 => 8,
            QuantTile::Fp4Wgmma => 128,
        }
    }
    pub fn threads(self) -> u32 {
        if self == QuantTile::Fp4Wgmma {
            256
        } else {
            128
        }
    }
    /// One of the wgmma tiles on E4M3 activations (`grouped_gemm_w4a8` / `grouped_gemm_w8a8`).
    pub fn is_wgmma(self) -> bool {
        matches!(
            self,
            QuantTile::WgmmaT8 | QuantTile::WgmmaT16 | QuantTile::WgmmaT32 | QuantTile::WgmmaP64
        )
    }
    pub fn block_n(self, format: FdmoeDtype) -> usize {
        match (self, format) {
            (QuantTile::Fp4Wgmma, _) => 256,
            (QuantTile::WgmmaP64, _) => 128,
            _ if self.is_wgmma() => 64,
            (QuantTile::Narrow | QuantTile::Decode32, _)
            | (QuantTile::Small, FdmoeDtype::Fp8Block) => 64,
            _ => 128,
        }
    }
    /// FDMOE_QSTAGES_* in grouped_gemm_quant.cu (the wgmma tiles: FDMOE_STAGES_w4a8 / _w8a8).
    fn stages(self, format: FdmoeDtype) -> usize {
        match (self, format) {
            // grouped_gemm_w8a8's decode tiles (FDMOE_STAGES_w8a8): more blocks an SM.
            (
                QuantTile::WgmmaT8 | QuantTile::WgmmaT16 | QuantTile::WgmmaT32,
                FdmoeDtype::Fp8Block,
            ) => 3,
            _ if self.is_wgmma() => 4,
            (QuantTile::Small | QuantTile::Decode32, FdmoeDtype::Fp8Block) => 2,
            (QuantTile::Narrow | QuantTile::Small, _) => 3,
            _ => 4,
        }
    }
    /// The kernel names' tile part (`FDMOE_QUANT_TILE` takes it).
    pub fn suffix(self) -> &'static str {
        match self {
            QuantTile::Narrow => "n",
            QuantTile::Small => "s",
            QuantTile::Decode32 => "d",
            QuantTile::Mid => "m",
            QuantTile::WgmmaT8 => "a8",
            QuantTile::WgmmaT16 => "a16",
            QuantTile::WgmmaT32 => "a32",
            QuantTile::WgmmaP64 => "p64",
            QuantTile::Fp4Wgmma => "w",
        }
    }
    /// Shared memory of the body for `format` (mirrors the carve-up in the kernel).
    pub fn smem_bytes(self, format: FdmoeDtype) -> usize {
        let (bm, bn, stages) = (self.block_m(), self.block_n(format), self.stages(format));
        let rows = (bm + bn) * 8;
        if self == QuantTile::Fp4Wgmma {
            // grouped_gemm_fp4_wgmma: tokens, packed weights and their scales a stage, two
            // decoded weight tiles, and the 1024-byte alignment of the swizzled rows.
            let scale_block = if format == FdmoeDtype::Mxfp4 { 16 } else { 32 };
            return 1024
                + stages * (bm * 128 + (bn / 8) * (256 + scale_block))
                + 2 * bn * 128
                + rows;
        }
        if self.is_wgmma() && format == FdmoeDtype::Fp8Block {
            // grouped_gemm_w8a8: token and weight rows, one scale each a stage, and the
            // 1024-byte alignment of the swizzled rows.
            return 1024 + stages * ((bm + bn) * 128 + (bm + bn) * 4) + rows;
        }
        if self.is_wgmma() {
            // grouped_gemm_w4a8: tokens, packed weights, their scales, the tokens' scales and a
            // barrier a stage, and the 1024-byte alignment of the swizzled token rows.
            return 1024 + stages * (bm * 128 + (bn / 8) * 2 * (256 + 16) + bm * 16 + 8) + rows;
        }
        match format {
            FdmoeDtype::Fp8Block => stages * (bm + bn) * (128 + 16) + stages * (bm + bn) * 4 + rows,
            _ => {
                let scale_block = if format == FdmoeDtype::Mxfp4 { 16 } else { 32 };
                let blocks = stages * (bn / 8) * 2;
                stages * bm * (128 + 8) * 2 + blocks * 256 + blocks * scale_block + rows
            }
        }
    }
}

pub(super) fn qgemm_name(
    format: FdmoeDtype,
    tile: QuantTile,
    kind: GemmKind,
    act: FdmoeActivation,
) -> String {
    let fmt = match format {
        FdmoeDtype::Fp8Block => "fp8_block",
        FdmoeDtype::Mxfp4 => "mxfp4",
        _ => "nvfp4",
    };
    let kind = match kind {
        GemmKind::UpGated => format!("up_{}", act_name(act)),
        _ => "down_scaled".to_string(),
    };
    format!("qgemm_{fmt}_{}_{kind}", tile.suffix())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::compile::{define_values, kernel_source};

    /// The value of `#define NAME ...` in the quantized GEMMs' entry file.
    fn kernel_define(name: &str) -> Vec<usize> {
        define_values(kernel_source("grouped_gemm_quant.cu"), name)
    }

    /// The host sizes shared memory and grids from these; a tile or stage count that drifted
    /// from the kernel's would launch it with the wrong carve-up.
    #[test]
    fn tiles_and_stages_are_the_kernels() {
        use FdmoeDtype::*;
        for (format, family) in [(Fp8Block, "fp8"), (Mxfp4, "fp4"), (Nvfp4, "fp4")] {
            for &tile in QuantTile::all(format, QuantFamily::MmaSync, true) {
                if tile == QuantTile::Fp4Wgmma {
                    continue;
                }
                let name = format!("{family}_{}", tile.suffix());
                let shape = kernel_define(&format!("FDMOE_QTILE_{name}"));
                assert_eq!(shape[0], tile.block_m(), "{name} rows");
                assert_eq!(shape[1], tile.block_n(format), "{name} columns");
                assert_eq!(
                    shape[2] * shape[3] * 32,
                    tile.threads() as usize,
                    "{name} threads"
                );
                let stages = kernel_define(&format!("FDMOE_QSTAGES_{name}"));
                assert_eq!(stages, [tile.stages(format)], "{name} stages");
            }
        }
        for (format, body) in [(Fp8Block, "w8a8"), (Mxfp4, "w4a8")] {
            let stages = kernel_define(&format!("FDMOE_STAGES_{body}"));
            for tile in [QuantTile::WgmmaT8, QuantTile::WgmmaT16, QuantTile::WgmmaT32] {
                assert_eq!(stages, [tile.stages(format)], "{body} {tile:?} stages");
            }
        }
    }

    #[test]
    fn fp4_decode_takes_the_narrow_tile_only_for_small_grids() {
        use FdmoeDtype::*;
        for fmt in [Mxfp4, Nvfp4] {
            assert_eq!(
                QuantTile::choose(fmt, QuantFamily::MmaSync, 1, 8, true),
                QuantTile::Narrow
            );
            assert_eq!(
                QuantTile::choose(fmt, QuantFamily::MmaSync, 1, FP4_NARROW_MAX_SLOTS, true),
                QuantTile::Narrow
            );
            assert_eq!(
                QuantTile::choose(fmt, QuantFamily::MmaSync, 1, FP4_NARROW_MAX_SLOTS + 1, true),
                QuantTile::Small
            );
            assert_eq!(
                QuantTile::choose(fmt, QuantFamily::MmaSync, 25, 4096, true),
                QuantTile::Mid
            );
            assert!(QuantTile::all(fmt, QuantFamily::MmaSync, true).contains(&QuantTile::Narrow));
            // FP4 prefill: the wgmma tile on sm_90a only.
            assert_eq!(
                QuantTile::choose(fmt, QuantFamily::MmaSync, FP4_WGMMA_MIN_ROWS, 8192, true),
                QuantTile::Fp4Wgmma
            );
            assert_eq!(
                QuantTile::choose(
                    fmt,
                    QuantFamily::MmaSync,
                    FP4_WGMMA_MIN_ROWS - 1,
                    8064,
                    true
                ),
                QuantTile::Mid
            );
            assert_eq!(
                QuantTile::choose(fmt, QuantFamily::MmaSync, 256, 32768, false),
                QuantTile::Mid
            );
            assert!(
                !QuantTile::all(fmt, QuantFamily::MmaSync, false).contains(&QuantTile::Fp4Wgmma)
            );
            assert_eq!(QuantTile::Fp4Wgmma.threads(), 256);
            assert!(QuantTile::Fp4Wgmma.smem_bytes(fmt) <= 227 * 1024);
        }
        assert_eq!(
            QuantTile::choose(Fp8Block, QuantFamily::MmaSync, 1, 8, true),
            QuantTile::Small
        );
        assert_eq!(
            QuantTile::choose(Fp8Block, QuantFamily::MmaSync, 12, 1536, true),
            QuantTile::Small
        );
        assert_eq!(
            QuantTile::choose(Fp8Block, QuantFamily::MmaSync, 16, 2048, true),
            QuantTile::Decode32,
            "Qwen3 T = 256"
        );
        assert_eq!(
            QuantTile::choose(Fp8Block, QuantFamily::MmaSync, 24, 3072, true),
            QuantTile::Decode32
        );
        assert_eq!(
            QuantTile::choose(Fp8Block, QuantFamily::MmaSync, 25, 3200, true),
            QuantTile::Mid
        );
        assert!(!QuantTile::all(Fp8Block, QuantFamily::MmaSync, true).contains(&QuantTile::Narrow));
        assert_eq!(
            QuantTile::choose(Mxfp4, QuantFamily::MmaSync, 16, 2048, true),
            QuantTile::Small
        );
        // Every tile fits an SM's shared memory (227 KB a block on sm_90).
        for fmt in [Fp8Block, Mxfp4, Nvfp4] {
            for &t in QuantTile::all(fmt, QuantFamily::MmaSync, true) {
                assert!(t.smem_bytes(fmt) <= 227 * 1024, "{t:?} {fmt:?}");
            }
        }
        for fmt in [Mxfp4, Fp8Block] {
            for &t in QuantTile::all(fmt, QuantFamily::Wgmma, true) {
                assert!(t.is_wgmma() && t.smem_bytes(fmt) <= 227 * 1024, "{t:?}");
            }
        }
        // The blocks an SM each wgmma tile's launch bounds promise (FDMOE_MINBLOCKS_w8a8_* /
        // _w4a8_*, and GEMM 1's FDMOE_MINBLOCKS_UP_*, the larger) fit its 228 KB of shared
        // memory, 1 KB of it reserved a block.
        for fmt in [Fp8Block, Mxfp4] {
            for &t in QuantTile::all(fmt, QuantFamily::Wgmma, true) {
                let blocks = match (t, fmt) {
                    (QuantTile::WgmmaT8, Fp8Block) => 7,
                    (QuantTile::WgmmaT16, Fp8Block) => 6,
                    (QuantTile::WgmmaT32, Fp8Block) => 5,
                    (QuantTile::WgmmaT8, _) => 4,
                    (QuantTile::WgmmaT16, _) => 6,
                    _ => 2,
                };
                assert!(
                    blocks * (t.smem_bytes(fmt) + 1024) <= 228 * 1024,
                    "{t:?} {fmt:?}"
                );
            }
        }
        assert_eq!(
            QuantFamily::of(Fp8Block, Some(ExpertInputQuant::Fp8Block), false),
            QuantFamily::MmaSync
        );
        assert_eq!(QuantFamily::of(Mxfp4, None, true), QuantFamily::MmaSync);
        assert_eq!(
            QuantFamily::of(Mxfp4, Some(ExpertInputQuant::Fp8Mx), true),
            QuantFamily::Wgmma
        );
        if std::env::var_os("FDMOE_FP8_MMA_SYNC").is_none() {
            assert_eq!(
                QuantFamily::of(Fp8Block, Some(ExpertInputQuant::Fp8Block), true),
                QuantFamily::Wgmma
            );
        }
        assert_eq!(
            QuantTile::choose(Mxfp4, QuantFamily::Wgmma, 1, 8, true),
            QuantTile::WgmmaT8
        );
        assert_eq!(
            QuantTile::choose(Mxfp4, QuantFamily::Wgmma, 8, 2048, true),
            QuantTile::WgmmaT16
        );
        assert_eq!(
            QuantTile::choose(Mxfp4, QuantFamily::Wgmma, 16, 2048, true),
            QuantTile::WgmmaT16,
            "W4A8, Qwen3 T = 256"
        );
        assert_eq!(
            QuantTile::choose(Fp8Block, QuantFamily::Wgmma, 12, 1536, true),
            QuantTile::WgmmaT16
        );
        assert_eq!(
            QuantTile::choose(Fp8Block, QuantFamily::Wgmma, 16, 2048, true),
            QuantTile::WgmmaT32,
            "W8A8, Qwen3 T = 256"
        );
        assert_eq!(
            QuantTile::choose(Mxfp4, QuantFamily::Wgmma, 64, 65536, true),
            QuantTile::WgmmaT32
        );
        assert_eq!(
            QuantTile::choose(Fp8Block, QuantFamily::Wgmma, 31, 4096, true),
            QuantTile::WgmmaT32
        );
        assert_eq!(
            QuantTile::choose(Fp8Block, QuantFamily::Wgmma, 32, 8192, true),
            QuantTile::WgmmaP64,
            "DeepSeek-V3 T = 1024"
        );
        assert_eq!(
            QuantTile::choose(Fp8Block, QuantFamily::Wgmma, 64, 8192, true),
            QuantTile::WgmmaP64,
            "Qwen3-30B-A3B T = 1024"
        );
        assert_eq!(
            QuantTile::choose(Fp8Block, QuantFamily::Wgmma, 128, 32768, true),
            QuantTile::WgmmaP64,
            "DeepSeek-V3 T = 4096"
        );
        assert!(!QuantTile::all(Mxfp4, QuantFamily::Wgmma, true).contains(&QuantTile::WgmmaP64));
    }

    #[test]
    fn the_smallest_decode_grids_take_the_thin_up_projection() {
        assert_eq!(
            Tile::for_up_projection(Tile::Small, 8),
            Tile::Thin,
            "k = 8, T = 1"
        );
        assert_eq!(Tile::for_up_projection(Tile::Small, 16), Tile::Small);
        assert_eq!(
            Tile::for_up_projection(Tile::WgmmaMid, 8),
            Tile::WgmmaMid,
            "wide experts"
        );
        assert_eq!(Tile::for_up_projection(Tile::Decode32, 4), Tile::Decode32);
        assert!(Tile::Thin.has_kind(GemmKind::UpGated));
        assert!(!Tile::Thin.has_kind(GemmKind::DownScaled));
        assert!(Tile::Small.has_kind(GemmKind::Dense));
        // Six blocks of the thin tile share an SM (227 KB of shared memory on sm_90).
        assert_eq!(227 * 1024 / Tile::Thin.smem_bytes(), 6);
    }

    #[test]
    fn decode_rows_take_the_tile_that_holds_them_once() {
        assert_eq!(Tile::for_rows(1, true), Tile::Small);
        assert_eq!(Tile::for_rows(12, true), Tile::Small);
        assert_eq!(Tile::for_rows(16, true), Tile::Decode32, "Qwen3 T = 256");
        assert_eq!(Tile::for_rows(24, false), Tile::Decode32);
        assert_eq!(Tile::for_rows(25, true), Tile::WgmmaMid);
        assert_eq!(Tile::for_rows(25, false), Tile::Mid);
        assert_eq!(
            Tile::for_experts(1, 7168, true),
            Tile::WgmmaMid,
            "DeepSeek-V3 T = 1"
        );
        assert_eq!(
            Tile::for_experts(16, 4096, true),
            Tile::WgmmaMid,
            "Mixtral T = 64"
        );
        assert_eq!(Tile::for_experts(49, 7168, true), Tile::Wgmma);
        assert_eq!(
            Tile::for_experts(16, 2048, true),
            Tile::Decode32,
            "Qwen3 T = 256"
        );
        assert_eq!(
            Tile::for_experts(1, 7168, false),
            Tile::Small,
            "no wgmma on sm_80"
        );
    }
}
