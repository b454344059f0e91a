//! Quantized experts (FP8_BLOCK, MXFP4, NVFP4) on the CPU backend, through the safe core:
//! - each format against a reference written here (weights dequantized by hand from the codec's
//!   parts, the forward in f64; FP8_BLOCK's activation quantization done per token per 128
//!   channels here too), with and without latent projection and shared experts;
//! - quantize-on-load (every dense layout) gives bitwise the output of loading the codec's
//!   output as pre-quantized weights, gate/up interleaving included;
//! - FP8_BLOCK does quantize the inputs of both expert GEMMs (the output is close to the
//!   reference that does, far from the one that does not);
//! - bad shapes, formats, pointers and scales are rejected with the field named;
//! - the accuracy of each format against the dense f32 layer, printed (not asserted): run with
//!   `cargo test --release --test quantized_cpu -- --nocapture accuracy`.

use fdmoe::quant::{
    decode_e2m1, decode_e4m3, decode_ue8m0, encode_e4m3, quantize_fp8_block, quantize_mxfp4,
    quantize_nvfp4,
};
use fdmoe::*;

const FORMATS: [FdmoeDtype; 3] = [FdmoeDtype::Fp8Block, FdmoeDtype::Mxfp4, FdmoeDtype::Nvfp4];

struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (a, b) = (self.uniform(), self.uniform());
        ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

/// A layer's dense weights in TORCH orientation (SPEC §8 draws: 1/sqrt(fan_in)).
struct Layer {
    e: usize,
    k: usize,
    h: usize,
    i: usize,
    l: usize,
    s: usize,
    w13: Vec<f32>,
    w2: Vec<f32>,
    fc1: Option<(Vec<f32>, Vec<f32>)>,
    shared: Option<(Vec<f32>, Vec<f32>)>,
}

impl Layer {
    fn new(e: usize, k: usize, h: usize, i: usize, latent: Option<usize>, s: usize) -> Self {
        let mut rng = Rng(e as u64 * 131 + h as u64 * 7 + i as u64 + s as u64);
        let l = latent.unwrap_or(h);
        let scale = |n: usize| 1.0 / (n as f32).sqrt();
        Layer {
            e,
            k,
            h,
            i,
            l,
            s,
            w13: rng.vec(e * 2 * i * l, scale(l)),
            w2: rng.vec(e * l * i, scale(i)),
            fc1: latent.map(|l| (rng.vec(l * h, scale(h)), rng.vec(h * l, scale(l)))),
            shared: (s > 0).then(|| (rng.vec(2 * s * h, scale(h)), rng.vec(h * s, scale(s)))),
        }
    }

    fn config(&self, weight_dtype: FdmoeDtype) -> MoeConfig {
        MoeConfig {
            num_experts: self.e,
            top_k: self.k,
            hidden_size: self.h,
            intermediate_size: self.i,
            latent_size: self.fc1.as_ref().map(|_| self.l),
            shared_intermediate_size: (self.s > 0).then_some(self.s),
            routing: FdmoeRouting::Given,
            act_dtype: FdmoeDtype::F32,
            weight_dtype,
            max_tokens: 64,
            num_threads: 2,
            ..Default::default()
        }
    }

    /// Dense f32 weights in TORCH layout.
    fn source(&self, experts: ExpertSource) -> WeightSource {
        WeightSource {
            layout: FdmoeLayout::Torch,
            dtype: FdmoeDtype::F32,
            memory: FdmoeMemory::Host,
            ownership: FdmoeOwnership::Own,
            gate_up_interleaved: false,
            experts,
            gate: None,
            correction_bias: None,
            fc1: self.fc1.as_ref().map(|f| f.0.as_ptr().cast()),
            fc2: self.fc1.as_ref().map(|f| f.1.as_ptr().cast()),
            shared_w13: self.shared.as_ref().map(|s| s.0.as_ptr().cast()),
            shared_w2: self.shared.as_ref().map(|s| s.1.as_ptr().cast()),
        }
    }

    fn dense_source(&self) -> WeightSource {
        self.source(ExpertSource::Stacked {
            w13: self.w13.as_ptr().cast(),
            w2: self.w2.as_ptr().cast(),
        })
    }
}

/// Stacked codec output of both expert matrices, and the values a hand-written decoder reads
/// back from it.
struct Packed {
    format: FdmoeDtype,
    data: [Vec<u8>; 2],
    /// FP8_BLOCK: f32 scales as native-endian bytes.
    scales: [Vec<u8>; 2],
    globals: [Vec<f32>; 2],
    /// Dequantized by hand: [E, 2I, L] and [E, L, I].
    deq: [Vec<f32>; 2],
}

impl Packed {
    fn new(format: FdmoeDtype, ly: &Layer, w13: &[f32]) -> Self {
        let shapes = [(2 * ly.i, ly.l), (ly.l, ly.i)];
        let mut p = Packed {
            format,
            data: Default::default(),
            scales: Default::default(),
            globals: Default::default(),
            deq: Default::default(),
        };
        for (m, (src, (n, k))) in [w13, &ly.w2[..]].into_iter().zip(shapes).enumerate() {
            for e in 0..ly.e {
                let w = &src[e * n * k..(e + 1) * n * k];
                let (data, scales, global) = match format {
                    FdmoeDtype::Fp8Block => {
                        let (d, s) = quantize_fp8_block(w, n, k).unwrap().into_parts();
                        let s: Vec<u8> = s.iter().flat_map(|v| v.to_ne_bytes()).collect();
                        (d, s, 0.0)
                    }
                    FdmoeDtype::Mxfp4 => {
                        let (d, s) = quantize_mxfp4(w, n, k).unwrap().into_parts();
                        (d, s, 0.0)
                    }
                    _ => quantize_nvfp4(w, n, k).unwrap().into_parts(),
                };
                p.deq[m].extend(decode_by_hand(format, n, k, &data, &scales, global));
                p.data[m].extend(data);
                p.scales[m].extend(scales);
                p.globals[m].push(global);
            }
        }
        p
    }

    fn experts(&self) -> ExpertSource {
        let nv = self.format == FdmoeDtype::Nvfp4;
        let global = |m: usize| {
            if nv {
                self.globals[m].as_ptr()
            } else {
                std::ptr::null()
            }
        };
        ExpertSource::Quantized {
            format: self.format,
            w13: self.data[0].as_ptr().cast(),
            w2: self.data[1].as_ptr().cast(),
            w13_scale: self.scales[0].as_ptr().cast(),
            w2_scale: self.scales[1].as_ptr().cast(),
            w13_global_scale: global(0),
            w2_global_scale: global(1),
        }
    }
}

/// Dequantizes one [n, k] matrix from its parts with the element decoders only.
fn decode_by_hand(
    format: FdmoeDtype,
    n: usize,
    k: usize,
    data: &[u8],
    scales: &[u8],
    global: f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * k);
    for r in 0..n {
        for c in 0..k {
            out.push(match format {
                FdmoeDtype::Fp8Block => {
                    let b = ((r / 128) * k.div_ceil(128) + c / 128) * 4;
                    let s = f32::from_ne_bytes(scales[b..b + 4].try_into().unwrap());
                    decode_e4m3(data[r * k + c]) * s
                }
                _ => {
                    let byte = data[(r * k + c) / 2];
                    let nibble = if c % 2 == 0 { byte & 0xF } else { byte >> 4 };
                    let s = if format == FdmoeDtype::Mxfp4 {
                        decode_ue8m0(scales[r * k / 32 + c / 32])
                    } else {
                        decode_e4m3(scales[r * k / 16 + c / 16]) * global
                    };
                    decode_e2m1(nibble) * s
                }
            });
        }
    }
    out
}

/// FP8 per-token activation round trip, written here: per group of 128, amax floored at 1e-4,
/// values scaled by 448/amax, rounded to E4M3, scaled back.
fn fp8_round_trip(row: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(row.len());
    for group in row.chunks(128) {
        let amax = group.iter().fold(0f32, |m, &v| m.max((v as f32).abs()));
        let amax = amax.max(1e-4);
        let (mul, scale) = (448.0 / amax, amax / 448.0);
        out.extend(
            group
                .iter()
                .map(|&v| (decode_e4m3(encode_e4m3(v as f32 * mul)) * scale) as f64),
        );
    }
    out
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn matvec(w: &[f32], rows: usize, cols: usize, x: &[f64]) -> Vec<f64> {
    (0..rows)
        .map(|r| (0..cols).map(|c| w[r * cols + c] as f64 * x[c]).sum())
        .collect()
}

/// An activation rounding of the expert GEMMs' inputs, applied to one row.
type RoundTrip = fn(&[f64]) -> Vec<f64>;

/// act_quant = FP8_MX's round trip, written here from SPEC §5's pre-dispatch rule: per group
/// of 32, amax (NaN skipped) floored at 1e-4, scale the smallest power of two at least
/// amax / 448 (that quotient rounded to f32), values divided by it, rounded to E4M3, scaled back.
fn mx_round_trip(row: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(row.len());
    for group in row.chunks(32) {
        let amax = group.iter().fold(0f32, |m, &v| m.max((v as f32).abs()));
        let q = amax.max(1e-4) / 448.0;
        let mut e = (q as f64).log2().floor() as i32 - 1;
        while 2f64.powi(e) < q as f64 {
            e += 1;
        }
        let scale = 2f64.powi(e);
        out.extend(
            group
                .iter()
                .map(|&v| decode_e4m3(encode_e4m3((v / scale) as f32)) as f64 * scale),
        );
    }
    out
}

/// The expected forward in f64 with expert weights `w13` [E, 2I, L] / `w2` [E, L, I];
/// `act_quant` rounds the inputs of both expert GEMMs (FP8_BLOCK's or FP8_MX's rounding).
fn reference(
    ly: &Layer,
    w13: &[f32],
    w2: &[f32],
    act_quant: Option<RoundTrip>,
    x: &[f32],
    ids: &[i32],
    wts: &[f32],
) -> Vec<f64> {
    let (h, i, l, k) = (ly.h, ly.i, ly.l, ly.k);
    let t = x.len() / h;
    let mut out = vec![0f64; t * h];
    for tok in 0..t {
        let xt: Vec<f64> = x[tok * h..(tok + 1) * h]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let mut u = match &ly.fc1 {
            // The CPU computes u in f32; round it the same way before quantizing.
            Some((fc1, _)) => matvec(fc1, l, h, &xt)
                .iter()
                .map(|&v| v as f32 as f64)
                .collect(),
            None => xt.clone(),
        };
        if let Some(round) = act_quant {
            u = round(&u);
        }
        let mut z = vec![0f64; l];
        for j in 0..k {
            let e = ids[tok * k + j] as usize;
            let gu = matvec(&w13[e * 2 * i * l..(e + 1) * 2 * i * l], 2 * i, l, &u);
            let mut a: Vec<f64> = (0..i).map(|r| silu(gu[r]) * gu[i + r]).collect();
            if let Some(round) = act_quant {
                let a32: Vec<f64> = a.iter().map(|&v| v as f32 as f64).collect();
                a = round(&a32);
            }
            let y = matvec(&w2[e * l * i..(e + 1) * l * i], l, i, &a);
            for (zv, yv) in z.iter_mut().zip(&y) {
                *zv += wts[tok * k + j] as f64 * yv;
            }
        }
        let o = &mut out[tok * h..(tok + 1) * h];
        match &ly.fc1 {
            Some((_, fc2)) => o.copy_from_slice(&matvec(fc2, h, l, &z)),
            None => o.copy_from_slice(&z),
        }
        if let Some((sh13, sh2)) = &ly.shared {
            let s = ly.s;
            let gu = matvec(sh13, 2 * s, h, &xt);
            let a: Vec<f64> = (0..s).map(|r| silu(gu[r]) * gu[s + r]).collect();
            for (ov, yv) in o.iter_mut().zip(matvec(sh2, h, s, &a)) {
                *ov += yv;
            }
        }
    }
    out
}

/// Tokens and a given routing (distinct experts per token, positive weights).
fn inputs(ly: &Layer, t: usize, seed: u64) -> (Vec<f32>, Vec<i32>, Vec<f32>) {
    let mut rng = Rng(seed);
    let x = rng.vec(t * ly.h, 1.0);
    let mut ids = Vec::with_capacity(t * ly.k);
    let mut wts = Vec::with_capacity(t * ly.k);
    for tok in 0..t {
        let first = (rng.uniform() * ly.e as f64) as usize;
        for j in 0..ly.k {
            ids.push(((first + j * (1 + tok % 3)) % ly.e) as i32);
            wts.push(0.25 + rng.uniform() as f32);
        }
    }
    (x, ids, wts)
}

fn forward(moe: &mut Moe, x: &[f32], ids: &[i32], wts: &[f32]) -> Vec<f32> {
    let h = moe.config().hidden_size;
    let t = x.len() / h;
    let mut out = vec![f32::NAN; t * h];
    let args = ForwardArgs {
        topk_ids: ids.as_ptr(),
        topk_weights: wts.as_ptr(),
        ..ForwardArgs::new(t, x.as_ptr().cast(), out.as_mut_ptr().cast())
    };
    unsafe { moe.forward(&args).unwrap() };
    assert!(out.iter().all(|v| v.is_finite()), "every output written");
    out
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w).powi(2);
        den += w * w;
    }
    (num / den).sqrt()
}

fn loaded(ly: &Layer, format: FdmoeDtype, src: &WeightSource) -> Moe {
    let mut moe = Moe::new(&ly.config(format)).unwrap();
    moe.load_weights(src).unwrap();
    moe
}

#[test]
fn each_format_matches_a_dequantize_then_f64_reference() {
    // Plain (H = L = 256), and latent (H = 96, L = 128) with shared experts (S = 64).
    let layers = [
        Layer::new(4, 2, 256, 128, None, 0),
        Layer::new(5, 3, 96, 128, Some(128), 64),
    ];
    for ly in &layers {
        let (x, ids, wts) = inputs(ly, 11, 5);
        for format in FORMATS {
            let packed = Packed::new(format, ly, &ly.w13);
            let fp8 = format == FdmoeDtype::Fp8Block;
            let round = fp8.then_some(fp8_round_trip as RoundTrip);
            let want = reference(ly, &packed.deq[0], &packed.deq[1], round, &x, &ids, &wts);
            for (how, src) in [
                ("quantize-on-load", ly.dense_source()),
                ("pre-quantized", ly.source(packed.experts())),
            ] {
                let got = forward(&mut loaded(ly, format, &src), &x, &ids, &wts);
                let err = rel_l2(&got, &want);
                println!(
                    "{format} {how} (latent {}): rel. error vs reference {err:.2e}",
                    ly.fc1.is_some()
                );
                // f32 against f64: only summation order differs, except that FP8's activation
                // rounding may land on the other side of a tie for a few elements.
                let bound = if fp8 { 1e-4 } else { 1e-5 };
                assert!(err <= bound, "{format} {how}: {err:.3e} > {bound:.0e}");
            }
        }
    }
}

#[test]
fn quantize_on_load_equals_pre_quantized_load_bitwise() {
    let ly = Layer::new(4, 2, 128, 128, None, 0);
    let (x, ids, wts) = inputs(&ly, 17, 9);
    let (e, i, l) = (ly.e, ly.i, ly.l);
    // The same experts with gate and up rows interleaved (gpt-oss), as the caller stores them.
    let interleaved: Vec<f32> = (0..e * 2 * i)
        .flat_map(|row| {
            let (x, r) = (row / (2 * i), row % (2 * i));
            let from = x * 2 * i + (r % 2) * i + r / 2;
            ly.w13[from * l..(from + 1) * l].to_vec()
        })
        .collect();
    let bf16: Vec<half::bf16> = ly.w13.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let bf16_w2: Vec<half::bf16> = ly.w2.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let bf16_f32: Vec<f32> = bf16.iter().map(|v| v.to_f32()).collect();
    let bf16_w2_f32: Vec<f32> = bf16_w2.iter().map(|v| v.to_f32()).collect();
    for format in FORMATS {
        let run = |src: &WeightSource| forward(&mut loaded(&ly, format, src), &x, &ids, &wts);
        // Plain.
        let packed = Packed::new(format, &ly, &ly.w13);
        let a = run(&ly.dense_source());
        let b = run(&ly.source(packed.experts()));
        assert!(
            a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{format}"
        );
        // Interleaved: quantized as stored, de-interleaved after; the same layer as plain
        // for the row-wise formats.
        let packed_il = Packed::new(format, &ly, &interleaved);
        let mut src = ly.source(ExpertSource::Stacked {
            w13: interleaved.as_ptr().cast(),
            w2: ly.w2.as_ptr().cast(),
        });
        src.gate_up_interleaved = true;
        let c = run(&src);
        let mut pre = ly.source(packed_il.experts());
        pre.gate_up_interleaved = true;
        let d = run(&pre);
        assert!(
            c.iter().zip(&d).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{format} interleaved"
        );
        if format != FdmoeDtype::Fp8Block {
            assert!(
                a.iter().zip(&c).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{format}: rows are independent"
            );
        }
        // bf16 source weights: read exactly, so the same codes as their f32 values.
        let mut src = ly.source(ExpertSource::Stacked {
            w13: bf16.as_ptr().cast(),
            w2: bf16_w2.as_ptr().cast(),
        });
        src.dtype = FdmoeDtype::Bf16;
        let from_bf16 = run(&src);
        let from_f32 = run(&ly.source(ExpertSource::Stacked {
            w13: bf16_f32.as_ptr().cast(),
            w2: bf16_w2_f32.as_ptr().cast(),
        }));
        assert!(
            from_bf16
                .iter()
                .zip(&from_f32)
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            "{format} bf16"
        );
    }
}

#[test]
fn fp8_block_quantizes_the_inputs_of_both_gemms() {
    let ly = Layer::new(4, 2, 256, 256, None, 0);
    let (x, ids, wts) = inputs(&ly, 16, 21);
    let packed = Packed::new(FdmoeDtype::Fp8Block, &ly, &ly.w13);
    let got = forward(
        &mut loaded(&ly, FdmoeDtype::Fp8Block, &ly.dense_source()),
        &x,
        &ids,
        &wts,
    );
    let with = rel_l2(
        &got,
        &reference(
            &ly,
            &packed.deq[0],
            &packed.deq[1],
            Some(fp8_round_trip),
            &x,
            &ids,
            &wts,
        ),
    );
    let without = rel_l2(
        &got,
        &reference(&ly, &packed.deq[0], &packed.deq[1], None, &x, &ids, &wts),
    );
    println!("fp8_block: rel. error vs reference with activation quantization {with:.2e}, without {without:.2e}");
    assert!(
        with < 1e-4 && without > 100.0 * with,
        "with {with:.3e}, without {without:.3e}"
    );
}

#[test]
fn fp8_mx_runs_mxfp4_experts_on_pre_dispatch_activations() {
    // Plain, and latent (fc1's output quantized) with shared experts (not quantized).
    let layers = [
        Layer::new(4, 2, 256, 128, None, 0),
        Layer::new(5, 3, 96, 160, Some(128), 64),
    ];
    for ly in &layers {
        let (x, ids, wts) = inputs(ly, 16, 27);
        let packed = Packed::new(FdmoeDtype::Mxfp4, ly, &ly.w13);
        let mut cfg = ly.config(FdmoeDtype::Mxfp4);
        cfg.act_quant = FdmoeActQuant::Fp8Mx;
        for (how, src) in [
            ("quantize-on-load", ly.dense_source()),
            ("pre-quantized", ly.source(packed.experts())),
        ] {
            let mut moe = Moe::new(&cfg).unwrap();
            moe.load_weights(&src).unwrap();
            let got = forward(&mut moe, &x, &ids, &wts);
            let (d13, d2) = (&packed.deq[0], &packed.deq[1]);
            let with = rel_l2(
                &got,
                &reference(ly, d13, d2, Some(mx_round_trip), &x, &ids, &wts),
            );
            let without = rel_l2(&got, &reference(ly, d13, d2, None, &x, &ids, &wts));
            println!(
                "mxfp4 act_quant fp8_mx {how} (latent {}): rel. error vs reference {with:.2e}, without the activation rounding {without:.2e}",
                ly.fc1.is_some()
            );
            assert!(
                with < 1e-4 && without > 100.0 * with,
                "{how}: with {with:.3e}, without {without:.3e}"
            );
        }
    }
}

#[test]
fn accuracy_of_each_format_against_the_dense_layer() {
    // SPEC §8 inputs: x ~ normal(0, 1), weights ~ normal(0, 1/fan_in). Reported, not asserted.
    let ly = Layer::new(16, 4, 512, 256, None, 0);
    let (x, ids, wts) = inputs(&ly, 64, 33);
    let dense = forward(
        &mut loaded(&ly, FdmoeDtype::F32, &ly.dense_source()),
        &x,
        &ids,
        &wts,
    );
    let dense64: Vec<f64> = dense.iter().map(|&v| v as f64).collect();
    let bf16 = forward(
        &mut loaded(&ly, FdmoeDtype::Bf16, &ly.dense_source()),
        &x,
        &ids,
        &wts,
    );
    println!("accuracy (E=16, k=4, H=512, I=256, T=64; rel. L2 error vs the float32 layer):");
    println!("  bfloat16 weights: {:.3e}", rel_l2(&bf16, &dense64));
    for format in FORMATS {
        let got = forward(&mut loaded(&ly, format, &ly.dense_source()), &x, &ids, &wts);
        let err = rel_l2(&got, &dense64);
        println!("  {format}: {err:.3e}");
        assert!(err < 0.5, "{format}: {err} is not an approximation at all");
    }
    let mut cfg = ly.config(FdmoeDtype::Mxfp4);
    cfg.act_quant = FdmoeActQuant::Fp8Mx;
    let mut moe = Moe::new(&cfg).unwrap();
    moe.load_weights(&ly.dense_source()).unwrap();
    let err = rel_l2(&forward(&mut moe, &x, &ids, &wts), &dense64);
    println!("  mxfp4 with act_quant fp8_mx: {err:.3e}");
    assert!(err < 0.5, "fp8_mx: {err} is not an approximation at all");
}

fn load_err(cfg: &MoeConfig, src: &WeightSource) -> Error {
    let mut moe = Moe::new(cfg).unwrap();
    moe.load_weights(src).unwrap_err()
}

fn assert_err(err: Error, status: FdmoeStatus, fragments: &[&str]) {
    assert_eq!(err.status, status, "{}", err.message);
    for f in fragments {
        assert!(err.message.contains(f), "{:?} lacks {f:?}", err.message);
    }
}

#[test]
fn bad_shapes_formats_pointers_and_scales_are_named() {
    // Shapes: K of each matrix must fit the format.
    let ly = Layer::new(4, 2, 128, 96, None, 0);
    let err = Moe::new(&ly.config(FdmoeDtype::Fp8Block)).unwrap_err();
    assert_err(
        err,
        FdmoeStatus::InvalidArgument,
        &["config.intermediate_size = 96", "K of w2", "128"],
    );
    Moe::new(&ly.config(FdmoeDtype::Mxfp4)).unwrap();
    let ly = Layer::new(4, 2, 128, 128, None, 0);
    let mut cfg = ly.config(FdmoeDtype::Mxfp4);
    cfg.latent_size = Some(48);
    assert_err(
        Moe::new(&cfg).unwrap_err(),
        FdmoeStatus::InvalidArgument,
        &["config.latent_size = 48", "K of w13", "32"],
    );

    let packed = Packed::new(FdmoeDtype::Nvfp4, &ly, &ly.w13);
    let nv = ly.config(FdmoeDtype::Nvfp4);
    // Format mismatch: both named.
    let err = load_err(&ly.config(FdmoeDtype::Mxfp4), &ly.source(packed.experts()));
    assert_err(
        err,
        FdmoeStatus::InvalidArgument,
        &["weights.dtype = nvfp4", "config.weight_dtype = mxfp4"],
    );
    // Pre-quantized experts in a dense layer.
    let err = load_err(&ly.config(FdmoeDtype::Bf16), &ly.source(packed.experts()));
    assert_err(
        err,
        FdmoeStatus::InvalidArgument,
        &["config.weight_dtype = bfloat16"],
    );
    // Layouts.
    let mut src = ly.source(packed.experts());
    src.layout = FdmoeLayout::Paddle;
    assert_err(
        load_err(&nv, &src),
        FdmoeStatus::InvalidArgument,
        &["layout paddle"],
    );
    src.layout = FdmoeLayout::PerExpert;
    assert_err(
        load_err(&nv, &src),
        FdmoeStatus::Unsupported,
        &["per_expert"],
    );
    // Missing pointers.
    let with = |f: &dyn Fn(&mut ExpertSource)| {
        let mut experts = packed.experts();
        f(&mut experts);
        ly.source(experts)
    };
    let null = std::ptr::null();
    type Edit<'a> = &'a dyn Fn(&mut ExpertSource);
    let cases: [(Edit, &str); 3] = [
        (
            &|s| {
                if let ExpertSource::Quantized { w13_scale, .. } = s {
                    *w13_scale = null
                }
            },
            "weights.w13_scale",
        ),
        (
            &|s| {
                if let ExpertSource::Quantized { w2_scale, .. } = s {
                    *w2_scale = null
                }
            },
            "weights.w2_scale",
        ),
        (
            &|s| {
                if let ExpertSource::Quantized {
                    w2_global_scale, ..
                } = s
                {
                    *w2_global_scale = std::ptr::null()
                }
            },
            "weights.w2_global_scale",
        ),
    ];
    for (f, name) in cases {
        assert_err(
            load_err(&nv, &with(f)),
            FdmoeStatus::NullArgument,
            &[name, "NULL"],
        );
    }
    // Global scales outside NVFP4.
    let mx = Packed::new(FdmoeDtype::Mxfp4, &ly, &ly.w13);
    let mut experts = mx.experts();
    if let ExpertSource::Quantized {
        w13_global_scale, ..
    } = &mut experts
    {
        *w13_global_scale = packed.globals[0].as_ptr();
    }
    let err = load_err(&ly.config(FdmoeDtype::Mxfp4), &ly.source(experts));
    assert_err(
        err,
        FdmoeStatus::InvalidArgument,
        &["weights.w13_global_scale", "nvfp4"],
    );
    // Bad scale values, named with the expert and position.
    let mut bad = Packed::new(FdmoeDtype::Mxfp4, &ly, &ly.w13);
    bad.scales[1][2 * (ly.l * ly.i / 32) + 5 * (ly.i / 32) + 1] = 0xFF;
    let err = load_err(&ly.config(FdmoeDtype::Mxfp4), &ly.source(bad.experts()));
    assert_err(
        err,
        FdmoeStatus::InvalidArgument,
        &["weights.w2_scale[expert 2][5, 1]", "NaN"],
    );
    let mut bad = Packed::new(FdmoeDtype::Fp8Block, &ly, &ly.w13);
    bad.scales[0][4..8].copy_from_slice(&(-1.0f32).to_ne_bytes());
    let err = load_err(&ly.config(FdmoeDtype::Fp8Block), &ly.source(bad.experts()));
    assert_err(
        err,
        FdmoeStatus::InvalidArgument,
        &["weights.w13_scale[expert 0][1, 0] = -1"],
    );
    let mut bad = Packed::new(FdmoeDtype::Nvfp4, &ly, &ly.w13);
    bad.globals[1][3] = f32::INFINITY;
    let err = load_err(&nv, &ly.source(bad.experts()));
    assert_err(
        err,
        FdmoeStatus::InvalidArgument,
        &["weights.w2_global_scale[3] = inf"],
    );
    let mut bad = Packed::new(FdmoeDtype::Nvfp4, &ly, &ly.w13);
    bad.scales[0][7] = 0x7F;
    let err = load_err(&nv, &ly.source(bad.experts()));
    assert_err(
        err,
        FdmoeStatus::InvalidArgument,
        &["weights.w13_scale[expert 0][0, 7] = 0x7f"],
    );
    // BORROW: the CPU keeps a dequantized copy.
    let mut src = ly.dense_source();
    src.ownership = FdmoeOwnership::Borrow;
    assert_err(
        load_err(&nv, &src),
        FdmoeStatus::Unsupported,
        &["borrow", "nvfp4", "cpu"],
    );
    // The layer still loads after the failures.
    let mut moe = Moe::new(&nv).unwrap();
    assert!(moe.load_weights(&ly.source(bad.experts())).is_err());
    moe.load_weights(&ly.source(packed.experts())).unwrap();
}
