//! Quantized experts on the device, repacked at load into what `kernels/grouped_gemm_quant.cu`
//! reads. Each expert's W13 `[2I, L]` and W2 `[L, I]` (the canonical orientation of
//! `crate::quant::experts`, W13 de-interleaved here to gate rows then up rows):
//!
//! - FP8_BLOCK: data `[N, K]` E4M3 unchanged; scales expanded from one per 128×128 block to one
//!   per 64 rows × 128 columns (`[N/64, K/128]` f32), so de-interleaving gate/up rows keeps each
//!   row's scale without a per-row table (an interleaved 128-row block holds 64 gate and 64 up
//!   rows).
//! - MXFP4 / NVFP4: data as `[N/8][KB][256]` bytes, KB = ceil(K/64) blocks of 64 columns
//!   (zero-padded), where lane `L` of a warp owns bytes `8L..8L+8` of a block: the E2M1 codes of
//!   its m16n8k16 B fragments for the block's four k16 steps ([`fp4_fragment_k`]), each at the
//!   bits the kernel's decode takes it from ([`fp4_code_bits`]). Scales as `[N/8][KB][8 rows][G]`
//!   bytes, G = 2 UE8M0 (per 32) or 4 E4M3 (per 16) per row and block; NVFP4's global scales as
//!   `[E]` f32 per matrix.
//!
//! Everything is built one expert at a time and copied into one device buffer per part, so a
//! load holds at most one expert's repacked copy on the host.

use rayon::prelude::*;

use super::driver::{DeviceBuffer, DevicePtr};
use crate::config::{FdmoeActQuant, FdmoeDtype, MoeConfig};
use crate::error::Result;
use crate::quant::experts::{for_each_quantized_expert, ExpertMatrix, QuantizedMatrix};
use crate::weights::WeightSource;

/// Rows of one FP8_BLOCK scale after the expansion.
pub const FP8_SCALE_ROWS: usize = 64;
/// Columns of one packed FP4 block.
pub const FP4_BLOCK_COLS: usize = 64;

/// One repacked matrix kind (all experts' W13, or all experts' W2) on the device.
pub struct QuantizedPart {
    pub data: DeviceBuffer,
    pub scales: DeviceBuffer,
    /// NVFP4: `[E]` f32.
    pub global: Option<DeviceBuffer>,
    /// Bytes of one expert's data / scales.
    pub data_stride: usize,
    pub scale_stride: usize,
    /// FP4: every scale byte is plain ([`fp4_scale_plain`]), so no block of the kernel checks.
    pub scales_plain: bool,
}

/// Both expert matrices in a quantized format.
pub struct QuantizedExperts {
    pub format: FdmoeDtype,
    pub w13: QuantizedPart,
    pub w2: QuantizedPart,
}

/// Rows and columns of one W4A8 tile ([`tile_w4a8`]).
pub const W4A8_TILE_ROWS: usize = 64;
pub const W4A8_TILE_COLS: usize = 128;

/// Bytes of one expert's repacked (data, scales) for a `[rows, cols]` matrix.
pub fn packed_sizes(
    format: FdmoeDtype,
    layout: Fp4Layout,
    rows: usize,
    cols: usize,
) -> (usize, usize) {
    if layout == Fp4Layout::W4A8 {
        let tiles = rows.div_ceil(W4A8_TILE_ROWS) * cols.div_ceil(W4A8_TILE_COLS);
        return (tiles * 8 * 2 * 256, tiles * 8 * 2 * 16);
    }
    match format {
        FdmoeDtype::Fp8Block => (
            rows * cols,
            rows.div_ceil(FP8_SCALE_ROWS) * cols.div_ceil(128) * 4,
        ),
        _ => {
            let blocks = rows.div_ceil(8) * cols.div_ceil(FP4_BLOCK_COLS);
            (blocks * 256, blocks * 8 * fp4_scales_per_block_row(format))
        }
    }
}

fn fp4_scales_per_block_row(format: FdmoeDtype) -> usize {
    if format == FdmoeDtype::Mxfp4 {
        2
    } else {
        4
    }
}

/// Whether the kernel decodes with scale byte `b` by its fast path (`fp4_scales_plain` in
/// kernels/quant/fp4_decode.cuh): a UE8M0 exponent up to 128 (MXFP4), a positive normal E4M3
/// (NVFP4). Real checkpoints' scales all are.
pub fn fp4_scale_plain(format: FdmoeDtype, b: u8) -> bool {
    match format {
        FdmoeDtype::Mxfp4 => b <= 128,
        FdmoeDtype::Nvfp4 => b & 0x80 == 0 && b & 0x78 != 0 && b & 0x7F != 0x7F,
        _ => false,
    }
}

/// Device bytes of the quantized experts of `cfg`.
pub fn device_bytes(cfg: &MoeConfig) -> usize {
    let e = cfg.num_experts;
    let mut n = 0;
    for which in [ExpertMatrix::W13, ExpertMatrix::W2] {
        let (rows, cols) = which.shape(cfg);
        let (d, s) = packed_sizes(cfg.weight_dtype, Fp4Layout::of(cfg), rows, cols);
        n += e * (d + s);
        if cfg.weight_dtype == FdmoeDtype::Nvfp4 {
            n += e * 4;
        }
    }
    n
}

/// For lane `lane` (`g = lane / 4`, `t = lane % 4`), packed word `w` (0 or 1) and nibble pair
/// `e` (0..4) of that word: the column (within the 64-column block) of the pair's low element;
/// the high element is the next column. Pair `e` is B-fragment register `e % 2` (b0 or b1) of
/// k16 step `2w + e / 2`, whose low element is `k = 16 step + 2t + 8 (e % 2)` (PTX m16n8k16
/// layout). Where the pair's two codes sit in the word: [`fp4_code_bits`].
pub fn fp4_fragment_k(lane: usize, w: usize, e: usize) -> usize {
    let step = 2 * w + e / 2;
    16 * step + 2 * (lane % 4) + 8 * (e % 2)
}

/// The kernel's rotations of a packed word (FP4_SIGN_ROT / FP4_MAG_ROT in
/// kernels/quant/fp4_decode.cuh): pair `e` decodes its two sign bits from bits 15 and 31 of
/// the word rotated right by `FP4_SIGN_ROT[e]` and its two 3-bit magnitudes from bits 6..8 and
/// 22..24 of it rotated by `FP4_MAG_ROT[e]`. No rotation wraps a bit the kernel keeps, so it
/// decodes each with one shift (as a multiply, off the integer ALU pipe) and the 6 masks a word
/// needs at the fewest.
const FP4_SIGN_ROT: [u32; 4] = [0, 31, 27, 26];
const FP4_MAG_ROT: [u32; 4] = [0, 5, 29, 26];

/// Bit positions in a packed word of the sign and of the lowest magnitude bit (the magnitude
/// takes that bit and the next two) of pair `e`'s element `h` (0: the low bf16 of the register).
pub fn fp4_code_bits(e: usize, h: usize) -> (u32, u32) {
    let half = 16 * h as u32;
    (
        (15 + half + FP4_SIGN_ROT[e]) % 32,
        (6 + half + FP4_MAG_ROT[e]) % 32,
    )
}

/// Which kernel a packed FP4 block is laid out for: its blocks, scales and lanes are the same,
/// the place of each lane's codes within its 8 bytes differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp4Layout {
    /// m16n8k16 bf16 B fragments ([`fp4_fragment_k`], [`fp4_code_bits`]).
    W4A16,
    /// `act_quant = FP8_MX`: wgmma E4M3 A fragments ([`w4a8_code_slot`]), the blocks of each
    /// kernel tile's k-tile contiguous ([`tile_w4a8`]).
    W4A8,
}

impl Fp4Layout {
    pub fn of(cfg: &MoeConfig) -> Self {
        if cfg.act_quant == FdmoeActQuant::Fp8Mx {
            Fp4Layout::W4A8
        } else {
            Fp4Layout::W4A16
        }
    }
}

/// Reorders W4A8 blocks (`[N/8][KB][256]` data, `[N/8][KB][16]` scales, as [`pack_fp4`] makes
/// them) so that what one block of `grouped_gemm_w4a8` reads per k-tile is one contiguous run:
/// `[N/64 tiles][K/128 k-tiles][8 row blocks][2 column blocks][256]`, scales likewise with 16
/// bytes. A tile's row block `2m` / `2m + 1` is row block `4j + m` of the gate / up half for a
/// gated W13 (tile `j` computes activation columns `32j..32j + 32`), else row block `8j + n`.
/// Blocks past the matrix (its last tile's rows, a last half k-tile) are zero, scales included.
fn tile_w4a8(
    data: &[u8],
    scales: &[u8],
    rows: usize,
    cols: usize,
    gated: bool,
) -> (Vec<u8>, Vec<u8>) {
    let (row_blocks, kb) = (rows / 8, cols.div_ceil(FP4_BLOCK_COLS));
    let (tiles, k_tiles) = (rows.div_ceil(W4A8_TILE_ROWS), cols.div_ceil(W4A8_TILE_COLS));
    let (data_bytes, scale_bytes) = packed_sizes(FdmoeDtype::Mxfp4, Fp4Layout::W4A8, rows, cols);
    let mut out = vec![0u8; data_bytes];
    let mut out_scales = vec![0u8; scale_bytes];
    for j in 0..tiles {
        for n in 0..8 {
            let block = if gated {
                (n % 2) * row_blocks / 2 + 4 * j + n / 2
            } else {
                8 * j + n
            };
            if block >= row_blocks || (gated && 4 * j + n / 2 >= row_blocks / 2) {
                continue;
            }
            for kt in 0..k_tiles {
                for b in 0..2 {
                    let src = 2 * kt + b;
                    if src >= kb {
                        continue;
                    }
                    let dst = ((j * k_tiles + kt) * 8 + n) * 2 + b;
                    let from = block * kb + src;
                    out[dst * 256..(dst + 1) * 256]
                        .copy_from_slice(&data[from * 256..(from + 1) * 256]);
                    out_scales[dst * 16..(dst + 1) * 16]
                        .copy_from_slice(&scales[from * 16..(from + 1) * 16]);
                }
            }
        }
    }
    (out, out_scales)
}

/// W4A8 (`grouped_gemm_w4a8`): for lane `lane` (`g = lane / 4`, `t = lane % 4`), word `w`
/// (the block's k32 step) and slot `i` (0..8) of that word, the column within the 64-column
/// block and the bits (sign, e1, e0, m) the code sits at. Slots 0..4 are byte `i` of the A
/// fragment's first register for the row (columns `32w + 4t + i`), at bits `8i + {7, 4, 3, 2}`
/// so that a mask leaves the E4M3 byte; slots 4..8 are byte `i - 4` of its third register
/// (columns 16 further), at bits `8i + {5, 6, 1, 0}`, which two shifts move there.
pub fn w4a8_code_slot(lane: usize, w: usize, i: usize) -> (usize, [u32; 4]) {
    let byte = (i % 4) as u32 * 8;
    let k = 32 * w + 4 * (lane % 4) + i % 4 + 16 * (i / 4);
    let bits = if i < 4 {
        [byte + 7, byte + 4, byte + 3, byte + 2]
    } else {
        [byte + 5, byte + 6, byte + 1, byte]
    };
    (k, bits)
}

/// The packed word `w` of `lane` in one block for `layout`; `code_at(k)` is the E2M1 code of
/// the row at block column `k` (0 past the matrix).
fn fp4_word(layout: Fp4Layout, lane: usize, w: usize, code_at: impl Fn(usize) -> u8) -> u32 {
    let mut word = 0u32;
    match layout {
        Fp4Layout::W4A16 => {
            for e in 0..4 {
                let k = fp4_fragment_k(lane, w, e);
                word |= place_code(e, 0, code_at(k)) | place_code(e, 1, code_at(k + 1));
            }
        }
        Fp4Layout::W4A8 => {
            for i in 0..8 {
                let (k, bits) = w4a8_code_slot(lane, w, i);
                let code = code_at(k) as u32;
                for (n, bit) in bits.iter().enumerate() {
                    word |= ((code >> (3 - n)) & 1) << bit;
                }
            }
        }
    }
    word
}

/// E2M1 `code` as element `h` of pair `e` of a packed word.
fn place_code(e: usize, h: usize, code: u8) -> u32 {
    let (sign, mag) = fp4_code_bits(e, h);
    (((code >> 3) as u32 & 1) << sign) | (((code & 7) as u32) << mag)
}

/// Nibble `k` of a row in the canonical packing (two per byte, low nibble first).
fn nibble(row: &[u8], k: usize) -> u8 {
    row.get(k / 2).map_or(0, |b| (b >> (4 * (k % 2))) & 0xF)
}

/// Repacks one `[rows, cols]` E2M1 matrix (`data` `[rows, cols/2]`, `scales` `[rows, cols/group]`
/// bytes) into the kernel's blocks; `row_of(n)` is the source row of packed row `n`.
fn pack_fp4(
    format: FdmoeDtype,
    layout: Fp4Layout,
    rows: usize,
    cols: usize,
    data: &[u8],
    scales: &[u8],
    row_of: impl Fn(usize) -> usize + Sync,
) -> (Vec<u8>, Vec<u8>) {
    let group = if format == FdmoeDtype::Mxfp4 { 32 } else { 16 };
    let per_row = fp4_scales_per_block_row(format);
    let kb = cols.div_ceil(FP4_BLOCK_COLS);
    let (data_bytes, scale_bytes) = packed_sizes(format, Fp4Layout::W4A16, rows, cols);
    let mut out = vec![0u8; data_bytes];
    let mut out_scales = vec![0u8; scale_bytes];
    // One task per 8-row block (large experts repack on every core).
    let row_blocks = out
        .par_chunks_mut(kb * 256)
        .zip(out_scales.par_chunks_mut(kb * 8 * per_row));
    row_blocks.enumerate().for_each(|(nb, (out, out_scales))| {
        for b in 0..kb {
            let block = b;
            for g in 0..8 {
                let src = row_of(nb * 8 + g);
                let row = &data[src * cols / 2..(src + 1) * cols / 2];
                for t in 0..4 {
                    let lane = g * 4 + t;
                    for w in 0..2 {
                        let word = fp4_word(layout, lane, w, |k| {
                            let k = b * FP4_BLOCK_COLS + k;
                            if k < cols {
                                nibble(row, k)
                            } else {
                                0
                            }
                        });
                        let at = block * 256 + lane * 8 + w * 4;
                        out[at..at + 4].copy_from_slice(&word.to_le_bytes());
                    }
                }
                let row_scales = &scales[src * (cols / group)..(src + 1) * (cols / group)];
                for s in 0..per_row {
                    // Scale s of a block covers columns [s * 64 / per_row, ...).
                    let k = b * FP4_BLOCK_COLS + s * (FP4_BLOCK_COLS / per_row);
                    out_scales[(block * 8 + g) * per_row + s] =
                        if k < cols { row_scales[k / group] } else { 0 };
                }
            }
        }
    });
    (out, out_scales)
}

/// FP8_BLOCK scales `[ceil(rows/128), ceil(cols/128)]` expanded to 64-row groups of the
/// (de-interleaved) rows.
fn pack_fp8_scales(
    rows: usize,
    cols: usize,
    scales: &[f32],
    row_of: impl Fn(usize) -> usize,
) -> Vec<f32> {
    let sc = cols.div_ceil(128);
    let groups = rows.div_ceil(FP8_SCALE_ROWS);
    let mut out = vec![0.0f32; groups * sc];
    for g in 0..groups {
        let src_block = row_of(g * FP8_SCALE_ROWS) / 128;
        out[g * sc..(g + 1) * sc].copy_from_slice(&scales[src_block * sc..(src_block + 1) * sc]);
    }
    out
}

/// The repacked bytes of one expert matrix: (data, scales, NVFP4 global scale).
pub fn repack(
    matrix: &QuantizedMatrix,
    interleaved_gate_up: bool,
    layout: Fp4Layout,
    gated: bool,
) -> (Vec<u8>, Vec<u8>, Option<f32>) {
    let (rows, cols) = (matrix.rows(), matrix.cols());
    let half = rows / 2;
    // Packed row n -> source row: gate rows then up rows out of alternating ones.
    let row_of = |n: usize| {
        if interleaved_gate_up {
            if n < half {
                2 * n
            } else {
                2 * (n - half) + 1
            }
        } else {
            n
        }
    };
    match matrix {
        QuantizedMatrix::Fp8Block(m) => {
            let data = if interleaved_gate_up {
                (0..rows)
                    .flat_map(|n| &m.data()[row_of(n) * cols..(row_of(n) + 1) * cols])
                    .copied()
                    .collect()
            } else {
                m.data().to_vec()
            };
            let scales = pack_fp8_scales(rows, cols, m.scales(), row_of);
            let bytes = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            (data, bytes, None)
        }
        QuantizedMatrix::Mxfp4(m) => {
            let (d, s) = pack_fp4(
                FdmoeDtype::Mxfp4,
                layout,
                rows,
                cols,
                m.data(),
                m.scales(),
                row_of,
            );
            match layout {
                Fp4Layout::W4A8 => {
                    let (d, s) = tile_w4a8(&d, &s, rows, cols, gated);
                    (d, s, None)
                }
                Fp4Layout::W4A16 => (d, s, None),
            }
        }
        QuantizedMatrix::Nvfp4(m) => {
            let (d, s) = pack_fp4(
                FdmoeDtype::Nvfp4,
                layout,
                rows,
                cols,
                m.data(),
                m.block_scales(),
                row_of,
            );
            (d, s, Some(m.global_scale()))
        }
    }
}

impl QuantizedPart {
    fn alloc(cfg: &MoeConfig, which: ExpertMatrix) -> Result<Self> {
        let (rows, cols) = which.shape(cfg);
        let (data_stride, scale_stride) =
            packed_sizes(cfg.weight_dtype, Fp4Layout::of(cfg), rows, cols);
        let e = cfg.num_experts;
        let name = which.name();
        Ok(QuantizedPart {
            data: DeviceBuffer::alloc(e * data_stride, name)?,
            scales: DeviceBuffer::alloc(e * scale_stride, name)?,
            global: None,
            data_stride,
            scale_stride,
            scales_plain: cfg.weight_dtype != FdmoeDtype::Fp8Block,
        })
    }

    pub fn global_ptr(&self) -> DevicePtr {
        self.global.as_ref().map_or(0, |g| g.ptr)
    }
}

impl QuantizedExperts {
    /// Quantizes (or reads pre-quantized) host experts of `src`, repacks and uploads them.
    pub fn load(cfg: &MoeConfig, src: &WeightSource) -> Result<Self> {
        let mut w13 = QuantizedPart::alloc(cfg, ExpertMatrix::W13)?;
        let mut w2 = QuantizedPart::alloc(cfg, ExpertMatrix::W2)?;
        let mut globals = (Vec::new(), Vec::new());
        let format = cfg.weight_dtype;
        let layout = Fp4Layout::of(cfg);
        for_each_quantized_expert(cfg, src, |e, which, matrix| {
            let gated = which == ExpertMatrix::W13;
            let (data, scales, global) =
                repack(&matrix, gated && src.gate_up_interleaved, layout, gated);
            let (part, g) = match which {
                ExpertMatrix::W13 => (&mut w13, &mut globals.0),
                ExpertMatrix::W2 => (&mut w2, &mut globals.1),
            };
            part.scales_plain &= scales.iter().all(|&b| fp4_scale_plain(format, b));
            part.data.write_at(e * part.data_stride, &data)?;
            part.scales.write_at(e * part.scale_stride, &scales)?;
            g.extend(global);
            Ok(())
        })?;
        if cfg.weight_dtype == FdmoeDtype::Nvfp4 {
            w13.global = Some(DeviceBuffer::from_host(&globals.0, "w13 global scales")?);
            w2.global = Some(DeviceBuffer::from_host(&globals.1, "w2 global scales")?);
        }
        Ok(QuantizedExperts {
            format: cfg.weight_dtype,
            w13,
            w2,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::compile::{define_values, kernel_source};
    use crate::quant::experts::QuantizedMatrix;
    use crate::quant::testing::sample_matrix;

    #[test]
    fn repack_rotations_are_the_kernels() {
        let decode = kernel_source("quant/fp4_decode.cuh");
        let kernel = |name| define_values(decode, name);
        assert_eq!(
            FP4_SIGN_ROT.map(|r| r as usize).to_vec(),
            kernel("FP4_SIGN_ROT")
        );
        assert_eq!(
            FP4_MAG_ROT.map(|r| r as usize).to_vec(),
            kernel("FP4_MAG_ROT")
        );
    }

    /// Reads a packed FP4 matrix back the way the kernel does (lane, word, nibble pair) and
    /// returns the (source row, column) -> (nibble, scale byte) it sees.
    fn unpack_fp4(
        format: FdmoeDtype,
        rows: usize,
        cols: usize,
        data: &[u8],
        scales: &[u8],
    ) -> Vec<(u8, u8)> {
        let per_row = fp4_scales_per_block_row(format);
        let kb = cols.div_ceil(64);
        let mut out = vec![(0xFFu8, 0u8); rows * cols];
        for nb in 0..rows / 8 {
            for b in 0..kb {
                let block = nb * kb + b;
                for lane in 0..32 {
                    let n = nb * 8 + lane / 4;
                    for w in 0..2 {
                        let at = block * 256 + lane * 8 + w * 4;
                        let word = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                        for e in 0..4 {
                            let k = b * 64 + fp4_fragment_k(lane, w, e);
                            // The kernel: scale index by word (MXFP4) or by k16 step (NVFP4).
                            let s = if per_row == 2 { w } else { 2 * w + e / 2 };
                            let scale = scales[(block * 8 + lane / 4) * per_row + s];
                            let take = |h| {
                                let (sign, mag) = fp4_code_bits(e, h);
                                ((((word >> sign) & 1) << 3) | ((word >> mag) & 7)) as u8
                            };
                            let (lo, hi) = (take(0), take(1));
                            if k < cols {
                                out[n * cols + k] = (lo, scale);
                                out[n * cols + k + 1] = (hi, scale);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_fp4_column_lands_in_exactly_one_fragment_slot() {
        for lane in [0usize, 5, 31] {
            let mut seen = [false; 64];
            for w in 0..2 {
                for e in 0..4 {
                    let k = fp4_fragment_k(lane, w, e);
                    assert!(!seen[k] && !seen[k + 1]);
                    seen[k] = true;
                    seen[k + 1] = true;
                }
            }
            // 16 columns per lane; the 4 lanes of a row cover all 64.
            assert_eq!(seen.iter().filter(|s| **s).count(), 16);
        }
    }

    #[test]
    fn plain_scales_are_the_single_bf16_multipliers() {
        // MXFP4: 2^(e - 127) times the decode's 2^126 is a normal bf16 (exponent field e + 126
        // at most 254) exactly up to e = 128; 255 is NaN.
        for b in 0..=255u8 {
            let bf16_exponent = b as i32 + 126;
            assert_eq!(
                fp4_scale_plain(FdmoeDtype::Mxfp4, b),
                bf16_exponent <= 254,
                "{b}"
            );
        }
        // NVFP4: the positive, finite, normal E4M3 values (at least 2^-6).
        for b in 0..=255u8 {
            let v = crate::quant::e4m3::decode_e4m3(b);
            let expect = v.is_finite() && v >= 2f32.powi(-6);
            assert_eq!(
                fp4_scale_plain(FdmoeDtype::Nvfp4, b),
                expect,
                "{b:#x} = {v}"
            );
        }
    }

    #[test]
    fn fp4_codes_fill_each_word_bit_once() {
        let mut seen = 0u64;
        for e in 0..4 {
            for h in 0..2 {
                let (sign, mag) = fp4_code_bits(e, h);
                for bit in [sign, mag, mag + 1, mag + 2] {
                    assert!(
                        bit < 32 && seen & (1 << bit) == 0,
                        "pair {e} element {h} bit {bit}"
                    );
                    seen |= 1 << bit;
                }
                // What the kernel reads for the register: the rotated word's bits 15 / 31
                // and 6..8 / 22..24.
                let word = place_code(e, h, 0xF);
                let sign_view = word.rotate_right(FP4_SIGN_ROT[e]);
                let mag_view = word.rotate_right(FP4_MAG_ROT[e]);
                assert_eq!(sign_view & 0x8000_8000, 1 << (15 + 16 * h));
                assert_eq!(mag_view & 0x01C0_01C0, 0x1C0 << (16 * h));
                // The kernel shifts instead of rotating (right where the kept bits stay
                // inside the word, else left): the same bits, since none wraps.
                for (rot, kept) in [
                    (FP4_SIGN_ROT[e], 0x8000_8000u32),
                    (FP4_MAG_ROT[e], 0x01C0_01C0),
                ] {
                    let view = if rot == 0 {
                        word
                    } else if kept.leading_zeros() >= rot {
                        word >> rot
                    } else {
                        word << (32 - rot)
                    };
                    assert_eq!(
                        view & kept,
                        word.rotate_right(rot) & kept,
                        "pair {e} rotation {rot}"
                    );
                }
            }
        }
        assert_eq!(seen, 0xFFFF_FFFF);
    }

    #[test]
    fn fp4_repack_round_trips_with_interleave_and_padding() {
        for format in [FdmoeDtype::Mxfp4, FdmoeDtype::Nvfp4] {
            // cols 96: one full and one half-padded 64-column block.
            let (rows, cols) = (32, 96);
            let w = sample_matrix(rows, cols, 7);
            let m = QuantizedMatrix::quantize(format, &w, rows, cols).unwrap();
            let (data, scales) = match &m {
                QuantizedMatrix::Mxfp4(x) => (x.data().to_vec(), x.scales().to_vec()),
                QuantizedMatrix::Nvfp4(x) => (x.data().to_vec(), x.block_scales().to_vec()),
                _ => unreachable!(),
            };
            let group = if format == FdmoeDtype::Mxfp4 { 32 } else { 16 };
            for interleaved in [false, true] {
                let (pd, ps, _) = repack(&m, interleaved, Fp4Layout::W4A16, false);
                let seen = unpack_fp4(format, rows, cols, &pd, &ps);
                for n in 0..rows {
                    let src = match (interleaved, n < rows / 2) {
                        (false, _) => n,
                        (true, true) => 2 * n,
                        (true, false) => 2 * (n - rows / 2) + 1,
                    };
                    for k in 0..cols {
                        let want = (
                            nibble(&data[src * cols / 2..], k),
                            scales[src * (cols / group) + k / group],
                        );
                        assert_eq!(seen[n * cols + k], want, "{format} row {n} col {k}");
                    }
                }
            }
        }
    }

    /// The kernel's W4A8 decode of a packed word (e2m1x4_low_to_e4m3 / e2m1x4_high_to_e4m3).
    fn w4a8_decode(word: u32) -> [u32; 2] {
        [
            word & 0x9C9C_9C9C,
            ((word << 2) & 0x8C8C_8C8C) | ((word >> 2) & 0x1010_1010),
        ]
    }

    #[test]
    fn w4a8_decode_gives_each_weight_times_2_pow_minus_6_as_e4m3() {
        use crate::quant::{decode_e2m1, decode_e4m3};
        // 96 rows: a last, partial 64-row tile; 160 columns: a last, half k-tile. Gated: 2I =
        // 128 rows, tiles alternating gate and up row blocks.
        for (rows, cols, gated) in [(96, 160, false), (128, 160, true)] {
            let w = sample_matrix(rows, cols, 11);
            let m = QuantizedMatrix::quantize(FdmoeDtype::Mxfp4, &w, rows, cols).unwrap();
            let QuantizedMatrix::Mxfp4(x) = &m else {
                unreachable!()
            };
            let (pd, ps, _) = repack(&m, false, Fp4Layout::W4A8, gated);
            let (tiles, k_tiles) = (rows.div_ceil(64), cols.div_ceil(128));
            assert_eq!(pd.len(), tiles * k_tiles * 4096);
            let mut seen = vec![false; rows * cols];
            for j in 0..tiles {
                for kt in 0..k_tiles {
                    for n in 0..8 {
                        let block = if gated {
                            (n % 2) * rows / 16 + 4 * j + n / 2
                        } else {
                            8 * j + n
                        };
                        for b in 0..2 {
                            let at = (((j * k_tiles + kt) * 8 + n) * 2 + b) * 256;
                            for lane in 0..32 {
                                let row = block * 8 + lane / 4;
                                for word_index in 0..2 {
                                    let o = at + lane * 8 + word_index * 4;
                                    let word = u32::from_le_bytes(pd[o..o + 4].try_into().unwrap());
                                    let scale = ps[at / 16 + (lane / 4) * 2 + word_index];
                                    for (r, reg) in w4a8_decode(word).iter().enumerate() {
                                        for byte in 0..4 {
                                            // ALayout_64x32: register r / 2 takes columns 16 on.
                                            let k = kt * 128
                                                + b * 64
                                                + 32 * word_index
                                                + 16 * r
                                                + 4 * (lane % 4)
                                                + byte;
                                            let e4m3 = decode_e4m3((reg >> (8 * byte)) as u8);
                                            if k >= cols || row >= rows {
                                                assert_eq!((e4m3, scale), (0.0, 0), "padding");
                                                continue;
                                            }
                                            let code = nibble(&x.data()[row * cols / 2..], k);
                                            assert_eq!(
                                                e4m3,
                                                decode_e2m1(code) / 64.0,
                                                "row {row} col {k}"
                                            );
                                            assert_eq!(
                                                scale,
                                                x.scales()[row * (cols / 32) + k / 32]
                                            );
                                            assert!(!seen[row * cols + k]);
                                            seen[row * cols + k] = true;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&s| s), "every weight once");
        }
        // Every E2M1 code, signs and the subnormal 0.5 included, in both slots of a byte.
        for code in 0..16u8 {
            let low = (((code >> 3) & 1) as u32) << 7 | ((code & 7) as u32) << 2;
            let high = (((code >> 3) & 1) as u32) << 5
                | (((code >> 2) & 1) as u32) << 6
                | (((code >> 1) & 1) as u32) << 1
                | (code & 1) as u32;
            let [a, _] = w4a8_decode(low);
            let [_, c] = w4a8_decode(high);
            assert_eq!(decode_e4m3(a as u8), decode_e2m1(code) / 64.0, "{code:#x}");
            assert_eq!(decode_e4m3(c as u8), decode_e2m1(code) / 64.0, "{code:#x}");
        }
    }

    #[test]
    fn fp8_scales_follow_deinterleaved_rows() {
        let (rows, cols) = (256, 256);
        let w = sample_matrix(rows, cols, 3);
        let m = QuantizedMatrix::quantize(FdmoeDtype::Fp8Block, &w, rows, cols).unwrap();
        let QuantizedMatrix::Fp8Block(f) = &m else {
            unreachable!()
        };
        for interleaved in [false, true] {
            let (data, scales, _) = repack(&m, interleaved, Fp4Layout::W4A16, false);
            let scales: Vec<f32> = scales
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            for n in 0..rows {
                let src = match (interleaved, n < rows / 2) {
                    (false, _) => n,
                    (true, true) => 2 * n,
                    (true, false) => 2 * (n - rows / 2) + 1,
                };
                assert_eq!(
                    data[n * cols..(n + 1) * cols],
                    f.data()[src * cols..(src + 1) * cols]
                );
                for kb in 0..2 {
                    assert_eq!(scales[(n / 64) * 2 + kb], f.scale_at(src, kb * 128));
                }
            }
        }
    }
}
