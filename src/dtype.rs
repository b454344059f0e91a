//! Conversions between the dense element types and f32, the CPU backend's compute type.

use crate::config::FdmoeDtype;
use half::{bf16, f16};

/// Reads `n` elements of `dtype` at `src` into `dst` as f32 (exact for every dense type).
///
/// # Safety
/// `src` must point to `dst.len()` readable, aligned elements of `dtype`.
pub unsafe fn load_f32(dtype: FdmoeDtype, src: *const u8, dst: &mut [f32]) {
    let n = dst.len();
    match dtype {
        FdmoeDtype::F32 => dst.copy_from_slice(std::slice::from_raw_parts(src as *const f32, n)),
        FdmoeDtype::Bf16 => {
            let s = std::slice::from_raw_parts(src as *const bf16, n);
            dst.iter_mut().zip(s).for_each(|(d, v)| *d = v.to_f32());
        }
        FdmoeDtype::F16 => {
            let s = std::slice::from_raw_parts(src as *const f16, n);
            dst.iter_mut().zip(s).for_each(|(d, v)| *d = v.to_f32());
        }
        other => unreachable!("load_f32 on non-dense dtype {other}"),
    }
}

/// Writes `src` as `dtype` at `dst`, rounding to nearest even once.
///
/// # Safety
/// `dst` must point to `src.len()` writable, aligned elements of `dtype`.
pub unsafe fn store_f32(dtype: FdmoeDtype, src: &[f32], dst: *mut u8) {
    let n = src.len();
    match dtype {
        FdmoeDtype::F32 => std::slice::from_raw_parts_mut(dst as *mut f32, n).copy_from_slice(src),
        FdmoeDtype::Bf16 => {
            let d = std::slice::from_raw_parts_mut(dst as *mut bf16, n);
            d.iter_mut()
                .zip(src)
                .for_each(|(d, v)| *d = bf16::from_f32(*v));
        }
        FdmoeDtype::F16 => {
            let d = std::slice::from_raw_parts_mut(dst as *mut f16, n);
            d.iter_mut()
                .zip(src)
                .for_each(|(d, v)| *d = f16::from_f32(*v));
        }
        other => unreachable!("store_f32 on non-dense dtype {other}"),
    }
}

/// Rounds f32 values in place to the precision of `dtype` (round to nearest even).
pub fn round_to(dtype: FdmoeDtype, values: &mut [f32]) {
    match dtype {
        FdmoeDtype::F32 => {}
        FdmoeDtype::Bf16 => values
            .iter_mut()
            .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        FdmoeDtype::F16 => values
            .iter_mut()
            .for_each(|v| *v = f16::from_f32(*v).to_f32()),
        other => unreachable!("round_to on non-dense dtype {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rounding() {
        let src = [1.0f32, -2.5, 1.0 + 1.0 / 256.0, 3.0e-3];
        for dt in [FdmoeDtype::F32, FdmoeDtype::Bf16, FdmoeDtype::F16] {
            let mut bytes = vec![0u8; src.len() * dt.dense_size().unwrap()];
            let mut back = [0.0f32; 4];
            unsafe {
                store_f32(dt, &src, bytes.as_mut_ptr());
                load_f32(dt, bytes.as_ptr(), &mut back);
            }
            let mut rounded = src;
            round_to(dt, &mut rounded);
            assert_eq!(back, rounded, "{dt}");
        }
        // 1 + 2^-8 is a tie in bf16 (8 significand bits): rounds to even, i.e. 1.0.
        let mut v = [1.0 + 1.0 / 256.0];
        round_to(FdmoeDtype::Bf16, &mut v);
        assert_eq!(v[0], 1.0);
    }
}
