//! CUDA graphs and the device-only checks: library-owned bucket graphs replay bitwise equal to
//! eager (every bucket and T between buckets, all routing sources, with the routing record),
//! fdmoe_forward captured inside a caller's graph, several layers sharing one stream, destroy
//! with live graphs, host pointers rejected, capacity checked, and a case whose T·k·L passes
//! 2^31 elements (int64 offsets). Needs a GPU (FDMOE_REQUIRE_GPU=1 makes its absence fail).
#![cfg(feature = "cuda")]

use std::ffi::c_void;

use fdmoe::backend::cuda::driver::{self, Context, DeviceBuffer, GraphExec, OwnedStream};
use fdmoe::*;
use half::bf16;

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

struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32) / (1u64 << 24) as f32
    }
    /// Roughly normal(0, scale): the sum of four uniforms, centred.
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                (self.uniform() + self.uniform() + self.uniform() + self.uniform() - 2.0)
                    * 1.7
                    * scale
            })
            .collect()
    }
}

struct Layer {
    moe: Moe,
    _w: Vec<Vec<f32>>,
}

fn layer(cfg: &MoeConfig, seed: u64, with_gate: bool) -> Layer {
    let (e, h, i) = (cfg.num_experts, cfg.hidden_size, cfg.intermediate_size);
    let mut rng = Rng(seed);
    let w = vec![
        rng.vec(e * 2 * i * h, 1.0 / (h as f32).sqrt()),
        rng.vec(e * h * i, 1.0 / (i as f32).sqrt()),
        rng.vec(e * h, 1.0 / (h as f32).sqrt()),
    ];
    let mut moe = Moe::new(cfg).expect("cuda backend");
    moe.load_weights(&WeightSource {
        layout: FdmoeLayout::Torch,
        dtype: FdmoeDtype::F32,
        memory: FdmoeMemory::Host,
        ownership: FdmoeOwnership::Own,
        gate_up_interleaved: false,
        experts: ExpertSource::Stacked {
            w13: w[0].as_ptr().cast(),
            w2: w[1].as_ptr().cast(),
        },
        gate: with_gate.then(|| GateSource {
            ptr: w[2].as_ptr().cast(),
            dtype: FdmoeDtype::F32,
            layout: FdmoeGateLayout::ExpertsByHidden,
        }),
        correction_bias: None,
        fc1: None,
        fc2: None,
        shared_w13: None,
        shared_w2: None,
    })
    .expect("weights");
    Layer { moe, _w: w }
}

fn cfg(max_tokens: usize) -> MoeConfig {
    MoeConfig {
        backend: FdmoeBackendKind::Cuda,
        num_experts: 32,
        top_k: 4,
        hidden_size: 256,
        intermediate_size: 128,
        act_dtype: FdmoeDtype::Bf16,
        weight_dtype: FdmoeDtype::Bf16,
        max_tokens,
        ..Default::default()
    }
}

/// Device inputs for T tokens of a config.
struct Inputs {
    x: DeviceBuffer,
    logits: DeviceBuffer,
    ids: DeviceBuffer,
    weights: DeviceBuffer,
}

fn inputs(c: &MoeConfig, t: usize, seed: u64) -> Inputs {
    let mut rng = Rng(seed);
    let x: Vec<u16> = rng
        .vec(t * c.hidden_size, 1.0)
        .iter()
        .map(|&v| bf16::from_f32(v).to_bits())
        .collect();
    let ids: Vec<i32> = (0..t * c.top_k)
        .map(|s| ((s / c.top_k) * 7 + (s % c.top_k) * 5) as i32 % c.num_experts as i32)
        .collect();
    Inputs {
        x: DeviceBuffer::from_host(&x, "x").unwrap(),
        logits: DeviceBuffer::from_host(&rng.vec(t * c.num_experts, 1.0), "logits").unwrap(),
        ids: DeviceBuffer::from_host(&ids, "ids").unwrap(),
        weights: DeviceBuffer::from_host(&rng.vec(t * c.top_k, 1.0), "weights").unwrap(),
    }
}

struct Outputs {
    out: DeviceBuffer,
    ids: DeviceBuffer,
    weights: DeviceBuffer,
}

impl Outputs {
    fn new(c: &MoeConfig, t: usize) -> Self {
        Outputs {
            out: DeviceBuffer::from_host(&vec![0xFFFFu16; t * c.hidden_size], "out").unwrap(),
            ids: DeviceBuffer::from_host(&vec![-9i32; t * c.top_k], "ids").unwrap(),
            weights: DeviceBuffer::from_host(&vec![f32::NAN; t * c.top_k], "w").unwrap(),
        }
    }
    fn host(&self, c: &MoeConfig, t: usize) -> (Vec<u16>, Vec<i32>, Vec<u32>) {
        let mut out = vec![0u16; t * c.hidden_size];
        let mut ids = vec![0i32; t * c.top_k];
        let mut w = vec![0u32; t * c.top_k];
        driver::copy_to_host(self.out.ptr, &mut out).unwrap();
        driver::copy_to_host(self.ids.ptr, &mut ids).unwrap();
        driver::copy_to_host(self.weights.ptr, &mut w).unwrap();
        (out, ids, w)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Source {
    Gate,
    Logits,
    Given,
}

fn args(
    t: usize,
    inp: &Inputs,
    out: &Outputs,
    source: Source,
    stream: *mut c_void,
    eager: bool,
) -> ForwardArgs {
    ForwardArgs {
        num_tokens: t,
        x: inp.x.ptr as *const c_void,
        out: out.out.ptr as *mut c_void,
        router_logits: if source == Source::Logits {
            inp.logits.ptr as *const f32
        } else {
            std::ptr::null()
        },
        topk_ids: if source == Source::Given {
            inp.ids.ptr as *const i32
        } else {
            std::ptr::null()
        },
        topk_weights: if source == Source::Given {
            inp.weights.ptr as *const f32
        } else {
            std::ptr::null()
        },
        topk_ids_out: out.ids.ptr as *mut i32,
        topk_weights_out: out.weights.ptr as *mut f32,
        stream,
        force_eager: eager,
    }
}

/// One eager forward of T tokens (`inp`'s first T) into `out`, enqueued on `stream`.
fn forward_eager(
    moe: &mut Moe,
    t: usize,
    inp: &Inputs,
    out: &Outputs,
    source: Source,
    stream: &OwnedStream,
) {
    unsafe {
        moe.forward(&args(t, inp, out, source, stream.0 as *mut c_void, true))
            .unwrap()
    };
}

/// Runs T tokens of fresh inputs eagerly and through the layer's graphs; asserts eager wrote
/// every output and replay gave the same bits (output and routing record).
fn replay_equals_eager(
    l: &mut Layer,
    c: &MoeConfig,
    t: usize,
    seed: u64,
    source: Source,
    stream: &OwnedStream,
    what: &str,
) {
    let inp = inputs(c, t, seed);
    let (eager, replay) = (Outputs::new(c, t), Outputs::new(c, t));
    for (out, force_eager) in [(&eager, true), (&replay, false)] {
        unsafe {
            l.moe
                .forward(&args(
                    t,
                    &inp,
                    out,
                    source,
                    stream.0 as *mut c_void,
                    force_eager,
                ))
                .unwrap();
        }
    }
    stream.synchronize().unwrap();
    let (a, b) = (eager.host(c, t), replay.host(c, t));
    assert!(
        a.0.iter().all(|&v| v != 0xFFFF),
        "{what}eager left outputs unwritten at T={t}"
    );
    assert!(a == b, "{what}replay differs from eager at T={t}");
}

#[test]
fn replay_is_bitwise_equal_to_eager() {
    let Some(ctx) = gpu() else { return };
    let _cur = ctx.enter().unwrap();
    let stream = OwnedStream::new().unwrap();
    for source in [Source::Gate, Source::Logits, Source::Given] {
        let mut c = cfg(2048);
        if source == Source::Given {
            c.routing = FdmoeRouting::Given;
        }
        if source == Source::Gate {
            // Three 512-wide gate rounds: buckets up to 64 run the decode gate kernel that
            // routes and sorts itself (its counters must survive every replay).
            c.hidden_size = 1288;
            c.num_experts = 72;
        }
        let mut l = layer(&c, 11, source == Source::Gate);
        l.moe
            .capture_graphs(&[], stream.0 as *mut c_void)
            .expect("capture default buckets");
        let tokens = [
            1usize, 2, 3, 8, 17, 50, 64, 65, 100, 128, 700, 1024, 1500, 2048,
        ];
        for t in tokens {
            replay_equals_eager(&mut l, &c, t, t as u64 + 3, source, &stream, "");
        }
        println!(
            "graphs ({}): {} token counts bitwise equal",
            ["gate", "logits", "given"][source as usize],
            tokens.len()
        );
    }
}

#[test]
fn thin_decode_tile_gives_the_bits_of_the_16_row_tile() {
    // Eager T * k <= 8 runs GEMM 1 on the thin tile; replayed in a bucket of more slots, the
    // same tokens run it on the 16 x 64 tile: the two must agree bit for bit.
    let Some(ctx) = gpu() else { return };
    let _cur = ctx.enter().unwrap();
    let stream = OwnedStream::new().unwrap();
    for (top_k, bucket, tokens) in [(4usize, 4usize, &[1usize, 2][..]), (8, 2, &[1][..])] {
        for source in [Source::Given, Source::Gate] {
            let mut c = cfg(64);
            c.top_k = top_k;
            c.hidden_size = 520; // a partial 64-wide k-tile
            c.intermediate_size = 136; // a partial 32-column tile of the 16 x 64 tile
            if source == Source::Given {
                c.routing = FdmoeRouting::Given;
            }
            let mut l = layer(&c, 5 + top_k as u64, source == Source::Gate);
            l.moe
                .capture_graphs(&[bucket], stream.0 as *mut c_void)
                .unwrap();
            for &t in tokens {
                replay_equals_eager(&mut l, &c, t, 40 + t as u64, source, &stream, "thin: ");
            }
        }
    }
    println!("thin decode tile: eager equals the 16-row tile's replay");
}

#[test]
fn a_tokens_output_does_not_depend_on_the_quantized_tile() {
    // The quantized experts' token tile follows the rows per expert (T * k / E = T / 8 here):
    // on sm_90a W8A8 takes 8 tokens at T = 1, 16 at 40, 32 at 120 and the 64-token prefill tile
    // (tokens as wgmma M) from 500; FP4 the mma.sync tiles up to 500 and the 128-token wgmma
    // one at 800 and 1024 (there with H = 288 and I = 96: partial k-tiles in both GEMMs and
    // partial column tiles). The first tokens of one batch must come out bitwise the same from
    // each.
    let Some(ctx) = gpu() else { return };
    let _cur = ctx.enter().unwrap();
    let stream = OwnedStream::new().unwrap();
    for format in [FdmoeDtype::Fp8Block, FdmoeDtype::Mxfp4, FdmoeDtype::Nvfp4] {
        let fp4 = format != FdmoeDtype::Fp8Block;
        let c = MoeConfig {
            weight_dtype: format,
            routing: FdmoeRouting::Given,
            hidden_size: if fp4 { 288 } else { 256 },
            intermediate_size: if fp4 { 96 } else { 128 },
            ..cfg(1024)
        };
        let mut l = layer(&c, 21, false);
        let inp = inputs(&c, 1024, 77);
        let tokens = [1024usize, 1, 40, 120, 500, 800];
        let mut full = None;
        for t in tokens {
            let o = Outputs::new(&c, t);
            forward_eager(&mut l.moe, t, &inp, &o, Source::Given, &stream);
            stream.synchronize().unwrap();
            let (out, _, _) = o.host(&c, t);
            assert!(
                out.iter().all(|&v| v != 0xFFFF),
                "{format} T = {t}: every output written"
            );
            let full: &Vec<u16> = full.get_or_insert(out.clone());
            let first = t * c.hidden_size;
            if let Some(i) = (0..first).find(|&i| out[i] != full[i]) {
                panic!(
                    "{format}: token {} of T = {t} differs from the T = 1024 batch ({:#06x} vs {:#06x})",
                    i / c.hidden_size,
                    out[i],
                    full[i]
                );
            }
        }
        println!("{format}: tokens bitwise equal at T = {tokens:?}");
    }
}

#[test]
fn routing_of_a_token_does_not_depend_on_the_batch() {
    // The gate kernel has split variants (one block per 512 of H, partials added by the
    // routing: decode, fused with the routing and sort; 16 tokens a block for mid-size batches
    // whose 16-token grid would be under 256 blocks, up to T = 1024; tiled from 32 experts, up
    // to T = 4096) and two one-pass ones (all of H in a block: 16 tokens, or tiled past 4096
    // once the grid has 128 blocks); all sum in the same order, so the first tokens route
    // bitwise the same in every batch. E = 72: 1 and 40 (fused), 300 (split, 16 tokens), 1100
    // (tiled, split), 4100 (tiled); E = 24: 300 (split), 1100 (16 tokens). H = 1288 is two
    // full rounds and a partial one; both E leave the last expert tile partial.
    let Some(ctx) = gpu() else { return };
    let _cur = ctx.enter().unwrap();
    let stream = OwnedStream::new().unwrap();
    for (num_experts, batches) in [
        (72, &[1usize, 40, 300, 1100, 4100][..]),
        (24, &[1, 300, 1100]),
    ] {
        let max_tokens = *batches.last().unwrap();
        let c = MoeConfig {
            num_experts,
            hidden_size: 1288,
            ..cfg(max_tokens)
        };
        let mut l = layer(&c, 21, true);
        let inp = inputs(&c, max_tokens, 4);
        let outs: Vec<Outputs> = batches.iter().map(|&t| Outputs::new(&c, t)).collect();
        for (&t, out) in batches.iter().zip(&outs) {
            forward_eager(&mut l.moe, t, &inp, out, Source::Gate, &stream);
        }
        stream.synchronize().unwrap();
        let all = outs.last().unwrap().host(&c, max_tokens);
        for (&t, out) in batches.iter().zip(&outs) {
            let (_, ids, weights) = out.host(&c, t);
            let n = t * c.top_k;
            assert_eq!(
                ids[..],
                all.1[..n],
                "E = {num_experts}: experts differ between T = {t} and T = {max_tokens}"
            );
            assert_eq!(
                weights[..],
                all.2[..n],
                "E = {num_experts}: weights differ between T = {t} and T = {max_tokens}"
            );
        }
    }
}

#[test]
fn quantized_replay_is_bitwise_equal_to_eager() {
    let Some(ctx) = gpu() else { return };
    let _cur = ctx.enter().unwrap();
    let stream = OwnedStream::new().unwrap();
    let modes = [
        (FdmoeDtype::Fp8Block, FdmoeActQuant::None),
        (FdmoeDtype::Mxfp4, FdmoeActQuant::None),
        (FdmoeDtype::Nvfp4, FdmoeActQuant::None),
        // W4A8: a bucket's token tile can differ from the eager one's (T = 160: 16 tokens
        // eager, 32 in the 256 bucket); so can FP8_BLOCK's on sm_90a (W8A8, T = 90: 12 rows per
        // expert take 16 tokens eager, the 128 bucket's 16 rows 32).
        (FdmoeDtype::Mxfp4, FdmoeActQuant::Fp8Mx),
    ];
    for (format, act_quant) in modes {
        let c = MoeConfig {
            weight_dtype: format,
            act_quant,
            ..cfg(512)
        };
        let mut l = layer(&c, 5, true);
        l.moe
            .capture_graphs(&[], stream.0 as *mut c_void)
            .expect("capture default buckets");
        for t in [1usize, 3, 16, 32, 40, 90, 160, 200, 512] {
            let what = format!("{format} act_quant {act_quant}: ");
            replay_equals_eager(&mut l, &c, t, t as u64 + 9, Source::Gate, &stream, &what);
        }
        println!("graphs ({format}, act_quant {act_quant}): 9 token counts bitwise equal");
    }
}

/// The wgmma tiles (sm_90a: FP8_BLOCK, and MXFP4 on FP8_MX inputs): GEMM 2's blocks start on a
/// row tile once GEMM 1 signals it, through per-tile counts that the tile's consumers zero for
/// the next launch. Forwards of alternating T (decode, 32-token and, for FP8_BLOCK, prefill
/// tiles; three 128-channel groups a tile), enqueued back to back with no synchronization,
/// eager and replayed, must each give the bits of the same forward run alone: a count left
/// over, or a tile read before it is done, would change some.
#[test]
fn wgmma_forwards_back_to_back_repeat_their_bits() {
    let Some(ctx) = gpu() else { return };
    let _cur = ctx.enter().unwrap();
    let stream = OwnedStream::new().unwrap();
    for (format, act_quant) in [
        (FdmoeDtype::Fp8Block, FdmoeActQuant::None),
        (FdmoeDtype::Mxfp4, FdmoeActQuant::Fp8Mx),
    ] {
        let c = MoeConfig {
            weight_dtype: format,
            act_quant,
            intermediate_size: 384,
            ..cfg(512)
        };
        let mut l = layer(&c, 13, true);
        l.moe
            .capture_graphs(&[], stream.0 as *mut c_void)
            .expect("capture default buckets");
        let tokens = [16usize, 200, 3, 512, 64];
        let inps: Vec<Inputs> = tokens
            .iter()
            .map(|&t| inputs(&c, t, t as u64 + 21))
            .collect();
        let mut alone = Vec::new();
        for (&t, inp) in tokens.iter().zip(&inps) {
            let out = Outputs::new(&c, t);
            forward_eager(&mut l.moe, t, inp, &out, Source::Gate, &stream);
            stream.synchronize().unwrap();
            alone.push(out.host(&c, t));
        }
        // Every output allocated first, so nothing on the host paces the enqueued forwards.
        let rounds = 6;
        let outs: Vec<Outputs> = (0..rounds * tokens.len())
            .map(|n| Outputs::new(&c, tokens[n % tokens.len()]))
            .collect();
        for (n, out) in outs.iter().enumerate() {
            let j = n % tokens.len();
            let eager = (n / tokens.len()) % 2 == 0;
            unsafe {
                l.moe
                    .forward(&args(
                        tokens[j],
                        &inps[j],
                        out,
                        Source::Gate,
                        stream.0 as *mut c_void,
                        eager,
                    ))
                    .unwrap();
            }
        }
        stream.synchronize().unwrap();
        for (n, out) in outs.iter().enumerate() {
            let j = n % tokens.len();
            assert!(
                out.host(&c, tokens[j]) == alone[j],
                "{format} act_quant {act_quant}: forward {n} (T = {}) differs from the same forward run alone",
                tokens[j]
            );
        }
        println!(
            "{format} act_quant {act_quant}: {} back-to-back forwards gave the bits of each run alone",
            outs.len()
        );
    }
}

#[test]
fn forward_inside_a_caller_graph() {
    let Some(ctx) = gpu() else { return };
    let _cur = ctx.enter().unwrap();
    let stream = OwnedStream::new().unwrap();
    let c = cfg(256);
    let mut l = layer(&c, 5, true);
    let t = 37;
    let inp = inputs(&c, t, 1);
    let (eager, captured) = (Outputs::new(&c, t), Outputs::new(&c, t));
    forward_eager(&mut l.moe, t, &inp, &eager, Source::Gate, &stream);
    let capture = |moe: &mut Moe| unsafe {
        moe.forward(&args(
            t,
            &inp,
            &captured,
            Source::Gate,
            stream.0 as *mut c_void,
            false,
        ))
    };
    let exec = unsafe { GraphExec::capture(stream.0, || capture(&mut l.moe)) }
        .expect("fdmoe_forward captures inside the caller's graph");
    for _ in 0..3 {
        unsafe { exec.launch(stream.0).unwrap() };
    }
    stream.synchronize().unwrap();
    assert!(
        eager.host(&c, t) == captured.host(&c, t),
        "caller-graph replay differs from eager"
    );
    println!("caller graph: replay equals eager");
}

#[test]
fn layers_share_a_stream_and_destroy_with_graphs() {
    let Some(ctx) = gpu() else { return };
    let _cur = ctx.enter().unwrap();
    let stream = OwnedStream::new().unwrap();
    let c = cfg(512);
    let mut layers: Vec<Layer> = (0..3).map(|s| layer(&c, 100 + s, true)).collect();
    let t = 24;
    let inp = inputs(&c, t, 9);
    let mut expected = Vec::new();
    for l in &mut layers {
        let o = Outputs::new(&c, t);
        forward_eager(&mut l.moe, t, &inp, &o, Source::Gate, &stream);
        stream.synchronize().unwrap();
        expected.push(o.host(&c, t));
        l.moe
            .capture_graphs(&[8, 32, 512], stream.0 as *mut c_void)
            .unwrap();
    }
    for round in 0..2 {
        let outs: Vec<Outputs> = layers.iter().map(|_| Outputs::new(&c, t)).collect();
        for (l, o) in layers.iter_mut().zip(&outs) {
            unsafe {
                l.moe
                    .forward(&args(
                        t,
                        &inp,
                        o,
                        Source::Gate,
                        stream.0 as *mut c_void,
                        false,
                    ))
                    .unwrap()
            };
        }
        stream.synchronize().unwrap();
        for (o, e) in outs.iter().zip(&expected) {
            assert!(
                o.host(&c, t) == *e,
                "round {round}: a layer's replay differs"
            );
        }
    }
    drop(layers);
    println!("three layers on one stream: replays equal eager; destroyed with live graphs");
}

#[test]
fn device_argument_errors() {
    let Some(ctx) = gpu() else { return };
    let _cur = ctx.enter().unwrap();
    let c = cfg(64);
    let mut l = layer(&c, 1, true);
    let inp = inputs(&c, 4, 2);
    let o = Outputs::new(&c, 4);
    let host_x = vec![0u16; 4 * c.hidden_size];
    let mut a = args(4, &inp, &o, Source::Gate, std::ptr::null_mut(), false);
    a.x = host_x.as_ptr().cast();
    let e = unsafe { l.moe.forward(&a) }.unwrap_err();
    assert_eq!(e.status, FdmoeStatus::InvalidArgument);
    assert!(
        e.message.contains("args.x is a host pointer"),
        "{}",
        e.message
    );
    let a = args(65, &inp, &o, Source::Gate, std::ptr::null_mut(), false);
    assert_eq!(
        unsafe { l.moe.forward(&a) }.unwrap_err().status,
        FdmoeStatus::CapacityExceeded
    );
    let e = l
        .moe
        .capture_graphs(&[128], std::ptr::null_mut())
        .unwrap_err();
    assert!(
        e.message.contains("above config.max_tokens"),
        "{}",
        e.message
    );
    for bad in [
        MoeConfig {
            act_dtype: FdmoeDtype::F32,
            weight_dtype: FdmoeDtype::F32,
            ..c.clone()
        },
        MoeConfig {
            hidden_size: 250,
            ..c.clone()
        },
    ] {
        let e = Moe::new(&bad).unwrap_err();
        assert_eq!(e.status, FdmoeStatus::Unsupported, "{}", e.message);
        assert!(e.message.contains("backend cuda"), "{}", e.message);
    }
    println!("device argument errors: ok");
}

/// T·k·L = 66000·8·4096 > 2^31: every offset must be 64-bit. Compared with the CPU backend on
/// the first and last tokens (tokens are independent).
#[test]
fn offsets_past_two_to_the_31() {
    let Some(ctx) = gpu() else { return };
    let _cur = ctx.enter().unwrap();
    let t = 66_000usize;
    let c = MoeConfig {
        num_experts: 16,
        top_k: 8,
        hidden_size: 4096,
        intermediate_size: 64,
        max_tokens: t,
        ..cfg(t)
    };
    assert!(t * c.top_k * c.hidden_size > (1usize << 31));
    let mut gpu_layer = layer(&c, 77, true);
    let inp = inputs(&c, t, 4);
    let o = Outputs::new(&c, t);
    unsafe {
        gpu_layer
            .moe
            .forward(&args(
                t,
                &inp,
                &o,
                Source::Gate,
                std::ptr::null_mut(),
                false,
            ))
            .unwrap()
    };
    let (out, _, _) = o.host(&c, t);
    assert!(
        out.iter().all(|&v| v != 0xFFFF),
        "unwritten outputs past 2^31 elements"
    );
    let mut xs = vec![0u16; t * c.hidden_size];
    driver::copy_to_host(inp.x.ptr, &mut xs).unwrap();
    let cpu_cfg = MoeConfig {
        backend: FdmoeBackendKind::Cpu,
        max_tokens: 256,
        ..c.clone()
    };
    let cpu = layer(&cpu_cfg, 77, true);
    let mut cpu = cpu;
    for first in [0usize, t - 256] {
        let mut want = vec![0u16; 256 * c.hidden_size];
        let a = ForwardArgs::new(
            256,
            xs[first * c.hidden_size..].as_ptr().cast(),
            want.as_mut_ptr().cast(),
        );
        unsafe { cpu.moe.forward(&a).unwrap() };
        let got = &out[first * c.hidden_size..(first + 256) * c.hidden_size];
        let (mut num, mut den) = (0f64, 0f64);
        for (g, w) in got.iter().zip(&want) {
            let (g, w) = (
                bf16::from_bits(*g).to_f32() as f64,
                bf16::from_bits(*w).to_f32() as f64,
            );
            num += (g - w).powi(2);
            den += w * w;
        }
        let err = (num / den).sqrt();
        println!(
            "T = {t}, tokens {first}..{}: rel err {err:.2e}",
            first + 256
        );
        assert!(err < 1e-2);
    }
}

/// Given ids outside [0, E) are skipped on the GPU (no row, no contribution, never indexed):
/// the result equals the CPU's with those slots given weight 0 on a valid expert. Non-finite
/// logits never produce ids outside [0, E).
#[test]
fn invalid_ids_and_non_finite_logits() {
    let Some(ctx) = gpu() else { return };
    let _cur = ctx.enter().unwrap();
    // T = 700 (2800 slots) sorts over two blocks (the multi-block sort), T = 40 in one.
    for t in [40, 700] {
        given_invalid_ids_are_skipped(t);
    }
    // Non-finite logits: ids stay in range.
    let (c, t) = (cfg(64), 40);
    let inp = inputs(&c, t, 8);
    let mut l = layer(&c, 3, false);
    let mut logits = Rng(5).vec(t * c.num_experts, 1.0);
    for (i, v) in logits.iter_mut().enumerate() {
        match i % 5 {
            0 => *v = f32::NAN,
            1 => *v = f32::INFINITY,
            2 => *v = f32::NEG_INFINITY,
            _ => {}
        }
    }
    for tok in 0..4 {
        logits[tok * c.num_experts..(tok + 1) * c.num_experts]
            .iter_mut()
            .for_each(|v| *v = f32::NAN);
    }
    let dl = DeviceBuffer::from_host(&logits, "logits").unwrap();
    let o = Outputs::new(&c, t);
    let mut a = args(t, &inp, &o, Source::Logits, std::ptr::null_mut(), false);
    a.router_logits = dl.ptr as *const f32;
    unsafe { l.moe.forward(&a).unwrap() };
    let (_, rec, _) = o.host(&c, t);
    assert!(
        rec.iter().all(|&i| (0..c.num_experts as i32).contains(&i)),
        "ids out of range: {rec:?}"
    );
    println!(
        "non-finite logits: all {} recorded ids in [0, E)",
        rec.len()
    );
}

/// Given ids outside [0, E) (every 7th slot) are skipped: the output equals the CPU's with those
/// slots at expert 0 and weight 0.
fn given_invalid_ids_are_skipped(t: usize) {
    let mut c = cfg(700);
    c.routing = FdmoeRouting::Given;
    let mut g = layer(&c, 21, false);
    let inp = inputs(&c, t, 8);
    let mut ids = vec![0i32; t * c.top_k];
    driver::copy_to_host(inp.ids.ptr, &mut ids).unwrap();
    let mut w = vec![0f32; t * c.top_k];
    driver::copy_to_host(inp.weights.ptr, &mut w).unwrap();
    let bad = [-1, c.num_experts as i32, 1000, i32::MIN];
    let (mut cpu_ids, mut cpu_w) = (ids.clone(), w.clone());
    for (n, slot) in (0..t * c.top_k).step_by(7).enumerate() {
        ids[slot] = bad[n % bad.len()];
        cpu_ids[slot] = 0;
        cpu_w[slot] = 0.0;
    }
    let dids = DeviceBuffer::from_host(&ids, "ids").unwrap();
    let o = Outputs::new(&c, t);
    let mut a = args(t, &inp, &o, Source::Given, std::ptr::null_mut(), false);
    a.topk_ids = dids.ptr as *const i32;
    unsafe { g.moe.forward(&a).unwrap() };
    let (out, _, _) = o.host(&c, t);
    let mut xs = vec![0u16; t * c.hidden_size];
    driver::copy_to_host(inp.x.ptr, &mut xs).unwrap();
    let mut cpu = layer(
        &MoeConfig {
            backend: FdmoeBackendKind::Cpu,
            ..c.clone()
        },
        21,
        false,
    );
    let mut want = vec![0u16; t * c.hidden_size];
    let ca = ForwardArgs {
        topk_ids: cpu_ids.as_ptr(),
        topk_weights: cpu_w.as_ptr(),
        ..ForwardArgs::new(t, xs.as_ptr().cast(), want.as_mut_ptr().cast())
    };
    unsafe { cpu.moe.forward(&ca).unwrap() };
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in out.iter().zip(&want) {
        let (g, w) = (
            bf16::from_bits(*g).to_f32() as f64,
            bf16::from_bits(*w).to_f32() as f64,
        );
        num += (g - w).powi(2);
        den += w * w;
    }
    let err = (num / den).sqrt();
    println!(
        "invalid given ids skipped (T = {t}): rel err vs CPU with zero-weight slots {err:.2e}"
    );
    assert!(err < 1e-2);
}

/// FP8 pre-dispatch on device memory is bitwise equal to the host reference, padding included,
/// for bf16 inputs with NaN, ±inf, tiny and huge values; capacity is checked before any write.
#[test]
fn pre_dispatch_on_device_equals_host() {
    use fdmoe::ffi::{fdmoe_pre_dispatch_args_init, fdmoe_pre_dispatch_fp8, FdmoePreDispatchArgs};
    let Some(ctx) = gpu() else { return };
    let _cur = ctx.enter().unwrap();
    let (t, t_max, h, k) = (37usize, 64usize, 512usize, 4usize);
    let mut vals = Rng(17).vec(t * h, 3.0);
    for (i, v) in vals.iter_mut().enumerate() {
        match i % 97 {
            0 => *v = f32::NAN,
            1 => *v *= 1e-30,
            2 => *v *= 1e20,
            _ => {}
        }
    }
    vals[5 * h + 40] = f32::INFINITY;
    vals[9 * h + 300] = f32::NEG_INFINITY;
    let x: Vec<u16> = vals.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    let ids: Vec<i32> = (0..t * k).map(|i| (i * 7 % 64) as i32).collect();
    let w: Vec<f32> = (0..t * k).map(|i| i as f32 * 0.01).collect();
    let run = |memory: FdmoeMemory, tokens: usize, ptrs: [*mut c_void; 7], stream: *mut c_void| {
        let mut a: FdmoePreDispatchArgs = unsafe { std::mem::zeroed() };
        unsafe { fdmoe_pre_dispatch_args_init(&mut a) };
        a.memory = memory as u32;
        a.x_dtype = FdmoeDtype::Bf16 as u32;
        a.num_tokens = tokens as u32;
        a.hidden_size = h as u32;
        a.top_k = k as u32;
        a.max_tokens = t_max as u32;
        a.x = ptrs[0];
        a.topk_ids = ptrs[1] as *const i32;
        a.topk_weights = ptrs[2] as *const f32;
        a.out_x = ptrs[3] as *mut u8;
        a.out_scales = ptrs[4] as *mut i32;
        a.out_topk_ids = ptrs[5] as *mut i32;
        a.out_topk_weights = ptrs[6] as *mut f32;
        a.stream = stream;
        unsafe { fdmoe_pre_dispatch_fp8(&a) }
    };
    let (mut hx, mut hs, mut hi, mut hw) = (
        vec![0xAAu8; t_max * h],
        vec![7i32; t_max * h / 128],
        vec![9i32; t_max * k],
        vec![5f32; t_max * k],
    );
    let st = run(
        FdmoeMemory::Host,
        t,
        [
            x.as_ptr() as *mut c_void,
            ids.as_ptr() as *mut c_void,
            w.as_ptr() as *mut c_void,
            hx.as_mut_ptr().cast(),
            hs.as_mut_ptr().cast(),
            hi.as_mut_ptr().cast(),
            hw.as_mut_ptr().cast(),
        ],
        std::ptr::null_mut(),
    );
    assert_eq!(st, FdmoeStatus::Ok);
    let dx = DeviceBuffer::from_host(&x, "x").unwrap();
    let di = DeviceBuffer::from_host(&ids, "ids").unwrap();
    let dw = DeviceBuffer::from_host(&w, "w").unwrap();
    let ox = DeviceBuffer::from_host(&vec![0x55u8; t_max * h], "out x").unwrap();
    let os = DeviceBuffer::from_host(&vec![3i32; t_max * h / 128], "out scales").unwrap();
    let oi = DeviceBuffer::from_host(&vec![3i32; t_max * k], "out ids").unwrap();
    let ow = DeviceBuffer::from_host(&vec![3f32; t_max * k], "out w").unwrap();
    let p = |b: &DeviceBuffer| b.ptr as *mut c_void;
    let stream = OwnedStream::new().unwrap();
    let dev = [p(&dx), p(&di), p(&dw), p(&ox), p(&os), p(&oi), p(&ow)];
    assert_eq!(
        run(FdmoeMemory::Device, t, dev, stream.0 as *mut c_void),
        FdmoeStatus::Ok
    );
    stream.synchronize().unwrap();
    let (mut gx, mut gs, mut gi, mut gw) = (
        vec![0u8; t_max * h],
        vec![0i32; t_max * h / 128],
        vec![0i32; t_max * k],
        vec![0f32; t_max * k],
    );
    driver::copy_to_host(ox.ptr, &mut gx).unwrap();
    driver::copy_to_host(os.ptr, &mut gs).unwrap();
    driver::copy_to_host(oi.ptr, &mut gi).unwrap();
    driver::copy_to_host(ow.ptr, &mut gw).unwrap();
    assert!(gx == hx, "E4M3 data differs from the host reference");
    assert!(gs == hs, "UE8M0 scales differ from the host reference");
    assert!(
        gi == hi
            && gw
                .iter()
                .map(|v| v.to_bits())
                .eq(hw.iter().map(|v| v.to_bits()))
    );
    // Capacity before any write.
    let before = gx.clone();
    assert_eq!(
        run(FdmoeMemory::Device, t_max + 1, dev, std::ptr::null_mut()),
        FdmoeStatus::CapacityExceeded
    );
    driver::copy_to_host(ox.ptr, &mut gx).unwrap();
    assert!(gx == before);
    println!("pre-dispatch on device: bitwise equal to host ({t} of {t_max} rows, H = {h})");
}
