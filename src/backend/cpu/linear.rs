//! A strided view of one weight matrix in nn.Linear orientation (W [out, in], y = x · Wᵀ) and
//! the dense product the CPU backend runs through the `gemm` crate. Strides let one view type
//! cover every accepted layout (TORCH, PADDLE, PER_EXPERT, gate/up interleaved) with no repack.

use gemm::{gemm, Parallelism};

/// W[o, i] lives at `ptr + o * out_stride + i * in_stride` (f32 elements).
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    pub ptr: *const f32,
    pub out_features: usize,
    pub in_features: usize,
    pub out_stride: isize,
    pub in_stride: isize,
}

// SAFETY: a Linear points into memory the backend owns (or the caller lent it under BORROW,
// promising to keep it alive and unmodified until destroy); it is only ever read.
unsafe impl Send for Linear {}
unsafe impl Sync for Linear {}

impl Linear {
    /// Row-major [out, in] matrix at `ptr`.
    pub fn row_major(ptr: *const f32, out_features: usize, in_features: usize) -> Self {
        Linear {
            ptr,
            out_features,
            in_features,
            out_stride: in_features as isize,
            in_stride: 1,
        }
    }

    /// A [in, out] row-major matrix at `ptr` seen as its transpose (PADDLE orientation).
    pub fn transposed(ptr: *const f32, out_features: usize, in_features: usize) -> Self {
        Linear {
            ptr,
            out_features,
            in_features,
            out_stride: 1,
            in_stride: out_features as isize,
        }
    }

    /// `rows` outputs starting at output `first` (a slice of the out dimension).
    pub fn out_rows(&self, first: usize, rows: usize) -> Self {
        debug_assert!(first + rows <= self.out_features);
        Linear {
            ptr: self.ptr.wrapping_offset(first as isize * self.out_stride),
            out_features: rows,
            ..*self
        }
    }

    /// Every `step`-th output starting at `first` (de-interleaving gate/up rows).
    pub fn out_rows_strided(&self, first: usize, step: usize, rows: usize) -> Self {
        debug_assert!(first + step * (rows - 1) < self.out_features);
        Linear {
            ptr: self.ptr.wrapping_offset(first as isize * self.out_stride),
            out_features: rows,
            out_stride: self.out_stride * step as isize,
            ..*self
        }
    }

    /// y[m, out] (row stride `y_stride`) = x[m, in] (row stride `x_stride`) · Wᵀ, plus y if
    /// `accumulate`. f32 accumulation; deterministic for a given `threads`.
    ///
    /// # Safety
    /// `x` and `y` must cover `m` rows of their strides; `y` must not overlap `x` or W.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn apply(
        &self,
        m: usize,
        x: *const f32,
        x_stride: usize,
        y: *mut f32,
        y_stride: usize,
        accumulate: bool,
        threads: usize,
    ) {
        if m == 0 {
            return;
        }
        let parallelism = if threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        gemm(
            m,
            self.out_features,
            self.in_features,
            y,
            1,
            y_stride as isize,
            accumulate,
            x,
            1,
            x_stride as isize,
            self.ptr,
            self.out_stride,
            self.in_stride,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_matches_naive_for_both_orientations() {
        let (m, o, i) = (3usize, 5usize, 7usize);
        let w: Vec<f32> = (0..o * i).map(|v| (v as f32 * 0.37).sin()).collect();
        let wt: Vec<f32> = (0..o * i).map(|v| w[(v % o) * i + v / o]).collect();
        let x: Vec<f32> = (0..m * i).map(|v| (v as f32 * 0.11).cos()).collect();
        for lin in [
            Linear::row_major(w.as_ptr(), o, i),
            Linear::transposed(wt.as_ptr(), o, i),
        ] {
            let mut y = vec![1.0f32; m * o];
            unsafe { lin.apply(m, x.as_ptr(), i, y.as_mut_ptr(), o, true, 1) };
            for r in 0..m {
                for c in 0..o {
                    let want: f32 = 1.0 + (0..i).map(|k| x[r * i + k] * w[c * i + k]).sum::<f32>();
                    assert!((y[r * o + c] - want).abs() < 1e-5);
                }
            }
        }
        // Strided rows pick rows 1 and 3 of W.
        let lin = Linear::row_major(w.as_ptr(), o, i).out_rows_strided(1, 2, 2);
        let mut y = vec![0.0f32; 2];
        unsafe { lin.apply(1, x.as_ptr(), i, y.as_mut_ptr(), 2, false, 1) };
        let want: f32 = (0..i).map(|k| x[k] * w[3 * i + k]).sum();
        assert!((y[1] - want).abs() < 1e-5);
    }
}
