//! `repshield bench train-step`: one optimiser step of the triplet objective (forward of the
//! tuned and frozen model on the benign, harmful and retain batches, the loss, the backward to
//! every LoRA factor, AdamW in place) at a real model shape with random weights, side by side
//! with the identical step in PyTorch + transformers + peft (tools/bench_train_step.py).

use crate::backend::cpu::CpuBackend;
use crate::backend::BackwardOps;
use crate::bench::{median, run_python_json, shape_config};
use crate::llama::{Llama, LoraAdapter, LoraConfig, LoraGrads, LoraModule};
use crate::model::{ModelConfig, ModelWeights};
use crate::train::adamw::{LoraOptimizer, Moments};
use crate::train::data::TokenBatch;
use crate::train::step::FrozenInputs;
use crate::train::trainer::{objective_step, TrainConfig};
use crate::util::Rng;
use anyhow::{ensure, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct TrainStepArgs {
    /// Model shape: smollm2, llama3-8b, mistral-7b, qwen2.5-0.5b.
    #[arg(long, default_value = "smollm2")]
    pub shape: String,
    /// Sequences per set (benign, harmful and retain each).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    pub response_len: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Timed steps (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Per-block activation recompute (less memory, one more forward per block).
    #[arg(long)]
    pub recompute: bool,
    /// Also run tools/bench_train_step.py with this Python interpreter.
    #[arg(long)]
    pub compare_python: Option<PathBuf>,
    /// Path of bench_train_step.py (default: tools/ of this source tree).
    #[arg(long)]
    pub script: Option<PathBuf>,
    /// Attention implementations to try in transformers (the faster one is reported).
    #[arg(long, default_value = "eager,sdpa")]
    pub python_attn: String,
    /// cpu, cuda, or auto (CUDA when a GPU and compiled kernels are present). On CUDA the
    /// step runs in bf16 storage and PyTorch runs bf16 on the same GPU.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Peak dense bf16 FLOP/s of the GPU in TFLOP/s for the MFU (default: a table of known
    /// GPUs by name).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
}

/// Model FLOPs of one triplet step: per set, a tuned forward, a frozen forward and the
/// backward to the activations (2 N per token each for the projections; the frozen weights
/// get no weight gradient), the causal attention likewise (its backward counted as twice the
/// forward), logits on the retain set only; LoRA's own FLOPs are not counted.
pub fn triplet_step_flops(cfg: &ModelConfig, batch: usize, seq: usize) -> f64 {
    let per_seq_fwd = crate::bench::forward_flops(cfg, 0, seq, 0);
    let logits = 2.0 * (cfg.vocab_size * cfg.hidden_size * seq) as f64;
    let attn = 4.0
        * (cfg.num_layers * cfg.num_heads * cfg.head_dim) as f64
        * crate::bench::causal_pairs(0, seq) as f64;
    // (tuned + frozen + backward) forwards, the backward's attention one forward more.
    let per_set = 3.0 * per_seq_fwd + attn;
    batch as f64 * (3.0 * per_set + 3.0 * logits)
}

/// Peak resident memory of this process (Linux VmHWM), bytes.
fn peak_rss() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What one device's run reports.
struct StepRun {
    times: Vec<f64>,
    device: String,
    peak_bytes: Option<usize>,
    peak_tflops: Option<f64>,
}

/// A set of `batch` random sequences: `prompt` prompt tokens then `response` response tokens,
/// no padding (every row full, so both engines do exactly the same work).
fn random_set(
    cfg: &ModelConfig,
    batch: usize,
    prompt: usize,
    response: usize,
    rng: &mut Rng,
) -> TokenBatch {
    let seq = prompt + response;
    let input_ids = (0..batch * seq)
        .map(|_| (rng.uniform() * cfg.vocab_size as f32) as u32 % cfg.vocab_size as u32)
        .collect();
    let row = |f: &dyn Fn(usize) -> bool| -> Vec<f32> {
        (0..batch * seq).map(|i| f(i % seq) as u8 as f32).collect()
    };
    TokenBatch {
        batch,
        seq,
        input_ids,
        attention_mask: vec![1.0; batch * seq],
        prompt_mask: row(&|t| t < prompt),
        response_mask: row(&|t| t >= prompt),
        last_prompt_index: vec![prompt - 1; batch],
    }
}

pub fn bench_train_step(a: &TrainStepArgs) -> Result<()> {
    ensure!(a.repeats > 0 && a.batch > 0 && a.prompt_len > 0 && a.response_len > 0);
    let cfg = shape_config(&a.shape)?;
    let threads = rayon::current_num_threads();
    let tc = TrainConfig {
        rank: a.rank,
        alpha: a.rank as f32,
        ..Default::default()
    };
    let mut targets = tc.targets(&cfg);
    if targets.is_empty() {
        // Too shallow for the default target band (the toy shape): the last hidden state.
        targets.push(cfg.num_layers);
    }
    let lora_layers = tc.lora_layers(&cfg);
    println!(
        "# repshield bench train-step: shape {}, triplet, batch {} x ({}+{}) tokens per set (benign, harmful, retain), LoRA rank {} on all 7 projections of {} blocks, targets {:?}, {} repeats, cpu {} threads{}",
        a.shape,
        a.batch,
        a.prompt_len,
        a.response_len,
        a.rank,
        lora_layers.len(),
        targets,
        a.repeats,
        threads,
        if a.recompute { ", per-block recompute" } else { "" }
    );
    let t = Instant::now();
    let weights = ModelWeights::random(&cfg, a.seed);
    println!("random weights built in {:.1}s", t.elapsed().as_secs_f64());
    let run = if crate::backend::cuda::pick_device(&a.device)? {
        #[cfg(feature = "cuda")]
        {
            let be = crate::backend::cuda::CudaBackend::new(0)?;
            let name = crate::backend::Backend::name(&be);
            let model = Llama::new(be.clone(), &cfg, &weights)?;
            drop(weights);
            be.reset_peak_bytes();
            let times = run_steps(model, a, &cfg, &tc, &targets, &lora_layers)?;
            StepRun {
                times,
                peak_tflops: a
                    .peak_tflops
                    .or_else(|| crate::bench_kernels::known_peak_tflops(&name)),
                device: name,
                peak_bytes: Some(be.peak_bytes()),
            }
        }
        #[cfg(not(feature = "cuda"))]
        unreachable!("pick_device never chooses CUDA without the feature")
    } else {
        let model = Llama::new(CpuBackend, &cfg, &weights)?;
        drop(weights);
        let times = crate::backend::cpu::on_pool(|| {
            run_steps(model, a, &cfg, &tc, &targets, &lora_layers)
        })?;
        StepRun {
            times,
            device: format!("cpu ({threads} threads)"),
            peak_bytes: peak_rss(),
            peak_tflops: a.peak_tflops,
        }
    };
    let ours = median(&run.times);
    let tokens = (3 * a.batch * (a.prompt_len + a.response_len)) as f64;

    let on_gpu = !run.device.starts_with("cpu");
    let python = match &a.compare_python {
        None => None,
        // A failing comparison loses only its own column.
        Some(py) => match run_python(py, a, &cfg, threads, &targets, &lora_layers, on_gpu) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("the PyTorch comparison failed: {e:#}");
                None
            }
        },
    };
    let flops = triplet_step_flops(&cfg, a.batch, a.prompt_len + a.response_len);
    println!();
    println!(
        "| metric | repshield ({}) | PyTorch + transformers + peft | ratio |",
        run.device
    );
    println!("|---|---|---|---|");
    let theirs = python
        .as_ref()
        .and_then(|p| p.get("step_s"))
        .and_then(|v| v.as_f64());
    let attn = python
        .as_ref()
        .and_then(|p| p.get("attn"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    match theirs {
        Some(t) => {
            println!(
                "| seconds per optimiser step (median) | {ours:.2} | {t:.2} ({attn}) | {:.2}x |",
                t / ours
            );
            println!(
                "| tokens/s (3 sets x {} x {}) | {:.0} | {:.0} | {:.2}x |",
                a.batch,
                a.prompt_len + a.response_len,
                tokens / ours,
                tokens / t,
                t / ours
            );
        }
        None => {
            println!("| seconds per optimiser step (median) | {ours:.2} | - | - |");
            println!(
                "| tokens/s (3 sets x {} x {}) | {:.0} | - | - |",
                a.batch,
                a.prompt_len + a.response_len,
                tokens / ours
            );
        }
    }
    let fmt_mfu = |secs: f64| match run.peak_tflops {
        Some(p) => format!("{:.1}%", 100.0 * flops / secs / (p * 1e12)),
        None => "-".into(),
    };
    println!(
        "| MFU ({:.2} TFLOP model FLOPs per step{}) | {} | {} | |",
        flops / 1e12,
        run.peak_tflops
            .map_or(String::new(), |p| format!(", peak {p:.1} TFLOP/s")),
        fmt_mfu(ours),
        theirs.map_or("-".into(), fmt_mfu)
    );
    let gib = |b: f64| format!("{:.2} GiB", b / (1u64 << 30) as f64);
    println!(
        "| peak memory ({}) | {} | {} | |",
        if on_gpu {
            "device buffers; PyTorch: max_memory_allocated"
        } else {
            "process peak RSS"
        },
        run.peak_bytes.map_or("-".into(), |b| gib(b as f64)),
        python
            .as_ref()
            .and_then(|p| p.get("peak_bytes"))
            .and_then(|v| v.as_f64())
            .map_or("-".into(), gib)
    );
    Ok(())
}

/// Builds the adapter and the three random sets on `model`'s device and times `repeats`
/// optimiser steps after a warm-up (seconds each).
fn run_steps<B: BackwardOps>(
    mut model: Llama<B>,
    a: &TrainStepArgs,
    cfg: &ModelConfig,
    tc: &TrainConfig,
    targets: &[usize],
    lora_layers: &[usize],
) -> Result<Vec<f64>> {
    model.recompute = a.recompute;
    let mut adapter = LoraAdapter::init(
        cfg,
        LoraConfig {
            rank: a.rank,
            alpha: a.rank as f32,
            layers: lora_layers.to_vec(),
            modules: LoraModule::ALL.to_vec(),
        },
        a.seed,
    );
    // Non-zero B, as after a few steps (a zero B changes no work, but keeps the grads honest).
    let mut rng = Rng::new(a.seed ^ 0x62656e63);
    for p in &mut adapter.pairs {
        p.b.iter_mut().for_each(|x| *x = rng.normal() * 1e-3);
    }
    model.attach_lora(&adapter)?;
    let sets: Vec<TokenBatch> = (0..3)
        .map(|_| random_set(cfg, a.batch, a.prompt_len, a.response_len, &mut rng))
        .collect();
    let moments: Vec<(Moments, Moments)> = adapter
        .pairs
        .iter()
        .map(|p| (Moments::new(p.a.len()), Moments::new(p.b.len())))
        .collect();
    let mut opt = LoraOptimizer::new(&model.backend, &adapter, &moments)?;
    let adam = tc.adamw;

    {
        let mut grads = LoraGrads::new(&model)?;
        let mut times = Vec::new();
        for step in 0..=a.repeats {
            let t0 = Instant::now();
            grads.zero(&model.backend)?;
            let terms = objective_step(
                &model,
                tc,
                step,
                targets,
                &sets[0],
                &sets[1],
                &sets[2],
                Some(&mut grads),
                None,
                FrozenInputs::default(),
            )?;
            ensure!(terms.total.is_finite(), "loss is not finite");
            opt.step(&adam, step as u64 + 1, &mut model, &grads, 1.0)?;
            model.backend.synchronize()?;
            let s = t0.elapsed().as_secs_f64();
            eprintln!(
                "step {step}{}: {s:.2}s, loss {:.4}",
                if step == 0 { " (warm-up)" } else { "" },
                terms.total
            );
            if step > 0 {
                times.push(s);
            }
        }
        Ok(times)
    }
}

fn run_python(
    py: &PathBuf,
    a: &TrainStepArgs,
    cfg: &ModelConfig,
    threads: usize,
    targets: &[usize],
    lora_layers: &[usize],
    cuda: bool,
) -> Result<serde_json::Value> {
    let list = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let v = run_python_json(
        py,
        a.script.as_ref(),
        "bench_train_step.py",
        cfg,
        threads,
        &[
            ("--batch", a.batch.to_string()),
            ("--prompt-len", a.prompt_len.to_string()),
            ("--response-len", a.response_len.to_string()),
            ("--rank", a.rank.to_string()),
            ("--repeats", a.repeats.to_string()),
            ("--seed", a.seed.to_string()),
            ("--targets", list(targets)),
            ("--lora-layers", list(lora_layers)),
            ("--attn", a.python_attn.clone()),
            ("--device", if cuda { "cuda" } else { "cpu" }.to_string()),
        ],
    )?;
    println!(
        "PyTorch {} / transformers {} / peft {} ({} threads): {:.2} s per step ({} attention)",
        v["torch"].as_str().unwrap_or("?"),
        v["transformers"].as_str().unwrap_or("?"),
        v["peft"].as_str().unwrap_or("?"),
        v["threads"],
        v["step_s"].as_f64().unwrap_or(f64::NAN),
        v["attn"].as_str().unwrap_or("?")
    );
    Ok(v)
}
