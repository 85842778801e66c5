//! `repshield demo`: evaluate the original model, train a triplet defense with hard-negative
//! mining on the shipped data, evaluate again, and print the before/after table.

use crate::attack::commands::AttackKind;
use crate::backend::BackwardOps;
use crate::eval::{run_eval_on, EvalArgs, Report};
use crate::train::trainer::{TrainConfig, Trainer};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

pub const DEMO_CONFIG: &str = include_str!("../configs/demo-smollm2.toml");

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    #[arg(long, default_value = "repshield-demo")]
    pub out: PathBuf,
    /// Training configuration (default: configs/demo-smollm2.toml, built in).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub steps: Option<usize>,
    /// Behaviours attacked before and after.
    #[arg(long, default_value_t = 6)]
    pub limit: usize,
    #[arg(long, default_value_t = 30)]
    pub embedding_steps: usize,
    #[arg(long, default_value_t = 24)]
    pub edgy_limit: usize,
    /// `cpu`, `cuda`, or `auto`: CUDA when a GPU and compiled kernels are present, else the CPU.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

fn eval_args(
    a: &DemoArgs,
    out: &Path,
    adapter: Option<PathBuf>,
    baseline: Option<PathBuf>,
    batch: usize,
) -> EvalArgs {
    EvalArgs {
        model: a.model.clone(),
        adapter,
        out: out.to_path_buf(),
        baseline,
        behaviors: PathBuf::from("data/harmbench_val.jsonl"),
        limit: a.limit,
        attacks: vec![
            AttackKind::Direct,
            AttackKind::Prefill,
            AttackKind::Embedding,
        ],
        embedding_steps: a.embedding_steps,
        embedding_step_size: 1e-2,
        gen_tokens: 48,
        edgy: PathBuf::from("data/edgy_benign.jsonl"),
        edgy_limit: a.edgy_limit,
        heldout_benign: PathBuf::from("data/heldout/retain_chat.jsonl"),
        heldout_harmful: PathBuf::from("data/heldout/harmful_qa.jsonl"),
        device: a.device.clone(),
        batch,
    }
}

fn pct(x: f64) -> String {
    format!("{:.0}%", 100.0 * x)
}

/// The before/after table.
pub fn comparison(before: &Report, after: &Report) -> String {
    let mut s = String::from("| metric | original | defended |\n|---|---|---|\n");
    for (k, b) in &before.asr {
        if let Some(a) = after.asr.get(k) {
            s += &format!(
                "| ASR {k} (keywords + content) | {} | {} |\n",
                pct(b.asr),
                pct(a.asr)
            );
            s += &format!(
                "| ASR {k} (keywords only) | {} | {} |\n",
                pct(b.asr_keywords),
                pct(a.asr_keywords)
            );
            s += &format!(
                "| mean coherence of {k} responses | {:.2} | {:.2} |\n",
                b.mean_coherence, a.mean_coherence
            );
        }
    }
    s += &format!(
        "| over-refusal on edgy-benign prompts | {} | {} |\n",
        pct(before.over_refusal),
        pct(after.over_refusal)
    );
    s += &format!(
        "| degenerate replies on edgy-benign prompts | {} | {} |\n",
        pct(before.edgy_degenerate),
        pct(after.edgy_degenerate)
    );
    s += &format!(
        "| KL(original ‖ model) on held-out benign chat | {:.4} | {:.4} |\n",
        before.benign_kl, after.benign_kl
    );
    s += &format!(
        "| perplexity on held-out benign chat | {:.2} | {:.2} |\n",
        before.benign_ppl, after.benign_ppl
    );
    let drift = |r: &Report| {
        r.separation
            .iter()
            .map(|l| l.drift_harmful)
            .fold(f64::INFINITY, f64::min)
    };
    s += &format!(
        "| lowest cos(model, original) of harmful representations | {:.3} | {:.3} |\n",
        drift(before),
        drift(after)
    );
    s
}

pub fn run_demo(a: &DemoArgs) -> Result<()> {
    if crate::backend::cuda::pick_device(&a.device)? {
        // A GPU attacks all behaviours as one batch; the CPU gains little from batching.
        #[cfg(feature = "cuda")]
        return run_demo_on(a, crate::backend::cuda::CudaBackend::new(0)?, a.limit);
    }
    run_demo_on(a, crate::backend::cpu::CpuBackend, 1)
}

/// [`run_demo`] on a given backend: both evaluations and the training run there, the embedding
/// attack optimising `attack_batch` behaviours at a time.
pub fn run_demo_on<B: BackwardOps + Clone>(a: &DemoArgs, be: B, attack_batch: usize) -> Result<()> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let model_path = crate::model::fetch::resolve_model(&a.model)?;
    eprintln!("model: {}", model_path.display());

    eprintln!("[1/3] evaluating the original model");
    let before = run_eval_on(
        &eval_args(a, &a.out.join("before"), None, None, attack_batch),
        be.clone(),
    )?;

    let mut cfg = match &a.config {
        Some(p) => TrainConfig::from_toml(p)?,
        None => toml::from_str(DEMO_CONFIG).context("built-in demo config")?,
    };
    if let Some(s) = a.steps {
        cfg.steps = s;
    }
    eprintln!(
        "[2/3] training a triplet defense ({} steps, mining {:?})",
        cfg.steps, cfg.mining.kind
    );
    let m = crate::model::load_model_path(&model_path)?;
    let llama = crate::llama::Llama::new(be.clone(), &m.config, &m.weights)?;
    let adapter_dir = a.out.join("adapter");
    let mut tr = Trainer::new(llama, &m.tokenizer, &a.model, cfg, &adapter_dir, false)?;
    let outcome = tr.run(&Arc::new(AtomicBool::new(false)))?;
    drop(tr);

    eprintln!("[3/3] evaluating the defended model");
    let after = run_eval_on(
        &eval_args(
            a,
            &a.out.join("after"),
            Some(adapter_dir.clone()),
            Some(a.out.join("before")),
            attack_batch,
        ),
        be,
    )?;

    println!(
        "\n# repshield demo: {} before and after a triplet defense\n",
        a.model
    );
    println!("{}", comparison(&before, &after));
    if let (Some(f), Some(l)) = (outcome.first_total, outcome.last_total) {
        println!(
            "training loss {f:.3} -> {l:.3} over {} steps",
            outcome.steps_done
        );
    }
    println!("adapter (PEFT): {}", adapter_dir.display());
    println!("reports: {0}/before/report.md, {0}/after/report.md (PCA plots: {0}/before/pca.png, {0}/after/pca.png)", a.out.display());
    println!("finished in {:.1} min", t0.elapsed().as_secs_f64() / 60.0);
    Ok(())
}
