//! Codecs of the quantized formats (SPEC §5), shared by the CPU backend, the loaders and the
//! tests; the CPU reference built on them is the bit-exact oracle for the GPU kernels.
//!
//! Element and scale codecs, one per file:
//! - [`e4m3`]: OCP FP8 `e4m3fn` (bias 7, no ∞, NaN `0x7F`/`0xFF`, max 448), RNE + saturating;
//!   also the positive E4M3 block scales of NVFP4;
//! - [`e2m1`]: FP4 (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives), RNE + saturating, two per byte
//!   low nibble first;
//! - [`ue8m0`]: exponent-only scale 2^(b-127), `0xFF` NaN, and exact log2 helpers.
//!
//! Matrix formats over a row-major `[N, K]` weight (`rows = N` output features, `cols = K`
//! the contiguous reduction dimension); every scale tensor is row-major too, unswizzled (the
//! backends repack for their kernels at load):
//! - [`mxfp4`]: E2M1 + one UE8M0 scale per 32 along K, OCP MX v1.0 scale rule;
//! - [`nvfp4`]: E2M1 + one E4M3 scale per 16 along K + one f32 global scale, ModelOpt rule;
//! - [`fp8_block`]: E4M3 + one f32 scale per 128×128 block (DeepSeek-V3 `weight_scale_inv`);
//! - [`fp8_act`]: activations to E4M3 per token per 128 channels with f32 scales (the other
//!   operand of the `FP8_BLOCK` GEMMs);
//! - [`pre_dispatch`]: the FP8 pre-dispatch (MegaMoE input format): E4M3 + UE8M0 per 32
//!   channels packed four to an int32, top-k copied beside, padded to capacity.
//!
//! [`experts`] builds the routed experts of a layer in one of the matrix formats from the
//! caller's weights (quantize-on-load or pre-quantized parts), for every backend.
//!
//! Matrix quantizers read any [`SourceElement`] (f32, bf16, f16: converted to f32 exactly),
//! allocate their outputs once and run over rows in parallel with rayon; no per-element
//! allocation. Quantizers return `Err(InvalidArgument)` naming the dimension when a shape does
//! not fit the format; they never panic on caller data. The `*_row` helpers are the building
//! blocks for callers that own their buffers and panic on length mismatch (documented).

pub mod e2m1;
pub mod e4m3;
pub mod experts;
pub mod fp8_act;
pub mod fp8_block;
pub mod mxfp4;
pub mod nvfp4;
pub mod pre_dispatch;
pub mod ue8m0;

pub use e2m1::{decode_e2m1, encode_e2m1, pack_e2m1, E2M1_MAX};
pub use e4m3::{decode_e4m3, encode_e4m3, encode_e4m3_scale, E4M3_MAX};
pub use experts::QuantizedMatrix;
pub use fp8_act::{
    fake_quantize_fp8_activation_row, quantize_fp8_activations, quantize_fp8_activations_into,
    Fp8Activations,
};
pub use fp8_block::{quantize_fp8_block, Fp8BlockMatrix};
pub use mxfp4::{quantize_mxfp4, Mxfp4Matrix};
pub use nvfp4::{quantize_nvfp4, quantize_nvfp4_with_global_scale, Nvfp4Matrix};
pub use pre_dispatch::{
    fake_pre_dispatch_row, pre_dispatch_fp8_into, PreDispatchFp8, PreDispatchOutput,
};
pub use ue8m0::{decode_ue8m0, encode_ue8m0};

use crate::error::{ensure, Result};

/// An element type the quantizers read: anything `Copy` that converts to f32 (f32, `half::bf16`,
/// `half::f16`), shareable across the rayon workers.
pub trait SourceElement: Copy + Send + Sync + Into<f32> {}
impl<T: Copy + Send + Sync + Into<f32>> SourceElement for T {}

/// Checks that a `[rows, cols]` matrix given as `len` elements has that shape, without
/// overflow; `what` names the argument in the message.
/// A quantized `[rows, cols]` matrix that decodes one row at a time; decoding the whole matrix
/// (row-parallel) is the same for every format.
pub trait RowDecode: Sync {
    /// Format name used in shape errors.
    const FORMAT: &'static str;
    fn shape(&self) -> (usize, usize);
    /// Dequantizes row `row` into `out` (`cols` values).
    fn decode_row(&self, row: usize, out: &mut [f32]);

    /// Dequantizes the whole matrix into `out` (`rows * cols` values, row-major).
    fn dequantize_into(&self, out: &mut [f32]) -> Result<()> {
        use rayon::prelude::*;
        let (rows, cols) = self.shape();
        check_matrix_len(
            &format!("{} dequantize output", Self::FORMAT),
            rows,
            cols,
            out.len(),
        )?;
        if cols > 0 {
            out.par_chunks_mut(cols)
                .enumerate()
                .for_each(|(row, values)| self.decode_row(row, values));
        }
        Ok(())
    }

    /// The whole matrix as f32, row-major `[rows, cols]`.
    fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = self.shape();
        let mut out = vec![0f32; rows * cols];
        self.dequantize_into(&mut out)
            .expect("the output is allocated to the matrix shape");
        out
    }
}

pub(crate) fn check_matrix_len(what: &str, rows: usize, cols: usize, len: usize) -> Result<()> {
    let expected = rows.checked_mul(cols);
    ensure!(
        expected == Some(len),
        "{what} has {len} elements, expected rows ({rows}) x cols ({cols})"
    );
    Ok(())
}

/// Largest |x| over the finite values of `values` (NaN and ±∞ skipped), 0 when there is none,
/// and whether every value was finite.
#[inline]
pub(crate) fn finite_amax<X: SourceElement>(values: &[X]) -> (f32, bool) {
    let mut amax = 0f32;
    let mut all_finite = true;
    for &v in values {
        let magnitude = v.into().abs();
        if magnitude <= f32::MAX {
            amax = amax.max(magnitude);
        } else {
            all_finite = false;
        }
    }
    (amax, all_finite)
}

/// Test helpers shared by the matrix formats.
#[cfg(test)]
pub(crate) mod testing {
    /// Deterministic pseudo-random values (xorshift), roughly uniform in [-1, 1), with a few
    /// rows scaled far up or down so that the scale rules see a wide dynamic range.
    pub fn sample_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let mut values = Vec::with_capacity(rows * cols);
        for row in 0..rows {
            let row_scale = match row % 5 {
                0 => 1.0e-3,
                1 => 40.0,
                2 => 1.0,
                3 => 3.0e3,
                _ => 0.02,
            };
            for _ in 0..cols {
                values.push(next() * row_scale);
            }
        }
        values
    }
}
