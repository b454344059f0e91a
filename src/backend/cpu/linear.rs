//! A strided view of one weight matrix in nn.Linear orientation (W [out, in], y = x · Wᵀ) and
//! the dense product the CPU backend runs. Strides let one view type cover every accepted
//! layout (TORCH, PADDLE, PER_EXPERT, gate/up interleaved) with no repack.
//!
//! Two kernels: the `gemm` crate (cache-blocked, packed, AVX-512 where available) for many
//! rows, and `small_m` below for the few rows each expert sees at decode. With m ≤ 32 rows the
//! `gemm` crate's microkernels run mostly empty lanes (its tiles are wide along m) and its m = 1
//! path is single-threaded, so the product there is slower than streaming W from memory; a
//! direct dot-product kernel over W's contiguous rows keeps up with memory bandwidth.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Largest row count `apply` hands to the small-m kernel. Measured on a 2-core Zen 5 (AVX2
/// kernel against the `gemm` crate's AVX-512 one, single thread, DeepSeek/Mixtral/Qwen expert
/// shapes): the small-m kernel is 2.5x faster at m = 2..8, 1.2-1.5x at 16, still ahead at 32,
/// and ~10% behind at 64.
const SMALL_M_MAX_ROWS: usize = 32;

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
    /// `accumulate`. f32 accumulation; the same inputs give the same bits (the `gemm` crate
    /// splits work over output tiles, never along `in`, and the small-m kernel fixes each
    /// element's summation order).
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
        if m <= SMALL_M_MAX_ROWS && self.in_stride == 1 && small_m::available() {
            self.apply_small_m(m, x, x_stride, y, y_stride, accumulate, threads);
        } else {
            self.apply_gemm(m, x, x_stride, y, y_stride, accumulate, threads);
        }
    }

    /// `apply` through the `gemm` crate.
    ///
    /// # Safety
    /// As `apply`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn apply_gemm(
        &self,
        m: usize,
        x: *const f32,
        x_stride: usize,
        y: *mut f32,
        y_stride: usize,
        accumulate: bool,
        threads: usize,
    ) {
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

    /// `apply` through the small-m kernel, the output features split over `threads` workers.
    /// Every output element is one fixed dot product (see `small_m`), so neither the split nor
    /// the schedule changes a bit of the result.
    ///
    /// # Safety
    /// As `apply`, and `in_stride == 1`, `small_m::available()`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn apply_small_m(
        &self,
        m: usize,
        x: *const f32,
        x_stride: usize,
        y: *mut f32,
        y_stride: usize,
        accumulate: bool,
        threads: usize,
    ) {
        let n = self.out_features;
        let (x, y, w) = (
            SendPtr(x as *mut f32),
            SendPtr(y),
            SendPtr(self.ptr as *mut f32),
        );
        let run = |first: usize, rows: usize| {
            // SAFETY: rows [first, first + rows) of W and columns of y lie inside the caller's
            // extents; workers write disjoint columns of y.
            unsafe {
                small_m::product(
                    m,
                    rows,
                    self.in_features,
                    x.get(),
                    x_stride,
                    w.get().offset(first as isize * self.out_stride),
                    self.out_stride,
                    y.get().add(first),
                    y_stride,
                    accumulate,
                )
            }
        };
        // A few chunks per worker so an unevenly fast core is not left waiting; each chunk a
        // whole number of the kernel's row tiles and long enough (≥ 64 rows) to stream W.
        let chunks = if threads > 1 {
            (threads * 4).min(n / 64)
        } else {
            1
        };
        if chunks <= 1 {
            run(0, n);
            return;
        }
        let chunk = n.div_ceil(chunks).next_multiple_of(small_m::ROW_TILE);
        (0..n.div_ceil(chunk))
            .into_par_iter()
            .for_each(|c| run(c * chunk, chunk.min(n - c * chunk)));
    }
}

/// A raw pointer handed to worker threads that touch disjoint parts of its target.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only where the workers read shared data or write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Through a method, so closures capture the whole (Send) wrapper, not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// y[r, o] (+)= Σ_i x[r, i] · W[o, i] for a few rows r, W's rows contiguous, by direct dot
/// products: W streams from memory once, each loaded W vector meets every x row in registers.
///
/// Each output element is accumulated the same way whatever tile computes it and whatever m
/// is: one 8-lane f32 FMA accumulator over i in steps of 8, its lanes summed in a fixed tree,
/// then the i % 8 tail by scalar FMA. A token's output is thus the same bits whether its
/// expert saw 1 row or 30, and whichever thread ran it.
mod small_m {
    /// Output rows per register tile (the unit the thread split respects).
    pub const ROW_TILE: usize = 4;

    /// Whether this CPU runs the kernel; otherwise `apply` keeps to the `gemm` crate.
    #[inline]
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// # Safety
    /// `available()`; x covers m rows of `x_stride`, W n rows of `w_stride` with k contiguous
    /// values each, y m rows of `y_stride` with n values each; y overlaps neither.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn product(
        m: usize,
        n: usize,
        k: usize,
        x: *const f32,
        x_stride: usize,
        w: *const f32,
        w_stride: isize,
        y: *mut f32,
        y_stride: usize,
        accumulate: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        avx2::product(m, n, k, x, x_stride, w, w_stride, y, y_stride, accumulate);
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("small_m::product without small_m::available()");
    }

    /// AVX2 + FMA (not AVX-512: the crate's rust-version predates its intrinsics, and at these
    /// row counts the kernel is bound by memory, not by FMA width).
    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use std::arch::x86_64::*;

        use super::ROW_TILE;

        const LANES: usize = 8;
        /// x rows per register tile: ROW_TILE × X_TILE = 8 accumulators, plus 4 W vectors and
        /// one x vector, fit the 16 ymm registers without spills (4 × 3 did spill) and keep two
        /// FMAs a cycle in flight over the 4-cycle FMA latency.
        const X_TILE: usize = 2;

        /// Lanes of `v` summed in a fixed order: (0+4, 1+5, 2+6, 3+7), then pairs, then one.
        // The helpers carry the target features themselves so their intrinsics inline into
        // straight-line AVX2 code without leaning on the inliner's order.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn lane_sum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
        }

        /// One RW × RX register tile: W rows `w + a·w_stride`, x rows `x + b·x_stride`,
        /// outputs `y + b·y_stride + a`.
        // Index loops: acc[a][b] pairs W row a with x row b, which reads clearer than zips.
        #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn tile<const RW: usize, const RX: usize>(
            k: usize,
            x: *const f32,
            x_stride: usize,
            w: *const f32,
            w_stride: isize,
            y: *mut f32,
            y_stride: usize,
            accumulate: bool,
        ) {
            let w_row = |a: usize| w.offset(a as isize * w_stride);
            let mut acc = [[_mm256_setzero_ps(); RX]; RW];
            let full = k - k % LANES;
            let step = |i: usize, acc: &mut [[__m256; RX]; RW]| {
                let mut wv = [_mm256_setzero_ps(); RW];
                for (a, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(w_row(a).add(i));
                }
                for b in 0..RX {
                    let xv = _mm256_loadu_ps(x.add(b * x_stride + i));
                    for a in 0..RW {
                        acc[a][b] = _mm256_fmadd_ps(wv[a], xv, acc[a][b]);
                    }
                }
            };
            let mut i = 0;
            while i < full {
                step(i, &mut acc);
                i += LANES;
            }
            for (a, acc_a) in acc.iter().enumerate() {
                for (b, &acc_ab) in acc_a.iter().enumerate() {
                    let mut sum = lane_sum(acc_ab);
                    for t in full..k {
                        sum = (*w_row(a).add(t)).mul_add(*x.add(b * x_stride + t), sum);
                    }
                    let out = y.add(b * y_stride + a);
                    *out = if accumulate { *out + sum } else { sum };
                }
            }
        }

        /// Tiles of ROW_TILE W rows; within one, x rows in pairs then a single, so a tile of W
        /// (a few KB per row) is read from memory once and from L2 for the other x rows.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn product(
            m: usize,
            n: usize,
            k: usize,
            x: *const f32,
            x_stride: usize,
            w: *const f32,
            w_stride: isize,
            y: *mut f32,
            y_stride: usize,
            accumulate: bool,
        ) {
            let mut o = 0;
            while o < n {
                let (wo, yo) = (w.offset(o as isize * w_stride), y.add(o));
                let full_tile = o + ROW_TILE <= n;
                let mut r = 0;
                while r < m {
                    let (xr, yr) = (x.add(r * x_stride), yo.add(r * y_stride));
                    let pair = r + X_TILE <= m;
                    match (full_tile, pair) {
                        (true, true) => tile::<ROW_TILE, X_TILE>(
                            k, xr, x_stride, wo, w_stride, yr, y_stride, accumulate,
                        ),
                        (true, false) => tile::<ROW_TILE, 1>(
                            k, xr, x_stride, wo, w_stride, yr, y_stride, accumulate,
                        ),
                        (false, true) => tile::<1, X_TILE>(
                            k, xr, x_stride, wo, w_stride, yr, y_stride, accumulate,
                        ),
                        (false, false) => {
                            tile::<1, 1>(k, xr, x_stride, wo, w_stride, yr, y_stride, accumulate)
                        }
                    }
                    r += if pair { X_TILE } else { 1 };
                }
                o += if full_tile { ROW_TILE } else { 1 };
            }
        }
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

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|v| ((v as f32 + seed) * 0.618).sin()).collect()
    }

    /// Runs `apply` for every row count up to past the small-m limit and compares with the
    /// `gemm` crate path: odd n and k (tile and lane tails), strided x, y and W rows (gate/up
    /// interleaved), accumulate on and off, one and two threads.
    #[test]
    fn small_m_matches_gemm() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (n, k) = (133usize, 37usize);
        let w = values(2 * n * k, 0.5);
        let (x_stride, y_stride) = (k + 3, n + 5);
        let x = values((SMALL_M_MAX_ROWS + 2) * x_stride, 1.5);
        let lin = Linear::row_major(w.as_ptr(), 2 * n, k).out_rows_strided(1, 2, n);
        for m in 1..=SMALL_M_MAX_ROWS + 2 {
            for accumulate in [false, true] {
                for threads in [1, 2] {
                    let mut want = values(m * y_stride, 2.5);
                    let mut got = want.clone();
                    pool.install(|| unsafe {
                        let (xp, yw, yg) = (x.as_ptr(), want.as_mut_ptr(), got.as_mut_ptr());
                        lin.apply_gemm(m, xp, x_stride, yw, y_stride, accumulate, threads);
                        lin.apply(m, xp, x_stride, yg, y_stride, accumulate, threads);
                    });
                    for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                        let (r, c) = (i / y_stride, i % y_stride);
                        if c >= n && !accumulate {
                            // Padding past n must be untouched.
                            assert_eq!(a.to_bits(), b.to_bits(), "m {m} row {r} col {c}");
                        }
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                            "m {m} row {r} col {c}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// A row's output is the same bits whatever the thread count and whatever other rows
    /// share the call (the expert stage relies on it for schedule-independent results).
    #[test]
    fn small_m_is_bitwise_deterministic() {
        if !small_m::available() {
            return;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (n, k, m) = (517usize, 301usize, 7usize);
        let w = values(n * k, 0.25);
        let x = values(m * k, 4.0);
        let lin = Linear::row_major(w.as_ptr(), n, k);
        let run = |rows: usize, x: &[f32], threads: usize| {
            let mut y = vec![0.0f32; rows * n];
            pool.install(|| unsafe {
                lin.apply(rows, x.as_ptr(), k, y.as_mut_ptr(), n, false, threads)
            });
            y
        };
        let one = run(m, &x, 1);
        assert_eq!(one, run(m, &x, 2));
        for r in 0..m {
            let alone = run(1, &x[r * k..(r + 1) * k], 2);
            assert_eq!(alone, one[r * n..(r + 1) * n]);
        }
    }
}
