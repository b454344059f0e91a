//! FP8 activations for the `FP8_BLOCK` GEMMs: each token row of a `[T, K]` activation is
//! quantized on the fly to E4M3 with one f32 scale per 128 consecutive channels.
//!
//! Layout: `data` is `[T, K]` E4M3 bytes; `scales` is `[T, ceil(K/128)]` f32, row-major; the
//! last group of a row may be partial (K need not be a multiple of 128).
//! Value: `x[t, k] = e4m3(data[t, k]) · scales[t, k/128]`.
//!
//! The rule is the one of the weights ([`fp8_scale_for_amax`], DeepGEMM's reference
//! `per_token_cast_to_fp8`): per group, `amax = max(max |x| over finite values, 1e-4)`,
//! elements `encode_e4m3(x · (448 / amax))`, `scale = amax / 448`. A GEMM then computes
//! `Σ_k a[t,k] · w[n,k] = Σ_groups scale_a · scale_w · Σ_k e4m3_a · e4m3_w` with f32
//! accumulation; the CPU reference does exactly that.

use rayon::prelude::*;

use super::e4m3::{decode_e4m3, encode_e4m3};
use super::fp8_block::fp8_scale_for_amax;
use super::{check_matrix_len, finite_amax, SourceElement};
use crate::error::{ensure, Result};

/// Channels sharing one scale, along K.
pub const FP8_ACT_GROUP_SIZE: usize = 128;

/// Quantized activations with their shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Activations {
    rows: usize,
    cols: usize,
    /// `[rows, cols]` E4M3.
    data: Vec<u8>,
    /// `[rows, ceil(cols/128)]` f32.
    scales: Vec<f32>,
}

/// Quantizes one token row into `data` (same length) and `scales` (`ceil(len/128)` values).
///
/// # Panics
/// If the output lengths do not fit the row.
pub fn quantize_fp8_activation_row<X: SourceElement>(
    row: &[X],
    data: &mut [u8],
    scales: &mut [f32],
) {
    assert!(
        data.len() == row.len() && scales.len() == row.len().div_ceil(FP8_ACT_GROUP_SIZE),
        "quantize_fp8_activation_row: lengths {} / {} / {} do not fit",
        row.len(),
        data.len(),
        scales.len()
    );
    let groups = row
        .chunks(FP8_ACT_GROUP_SIZE)
        .zip(data.chunks_mut(FP8_ACT_GROUP_SIZE));
    for ((values, codes), scale) in groups.zip(scales.iter_mut()) {
        let (multiplier, group_scale) = fp8_scale_for_amax(finite_amax(values).0);
        for (code, &x) in codes.iter_mut().zip(values) {
            *code = encode_e4m3(x.into() * multiplier);
        }
        *scale = group_scale;
    }
}

/// Dequantizes one token row: `data` and `scales` (`ceil(len/128)`) into `out`.
///
/// # Panics
/// If the lengths do not fit together.
pub fn dequantize_fp8_activation_row(data: &[u8], scales: &[f32], out: &mut [f32]) {
    assert!(
        data.len() == out.len() && scales.len() == out.len().div_ceil(FP8_ACT_GROUP_SIZE),
        "dequantize_fp8_activation_row: lengths {} / {} / {} do not fit",
        data.len(),
        scales.len(),
        out.len()
    );
    let groups = out
        .chunks_mut(FP8_ACT_GROUP_SIZE)
        .zip(data.chunks(FP8_ACT_GROUP_SIZE));
    for ((values, codes), &scale) in groups.zip(scales) {
        for (v, &code) in values.iter_mut().zip(codes) {
            *v = decode_e4m3(code) * scale;
        }
    }
}

/// Replaces one token row by its FP8 round trip (quantize, then dequantize) in place: what a
/// GEMM over the quantized row computes with, as f32. Equal to `quantize_fp8_activation_row`
/// followed by `dequantize_fp8_activation_row`, with no buffers (the CPU reference applies it
/// to the inputs of the `FP8_BLOCK` GEMMs).
pub fn fake_quantize_fp8_activation_row(row: &mut [f32]) {
    for group in row.chunks_mut(FP8_ACT_GROUP_SIZE) {
        let (multiplier, scale) = fp8_scale_for_amax(finite_amax(group).0);
        for v in group.iter_mut() {
            *v = decode_e4m3(encode_e4m3(*v * multiplier)) * scale;
        }
    }
}

/// Quantizes `[rows, cols]` activations into caller-owned buffers: `data` `[rows, cols]` and
/// `scales` `[rows, ceil(cols/128)]` (no allocation, for the forward path).
pub fn quantize_fp8_activations_into<X: SourceElement>(
    x: &[X],
    rows: usize,
    cols: usize,
    data: &mut [u8],
    scales: &mut [f32],
) -> Result<()> {
    check_matrix_len("FP8 activations", rows, cols, x.len())?;
    check_matrix_len("FP8 activation data", rows, cols, data.len())?;
    let scale_cols = cols.div_ceil(FP8_ACT_GROUP_SIZE);
    ensure!(
        scales.len() == rows * scale_cols,
        "FP8 activation scales have {} elements, expected rows ({rows}) x ceil(cols/128) ({scale_cols})",
        scales.len()
    );
    if cols > 0 {
        data.par_chunks_mut(cols)
            .zip(scales.par_chunks_mut(scale_cols))
            .zip(x.par_chunks(cols))
            .with_min_len(8)
            .for_each(|((row_data, row_scales), row)| {
                quantize_fp8_activation_row(row, row_data, row_scales)
            });
    }
    Ok(())
}

/// Quantizes `[rows, cols]` activations into a new [`Fp8Activations`].
pub fn quantize_fp8_activations<X: SourceElement>(
    x: &[X],
    rows: usize,
    cols: usize,
) -> Result<Fp8Activations> {
    check_matrix_len("FP8 activations", rows, cols, x.len())?;
    let mut data = vec![0u8; rows * cols];
    let mut scales = vec![0f32; rows * cols.div_ceil(FP8_ACT_GROUP_SIZE)];
    quantize_fp8_activations_into(x, rows, cols, &mut data, &mut scales)?;
    Ok(Fp8Activations {
        rows,
        cols,
        data,
        scales,
    })
}

impl Fp8Activations {
    /// T, the number of token rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// K, the number of channels.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// E4M3 elements, `[rows, cols]`.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// f32 scales, `[rows, scale_cols()]`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// `ceil(cols / 128)`.
    pub fn scale_cols(&self) -> usize {
        self.cols.div_ceil(FP8_ACT_GROUP_SIZE)
    }

    /// `(data, scales)`.
    pub fn into_parts(self) -> (Vec<u8>, Vec<f32>) {
        (self.data, self.scales)
    }

    /// Dequantizes token row `row` into `out` (`cols` values).
    ///
    /// # Panics
    /// If `row >= rows` or `out.len() != cols`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows, "row {row} out of {}", self.rows);
        let scale_cols = self.scale_cols();
        dequantize_fp8_activation_row(
            &self.data[row * self.cols..(row + 1) * self.cols],
            &self.scales[row * scale_cols..(row + 1) * scale_cols],
            out,
        );
    }

    /// All rows as f32, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            out.chunks_mut(self.cols)
                .enumerate()
                .for_each(|(row, values)| self.dequantize_row(row, values));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::fp8_block::e4m3_half_ulp;
    use crate::quant::testing::sample_matrix;
    use half::bf16;

    #[test]
    fn hand_computed_row_with_a_partial_group() {
        // K = 130: groups of 128 and 2.
        let mut x = vec![0f32; 2 * 130];
        x[0] = 4.0; // amax 4 → multiplier 112, scale 4/448
        x[1] = -1.0; // → -112
        x[128] = 0.0; // last group of row 0 all zero → amax floored at 1e-4
        x[130 + 129] = -2.0; // row 1, last group: amax 2 → -448
        let q = quantize_fp8_activations(&x, 2, 130).unwrap();
        assert_eq!(q.scale_cols(), 2);
        assert_eq!(
            q.scales(),
            &[4.0 / 448.0, 1.0e-4 / 448.0, 1.0e-4 / 448.0, 2.0 / 448.0]
        );
        assert_eq!(q.data()[0], 0x7E);
        assert_eq!(q.data()[1], encode_e4m3(-112.0));
        assert_eq!(q.data()[130 + 129], 0xFE);
        assert!(q.data()[130..130 + 129].iter().all(|&c| c == 0));
    }

    #[test]
    fn fake_quantization_is_the_round_trip() {
        let (rows, cols) = (7, 300);
        let mut x = sample_matrix(rows, cols, 41);
        x[5] = f32::NAN;
        x[400] = f32::INFINITY;
        let back = quantize_fp8_activations(&x, rows, cols)
            .unwrap()
            .dequantize();
        for row in x.chunks_mut(cols) {
            fake_quantize_fp8_activation_row(row);
        }
        for (i, (a, b)) in x.iter().zip(&back).enumerate() {
            assert!(a.to_bits() == b.to_bits(), "element {i}: {a} vs {b}");
        }
    }

    #[test]
    fn round_trip_error_is_within_half_an_ulp_of_the_scale() {
        let (rows, cols) = (9, 300);
        let x = sample_matrix(rows, cols, 23);
        let q = quantize_fp8_activations(&x, rows, cols).unwrap();
        let back = q.dequantize();
        for (i, (&v, &y)) in x.iter().zip(&back).enumerate() {
            let scale = q.scales()[(i / cols) * 3 + (i % cols) / 128];
            let t = v.abs() / scale;
            let bound = e4m3_half_ulp(t.min(448.0)) * scale + v.abs() * 2f32.powi(-22);
            assert!((v - y).abs() <= bound, "element {i}: {v} -> {y}");
        }
    }

    #[test]
    fn into_buffers_and_bf16_input() {
        let x: Vec<bf16> = sample_matrix(3, 256, 2)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let mut data = vec![0xAAu8; 3 * 256];
        let mut scales = vec![0f32; 3 * 2];
        quantize_fp8_activations_into(&x, 3, 256, &mut data, &mut scales).unwrap();
        let as_f32: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let q = quantize_fp8_activations(&as_f32, 3, 256).unwrap();
        assert_eq!((&data[..], &scales[..]), (q.data(), q.scales()));
        let mut short = vec![0f32; 5];
        let err = quantize_fp8_activations_into(&x, 3, 256, &mut data, &mut short).unwrap_err();
        assert!(err.message.contains("scales"), "{}", err.message);
        assert!(quantize_fp8_activations(&as_f32, 4, 256).is_err());
    }
}
