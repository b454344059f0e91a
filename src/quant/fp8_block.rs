//! FP8_BLOCK weights (DeepSeek-V3 checkpoints): a row-major `[N, K]` matrix of E4M3 elements
//! with one f32 scale per 128×128 block.
//!
//! Layout: `data` is `[N, K]` E4M3 bytes; `scales` is `[ceil(N/128), ceil(K/128)]` f32,
//! row-major (the checkpoint's `weight_scale_inv`); the last block row and column may be
//! partial. Value: `w[n, k] = e4m3(data[n, k]) · scales[n/128, k/128]`.
//!
//! Quantization follows DeepGEMM's reference `per_block_cast_to_fp8` (the same rule serves the
//! per-token activations in `fp8_act`), per block:
//! - `amax = max(max |x|, 1e-4)`, the max over finite values (NaN and ±∞ skipped), floored at
//!   1e-4 so that an all-zero or tiny block gets a usable scale (2.2e-7) instead of 0/0;
//! - elements `= encode_e4m3(x · (448 / amax))` (the multiplier rounded to f32 once, then each
//!   product; round to nearest even, saturating to ±448, NaN to NaN, ±∞ to ±448);
//! - `scale = amax / 448` in f32.
//!
//! The scales of a checkpoint are arbitrary positive f32 values; [`Fp8BlockMatrix::from_parts`]
//! takes them as they are.

use rayon::prelude::*;

use super::e4m3::{decode_e4m3, encode_e4m3, E4M3_MAX};
use super::RowDecode;
use super::{check_matrix_len, finite_amax, SourceElement};
use crate::error::{ensure, Result};

/// Rows and columns of one scale block.
pub const FP8_BLOCK_SIZE: usize = 128;

/// The floor of every FP8 amax (weights and activations), as in DeepGEMM's reference.
pub const FP8_AMAX_FLOOR: f32 = 1.0e-4;

/// `(multiplier, scale)` of a group whose largest finite magnitude is `amax`: elements are
/// `encode_e4m3(x · multiplier)`, values `e4m3 · scale`.
#[inline]
pub fn fp8_scale_for_amax(amax: f32) -> (f32, f32) {
    let amax = amax.max(FP8_AMAX_FLOOR);
    (E4M3_MAX / amax, amax / E4M3_MAX)
}

/// An FP8_BLOCK matrix. The fields are private so the shapes always agree; loaders of
/// pre-quantized checkpoints build one with [`Fp8BlockMatrix::from_parts`].
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8BlockMatrix {
    rows: usize,
    cols: usize,
    /// `[rows, cols]` E4M3.
    data: Vec<u8>,
    /// `[ceil(rows/128), ceil(cols/128)]` f32.
    scales: Vec<f32>,
}

/// Quantizes up to 128 rows (`weight` is `[block_rows, cols]`) into `data` and one row of
/// `scales` (`ceil(cols/128)` values).
fn quantize_block_row<W: SourceElement>(
    weight: &[W],
    cols: usize,
    data: &mut [u8],
    scales: &mut [f32],
) {
    // Pass 1: the amax of every block, gathered in `scales`.
    scales.fill(0.0);
    for row in weight.chunks_exact(cols) {
        for (amax, group) in scales.iter_mut().zip(row.chunks(FP8_BLOCK_SIZE)) {
            *amax = amax.max(finite_amax(group).0);
        }
    }
    // Pass 2: encode block by block, then replace each amax by its scale.
    for (block, scale) in scales.iter_mut().enumerate() {
        let (multiplier, block_scale) = fp8_scale_for_amax(*scale);
        let start = block * FP8_BLOCK_SIZE;
        let end = (start + FP8_BLOCK_SIZE).min(cols);
        for (row, codes) in weight.chunks_exact(cols).zip(data.chunks_exact_mut(cols)) {
            for (code, &x) in codes[start..end].iter_mut().zip(&row[start..end]) {
                *code = encode_e4m3(x.into() * multiplier);
            }
        }
        *scale = block_scale;
    }
}

/// Quantizes a row-major `[rows, cols]` matrix to FP8_BLOCK (module rule). Any shape is
/// accepted; edge blocks may be partial.
pub fn quantize_fp8_block<W: SourceElement>(
    weight: &[W],
    rows: usize,
    cols: usize,
) -> Result<Fp8BlockMatrix> {
    check_matrix_len("FP8_BLOCK weight", rows, cols, weight.len())?;
    let scale_cols = cols.div_ceil(FP8_BLOCK_SIZE);
    let mut data = vec![0u8; rows * cols];
    let mut scales = vec![0f32; rows.div_ceil(FP8_BLOCK_SIZE) * scale_cols];
    if cols > 0 && rows > 0 {
        data.par_chunks_mut(FP8_BLOCK_SIZE * cols)
            .zip(scales.par_chunks_mut(scale_cols))
            .zip(weight.par_chunks(FP8_BLOCK_SIZE * cols))
            .for_each(|((block_data, block_scales), block_weight)| {
                quantize_block_row(block_weight, cols, block_data, block_scales)
            });
    }
    Ok(Fp8BlockMatrix {
        rows,
        cols,
        data,
        scales,
    })
}

impl Fp8BlockMatrix {
    /// Wraps E4M3 data `[rows, cols]` and f32 scales `[ceil(rows/128), ceil(cols/128)]` (a
    /// checkpoint's `weight` and `weight_scale_inv`), checking the shapes.
    pub fn from_parts(rows: usize, cols: usize, data: Vec<u8>, scales: Vec<f32>) -> Result<Self> {
        check_matrix_len("FP8_BLOCK data", rows, cols, data.len())?;
        let (scale_rows, scale_cols) =
            (rows.div_ceil(FP8_BLOCK_SIZE), cols.div_ceil(FP8_BLOCK_SIZE));
        ensure!(
            scales.len() == scale_rows * scale_cols,
            "FP8_BLOCK scales have {} elements, expected [ceil(rows/128) = {scale_rows}, ceil(cols/128) = {scale_cols}]",
            scales.len()
        );
        Ok(Fp8BlockMatrix {
            rows,
            cols,
            data,
            scales,
        })
    }

    /// N, the number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// K, the number of columns (the contiguous dimension).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// E4M3 elements, `[rows, cols]`.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// f32 block scales, `[scale_rows(), scale_cols()]`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// `ceil(rows / 128)`.
    pub fn scale_rows(&self) -> usize {
        self.rows.div_ceil(FP8_BLOCK_SIZE)
    }

    /// `ceil(cols / 128)`.
    pub fn scale_cols(&self) -> usize {
        self.cols.div_ceil(FP8_BLOCK_SIZE)
    }

    /// The scale of element `[row, col]`.
    pub fn scale_at(&self, row: usize, col: usize) -> f32 {
        self.scales[(row / FP8_BLOCK_SIZE) * self.scale_cols() + col / FP8_BLOCK_SIZE]
    }

    /// `(data, scales)`.
    pub fn into_parts(self) -> (Vec<u8>, Vec<f32>) {
        (self.data, self.scales)
    }

    /// Dequantizes row `row` into `out` (`cols` values).
    ///
    /// # Panics
    /// If `row >= rows` or `out.len() != cols`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows, "row {row} out of {}", self.rows);
        assert_eq!(out.len(), self.cols, "dequantize_row: output length");
        let scale_cols = self.scale_cols();
        let scales = &self.scales[(row / FP8_BLOCK_SIZE) * scale_cols..][..scale_cols];
        let codes = &self.data[row * self.cols..(row + 1) * self.cols];
        let groups = out
            .chunks_mut(FP8_BLOCK_SIZE)
            .zip(codes.chunks(FP8_BLOCK_SIZE));
        for ((values, group_codes), &scale) in groups.zip(scales) {
            for (v, &code) in values.iter_mut().zip(group_codes) {
                *v = decode_e4m3(code) * scale;
            }
        }
    }
}

impl RowDecode for Fp8BlockMatrix {
    const FORMAT: &'static str = "FP8_BLOCK";
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    fn decode_row(&self, row: usize, out: &mut [f32]) {
        self.dequantize_row(row, out);
    }
}

/// Half a unit in the last place of E4M3 at magnitude `t` (≤ 448), for the round-trip tests.
#[cfg(test)]
pub(crate) fn e4m3_half_ulp(t: f32) -> f32 {
    use super::e4m3::E4M3_MIN_NORMAL;
    use super::ue8m0::{floor_log2, pow2};
    if t < E4M3_MIN_NORMAL {
        pow2(-10)
    } else {
        pow2(floor_log2(t) - 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testing::sample_matrix;

    #[test]
    fn hand_computed_blocks_with_partial_edges() {
        // [130, 129]: 2 x 2 blocks, the last row block 2 rows high, the last column block 1 wide.
        let (rows, cols) = (130, 129);
        let mut w = vec![0f32; rows * cols];
        w[0] = 448.0 * 2.0; // block (0,0) amax 896 → scale 2, multiplier 0.5
        w[1] = -3.0; // → -1.5
        w[128] = 0.5; // block (0,1) amax 0.5 → scale 0.5/448, element 448
        w[128 * cols] = -1.0e-6; // block (1,0): amax floored at 1e-4
        let m = quantize_fp8_block(&w, rows, cols).unwrap();
        assert_eq!((m.scale_rows(), m.scale_cols()), (2, 2));
        assert_eq!(m.scales()[0], 2.0);
        assert_eq!(m.scales()[1], 0.5 / 448.0);
        assert_eq!(m.scales()[2], 1.0e-4 / 448.0);
        assert_eq!(m.scales()[3], 1.0e-4 / 448.0); // all-zero block
        assert_eq!(m.data()[0], 0x7E);
        assert_eq!(m.data()[1], encode_e4m3(-1.5));
        assert_eq!(m.data()[128], 0x7E);
        assert_eq!(
            m.data()[128 * cols],
            encode_e4m3(-1.0e-6 * (448.0 / 1.0e-4))
        );
        let back = m.dequantize();
        assert_eq!(&back[..2], &[896.0, -3.0]);
        assert!((back[128] - 0.5).abs() <= 0.5 * f32::EPSILON);
        assert_eq!(m.scale_at(129, 128), m.scales()[3]);
    }

    #[test]
    fn non_finite_values_do_not_poison_the_block() {
        let mut w = vec![1.0f32; 4 * 8];
        w[3] = f32::NAN;
        w[9] = f32::NEG_INFINITY;
        let m = quantize_fp8_block(&w, 4, 8).unwrap();
        assert_eq!(m.scales(), &[1.0 / 448.0]);
        assert_eq!(m.data()[3], 0x7F);
        assert_eq!(m.data()[9], 0xFE);
        assert_eq!(m.data()[0], 0x7E);
    }

    #[test]
    fn round_trip_error_is_within_half_an_ulp_of_the_scale() {
        let (rows, cols) = (300, 200);
        let w = sample_matrix(rows, cols, 17);
        let m = quantize_fp8_block(&w, rows, cols).unwrap();
        let back = m.dequantize();
        for (i, (&x, &y)) in w.iter().zip(&back).enumerate() {
            let scale = m.scale_at(i / cols, i % cols);
            let t = x.abs() / scale;
            // Half an E4M3 ulp of the scaled value, plus the f32 roundings of the multiplier,
            // the product and the dequantized product (relative 2^-22 covers them).
            let bound = e4m3_half_ulp(t.min(448.0)) * scale + x.abs() * 2f32.powi(-22);
            assert!((x - y).abs() <= bound, "element {i}: {x} -> {y}");
        }
        let mut row = vec![0f32; cols];
        m.dequantize_row(299, &mut row);
        assert_eq!(&row[..], &back[299 * cols..]);
    }

    #[test]
    fn from_parts_checks_the_scale_grid() {
        assert!(Fp8BlockMatrix::from_parts(129, 256, vec![0; 129 * 256], vec![1.0; 4]).is_ok());
        let err =
            Fp8BlockMatrix::from_parts(129, 256, vec![0; 129 * 256], vec![1.0; 2]).unwrap_err();
        assert!(
            err.message.contains("ceil(rows/128) = 2"),
            "{}",
            err.message
        );
        assert!(Fp8BlockMatrix::from_parts(2, 2, vec![0; 3], vec![1.0]).is_err());
        assert!(quantize_fp8_block(&[0f32; 5], 2, 3).is_err());
        let empty = quantize_fp8_block::<f32>(&[], 0, 7).unwrap();
        assert!(empty.scales().is_empty() && empty.dequantize().is_empty());
    }
}
