//! E4M3: the OCP FP8 `e4m3fn` element (weights and activations of `FP8_BLOCK`, the pre-dispatch
//! payload) and the E4M3 block scales of NVFP4.
//!
//! Bit layout `s eeee mmm`, exponent bias 7, no infinities:
//! - `eeee = 0`: subnormal, value `(-1)^s · mmm · 2^-9` (smallest positive 2^-9 = 0.001953125);
//! - `eeee = 1..=15`: normal, value `(-1)^s · (1 + mmm/8) · 2^(eeee-7)`;
//! - `0x7F` and `0xFF` (`eeee = 15, mmm = 7`) are NaN; the largest finite value is
//!   `0x7E` = 1.75 · 2^8 = 448.
//!
//! Encoding from f32 ([`encode_e4m3`]) rounds to nearest, ties to even, and saturates: every
//! finite |x| ≥ 448 and ±∞ become ±448 (what CUDA's `cvt.rn.satfinite.e4m3x2.f32` does; note
//! that PyTorch's `.to(torch.float8_e4m3fn)` turns overflow into NaN instead). Every NaN encodes
//! to the canonical `0x7F`. The sign is kept, so `-0.0` and negative values that round to zero
//! encode to `0x80` (negative zero); `encode_e4m3(decode_e4m3(b)) == b` for all 254 non-NaN
//! codes. Decoding ([`decode_e4m3`]) is exact (every E4M3 value is an f32) through a table of
//! f32 bit patterns built at compile time.
//!
//! NVFP4 scales ([`encode_e4m3_scale`]) are E4M3 values that must be positive divisors: NaN
//! stays NaN, everything else is clamped to [2^-9, 448] before rounding (ModelOpt clamps its
//! block scales at 2^-9 for the same reason).

/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;
/// Smallest positive (subnormal) E4M3 value, 2^-9.
pub const E4M3_MIN_SUBNORMAL: f32 = 1.0 / 512.0;
/// Smallest positive normal E4M3 value, 2^-6.
pub const E4M3_MIN_NORMAL: f32 = 1.0 / 64.0;
/// The canonical NaN code every NaN input encodes to.
pub const E4M3_NAN: u8 = 0x7F;
/// Code of +448, the saturation value.
pub const E4M3_MAX_CODE: u8 = 0x7E;

/// f32 bit pattern of one E4M3 code, computed with integer operations only (so it is `const`).
const fn e4m3_to_f32_bits(code: u8) -> u32 {
    let sign = ((code as u32) & 0x80) << 24;
    if code & 0x7F == 0x7F {
        return sign | 0x7FC0_0000; // quiet NaN, sign kept
    }
    let exponent = ((code >> 3) & 0xF) as u32;
    let mantissa = (code & 0x7) as u32;
    if exponent == 0 {
        if mantissa == 0 {
            return sign;
        }
        // mantissa · 2^-9 with mantissa in 1..=7: normalise on its leading bit p (0..=2):
        // value = 2^(p-9) · (mantissa / 2^p), an f32 of exponent field p - 9 + 127.
        let p = 31 - mantissa.leading_zeros();
        return sign | ((p + 118) << 23) | ((mantissa - (1 << p)) << (23 - p));
    }
    // (1 + m/8) · 2^(e-7): f32 exponent field e - 7 + 127, the 3 mantissa bits on top.
    sign | ((exponent + 120) << 23) | (mantissa << 20)
}

const fn build_decode_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = e4m3_to_f32_bits(code as u8);
        code += 1;
    }
    table
}

/// f32 bit patterns of all 256 codes.
static E4M3_TO_F32_BITS: [u32; 256] = build_decode_table();

/// The f32 value of an E4M3 code (exact; `0x7F`/`0xFF` give NaN).
#[inline]
pub fn decode_e4m3(code: u8) -> f32 {
    f32::from_bits(E4M3_TO_F32_BITS[code as usize])
}

/// f32 bits of 448.0 and of 2^-6 (the smallest normal), for the range tests in `encode_e4m3`.
const F32_BITS_448: u32 = 0x43E0_0000;
const F32_BITS_MIN_NORMAL: u32 = 0x3C80_0000;

/// Encodes an f32 as E4M3: round to nearest even, saturating to ±448 (also for ±∞), NaN to
/// `0x7F`, sign kept (negative values rounding to zero give `0x80`).
#[inline]
pub fn encode_e4m3(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let magnitude = bits & 0x7FFF_FFFF;
    if magnitude > 0x7F80_0000 {
        return E4M3_NAN;
    }
    if magnitude >= F32_BITS_448 {
        // Includes +∞. Values in [448, 464) would round to 448 anyway; above, RNE would go to
        // 480 which does not exist: saturate.
        return sign | E4M3_MAX_CODE;
    }
    if magnitude < F32_BITS_MIN_NORMAL {
        // Subnormal range: the code is |x| / 2^-9 rounded to an integer (0..=8); 8 is the code
        // of the smallest normal 2^-6 (0x08), so the carry needs no special case. The product
        // by a power of two is exact.
        let steps = (f32::from_bits(magnitude) * 512.0).round_ties_even();
        return sign | steps as u8;
    }
    // Normal range (f32 exponent -6..=8): keep 3 of the 23 mantissa bits, rounding the 20
    // dropped bits to nearest even; a mantissa carry moves into the exponent field by itself.
    let rounded = magnitude + 0x7_FFFF + ((magnitude >> 20) & 1);
    // f32 exponent field 121..=135 → E4M3 field 1..=15 (re-bias 127 → 7).
    let exponent = (rounded >> 23) - 120;
    let mantissa = (rounded >> 20) & 0x7;
    sign | ((exponent << 3) as u8) | mantissa as u8
}

/// Encodes a positive scale as E4M3 for NVFP4: NaN gives `0x7F`; any other value (zero,
/// negatives and -∞ included) is clamped to [2^-9, 448] and rounded to nearest even, so the
/// result is always a usable positive divisor.
#[inline]
pub fn encode_e4m3_scale(scale: f32) -> u8 {
    if scale.is_nan() {
        return E4M3_NAN;
    }
    encode_e4m3(scale.max(E4M3_MIN_SUBNORMAL))
}

/// Encodes `src` into `dst` element by element ([`encode_e4m3`]).
///
/// # Panics
/// If the lengths differ.
pub fn encode_e4m3_slice(src: &[f32], dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "encode_e4m3_slice: length mismatch");
    dst.iter_mut()
        .zip(src)
        .for_each(|(d, &x)| *d = encode_e4m3(x));
}

/// Decodes `src` into `dst` element by element ([`decode_e4m3`]).
///
/// # Panics
/// If the lengths differ.
pub fn decode_e4m3_slice(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "decode_e4m3_slice: length mismatch");
    dst.iter_mut()
        .zip(src)
        .for_each(|(d, &c)| *d = decode_e4m3(c));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of a code computed from its bit fields with f64 arithmetic, independently of
    /// the table; `None` for NaN.
    fn reference_value(code: u8) -> Option<f64> {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((code >> 3) & 0xF) as i32;
        let m = (code & 7) as f64;
        if e == 15 && m == 7.0 {
            return None;
        }
        let magnitude = if e == 0 {
            m / 8.0 * 2f64.powi(-6)
        } else {
            (1.0 + m / 8.0) * 2f64.powi(e - 7)
        };
        Some(sign * magnitude)
    }

    /// All finite non-negative values in increasing order.
    fn positive_values() -> Vec<f32> {
        (0u8..=0x7E).map(decode_e4m3).collect()
    }

    #[test]
    fn every_code_decodes_to_its_bit_field_value() {
        for code in 0..=255u8 {
            let got = decode_e4m3(code);
            match reference_value(code) {
                None => assert!(got.is_nan(), "code {code:#04x} must be NaN"),
                Some(v) => {
                    assert_eq!(got as f64, v, "code {code:#04x}");
                    assert_eq!(
                        got.is_sign_negative(),
                        code & 0x80 != 0,
                        "sign of {code:#04x}"
                    );
                }
            }
        }
        assert_eq!(decode_e4m3(0x7E), E4M3_MAX);
        assert_eq!(decode_e4m3(0x01), E4M3_MIN_SUBNORMAL);
        assert_eq!(decode_e4m3(0x08), E4M3_MIN_NORMAL);
        assert_eq!(decode_e4m3(0x07), 7.0 / 512.0);
        assert_eq!(decode_e4m3(0x38), 1.0);
        assert!(decode_e4m3(0x7F).is_nan() && decode_e4m3(0xFF).is_nan());
    }

    #[test]
    fn encode_inverts_decode_on_every_non_nan_code() {
        for code in 0..=255u8 {
            if code & 0x7F == 0x7F {
                continue;
            }
            assert_eq!(encode_e4m3(decode_e4m3(code)), code, "code {code:#04x}");
        }
        // Negative zero keeps its sign.
        assert_eq!(encode_e4m3(-0.0), 0x80);
        assert_eq!(encode_e4m3(0.0), 0x00);
    }

    #[test]
    fn midpoints_round_to_even_and_neighbours_to_nearest() {
        let values = positive_values();
        for pair in values.windows(2) {
            let (lo, hi) = (pair[0], pair[1]);
            let (lo_code, hi_code) = (encode_e4m3(lo), encode_e4m3(hi));
            // The midpoint of two adjacent E4M3 values is exact in f32 (4 significant bits).
            let mid = (lo + hi) / 2.0;
            assert_eq!(mid as f64, (lo as f64 + hi as f64) / 2.0);
            let even = if lo_code & 1 == 0 { lo_code } else { hi_code };
            assert_eq!(encode_e4m3(mid), even, "tie between {lo} and {hi}");
            assert_eq!(
                encode_e4m3(-mid),
                0x80 | even,
                "tie between -{lo} and -{hi}"
            );
            let below = f32::from_bits(mid.to_bits() - 1);
            let above = f32::from_bits(mid.to_bits() + 1);
            assert_eq!(
                encode_e4m3(below),
                lo_code,
                "just below the tie of {lo}, {hi}"
            );
            assert_eq!(
                encode_e4m3(above),
                hi_code,
                "just above the tie of {lo}, {hi}"
            );
            assert_eq!(encode_e4m3(-below), 0x80 | lo_code);
            assert_eq!(encode_e4m3(-above), 0x80 | hi_code);
        }
    }

    #[test]
    fn saturation_nan_and_infinities() {
        for x in [
            448.0,
            448.1,
            463.99,
            464.0,
            480.0,
            1.0e6,
            f32::MAX,
            f32::INFINITY,
        ] {
            assert_eq!(encode_e4m3(x), 0x7E, "{x}");
            assert_eq!(encode_e4m3(-x), 0xFE, "-{x}");
        }
        // Just below the max still rounds to nearest.
        assert_eq!(encode_e4m3(447.0), 0x7E);
        assert_eq!(encode_e4m3(432.0), 0x7E); // tie 416/448: 448 has the even mantissa (6)
        assert_eq!(encode_e4m3(431.9), 0x7D); // 416
        assert_eq!(encode_e4m3(424.0), 0x7D);
        assert_eq!(encode_e4m3(f32::NAN), E4M3_NAN);
        assert_eq!(encode_e4m3(-f32::NAN), E4M3_NAN);
        assert_eq!(encode_e4m3(f32::from_bits(0x7F80_0001)), E4M3_NAN);
    }

    #[test]
    fn subnormal_range_and_underflow() {
        // Exact subnormals.
        for m in 1..8u8 {
            assert_eq!(encode_e4m3(m as f32 / 512.0), m);
        }
        // Below half the smallest subnormal: zero with the sign kept; the tie rounds to even 0.
        assert_eq!(encode_e4m3(1.0 / 1024.0), 0x00);
        assert_eq!(encode_e4m3(-1.0 / 1024.0), 0x80);
        assert_eq!(
            encode_e4m3(f32::from_bits((1.0f32 / 1024.0).to_bits() + 1)),
            0x01
        );
        assert_eq!(encode_e4m3(1.0e-30), 0x00);
        assert_eq!(encode_e4m3(-1.0e-30), 0x80);
        assert_eq!(encode_e4m3(f32::from_bits(1)), 0x00);
        // The largest subnormal rounds up into the smallest normal at 7.5 · 2^-9 (tie, 8 even).
        assert_eq!(encode_e4m3(7.5 / 512.0), 0x08);
        assert_eq!(encode_e4m3(6.5 / 512.0), 0x06);
        assert_eq!(encode_e4m3(5.5 / 512.0), 0x06);
    }

    #[test]
    fn encoding_is_monotone_over_a_dense_sweep() {
        // Every f32 whose exponent is in the E4M3 range, sampled with a stride: the decoded
        // result is the nearest representable value.
        let values = positive_values();
        let mut bits = 0u32;
        while bits < F32_BITS_448 + (1 << 23) {
            let x = f32::from_bits(bits);
            let got = decode_e4m3(encode_e4m3(x));
            let best = values
                .iter()
                .map(|&v| (v - x).abs())
                .fold(f32::INFINITY, f32::min);
            if x <= 448.0 {
                assert_eq!((got - x).abs(), best, "x = {x}");
            } else {
                assert_eq!(got, 448.0);
            }
            bits += 4099;
        }
    }

    #[test]
    fn scale_encoding_is_positive_and_clamped() {
        assert_eq!(encode_e4m3_scale(1.0), 0x38);
        assert_eq!(encode_e4m3_scale(0.0), 0x01);
        assert_eq!(encode_e4m3_scale(-0.0), 0x01);
        assert_eq!(encode_e4m3_scale(-3.0), 0x01);
        assert_eq!(encode_e4m3_scale(1.0e-12), 0x01);
        assert_eq!(encode_e4m3_scale(1.0e9), 0x7E);
        assert_eq!(encode_e4m3_scale(f32::INFINITY), 0x7E);
        assert_eq!(encode_e4m3_scale(f32::NAN), E4M3_NAN);
        for code in 0x01..=0x7Eu8 {
            assert_eq!(encode_e4m3_scale(decode_e4m3(code)), code);
        }
    }

    #[test]
    fn slices() {
        let src = [0.0f32, 1.0, -2.5, 500.0, f32::NAN];
        let mut codes = [0u8; 5];
        encode_e4m3_slice(&src, &mut codes);
        assert_eq!(codes, [0x00, 0x38, 0xC2, 0x7E, 0x7F]);
        let mut back = [0f32; 5];
        decode_e4m3_slice(&codes, &mut back);
        assert_eq!(&back[..4], &[0.0, 1.0, -2.5, 448.0]);
        assert!(back[4].is_nan());
    }
}
