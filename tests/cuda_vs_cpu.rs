//! The CUDA backend against the CPU reference (SPEC §8) on fresh random inputs: every routing
//! mode with and without bias, latent on every mode, shared experts, each layout and
//! activation, bf16 and f16, T from 1 to 16384, an index-overflow case past 2^31 elements,
//! determinism, poisoned outputs, and the error paths that need a device; and the quantized
//! experts (FP8_BLOCK, MXFP4, NVFP4: both backends quantize the same weights on load) with
//! routing modes, latent + shared, interleave, layouts, odd K and wide-range scales.
//! FDMOE_GPU_CASES=a,b runs only the cases whose names contain a or b.
//! Runs only where a GPU is present (FDMOE_REQUIRE_GPU=1 makes a missing GPU a failure).
#![cfg(feature = "cuda")]

use std::ffi::c_void;

use fdmoe::backend::cuda::driver::{self, Context, DeviceBuffer};
use fdmoe::*;
use half::{bf16, f16};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (a, b) = (self.next(), self.next());
        ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

fn gpu() -> Option<Context> {
    match Context::primary(0) {
        Ok(c) => Some(c),
        Err(e) => {
            assert!(
                std::env::var_os("FDMOE_REQUIRE_GPU").is_none(),
                "GPU required: {e}"
            );
            eprintln!("skipping: {e}");
            None
        }
    }
}

#[derive(Clone)]
struct Case {
    name: String,
    cfg: MoeConfig,
    layout: FdmoeLayout,
    interleaved: bool,
    with_gate: bool,
    with_bias: bool,
    given_logits: bool,
    given_ids: bool,
    tokens: Vec<usize>,
    /// Expert rows scaled by 2^j, j cycling through -span ..= span (0: none): quantized
    /// formats then see very large and very small scales (MXFP4 exponents above 128, NVFP4
    /// subnormal block scales).
    row_scale_span: i32,
    /// x's 32-channel groups scaled by 2^-(step * (group % 4)) (0: none): each 128 channels'
    /// four pre-dispatch exponents then differ by `step`, which FP8_MX's GEMM 1 inputs
    /// re-express at the largest (quantize_mx_fp8_rows).
    channel_group_step: i32,
}

fn base(e: usize, k: usize, h: usize, i: usize, dtype: FdmoeDtype) -> MoeConfig {
    MoeConfig {
        num_experts: e,
        top_k: k,
        hidden_size: h,
        intermediate_size: i,
        act_dtype: dtype,
        weight_dtype: dtype,
        max_tokens: 2048,
        ..Default::default()
    }
}

struct HostWeights {
    w13: Vec<f32>,
    w2: Vec<f32>,
    gate: Vec<f32>,
    bias: Vec<f32>,
    fc1: Vec<f32>,
    fc2: Vec<f32>,
    sw13: Vec<f32>,
    sw2: Vec<f32>,
    per_expert: Vec<Vec<f32>>,
}

fn transpose_stacked(src: &[f32], groups: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; src.len()];
    for g in 0..groups {
        for r in 0..rows {
            for c in 0..cols {
                out[g * rows * cols + c * rows + r] = src[g * rows * cols + r * cols + c];
            }
        }
    }
    out
}

fn make_weights(cfg: &MoeConfig, rng: &mut Rng) -> HostWeights {
    let (e, h, i, l) = (
        cfg.num_experts,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.expert_hidden(),
    );
    let s = cfg.shared_intermediate_size.unwrap_or(0);
    HostWeights {
        w13: rng.vec(e * 2 * i * l, 1.0 / (l as f32).sqrt()),
        w2: rng.vec(e * l * i, 1.0 / (i as f32).sqrt()),
        gate: rng.vec(e * h, 1.0 / (h as f32).sqrt()),
        bias: rng.vec(e, 0.1),
        fc1: rng.vec(l * h, 1.0 / (h as f32).sqrt()),
        fc2: rng.vec(h * l, 1.0 / (l as f32).sqrt()),
        sw13: rng.vec(2 * s * h, 1.0 / (h as f32).sqrt()),
        sw2: rng.vec(h * s, 1.0 / (s.max(1) as f32).sqrt()),
        per_expert: Vec::new(),
    }
}

/// The weight source in the case's layout (f32, host, OWN).
fn source(case: &Case, w: &mut HostWeights, paddle: &mut Vec<Vec<f32>>) -> WeightSource {
    let cfg = &case.cfg;
    let (e, h, i, l) = (
        cfg.num_experts,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.expert_hidden(),
    );
    let s = cfg.shared_intermediate_size.unwrap_or(0);
    let p = |v: &Vec<f32>| v.as_ptr() as *const c_void;
    let mut src = WeightSource {
        layout: case.layout,
        dtype: FdmoeDtype::F32,
        memory: FdmoeMemory::Host,
        ownership: FdmoeOwnership::Own,
        gate_up_interleaved: case.interleaved,
        experts: ExpertSource::Stacked {
            w13: p(&w.w13),
            w2: p(&w.w2),
        },
        gate: case.with_gate.then(|| GateSource {
            ptr: p(&w.gate),
            dtype: FdmoeDtype::F32,
            layout: FdmoeGateLayout::ExpertsByHidden,
        }),
        correction_bias: case.with_bias.then_some(w.bias.as_ptr()),
        fc1: cfg.latent_size.map(|_| p(&w.fc1)),
        fc2: cfg.latent_size.map(|_| p(&w.fc2)),
        shared_w13: cfg.shared_intermediate_size.map(|_| p(&w.sw13)),
        shared_w2: cfg.shared_intermediate_size.map(|_| p(&w.sw2)),
    };
    match case.layout {
        FdmoeLayout::Torch => {}
        FdmoeLayout::Paddle => {
            *paddle = vec![
                transpose_stacked(&w.w13, e, 2 * i, l),
                transpose_stacked(&w.w2, e, l, i),
                transpose_stacked(&w.fc1, 1, l, h),
                transpose_stacked(&w.fc2, 1, h, l),
                transpose_stacked(&w.sw13, 1, 2 * s, h),
                transpose_stacked(&w.sw2, 1, h, s),
            ];
            src.experts = ExpertSource::Stacked {
                w13: p(&paddle[0]),
                w2: p(&paddle[1]),
            };
            if cfg.latent_size.is_some() {
                src.fc1 = Some(p(&paddle[2]));
                src.fc2 = Some(p(&paddle[3]));
            }
            if s > 0 {
                src.shared_w13 = Some(p(&paddle[4]));
                src.shared_w2 = Some(p(&paddle[5]));
            }
        }
        FdmoeLayout::PerExpert => {
            w.per_expert = (0..e)
                .flat_map(|x| {
                    let base = x * 2 * i * l;
                    [
                        w.w13[base..base + i * l].to_vec(),
                        w.w13[base + i * l..base + 2 * i * l].to_vec(),
                        w.w2[x * l * i..(x + 1) * l * i].to_vec(),
                    ]
                })
                .collect();
            let ptrs = |j: usize| (0..e).map(|x| p(&w.per_expert[3 * x + j])).collect();
            src.experts = ExpertSource::PerExpert {
                gate_proj: ptrs(0),
                up_proj: ptrs(1),
                down_proj: ptrs(2),
            };
        }
    }
    src
}

fn to_elem(v: &[f32], dtype: FdmoeDtype) -> Vec<u16> {
    v.iter()
        .map(|&x| {
            if dtype == FdmoeDtype::F16 {
                f16::from_f32(x).to_bits()
            } else {
                bf16::from_f32(x).to_bits()
            }
        })
        .collect()
}

fn from_elem(v: &[u16], dtype: FdmoeDtype) -> Vec<f32> {
    v.iter()
        .map(|&x| {
            if dtype == FdmoeDtype::F16 {
                f16::from_bits(x).to_f32()
            } else {
                bf16::from_bits(x).to_f32()
            }
        })
        .collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

struct Outcome {
    err: f64,
    id_mismatch: usize,
    deterministic: bool,
}

/// Both backends of one case, loaded once with the same weights (large shapes spend most of
/// their time making and quantizing weights).
struct Pair {
    cpu: Moe,
    gpu: Moe,
}

/// Multiplies row r of each [rows, cols] matrix in `m` by 2^((r % (2 span + 1)) - span).
fn scale_rows(m: &mut [f32], cols: usize, span: i32) {
    for (r, row) in m.chunks_mut(cols).enumerate() {
        let j = (r as i32 % (2 * span + 1)) - span;
        row.iter_mut().for_each(|v| *v *= 2f32.powi(j));
    }
}

fn load_pair(case: &Case, tokens: &[usize], seed: u64) -> Pair {
    let cfg = &case.cfg;
    let max_t = tokens.iter().copied().max().unwrap_or(1);
    let mut rng = Rng(seed * 2654435761 + 1);
    let mut w = make_weights(cfg, &mut rng);
    if case.row_scale_span > 0 {
        scale_rows(&mut w.w13, cfg.expert_hidden(), case.row_scale_span);
        scale_rows(&mut w.w2, cfg.intermediate_size, case.row_scale_span);
    }
    let mut paddle = Vec::new();
    let src = source(case, &mut w, &mut paddle);
    let mut cpu_cfg = cfg.clone();
    cpu_cfg.backend = FdmoeBackendKind::Cpu;
    cpu_cfg.max_tokens = max_t;
    let mut cpu = Moe::new(&cpu_cfg).expect("cpu backend");
    cpu.load_weights(&src).expect("cpu weights");
    let mut gpu_cfg = cfg.clone();
    gpu_cfg.backend = FdmoeBackendKind::Cuda;
    gpu_cfg.max_tokens = gpu_cfg.max_tokens.max(max_t);
    let mut gpu = Moe::new(&gpu_cfg).unwrap_or_else(|e| panic!("{}: cuda backend: {e}", case.name));
    gpu.load_weights(&src)
        .unwrap_or_else(|e| panic!("{}: cuda weights: {e}", case.name));
    Pair { cpu, gpu }
}

/// Runs one case at T tokens on both backends; returns the error against the CPU.
fn run_case(case: &Case, pair: &mut Pair, t: usize, seed: u64) -> Outcome {
    let cfg = &case.cfg;
    let (e, k, h) = (cfg.num_experts, cfg.top_k, cfg.hidden_size);
    let mut rng = Rng(seed * 2654435761 + t as u64 + 1);
    let (cpu, gpu) = (&mut pair.cpu, &mut pair.gpu);

    let mut x = rng.vec(t * h, 1.0);
    if case.channel_group_step > 0 {
        for (c, v) in x.iter_mut().enumerate() {
            *v *= 2f32.powi(-case.channel_group_step * ((c % h) / 32 % 4) as i32);
        }
    }
    let x = to_elem(&x, cfg.act_dtype);
    let logits = rng.vec(t * e, 1.0);
    let mut given_ids = vec![0i32; t * k];
    let mut given_w = vec![0f32; t * k];
    for tok in 0..t {
        let mut perm: Vec<i32> = (0..e as i32).collect();
        for j in 0..k {
            let r = j + (rng.next() * (e - j) as f64) as usize;
            perm.swap(j, r.min(e - 1));
            given_ids[tok * k + j] = perm[j];
            given_w[tok * k + j] = rng.next() as f32;
        }
    }
    // CPU reference.
    let mut cpu_out = vec![0u16; t * h];
    let mut cpu_ids = vec![-1i32; t * k];
    let mut cpu_w = vec![f32::NAN; t * k];
    let mut args = ForwardArgs {
        num_tokens: t,
        x: x.as_ptr().cast(),
        out: cpu_out.as_mut_ptr().cast(),
        router_logits: if case.given_logits {
            logits.as_ptr()
        } else {
            std::ptr::null()
        },
        topk_ids: if case.given_ids {
            given_ids.as_ptr()
        } else {
            std::ptr::null()
        },
        topk_weights: if case.given_ids {
            given_w.as_ptr()
        } else {
            std::ptr::null()
        },
        topk_ids_out: cpu_ids.as_mut_ptr(),
        topk_weights_out: cpu_w.as_mut_ptr(),
        stream: std::ptr::null_mut(),
        force_eager: false,
    };
    unsafe {
        cpu.forward(&args)
            .unwrap_or_else(|e| panic!("{}: cpu forward: {e}", case.name))
    };

    // GPU, twice, with poisoned outputs.
    let dx = DeviceBuffer::from_host(&x, "x").unwrap();
    let dlogits = DeviceBuffer::from_host(&logits, "logits").unwrap();
    let dids = DeviceBuffer::from_host(&given_ids, "ids").unwrap();
    let dw = DeviceBuffer::from_host(&given_w, "w").unwrap();
    let mut results = Vec::new();
    for _ in 0..2 {
        let dout = DeviceBuffer::from_host(&vec![0xFFFFu16; t * h], "out").unwrap();
        let drec_ids = DeviceBuffer::from_host(&vec![-7i32; t * k], "rec ids").unwrap();
        let drec_w = DeviceBuffer::from_host(&vec![f32::NAN; t * k], "rec w").unwrap();
        args.x = dx.ptr as *const c_void;
        args.out = dout.ptr as *mut c_void;
        args.router_logits = if case.given_logits {
            dlogits.ptr as *const f32
        } else {
            std::ptr::null()
        };
        args.topk_ids = if case.given_ids {
            dids.ptr as *const i32
        } else {
            std::ptr::null()
        };
        args.topk_weights = if case.given_ids {
            dw.ptr as *const f32
        } else {
            std::ptr::null()
        };
        args.topk_ids_out = drec_ids.ptr as *mut i32;
        args.topk_weights_out = drec_w.ptr as *mut f32;
        unsafe {
            gpu.forward(&args)
                .unwrap_or_else(|e| panic!("{}: cuda forward: {e}", case.name))
        };
        let mut out = vec![0u16; t * h];
        let mut ids = vec![0i32; t * k];
        let mut wts = vec![0f32; t * k];
        driver::copy_to_host(dout.ptr, &mut out).unwrap();
        driver::copy_to_host(drec_ids.ptr, &mut ids).unwrap();
        driver::copy_to_host(drec_w.ptr, &mut wts).unwrap();
        results.push((out, ids, wts));
    }
    let (out, ids, _) = &results[0];
    let got = from_elem(out, cfg.act_dtype);
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{} T={t}: unwritten or non-finite outputs",
        case.name
    );
    let want = from_elem(&cpu_out, cfg.act_dtype);
    let id_mismatch = ids.iter().zip(&cpu_ids).filter(|(a, b)| a != b).count();
    Outcome {
        err: rel_err(&got, &want),
        id_mismatch,
        deterministic: results[0] == results[1],
    }
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mk = |name: &str, cfg: MoeConfig| Case {
        name: name.to_string(),
        cfg,
        layout: FdmoeLayout::Torch,
        interleaved: false,
        with_gate: true,
        with_bias: false,
        given_logits: false,
        given_ids: false,
        tokens: vec![1, 7, 64, 300],
        row_scale_span: 0,
        channel_group_step: 0,
    };
    let b = |d| base(16, 4, 256, 128, d);
    v.push(mk("softmax bf16", b(FdmoeDtype::Bf16)));
    v.push(mk("softmax f16", b(FdmoeDtype::F16)));
    v.push(mk(
        "sigmoid",
        MoeConfig {
            routing: FdmoeRouting::SigmoidTopk,
            renormalize: false,
            ..b(FdmoeDtype::Bf16)
        },
    ));
    let grouped = MoeConfig {
        routing: FdmoeRouting::GroupedTopk,
        n_group: 4,
        topk_group: 2,
        routed_scaling_factor: 2.5,
        ..b(FdmoeDtype::Bf16)
    };
    v.push(mk("grouped", grouped.clone()));
    v.push(Case {
        with_bias: true,
        ..mk("grouped+bias", grouped.clone())
    });
    v.push(Case {
        with_bias: true,
        ..mk(
            "grouped softmax+bias",
            MoeConfig {
                scoring: FdmoeScoring::Softmax,
                ..grouped.clone()
            },
        )
    });
    v.push(Case {
        with_gate: false,
        given_logits: true,
        ..mk("given logits", b(FdmoeDtype::Bf16))
    });
    v.push(Case {
        with_gate: false,
        given_ids: true,
        ..mk(
            "given ids",
            MoeConfig {
                routing: FdmoeRouting::Given,
                ..b(FdmoeDtype::Bf16)
            },
        )
    });
    for (name, routing) in [
        ("latent softmax", FdmoeRouting::SoftmaxTopk),
        ("latent sigmoid", FdmoeRouting::SigmoidTopk),
    ] {
        v.push(mk(
            name,
            MoeConfig {
                routing,
                latent_size: Some(96),
                ..b(FdmoeDtype::Bf16)
            },
        ));
    }
    v.push(Case {
        with_bias: true,
        ..mk(
            "latent grouped+bias",
            MoeConfig {
                latent_size: Some(64),
                ..grouped.clone()
            },
        )
    });
    v.push(Case {
        with_gate: false,
        given_ids: true,
        ..mk(
            "latent given",
            MoeConfig {
                routing: FdmoeRouting::Given,
                latent_size: Some(64),
                ..b(FdmoeDtype::Bf16)
            },
        )
    });
    v.push(mk(
        "shared experts",
        MoeConfig {
            shared_intermediate_size: Some(192),
            ..b(FdmoeDtype::Bf16)
        },
    ));
    v.push(mk(
        "latent+shared",
        MoeConfig {
            shared_intermediate_size: Some(64),
            latent_size: Some(128),
            ..b(FdmoeDtype::F16)
        },
    ));
    v.push(mk(
        "gelu_tanh",
        MoeConfig {
            activation: FdmoeActivation::GeluTanhAndMul,
            ..b(FdmoeDtype::Bf16)
        },
    ));
    v.push(mk(
        "swigluoai",
        MoeConfig {
            activation: FdmoeActivation::Swigluoai,
            ..b(FdmoeDtype::Bf16)
        },
    ));
    v.push(Case {
        layout: FdmoeLayout::Paddle,
        ..mk(
            "paddle",
            MoeConfig {
                latent_size: Some(64),
                shared_intermediate_size: Some(64),
                ..b(FdmoeDtype::Bf16)
            },
        )
    });
    v.push(Case {
        layout: FdmoeLayout::PerExpert,
        ..mk("per_expert", b(FdmoeDtype::Bf16))
    });
    v.push(Case {
        interleaved: true,
        ..mk("interleaved", b(FdmoeDtype::Bf16))
    });
    v.push(Case {
        tokens: vec![1, 5, 33],
        ..mk("odd sizes", base(6, 3, 200, 72, FdmoeDtype::Bf16))
    });
    // H = 1288: two full 512-wide rounds and a partial one, as the split gate's blocks (T = 1
    // and 9 fused with the routing, T = 100 a mid-size batch) and the 16-token gate's loop
    // (T = 1000); E = 72: a partial expert tile; 36 groups: the routing warp's lanes hold two
    // groups each.
    v.push(Case {
        tokens: vec![1, 9, 100, 1000],
        with_bias: true,
        ..mk(
            "gate rounds",
            MoeConfig {
                routing: FdmoeRouting::GroupedTopk,
                n_group: 36,
                topk_group: 10,
                ..base(72, 6, 1288, 96, FdmoeDtype::Bf16)
            },
        )
    });
    v.push(Case {
        tokens: vec![1, 16, 256, 1024],
        ..mk("qwen-like", base(128, 8, 2048, 768, FdmoeDtype::Bf16))
    });
    // H >= 4096: decode takes the 64-row wgmma tile on sm_90a (Tile::for_experts); H not a
    // multiple of 64 (a partial last k-tile) and 2I = 400 (a partial 256-wide column tile).
    v.push(mk("wide hidden", base(8, 2, 4104, 200, FdmoeDtype::Bf16)));
    // Quantized experts (SPEC §5): both backends quantize the same f32 weights on load.
    let q = |fmt, act| MoeConfig {
        weight_dtype: fmt,
        ..base(16, 4, 256, 128, act)
    };
    for (fmt, name) in [
        (FdmoeDtype::Fp8Block, "fp8_block"),
        (FdmoeDtype::Mxfp4, "mxfp4"),
        (FdmoeDtype::Nvfp4, "nvfp4"),
    ] {
        v.push(mk(name, q(fmt, FdmoeDtype::Bf16)));
        v.push(Case {
            with_bias: true,
            ..mk(
                &format!("{name} grouped+bias"),
                MoeConfig {
                    routing: FdmoeRouting::GroupedTopk,
                    n_group: 4,
                    topk_group: 2,
                    routed_scaling_factor: 2.5,
                    ..q(fmt, FdmoeDtype::Bf16)
                },
            )
        });
        v.push(mk(
            &format!("{name} latent+shared"),
            MoeConfig {
                latent_size: Some(128),
                shared_intermediate_size: Some(64),
                ..q(fmt, FdmoeDtype::Bf16)
            },
        ));
        v.push(Case {
            interleaved: true,
            with_gate: false,
            given_ids: true,
            ..mk(
                &format!("{name} interleaved given"),
                MoeConfig {
                    routing: FdmoeRouting::Given,
                    ..q(fmt, FdmoeDtype::Bf16)
                },
            )
        });
        v.push(Case {
            tokens: vec![1, 256],
            ..mk(
                &format!("{name} qwen-like"),
                MoeConfig {
                    weight_dtype: fmt,
                    ..base(128, 8, 2048, 768, FdmoeDtype::Bf16)
                },
            )
        });
    }
    // On sm_90a FP8_BLOCK's W8A8 tiles by rows per expert (ceil(T / 4) with 16 experts, k = 4):
    // 5 and 10 rows the 16-token tile, 13 the 32-token one, 50 and 130 the 64-token prefill one
    // (the other cases' T = 300, 75 rows, that one too).
    v.push(Case {
        tokens: vec![20, 40, 52, 200, 520],
        ..mk(
            "fp8_block token tiles",
            q(FdmoeDtype::Fp8Block, FdmoeDtype::Bf16),
        )
    });
    v.push(mk(
        "fp8_block f16",
        q(FdmoeDtype::Fp8Block, FdmoeDtype::F16),
    ));
    v.push(Case {
        layout: FdmoeLayout::Paddle,
        ..mk(
            "fp8_block paddle latent",
            MoeConfig {
                latent_size: Some(256),
                ..q(FdmoeDtype::Fp8Block, FdmoeDtype::Bf16)
            },
        )
    });
    // K not a multiple of the 64-column packing block (zero-padded at load); T = 200 (100 / 200
    // rows per expert) takes the FP4 prefill wgmma tile on sm_90a, with partial k-tiles and
    // column tiles in both GEMMs.
    v.push(Case {
        tokens: vec![1, 5, 33, 200],
        ..mk(
            "mxfp4 odd sizes",
            MoeConfig {
                weight_dtype: FdmoeDtype::Mxfp4,
                ..base(6, 3, 160, 96, FdmoeDtype::Bf16)
            },
        )
    });
    v.push(Case {
        tokens: vec![1, 5, 33, 200],
        layout: FdmoeLayout::PerExpert,
        ..mk(
            "nvfp4 odd per_expert",
            MoeConfig {
                weight_dtype: FdmoeDtype::Nvfp4,
                ..base(6, 3, 208, 80, FdmoeDtype::Bf16)
            },
        )
    });
    for (fmt, name) in [
        (FdmoeDtype::Fp8Block, "fp8_block wide range"),
        (FdmoeDtype::Mxfp4, "mxfp4 wide range"),
        (FdmoeDtype::Nvfp4, "nvfp4 wide range"),
    ] {
        v.push(Case {
            tokens: vec![1, 40],
            row_scale_span: 14,
            ..mk(name, q(fmt, FdmoeDtype::Bf16))
        });
    }
    v.push(Case {
        tokens: vec![4096],
        ..mk(
            "fp8_block large T",
            MoeConfig {
                max_tokens: 4096,
                weight_dtype: FdmoeDtype::Fp8Block,
                ..base(32, 4, 512, 256, FdmoeDtype::Bf16)
            },
        )
    });
    v.push(Case {
        tokens: vec![4096],
        ..mk(
            "nvfp4 large T",
            MoeConfig {
                max_tokens: 4096,
                weight_dtype: FdmoeDtype::Nvfp4,
                ..base(32, 4, 512, 256, FdmoeDtype::Bf16)
            },
        )
    });
    // act_quant = FP8_MX (W4A8, sm_90a only): both GEMMs on pre-dispatch E4M3 activations.
    // With 16 experts and k = 4, T = 1 / 16 take the 8-token tile, 40 the 16-token one, 256
    // the 32-token one (ceil(T / 4) rows per expert: up to 4 / 24 / more).
    let w4a8 = |cfg: MoeConfig| MoeConfig {
        weight_dtype: FdmoeDtype::Mxfp4,
        act_quant: FdmoeActQuant::Fp8Mx,
        ..cfg
    };
    let w4a8_tokens = vec![1, 16, 40, 256];
    v.push(Case {
        tokens: w4a8_tokens.clone(),
        ..mk("w4a8", w4a8(b(FdmoeDtype::Bf16)))
    });
    v.push(Case {
        with_bias: true,
        tokens: w4a8_tokens.clone(),
        ..mk("w4a8 grouped+bias", w4a8(grouped.clone()))
    });
    v.push(Case {
        tokens: w4a8_tokens.clone(),
        ..mk(
            "w4a8 latent+shared",
            w4a8(MoeConfig {
                latent_size: Some(128),
                shared_intermediate_size: Some(64),
                ..b(FdmoeDtype::Bf16)
            }),
        )
    });
    v.push(Case {
        interleaved: true,
        with_gate: false,
        given_ids: true,
        tokens: w4a8_tokens.clone(),
        ..mk(
            "w4a8 interleaved given",
            w4a8(MoeConfig {
                routing: FdmoeRouting::Given,
                ..b(FdmoeDtype::Bf16)
            }),
        )
    });
    v.push(Case {
        tokens: vec![1, 256],
        ..mk(
            "w4a8 qwen-like",
            w4a8(base(128, 8, 2048, 768, FdmoeDtype::Bf16)),
        )
    });
    // K = 160 / 96: partial k-tiles (a 64-column block past K, chunks past K).
    v.push(Case {
        tokens: vec![1, 5, 33],
        ..mk(
            "w4a8 odd sizes",
            w4a8(base(6, 3, 160, 96, FdmoeDtype::Bf16)),
        )
    });
    v.push(Case {
        tokens: vec![1, 40],
        row_scale_span: 14,
        ..mk("w4a8 wide range", w4a8(b(FdmoeDtype::Bf16)))
    });
    // A 128's 32-channel groups 2^0, 2^-4, 2^-8, 2^-12: re-expressed at the largest exponent,
    // the codes under 2^(d - 6) (d = 4, 8, 12) leave E4M3's normal range, most of the 2^-12
    // group's; K = 160 ends on a partial 128. Dropping the 2^-4 groups would be a ~6% error.
    for (name, h) in [
        ("w4a8 spread exponents", 256),
        ("w4a8 spread exponents odd", 160),
    ] {
        v.push(Case {
            tokens: vec![1, 40],
            channel_group_step: 4,
            ..mk(name, w4a8(base(16, 4, h, 128, FdmoeDtype::Bf16)))
        });
    }
    v.push(Case {
        tokens: vec![4096],
        ..mk(
            "w4a8 large T",
            w4a8(MoeConfig {
                max_tokens: 4096,
                ..base(32, 4, 512, 256, FdmoeDtype::Bf16)
            }),
        )
    });
    v.push(Case {
        tokens: vec![4096, 16384],
        ..mk(
            "large T",
            MoeConfig {
                max_tokens: 16384,
                ..base(32, 4, 512, 256, FdmoeDtype::Bf16)
            },
        )
    });
    v
}

#[test]
fn cuda_matches_cpu_reference() {
    let Some(ctx) = gpu() else { return };
    let _current = ctx.enter().unwrap();
    let mut failures = Vec::new();
    println!(
        "{:<28} {:>6} {:>10} {:>8} {:>6} {:>6}",
        "case", "T", "rel_err", "id_diff", "det", "secs"
    );
    // FDMOE_GPU_QUICK=1 (compute-sanitizer runs): the two smallest token counts of each case.
    let quick = std::env::var_os("FDMOE_GPU_QUICK").is_some();
    // FDMOE_GPU_CASES=a,b: only the cases whose names contain one of these.
    let only: Vec<String> = std::env::var("FDMOE_GPU_CASES")
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    for (n, case) in cases().iter().enumerate() {
        if !only.is_empty() && !only.iter().any(|o| case.name.contains(o.as_str())) {
            continue;
        }
        let tokens = if quick {
            &case.tokens[..case.tokens.len().min(2)]
        } else {
            &case.tokens[..]
        };
        let start = std::time::Instant::now();
        let mut pair = load_pair(case, tokens, n as u64);
        for &t in tokens {
            let o = run_case(case, &mut pair, t, n as u64);
            // SPEC §8: 1e-2 for bf16/f16 weights, 2e-2 for quantized ones (same quantized
            // weights on both sides).
            let tol = if case.cfg.weight_dtype.is_quantized() {
                2e-2
            } else {
                1e-2
            };
            let ok = o.err <= tol
                && o.deterministic
                && (case.given_ids || o.id_mismatch * 100 <= t * case.cfg.top_k);
            println!(
                "{:<28} {:>6} {:>10.2e} {:>8} {:>6} {:>6.1} {}",
                case.name,
                t,
                o.err,
                o.id_mismatch,
                o.deterministic,
                start.elapsed().as_secs_f64(), // load + every T so far
                if ok { "ok" } else { "FAIL" }
            );
            if !ok {
                failures.push(format!("{} T={t}", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}
