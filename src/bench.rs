//! `repshield bench`: end-to-end throughput at real model shapes with seeded random weights,
//! the machine's roofline (f32 FMA peak, streaming read bandwidth) measured in place, and an
//! optional side-by-side run of the same work in PyTorch + transformers
//! (`tools/bench_transformers.py`).
//!
//! FLOPs are model FLOPs: `2 * (matmul parameters touched per token) * tokens` plus causal
//! attention (`4 * head_dim * n_heads` per visible query/key pair: QK^T and PV). The embedding
//! gather, norms, RoPE and SwiGLU are not counted.

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::llama::{generate::argmax, KvCache, Llama, LogitsMode};
use crate::model::{ModelConfig, ModelWeights};
use crate::util::Rng;
use anyhow::{bail, ensure, Context, Result};
use std::path::PathBuf;
use std::time::Instant;

/// Shape names accepted by `--shape`.
pub const SHAPES: &[&str] = &["smollm2", "llama3-8b", "mistral-7b", "qwen2.5-0.5b", "tiny"];

/// Model shapes from the Hugging Face `config.json` of each checkpoint (numbers written in, so
/// benchmarks need no download).
pub fn shape_config(name: &str) -> Result<ModelConfig> {
    let base = |arch: &str| ModelConfig {
        arch: arch.into(),
        vocab_size: 0,
        hidden_size: 0,
        intermediate_size: 0,
        num_layers: 0,
        num_heads: 0,
        num_kv_heads: 0,
        head_dim: 0,
        rms_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        tie_embeddings: false,
        qkv_bias: false,
        max_position: 4096,
        bos_token_id: None,
        eos_token_ids: vec![],
    };
    let cfg = match name {
        // HuggingFaceTB/SmolLM2-135M-Instruct
        "smollm2" | "smollm2-135m" => ModelConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rms_eps: 1e-5,
            rope_theta: 100000.0,
            tie_embeddings: true,
            max_position: 8192,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            ..base("llama")
        },
        // meta-llama/Meta-Llama-3-8B-Instruct
        "llama3-8b" => ModelConfig {
            vocab_size: 128256,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            rms_eps: 1e-5,
            rope_theta: 500000.0,
            max_position: 8192,
            bos_token_id: Some(128000),
            eos_token_ids: vec![128001, 128009],
            ..base("llama")
        },
        // mistralai/Mistral-7B-Instruct-v0.3
        "mistral-7b" => ModelConfig {
            vocab_size: 32768,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            rms_eps: 1e-5,
            rope_theta: 1000000.0,
            max_position: 32768,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            ..base("mistral")
        },
        // Qwen/Qwen2.5-0.5B-Instruct
        "qwen2.5-0.5b" => ModelConfig {
            vocab_size: 151936,
            hidden_size: 896,
            intermediate_size: 4864,
            num_layers: 24,
            num_heads: 14,
            num_kv_heads: 2,
            head_dim: 64,
            rms_eps: 1e-6,
            rope_theta: 1000000.0,
            tie_embeddings: true,
            qkv_bias: true,
            max_position: 32768,
            bos_token_id: Some(151643),
            eos_token_ids: vec![151645],
            ..base("qwen2")
        },
        // A toy shape (the test fixtures' size) for smoke runs of the benchmarks.
        "tiny" => ModelConfig {
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            ..base("llama")
        },
        other => bail!("unknown shape {other:?} (known: {})", SHAPES.join(", ")),
    };
    cfg.validate()?;
    Ok(cfg)
}

// ---------------------------------------------------------------------------------------------
// FLOP and byte counts.

/// Parameters of one layer's seven projections (the matmul work per token).
pub fn layer_matmul_params(cfg: &ModelConfig) -> usize {
    let d = cfg.hidden_size;
    2 * d * cfg.q_dim() + 2 * d * cfg.kv_dim() + 3 * d * cfg.intermediate_size
}

/// Visible query/key pairs of a causal call: `q_len` queries at `start..start + q_len`.
pub fn causal_pairs(start: usize, q_len: usize) -> usize {
    // sum_{t=0}^{q_len-1} (start + t + 1)
    q_len * start + q_len * (q_len + 1) / 2
}

/// Model FLOPs of one forward call of `q_len` tokens after `start` cached ones, with logits for
/// `logit_rows` positions.
pub fn forward_flops(cfg: &ModelConfig, start: usize, q_len: usize, logit_rows: usize) -> f64 {
    let mm = 2.0 * (cfg.num_layers * layer_matmul_params(cfg)) as f64 * q_len as f64
        + 2.0 * (cfg.vocab_size * cfg.hidden_size) as f64 * logit_rows as f64;
    let attn = 4.0
        * (cfg.num_layers * cfg.num_heads * cfg.head_dim) as f64
        * causal_pairs(start, q_len) as f64;
    mm + attn
}

/// Elements of the matrices a single-token decode step streams: every projection weight and
/// the LM head once, and the K and V caches up to `kv_len`.
fn decode_elements(cfg: &ModelConfig, kv_len: usize) -> (usize, usize) {
    let weights = cfg.num_layers * layer_matmul_params(cfg) + cfg.vocab_size * cfg.hidden_size;
    let kv = 2 * cfg.num_layers * cfg.kv_dim() * kv_len;
    (weights, kv)
}

/// Bytes a single-token decode step must read at least on the CPU (everything f32): every
/// projection weight and the LM head once and the K and V caches up to `kv_len`. The embedding
/// row, the norms and the biases are not counted (under 0.1% at the shapes here).
pub fn decode_bytes(cfg: &ModelConfig, kv_len: usize) -> f64 {
    let (weights, kv) = decode_elements(cfg, kv_len);
    4.0 * (weights + kv) as f64
}

/// [`decode_bytes`] for the CUDA backend's storage: the projection weights, the LM head and
/// the K and V caches up to `kv_len` in bf16 (2 bytes), the bf16 embedding row, the f32 side
/// tensors every step reads (2 L + 1 norm weights, the q/k/v biases where the model has them)
/// and the f32 logits, written by the LM head and read by the argmax.
pub fn decode_bytes_bf16(cfg: &ModelConfig, kv_len: usize) -> f64 {
    let (weights, kv) = decode_elements(cfg, kv_len);
    let d = cfg.hidden_size;
    let norms = (2 * cfg.num_layers + 1) * d;
    let biases = if cfg.qkv_bias {
        cfg.num_layers * (cfg.q_dim() + 2 * cfg.kv_dim())
    } else {
        0
    };
    2.0 * (weights + kv + d) as f64 + 4.0 * (norms + biases + 2 * cfg.vocab_size) as f64
}

// ---------------------------------------------------------------------------------------------
// Roofline: f32 FMA peak and read bandwidth, measured on all threads of the rayon pool.

#[derive(Debug, Clone)]
pub struct Peak {
    pub gflops: f64,
    pub threads: usize,
    /// Instruction set used, e.g. "avx512f (16 x f32x16 FMA chains)".
    pub isa: &'static str,
}

/// Independent FMA chains per thread: enough to cover latency x pipes on current x86 cores
/// (4 cycles x 2 pipes on Zen 4/5 and Golden Cove) with room to spare.
const FMA_CHAINS: usize = 16;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains_avx512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(1.0); FMA_CHAINS];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = _mm512_set1_ps(1.0 + i as f32 * 1e-3);
    }
    // acc = acc * a + b converges to b / (1 - a): no overflow, no denormals.
    let a = _mm512_set1_ps(0.999_9);
    let b = _mm512_set1_ps(1e-4);
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in acc {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(1.0); FMA_CHAINS];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = _mm256_set1_ps(1.0 + i as f32 * 1e-3);
    }
    let a = _mm256_set1_ps(0.999_9);
    let b = _mm256_set1_ps(1e-4);
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut out = [0f32; 8];
    let mut s = _mm256_setzero_ps();
    for v in acc {
        s = _mm256_add_ps(s, v);
    }
    _mm256_storeu_ps(out.as_mut_ptr(), s);
    out.iter().sum()
}

fn fma_chains_scalar(iters: u64) -> f32 {
    let mut acc = [1f32; FMA_CHAINS];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = v.mul_add(0.999_9, 1e-4);
        }
    }
    acc.iter().sum()
}

/// Picks the widest FMA this CPU has: returns (lanes, description, kernel).
fn fma_kernel() -> (usize, &'static str, fn(u64) -> f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            return (16, "avx512f vfmadd (16 chains of f32x16)", |n| unsafe {
                fma_chains_avx512(n)
            });
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected at run time.
            return (8, "avx2 vfmadd (16 chains of f32x8)", |n| unsafe {
                fma_chains_avx2(n)
            });
        }
    }
    (1, "scalar f32 mul_add (16 chains)", fma_chains_scalar)
}

/// Measures the f32 FMA peak: every rayon thread runs independent FMA chains of the widest
/// vector width at once; best of several trials of ~0.1 s.
pub fn measure_fma_peak() -> Peak {
    let (lanes, isa, kernel) = fma_kernel();
    let threads = rayon::current_num_threads();
    // Calibrate iterations to ~0.1 s on one thread.
    let mut iters = 1u64 << 16;
    loop {
        let t = Instant::now();
        std::hint::black_box(kernel(std::hint::black_box(iters)));
        if t.elapsed().as_secs_f64() > 0.02 {
            iters = (iters as f64 * 0.1 / t.elapsed().as_secs_f64()) as u64;
            break;
        }
        iters *= 4;
    }
    let mut best = 0f64;
    for _ in 0..5 {
        // Plain scoped threads, one per rayon thread, released together.
        let go = std::sync::Barrier::new(threads + 1);
        let s = std::thread::scope(|sc| {
            for _ in 0..threads {
                sc.spawn(|| {
                    go.wait();
                    std::hint::black_box(kernel(std::hint::black_box(iters)));
                });
            }
            go.wait();
            let t = Instant::now();
            // Scope end joins the threads.
            t
        })
        .elapsed()
        .as_secs_f64();
        let flops = (threads as u64 * iters * (FMA_CHAINS * lanes * 2) as u64) as f64;
        best = best.max(flops / s / 1e9);
    }
    Peak {
        gflops: best,
        threads,
        isa,
    }
}

/// Sum of a slice, as fast as this CPU can stream it (AVX-512 with software prefetch 1 KiB
/// ahead where available: the best a kernel that reads each byte once can do).
fn read_sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected.
        return unsafe { read_sum_avx512(x) };
    }
    x.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read_sum_avx512(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 4];
    let p = x.as_ptr();
    let n = x.len();
    let mut i = 0;
    while i + 64 <= n {
        for (j, a) in acc.iter_mut().enumerate() {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i + 256 + 16 * j) as *const i8);
            *a = _mm512_add_ps(*a, _mm512_loadu_ps(p.add(i + 16 * j)));
        }
        i += 64;
    }
    let tail: f32 = x[i..].iter().sum();
    let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(s) + tail
}

/// Streaming read bandwidth (GB/s) over a buffer far larger than the caches, all threads.
pub fn measure_read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 64 << 20; // 256 MiB of f32
    let buf: Vec<f32> = (0..n).map(|i| (i % 1024) as f32 * 1e-3 + 1.0).collect();
    let mut best = 0f64;
    for _ in 0..4 {
        let t = Instant::now();
        // Contiguous runs of 1 MiB per task, like the row blocks a matvec streams.
        let s: f32 = buf.par_chunks(1 << 18).map(read_sum).sum();
        std::hint::black_box(s);
        best = best.max((n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

// ---------------------------------------------------------------------------------------------
// `repshield bench generate`

#[derive(clap::Subcommand, Debug)]
pub enum BenchCmd {
    /// Prefill and decode throughput at a model shape with random weights (CPU or CUDA),
    /// optionally side by side with transformers.
    Generate(GenerateArgs),
    /// One optimiser step of the triplet objective at a model shape with random weights (CPU
    /// backend), optionally side by side with PyTorch + transformers + peft.
    TrainStep(crate::bench_train::TrainStepArgs),
    /// Every backend op at a model shape with random inputs against its counted floor
    /// (CPU or CUDA), optionally side by side with PyTorch.
    Kernels(crate::bench_kernels::KernelsArgs),
    /// Only measure this machine's f32 FMA peak and read bandwidth.
    Peak,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsArg {
    /// Logits of the last prompt position only (what generation needs).
    Last,
    /// Logits of every prompt position (a training-style forward).
    All,
}

impl LogitsArg {
    pub fn mode(self) -> LogitsMode {
        match self {
            LogitsArg::Last => LogitsMode::Last,
            LogitsArg::All => LogitsMode::All,
        }
    }
    /// Logit rows of a prefill of `prompt_len` tokens.
    pub fn rows(self, prompt_len: usize) -> usize {
        match self {
            LogitsArg::Last => 1,
            LogitsArg::All => prompt_len,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Model shape: smollm2, llama3-8b, mistral-7b, qwen2.5-0.5b.
    #[arg(long, default_value = "smollm2")]
    pub shape: String,
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Timed repetitions (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Which prefill logits to compute (the same on both sides).
    #[arg(long, value_enum, default_value_t = LogitsArg::Last)]
    pub logits: LogitsArg,
    /// Seed of the random weights and prompt.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also run tools/bench_transformers.py with this Python interpreter.
    #[arg(long)]
    pub compare_python: Option<PathBuf>,
    /// Path of bench_transformers.py (default: tools/ of this source tree).
    #[arg(long)]
    pub script: Option<PathBuf>,
    /// Attention implementations to try in transformers (the faster one is reported).
    #[arg(long, default_value = "eager,sdpa")]
    pub python_attn: String,
    /// Skip the measurement of the FMA peak and bandwidth.
    #[arg(long)]
    pub no_peak: bool,
    /// Also print where the time goes: one more prefill and decode run with every backend op
    /// timed (adds a little overhead per op; CPU only).
    #[arg(long)]
    pub profile: bool,
    /// cpu, cuda, or auto (CUDA when a GPU and compiled kernels are present). On CUDA the
    /// model runs in bf16 storage and transformers runs bf16 on the same GPU.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Peak dense bf16 FLOP/s of the GPU in TFLOP/s for the prefill's share of peak (default:
    /// a table of known GPUs by name).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Generate(a) => bench_generate(&a).map(|_| ()),
        BenchCmd::TrainStep(a) => crate::bench_train::bench_train_step(&a),
        BenchCmd::Kernels(a) => crate::bench_kernels::bench_kernels(&a),
        BenchCmd::Peak => {
            let p = measure_fma_peak();
            println!(
                "f32 FMA peak: {:.1} GFLOP/s on {} threads ({})",
                p.gflops, p.threads, p.isa
            );
            println!("read bandwidth: {:.1} GB/s", measure_read_bandwidth());
            Ok(())
        }
    }
}

pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn spread(xs: &[f64]) -> String {
    let lo = xs.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().cloned().fold(0f64, f64::max);
    format!("min {:.3}s max {:.3}s", lo, hi)
}

/// Results of one `bench generate` run (our engine; the transformers side as parsed JSON).
#[derive(Debug, Clone)]
pub struct GenerateReport {
    /// `cpu` or `cuda`.
    pub device: &'static str,
    pub prefill_tok_s: f64,
    pub prefill_gflops: f64,
    pub decode_tok_s: f64,
    pub decode_gbs: f64,
    /// The CPU's measured FMA peak (the CUDA run uses a data-sheet peak instead).
    pub peak: Option<Peak>,
    /// The CPU's read bandwidth or the GPU's device-to-device copy bandwidth, GB/s.
    pub bandwidth_gbs: Option<f64>,
    /// Kernel launches of the CUDA run (none on the CPU).
    pub launches: Option<Launches>,
    pub python: Option<serde_json::Value>,
}

/// Kernel launches of one prefill and of one decode token (the forward and its argmax).
#[derive(Debug, Clone, Copy)]
pub struct Launches {
    pub prefill: u64,
    pub decode_per_token: f64,
}

/// Wall-clock times of the repeats (seconds) and the launches of the last one.
struct GenerateTimes {
    prefill_s: Vec<f64>,
    decode_s: Vec<f64>,
    prefill_launches: u64,
    decode_launches: u64,
}

/// Greedy choice from the last row of `[rows, vocab]` logits, on the device: only the id comes
/// back to the host.
fn last_row_argmax<B: Backend>(be: &B, logits: &B::Buf, vocab: usize) -> Result<u32> {
    let rows = be.len(logits) / vocab;
    ensure!(rows > 0, "no logits to choose a token from");
    if rows == 1 {
        return Ok(be.argmax_rows(logits, vocab)?[0]);
    }
    let mut last = be.alloc_f32(vocab)?;
    be.gather_rows(logits, &[rows as u32 - 1], vocab, &mut last, 0);
    Ok(be.argmax_rows(&last, vocab)?[0])
}

/// One warm-up, then `repeats` times: a prefill of `prompt` in a fresh cache and
/// `decode_tokens` greedy steps after it, each timed by the wall clock between two
/// synchronizations of the device. A decode step chooses its token with
/// [`Backend::argmax_rows`] on the last position's logits and downloads that one id, so the
/// loop is synchronous per token by nature: the next step's input is the id on the host.
/// `launches` reads the device's kernel launch counter (a constant where there is none).
fn time_generate<B: Backend>(
    model: &Llama<B>,
    prompt: &[u32],
    logits: LogitsMode,
    decode_tokens: usize,
    repeats: usize,
    launches: &dyn Fn() -> u64,
) -> Result<GenerateTimes> {
    let be = &model.backend;
    let vocab = model.cfg.vocab_size;
    let capacity = prompt.len() + decode_tokens;
    let prefill = |cache: &mut KvCache<B>| -> Result<(f64, u64, u32)> {
        be.synchronize()?;
        let n0 = launches();
        let t = Instant::now();
        let out = model.forward(prompt, 1, cache, None, &[], logits)?;
        be.synchronize()?;
        let s = t.elapsed().as_secs_f64();
        let n = launches() - n0;
        let logits = out.logits.context("prefill returned no logits")?;
        Ok((s, n, last_row_argmax(be, &logits, vocab)?))
    };
    let step = |cache: &mut KvCache<B>, next: u32| -> Result<u32> {
        let out = model.forward(&[next], 1, cache, None, &[], LogitsMode::Last)?;
        let logits = out.logits.context("decode returned no logits")?;
        Ok(be.argmax_rows(&logits, vocab)?[0])
    };
    // Warm-up: page in the weights, spin up the thread pool or load the kernels, size buffers.
    let mut cache = model.new_cache(1, capacity)?;
    let (_, _, next) = prefill(&mut cache)?;
    if decode_tokens > 0 {
        step(&mut cache, next)?;
    }
    let mut t = GenerateTimes {
        prefill_s: Vec::new(),
        decode_s: Vec::new(),
        prefill_launches: 0,
        decode_launches: 0,
    };
    for _ in 0..repeats {
        let mut cache = model.new_cache(1, capacity)?;
        let (s, n, mut next) = prefill(&mut cache)?;
        t.prefill_s.push(s);
        t.prefill_launches = n;
        be.synchronize()?;
        let n0 = launches();
        let t0 = Instant::now();
        for _ in 0..decode_tokens {
            next = step(&mut cache, next)?;
        }
        // The last argmax download waited for the last step.
        t.decode_s.push(t0.elapsed().as_secs_f64());
        t.decode_launches = launches() - n0;
    }
    Ok(t)
}

/// Seconds of `decode_tokens` replayed decode steps after a prefill of `prompt`, `repeats`
/// times (after one untimed run): `generate` with its default CUDA graph replay, timed from
/// the third token's arrival (the first comes from the prefill, the second from the op-by-op
/// step, and the step is recorded after it) to the last, each interval one replay and the
/// 8-byte read of its token.
#[cfg(feature = "cuda")]
fn time_replayed_decode(
    model: &Llama<crate::backend::cuda::CudaBackend>,
    prompt: &[u32],
    decode_tokens: usize,
    repeats: usize,
) -> Result<Vec<f64>> {
    let opts = crate::llama::GenerateOptions {
        max_new_tokens: decode_tokens + 3,
        sampling: crate::llama::Sampling::Greedy,
        stop_tokens: vec![],
        replay: true,
    };
    let mut out = Vec::with_capacity(repeats);
    for rep in 0..=repeats {
        let mut arrivals = Vec::with_capacity(opts.max_new_tokens);
        let toks = crate::llama::generate(model, prompt, &opts, |_| {
            arrivals.push(Instant::now());
            Ok(())
        })?;
        ensure!(
            toks.len() == opts.max_new_tokens,
            "replayed decode stopped early"
        );
        if rep > 0 {
            out.push((arrivals[arrivals.len() - 1] - arrivals[2]).as_secs_f64());
        }
    }
    Ok(out)
}

/// How one device's figures are stated: the table's column, the FLOP unit, the peak and the
/// bandwidth the decode is set against, and what a decode token must read.
struct Roofline {
    device: &'static str,
    /// FLOPs per unit (1e9: GFLOP, 1e12: TFLOP), its name, and the decimals printed.
    flop_unit: (f64, &'static str, usize),
    /// Peak in `flop_unit` per second.
    peak: Option<f64>,
    bandwidth_gbs: Option<f64>,
    bandwidth_name: &'static str,
    /// Bytes one decode token reads at this KV length ([`decode_bytes`] or
    /// [`decode_bytes_bf16`]).
    decode_bytes: fn(&ModelConfig, usize) -> f64,
}

/// The figures derived from the times.
struct Figures {
    prefill_flops: f64,
    prefill_tok_s: f64,
    /// Prefill rate in the roofline's FLOP unit per second.
    prefill_rate: f64,
    decode_tok_s: f64,
    decode_gbs: f64,
    /// Read by the CUDA run's floor line.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    decode_bytes_total: f64,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    decode_s: f64,
}

fn random_prompt(cfg: &ModelConfig, seed: u64, len: usize) -> Vec<u32> {
    let mut rng = Rng::new(seed ^ 0x5eed);
    (0..len)
        .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
        .collect()
}

/// Prints repshield's prefill and decode lines.
fn print_ours(
    a: &GenerateArgs,
    cfg: &ModelConfig,
    roof: &Roofline,
    t: &GenerateTimes,
    logit_rows: usize,
) -> Figures {
    let (unit, uname, prec) = roof.flop_unit;
    let pf = median(&t.prefill_s);
    let dc = median(&t.decode_s);
    let prefill_flops = forward_flops(cfg, 0, a.prompt_len, logit_rows);
    let decode_flops: f64 = (0..a.decode_tokens)
        .map(|i| forward_flops(cfg, a.prompt_len + i, 1, 1))
        .sum();
    let decode_bytes_total: f64 = (0..a.decode_tokens)
        .map(|i| (roof.decode_bytes)(cfg, a.prompt_len + i + 1))
        .sum();
    let prefill_tok_s = a.prompt_len as f64 / pf;
    let prefill_rate = prefill_flops / pf / unit;
    let decode_tok_s = if a.decode_tokens > 0 {
        a.decode_tokens as f64 / dc
    } else {
        0.0
    };
    let decode_gbs = decode_bytes_total / dc / 1e9;
    println!(
        "repshield prefill: {prefill_tok_s:.1} tok/s, median {pf:.3}s ({}), {:.prec$} {uname}/{pf:.3}s = {prefill_rate:.prec$} {uname}/s{}",
        spread(&t.prefill_s),
        prefill_flops / unit,
        roof.peak
            .map(|p| format!(" = {:.1}% of peak", 100.0 * prefill_rate / p))
            .unwrap_or_default()
    );
    if a.decode_tokens > 0 {
        println!(
            "repshield decode:  {decode_tok_s:.1} tok/s, median {dc:.3}s for {} tokens ({}), {:.prec$} {uname}/s, weights+KV {:.1} GB/s{}",
            a.decode_tokens,
            spread(&t.decode_s),
            decode_flops / dc / unit,
            decode_gbs,
            roof.bandwidth_gbs
                .map(|b| format!(" = {:.0}% of {}", 100.0 * decode_gbs / b, roof.bandwidth_name))
                .unwrap_or_default()
        );
    }
    Figures {
        prefill_flops,
        prefill_tok_s,
        prefill_rate,
        decode_tok_s,
        decode_gbs,
        decode_bytes_total,
        decode_s: dc,
    }
}

/// The side-by-side markdown table; `extra` rows (already formatted) go after the decode rows.
fn print_table(
    a: &GenerateArgs,
    roof: &Roofline,
    f: &Figures,
    python: Option<&serde_json::Value>,
    extra: &[String],
) {
    let (unit, uname, prec) = roof.flop_unit;
    println!();
    println!(
        "| metric | repshield ({}) | transformers | ratio |",
        roof.device
    );
    println!("|---|---|---|---|");
    let py_num = |k: &str| python.and_then(|p| p.get(k)).and_then(|v| v.as_f64());
    let py_str = |k: &str| {
        python
            .and_then(|p| p.get(k))
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let row = |name: &str, ours: f64, theirs: Option<f64>, note: String| {
        match theirs {
            Some(t) => println!(
                "| {name} | {ours:.1} | {t:.1}{note} | {:.2}x |",
                ours / t.max(1e-12)
            ),
            None => println!("| {name} | {ours:.1} | - | - |"),
        };
    };
    row(
        &format!("prefill tok/s ({} tokens)", a.prompt_len),
        f.prefill_tok_s,
        py_num("prefill_tok_s"),
        format!(" ({})", py_str("prefill_attn")),
    );
    let peak_note = |tok_s: Option<f64>| match (roof.peak, tok_s) {
        (Some(p), Some(ts)) => {
            let g = f.prefill_flops / (a.prompt_len as f64 / ts) / unit;
            format!("{g:.prec$} ({:.1}%)", 100.0 * g / p)
        }
        _ => "-".into(),
    };
    println!(
        "| prefill {uname}/s (% of {} peak) | {} | {} | |",
        roof.peak
            .map(|p| format!("{p:.0} {uname}/s"))
            .unwrap_or_else(|| "unmeasured".into()),
        peak_note(Some(f.prefill_tok_s)),
        peak_note(py_num("prefill_tok_s"))
    );
    if a.decode_tokens > 0 {
        row(
            &format!("decode tok/s ({} tokens after the prompt)", a.decode_tokens),
            f.decode_tok_s,
            py_num("decode_tok_s"),
            format!(" ({}, manual loop)", py_str("decode_attn")),
        );
        if let Some(g) = py_num("generate_decode_tok_s") {
            println!(
                "| decode tok/s, transformers model.generate | | {g:.1} | {:.2}x |",
                f.decode_tok_s / g
            );
        }
    }
    for r in extra {
        println!("{r}");
    }
}

pub fn bench_generate(a: &GenerateArgs) -> Result<GenerateReport> {
    ensure!(a.prompt_len > 0, "--prompt-len must be positive");
    ensure!(a.repeats > 0, "--repeats must be positive");
    let cfg = shape_config(&a.shape)?;
    if crate::backend::cuda::pick_device(&a.device)? {
        #[cfg(feature = "cuda")]
        return bench_generate_cuda(a, &cfg);
        #[cfg(not(feature = "cuda"))]
        unreachable!("pick_device never chooses CUDA without the feature")
    }
    let threads = rayon::current_num_threads();
    let cpu = cpu_model();
    println!(
        "# repshield bench generate: shape {} ({:.1} M params), prompt {} tokens, decode {} tokens, {} repeats",
        a.shape,
        cfg.param_count() as f64 / 1e6,
        a.prompt_len,
        a.decode_tokens,
        a.repeats
    );
    println!("cpu: {cpu}, {threads} rayon threads");

    let (peak, bw) = if a.no_peak {
        (None, None)
    } else {
        let p = measure_fma_peak();
        let bw = measure_read_bandwidth();
        println!(
            "f32 FMA peak: {:.1} GFLOP/s ({}, all {} threads at once, best of 5)",
            p.gflops, p.isa, p.threads
        );
        println!("read bandwidth: {bw:.1} GB/s (sum of 256 MiB of f32, AVX-512 loads + prefetch, all threads, best of 4)");
        (Some(p), Some(bw))
    };

    let t = Instant::now();
    let weights = ModelWeights::random(&cfg, a.seed);
    let model = Llama::new(CpuBackend, &cfg, &weights)?;
    let weights = a.profile.then_some(weights);
    println!(
        "random weights (seed {}) built in {:.1}s",
        a.seed,
        t.elapsed().as_secs_f64()
    );
    let prompt = random_prompt(&cfg, a.seed, a.prompt_len);
    let logits_mode = a.logits.mode();
    let logit_rows = a.logits.rows(a.prompt_len);
    let capacity = a.prompt_len + a.decode_tokens;

    // All model work runs on a pool thread (see `cpu::on_pool`), as every `repshield` command does.
    let times = crate::backend::cpu::on_pool(|| {
        time_generate(
            &model,
            &prompt,
            logits_mode,
            a.decode_tokens,
            a.repeats,
            &|| 0,
        )
    })?;
    let roof = Roofline {
        device: "cpu",
        flop_unit: (1e9, "GFLOP", 1),
        peak: peak.as_ref().map(|p| p.gflops),
        bandwidth_gbs: bw,
        bandwidth_name: "read bandwidth",
        decode_bytes,
    };
    let f = print_ours(a, &cfg, &roof, &times, logit_rows);

    if let Some(w) = &weights {
        crate::backend::cpu::on_pool(|| {
            profile_ops(&cfg, w, &prompt, logits_mode, capacity, a.decode_tokens)
        })?;
    }

    let python = match &a.compare_python {
        None => None,
        Some(py) => Some(run_python(py, a, &cfg, threads, logit_rows, false)?),
    };
    print_table(a, &roof, &f, python.as_ref(), &[]);
    Ok(GenerateReport {
        device: "cpu",
        prefill_tok_s: f.prefill_tok_s,
        prefill_gflops: f.prefill_rate,
        decode_tok_s: f.decode_tok_s,
        decode_gbs: f.decode_gbs,
        peak,
        bandwidth_gbs: bw,
        launches: None,
        python,
    })
}

/// `bench generate --device cuda`: the same protocol on the GPU, bf16 weights and KV cache,
/// the prefill's TFLOP/s against the data-sheet bf16 peak, decode's bytes against the measured
/// copy bandwidth, and the kernel launches per prefill and per decode token.
#[cfg(feature = "cuda")]
fn bench_generate_cuda(a: &GenerateArgs, cfg: &ModelConfig) -> Result<GenerateReport> {
    use crate::backend::cuda::CudaBackend;
    ensure!(
        !a.profile,
        "--profile times the CPU backend's ops; on the GPU, `bench kernels --device cuda` times each op"
    );
    let be = CudaBackend::new(0)?;
    let name = be.name();
    println!(
        "# repshield bench generate: shape {} ({:.1} M params), prompt {} tokens, decode {} tokens, {} repeats, bf16 on the GPU",
        a.shape,
        cfg.param_count() as f64 / 1e6,
        a.prompt_len,
        a.decode_tokens,
        a.repeats
    );
    println!("device: {name}");
    let peak = a
        .peak_tflops
        .or_else(|| crate::bench_kernels::known_peak_tflops(&name));
    match (a.peak_tflops, peak) {
        (Some(p), _) => println!("bf16 peak: {p:.1} TFLOP/s (--peak-tflops)"),
        (None, Some(p)) => println!("bf16 peak: {p:.1} TFLOP/s (dense, data sheet)"),
        (None, None) => println!("bf16 peak: unknown for this device (pass --peak-tflops)"),
    }
    let bw = if a.no_peak {
        None
    } else {
        let bw = be.copy_bandwidth_gbs()?;
        println!("copy bandwidth: {bw:.1} GB/s (device-to-device copy, bytes read + written, median of 10)");
        Some(bw)
    };

    let t = Instant::now();
    let weights = ModelWeights::random(cfg, a.seed);
    let model = Llama::new(be.clone(), cfg, &weights)?;
    drop(weights);
    println!(
        "random weights (seed {}) built and uploaded in {:.1}s",
        a.seed,
        t.elapsed().as_secs_f64()
    );
    let prompt = random_prompt(cfg, a.seed, a.prompt_len);
    let logit_rows = a.logits.rows(a.prompt_len);
    let mut times = time_generate(
        &model,
        &prompt,
        a.logits.mode(),
        a.decode_tokens,
        a.repeats,
        &|| be.launches(),
    )?;
    // The headline decode is `generate`'s default, the CUDA graph replay; op by op beside it.
    let op_by_op_s = median(&times.decode_s);
    if a.decode_tokens > 0 {
        times.decode_s = time_replayed_decode(&model, &prompt, a.decode_tokens, a.repeats)?;
    }
    let roof = Roofline {
        device: "cuda",
        flop_unit: (1e12, "TFLOP", 3),
        peak,
        bandwidth_gbs: bw,
        bandwidth_name: "copy bandwidth",
        decode_bytes: decode_bytes_bf16,
    };
    let f = print_ours(a, cfg, &roof, &times, logit_rows);
    let launches = Launches {
        prefill: times.prefill_launches,
        decode_per_token: times.decode_launches as f64 / a.decode_tokens.max(1) as f64,
    };
    let mut extra = Vec::new();
    if a.decode_tokens > 0 {
        let per_token = f.decode_bytes_total / a.decode_tokens as f64;
        print!(
            "decode floor: {:.1} MB per token (bf16 weights and KV cache, f32 norms and logits)",
            per_token / 1e6
        );
        if let Some(b) = bw {
            let floor_s = f.decode_bytes_total / (b * 1e9);
            println!(
                " / copy bandwidth = {:.3} ms per token; measured {:.3} ms = {:.0}% of the floor's rate",
                1e3 * floor_s / a.decode_tokens as f64,
                1e3 * f.decode_s / a.decode_tokens as f64,
                100.0 * floor_s / f.decode_s
            );
            extra.push(format!(
                "| decode GB/s (% of {b:.0} GB/s copy bandwidth) | {:.1} ({:.0}%) | | |",
                f.decode_gbs,
                100.0 * f.decode_gbs / b
            ));
        } else {
            println!();
        }
        extra.push(format!(
            "| decode tok/s, op by op (`--no-cuda-graph`) | {:.1} | | |",
            a.decode_tokens as f64 / op_by_op_s
        ));
        extra.push(format!(
            "| kernel launches per decode token (one CUDA graph) | {:.1} | | |",
            launches.decode_per_token
        ));
    }
    println!(
        "kernel launches: {} per prefill of {} tokens, {:.1} per decode token (forward + argmax), queued op by op or as one CUDA graph replay; decode reads 8 bytes back per token (each step's token and position stay on the device, the host checks them for stop tokens)",
        launches.prefill, a.prompt_len, launches.decode_per_token
    );
    if a.decode_tokens > 0 {
        println!(
            "decode op by op: {:.1} tok/s (median {op_by_op_s:.3}s); replayed: {:.1} tok/s",
            a.decode_tokens as f64 / op_by_op_s,
            f.decode_tok_s
        );
    }
    extra.push(format!(
        "| kernel launches per prefill | {} | | |",
        launches.prefill
    ));

    let python = match &a.compare_python {
        None => None,
        Some(py) => Some(run_python(
            py,
            a,
            cfg,
            rayon::current_num_threads(),
            logit_rows,
            true,
        )?),
    };
    print_table(a, &roof, &f, python.as_ref(), &extra);
    Ok(GenerateReport {
        device: "cuda",
        prefill_tok_s: f.prefill_tok_s,
        prefill_gflops: f.prefill_rate * 1e3,
        decode_tok_s: f.decode_tok_s,
        decode_gbs: f.decode_gbs,
        peak: None,
        bandwidth_gbs: bw,
        launches: Some(launches),
        python,
    })
}

/// Runs a tools/ benchmark script (`default_script` under this source tree unless `script` is
/// given) with `args` and the shape as a Hugging Face config, and returns the JSON object it
/// prints last on stdout (its stderr passes through).
pub fn run_python_json(
    py: &PathBuf,
    script: Option<&PathBuf>,
    default_script: &str,
    cfg: &ModelConfig,
    threads: usize,
    args: &[(&str, String)],
) -> Result<serde_json::Value> {
    let script = script.cloned().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tools")
            .join(default_script)
    });
    ensure!(
        script.is_file(),
        "benchmark script {} not found (pass --script)",
        script.display()
    );
    println!(
        "running {} {} (torch threads = {threads}) ...",
        py.display(),
        script.display()
    );
    let mut cmd = std::process::Command::new(py);
    cmd.arg(&script)
        .arg("--config-json")
        .arg(cfg.to_hf_json().to_string())
        .args(["--threads", &threads.to_string()]);
    for (k, v) in args {
        cmd.arg(k).arg(v);
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", py.display()))?;
    ensure!(
        out.status.success(),
        "{} {} failed ({})",
        py.display(),
        script.display(),
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{} printed no JSON", script.display()))?;
    serde_json::from_str(line).with_context(|| format!("parsing {} output", script.display()))
}

fn run_python(
    py: &PathBuf,
    a: &GenerateArgs,
    cfg: &ModelConfig,
    threads: usize,
    logit_rows: usize,
    cuda: bool,
) -> Result<serde_json::Value> {
    let v = run_python_json(
        py,
        a.script.as_ref(),
        "bench_transformers.py",
        cfg,
        threads,
        &[
            ("--prompt-len", a.prompt_len.to_string()),
            ("--decode-tokens", a.decode_tokens.to_string()),
            ("--repeats", a.repeats.to_string()),
            ("--seed", a.seed.to_string()),
            (
                "--logits",
                if logit_rows == 1 { "last" } else { "all" }.into(),
            ),
            ("--attn", a.python_attn.clone()),
            ("--device", if cuda { "cuda" } else { "cpu" }.into()),
        ],
    )?;
    let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
    let on = if cuda { "device" } else { "cpu_capability" };
    println!(
        "transformers {} (torch {}, {} threads, {}): prefill {:.1} tok/s ({} attention), decode {:.1} tok/s ({} attention, manual loop), model.generate decode {:.1} tok/s",
        v["transformers"].as_str().unwrap_or("?"),
        v["torch"].as_str().unwrap_or("?"),
        v["threads"],
        v[on].as_str().unwrap_or("?"),
        f("prefill_tok_s"),
        v["prefill_attn"].as_str().unwrap_or("?"),
        f("decode_tok_s"),
        v["decode_attn"].as_str().unwrap_or("?"),
        f("generate_decode_tok_s"),
    );
    if let Some(runs) = v["runs"].as_array() {
        for r in runs {
            let g = |k: &str| r.get(k).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
            println!(
                "  transformers {:>5}: prefill {:.1} tok/s, decode {:.1} tok/s, generate decode {:.1} tok/s",
                r["attn_implementation"].as_str().unwrap_or("?"),
                g("prefill_tok_s"),
                g("decode_tok_s"),
                g("generate_decode_tok_s")
            );
        }
    }
    Ok(v)
}

/// `lscpu`'s model name (from /proc/cpuinfo), or "unknown".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|x| x.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

// ---------------------------------------------------------------------------------------------
// Per-op profile: the CPU backend behind a wrapper that times every call.

/// [`CpuBackend`] with a stopwatch per op kind (name, matmul shape) for `--profile`.
#[derive(Default)]
pub struct TimedCpu {
    times: std::sync::Mutex<std::collections::BTreeMap<String, (u32, f64)>>,
}

impl TimedCpu {
    fn time<R>(&self, key: impl FnOnce() -> String, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        let s = t.elapsed().as_secs_f64();
        let mut m = self.times.lock().unwrap();
        let e = m.entry(key()).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += s;
        r
    }
    fn take(&self) -> Vec<(String, u32, f64)> {
        let mut v: Vec<_> = std::mem::take(&mut *self.times.lock().unwrap())
            .into_iter()
            .map(|(k, (n, s))| (k, n, s))
            .collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }
}

impl crate::backend::Backend for TimedCpu {
    type Buf = Vec<f32>;
    fn name(&self) -> String {
        format!("timed {}", CpuBackend.name())
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        CpuBackend.upload(data)
    }
    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        self.time(|| "alloc".into(), || CpuBackend.alloc(len))
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        self.time(|| "download".into(), || CpuBackend.download(buf))
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn embedding(&self, table: &Vec<f32>, ids: &[u32], dim: usize, out: &mut Vec<f32>) {
        self.time(
            || "embedding".into(),
            || CpuBackend.embedding(table, ids, dim, out),
        )
    }
    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, dim: usize, eps: f32, out: &mut Vec<f32>) {
        self.time(
            || "rmsnorm".into(),
            || CpuBackend.rmsnorm(x, w, dim, eps, out),
        )
    }
    fn add_rmsnorm(
        &self,
        residual: &mut Vec<f32>,
        delta: &Vec<f32>,
        w: &Vec<f32>,
        dim: usize,
        eps: f32,
        out: &mut Vec<f32>,
    ) {
        self.time(
            || "add_rmsnorm".into(),
            || CpuBackend.add_rmsnorm(residual, delta, w, dim, eps, out),
        )
    }
    fn matmul(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        out: &mut Vec<f32>,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
        accumulate: bool,
    ) {
        self.time(
            || format!("matmul m{m} n{n} k{k}"),
            || CpuBackend.matmul(x, w, out, m, n, k, scale, accumulate),
        )
    }
    fn add_bias(&self, x: &mut Vec<f32>, bias: &Vec<f32>) {
        self.time(|| "add_bias".into(), || CpuBackend.add_bias(x, bias))
    }
    fn rope(
        &self,
        x: &mut Vec<f32>,
        batch: usize,
        seq_len: usize,
        n_heads: usize,
        head_dim: usize,
        start_pos: usize,
        inv_freq: &Vec<f32>,
    ) {
        self.time(
            || "rope".into(),
            || CpuBackend.rope(x, batch, seq_len, n_heads, head_dim, start_pos, inv_freq),
        )
    }
    fn kv_store(
        &self,
        k: &Vec<f32>,
        v: &Vec<f32>,
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
        shape: crate::backend::AttnShape,
    ) {
        self.time(
            || "kv_store".into(),
            || CpuBackend.kv_store(k, v, k_cache, v_cache, shape),
        )
    }
    fn attention(
        &self,
        q: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        key_mask: Option<&Vec<f32>>,
        out: &mut Vec<f32>,
        shape: crate::backend::AttnShape,
    ) {
        self.time(
            || {
                if shape.q_len == 1 {
                    "attention q1 (decode)".into()
                } else {
                    format!("attention q{} kv{}", shape.q_len, shape.kv_len())
                }
            },
            || CpuBackend.attention(q, k_cache, v_cache, key_mask, out, shape),
        )
    }
    fn dropout(&self, x: &Vec<f32>, out: &mut Vec<f32>, p: f32, seed: u64) {
        self.time(|| "dropout".into(), || CpuBackend.dropout(x, out, p, seed))
    }
    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>) {
        self.time(|| "swiglu".into(), || CpuBackend.swiglu(gate, up, out))
    }
    fn gather_rows(
        &self,
        src: &Vec<f32>,
        src_rows: &[u32],
        dim: usize,
        dst: &mut Vec<f32>,
        dst_row: usize,
    ) {
        self.time(
            || "gather_rows".into(),
            || CpuBackend.gather_rows(src, src_rows, dim, dst, dst_row),
        )
    }
}

/// One prefill and `decode_tokens` decode steps on a [`TimedCpu`] copy of the model; prints the
/// time per op kind against the wall time of the forward calls.
fn profile_ops(
    cfg: &ModelConfig,
    weights: &ModelWeights,
    prompt: &[u32],
    logits: LogitsMode,
    capacity: usize,
    decode_tokens: usize,
) -> Result<()> {
    let timed = Llama::new(TimedCpu::default(), cfg, weights)?;
    let report = |what: &str, wall: f64, ops: Vec<(String, u32, f64)>| {
        let total: f64 = ops.iter().map(|o| o.2).sum();
        println!(
            "\nprofile of one {what}: wall {:.2} ms, in ops {:.2} ms ({:.0}%)",
            wall * 1e3,
            total * 1e3,
            100.0 * total / wall
        );
        for (name, n, s) in ops {
            println!(
                "  {:<28} {:>6} calls {:>9.3} ms {:>5.1}%",
                name,
                n,
                s * 1e3,
                100.0 * s / wall
            );
        }
    };
    for pass in 0..2 {
        let mut cache = timed.new_cache(1, capacity)?;
        timed.backend.take();
        let t = Instant::now();
        let out = timed.forward(prompt, 1, &mut cache, None, &[], logits)?;
        let wall = t.elapsed().as_secs_f64();
        let logits = out.logits.context("no logits")?;
        let mut next = argmax(&logits[logits.len() - cfg.vocab_size..]);
        if pass == 1 {
            report(
                &format!("prefill ({} tokens)", prompt.len()),
                wall,
                timed.backend.take(),
            );
        }
        if decode_tokens == 0 {
            continue;
        }
        timed.backend.take();
        let t = Instant::now();
        for _ in 0..decode_tokens {
            let out = timed.forward(&[next], 1, &mut cache, None, &[], LogitsMode::Last)?;
            next = argmax(out.logits.as_ref().context("no logits")?);
        }
        let wall = t.elapsed().as_secs_f64();
        if pass == 1 {
            report(
                &format!("decode ({decode_tokens} tokens)"),
                wall,
                timed.backend.take(),
            );
        }
    }
    Ok(())
}
