//! `repshield train`, `repshield capture` and `repshield loss`.

use super::data::{read_jsonl, Encoder, Layout, TokenBatch};
use super::frozen::{capture, CaptureOptions, FrozenDtype};
use super::step::LossTerms;
use super::trainer::{objective_step, Method, TrainConfig, Trainer};
use crate::backend::cpu::CpuBackend;
use crate::backend::BackwardOps;
use crate::llama::peft::load_peft;
use crate::llama::{Llama, LoraGrads, LoraModule};
use crate::model::{self, LoadedModel};
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// .gguf file, Hugging Face directory, or `smollm2`.
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub out: PathBuf,
    /// TOML file with any TrainConfig field; command-line options override it. Without one,
    /// `--model smollm2 --method triplet` starts from the built-in SmolLM2 preset
    /// (configs/triplet-smollm2.toml) and everything else from the paper's defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Start from the paper's defaults even for `smollm2`.
    #[arg(long)]
    pub no_preset: bool,
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub rank: Option<usize>,
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Dropout probability on the LoRA paths' inputs while training (default 0.05; 0 = off).
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// Comma-separated hidden-state indices of the harmful term.
    #[arg(long, value_delimiter = ',')]
    pub target_layers: Option<Vec<usize>>,
    #[arg(long)]
    pub max_prompt: Option<usize>,
    #[arg(long)]
    pub max_response: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub save_every: Option<usize>,
    #[arg(long)]
    pub benign: Option<PathBuf>,
    #[arg(long)]
    pub refusal: Option<PathBuf>,
    #[arg(long)]
    pub harmful: Option<PathBuf>,
    #[arg(long)]
    pub retain: Option<PathBuf>,
    /// Adversarial hard-negative mining: `embedding` (soft tokens attacked into the harmful
    /// prompts) or `latent` (a learned adversary in the residual stream).
    #[arg(long, value_enum)]
    pub mining: Option<crate::train::mining::MiningKind>,
    /// Per-block activation recompute (less memory, about one extra forward per step).
    #[arg(long)]
    pub recompute: bool,
    /// Read the frozen model's representations from this `repshield capture` file instead of
    /// recomputing them every step.
    #[arg(long)]
    pub frozen_reps: Option<PathBuf>,
    /// Continue from `<out>/checkpoint`.
    #[arg(long)]
    pub resume: bool,
    /// Stop (saving a checkpoint) after this many steps of this run.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Held-out harmful pairs and benign chat for the final summary.
    #[arg(long, default_value = "data/heldout/harmful_qa.jsonl")]
    pub heldout_harmful: PathBuf,
    #[arg(long, default_value = "data/heldout/retain_chat.jsonl")]
    pub heldout_benign: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The triplet preset of the shipped `smollm2` alias: the paper's loss weights do not move
/// SmolLM2's harmful representations in a short run (its cosine-distance gradients are ~500x
/// smaller than the benign and KL terms'; docs/TRAINING.md), this one does in 30 steps.
pub const SMOLLM2_TRIPLET_PRESET: &str = include_str!("../../configs/triplet-smollm2.toml");

impl TrainArgs {
    pub fn config(&self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(p) => TrainConfig::from_toml(p)?,
            None if self.model == "smollm2"
                && !self.no_preset
                && self.method.is_none_or(|m| m == Method::Triplet) =>
            {
                eprintln!("config: the built-in SmolLM2 triplet preset (configs/triplet-smollm2.toml; --no-preset for the paper's defaults)");
                toml::from_str(SMOLLM2_TRIPLET_PRESET).context("built-in SmolLM2 preset")?
            }
            None => TrainConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f.clone() { c.$f = v; } )* };
        }
        set!(
            method,
            steps,
            batch,
            grad_accum,
            rank,
            alpha,
            lora_dropout,
            max_prompt,
            max_response,
            seed,
            save_every,
            benign,
            refusal,
            harmful,
            retain
        );
        if self.lr.is_some() {
            c.lr = self.lr;
        }
        if self.recompute {
            c.recompute = true;
        }
        if let Some(k) = self.mining {
            c.mining.kind = k;
        }
        if self.target_layers.is_some() {
            c.target_layers = self.target_layers.clone();
        }
        if self.frozen_reps.is_some() {
            c.frozen_reps = self.frozen_reps.clone();
        }
        Ok(c)
    }
}

#[derive(clap::Args, Debug)]
pub struct CaptureArgs {
    /// .gguf file, Hugging Face directory, or `smollm2`.
    #[arg(long)]
    pub model: String,
    /// The training config (TOML, as for `repshield train`): data files, layout, mask,
    /// method, target layers and batch size decide what is captured.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The capture file to write (replaced atomically).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// Comma-separated hidden-state indices of the harmful term.
    #[arg(long, value_delimiter = ',')]
    pub target_layers: Option<Vec<usize>>,
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub max_prompt: Option<usize>,
    #[arg(long)]
    pub max_response: Option<usize>,
    #[arg(long)]
    pub benign: Option<PathBuf>,
    #[arg(long)]
    pub refusal: Option<PathBuf>,
    #[arg(long)]
    pub harmful: Option<PathBuf>,
    #[arg(long)]
    pub retain: Option<PathBuf>,
    /// `f32` reproduces a recompute bit for bit; `bf16` halves the file.
    #[arg(long, value_enum, default_value_t = FrozenDtype::F32)]
    pub dtype: FrozenDtype,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl CaptureArgs {
    pub fn config(&self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(p) => TrainConfig::from_toml(p)?,
            None => TrainConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f.clone() { c.$f = v; } )* };
        }
        set!(
            method,
            batch,
            max_prompt,
            max_response,
            benign,
            refusal,
            harmful,
            retain
        );
        if self.target_layers.is_some() {
            c.target_layers = self.target_layers.clone();
        }
        Ok(c)
    }
}

/// `repshield capture`: the frozen model's representations of the training data, once.
pub fn cmd_capture(a: &CaptureArgs) -> Result<()> {
    cpu_only(&a.device)?;
    let cfg = a.config()?;
    let m = model::load_model(&a.model)?;
    let model = Llama::new(CpuBackend, &m.config, &m.weights)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: stopping after this forward; the output file stays as it was");
        });
    }
    let t0 = std::time::Instant::now();
    let sum = capture(
        &model,
        &m.tokenizer,
        &cfg,
        &a.out,
        &CaptureOptions {
            dtype: a.dtype,
            quiet: false,
            stop: Some(stop),
        },
    )?;
    for s in &sum.header.sections {
        let rows: usize = s.examples.iter().map(|e| e.rows).sum();
        eprintln!(
            "  {} {:?}: {} examples, {} rows ({:?} mask), indices {:?}",
            s.spec.set.as_str(),
            s.spec.kind,
            s.examples.len(),
            rows,
            s.spec.mask,
            s.spec.indices
        );
    }
    println!(
        "captured {:?} frozen representations of {} in {} forwards, {:.1}s: {} ({:.1} MiB); train with --frozen-reps {} (or frozen_reps in the config)",
        cfg.method,
        m.source.display(),
        sum.forwards,
        t0.elapsed().as_secs_f64(),
        a.out.display(),
        sum.file_bytes as f64 / (1 << 20) as f64,
        a.out.display()
    );
    Ok(())
}

fn cpu_only(device: &str) -> Result<()> {
    match device {
        "cpu" | "auto" => Ok(()),
        other => bail!("--device {other}: capture runs on the CPU in this build"),
    }
}

pub fn cmd_train(a: &TrainArgs) -> Result<()> {
    let cfg = a.config()?;
    let m = model::load_model(&a.model)?;
    if crate::backend::cuda::pick_device(&a.device)? {
        #[cfg(feature = "cuda")]
        return train_on(
            a,
            cfg,
            &m,
            Llama::new(
                crate::backend::cuda::CudaBackend::new(0)?,
                &m.config,
                &m.weights,
            )?,
        );
    }
    train_on(a, cfg, &m, Llama::new(CpuBackend, &m.config, &m.weights)?)
}

fn train_on<B: BackwardOps>(
    a: &TrainArgs,
    cfg: TrainConfig,
    m: &LoadedModel,
    model: Llama<B>,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C kills the process as usual.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: finishing the current step and saving a checkpoint (Ctrl-C again to abort)");
        });
    }
    let mut tr = Trainer::new(model, &m.tokenizer, &a.model, cfg.clone(), &a.out, a.resume)?;
    tr.stop_after = a.stop_after;
    eprintln!(
        "training {:?} on {} ({} LoRA pairs, rank {}, target indices {:?}), {} steps from step {}; writing {}",
        cfg.method,
        m.source.display(),
        tr.adapter.pairs.len(),
        cfg.rank,
        cfg.targets(&m.config),
        cfg.steps,
        tr.state.step,
        a.out.display()
    );
    if let Some(f) = &tr.frozen {
        eprintln!(
            "frozen representations from {} (captured {:?}); the frozen forward is skipped",
            f.path().display(),
            f.header.dtype
        );
    }
    let outcome = tr.run(&stop)?;
    if outcome.interrupted {
        println!(
            "stopped at step {}; resume with the same command plus --resume",
            outcome.steps_done
        );
        return Ok(());
    }
    println!(
        "finished {} steps; adapter in {} (PEFT format), metrics in {}/metrics.jsonl",
        outcome.steps_done,
        a.out.display(),
        a.out.display()
    );
    if let (Some(f), Some(l)) = (outcome.first_total, outcome.last_total) {
        println!("loss: first step {f:.4} -> last step {l:.4}");
    }
    let s = summary(&tr.model, m, &cfg, &a.heldout_harmful, &a.heldout_benign)?;
    println!(
        "held-out: cos(tuned, original) of harmful representations at target indices = {:.3}; KL(original || tuned) on benign chat = {:.4} nats/token",
        s.harmful_cos, s.benign_kl
    );
    Ok(())
}

pub struct Summary {
    pub harmful_cos: f64,
    pub benign_kl: f64,
}

/// Mean cosine similarity between tuned and original harmful representations (response
/// tokens, target indices) and mean per-token KL(original || tuned) at T = 1 on benign chat.
pub fn summary<B: crate::backend::Backend>(
    model: &Llama<B>,
    m: &LoadedModel,
    c: &TrainConfig,
    harmful: &Path,
    benign: &Path,
) -> Result<Summary> {
    let targets = c.targets(&m.config);
    let hs = read_jsonl(harmful, true)?;
    let bs = read_jsonl(benign, true)?;
    let sep = crate::eval::separation(model, m, &hs, &bs, &targets)?;
    let harmful_cos = sep.iter().map(|l| l.drift_harmful).sum::<f64>() / sep.len().max(1) as f64;
    let (benign_kl, _) = crate::eval::benign_kl_ppl(model, m, &bs)?;
    Ok(Summary {
        harmful_cos,
        benign_kl,
    })
}

#[derive(clap::Args, Debug)]
pub struct LossArgs {
    #[arg(long, value_enum)]
    pub method: Method,
    #[arg(long)]
    pub model: String,
    /// PEFT adapter directory (default: a fresh adapter, B = 0).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub benign: Option<PathBuf>,
    #[arg(long)]
    pub harmful: Option<PathBuf>,
    #[arg(long)]
    pub retain: Option<PathBuf>,
    /// Pre-tokenised inputs: int64 `{benign,harmful,retain}/{input_ids,attention_mask,response_mask,last_prompt_index}`.
    #[arg(long)]
    pub batch: Option<PathBuf>,
    /// Optimiser step (Circuit Breakers' coefficient schedule).
    #[arg(long, default_value_t = 0)]
    pub step: usize,
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// Reads one set of a `--batch` file (right-padded rows, positions 0..T-1).
pub fn read_batch_set(st: &safetensors::SafeTensors, path: &Path, set: &str) -> Result<TokenBatch> {
    let get = |name: &str| -> Result<(Vec<usize>, Vec<i64>)> {
        let full = format!("{set}/{name}");
        let t = st
            .tensor(&full)
            .with_context(|| format!("{}: missing tensor {full}", path.display()))?;
        ensure!(
            t.dtype() == safetensors::Dtype::I64,
            "{}: tensor {full} must be int64",
            path.display()
        );
        Ok((
            t.shape().to_vec(),
            t.data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        ))
    };
    let (shape, ids) = get("input_ids")?;
    ensure!(
        shape.len() == 2,
        "{}: {set}/input_ids must be [batch, seq]",
        path.display()
    );
    let (batch, seq) = (shape[0], shape[1]);
    let (s2, am) = get("attention_mask")?;
    let (s3, rm) = get("response_mask")?;
    let (s4, last) = get("last_prompt_index")?;
    ensure!(
        s2 == shape && s3 == shape && s4 == [batch],
        "{}: {set} tensors disagree in shape",
        path.display()
    );
    let prompt_mask: Vec<f32> = am
        .iter()
        .zip(&rm)
        .map(|(&a, &r)| (a != 0 && r == 0) as u8 as f32)
        .collect();
    Ok(TokenBatch {
        batch,
        seq,
        input_ids: ids.iter().map(|&x| x as u32).collect(),
        attention_mask: am.iter().map(|&x| x as f32).collect(),
        prompt_mask,
        response_mask: rm.iter().map(|&x| x as f32).collect(),
        last_prompt_index: last.iter().map(|&x| x as usize).collect(),
    })
}

pub fn cmd_loss(a: &LossArgs) -> Result<()> {
    let mut c = match &a.config {
        Some(p) => TrainConfig::from_toml(p)?,
        None => TrainConfig::default(),
    };
    c.method = a.method;
    let m = model::load_model(&a.model)?;
    let mut model = Llama::new(CpuBackend, &m.config, &m.weights)?;
    let adapter = match &a.adapter {
        Some(dir) => load_peft(dir, &m.config)?,
        None => crate::llama::LoraAdapter::init(
            &m.config,
            crate::llama::LoraConfig {
                rank: c.rank,
                alpha: c.alpha,
                layers: c.lora_layers(&m.config),
                modules: LoraModule::ALL.to_vec(),
            },
            c.seed,
        ),
    };
    model.attach_lora(&adapter)?;
    let (benign, harmful, retain) = if let Some(p) = &a.batch {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: corrupt safetensors", p.display()))?;
        (
            read_batch_set(&st, p, "benign")?,
            read_batch_set(&st, p, "harmful")?,
            read_batch_set(&st, p, "retain")?,
        )
    } else {
        let enc = Encoder::new(
            &m.tokenizer,
            Layout {
                max_prompt: c.max_prompt,
                max_response: c.max_response,
            },
        );
        let need = |o: &Option<PathBuf>, n: &str| {
            o.clone()
                .with_context(|| format!("--{n} FILE (or --batch FILE) is required"))
        };
        (
            enc.batch(&read_jsonl(&need(&a.benign, "benign")?, true)?)?,
            enc.batch(&read_jsonl(&need(&a.harmful, "harmful")?, true)?)?,
            enc.batch(&read_jsonl(&need(&a.retain, "retain")?, true)?)?,
        )
    };
    let targets = c.targets(&m.config);
    let mut grads = LoraGrads::new(&model)?;
    // `model.lora_dropout` stays `None`: the terms are deterministic, whatever `c.lora_dropout`.
    let terms: LossTerms = objective_step(
        &model,
        &c,
        a.step,
        &targets,
        &benign,
        &harmful,
        &retain,
        Some(&mut grads),
        None,
        Default::default(),
    )?;
    let norms = lora_grad_norms(&model, &grads)?;
    if a.json {
        let mut o = serde_json::Map::new();
        o.insert("method".into(), serde_json::to_value(c.method)?);
        o.insert("loss".into(), terms.total.into());
        for (n, v) in terms.terms.iter().chain(&norms) {
            o.insert(n.clone(), (*v).into());
        }
        println!("{}", serde_json::Value::Object(o));
    } else {
        println!("method {:?}, target indices {:?}", c.method, targets);
        println!("{:<16} {:>14}", "loss", format!("{:.6}", terms.total));
        for (n, v) in terms.terms.iter().chain(&norms) {
            println!("{n:<16} {v:>14.6}");
        }
    }
    Ok(())
}

fn lora_grad_norms(
    model: &Llama<CpuBackend>,
    grads: &LoraGrads<CpuBackend>,
) -> Result<Vec<(String, f64)>> {
    super::trainer::grad_norms(model, grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: TrainArgs,
    }

    fn config(args: &[&str]) -> TrainConfig {
        let mut v = vec!["train", "--out", "/tmp/x"];
        v.extend(args);
        Cli::parse_from(v).a.config().unwrap()
    }

    #[test]
    fn smollm2_triplet_starts_from_its_preset_and_flags_still_win() {
        let preset: TrainConfig = toml::from_str(SMOLLM2_TRIPLET_PRESET).unwrap();
        assert_eq!(preset.triplet.w_harmful, 1500.0);
        let c = config(&["--model", "smollm2"]);
        assert_eq!(c, preset);
        let c = config(&["--model", "smollm2", "--method", "triplet", "--steps", "7"]);
        assert_eq!((c.steps, c.lr, c.triplet.w_kl), (7, Some(1e-3), 5.0));
        // Other models, other methods and --no-preset get the paper's defaults.
        let paper = TrainConfig::default();
        assert_eq!(config(&["--model", "other.gguf"]), paper);
        assert_eq!(config(&["--model", "smollm2", "--no-preset"]), paper);
        let c = config(&["--model", "smollm2", "--method", "repbend"]);
        assert_eq!(c.triplet, paper.triplet);
        assert_eq!(c.method, Method::Repbend);
    }
}
