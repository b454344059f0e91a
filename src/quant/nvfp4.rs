//! NVFP4 weights (NVIDIA's two-level FP4): a row-major `[N, K]` matrix as E2M1 elements, two
//! per byte (element `2i` in the low nibble), one positive E4M3 scale per 16 consecutive
//! elements along K, and one f32 global scale per matrix.
//!
//! Layout: `data` is `[N, K/2]` bytes, `block_scales` is `[N, K/16]` E4M3 bytes, both row-major
//! and unswizzled (the layout of ModelOpt / TensorRT-LLM checkpoint exports: `weight`,
//! `weight_scale`, `weight_scale_2`).
//! Value: `w[n, k] = e2m1(data) · (e4m3(block_scales[n, k/16]) · global_scale)`, the product of
//! the two scales rounded to f32 first (as ModelOpt's `NVFP4QTensor.dequantize`).
//!
//! Convention: NVIDIA ModelOpt `NVFP4QTensor` (modelopt/torch/quantization/qtensor/
//! nvfp4_tensor.py), which TensorRT-LLM and vLLM's ModelOpt loader consume:
//! - `global_scale = amax(|W|) / (6 · 448)` (ModelOpt's `weights_scaling_factor_2`, the
//!   checkpoint's `weight_scale_2`: a dequantization *multiplier*; vLLM's compressed-tensors
//!   `weight_global_scale` is its reciprocal). The amax runs over finite values; when it is 0
//!   (or the quotient underflows to 0) the global scale is 1.0 instead of ModelOpt's 0, which
//!   would turn every block scale into 0/0;
//! - per block of 16: `s = amax_block / (6 · global_scale)` in f32; `s = 0` becomes 1.0 (as
//!   ModelOpt); the byte is `encode_e4m3_scale(s)`: clamped to [2^-9, 448] (ModelOpt clamps at
//!   2^-9 too) and rounded to nearest even. Unlike PyTorch's cast, a block scale above 448
//!   (possible only with a caller-given global scale) saturates instead of becoming NaN;
//! - elements: `encode_e2m1(x / (e4m3(byte) · global_scale))`, round to nearest even with
//!   saturation to ±6 (the ties 2.5 and 3.5 round to even, like the hardware `cvt.rn`, where
//!   ModelOpt's Python `_cast_fp4` rounds both to 3);
//! - a block holding NaN or ±∞ gets the NaN scale `0x7F` and zero elements, so it dequantizes
//!   to NaN (E2M1 has no NaN).

use rayon::prelude::*;

use super::e2m1::{decode_e2m1_pair, encode_e2m1, pack_e2m1};
use super::e4m3::{decode_e4m3, encode_e4m3_scale, E4M3_MAX, E4M3_NAN};
use super::RowDecode;
use super::{check_matrix_len, finite_amax, SourceElement};
use crate::error::{ensure, Result};

/// Elements sharing one E4M3 scale, along K.
pub const NVFP4_GROUP_SIZE: usize = 16;

/// `6 · 448`: the largest E2M1 magnitude times the largest E4M3 scale.
pub const NVFP4_GLOBAL_AMAX_DIVISOR: f32 = 6.0 * E4M3_MAX;

/// An NVFP4 matrix. The fields are private so the shapes always agree; loaders of
/// pre-quantized checkpoints build one with [`Nvfp4Matrix::from_parts`].
#[derive(Debug, Clone, PartialEq)]
pub struct Nvfp4Matrix {
    rows: usize,
    cols: usize,
    /// `[rows, cols/2]`, two E2M1 per byte, low nibble first.
    data: Vec<u8>,
    /// `[rows, cols/16]` E4M3.
    block_scales: Vec<u8>,
    /// The per-matrix dequantization multiplier.
    global_scale: f32,
}

/// The global scale of a matrix whose largest finite magnitude is `amax` (module rule).
pub fn nvfp4_global_scale(amax: f32) -> f32 {
    let scale = amax / NVFP4_GLOBAL_AMAX_DIVISOR;
    if scale > 0.0 {
        scale
    } else {
        1.0
    }
}

/// The E4M3 scale byte of a block whose largest finite magnitude is `amax` (module rule).
#[inline]
pub fn nvfp4_block_scale_byte(amax: f32, global_scale: f32) -> u8 {
    let scale = amax / (6.0 * global_scale);
    encode_e4m3_scale(if scale == 0.0 { 1.0 } else { scale })
}

/// Quantizes one block of `data.len() * 2` values and returns its scale byte.
#[inline]
fn quantize_block<W: SourceElement>(values: &[W], global_scale: f32, data: &mut [u8]) -> u8 {
    let (amax, all_finite) = finite_amax(values);
    if !all_finite {
        data.fill(0);
        return E4M3_NAN;
    }
    let scale_byte = nvfp4_block_scale_byte(amax, global_scale);
    let divisor = decode_e4m3(scale_byte) * global_scale;
    for (byte, pair) in data.iter_mut().zip(values.chunks_exact(2)) {
        let low = encode_e2m1(pair[0].into() / divisor);
        let high = encode_e2m1(pair[1].into() / divisor);
        *byte = pack_e2m1(low, high);
    }
    scale_byte
}

/// Quantizes one row of K values into `data` (K/2 bytes) and `block_scales` (K/16 bytes)
/// with the given global scale.
///
/// # Panics
/// If K is not a multiple of 16 or the output lengths do not match it.
pub fn quantize_nvfp4_row<W: SourceElement>(
    row: &[W],
    global_scale: f32,
    data: &mut [u8],
    block_scales: &mut [u8],
) {
    assert!(
        row.len() % NVFP4_GROUP_SIZE == 0
            && data.len() * 2 == row.len()
            && block_scales.len() * NVFP4_GROUP_SIZE == row.len(),
        "quantize_nvfp4_row: lengths {} / {} / {} do not fit",
        row.len(),
        data.len(),
        block_scales.len()
    );
    let blocks = row
        .chunks_exact(NVFP4_GROUP_SIZE)
        .zip(data.chunks_exact_mut(NVFP4_GROUP_SIZE / 2));
    for ((values, block_data), scale) in blocks.zip(block_scales.iter_mut()) {
        *scale = quantize_block(values, global_scale, block_data);
    }
}

/// Dequantizes one row: `data` (K/2 bytes) and `block_scales` (K/16 bytes) into `out`.
///
/// # Panics
/// If the lengths do not fit together.
pub fn dequantize_nvfp4_row(data: &[u8], block_scales: &[u8], global_scale: f32, out: &mut [f32]) {
    assert!(
        out.len() % NVFP4_GROUP_SIZE == 0
            && data.len() * 2 == out.len()
            && block_scales.len() * NVFP4_GROUP_SIZE == out.len(),
        "dequantize_nvfp4_row: lengths {} / {} / {} do not fit",
        data.len(),
        block_scales.len(),
        out.len()
    );
    let blocks = out
        .chunks_exact_mut(NVFP4_GROUP_SIZE)
        .zip(data.chunks_exact(NVFP4_GROUP_SIZE / 2));
    for ((values, block_data), &scale_byte) in blocks.zip(block_scales) {
        let scale = decode_e4m3(scale_byte) * global_scale;
        for (pair, &byte) in values.chunks_exact_mut(2).zip(block_data) {
            let [low, high] = decode_e2m1_pair(byte);
            pair[0] = low * scale;
            pair[1] = high * scale;
        }
    }
}

fn check_cols(cols: usize) -> Result<()> {
    ensure!(
        cols % NVFP4_GROUP_SIZE == 0,
        "NVFP4 needs K (cols, the contiguous dimension) to be a multiple of {NVFP4_GROUP_SIZE}, got cols = {cols}"
    );
    Ok(())
}

/// Quantizes a row-major `[rows, cols]` matrix to NVFP4 with the global scale computed from
/// its amax (module rule). `cols` (K) must be a multiple of 16.
pub fn quantize_nvfp4<W: SourceElement>(
    weight: &[W],
    rows: usize,
    cols: usize,
) -> Result<Nvfp4Matrix> {
    check_cols(cols)?;
    check_matrix_len("NVFP4 weight", rows, cols, weight.len())?;
    let amax = weight
        .par_chunks(4096)
        .map(|chunk| finite_amax(chunk).0)
        .reduce(|| 0.0, f32::max);
    quantize_nvfp4_with_global_scale(weight, rows, cols, nvfp4_global_scale(amax))
}

/// Quantizes with a given global scale (e.g. one shared by the gate and up projections, which
/// a fused W13 GEMM needs; ModelOpt exports take the max of the two). `global_scale` must be
/// positive and finite.
pub fn quantize_nvfp4_with_global_scale<W: SourceElement>(
    weight: &[W],
    rows: usize,
    cols: usize,
    global_scale: f32,
) -> Result<Nvfp4Matrix> {
    check_cols(cols)?;
    check_matrix_len("NVFP4 weight", rows, cols, weight.len())?;
    ensure!(
        global_scale > 0.0 && global_scale.is_finite(),
        "NVFP4 global_scale = {global_scale} must be positive and finite"
    );
    let mut data = vec![0u8; rows * cols / 2];
    let mut block_scales = vec![0u8; rows * cols / NVFP4_GROUP_SIZE];
    if cols > 0 {
        data.par_chunks_mut(cols / 2)
            .zip(block_scales.par_chunks_mut(cols / NVFP4_GROUP_SIZE))
            .zip(weight.par_chunks(cols))
            .for_each(|((row_data, row_scales), row)| {
                quantize_nvfp4_row(row, global_scale, row_data, row_scales)
            });
    }
    Ok(Nvfp4Matrix {
        rows,
        cols,
        data,
        block_scales,
        global_scale,
    })
}

impl Nvfp4Matrix {
    /// Wraps packed data `[rows, cols/2]`, E4M3 block scales `[rows, cols/16]` and the global
    /// scale (e.g. read from a checkpoint), checking the shapes.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        data: Vec<u8>,
        block_scales: Vec<u8>,
        global_scale: f32,
    ) -> Result<Self> {
        check_cols(cols)?;
        check_matrix_len("NVFP4 data", rows, cols / 2, data.len())?;
        check_matrix_len(
            "NVFP4 block scales",
            rows,
            cols / NVFP4_GROUP_SIZE,
            block_scales.len(),
        )?;
        ensure!(
            global_scale.is_finite(),
            "NVFP4 global_scale = {global_scale} must be finite"
        );
        Ok(Nvfp4Matrix {
            rows,
            cols,
            data,
            block_scales,
            global_scale,
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

    /// Packed elements, `[rows, cols/2]`, low nibble first.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// E4M3 block scales, `[rows, cols/16]`.
    pub fn block_scales(&self) -> &[u8] {
        &self.block_scales
    }

    /// The per-matrix dequantization multiplier.
    pub fn global_scale(&self) -> f32 {
        self.global_scale
    }

    /// `(data, block_scales, global_scale)`.
    pub fn into_parts(self) -> (Vec<u8>, Vec<u8>, f32) {
        (self.data, self.block_scales, self.global_scale)
    }

    /// Dequantizes row `row` into `out` (`cols` values).
    ///
    /// # Panics
    /// If `row >= rows` or `out.len() != cols`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows, "row {row} out of {}", self.rows);
        let half = self.cols / 2;
        let blocks = self.cols / NVFP4_GROUP_SIZE;
        dequantize_nvfp4_row(
            &self.data[row * half..(row + 1) * half],
            &self.block_scales[row * blocks..(row + 1) * blocks],
            self.global_scale,
            out,
        );
    }
}

impl RowDecode for Nvfp4Matrix {
    const FORMAT: &'static str = "NVFP4";
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    fn decode_row(&self, row: usize, out: &mut [f32]) {
        self.dequantize_row(row, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FdmoeStatus;
    use crate::quant::e4m3::encode_e4m3;
    use crate::quant::testing::sample_matrix;

    #[test]
    fn hand_computed_blocks() {
        // amax 2688 → global scale 1. Block 0: amax 2688 → s = 448 (0x7E); 2688/448 = 6,
        // -1344/448 = -3, 700/448 = 1.5625 → 1.5. Block 1: amax 3 → s = 0.5 (0x30); 3/0.5 = 6,
        // 1.25/0.5 = 2.5 → tie → 2. Block 2: zero → s = 1 (0x38).
        let mut row = vec![0f32; 48];
        row[0] = 2688.0;
        row[1] = -1344.0;
        row[2] = 700.0;
        row[16] = 3.0;
        row[17] = 1.25;
        let m = quantize_nvfp4(&row, 1, 48).unwrap();
        assert_eq!(m.global_scale(), 1.0);
        assert_eq!(m.block_scales(), &[0x7E, 0x30, 0x38]);
        assert_eq!(m.data()[0], pack_e2m1(7, 8 | 5));
        assert_eq!(m.data()[1], pack_e2m1(3, 0));
        assert_eq!(m.data()[8], pack_e2m1(7, 4));
        let back = m.dequantize();
        assert_eq!(&back[..3], &[2688.0, -1344.0, 672.0]);
        assert_eq!(&back[16..18], &[3.0, 1.0]);
        assert!(back[32..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn global_scale_rule() {
        assert_eq!(nvfp4_global_scale(2688.0), 1.0);
        assert_eq!(nvfp4_global_scale(0.0), 1.0);
        assert_eq!(nvfp4_global_scale(f32::from_bits(1)), 1.0); // underflows to 0
        let m = quantize_nvfp4(&[0f32; 32], 2, 16).unwrap();
        assert_eq!(m.global_scale(), 1.0);
        assert_eq!(m.block_scales(), &[0x38, 0x38]);
        assert!(m.dequantize().iter().all(|&v| v == 0.0));
        // Non-finite values do not enter the global amax; their block is NaN.
        let mut row = vec![1.0f32; 32];
        row[20] = f32::INFINITY;
        let m = quantize_nvfp4(&row, 1, 32).unwrap();
        assert_eq!(m.global_scale(), 1.0 / 2688.0);
        assert_eq!(m.block_scales()[1], E4M3_NAN);
        let back = m.dequantize();
        assert!(back[..16].iter().all(|&v| (v - 1.0).abs() < 1.0e-6));
        assert!(back[16..].iter().all(|v| v.is_nan()));
    }

    #[test]
    fn block_scales_follow_the_modelopt_formula() {
        let (rows, cols) = (6, 64);
        let w = sample_matrix(rows, cols, 5);
        let m = quantize_nvfp4(&w, rows, cols).unwrap();
        let amax = w.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert_eq!(m.global_scale(), amax / 2688.0);
        for (b, block) in w.chunks(16).enumerate() {
            let block_amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let s = block_amax / (6.0 * m.global_scale());
            assert_eq!(
                m.block_scales()[b],
                encode_e4m3(s.max(1.0 / 512.0)),
                "block {b}"
            );
        }
    }

    #[test]
    fn round_trip_error_is_within_half_an_ulp_of_the_scale() {
        let (rows, cols) = (23, 256);
        let w = sample_matrix(rows, cols, 13);
        let m = quantize_nvfp4(&w, rows, cols).unwrap();
        let back = m.dequantize();
        for (i, (&x, &y)) in w.iter().zip(&back).enumerate() {
            let scale = decode_e4m3(m.block_scales()[i / 16]) * m.global_scale();
            let t = x.abs() / scale;
            // The element error is half an E2M1 ulp of the scaled value (or the saturation
            // excess), plus f32 rounding of the division and the product (relative 2^-22).
            let half_ulp = if t > 6.0 {
                t - 6.0
            } else if t < 2.0 {
                0.25
            } else if t < 4.0 {
                0.5
            } else {
                1.0
            };
            let bound = half_ulp * scale + x.abs() * 2f32.powi(-22);
            assert!((x - y).abs() <= bound, "element {i}: {x} -> {y}");
        }
        // The E4M3 scale keeps relative error small on rows of very different magnitudes.
        let err: f64 = w
            .iter()
            .zip(&back)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum();
        let norm: f64 = w.iter().map(|x| (*x as f64).powi(2)).sum();
        assert!(
            (err / norm).sqrt() < 0.15,
            "relative error {}",
            (err / norm).sqrt()
        );
    }

    #[test]
    fn given_global_scale_and_shapes() {
        let w = sample_matrix(2, 32, 1);
        let shared = quantize_nvfp4_with_global_scale(&w, 2, 32, 0.25).unwrap();
        assert_eq!(shared.global_scale(), 0.25);
        let err = quantize_nvfp4_with_global_scale(&w, 2, 32, 0.0).unwrap_err();
        assert!(err.message.contains("global_scale"), "{}", err.message);
        let err = quantize_nvfp4(&w, 1, 24).unwrap_err();
        assert_eq!(err.status, FdmoeStatus::InvalidArgument);
        assert!(err.message.contains("cols = 24"), "{}", err.message);
        assert!(quantize_nvfp4(&w, 3, 16).is_err());
        let (data, scales, gs) = shared.clone().into_parts();
        let rebuilt = Nvfp4Matrix::from_parts(2, 32, data, scales, gs).unwrap();
        assert_eq!(rebuilt, shared);
        assert!(Nvfp4Matrix::from_parts(2, 32, vec![0; 32], vec![0; 3], 1.0).is_err());
        let mut row = vec![0f32; 32];
        shared.dequantize_row(1, &mut row);
        assert_eq!(&row[..], &shared.dequantize()[32..]);
    }
}
