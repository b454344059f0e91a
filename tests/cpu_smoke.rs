//! End-to-end checks of the safe core on the CPU against a naive f64 reference written here.

use fdmoe::*;

struct Lcg(u64);
impl Lcg {
    fn normal(&mut self) -> f32 {
        let mut u = || {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (a, b) = (u(), u());
        ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

#[test]
fn softmax_topk_f32_matches_naive_reference() {
    let (e, k, h, i, t) = (6usize, 2usize, 20usize, 12usize, 9usize);
    let mut rng = Lcg(7);
    let w13 = rng.vec(e * 2 * i * h, 1.0 / (h as f32).sqrt());
    let w2 = rng.vec(e * h * i, 1.0 / (i as f32).sqrt());
    let gate = rng.vec(e * h, 1.0 / (h as f32).sqrt());
    let x = rng.vec(t * h, 1.0);
    let cfg = MoeConfig {
        num_experts: e,
        top_k: k,
        hidden_size: h,
        intermediate_size: i,
        act_dtype: FdmoeDtype::F32,
        weight_dtype: FdmoeDtype::F32,
        max_tokens: 16,
        num_threads: 2,
        ..Default::default()
    };
    let mut moe = Moe::new(&cfg).unwrap();
    moe.load_weights(&WeightSource {
        layout: FdmoeLayout::Torch,
        dtype: FdmoeDtype::F32,
        memory: FdmoeMemory::Host,
        ownership: FdmoeOwnership::Own,
        gate_up_interleaved: false,
        experts: ExpertSource::Stacked {
            w13: w13.as_ptr().cast(),
            w2: w2.as_ptr().cast(),
        },
        gate: Some(GateSource {
            ptr: gate.as_ptr().cast(),
            dtype: FdmoeDtype::F32,
            layout: FdmoeGateLayout::ExpertsByHidden,
        }),
        correction_bias: None,
        fc1: None,
        fc2: None,
        shared_w13: None,
        shared_w2: None,
    })
    .unwrap();
    let mut out = vec![f32::NAN; t * h];
    let mut ids = vec![-1i32; t * k];
    let mut wts = vec![f32::NAN; t * k];
    let args = ForwardArgs {
        topk_ids_out: ids.as_mut_ptr(),
        topk_weights_out: wts.as_mut_ptr(),
        ..ForwardArgs::new(t, x.as_ptr().cast(), out.as_mut_ptr().cast())
    };
    unsafe { moe.forward(&args).unwrap() };
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for tok in 0..t {
        let xt: Vec<f64> = x[tok * h..(tok + 1) * h]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let logits: Vec<f64> = (0..e)
            .map(|ex| (0..h).map(|c| gate[ex * h + c] as f64 * xt[c]).sum())
            .collect();
        let z: f64 = logits.iter().map(|l| l.exp()).sum();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap());
        let chosen = &order[..k];
        let probs: Vec<f64> = chosen.iter().map(|&ex| logits[ex].exp() / z).collect();
        let norm: f64 = probs.iter().sum();
        for j in 0..k {
            assert_eq!(ids[tok * k + j], chosen[j] as i32);
            assert!((wts[tok * k + j] as f64 - probs[j] / norm).abs() < 1e-6);
        }
        for c in 0..h {
            let mut acc = 0.0f64;
            for (j, &ex) in chosen.iter().enumerate() {
                let base = ex * 2 * i * h;
                let act: Vec<f64> = (0..i)
                    .map(|r| {
                        let g: f64 = (0..h).map(|q| w13[base + r * h + q] as f64 * xt[q]).sum();
                        let u: f64 = (0..h)
                            .map(|q| w13[base + (i + r) * h + q] as f64 * xt[q])
                            .sum();
                        silu(g) * u
                    })
                    .collect();
                let y: f64 = (0..i)
                    .map(|r| w2[ex * h * i + c * i + r] as f64 * act[r])
                    .sum();
                acc += probs[j] / norm * y;
            }
            num += (out[tok * h + c] as f64 - acc).powi(2);
            den += acc * acc;
        }
    }
    let rel = (num / den).sqrt();
    assert!(rel < 1e-5, "relative error {rel}");
}
