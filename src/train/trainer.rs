//! The training loop: micro-batches with gradient accumulation, AdamW, metrics as JSONL, a
//! progress bar with every loss term, atomic checkpoints every N steps, `--resume`, a
//! checkpoint on Ctrl-C, and a hard stop naming the step and term when a loss or gradient
//! stops being finite (the last checkpoint stays intact).

use super::adamw::{AdamWConfig, LoraOptimizer, Moments};
use super::data::{read_jsonl, Encoder, Example, Layout, MaskMode, TokenBatch};
use super::frozen::FrozenReps;
use super::mining::{AdvInput, Miner, MinerState, MiningConfig, MiningKind};
use super::step::{circuit_breaker_step, repbend_step, triplet_step, FrozenInputs, LossTerms};
use crate::backend::BackwardOps;
use crate::llama::peft::{load_peft, save_peft_trained, write_atomic};
use crate::llama::{Llama, LoraAdapter, LoraConfig, LoraDropout, LoraGrads, LoraModule};
use crate::model::{ChatTokenizer, ModelConfig};
use crate::objectives::circuit_breaker::CircuitBreakerConfig;
use crate::objectives::repbend::RepBendConfig;
use crate::objectives::triplet::TripletConfig;
use crate::util::Rng;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Triplet,
    Repbend,
    CircuitBreakers,
}

/// Everything a run depends on; saved with every checkpoint and checked on `--resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub method: Method,
    pub steps: usize,
    /// Default: 1e-4 (RepBend 1e-5).
    pub lr: Option<f64>,
    pub batch: usize,
    pub grad_accum: usize,
    pub rank: usize,
    pub alpha: f32,
    /// PEFT's `lora_dropout`: probability of dropping each input element of the LoRA paths in
    /// the training forward (0 turns it off; evaluation and `repshield loss` never drop).
    pub lora_dropout: f32,
    /// Hidden-state indices of the harmful/unsafe/circuit-breaker terms (default: the method's).
    pub target_layers: Option<Vec<usize>>,
    /// Decoder blocks that get LoRA (default: the method's).
    pub lora_layers: Option<Vec<usize>>,
    pub max_prompt: usize,
    pub max_response: usize,
    pub mask: MaskMode,
    pub seed: u64,
    pub save_every: usize,
    pub benign: PathBuf,
    pub refusal: PathBuf,
    pub harmful: PathBuf,
    pub retain: PathBuf,
    pub triplet: TripletConfig,
    pub repbend: RepBendConfig,
    pub circuit_breakers: CircuitBreakerConfig,
    pub adamw: AdamWConfig,
    pub mining: MiningConfig,
    /// Keep only each block's input in the forward and recompute the rest in the backward.
    pub recompute: bool,
    /// A `repshield capture` file: the frozen model's representations are read from it instead
    /// of recomputed every step (same results; checked against model, data and settings).
    pub frozen_reps: Option<PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            method: Method::Triplet,
            steps: 150,
            lr: None,
            batch: 4,
            grad_accum: 1,
            rank: 16,
            alpha: 16.0,
            lora_dropout: 0.05,
            target_layers: None,
            lora_layers: None,
            max_prompt: 64,
            max_response: 64,
            mask: MaskMode::ResponseAll,
            seed: 42,
            save_every: 10,
            benign: PathBuf::from("data/benign_qa.jsonl"),
            refusal: PathBuf::from("data/harmful_refusal.jsonl"),
            harmful: PathBuf::from("data/harmful_qa.jsonl"),
            retain: PathBuf::from("data/retain_chat.jsonl"),
            triplet: TripletConfig::default(),
            repbend: RepBendConfig::default(),
            circuit_breakers: CircuitBreakerConfig::default(),
            adamw: AdamWConfig::default(),
            mining: MiningConfig::default(),
            recompute: false,
            frozen_reps: None,
        }
    }
}

impl TrainConfig {
    pub fn from_toml(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("{}: invalid training config", path.display()))
    }

    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(match self.method {
            Method::Repbend => 1e-5,
            _ => 1e-4,
        })
    }

    /// Hidden-state indices the harmful term looks at.
    pub fn targets(&self, cfg: &ModelConfig) -> Vec<usize> {
        if let Some(t) = &self.target_layers {
            return t.clone();
        }
        let l = cfg.num_layers;
        match self.method {
            // Llama-3-8B (32 blocks): 20..=30, i.e. from ~60% to ~95% of depth.
            Method::Triplet | Method::Repbend => {
                ((0.6 * l as f64).ceil() as usize..=(0.95 * l as f64).floor() as usize).collect()
            }
            // Llama-3-8B: {10, 20}.
            Method::CircuitBreakers => vec![(l * 10 + 16) / 32, (l * 20 + 16) / 32],
        }
    }

    /// Blocks that carry LoRA: CRL's code leaves the last block out; Circuit Breakers stops
    /// at the highest target index.
    pub fn lora_layers(&self, cfg: &ModelConfig) -> Vec<usize> {
        if let Some(l) = &self.lora_layers {
            return l.clone();
        }
        match self.method {
            Method::Triplet | Method::Repbend => (0..cfg.num_layers.saturating_sub(1)).collect(),
            Method::CircuitBreakers => {
                let top = self.targets(cfg).into_iter().max().unwrap_or(0);
                (0..=top.min(cfg.num_layers - 1)).collect()
            }
        }
    }

    /// Whether a checkpoint of `other` can be resumed under `self`: everything but where the
    /// frozen representations come from (that does not change the results) must agree.
    pub fn same_run(&self, other: &TrainConfig) -> bool {
        let strip = |c: &TrainConfig| TrainConfig {
            frozen_reps: None,
            ..c.clone()
        };
        strip(self) == strip(other)
    }

    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        ensure!(
            self.steps > 0 && self.batch > 0 && self.grad_accum > 0,
            "steps, batch and grad-accum must be positive"
        );
        ensure!(
            self.max_prompt > 0 && self.max_response > 0,
            "max-prompt and max-response must be positive"
        );
        ensure!(
            (0.0..1.0).contains(&self.lora_dropout),
            "lora-dropout must be in [0, 1), got {}",
            self.lora_dropout
        );
        ensure!(
            !self.targets(cfg).is_empty(),
            "no target layers: set target_layers for a model this shallow"
        );
        for t in self.targets(cfg) {
            ensure!(
                t <= cfg.num_layers,
                "target layer {t} > num_layers {}",
                cfg.num_layers
            );
        }
        for l in self.lora_layers(cfg) {
            ensure!(
                l < cfg.num_layers,
                "LoRA layer {l} >= num_layers {}",
                cfg.num_layers
            );
        }
        Ok(())
    }
}

/// Cycles through a data set in a seeded order, reshuffled every epoch; its position is part
/// of the checkpoint so a resumed run sees the same batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampler {
    pub order: Vec<usize>,
    pub pos: usize,
    pub epoch: u64,
    pub seed: u64,
}

impl Sampler {
    pub fn new(n: usize, seed: u64) -> Self {
        let mut s = Self {
            order: (0..n).collect(),
            pos: 0,
            epoch: 0,
            seed,
        };
        s.shuffle();
        s
    }
    fn shuffle(&mut self) {
        let mut rng = Rng::new(self.seed ^ self.epoch.wrapping_mul(0x9E3779B97F4A7C15));
        for i in (1..self.order.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            self.order.swap(i, j);
        }
    }
    pub fn take(&mut self, k: usize) -> Vec<usize> {
        (0..k)
            .map(|_| {
                if self.pos == self.order.len() {
                    self.pos = 0;
                    self.epoch += 1;
                    self.shuffle();
                }
                self.pos += 1;
                self.order[self.pos - 1]
            })
            .collect()
    }
}

/// The loop's resumable state (besides adapter and optimiser moments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub step: usize,
    pub config: TrainConfig,
    pub model: String,
    pub samplers: Vec<Sampler>,
    /// The last logged metrics line, for the summary after a resume.
    pub last_total: Option<f64>,
    pub miner: MinerState,
}

pub struct Datasets {
    /// Benign set: benign pairs + harmful prompts with refusals.
    pub benign: Vec<Example>,
    pub harmful: Vec<Example>,
    pub retain: Vec<Example>,
}

impl Datasets {
    pub fn load(c: &TrainConfig) -> Result<Self> {
        let mut benign = read_jsonl(&c.benign, true)?;
        benign.extend(read_jsonl(&c.refusal, true)?);
        Ok(Self {
            benign,
            harmful: read_jsonl(&c.harmful, true)?,
            retain: read_jsonl(&c.retain, true)?,
        })
    }
}

pub fn grad_norms<B: BackwardOps>(
    model: &Llama<B>,
    grads: &LoraGrads<B>,
) -> Result<Vec<(String, f64)>> {
    let be = &model.backend;
    let mut per = [0f64; 7];
    let (mut a_sq, mut b_sq) = (0f64, 0f64);
    for (li, slots) in grads.grads.iter().enumerate() {
        for m in LoraModule::ALL {
            if let Some((ga, gb)) = &slots[m as usize] {
                let sa: f64 = be.download(ga)?.iter().map(|&x| x as f64 * x as f64).sum();
                let sb: f64 = be.download(gb)?.iter().map(|&x| x as f64 * x as f64).sum();
                per[m as usize] += sa + sb;
                a_sq += sa;
                b_sq += sb;
                let _ = li;
            }
        }
    }
    let mut out = vec![("grad_norm".to_string(), (a_sq + b_sq).sqrt())];
    for m in LoraModule::ALL {
        out.push((
            format!("grad_norm_{}", m.hf_name().trim_end_matches("_proj")),
            per[m as usize].sqrt(),
        ));
    }
    out.push(("grad_norm_A".into(), a_sq.sqrt()));
    out.push(("grad_norm_B".into(), b_sq.sqrt()));
    Ok(out)
}

/// Evaluates the configured objective on one micro-batch per set; gradients go into `grads`.
#[allow(clippy::too_many_arguments)]
pub fn objective_step<B: BackwardOps>(
    model: &Llama<B>,
    c: &TrainConfig,
    step: usize,
    targets: &[usize],
    benign: &TokenBatch,
    harmful: &TokenBatch,
    retain: &TokenBatch,
    grads: Option<&mut LoraGrads<B>>,
    adv: Option<&AdvInput>,
    frozen: FrozenInputs,
) -> Result<LossTerms> {
    match c.method {
        Method::Triplet => triplet_step(
            model, &c.triplet, c.mask, targets, benign, harmful, retain, grads, adv, frozen,
        ),
        Method::Repbend => repbend_step(
            model, &c.repbend, c.mask, targets, benign, harmful, retain, grads, adv, frozen,
        ),
        Method::CircuitBreakers => circuit_breaker_step(
            model,
            &c.circuit_breakers,
            step,
            c.steps,
            targets,
            retain,
            harmful,
            grads,
            adv,
            frozen,
        ),
    }
}

pub struct Trainer<'a, B: BackwardOps> {
    pub model: Llama<B>,
    pub tokenizer: &'a ChatTokenizer,
    /// Host copies of the LoRA factors and the optimiser moments: the model's LoRA buffers and
    /// `opt` are the live state during `run`, copied back here for every checkpoint and at the
    /// end. Replacing the adapter before `run` needs `model.attach_lora` as well.
    pub adapter: LoraAdapter,
    pub moments: Vec<(Moments, Moments)>,
    opt: LoraOptimizer<B>,
    pub state: TrainState,
    pub data: Datasets,
    pub out: PathBuf,
    pub quiet: bool,
    /// Behave as if Ctrl-C arrived after this many steps in this run (tests, time-boxed runs).
    pub stop_after: Option<usize>,
    pub miner: Miner,
    /// The frozen representations file of `frozen_reps`, opened and checked.
    pub frozen: Option<FrozenReps>,
}

pub struct TrainOutcome {
    pub steps_done: usize,
    pub interrupted: bool,
    pub first_total: Option<f64>,
    pub last_total: Option<f64>,
}

fn c_mining(c: &TrainConfig) -> bool {
    c.mining.kind != MiningKind::None
}

fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

impl<'a, B: BackwardOps> Trainer<'a, B> {
    /// A fresh run, or the state of `out/checkpoint` when `resume` is set.
    pub fn new(
        mut model: Llama<B>,
        tokenizer: &'a ChatTokenizer,
        model_name: &str,
        config: TrainConfig,
        out: &Path,
        resume: bool,
    ) -> Result<Self> {
        config.validate(&model.cfg)?;
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let data = Datasets::load(&config)?;
        let ck = checkpoint_dir(out);
        let (adapter, moments, state) = if resume {
            ensure!(
                ck.join("state.json").is_file(),
                "--resume: no checkpoint at {}",
                ck.display()
            );
            let corrupt = || format!("{}/state.json: corrupt checkpoint state", ck.display());
            let mut raw: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(ck.join("state.json"))
                    .with_context(|| format!("reading {}/state.json", ck.display()))?,
            )
            .with_context(corrupt)?;
            // A checkpoint from before LoRA dropout existed was trained without it; the
            // config's default (0.05) would silently switch it on halfway through the run.
            if let Some(c) = raw.get_mut("config").and_then(|c| c.as_object_mut()) {
                c.entry("lora_dropout").or_insert(0.0.into());
            }
            let st: TrainState = serde_json::from_value(raw).with_context(corrupt)?;
            if !st.config.same_run(&config) {
                bail!(
                    "--resume: the checkpoint in {} was made with a different configuration; rerun with the same options (or a fresh --out)",
                    ck.display()
                );
            }
            let adapter = load_peft(&ck, &model.cfg)?;
            let moments = load_moments(&ck.join("optimizer.safetensors"), &adapter)?;
            let st = TrainState {
                config: TrainConfig {
                    frozen_reps: config.frozen_reps.clone(),
                    ..st.config
                },
                ..st
            };
            (adapter, moments, st)
        } else {
            let lcfg = LoraConfig {
                rank: config.rank,
                alpha: config.alpha,
                layers: config.lora_layers(&model.cfg),
                modules: LoraModule::ALL.to_vec(),
            };
            let adapter = LoraAdapter::init(&model.cfg, lcfg, config.seed);
            let moments = adapter
                .pairs
                .iter()
                .map(|p| (Moments::new(p.a.len()), Moments::new(p.b.len())))
                .collect();
            let samplers = vec![
                Sampler::new(data.benign.len(), config.seed.wrapping_add(1)),
                Sampler::new(data.harmful.len(), config.seed.wrapping_add(2)),
                Sampler::new(data.retain.len(), config.seed.wrapping_add(3)),
            ];
            let st = TrainState {
                step: 0,
                config: config.clone(),
                model: model_name.to_string(),
                samplers,
                last_total: None,
                miner: Miner::new(config.mining.clone(), config.seed).state,
            };
            (adapter, moments, st)
        };
        let frozen = state
            .config
            .frozen_reps
            .as_deref()
            .map(|p| FrozenReps::open(p, &model, &state.config))
            .transpose()?;
        model.attach_lora(&adapter)?;
        let opt = LoraOptimizer::new(&model.backend, &adapter, &moments)?;
        model.recompute = state.config.recompute;
        let mut miner = Miner::new(state.config.mining.clone(), state.config.seed);
        miner.state = state.miner.clone();
        if resume && ck.join("mining.safetensors").is_file() {
            miner.load(&ck.join("mining.safetensors"))?;
        }
        Ok(Self {
            model,
            tokenizer,
            adapter,
            moments,
            opt,
            state,
            data,
            out: out.to_path_buf(),
            quiet: false,
            stop_after: None,
            miner,
            frozen,
        })
    }

    /// The next micro-batch of each set, and the indices of the examples in each.
    fn batches(&mut self) -> Result<[(TokenBatch, Vec<usize>); 3]> {
        let c = &self.state.config;
        let enc = Encoder::new(
            self.tokenizer,
            Layout {
                max_prompt: c.max_prompt,
                max_response: c.max_response,
            },
        );
        let pick = |s: &mut Sampler, set: &[Example], k: usize| -> (Vec<Example>, Vec<usize>) {
            let idx = s.take(k);
            (idx.iter().map(|&i| set[i].clone()).collect(), idx)
        };
        let (b, bidx) = pick(&mut self.state.samplers[0], &self.data.benign, c.batch);
        let (h, hidx) = pick(&mut self.state.samplers[1], &self.data.harmful, c.batch);
        let (r, ridx) = pick(&mut self.state.samplers[2], &self.data.retain, c.batch);
        Ok([
            (enc.batch(&b)?, bidx),
            (enc.batch(&h)?, hidx),
            (enc.batch(&r)?, ridx),
        ])
    }

    /// Copies the live LoRA factors and optimiser moments from the model's device into
    /// `adapter` and `moments`.
    pub fn sync_host(&mut self) -> Result<()> {
        self.moments = self.opt.download(&self.model, &mut self.adapter)?;
        Ok(())
    }

    /// Writes adapter, optimiser moments and state into `out/checkpoint` atomically (a fresh
    /// directory renamed over the old one).
    pub fn save_checkpoint(&mut self) -> Result<()> {
        self.sync_host()?;
        let ck = checkpoint_dir(&self.out);
        let tmp = self.out.join("checkpoint.tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("removing stale {}", tmp.display()))?;
        }
        save_peft_trained(
            &tmp,
            &self.adapter,
            &self.state.model,
            self.state.config.lora_dropout,
        )?;
        save_moments(
            &tmp.join("optimizer.safetensors"),
            &self.adapter,
            &self.moments,
        )?;
        let state = TrainState {
            miner: self.miner.state.clone(),
            ..self.state.clone()
        };
        write_atomic(
            &tmp.join("state.json"),
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
        if c_mining(&self.state.config) {
            self.miner.save(&tmp.join("mining.safetensors"))?;
        }
        let old = self.out.join("checkpoint.old");
        if ck.exists() {
            if old.exists() {
                std::fs::remove_dir_all(&old)?;
            }
            std::fs::rename(&ck, &old).with_context(|| format!("moving {} aside", ck.display()))?;
        }
        std::fs::rename(&tmp, &ck)
            .with_context(|| format!("renaming {} to {}", tmp.display(), ck.display()))?;
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        Ok(())
    }

    /// Runs until `config.steps` or until `stop` is raised (then saves and returns).
    pub fn run(&mut self, stop: &Arc<AtomicBool>) -> Result<TrainOutcome> {
        let c = self.state.config.clone();
        let targets = c.targets(&self.model.cfg);
        let adam = AdamWConfig {
            lr: c.lr(),
            ..c.adamw
        };
        let mut grads = LoraGrads::new(&self.model)?;
        let metrics_path = self.out.join("metrics.jsonl");
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("opening {}", metrics_path.display()))?;
        let bar = indicatif::ProgressBar::new(c.steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} step {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        if self.quiet {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        bar.set_position(self.state.step as u64);
        let mut first_total = None;
        let mut interrupted = false;
        let mut done_here = 0;
        while self.state.step < c.steps {
            if stop.load(Ordering::SeqCst) || self.stop_after == Some(done_here) {
                interrupted = true;
                break;
            }
            let t0 = Instant::now();
            let step = self.state.step;
            grads.zero(&self.model.backend)?;
            let mut terms = LossTerms::default();
            let mut mining_rows = 0;
            for micro in 0..c.grad_accum {
                let [(b, bidx), (h, hidx), (r, ridx)] = self.batches()?;
                let frozen = match &self.frozen {
                    Some(f) => f.inputs((&b, &bidx), (&h, &hidx), (&r, &ridx))?,
                    None => FrozenInputs::default(),
                };
                let adv = match c.mining.kind {
                    MiningKind::None => None,
                    MiningKind::Embedding => {
                        let exs: Vec<(usize, &Example)> =
                            hidx.iter().map(|&i| (i, &self.data.harmful[i])).collect();
                        if step.is_multiple_of(c.mining.every) {
                            self.miner.mine_embedding(
                                &self.model,
                                self.tokenizer,
                                &h,
                                &exs,
                                c.max_prompt,
                            )?
                        } else {
                            None
                        }
                    }
                    MiningKind::Latent => {
                        if step.is_multiple_of(c.mining.every) {
                            self.miner.refresh_latent(&self.model, &h)?;
                        }
                        self.miner.latent_input(h.batch)
                    }
                };
                mining_rows += adv.as_ref().map_or(0, |a| a.rows());
                // Dropout for this objective step only: mining above and everything after the
                // loop run the model without it.
                self.model.lora_dropout = (c.lora_dropout > 0.0)
                    .then(|| LoraDropout::for_micro_batch(c.lora_dropout, c.seed, step, micro));
                let t = objective_step(
                    &self.model,
                    &c,
                    step,
                    &targets,
                    &b,
                    &h,
                    &r,
                    Some(&mut grads),
                    adv.as_ref(),
                    frozen,
                );
                self.model.lora_dropout = None;
                let t = t?;
                if let Some(bad) = t.non_finite() {
                    bar.abandon();
                    bail!(
                        "step {}: loss term {bad:?} is not finite ({:?}); stopped before the update, last checkpoint in {} is intact",
                        step + 1,
                        t.terms,
                        checkpoint_dir(&self.out).display()
                    );
                }
                terms.add(&t);
            }
            terms.scale(1.0 / c.grad_accum as f64);
            let norms = grad_norms(&self.model, &grads)?;
            if !norms[0].1.is_finite() {
                bar.abandon();
                let which = norms
                    .iter()
                    .skip(1)
                    .find(|n| !n.1.is_finite())
                    .map_or("grad_norm", |n| n.0.as_str());
                bail!(
                    "step {}: gradient is not finite ({which}); stopped before the update, last checkpoint in {} is intact",
                    step + 1,
                    checkpoint_dir(&self.out).display()
                );
            }
            // AdamW where the factors live (the GPU's adamw_step kernel is bit-identical to
            // the CPU's step).
            self.opt.step(
                &adam,
                step as u64 + 1,
                &mut self.model,
                &grads,
                1.0 / c.grad_accum as f32,
            )?;
            self.state.step += 1;
            done_here += 1;
            self.state.last_total = Some(terms.total);
            first_total.get_or_insert(terms.total);

            let mut line = serde_json::Map::new();
            line.insert("step".into(), self.state.step.into());
            line.insert("loss".into(), terms.total.into());
            for (n, v) in terms.terms.iter().chain(&norms) {
                line.insert(n.clone(), (*v).into());
            }
            line.insert("lr".into(), adam.lr.into());
            if c_mining(&c) {
                line.insert("mining_rows".into(), mining_rows.into());
                if let Some(l) = self.miner.state.running_loss {
                    line.insert("mining_attack_loss".into(), l.into());
                }
            }
            line.insert("seconds".into(), t0.elapsed().as_secs_f64().into());
            writeln!(metrics, "{}", serde_json::Value::Object(line))
                .context("writing metrics.jsonl")?;
            let msg: Vec<String> = terms
                .terms
                .iter()
                .map(|(n, v)| format!("{n} {v:.4}"))
                .collect();
            bar.set_message(format!("loss {:.4} | {}", terms.total, msg.join(" ")));
            bar.inc(1);
            if self.state.step.is_multiple_of(c.save_every) || self.state.step == c.steps {
                self.save_checkpoint()?;
            }
        }
        if interrupted {
            self.save_checkpoint()?;
            bar.abandon_with_message(format!(
                "interrupted: checkpoint at step {} saved",
                self.state.step
            ));
        } else {
            bar.finish();
            self.sync_host()?;
            save_peft_trained(&self.out, &self.adapter, &self.state.model, c.lora_dropout)?;
        }
        Ok(TrainOutcome {
            steps_done: self.state.step,
            interrupted,
            first_total,
            last_total: self.state.last_total,
        })
    }
}

fn moment_name(i: usize, ab: &str, mv: &str) -> String {
    format!("{i}.{ab}.{mv}")
}

fn save_moments(path: &Path, adapter: &LoraAdapter, moments: &[(Moments, Moments)]) -> Result<()> {
    let mut bufs: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for (i, ((ma, mb), _)) in moments.iter().zip(&adapter.pairs).enumerate() {
        for (ab, m) in [("A", ma), ("B", mb)] {
            bufs.push((
                moment_name(i, ab, "m"),
                bytemuck::cast_slice(&m.m).to_vec(),
                m.m.len(),
            ));
            bufs.push((
                moment_name(i, ab, "v"),
                bytemuck::cast_slice(&m.v).to_vec(),
                m.v.len(),
            ));
        }
    }
    let views = bufs
        .iter()
        .map(|(n, b, len)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*len], b)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    write_atomic(path, &safetensors::serialize(views, None)?)
}

fn load_moments(path: &Path, adapter: &LoraAdapter) -> Result<Vec<(Moments, Moments)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: corrupt optimiser state", path.display()))?;
    let get = |name: &str, len: usize| -> Result<Vec<f32>> {
        let t = st
            .tensor(name)
            .with_context(|| format!("{}: missing tensor {name}", path.display()))?;
        ensure!(
            t.shape() == [len],
            "{}: tensor {name} has shape {:?}, expected [{len}]",
            path.display(),
            t.shape()
        );
        Ok(t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect())
    };
    adapter
        .pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ma = Moments {
                m: get(&moment_name(i, "A", "m"), p.a.len())?,
                v: get(&moment_name(i, "A", "v"), p.a.len())?,
            };
            let mb = Moments {
                m: get(&moment_name(i, "B", "m"), p.b.len())?,
                v: get(&moment_name(i, "B", "v"), p.b.len())?,
            };
            Ok((ma, mb))
        })
        .collect()
}
