//! The routed experts in a quantized format, in the one orientation every backend starts from,
//! built from the caller's weights: quantize-on-load from dense experts, or pre-quantized data
//! with its scales.
//!
//! Canonical form: for each expert `e`, `W13[e]` is one `[N = 2I, K = L]` matrix and `W2[e]` one
//! `[N = L, K = I]` matrix, row-major with K contiguous (TORCH orientation), each quantized as
//! one matrix (one NVFP4 global scale per matrix; FP8 blocks over its rows). W13's rows are in
//! the order the caller gave them: the gate block then the up block, or alternating gate and up
//! rows under `gate_up_interleaved` (the backends de-interleave after dequantizing or when
//! repacking for their kernels).
//!
//! Pre-quantized layouts (stacked over the E experts, `[N, K]` per matrix as above):
//!
//! | format    | data                            | scales                               | global |
//! |-----------|---------------------------------|--------------------------------------|--------|
//! | FP8_BLOCK | `[E, N, K]` E4M3                | `[E, N/128, K/128]` f32 (scale_inv)  | —      |
//! | MXFP4     | `[E, N, K/2]`, 2 E2M1 per byte  | `[E, N, K/32]` UE8M0                 | —      |
//! | NVFP4     | `[E, N, K/2]`, 2 E2M1 per byte  | `[E, N, K/16]` E4M3                  | `[E]`  |
//!
//! E2M1 pairs hold element `2i` of a row in the low nibble. `MoeConfig::validate` makes K a
//! multiple of the format's group (128 / 32 / 16), so no block is partial (for FP8_BLOCK N is
//! then a multiple of 128 as well: 2I and L are both K of a matrix). Values are
//! `decode(data) · scale` (NVFP4: `· (e4m3(scale) · global)`), the codecs' rule.
//!
//! Quantize-on-load reads the dense experts (any layout, F32/BF16/F16) exactly into this
//! orientation as f32 and quantizes each matrix with the format's codec, so it gives bitwise
//! the weights that loading the codec's output (`fdmoe_quantize_weights` of the same
//! `[E, N, K]` arrays) as pre-quantized gives.
//!
//! Pre-quantized scales are checked at load, each error naming the field and the position: an
//! FP8_BLOCK scale or NVFP4 global scale must be finite and non-negative; an MXFP4 scale must
//! not be the NaN byte `0xFF`; an NVFP4 block scale must be a non-negative E4M3 code (not NaN).

use std::ffi::c_void;

use super::fp8_block::{quantize_fp8_block, Fp8BlockMatrix, FP8_BLOCK_SIZE};
use super::mxfp4::{quantize_mxfp4, Mxfp4Matrix, MXFP4_GROUP_SIZE};
use super::nvfp4::{quantize_nvfp4, Nvfp4Matrix, NVFP4_GROUP_SIZE};
use super::ue8m0::UE8M0_NAN;
use super::RowDecode;
use super::SourceElement;
use crate::config::{FdmoeDtype, FdmoeLayout, MoeConfig};
use crate::dtype::load_f32;
use crate::error::{ensure, Error, Result};
use crate::weights::{ExpertSource, WeightSource};

/// One matrix in one of the quantized formats.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantizedMatrix {
    Fp8Block(Fp8BlockMatrix),
    Mxfp4(Mxfp4Matrix),
    Nvfp4(Nvfp4Matrix),
}

/// How many elements of what size each part of one `[rows, cols]` matrix has in a format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartSizes {
    /// Bytes of packed elements.
    pub data_bytes: usize,
    /// Number of scales.
    pub scale_count: usize,
    /// Bytes of one scale (4 for the f32 scales of FP8_BLOCK, else 1).
    pub scale_size: usize,
}

impl PartSizes {
    /// Bytes of all scales.
    pub fn scale_bytes(&self) -> usize {
        self.scale_count * self.scale_size
    }
}

/// The part sizes of a `[rows, cols]` matrix in `format`; `InvalidArgument` when `format` is
/// not quantized or `cols` is not a multiple of its group (FP8_BLOCK takes any shape).
pub fn part_sizes(format: FdmoeDtype, rows: usize, cols: usize) -> Result<PartSizes> {
    let elements = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::invalid(format!("rows ({rows}) x cols ({cols}) overflows")))?;
    let group = |g: usize| -> Result<()> {
        ensure!(
            cols % g == 0,
            "{format} needs K (cols, the contiguous dimension) to be a multiple of {g}, got cols = {cols}"
        );
        Ok(())
    };
    Ok(match format {
        FdmoeDtype::Fp8Block => PartSizes {
            data_bytes: elements,
            scale_count: rows.div_ceil(FP8_BLOCK_SIZE) * cols.div_ceil(FP8_BLOCK_SIZE),
            scale_size: 4,
        },
        FdmoeDtype::Mxfp4 => {
            group(MXFP4_GROUP_SIZE)?;
            PartSizes {
                data_bytes: elements / 2,
                scale_count: elements / MXFP4_GROUP_SIZE,
                scale_size: 1,
            }
        }
        FdmoeDtype::Nvfp4 => {
            group(NVFP4_GROUP_SIZE)?;
            PartSizes {
                data_bytes: elements / 2,
                scale_count: elements / NVFP4_GROUP_SIZE,
                scale_size: 1,
            }
        }
        other => {
            return Err(Error::invalid(format!(
                "{other} is not a quantized format (fp8_block, mxfp4, nvfp4)"
            )))
        }
    })
}

impl QuantizedMatrix {
    /// Quantizes a row-major `[rows, cols]` matrix with the codec of `format` (NVFP4: the
    /// global scale from the matrix's amax).
    pub fn quantize<W: SourceElement>(
        format: FdmoeDtype,
        weight: &[W],
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        part_sizes(format, rows, cols)?;
        Ok(match format {
            FdmoeDtype::Fp8Block => Self::Fp8Block(quantize_fp8_block(weight, rows, cols)?),
            FdmoeDtype::Mxfp4 => Self::Mxfp4(quantize_mxfp4(weight, rows, cols)?),
            _ => Self::Nvfp4(quantize_nvfp4(weight, rows, cols)?),
        })
    }

    /// A matrix from raw parts laid out as `part_sizes` says (copied; any alignment). No value
    /// is checked: see `check_scales`.
    ///
    /// # Safety
    /// `data` and `scales` point to `part_sizes(format, rows, cols)` readable bytes.
    pub unsafe fn from_raw(
        format: FdmoeDtype,
        rows: usize,
        cols: usize,
        data: *const u8,
        scales: *const u8,
        global_scale: f32,
    ) -> Result<Self> {
        let sizes = part_sizes(format, rows, cols)?;
        let data = std::slice::from_raw_parts(data, sizes.data_bytes).to_vec();
        let scale_bytes = std::slice::from_raw_parts(scales, sizes.scale_bytes());
        Ok(match format {
            FdmoeDtype::Fp8Block => {
                let scales = scale_bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Self::Fp8Block(Fp8BlockMatrix::from_parts(rows, cols, data, scales)?)
            }
            FdmoeDtype::Mxfp4 => Self::Mxfp4(Mxfp4Matrix::from_parts(
                rows,
                cols,
                data,
                scale_bytes.to_vec(),
            )?),
            _ => Self::Nvfp4(Nvfp4Matrix::from_parts(
                rows,
                cols,
                data,
                scale_bytes.to_vec(),
                global_scale,
            )?),
        })
    }

    pub fn format(&self) -> FdmoeDtype {
        match self {
            Self::Fp8Block(_) => FdmoeDtype::Fp8Block,
            Self::Mxfp4(_) => FdmoeDtype::Mxfp4,
            Self::Nvfp4(_) => FdmoeDtype::Nvfp4,
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            Self::Fp8Block(m) => m.rows(),
            Self::Mxfp4(m) => m.rows(),
            Self::Nvfp4(m) => m.rows(),
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Self::Fp8Block(m) => m.cols(),
            Self::Mxfp4(m) => m.cols(),
            Self::Nvfp4(m) => m.cols(),
        }
    }

    /// The packed elements.
    pub fn data(&self) -> &[u8] {
        match self {
            Self::Fp8Block(m) => m.data(),
            Self::Mxfp4(m) => m.data(),
            Self::Nvfp4(m) => m.data(),
        }
    }

    /// The scales as bytes (FP8_BLOCK: native-endian f32).
    pub fn scale_bytes(&self) -> Vec<u8> {
        match self {
            Self::Fp8Block(m) => m.scales().iter().flat_map(|s| s.to_ne_bytes()).collect(),
            Self::Mxfp4(m) => m.scales().to_vec(),
            Self::Nvfp4(m) => m.block_scales().to_vec(),
        }
    }

    /// NVFP4's global scale; `None` for the other formats.
    pub fn global_scale(&self) -> Option<f32> {
        match self {
            Self::Nvfp4(m) => Some(m.global_scale()),
            _ => None,
        }
    }

    /// Dequantizes into `out` (`rows * cols` values, row-major).
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<()> {
        match self {
            Self::Fp8Block(m) => m.dequantize_into(out),
            Self::Mxfp4(m) => m.dequantize_into(out),
            Self::Nvfp4(m) => m.dequantize_into(out),
        }
    }

    /// Checks the scales of a pre-quantized matrix (module notes); `what` names it in the
    /// message, e.g. "weights.w13_scale[expert 3]".
    pub fn check_scales(&self, what: &str, global_what: &str) -> Result<()> {
        match self {
            Self::Fp8Block(m) => {
                if let Some((i, s)) = m
                    .scales()
                    .iter()
                    .enumerate()
                    .find(|(_, s)| !(s.is_finite() && **s >= 0.0))
                {
                    let cols = m.scale_cols();
                    return Err(Error::invalid(format!(
                        "{what}[{}, {}] = {s} is not a finite, non-negative FP8_BLOCK scale",
                        i / cols,
                        i % cols
                    )));
                }
            }
            Self::Mxfp4(m) => {
                if let Some(i) = m.scales().iter().position(|&b| b == UE8M0_NAN) {
                    let cols = m.cols() / MXFP4_GROUP_SIZE;
                    return Err(Error::invalid(format!(
                        "{what}[{}, {}] = 0xFF is the NaN UE8M0 scale",
                        i / cols,
                        i % cols
                    )));
                }
            }
            Self::Nvfp4(m) => {
                let g = m.global_scale();
                ensure!(
                    g.is_finite() && g >= 0.0,
                    "{global_what} = {g} is not a finite, non-negative NVFP4 global scale"
                );
                // Negative codes have the sign bit; 0x7F is NaN (0x80 is -0, also rejected).
                if let Some(i) = m.block_scales().iter().position(|&b| b >= 0x7F) {
                    let cols = m.cols() / NVFP4_GROUP_SIZE;
                    return Err(Error::invalid(format!(
                        "{what}[{}, {}] = {:#04x} is not a non-negative E4M3 block scale (NaN or negative)",
                        i / cols,
                        i % cols,
                        m.block_scales()[i]
                    )));
                }
            }
        }
        Ok(())
    }
}

/// One of an expert's two matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertMatrix {
    /// `[2I, L]`: gate and up rows.
    W13,
    /// `[L, I]`: down.
    W2,
}

impl ExpertMatrix {
    /// `[N, K]` of this matrix for `cfg`.
    pub fn shape(self, cfg: &MoeConfig) -> (usize, usize) {
        let (i, l) = (cfg.intermediate_size, cfg.expert_hidden());
        match self {
            ExpertMatrix::W13 => (2 * i, l),
            ExpertMatrix::W2 => (l, i),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ExpertMatrix::W13 => "w13",
            ExpertMatrix::W2 => "w2",
        }
    }
}

/// Hands every expert's W13 and W2 of `src`, in `cfg.weight_dtype` (a quantized format), to
/// `sink` one matrix at a time (expert 0 W13, expert 0 W2, expert 1 W13, ...), so a backend can
/// turn each into its own storage without holding every expert twice. Dense experts are
/// quantized (quantize-on-load); `ExpertSource::Quantized` ones are read and their scales
/// checked. `src` must have passed `WeightSource::validate`, and its pointers must cover the
/// extents of the C API's documentation (host memory).
pub fn for_each_quantized_expert(
    cfg: &MoeConfig,
    src: &WeightSource,
    mut sink: impl FnMut(usize, ExpertMatrix, QuantizedMatrix) -> Result<()>,
) -> Result<()> {
    let format = cfg.weight_dtype;
    ensure!(
        format.is_quantized(),
        "config.weight_dtype = {format} is not a quantized format"
    );
    let mut dense = Vec::new();
    let mut scratch = Vec::new();
    for e in 0..cfg.num_experts {
        for which in [ExpertMatrix::W13, ExpertMatrix::W2] {
            let (rows, cols) = which.shape(cfg);
            let matrix = match &src.experts {
                ExpertSource::Quantized {
                    w13,
                    w2,
                    w13_scale,
                    w2_scale,
                    w13_global_scale,
                    w2_global_scale,
                    ..
                } => {
                    let (data, scales, globals) = match which {
                        ExpertMatrix::W13 => (*w13, *w13_scale, *w13_global_scale),
                        ExpertMatrix::W2 => (*w2, *w2_scale, *w2_global_scale),
                    };
                    let sizes = part_sizes(format, rows, cols)?;
                    let name = which.name();
                    // SAFETY: for NVFP4 the caller promises E global scales (validated
                    // non-NULL).
                    let global = if globals.is_null() {
                        1.0
                    } else {
                        unsafe { globals.add(e).read_unaligned() }
                    };
                    ensure!(
                        global.is_finite() && global >= 0.0,
                        "weights.{name}_global_scale[{e}] = {global} is not a finite, non-negative NVFP4 global scale"
                    );
                    // SAFETY: the caller promises [E, ...] parts of these sizes.
                    let m = unsafe {
                        QuantizedMatrix::from_raw(
                            format,
                            rows,
                            cols,
                            (data as *const u8).add(e * sizes.data_bytes),
                            (scales as *const u8).add(e * sizes.scale_bytes()),
                            global,
                        )
                    }
                    .map_err(|err| {
                        Error::invalid(format!("weights.{name} of expert {e}: {}", err.message))
                    })?;
                    m.check_scales(
                        &format!("weights.{name}_scale[expert {e}]"),
                        &format!("weights.{name}_global_scale[{e}]"),
                    )?;
                    m
                }
                _ => {
                    dense.resize(rows * cols, 0.0f32);
                    read_dense_expert(cfg, src, e, which, &mut dense, &mut scratch);
                    QuantizedMatrix::quantize(format, &dense, rows, cols)?
                }
            };
            sink(e, which, matrix)?;
        }
    }
    Ok(())
}

/// Reads expert `e`'s dense matrix `which` of `src` into `out` ([N, K] f32, TORCH orientation,
/// W13 rows in the order given). `scratch` is reused for PADDLE's transpose.
fn read_dense_expert(
    cfg: &MoeConfig,
    src: &WeightSource,
    e: usize,
    which: ExpertMatrix,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (rows, cols) = which.shape(cfg);
    let count = rows * cols;
    let size = src.dtype.dense_size().expect("validated dense");
    // SAFETY (every read below): the caller promises the documented extents of every pointer
    // of `src` in src.dtype (stacked: E matrices of `count` elements; per expert: gate/up
    // [I, L], down [L, I]).
    let read = |ptr: *const c_void, offset: usize, dst: &mut [f32]| unsafe {
        load_f32(src.dtype, (ptr as *const u8).add(offset * size), dst)
    };
    match &src.experts {
        ExpertSource::Stacked { w13, w2 } => {
            let ptr = match which {
                ExpertMatrix::W13 => *w13,
                ExpertMatrix::W2 => *w2,
            };
            if src.layout == FdmoeLayout::Paddle {
                // Stored [K, N]: read, then transpose into [N, K].
                scratch.resize(count, 0.0);
                read(ptr, e * count, scratch);
                for (k, stored_row) in scratch.chunks_exact(rows).enumerate() {
                    for (n, &v) in stored_row.iter().enumerate() {
                        out[n * cols + k] = v;
                    }
                }
            } else {
                read(ptr, e * count, out);
            }
        }
        ExpertSource::PerExpert {
            gate_proj,
            up_proj,
            down_proj,
        } => match which {
            ExpertMatrix::W13 => {
                let (gate, up) = out.split_at_mut(count / 2);
                read(gate_proj[e], 0, gate);
                read(up_proj[e], 0, up);
            }
            ExpertMatrix::W2 => read(down_proj[e], 0, out),
        },
        ExpertSource::Quantized { .. } => unreachable!("dense experts only"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FdmoeMemory, FdmoeOwnership};
    use crate::quant::testing::sample_matrix;

    fn cfg(format: FdmoeDtype) -> MoeConfig {
        MoeConfig {
            num_experts: 3,
            top_k: 1,
            hidden_size: 128,
            intermediate_size: 128,
            weight_dtype: format,
            ..Default::default()
        }
    }

    fn source(layout: FdmoeLayout, experts: ExpertSource) -> WeightSource {
        WeightSource {
            layout,
            dtype: FdmoeDtype::F32,
            memory: FdmoeMemory::Host,
            ownership: FdmoeOwnership::Own,
            gate_up_interleaved: false,
            experts,
            gate: None,
            correction_bias: None,
            fc1: None,
            fc2: None,
            shared_w13: None,
            shared_w2: None,
        }
    }

    fn collect(cfg: &MoeConfig, src: &WeightSource) -> Result<Vec<QuantizedMatrix>> {
        let mut all = Vec::new();
        for_each_quantized_expert(cfg, src, |_, _, m| {
            all.push(m);
            Ok(())
        })?;
        Ok(all)
    }

    #[test]
    fn part_sizes_per_format() {
        let s = part_sizes(FdmoeDtype::Fp8Block, 256, 384).unwrap();
        assert_eq!(
            (s.data_bytes, s.scale_count, s.scale_size),
            (256 * 384, 6, 4)
        );
        let s = part_sizes(FdmoeDtype::Mxfp4, 4, 64).unwrap();
        assert_eq!((s.data_bytes, s.scale_bytes()), (128, 8));
        let s = part_sizes(FdmoeDtype::Nvfp4, 4, 64).unwrap();
        assert_eq!((s.data_bytes, s.scale_bytes()), (128, 16));
        let m = part_sizes(FdmoeDtype::Nvfp4, 4, 40).unwrap_err().message;
        assert!(
            m.contains("multiple of 16") && m.contains("cols = 40"),
            "{m}"
        );
        assert!(part_sizes(FdmoeDtype::Bf16, 4, 64).is_err());
    }

    #[test]
    fn layouts_quantize_the_same_torch_matrices_and_raw_parts_round_trip() {
        for format in [FdmoeDtype::Fp8Block, FdmoeDtype::Mxfp4, FdmoeDtype::Nvfp4] {
            let c = cfg(format);
            let (e, i, l) = (3, 128, 128);
            let w13 = sample_matrix(e * 2 * i, l, 3);
            let w2 = sample_matrix(e * l, i, 4);
            let torch = collect(
                &c,
                &source(
                    FdmoeLayout::Torch,
                    ExpertSource::Stacked {
                        w13: w13.as_ptr().cast(),
                        w2: w2.as_ptr().cast(),
                    },
                ),
            )
            .unwrap();
            // PADDLE: every matrix transposed.
            let transpose = |m: &[f32], rows: usize, cols: usize| -> Vec<f32> {
                (0..rows * cols)
                    .map(|x| m[(x % rows) * cols + x / rows])
                    .collect()
            };
            let p13: Vec<f32> = (0..e)
                .flat_map(|x| transpose(&w13[x * 2 * i * l..][..2 * i * l], 2 * i, l))
                .collect();
            let p2: Vec<f32> = (0..e)
                .flat_map(|x| transpose(&w2[x * l * i..][..l * i], l, i))
                .collect();
            let paddle = collect(
                &c,
                &source(
                    FdmoeLayout::Paddle,
                    ExpertSource::Stacked {
                        w13: p13.as_ptr().cast(),
                        w2: p2.as_ptr().cast(),
                    },
                ),
            )
            .unwrap();
            assert_eq!(torch, paddle, "{format}");
            let ptrs = |m: &[f32], n: usize, off: usize| -> Vec<*const c_void> {
                (0..e)
                    .map(|x| m[x * 2 * n + off..].as_ptr().cast())
                    .collect()
            };
            let per_expert = collect(
                &c,
                &source(
                    FdmoeLayout::PerExpert,
                    ExpertSource::PerExpert {
                        gate_proj: ptrs(&w13, i * l, 0),
                        up_proj: ptrs(&w13, i * l, i * l),
                        down_proj: (0..e).map(|x| w2[x * l * i..].as_ptr().cast()).collect(),
                    },
                ),
            )
            .unwrap();
            assert_eq!(torch, per_expert, "{format}");
            // The same codes given as pre-quantized parts read back identically.
            let stack = |which: usize| -> (Vec<u8>, Vec<u8>, Vec<f32>) {
                let ms = torch.iter().skip(which).step_by(2);
                let data = ms.clone().flat_map(|m| m.data().to_vec()).collect();
                let scales = ms.clone().flat_map(|m| m.scale_bytes()).collect();
                let globals = ms.map(|m| m.global_scale().unwrap_or(0.0)).collect();
                (data, scales, globals)
            };
            let (d13, s13, g13) = stack(0);
            let (d2, s2, g2) = stack(1);
            let nv = format == FdmoeDtype::Nvfp4;
            let pre = collect(
                &c,
                &source(
                    FdmoeLayout::Torch,
                    ExpertSource::Quantized {
                        format,
                        w13: d13.as_ptr().cast(),
                        w2: d2.as_ptr().cast(),
                        w13_scale: s13.as_ptr().cast(),
                        w2_scale: s2.as_ptr().cast(),
                        w13_global_scale: if nv { g13.as_ptr() } else { std::ptr::null() },
                        w2_global_scale: if nv { g2.as_ptr() } else { std::ptr::null() },
                    },
                ),
            )
            .unwrap();
            assert_eq!(torch, pre, "{format}");
        }
    }

    #[test]
    fn bad_scales_are_named() {
        let w = sample_matrix(4, 64, 9);
        let mut m = QuantizedMatrix::quantize(FdmoeDtype::Mxfp4, &w, 4, 64).unwrap();
        m.check_scales("s", "g").unwrap();
        if let QuantizedMatrix::Mxfp4(x) = &m {
            let (data, mut scales) = x.clone().into_parts();
            scales[3] = 0xFF;
            m = QuantizedMatrix::Mxfp4(Mxfp4Matrix::from_parts(4, 64, data, scales).unwrap());
        }
        let err = m
            .check_scales("weights.w2_scale[expert 1]", "g")
            .unwrap_err();
        assert!(
            err.message.contains("weights.w2_scale[expert 1][1, 1]"),
            "{}",
            err.message
        );

        let f = Fp8BlockMatrix::from_parts(128, 128, vec![0; 128 * 128], vec![f32::NAN]).unwrap();
        let err = QuantizedMatrix::Fp8Block(f)
            .check_scales("x", "g")
            .unwrap_err();
        assert!(err.message.contains("x[0, 0] = NaN"), "{}", err.message);

        let n = Nvfp4Matrix::from_parts(1, 16, vec![0; 8], vec![0x85], 1.0).unwrap();
        let err = QuantizedMatrix::Nvfp4(n)
            .check_scales("y", "g")
            .unwrap_err();
        assert!(err.message.contains("y[0, 0] = 0x85"), "{}", err.message);
        let n = Nvfp4Matrix::from_parts(1, 16, vec![0; 8], vec![0x38], -1.0).unwrap();
        let err = QuantizedMatrix::Nvfp4(n)
            .check_scales("y", "g[2]")
            .unwrap_err();
        assert!(err.message.contains("g[2] = -1"), "{}", err.message);
    }
}
