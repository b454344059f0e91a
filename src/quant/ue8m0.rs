//! UE8M0: the unsigned, exponent-only 8-bit scale of OCP MX (`E8M0` in the MX v1.0 spec,
//! `float8_e8m0fnu` in PyTorch): the scale of MXFP4 weights and of the FP8 pre-dispatch.
//!
//! Byte `b` in 0..=254 is the value 2^(b - 127) (from 2^-127, an f32 subnormal, to 2^127);
//! `0xFF` is NaN. There is no zero, no sign and no infinity.
//!
//! Encoding from f32 ([`encode_ue8m0`]) rounds *up* to a power of two (the smallest 2^e ≥ x),
//! because every UE8M0 scale this library makes is a divisor that must not push the scaled
//! values past the element format's range (the pre-dispatch rule `ceil(log2(amax / 448))`).
//! Inputs outside the range: x ≤ 2^-127 (zero, negatives, -∞ included) gives `0x00`; finite
//! x > 2^127 saturates to `0xFE`; NaN and +∞ give `0xFF`.
//!
//! The exponent helpers ([`floor_log2`], [`ceil_log2`]) read the f32 bit fields, so they are
//! exact where a floating `log2` can round (e.g. just above a power of two), the way
//! DeepGEMM's `fast_log2_ceil` computes it on the GPU.

/// Exponent bias: byte = exponent + 127.
pub const UE8M0_BIAS: i32 = 127;
/// The NaN code.
pub const UE8M0_NAN: u8 = 0xFF;
/// Smallest and largest exponent a UE8M0 byte holds.
pub const UE8M0_MIN_EXPONENT: i32 = -127;
pub const UE8M0_MAX_EXPONENT: i32 = 127;

/// Exactly 2^`exponent` as an f32, for exponents in -149..=127 (subnormals included).
///
/// # Panics
/// In debug builds, for an exponent outside that range.
#[inline]
pub fn pow2(exponent: i32) -> f32 {
    debug_assert!((-149..=127).contains(&exponent), "pow2({exponent})");
    if exponent >= -126 {
        f32::from_bits(((exponent + 127) as u32) << 23)
    } else {
        f32::from_bits(1u32 << (exponent + 149))
    }
}

/// The value of a UE8M0 byte: 2^(b-127), or NaN for `0xFF`.
#[inline]
pub fn decode_ue8m0(byte: u8) -> f32 {
    match byte {
        UE8M0_NAN => f32::NAN,
        0 => pow2(-127),
        b => f32::from_bits((b as u32) << 23),
    }
}

/// The exponent a byte holds (b - 127), or `None` for NaN.
#[inline]
pub fn ue8m0_exponent(byte: u8) -> Option<i32> {
    (byte != UE8M0_NAN).then_some(byte as i32 - UE8M0_BIAS)
}

/// The byte of 2^`exponent`, with the exponent clamped to -127..=127.
#[inline]
pub fn ue8m0_from_exponent(exponent: i32) -> u8 {
    (exponent.clamp(UE8M0_MIN_EXPONENT, UE8M0_MAX_EXPONENT) + UE8M0_BIAS) as u8
}

/// ⌊log2 x⌋ for a positive finite x (subnormals included), from its bits.
///
/// # Panics
/// In debug builds, for x that is not positive and finite.
#[inline]
pub fn floor_log2(x: f32) -> i32 {
    debug_assert!(x > 0.0 && x.is_finite(), "floor_log2({x})");
    let bits = x.to_bits();
    let exponent_field = (bits >> 23) as i32;
    if exponent_field == 0 {
        // Subnormal: x = mantissa · 2^-149.
        (31 - (bits & 0x7F_FFFF).leading_zeros() as i32) - 149
    } else {
        exponent_field - 127
    }
}

/// ⌈log2 x⌉ for a positive finite x (subnormals included), from its bits.
///
/// # Panics
/// In debug builds, for x that is not positive and finite.
#[inline]
pub fn ceil_log2(x: f32) -> i32 {
    let floor = floor_log2(x);
    let is_power_of_two = if x.to_bits() >> 23 == 0 {
        x.to_bits().is_power_of_two()
    } else {
        x.to_bits() & 0x7F_FFFF == 0
    };
    floor + (!is_power_of_two) as i32
}

/// Encodes a scale as UE8M0, rounding up to a power of two (see the module notes for the
/// values outside the range).
#[inline]
pub fn encode_ue8m0(x: f32) -> u8 {
    if x.is_nan() || x == f32::INFINITY {
        return UE8M0_NAN;
    }
    if x <= 0.0 {
        return 0;
    }
    ue8m0_from_exponent(ceil_log2(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_decodes_to_its_power_of_two() {
        for byte in 0..=254u8 {
            let expected = 2f64.powi(byte as i32 - 127);
            assert_eq!(decode_ue8m0(byte) as f64, expected, "byte {byte}");
            assert_eq!(ue8m0_exponent(byte), Some(byte as i32 - 127));
        }
        assert!(decode_ue8m0(0xFF).is_nan());
        assert_eq!(ue8m0_exponent(0xFF), None);
        assert_eq!(decode_ue8m0(127), 1.0);
        assert_eq!(decode_ue8m0(0), f32::from_bits(1 << 22));
    }

    #[test]
    fn encode_inverts_decode_on_every_non_nan_byte() {
        for byte in 0..=254u8 {
            assert_eq!(encode_ue8m0(decode_ue8m0(byte)), byte, "byte {byte}");
            assert_eq!(ue8m0_from_exponent(byte as i32 - 127), byte);
        }
    }

    #[test]
    fn encode_rounds_up_and_saturates() {
        assert_eq!(encode_ue8m0(1.0), 127);
        assert_eq!(encode_ue8m0(f32::from_bits(1.0f32.to_bits() + 1)), 128);
        assert_eq!(encode_ue8m0(1.5), 128);
        assert_eq!(encode_ue8m0(f32::from_bits(2.0f32.to_bits() - 1)), 128);
        assert_eq!(encode_ue8m0(0.75), 127);
        assert_eq!(encode_ue8m0(3.0e38), 0xFE);
        assert_eq!(encode_ue8m0(f32::MAX), 0xFE);
        assert_eq!(encode_ue8m0(f32::INFINITY), 0xFF);
        assert_eq!(encode_ue8m0(f32::NAN), 0xFF);
        assert_eq!(encode_ue8m0(0.0), 0);
        assert_eq!(encode_ue8m0(-1.0), 0);
        assert_eq!(encode_ue8m0(f32::NEG_INFINITY), 0);
        assert_eq!(encode_ue8m0(f32::from_bits(1)), 0);
        // 2^-127 exactly and just above it.
        assert_eq!(encode_ue8m0(f32::from_bits(1 << 22)), 0);
        assert_eq!(encode_ue8m0(f32::from_bits((1 << 22) + 1)), 1);
    }

    #[test]
    fn exact_logarithms() {
        for e in -149..=127 {
            let x = pow2(e);
            assert_eq!(x as f64, 2f64.powi(e));
            assert_eq!(floor_log2(x), e);
            assert_eq!(ceil_log2(x), e);
            // (Above 2^-149 lies 2^-148, another power of two.)
            if e > -149 && e < 127 {
                let above = f32::from_bits(x.to_bits() + 1);
                assert_eq!(floor_log2(above), e, "above 2^{e}");
                assert_eq!(ceil_log2(above), e + 1, "above 2^{e}");
            }
            // (Below 2^-148 lies 2^-149, another power of two.)
            if e > -148 {
                let below = f32::from_bits(x.to_bits() - 1);
                assert_eq!(floor_log2(below), e - 1, "below 2^{e}");
                assert_eq!(ceil_log2(below), e, "below 2^{e}");
            }
        }
        assert_eq!(floor_log2(3.0 * pow2(-140)), -139);
        assert_eq!(ceil_log2(3.0 * pow2(-140)), -138);
        assert_eq!(floor_log2(f32::MAX), 127);
        assert_eq!(ceil_log2(f32::MAX), 128);
    }
}
