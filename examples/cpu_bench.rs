//! CPU benchmark of the routed-expert layer at the SPEC §8 shapes, timed beside numpy by
//! `bench/run_cpu_bench.sh` (which runs this, then `bench/numpy_moe.py` with the same
//! arguments, and merges the two).
//!
//! What is timed: one `Moe::forward` in F32 with *given* routing (the same ids and weights
//! numpy uses), so both sides do identical expert work: sort by expert, gather, gate and up
//! GEMMs, SwiGLU, down GEMM, weighted combine. No router, no shared expert.
//!
//! The machine this runs on has far less memory than DeepSeek-V3's 45 GB of f32 experts, so
//! each shape keeps a pool of `pool` distinct physical experts and logical expert `e` borrows
//! physical expert `e % pool` (PER_EXPERT layout, BORROW ownership: no copy). A pool much
//! larger than the last-level cache keeps every expert's weights coming from DRAM, as they
//! would with all experts distinct. numpy aliases its experts the same way.
//!
//! Weights, inputs and routing come from a counter-based hash that `bench/numpy_moe.py`
//! reproduces bit for bit, so the outputs written with `--out-dir` can be compared there.
//!
//! Prints one JSON line per (shape, T) cell:
//! `{"impl":"fdmoe","shape":...,"tokens":T,"ms_median":...,"ms_min":...,"reps":...}`.
//!
//! ```text
//! cargo run --release --example cpu_bench -- [--shapes a,b] [--tokens 1,16] [--threads 2]
//!     [--min-reps 5] [--max-reps 30] [--min-secs 1.0] [--out-dir DIR]
//! ```

use std::time::Instant;

use fdmoe::*;

/// One benchmark shape (SPEC §8) and how many distinct expert buffers back it here.
struct Shape {
    name: &'static str,
    num_experts: usize,
    top_k: usize,
    hidden_size: usize,
    intermediate_size: usize,
    /// Distinct physical experts; logical expert e uses physical e % pool.
    pool: usize,
    /// (n_group, topk_group) of grouped top-k: the given routing respects it.
    groups: Option<(usize, usize)>,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "qwen3-30b-a3b",
        num_experts: 128,
        top_k: 8,
        hidden_size: 2048,
        intermediate_size: 768,
        pool: 128,
        groups: None,
    },
    Shape {
        name: "mixtral-8x7b",
        num_experts: 8,
        top_k: 2,
        hidden_size: 4096,
        intermediate_size: 14336,
        pool: 8,
        groups: None,
    },
    Shape {
        name: "deepseek-v3",
        num_experts: 256,
        top_k: 8,
        hidden_size: 7168,
        intermediate_size: 2048,
        pool: 16,
        groups: Some((8, 4)),
    },
];

/// The counter hash both sides share (a multiply-xorshift finaliser over index and stream).
fn mix(index: u32, stream: u32) -> u32 {
    let mut h = index.wrapping_mul(0x9E37_79B1) ^ stream.wrapping_mul(0x85EB_CA77);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2C1B_3C6D);
    h ^= h >> 12;
    h = h.wrapping_mul(0x297A_2D39);
    h ^= h >> 15;
    h
}

/// Uniform in [0, 1) on a 2^-24 grid: exact in f32, so numpy gets the same bits.
fn unit(index: u32, stream: u32) -> f32 {
    (mix(index, stream) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// `n` values uniform in [-0.5, 0.5) times `scale` (in f32, one rounding).
fn fill(n: usize, stream: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (unit(i as u32, stream) - 0.5) * scale)
        .collect()
}

/// Scale giving variance 1 / fan_in to uniform [-0.5, 0.5) values.
fn weight_scale(fan_in: usize) -> f32 {
    (12.0f64 / fan_in as f64).sqrt() as f32
}

/// Streams of the hash; numpy_moe.py uses the same numbers.
const STREAM_X: u32 = 0x7000_0000;
const STREAM_SCORES: u32 = 0x6000_0000;
const STREAM_WEIGHTS: u32 = 0x5000_0000;

/// Given routing for `t` tokens: the top-k of hashed scores (restricted to the `topk_group`
/// best groups by max score when grouped), ties to the lower index; slot order is
/// descending score. Weights in [0.5, 1.5) / k.
fn routing(shape: &Shape, t: usize) -> (Vec<i32>, Vec<f32>) {
    let (e, k) = (shape.num_experts, shape.top_k);
    let mut ids = Vec::with_capacity(t * k);
    let mut weights = Vec::with_capacity(t * k);
    for tok in 0..t {
        // Unique keys: score in the high bits, reversed index below (ties -> lower index).
        let key = |x: usize| {
            ((mix((tok * e + x) as u32, STREAM_SCORES + t as u32) as u64) << 16)
                | (0xFFFF - x as u64)
        };
        let mut allowed = vec![true; e];
        if let Some((n_group, topk_group)) = shape.groups {
            let per = e / n_group;
            let mut groups: Vec<(u64, usize)> = (0..n_group)
                .map(|g| {
                    let best = (g * per..(g + 1) * per).map(|x| key(x) >> 16).max();
                    (
                        (best.expect("non-empty group") << 16) | (0xFFFF - g as u64),
                        g,
                    )
                })
                .collect();
            groups.sort_unstable_by_key(|g| std::cmp::Reverse(g.0));
            allowed.iter_mut().for_each(|a| *a = false);
            for &(_, g) in &groups[..topk_group] {
                allowed[g * per..(g + 1) * per]
                    .iter_mut()
                    .for_each(|a| *a = true);
            }
        }
        let mut ranked: Vec<(u64, usize)> = (0..e)
            .filter(|&x| allowed[x])
            .map(|x| (key(x), x))
            .collect();
        ranked.sort_unstable_by_key(|r| std::cmp::Reverse(r.0));
        for (j, &(_, x)) in ranked[..k].iter().enumerate() {
            ids.push(x as i32);
            let u = unit((tok * k + j) as u32, STREAM_WEIGHTS + t as u32);
            weights.push((u + 0.5) / k as f32);
        }
    }
    (ids, weights)
}

struct Options {
    shapes: Vec<String>,
    tokens: Vec<usize>,
    threads: usize,
    min_reps: usize,
    max_reps: usize,
    min_secs: f64,
    out_dir: Option<String>,
}

fn parse<T: std::str::FromStr>(flag: &str, value: &str) -> T {
    value
        .parse()
        .unwrap_or_else(|_| panic!("{flag}: cannot parse {value:?}"))
}

fn parse_args() -> Options {
    let mut o = Options {
        shapes: SHAPES.iter().map(|s| s.name.to_string()).collect(),
        tokens: vec![1, 16, 64, 256],
        threads: 2,
        min_reps: 5,
        max_reps: 30,
        min_secs: 1.0,
        out_dir: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--shapes" => o.shapes = value.split(',').map(str::to_string).collect(),
            "--tokens" => o.tokens = value.split(',').map(|v| parse(flag, v)).collect(),
            "--threads" => o.threads = parse(flag, value),
            "--min-reps" => o.min_reps = parse(flag, value),
            "--max-reps" => o.max_reps = parse(flag, value),
            "--min-secs" => o.min_secs = parse(flag, value),
            "--out-dir" => o.out_dir = Some(value.clone()),
            _ => panic!("unknown flag {flag}"),
        }
    }
    o
}

/// Runs `f` once to warm up, then at least `min_reps` times and until `min_secs` have passed
/// (at most `max_reps`); returns the sorted per-run times in ms.
fn time_runs(o: &Options, mut f: impl FnMut()) -> Vec<f64> {
    f();
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < o.min_reps
        || (times.len() < o.max_reps && start.elapsed().as_secs_f64() < o.min_secs)
    {
        let t0 = Instant::now();
        f();
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).expect("finite times"));
    times
}

/// Median of sorted values (mean of the middle two for an even count, as numpy's).
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    (sorted[(n - 1) / 2] + sorted[n / 2]) / 2.0
}

fn bench_shape(shape: &Shape, o: &Options) {
    let (h, i) = (shape.hidden_size, shape.intermediate_size);
    let max_tokens = *o.tokens.iter().max().expect("at least one token count");
    // Physical expert p: gate, up, down from streams 3p+1, 3p+2, 3p+3.
    let pool: Vec<[Vec<f32>; 3]> = (0..shape.pool as u32)
        .map(|p| {
            [
                fill(i * h, 3 * p + 1, weight_scale(h)),
                fill(i * h, 3 * p + 2, weight_scale(h)),
                fill(h * i, 3 * p + 3, weight_scale(i)),
            ]
        })
        .collect();
    let per_expert = |m: usize| {
        (0..shape.num_experts)
            .map(|e| pool[e % shape.pool][m].as_ptr().cast())
            .collect::<Vec<_>>()
    };
    let cfg = MoeConfig {
        num_experts: shape.num_experts,
        top_k: shape.top_k,
        hidden_size: h,
        intermediate_size: i,
        routing: FdmoeRouting::Given,
        act_dtype: FdmoeDtype::F32,
        weight_dtype: FdmoeDtype::F32,
        max_tokens,
        num_threads: o.threads,
        ..Default::default()
    };
    let mut moe = Moe::new(&cfg).expect("config");
    moe.load_weights(&WeightSource {
        layout: FdmoeLayout::PerExpert,
        dtype: FdmoeDtype::F32,
        memory: FdmoeMemory::Host,
        ownership: FdmoeOwnership::Borrow,
        gate_up_interleaved: false,
        experts: ExpertSource::PerExpert {
            gate_proj: per_expert(0),
            up_proj: per_expert(1),
            down_proj: per_expert(2),
        },
        gate: None,
        correction_bias: None,
        fc1: None,
        fc2: None,
        shared_w13: None,
        shared_w2: None,
    })
    .expect("weights");
    for &t in &o.tokens {
        let x = fill(t * h, STREAM_X + t as u32, 12f32.sqrt());
        let (ids, weights) = routing(shape, t);
        let mut out = vec![f32::NAN; t * h];
        let args = ForwardArgs {
            topk_ids: ids.as_ptr(),
            topk_weights: weights.as_ptr(),
            ..ForwardArgs::new(t, x.as_ptr().cast(), out.as_mut_ptr().cast())
        };
        // SAFETY: every buffer above holds the [T, H] / [T, k] extent ForwardArgs documents.
        let times = time_runs(o, || unsafe { moe.forward(&args).expect("forward") });
        println!(
            "{{\"impl\":\"fdmoe\",\"shape\":\"{}\",\"tokens\":{t},\"ms_median\":{:.4},\"ms_min\":{:.4},\"reps\":{}}}",
            shape.name,
            median(&times),
            times[0],
            times.len()
        );
        if let Some(dir) = &o.out_dir {
            let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
            let path = format!("{dir}/{}_T{t}.f32", shape.name);
            std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("writing {path}: {e}"));
        }
    }
}

fn main() {
    let o = parse_args();
    for name in &o.shapes {
        let shape = SHAPES
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("unknown shape {name}"));
        bench_shape(shape, &o);
    }
}
