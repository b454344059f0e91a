//! E2M1: the 4-bit float element of MXFP4 and NVFP4, and how two of them share a byte.
//!
//! Nibble layout `s ee m`, exponent bias 1, no infinities and no NaN:
//! - `ee = 0`: subnormal, value `(-1)^s · m · 0.5`;
//! - `ee = 1..=3`: normal, value `(-1)^s · (1 + m/2) · 2^(ee-1)`;
//!
//! so codes 0..=7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6 and codes 8..=15 their negatives (8 is -0).
//!
//! Encoding from f32 ([`encode_e2m1`]) rounds to nearest, ties to even (the code with `m = 0`:
//! 0.25 → 0, 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4) and saturates: |x| > 5
//! gives ±6, ±∞ included. This is what `cvt.rn.satfinite.e2m1x2.f32` computes; note that
//! ModelOpt's Python `_cast_fp4` rounds the ties 2.5 and 3.5 to 3 instead. The sign is kept
//! (-0.0 and negative values rounding to zero give 8, negative zero). E2M1 has no NaN: NaN
//! encodes to +0 (code 0); the block formats carry NaN in their scale instead (see `mxfp4`,
//! `nvfp4`).
//!
//! Packing: two elements per byte, element `2i` in the low nibble and `2i + 1` in the high
//! nibble (the layout of OCP MX checkpoints such as gpt-oss, and of ModelOpt NVFP4 exports).

/// Largest finite E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;

/// Values of the 16 codes.
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The value of the low nibble of `code` (the high nibble is ignored).
#[inline]
pub fn decode_e2m1(code: u8) -> f32 {
    E2M1_VALUES[(code & 0xF) as usize]
}

/// Encodes an f32 as an E2M1 code (0..=15): round to nearest even, saturating to ±6, NaN to 0.
#[inline]
pub fn encode_e2m1(x: f32) -> u8 {
    let magnitude = x.abs();
    // The code of |x| counts the rounding thresholds it passes. A threshold is the midpoint of
    // two neighbours; at a tie the even code (mantissa bit 0) wins, so thresholds below an odd
    // code are passed only strictly (>) and thresholds below an even code inclusively (>=).
    // NaN passes no comparison and gives 0.
    let code = (magnitude > 0.25) as u8
        + (magnitude >= 0.75) as u8
        + (magnitude > 1.25) as u8
        + (magnitude >= 1.75) as u8
        + (magnitude > 2.5) as u8
        + (magnitude >= 3.5) as u8
        + (magnitude > 5.0) as u8;
    if x.is_nan() {
        return 0;
    }
    (((x.to_bits() >> 28) & 0x8) as u8) | code
}

/// One byte from two codes: `low` is the even element, `high` the odd one.
#[inline]
pub fn pack_e2m1(low: u8, high: u8) -> u8 {
    (low & 0xF) | (high << 4)
}

/// The values of both nibbles of a packed byte, low (even element) first.
#[inline]
pub fn decode_e2m1_pair(byte: u8) -> [f32; 2] {
    [
        E2M1_VALUES[(byte & 0xF) as usize],
        E2M1_VALUES[(byte >> 4) as usize],
    ]
}

/// Encodes `src` (an even number of values) into packed bytes, `dst.len() == src.len() / 2`.
///
/// # Panics
/// If the lengths do not match.
pub fn encode_e2m1_packed(src: &[f32], dst: &mut [u8]) {
    assert_eq!(
        src.len(),
        2 * dst.len(),
        "encode_e2m1_packed: length mismatch"
    );
    for (byte, pair) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *byte = pack_e2m1(encode_e2m1(pair[0]), encode_e2m1(pair[1]));
    }
}

/// Decodes packed bytes into `dst`, `dst.len() == 2 * src.len()`.
///
/// # Panics
/// If the lengths do not match.
pub fn decode_e2m1_packed(src: &[u8], dst: &mut [f32]) {
    assert_eq!(
        dst.len(),
        2 * src.len(),
        "decode_e2m1_packed: length mismatch"
    );
    for (pair, &byte) in dst.chunks_exact_mut(2).zip(src) {
        pair.copy_from_slice(&decode_e2m1_pair(byte));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Value of a nibble from its bit fields, computed independently of the table.
    fn reference_value(code: u8) -> f64 {
        let sign = if code & 0x8 != 0 { -1.0 } else { 1.0 };
        let e = ((code >> 1) & 0x3) as i32;
        let m = (code & 1) as f64;
        let magnitude = if e == 0 {
            m * 0.5
        } else {
            (1.0 + m / 2.0) * 2f64.powi(e - 1)
        };
        sign * magnitude
    }

    #[test]
    fn every_nibble_decodes_to_its_bit_field_value() {
        for code in 0..16u8 {
            let got = decode_e2m1(code);
            assert_eq!(got as f64, reference_value(code), "code {code}");
            assert_eq!(got.is_sign_negative(), code >= 8, "sign of code {code}");
            // The high nibble is ignored.
            assert_eq!(decode_e2m1(code | 0xA0).to_bits(), got.to_bits());
        }
    }

    #[test]
    fn encode_inverts_decode_on_every_code() {
        for code in 0..16u8 {
            assert_eq!(encode_e2m1(decode_e2m1(code)), code, "code {code}");
        }
    }

    #[test]
    fn midpoints_round_to_even_and_neighbours_to_nearest() {
        for code in 0..7u8 {
            let (lo, hi) = (decode_e2m1(code), decode_e2m1(code + 1));
            let mid = (lo + hi) / 2.0;
            let even = if code % 2 == 0 { code } else { code + 1 };
            assert_eq!(encode_e2m1(mid), even, "tie between {lo} and {hi}");
            assert_eq!(encode_e2m1(-mid), 8 | even, "tie between -{lo} and -{hi}");
            let below = f32::from_bits(mid.to_bits() - 1);
            let above = f32::from_bits(mid.to_bits() + 1);
            assert_eq!(encode_e2m1(below), code);
            assert_eq!(encode_e2m1(above), code + 1);
            assert_eq!(encode_e2m1(-below), 8 | code);
            assert_eq!(encode_e2m1(-above), 8 | (code + 1));
        }
        // The ties spelled out.
        let ties = [
            (0.25, 0),
            (0.75, 2),
            (1.25, 2),
            (1.75, 4),
            (2.5, 4),
            (3.5, 6),
            (5.0, 6),
        ];
        for (x, code) in ties {
            assert_eq!(encode_e2m1(x), code, "{x}");
        }
    }

    #[test]
    fn saturation_nan_zero_and_sign() {
        for x in [6.0, 6.5, 7.0, 100.0, f32::MAX, f32::INFINITY] {
            assert_eq!(encode_e2m1(x), 7, "{x}");
            assert_eq!(encode_e2m1(-x), 15, "-{x}");
        }
        assert_eq!(encode_e2m1(f32::NAN), 0);
        assert_eq!(encode_e2m1(-f32::NAN), 0);
        assert_eq!(encode_e2m1(0.0), 0);
        assert_eq!(encode_e2m1(-0.0), 8);
        assert_eq!(encode_e2m1(-0.1), 8);
        assert_eq!(encode_e2m1(1.0e-40), 0);
    }

    #[test]
    fn packing_is_low_nibble_first() {
        assert_eq!(pack_e2m1(0x2, 0xF), 0xF2);
        assert_eq!(decode_e2m1_pair(0xF2), [1.0, -6.0]);
        let src = [1.0f32, -6.0, 0.5, 3.0];
        let mut packed = [0u8; 2];
        encode_e2m1_packed(&src, &mut packed);
        assert_eq!(packed, [0xF2, 0x51]);
        let mut back = [0f32; 4];
        decode_e2m1_packed(&packed, &mut back);
        assert_eq!(back, src);
    }
}
