//! FP8 pre-dispatch (SPEC §5; the MegaMoE input format sent before the expert-parallel
//! transfer): BF16 activations `x [T, H]` become E4M3 `[T_max, H]` with one UE8M0 scale per
//! 32 channels, packed four to an int32, and the top-k ids/weights travel beside them.
//!
//! Per token and group of 32 channels:
//! - `amax = max |x|` over the group (NaN skipped, like CUDA's `fmaxf`), clamped below at 1e-4;
//! - `exponent = ceil(log2(amax / 448))`, with `amax / 448` rounded to f32 and the ceiling
//!   taken exactly from its bits (DeepGEMM's `fast_log2_ceil`; a float `log2` can round a value
//!   just above a power of two down onto it);
//! - the scale is `2^exponent`, stored as its biased byte `exponent + 127` (UE8M0);
//! - elements `encode_e4m3(x · 2^-exponent)`, exact scaling then round to nearest even,
//!   saturating to ±448; a NaN element encodes to `0x7F`;
//! - a group holding ±∞ gets the NaN scale `0xFF` and zero elements (it decodes to NaN).
//!
//! For f32/bf16 inputs the exponent stays within -22..=120, so no scale is clamped.
//!
//! Layouts (all row-major, `T_max` rows, `T_max` = the buffers' capacity):
//! - `data [T_max, H]` u8 E4M3;
//! - `scales [T_max, H/128]` int32: byte `j` (little-endian, byte 0 the lowest) of element
//!   `[t, c]` is the UE8M0 scale of channel group `4c + j`, i.e. of channels
//!   `32(4c + j) .. 32(4c + j) + 32`. H must therefore be a multiple of 128;
//! - `topk_ids [T_max, k]` int32 and `topk_weights [T_max, k]` f32, copied verbatim (ids are
//!   not range-checked here).
//!
//! Rows `T..T_max` are padding: ids -1, weights 0, and zero `data` and `scales` (E4M3 +0 with
//! scale byte 0 = 2^-127, which decodes to 0). Every buffer is written in full on every call,
//! so stale rows never leak. All arguments, the capacity `T <= T_max` included
//! (`CapacityExceeded`), are checked before the first write: on error the buffers are untouched.

use rayon::prelude::*;

use super::e4m3::{decode_e4m3, encode_e4m3, E4M3_MAX};
use super::ue8m0::{ceil_log2, decode_ue8m0, pow2, UE8M0_BIAS, UE8M0_NAN};
use super::SourceElement;
use crate::error::{ensure, Error, FdmoeStatus, Result};

/// Channels sharing one UE8M0 scale.
pub const PRE_DISPATCH_GROUP_SIZE: usize = 32;
/// UE8M0 scales packed in one int32.
pub const PRE_DISPATCH_SCALES_PER_INT: usize = 4;
/// Channels covered by one packed int32 of scales; H must be a multiple of it.
pub const PRE_DISPATCH_CHANNELS_PER_INT: usize =
    PRE_DISPATCH_GROUP_SIZE * PRE_DISPATCH_SCALES_PER_INT;
/// The floor of the group amax.
pub const PRE_DISPATCH_AMAX_FLOOR: f32 = 1.0e-4;
/// The expert id of a padding slot.
pub const PADDING_EXPERT_ID: i32 = -1;

/// The UE8M0 scale byte of a group whose largest magnitude (NaN skipped) is `amax`.
#[inline]
pub fn pre_dispatch_scale_byte(amax: f32) -> u8 {
    if amax.is_infinite() {
        return UE8M0_NAN;
    }
    let exponent = ceil_log2(amax.max(PRE_DISPATCH_AMAX_FLOOR) / E4M3_MAX);
    (exponent + UE8M0_BIAS) as u8
}

/// Quantizes one group of 32 values into `codes`, returning its scale byte.
#[inline]
fn quantize_group<X: SourceElement>(values: &[X], codes: &mut [u8]) -> u8 {
    let amax = values.iter().fold(0f32, |m, &v| m.max(v.into().abs()));
    let scale_byte = pre_dispatch_scale_byte(amax);
    if scale_byte == UE8M0_NAN {
        codes.fill(0);
        return scale_byte;
    }
    let inverse_scale = pow2(UE8M0_BIAS - scale_byte as i32);
    for (code, &x) in codes.iter_mut().zip(values) {
        *code = encode_e4m3(x.into() * inverse_scale);
    }
    scale_byte
}

/// Replaces one row by its pre-dispatch round trip in place: each group of 32 quantized by the
/// rule above and decoded back (`decode_e4m3(code) * scale`, NaN for a group holding ±∞). What
/// the routed-expert GEMMs of `act_quant = FP8_MX` compute with, as f32 (the CPU reference
/// applies it to both GEMMs' inputs). A last group shorter than 32 is quantized on its own.
pub fn fake_pre_dispatch_row(row: &mut [f32]) {
    let mut codes = [0u8; PRE_DISPATCH_GROUP_SIZE];
    for group in row.chunks_mut(PRE_DISPATCH_GROUP_SIZE) {
        let codes = &mut codes[..group.len()];
        let scale = decode_ue8m0(quantize_group(group, codes));
        for (v, &code) in group.iter_mut().zip(codes.iter()) {
            *v = decode_e4m3(code) * scale;
        }
    }
}

/// Quantizes one token row of H values into `data` (H bytes) and `scales` (H/128 int32).
///
/// # Panics
/// If H is not a multiple of 128 or the output lengths do not match it.
pub fn pre_dispatch_row<X: SourceElement>(row: &[X], data: &mut [u8], scales: &mut [i32]) {
    assert!(
        row.len() % PRE_DISPATCH_CHANNELS_PER_INT == 0
            && data.len() == row.len()
            && scales.len() * PRE_DISPATCH_CHANNELS_PER_INT == row.len(),
        "pre_dispatch_row: lengths {} / {} / {} do not fit",
        row.len(),
        data.len(),
        scales.len()
    );
    let chunks = row
        .chunks_exact(PRE_DISPATCH_CHANNELS_PER_INT)
        .zip(data.chunks_exact_mut(PRE_DISPATCH_CHANNELS_PER_INT));
    for ((values, codes), packed) in chunks.zip(scales.iter_mut()) {
        let mut bytes = [0u8; PRE_DISPATCH_SCALES_PER_INT];
        let groups = values
            .chunks_exact(PRE_DISPATCH_GROUP_SIZE)
            .zip(codes.chunks_exact_mut(PRE_DISPATCH_GROUP_SIZE));
        for (byte, (group, group_codes)) in bytes.iter_mut().zip(groups) {
            *byte = quantize_group(group, group_codes);
        }
        *packed = i32::from_le_bytes(bytes);
    }
}

/// The UE8M0 byte of channel group `group` in a row of packed scales.
#[inline]
pub fn pre_dispatch_scale_of_group(scales: &[i32], group: usize) -> u8 {
    scales[group / PRE_DISPATCH_SCALES_PER_INT].to_le_bytes()[group % PRE_DISPATCH_SCALES_PER_INT]
}

/// Dequantizes one token row: `data` (H bytes) and packed `scales` (H/128 int32) into `out`.
///
/// # Panics
/// If the lengths do not fit together.
pub fn dequantize_pre_dispatch_row(data: &[u8], scales: &[i32], out: &mut [f32]) {
    assert!(
        data.len() == out.len() && scales.len() * PRE_DISPATCH_CHANNELS_PER_INT == out.len(),
        "dequantize_pre_dispatch_row: lengths {} / {} / {} do not fit",
        data.len(),
        scales.len(),
        out.len()
    );
    let groups = out
        .chunks_exact_mut(PRE_DISPATCH_GROUP_SIZE)
        .zip(data.chunks_exact(PRE_DISPATCH_GROUP_SIZE));
    for (group, (values, codes)) in groups.enumerate() {
        let scale = decode_ue8m0(pre_dispatch_scale_of_group(scales, group));
        for (v, &code) in values.iter_mut().zip(codes) {
            *v = decode_e4m3(code) * scale;
        }
    }
}

/// The caller's output buffers, each sized for the capacity `T_max` (see the module notes).
pub struct PreDispatchOutput<'a> {
    /// `[T_max, H]` E4M3.
    pub data: &'a mut [u8],
    /// `[T_max, H/128]` packed UE8M0.
    pub scales: &'a mut [i32],
    /// `[T_max, k]`.
    pub topk_ids: &'a mut [i32],
    /// `[T_max, k]`.
    pub topk_weights: &'a mut [f32],
}

/// Pre-dispatches `x [T, H]` with its routing `topk_ids`/`topk_weights [T, k]` into `out`,
/// padding rows `T..T_max`. T comes from `x.len() / hidden_size` and `T_max` from
/// `out.data.len() / hidden_size`. Returns T.
///
/// Errors (before any write): `InvalidArgument` for a shape that does not fit (H not a
/// positive multiple of 128, lengths that disagree), `CapacityExceeded` when T > T_max.
pub fn pre_dispatch_fp8_into<X: SourceElement>(
    x: &[X],
    topk_ids: &[i32],
    topk_weights: &[f32],
    hidden_size: usize,
    top_k: usize,
    out: PreDispatchOutput<'_>,
) -> Result<usize> {
    ensure!(
        hidden_size > 0 && hidden_size % PRE_DISPATCH_CHANNELS_PER_INT == 0,
        "FP8 pre-dispatch needs hidden_size to be a positive multiple of {PRE_DISPATCH_CHANNELS_PER_INT} (4 UE8M0 scales of 32 channels per int32), got hidden_size = {hidden_size}"
    );
    ensure!(
        x.len() % hidden_size == 0,
        "pre-dispatch x has {} elements, not a whole number of rows of hidden_size = {hidden_size}",
        x.len()
    );
    let tokens = x.len() / hidden_size;
    ensure!(
        topk_ids.len() == tokens * top_k && topk_weights.len() == tokens * top_k,
        "pre-dispatch topk_ids / topk_weights have {} / {} elements, expected tokens ({tokens}) x top_k ({top_k})",
        topk_ids.len(),
        topk_weights.len()
    );
    ensure!(
        out.data.len() % hidden_size == 0,
        "pre-dispatch output data has {} elements, not a whole number of rows of hidden_size = {hidden_size}",
        out.data.len()
    );
    let max_tokens = out.data.len() / hidden_size;
    let scale_cols = hidden_size / PRE_DISPATCH_CHANNELS_PER_INT;
    ensure!(
        out.scales.len() == max_tokens * scale_cols,
        "pre-dispatch output scales have {} elements, expected max_tokens ({max_tokens}) x hidden_size/128 ({scale_cols})",
        out.scales.len()
    );
    ensure!(
        out.topk_ids.len() == max_tokens * top_k && out.topk_weights.len() == max_tokens * top_k,
        "pre-dispatch output topk_ids / topk_weights have {} / {} elements, expected max_tokens ({max_tokens}) x top_k ({top_k})",
        out.topk_ids.len(),
        out.topk_weights.len()
    );
    if tokens > max_tokens {
        return Err(Error::new(
            FdmoeStatus::CapacityExceeded,
            format!(
                "pre-dispatch: tokens = {tokens} exceeds the capacity max_tokens = {max_tokens}"
            ),
        ));
    }

    let (data, padding_data) = out.data.split_at_mut(tokens * hidden_size);
    let (scales, padding_scales) = out.scales.split_at_mut(tokens * scale_cols);
    data.par_chunks_mut(hidden_size)
        .zip(scales.par_chunks_mut(scale_cols))
        .zip(x.par_chunks(hidden_size))
        .for_each(|((row_data, row_scales), row)| pre_dispatch_row(row, row_data, row_scales));
    padding_data.fill(0);
    padding_scales.fill(0);

    let (ids, padding_ids) = out.topk_ids.split_at_mut(tokens * top_k);
    ids.copy_from_slice(topk_ids);
    padding_ids.fill(PADDING_EXPERT_ID);
    let (weights, padding_weights) = out.topk_weights.split_at_mut(tokens * top_k);
    weights.copy_from_slice(topk_weights);
    padding_weights.fill(0.0);
    Ok(tokens)
}

/// Owned pre-dispatch buffers for a fixed capacity, allocated once and refilled each step.
#[derive(Debug, Clone, PartialEq)]
pub struct PreDispatchFp8 {
    max_tokens: usize,
    hidden_size: usize,
    top_k: usize,
    /// Tokens of the last successful `fill` (0 before the first).
    tokens: usize,
    data: Vec<u8>,
    scales: Vec<i32>,
    topk_ids: Vec<i32>,
    topk_weights: Vec<f32>,
}

impl PreDispatchFp8 {
    /// Buffers for up to `max_tokens` tokens, all rows padding.
    pub fn new(max_tokens: usize, hidden_size: usize, top_k: usize) -> Result<Self> {
        ensure!(
            hidden_size > 0 && hidden_size % PRE_DISPATCH_CHANNELS_PER_INT == 0,
            "FP8 pre-dispatch needs hidden_size to be a positive multiple of {PRE_DISPATCH_CHANNELS_PER_INT}, got hidden_size = {hidden_size}"
        );
        let rows_len = |cols: usize| {
            max_tokens.checked_mul(cols).ok_or_else(|| {
                Error::invalid(format!(
                    "pre-dispatch max_tokens = {max_tokens} is too large"
                ))
            })
        };
        Ok(PreDispatchFp8 {
            max_tokens,
            hidden_size,
            top_k,
            tokens: 0,
            data: vec![0; rows_len(hidden_size)?],
            scales: vec![0; rows_len(hidden_size / PRE_DISPATCH_CHANNELS_PER_INT)?],
            topk_ids: vec![PADDING_EXPERT_ID; rows_len(top_k)?],
            topk_weights: vec![0.0; rows_len(top_k)?],
        })
    }

    /// Pre-dispatches `x [T, H]` with its top-k (see [`pre_dispatch_fp8_into`]); on error the
    /// buffers keep their previous contents.
    pub fn fill<X: SourceElement>(
        &mut self,
        x: &[X],
        topk_ids: &[i32],
        topk_weights: &[f32],
    ) -> Result<()> {
        self.tokens = pre_dispatch_fp8_into(
            x,
            topk_ids,
            topk_weights,
            self.hidden_size,
            self.top_k,
            PreDispatchOutput {
                data: &mut self.data,
                scales: &mut self.scales,
                topk_ids: &mut self.topk_ids,
                topk_weights: &mut self.topk_weights,
            },
        )?;
        Ok(())
    }

    /// T_max.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// H.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// k.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// T of the last successful fill.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// `[T_max, H]` E4M3.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// `[T_max, H/128]` packed UE8M0.
    pub fn scales(&self) -> &[i32] {
        &self.scales
    }

    /// `[T_max, k]`, -1 past T.
    pub fn topk_ids(&self) -> &[i32] {
        &self.topk_ids
    }

    /// `[T_max, k]`, 0 past T.
    pub fn topk_weights(&self) -> &[f32] {
        &self.topk_weights
    }

    /// Dequantizes row `row` (< T_max) into `out` (H values).
    ///
    /// # Panics
    /// If `row >= max_tokens` or `out.len() != hidden_size`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(
            row < self.max_tokens,
            "row {row} out of {}",
            self.max_tokens
        );
        let h = self.hidden_size;
        let s = h / PRE_DISPATCH_CHANNELS_PER_INT;
        dequantize_pre_dispatch_row(
            &self.data[row * h..(row + 1) * h],
            &self.scales[row * s..(row + 1) * s],
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fake_pre_dispatch_row_is_the_quantize_dequantize_round_trip() {
        let row: Vec<f32> = (0..256)
            .map(|i| ((i as f32 * 0.37).sin() * 3.0) * if i < 128 { 1.0 } else { 1e-3 })
            .collect();
        let mut data = vec![0u8; 256];
        let mut scales = vec![0i32; 2];
        pre_dispatch_row(&row, &mut data, &mut scales);
        let mut expected = vec![0f32; 256];
        dequantize_pre_dispatch_row(&data, &scales, &mut expected);
        let mut got = row.clone();
        fake_pre_dispatch_row(&mut got);
        assert_eq!(got, expected);
        assert!(
            got.iter().zip(&row).any(|(a, b)| a != b),
            "rounding happened"
        );
        let mut inf = vec![1.0f32; 32];
        inf[3] = f32::INFINITY;
        fake_pre_dispatch_row(&mut inf);
        assert!(inf.iter().all(|v| v.is_nan()));
    }

    use super::*;
    use crate::quant::fp8_block::e4m3_half_ulp;
    use crate::quant::testing::sample_matrix;
    use half::bf16;

    #[test]
    fn hand_computed_case_with_padding() {
        let (hidden, top_k) = (128, 2);
        let mut x = vec![bf16::ZERO; 2 * hidden];
        // Token 0, group 0: amax 3 → 3/448 ≈ 0.0067 in (2^-8, 2^-7] → exponent -7, byte 120;
        // elements ·128: 1 → 128 (0x70), -0.5 → -64 (0xE8), 3 → 384 (0x7C).
        x[0] = bf16::from_f32(1.0);
        x[1] = bf16::from_f32(-0.5);
        x[2] = bf16::from_f32(3.0);
        // Group 1 all zero: amax floored at 1e-4 → 2.2e-7 in (2^-23, 2^-22] → byte 105.
        // Group 2: 448 → 448/448 = 1 exactly → exponent 0, byte 127, element 448 (0x7E).
        x[64] = bf16::from_f32(448.0);
        // Group 3: 450 → just above 1 → exponent 1, byte 128; 450/2 = 225 → 224 (0x76).
        x[96] = bf16::from_f32(450.0);
        // Token 1: group 0 holds NaN and 2 → byte 120, NaN → 0x7F, 2·128 = 256 (0x78);
        // group 1 holds -∞ → NaN scale, zero elements; groups 2, 3 zero.
        x[hidden] = bf16::NAN;
        x[hidden + 1] = bf16::from_f32(2.0);
        x[hidden + 32] = bf16::NEG_INFINITY;
        x[hidden + 33] = bf16::from_f32(1.0);
        let ids = [3, 1, 0, 2];
        let weights = [0.75f32, 0.25, 0.5, 0.5];

        let mut p = PreDispatchFp8::new(3, hidden, top_k).unwrap();
        p.fill(&x, &ids, &weights).unwrap();
        assert_eq!(p.tokens(), 2);
        let d = p.data();
        assert_eq!(&d[..4], &[0x70, 0xE8, 0x7C, 0x00]);
        assert!(d[32..64].iter().all(|&c| c == 0));
        assert_eq!(d[64], 0x7E);
        assert_eq!(d[96], 0x76);
        assert_eq!(p.scales()[0], i32::from_le_bytes([120, 105, 127, 128]));
        assert_eq!(&d[hidden..hidden + 2], &[0x7F, 0x78]);
        assert!(d[hidden + 32..hidden + 64].iter().all(|&c| c == 0));
        assert_eq!(p.scales()[1], i32::from_le_bytes([120, 0xFF, 105, 105]));
        assert_eq!(pre_dispatch_scale_of_group(&p.scales()[1..2], 1), 0xFF);
        // Padding row 2.
        assert!(d[2 * hidden..].iter().all(|&c| c == 0));
        assert_eq!(p.scales()[2], 0);
        assert_eq!(p.topk_ids(), &[3, 1, 0, 2, -1, -1]);
        assert_eq!(p.topk_weights(), &[0.75, 0.25, 0.5, 0.5, 0.0, 0.0]);
        // Dequantized values.
        let mut row = vec![0f32; hidden];
        p.dequantize_row(0, &mut row);
        assert_eq!(&row[..3], &[1.0, -0.5, 3.0]);
        assert_eq!((row[64], row[96]), (448.0, 448.0));
        p.dequantize_row(2, &mut row);
        assert!(row.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn capacity_and_shapes_are_checked_before_any_write() {
        let (hidden, top_k, max_tokens) = (256, 2, 2);
        let x = vec![1.0f32; 3 * hidden];
        let ids = vec![0i32; 3 * top_k];
        let weights = vec![1.0f32; 3 * top_k];
        let mut data = vec![0xABu8; max_tokens * hidden];
        let mut scales = vec![7i32; max_tokens * 2];
        let mut out_ids = vec![9i32; max_tokens * top_k];
        let mut out_weights = vec![9.0f32; max_tokens * top_k];
        let mut call = |x: &[f32], ids: &[i32], hidden: usize| {
            pre_dispatch_fp8_into(
                x,
                ids,
                &weights[..ids.len()],
                hidden,
                top_k,
                PreDispatchOutput {
                    data: &mut data,
                    scales: &mut scales,
                    topk_ids: &mut out_ids,
                    topk_weights: &mut out_weights,
                },
            )
        };
        let err = call(&x, &ids, hidden).unwrap_err();
        assert_eq!(err.status, FdmoeStatus::CapacityExceeded);
        assert!(err.message.contains("tokens = 3"), "{}", err.message);
        let err = call(&x[..hidden], &ids[..top_k], 96).unwrap_err();
        assert_eq!(err.status, FdmoeStatus::InvalidArgument);
        assert!(err.message.contains("hidden_size = 96"), "{}", err.message);
        let err = call(&x[..hidden], &ids[..1], hidden).unwrap_err();
        assert_eq!(err.status, FdmoeStatus::InvalidArgument);
        assert!(data.iter().all(|&b| b == 0xAB));
        assert!(scales.iter().all(|&s| s == 7));
        assert!(out_ids.iter().all(|&i| i == 9));
        assert!(out_weights.iter().all(|&w| w == 9.0));

        // The owned form keeps its previous contents on error too.
        let mut p = PreDispatchFp8::new(1, hidden, top_k).unwrap();
        p.fill(&x[..hidden], &ids[..top_k], &weights[..top_k])
            .unwrap();
        let before = p.clone();
        let err = p
            .fill(&x[..2 * hidden], &ids[..4], &weights[..4])
            .unwrap_err();
        assert_eq!(err.status, FdmoeStatus::CapacityExceeded);
        assert_eq!(p, before);
        assert!(PreDispatchFp8::new(4, 32, 1).is_err());
    }

    #[test]
    fn zero_tokens_pads_everything() {
        let mut p = PreDispatchFp8::new(2, 128, 1).unwrap();
        p.fill(&[2.0f32; 256], &[1, 1], &[1.0, 1.0]).unwrap();
        p.fill::<f32>(&[], &[], &[]).unwrap();
        assert_eq!(p.tokens(), 0);
        assert!(p.data().iter().all(|&c| c == 0));
        assert!(p.scales().iter().all(|&s| s == 0));
        assert_eq!(p.topk_ids(), &[-1, -1]);
        assert_eq!(p.topk_weights(), &[0.0, 0.0]);
    }

    #[test]
    fn random_tokens_match_the_rule_and_round_trip() {
        let (tokens, hidden) = (10, 512);
        let x = sample_matrix(tokens, hidden, 29);
        let mut p = PreDispatchFp8::new(16, hidden, 1).unwrap();
        p.fill(&x, &[0; 10], &[1.0; 10]).unwrap();
        let mut row = vec![0f32; hidden];
        for t in 0..tokens {
            let xs = &x[t * hidden..(t + 1) * hidden];
            let scales = &p.scales()[t * 4..(t + 1) * 4];
            for (g, group) in xs.chunks(32).enumerate() {
                // Independent exponent: f64 log2 of the f32 quotient.
                let amax = group.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0e-4);
                let exponent = ((amax / 448.0) as f64).log2().ceil() as i32;
                assert_eq!(
                    pre_dispatch_scale_of_group(scales, g) as i32,
                    exponent + 127,
                    "token {t} group {g}"
                );
                for (i, &v) in group.iter().enumerate() {
                    let expected = encode_e4m3((v as f64 / 2f64.powi(exponent)) as f32);
                    assert_eq!(p.data()[t * hidden + g * 32 + i], expected);
                }
            }
            p.dequantize_row(t, &mut row);
            for (k, (&v, &y)) in xs.iter().zip(&row).enumerate() {
                let scale = decode_ue8m0(pre_dispatch_scale_of_group(scales, k / 32));
                let bound = e4m3_half_ulp((v.abs() / scale).min(448.0)) * scale;
                assert!((v - y).abs() <= bound, "token {t} channel {k}: {v} -> {y}");
            }
        }
        assert!(p.topk_ids()[10..].iter().all(|&i| i == -1));
    }

    #[test]
    fn exponent_edges() {
        // amax / 448 exactly a power of two, and one ulp above.
        assert_eq!(pre_dispatch_scale_byte(448.0), 127);
        assert_eq!(
            pre_dispatch_scale_byte(f32::from_bits(448f32.to_bits() + 1)),
            128
        );
        assert_eq!(pre_dispatch_scale_byte(224.0), 126);
        assert_eq!(
            pre_dispatch_scale_byte(0.0),
            pre_dispatch_scale_byte(1.0e-4)
        );
        assert_eq!(pre_dispatch_scale_byte(1.0e-4), 105);
        assert_eq!(pre_dispatch_scale_byte(f32::MAX), 120 + 127);
        assert_eq!(pre_dispatch_scale_byte(f32::INFINITY), UE8M0_NAN);
    }
}
