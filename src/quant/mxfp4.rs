//! MXFP4 weights (OCP Microscaling v1.0, the gpt-oss checkpoint format): a row-major `[N, K]`
//! matrix as E2M1 elements, two per byte (element `2i` of a row in the low nibble), and one
//! UE8M0 scale per 32 consecutive elements along K.
//!
//! Layout: `data` is `[N, K/2]` bytes, `scales` is `[N, K/32]` UE8M0 bytes, both row-major
//! (gpt-oss stores `blocks [.., K/32, 16]` and `scales [.., K/32]`, the same bytes).
//! Value: `w[n, k] = e2m1(data) · 2^(scales[n, k/32] - 127)`; a NaN scale (`0xFF`) makes its
//! 32 values NaN.
//!
//! Quantization follows the OCP MX v1.0 spec (§6.3) and its reference code (microsoft/
//! microxcaling `_shared_exponents`): per group of 32,
//! - `amax = max |x|`;
//! - shared exponent `e = floor(log2(amax)) - 2` (2 = emax of E2M1, whose largest value is
//!   1.5 · 2^2), computed exactly from the f32 bits and clamped to -127..=127;
//!   with amax in [2^m, 2^(m+1)) the scaled values lie in [0, 8), and those above 6 saturate
//!   (the spec's choice: it keeps the small values' precision at the cost of clipping the top
//!   quarter octave);
//! - `amax = 0` gives the smallest scale, 2^-127 (byte 0; the reference reaches the same byte
//!   by taking log2 of FP32_MIN_NORMAL and clamping), and all-zero elements;
//! - a group holding NaN or ±∞ gets the NaN scale `0xFF` and zero elements (E2M1 has no NaN);
//! - elements `= encode_e2m1(x · 2^-e)`: round to nearest even, saturating to ±6. Scaling by a
//!   power of two is exact, so this is the spec's `x / 2^e` bit for bit.

use rayon::prelude::*;

use super::e2m1::{decode_e2m1_pair, encode_e2m1, pack_e2m1};
use super::ue8m0::{decode_ue8m0, floor_log2, pow2, ue8m0_from_exponent, UE8M0_BIAS, UE8M0_NAN};
use super::RowDecode;
use super::{check_matrix_len, finite_amax, SourceElement};
use crate::error::{ensure, Result};

/// Elements sharing one scale, along K.
pub const MXFP4_GROUP_SIZE: usize = 32;

/// Largest exponent of an E2M1 value (6 = 1.5 · 2^2).
const E2M1_EMAX: i32 = 2;

/// An MXFP4 matrix. The fields are private so the shapes always agree; loaders of
/// pre-quantized checkpoints build one with [`Mxfp4Matrix::from_parts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mxfp4Matrix {
    rows: usize,
    cols: usize,
    /// `[rows, cols/2]`, two E2M1 per byte, low nibble first.
    data: Vec<u8>,
    /// `[rows, cols/32]` UE8M0.
    scales: Vec<u8>,
}

/// The UE8M0 scale byte of a group whose largest finite magnitude is `amax` (module rule).
#[inline]
pub fn mxfp4_scale_byte(amax: f32) -> u8 {
    if amax == 0.0 {
        return 0;
    }
    ue8m0_from_exponent(floor_log2(amax) - E2M1_EMAX)
}

/// Quantizes one group of `data.len() * 2` values and returns its scale byte.
#[inline]
fn quantize_group<W: SourceElement>(values: &[W], data: &mut [u8]) -> u8 {
    let (amax, all_finite) = finite_amax(values);
    if !all_finite {
        data.fill(0);
        return UE8M0_NAN;
    }
    let scale_byte = mxfp4_scale_byte(amax);
    // 2^-e with e in -127..=125: a normal f32, and the products below are exact.
    let inverse_scale = pow2(UE8M0_BIAS - scale_byte as i32);
    for (byte, pair) in data.iter_mut().zip(values.chunks_exact(2)) {
        let low = encode_e2m1(pair[0].into() * inverse_scale);
        let high = encode_e2m1(pair[1].into() * inverse_scale);
        *byte = pack_e2m1(low, high);
    }
    scale_byte
}

/// Quantizes one row of K values into `data` (K/2 bytes) and `scales` (K/32 bytes).
///
/// # Panics
/// If K is not a multiple of 32 or the output lengths do not match it.
pub fn quantize_mxfp4_row<W: SourceElement>(row: &[W], data: &mut [u8], scales: &mut [u8]) {
    assert!(
        row.len() % MXFP4_GROUP_SIZE == 0
            && data.len() * 2 == row.len()
            && scales.len() * MXFP4_GROUP_SIZE == row.len(),
        "quantize_mxfp4_row: lengths {} / {} / {} do not fit",
        row.len(),
        data.len(),
        scales.len()
    );
    let groups = row
        .chunks_exact(MXFP4_GROUP_SIZE)
        .zip(data.chunks_exact_mut(MXFP4_GROUP_SIZE / 2));
    for ((values, group_data), scale) in groups.zip(scales.iter_mut()) {
        *scale = quantize_group(values, group_data);
    }
}

/// Dequantizes one row: `data` (K/2 bytes) and `scales` (K/32 bytes) into `out` (K values).
///
/// # Panics
/// If the lengths do not fit together.
pub fn dequantize_mxfp4_row(data: &[u8], scales: &[u8], out: &mut [f32]) {
    assert!(
        out.len() % MXFP4_GROUP_SIZE == 0
            && data.len() * 2 == out.len()
            && scales.len() * MXFP4_GROUP_SIZE == out.len(),
        "dequantize_mxfp4_row: lengths {} / {} / {} do not fit",
        data.len(),
        scales.len(),
        out.len()
    );
    let groups = out
        .chunks_exact_mut(MXFP4_GROUP_SIZE)
        .zip(data.chunks_exact(MXFP4_GROUP_SIZE / 2));
    for ((values, group_data), &scale_byte) in groups.zip(scales) {
        let scale = decode_ue8m0(scale_byte);
        for (pair, &byte) in values.chunks_exact_mut(2).zip(group_data) {
            let [low, high] = decode_e2m1_pair(byte);
            pair[0] = low * scale;
            pair[1] = high * scale;
        }
    }
}

fn check_cols(cols: usize) -> Result<()> {
    ensure!(
        cols % MXFP4_GROUP_SIZE == 0,
        "MXFP4 needs K (cols, the contiguous dimension) to be a multiple of {MXFP4_GROUP_SIZE}, got cols = {cols}"
    );
    Ok(())
}

/// Quantizes a row-major `[rows, cols]` matrix to MXFP4 (module rule). `cols` (K) must be a
/// multiple of 32.
pub fn quantize_mxfp4<W: SourceElement>(
    weight: &[W],
    rows: usize,
    cols: usize,
) -> Result<Mxfp4Matrix> {
    check_cols(cols)?;
    check_matrix_len("MXFP4 weight", rows, cols, weight.len())?;
    let mut data = vec![0u8; rows * cols / 2];
    let mut scales = vec![0u8; rows * cols / MXFP4_GROUP_SIZE];
    if cols > 0 {
        data.par_chunks_mut(cols / 2)
            .zip(scales.par_chunks_mut(cols / MXFP4_GROUP_SIZE))
            .zip(weight.par_chunks(cols))
            .for_each(|((row_data, row_scales), row)| {
                quantize_mxfp4_row(row, row_data, row_scales)
            });
    }
    Ok(Mxfp4Matrix {
        rows,
        cols,
        data,
        scales,
    })
}

impl Mxfp4Matrix {
    /// Wraps packed data `[rows, cols/2]` and UE8M0 scales `[rows, cols/32]` (e.g. read from a
    /// checkpoint), checking the shapes.
    pub fn from_parts(rows: usize, cols: usize, data: Vec<u8>, scales: Vec<u8>) -> Result<Self> {
        check_cols(cols)?;
        check_matrix_len("MXFP4 data", rows, cols / 2, data.len())?;
        check_matrix_len("MXFP4 scales", rows, cols / MXFP4_GROUP_SIZE, scales.len())?;
        Ok(Mxfp4Matrix {
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

    /// Packed elements, `[rows, cols/2]`, low nibble first.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// UE8M0 scales, `[rows, cols/32]`.
    pub fn scales(&self) -> &[u8] {
        &self.scales
    }

    /// `(data, scales)`.
    pub fn into_parts(self) -> (Vec<u8>, Vec<u8>) {
        (self.data, self.scales)
    }

    /// Dequantizes row `row` into `out` (`cols` values).
    ///
    /// # Panics
    /// If `row >= rows` or `out.len() != cols`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows, "row {row} out of {}", self.rows);
        let half = self.cols / 2;
        let groups = self.cols / MXFP4_GROUP_SIZE;
        dequantize_mxfp4_row(
            &self.data[row * half..(row + 1) * half],
            &self.scales[row * groups..(row + 1) * groups],
            out,
        );
    }
}

impl RowDecode for Mxfp4Matrix {
    const FORMAT: &'static str = "MXFP4";
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
    use crate::quant::testing::sample_matrix;
    use half::bf16;

    /// Half a unit in the last place of E2M1 at magnitude `t` (≤ 6).
    fn e2m1_half_ulp(t: f32) -> f32 {
        if t < 2.0 {
            0.25
        } else if t < 4.0 {
            0.5
        } else {
            1.0
        }
    }

    /// Independent reference of one group, in f64 with a brute-force nearest-even search.
    fn reference_group(values: &[f32]) -> (u8, Vec<u8>) {
        let grid = [0.0f64, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        let amax = values.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        let exponent = if amax == 0.0 {
            -127
        } else {
            (amax.log2().floor() as i32 - 2).clamp(-127, 127)
        };
        let scale = 2f64.powi(exponent);
        let codes = values
            .iter()
            .map(|&v| {
                let t = (v.abs() as f64 / scale).min(6.0);
                let mut best = 0usize;
                for (i, &g) in grid.iter().enumerate() {
                    let (d, db) = ((t - g).abs(), (t - grid[best]).abs());
                    if d < db || (d == db && i % 2 == 0) {
                        best = i;
                    }
                }
                best as u8 | if v.is_sign_negative() { 8 } else { 0 }
            })
            .collect();
        ((exponent + 127) as u8, codes)
    }

    #[test]
    fn hand_computed_groups() {
        let mut row = vec![0f32; 128];
        // Group 0: amax 5 → floor(log2 5) - 2 = 0, scale 1; 5 is the 4/6 tie → 4, 0.75 → 1.
        row[0] = 5.0;
        row[1] = -0.75;
        row[2] = 2.5;
        // Group 1: amax 0.375 → floor(log2) = -2 → e = -4, scale 1/16; 0.375·16 = 6.
        row[32] = 0.375;
        row[33] = -0.0625; // 1.0
        row[34] = 0.01; // 0.16 → 0
                        // Group 2: all zero. Group 3: amax 7 → e = 0, 7 saturates to 6.
        row[96] = -7.0;
        row[97] = 1.25; // tie 1/1.5 → 1
        let m = quantize_mxfp4(&row, 1, 128).unwrap();
        assert_eq!(m.scales(), &[127, 123, 0, 127]);
        let d = m.data();
        assert_eq!(d[0], pack_e2m1(6, 8 | 2)); // 4, -1
        assert_eq!(d[1], pack_e2m1(4, 0)); // 2.5 → 2
        assert_eq!(d[16], pack_e2m1(7, 8 | 2)); // 6, -1
        assert_eq!(d[17], pack_e2m1(0, 0));
        assert!(d[32..48].iter().all(|&b| b == 0));
        assert_eq!(d[48], pack_e2m1(8 | 7, 2));
        let back = m.dequantize();
        assert_eq!(&back[..3], &[4.0, -1.0, 2.0]);
        assert_eq!(&back[32..35], &[0.375, -0.0625, 0.0]);
        assert_eq!(&back[96..98], &[-6.0, 1.0]);
    }

    #[test]
    fn non_finite_groups_get_the_nan_scale() {
        let mut row = vec![1.0f32; 64];
        row[3] = f32::NAN;
        row[40] = f32::INFINITY;
        let m = quantize_mxfp4(&row, 1, 64).unwrap();
        assert_eq!(m.scales(), &[0xFF, 0xFF]);
        assert!(m.data().iter().all(|&b| b == 0));
        assert!(m.dequantize().iter().all(|v| v.is_nan()));
        // A finite row next to it is unaffected.
        let m = quantize_mxfp4(&[&row[..32], &[1.0f32; 32][..]].concat(), 2, 32).unwrap();
        assert_eq!(m.scales(), &[0xFF, 125]);
    }

    #[test]
    fn tiny_and_huge_amax_clamp_the_exponent() {
        let mut row = vec![0f32; 32];
        row[0] = f32::from_bits(1); // 2^-149: e = -151 → clamped to -127
        assert_eq!(quantize_mxfp4(&row, 1, 32).unwrap().scales(), &[0]);
        row[0] = f32::MAX; // floor(log2) = 127 → e = 125
        let m = quantize_mxfp4(&row, 1, 32).unwrap();
        assert_eq!(m.scales(), &[252]);
        assert_eq!(m.dequantize()[0], 6.0 * 2f32.powi(125));
    }

    #[test]
    fn matches_the_independent_reference_bit_for_bit() {
        let (rows, cols) = (10, 256);
        let w = sample_matrix(rows, cols, 7);
        let m = quantize_mxfp4(&w, rows, cols).unwrap();
        for (g, values) in w.chunks(32).enumerate() {
            let (scale, codes) = reference_group(values);
            assert_eq!(m.scales()[g], scale, "group {g}");
            for (i, &code) in codes.iter().enumerate() {
                let byte = m.data()[g * 16 + i / 2];
                let got = if i % 2 == 0 { byte & 0xF } else { byte >> 4 };
                assert_eq!(got, code, "group {g} element {i}: {}", values[i]);
            }
        }
    }

    #[test]
    fn round_trip_error_is_within_half_an_ulp_of_the_scale() {
        let (rows, cols) = (37, 320);
        let w = sample_matrix(rows, cols, 11);
        let m = quantize_mxfp4(&w, rows, cols).unwrap();
        let back = m.dequantize();
        for (i, (&x, &y)) in w.iter().zip(&back).enumerate() {
            let scale = decode_ue8m0(m.scales()[i / 32]);
            let t = x.abs() / scale;
            let bound = if t > 6.0 {
                (t - 6.0) * scale
            } else {
                e2m1_half_ulp(t) * scale
            };
            assert!((x - y).abs() <= bound, "element {i}: {x} -> {y}");
            assert!(y == 0.0 || y.signum() == x.signum());
        }
        // Row by row gives the same values.
        let mut row = vec![0f32; cols];
        m.dequantize_row(5, &mut row);
        assert_eq!(&row[..], &back[5 * cols..6 * cols]);
    }

    #[test]
    fn bf16_input_equals_f32_input() {
        let w: Vec<bf16> = sample_matrix(4, 64, 3)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let as_f32: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        assert_eq!(
            quantize_mxfp4(&w, 4, 64).unwrap(),
            quantize_mxfp4(&as_f32, 4, 64).unwrap()
        );
    }

    #[test]
    fn shapes_are_checked() {
        let err = quantize_mxfp4(&[0f32; 40], 1, 40).unwrap_err();
        assert_eq!(err.status, FdmoeStatus::InvalidArgument);
        assert!(err.message.contains("cols = 40"), "{}", err.message);
        let err = quantize_mxfp4(&[0f32; 64], 3, 32).unwrap_err();
        assert!(err.message.contains("64 elements"), "{}", err.message);
        assert!(Mxfp4Matrix::from_parts(2, 64, vec![0; 64], vec![0; 4]).is_ok());
        assert!(Mxfp4Matrix::from_parts(2, 64, vec![0; 63], vec![0; 4]).is_err());
        assert!(Mxfp4Matrix::from_parts(2, 64, vec![0; 64], vec![0; 3]).is_err());
        let m = quantize_mxfp4::<f32>(&[], 0, 64).unwrap();
        assert!(m.data().is_empty() && m.dequantize().is_empty());
        let mut wrong = vec![0f32; 3];
        assert!(m.dequantize_into(&mut wrong).is_err());
    }
}
