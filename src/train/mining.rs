//! Adversarial hard-negative mining with the embedding-space attack (CRL paper): on every
//! `every`-th optimiser step, with probability `prob`, a short attack on the harmful prompts of
//! the current batch finds soft tokens that make the tuned model produce the harmful answer;
//! while the running attack loss says the attack works, that step's harmful set is run with
//! those soft tokens inserted at the end of the user turn, so the objective pushes the ATTACKED
//! harmful representations away. The attack runs only on the steps that may use it: its soft
//! tokens fit this batch's prompts. Response positions do not move (the prompt is left-padded),
//! so masks and the frozen model's clean representations still align.
//!
//! `latent` mining (the authors' code) instead trains a small adversary inside the model: every
//! `every` steps a fresh `h <- h + D h + b` (D = 0, b small, so `A = I + D` starts at the
//! identity) is placed at a random early hidden-state index and trained with Adam for
//! `attack_steps` steps (learning rate `step_size`) to lower the tuned model's cross-entropy on
//! the first `target_tokens` tokens of the harmful answers; on later steps, under the same
//! probability and success rule, the harmful set's tuned pass runs with it.

use super::data::{Example, TokenBatch};
use crate::attack::embedding::{attack, AttackLayout, EmbeddingAttackConfig};
use crate::attack::pgd::{update_step, Ball, Update};
use crate::backend::BackwardOps;
use crate::llama::{Input, LatentHook, Llama, LogitsMode, LoraGrads};
use crate::model::ChatTokenizer;
use crate::objectives::ce::target_ce;
use crate::util::Rng;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MiningKind {
    None,
    Embedding,
    Latent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MiningConfig {
    pub kind: MiningKind,
    /// Refresh the attacks every this many optimiser steps.
    pub every: usize,
    /// Probability that a step uses the attacked representations.
    pub prob: f64,
    pub attack_steps: usize,
    pub step_size: f32,
    pub n_soft: usize,
    /// Tokens of the harmful answer the attack targets.
    pub target_tokens: usize,
    /// The attack "works" while the running (EMA) attack loss is below this.
    pub success_loss: f64,
    pub ema: f64,
    /// Latent mining: the adversary's hidden-state index is drawn from this inclusive range
    /// (default: 1 ..= a quarter of the depth, "a random early layer").
    pub latent_layers: Option<(usize, usize)>,
    /// Latent mining: standard deviation of the adversary's initial bias.
    pub latent_init_std: f32,
}

impl Default for MiningConfig {
    fn default() -> Self {
        Self {
            kind: MiningKind::None,
            every: 10,
            prob: 0.25,
            attack_steps: 10,
            step_size: 1e-2,
            n_soft: 10,
            target_tokens: 16,
            success_loss: 1.0,
            ema: 0.5,
            latent_layers: None,
            latent_init_std: 1e-3,
        }
    }
}

/// Resumable part of the miner (the soft tokens go to `mining.safetensors`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinerState {
    pub running_loss: Option<f64>,
    pub rng: Rng,
    /// Hidden-state index of the current latent adversary (its D and b go to
    /// `mining.safetensors`).
    #[serde(default)]
    pub latent_index: Option<usize>,
}

pub struct Miner {
    pub cfg: MiningConfig,
    pub state: MinerState,
    /// Optimised soft tokens per harmful example index, `[n_soft, hidden]`.
    pub soft: BTreeMap<usize, Vec<f32>>,
    /// The latent adversary's `(D [hidden, hidden], b [hidden])`.
    pub latent: Option<(Vec<f32>, Vec<f32>)>,
}

/// How the harmful set's tuned pass is attacked on a mining step.
pub enum AdvInput {
    /// Soft tokens inserted into the prompts.
    Embeds {
        /// `[batch * seq, hidden]`
        embeds: Vec<f32>,
        /// `[batch, seq]`
        key_mask: Vec<f32>,
        /// Rows that carry soft tokens.
        rows: usize,
    },
    /// The latent adversary in the residual stream (every row).
    Latent {
        index: usize,
        d: Vec<f32>,
        b: Vec<f32>,
        rows: usize,
    },
}

impl AdvInput {
    /// Harmful rows that run attacked.
    pub fn rows(&self) -> usize {
        match self {
            Self::Embeds { rows, .. } | Self::Latent { rows, .. } => *rows,
        }
    }
}

impl Miner {
    pub fn new(cfg: MiningConfig, seed: u64) -> Self {
        Self {
            cfg,
            state: MinerState {
                running_loss: None,
                rng: Rng::new(seed ^ 0x6d696e65),
                latent_index: None,
            },
            soft: BTreeMap::new(),
            latent: None,
        }
    }

    fn attack_cfg(&self) -> EmbeddingAttackConfig {
        EmbeddingAttackConfig {
            n_soft: self.cfg.n_soft,
            steps: self.cfg.attack_steps,
            step_size: self.cfg.step_size,
            gen_tokens: 0,
            ..Default::default()
        }
    }

    fn layout(&self, tok: &ChatTokenizer, ex: &Example) -> Result<AttackLayout> {
        let ids = tok.encode(&ex.response, false)?;
        let target = tok.decode(&ids[..ids.len().min(self.cfg.target_tokens)], false)?;
        AttackLayout::new(tok, &ex.prompt, &target, &self.attack_cfg())
    }

    /// Attacks each `(index, example)` with the current (tuned) model; returns the mean final loss.
    pub fn refresh<B: BackwardOps>(
        &mut self,
        model: &Llama<B>,
        tok: &ChatTokenizer,
        examples: &[(usize, &Example)],
    ) -> Result<f64> {
        let mut total = 0.0;
        for (i, ex) in examples {
            let r = attack(model, tok, &self.layout(tok, ex)?, &self.attack_cfg(), &[])?;
            total += r.final_loss;
            self.soft.insert(*i, r.soft);
        }
        let mean = total / examples.len().max(1) as f64;
        self.update_running(mean);
        Ok(mean)
    }

    fn update_running(&mut self, loss: f64) {
        self.state.running_loss = Some(match self.state.running_loss {
            Some(prev) => self.cfg.ema * prev + (1.0 - self.cfg.ema) * loss,
            None => loss,
        });
    }

    /// Latent mining: trains a fresh adversary on the harmful batch `tb` against the current
    /// (tuned) model; returns its final cross-entropy on the targeted answer tokens.
    pub fn refresh_latent<B: BackwardOps>(
        &mut self,
        model: &Llama<B>,
        tb: &TokenBatch,
    ) -> Result<f64> {
        let cfg = &model.cfg;
        let (d, l) = (cfg.hidden_size, cfg.num_layers);
        anyhow::ensure!(l >= 2, "latent mining needs a model with at least 2 blocks");
        let (lo, hi) = self.cfg.latent_layers.unwrap_or((1, (l / 4).max(1)));
        anyhow::ensure!(
            lo >= 1 && lo <= hi && hi < l,
            "mining.latent_layers ({lo}, {hi}) must lie within 1..={}",
            l - 1
        );
        let index = lo + (self.state.rng.uniform() as f64 * (hi - lo + 1) as f64) as usize;
        let index = index.min(hi);
        let mut dm = vec![0f32; d * d];
        let mut bv: Vec<f32> = (0..d)
            .map(|_| self.state.rng.normal() * self.cfg.latent_init_std)
            .collect();
        // Row t-1 predicts token t, for the first `target_tokens` response tokens of each row.
        let mut targets = Vec::new();
        for b in 0..tb.batch {
            let mut taken = 0;
            for t in 1..tb.seq {
                let i = b * tb.seq + t;
                if tb.response_mask[i] > 0.0 && taken < self.cfg.target_tokens {
                    targets.push((i - 1, tb.input_ids[i]));
                    taken += 1;
                }
            }
        }
        anyhow::ensure!(
            !targets.is_empty(),
            "latent mining: no response tokens in the batch"
        );
        let be = &model.backend;
        let mask = be.upload_f32(&tb.attention_mask)?;
        let mut grads = LoraGrads::new(model)?.with_latent(be, d)?;
        let (mut adam_d, mut adam_b) = (None, None);
        let mut loss = f64::NAN;
        for step in 0..=self.cfg.attack_steps {
            let hook = LatentHook::new(be, index, l, &dm, &bv)?;
            let (out, acts) = model.forward_train_hooked(
                Input::Ids(&tb.input_ids),
                tb.batch,
                tb.seq,
                Some(&mask),
                &[],
                LogitsMode::All,
                true,
                Some(&hook),
            )?;
            let logits = be.download(out.logits.as_ref().expect("logits requested"))?;
            let mut dl = vec![0f32; logits.len()];
            loss = target_ce(&logits, cfg.vocab_size, &targets, Some(&mut dl)).0;
            anyhow::ensure!(
                loss.is_finite(),
                "latent mining: adversary step {step}: loss is not finite"
            );
            if step == self.cfg.attack_steps {
                break;
            }
            grads.zero(be)?;
            let dl = be.upload_f32(&dl)?;
            model.backward(&acts, &[], Some(&dl), Some(&mask), Some(&mut grads), false)?;
            let (gd, gb) = grads.latent.as_ref().expect("latent gradients requested");
            let (gd, gb) = (be.download(gd)?, be.download(gb)?);
            let zd = vec![0f32; dm.len()];
            let zb = vec![0f32; bv.len()];
            let lr = self.cfg.step_size;
            update_step(
                Update::Adam,
                &mut dm,
                &gd,
                &zd,
                &mut adam_d,
                lr,
                Ball::None,
                d,
            );
            update_step(
                Update::Adam,
                &mut bv,
                &gb,
                &zb,
                &mut adam_b,
                lr,
                Ball::None,
                d,
            );
        }
        self.state.latent_index = Some(index);
        self.latent = Some((dm, bv));
        self.update_running(loss);
        Ok(loss)
    }

    /// Whether the running attack loss says the attack works.
    fn attack_works(&self) -> bool {
        self.state
            .running_loss
            .is_some_and(|l| l < self.cfg.success_loss)
    }

    /// Latent mining: draws whether this step mines; if so, the adversary to run with.
    pub fn latent_input(&mut self, rows: usize) -> Option<AdvInput> {
        let draw = self.state.rng.uniform() as f64;
        if draw >= self.cfg.prob || !self.attack_works() {
            return None;
        }
        let (index, (d, b)) = (self.state.latent_index?, self.latent.as_ref()?);
        Some(AdvInput::Latent {
            index,
            d: d.clone(),
            b: b.clone(),
            rows,
        })
    }

    /// Embedding mining on a refresh step: draws whether this step mines and, if so, attacks
    /// the harmful batch (`examples`, tokenised as `tb`) with the tuned model and, when the
    /// running attack loss says the attack works, returns the attacked input. The attack runs
    /// only when its result can be used: the soft tokens belong to this batch's prompts, which
    /// later batches rarely share.
    pub fn mine_embedding<B: BackwardOps>(
        &mut self,
        model: &Llama<B>,
        tok: &ChatTokenizer,
        tb: &TokenBatch,
        examples: &[(usize, &Example)],
        max_prompt: usize,
    ) -> Result<Option<AdvInput>> {
        let draw = self.state.rng.uniform() as f64;
        if draw >= self.cfg.prob {
            return Ok(None);
        }
        self.refresh(model, tok, examples)?;
        if !self.attack_works() {
            return Ok(None);
        }
        self.adversarial_input(model, tok, (tb, examples), max_prompt)
    }

    /// The attacked input of the harmful batch from the stored soft tokens of its examples
    /// (`None` when none has any).
    fn adversarial_input<B: BackwardOps>(
        &self,
        model: &Llama<B>,
        tok: &ChatTokenizer,
        (tb, examples): (&TokenBatch, &[(usize, &Example)]),
        max_prompt: usize,
    ) -> Result<Option<AdvInput>> {
        let d = model.cfg.hidden_size;
        let be = &model.backend;
        let mut embeds = be.download(&model.embed_ids(&tb.input_ids)?)?;
        let mut key_mask = tb.attention_mask.clone();
        let mut rows = 0;
        for (b, (i, ex)) in examples.iter().enumerate() {
            let Some(soft) = self.soft.get(i) else {
                continue;
            };
            let mut lay = self.layout(tok, ex)?;
            let n = soft.len() / d;
            let mut len = lay.prefix.len() + n + lay.suffix.len();
            if len > max_prompt {
                // Like the clean prompt, keep the end (the soft tokens and the generation
                // prompt) and drop the start; a window too small even for that stays clean.
                let over = len - max_prompt;
                if over > lay.prefix.len() {
                    continue;
                }
                lay.prefix.drain(..over);
                len = max_prompt;
            }
            let start = b * tb.seq + max_prompt - len;
            let pe = be.download(&model.embed_ids(&lay.prefix)?)?;
            let se = be.download(&model.embed_ids(&lay.suffix)?)?;
            let row = &mut embeds[start * d..(b * tb.seq + max_prompt) * d];
            row[..pe.len()].copy_from_slice(&pe);
            row[pe.len()..pe.len() + soft.len()].copy_from_slice(soft);
            row[pe.len() + soft.len()..].copy_from_slice(&se);
            let m = &mut key_mask[b * tb.seq..b * tb.seq + max_prompt];
            m.fill(0.0);
            m[max_prompt - len..].fill(1.0);
            rows += 1;
        }
        Ok((rows > 0).then_some(AdvInput::Embeds {
            embeds,
            key_mask,
            rows,
        }))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut bufs: Vec<(String, Vec<u8>, usize)> = self
            .soft
            .iter()
            .map(|(i, v)| (i.to_string(), bytemuck::cast_slice(v).to_vec(), v.len()))
            .collect();
        if let Some((d, b)) = &self.latent {
            bufs.push(("latent_d".into(), bytemuck::cast_slice(d).to_vec(), d.len()));
            bufs.push(("latent_b".into(), bytemuck::cast_slice(b).to_vec(), b.len()));
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
        crate::llama::peft::write_atomic(path, &safetensors::serialize(views, None)?)
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: corrupt mining state", path.display()))?;
        self.soft.clear();
        let floats = |t: &safetensors::tensor::TensorView| -> Vec<f32> {
            t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        };
        let (mut ld, mut lb) = (None, None);
        for (name, t) in st.tensors() {
            match name.as_str() {
                "latent_d" => {
                    ld = Some(floats(&t));
                    continue;
                }
                "latent_b" => {
                    lb = Some(floats(&t));
                    continue;
                }
                _ => {}
            }
            let i: usize = name
                .parse()
                .with_context(|| format!("{}: bad tensor name {name}", path.display()))?;
            self.soft.insert(i, floats(&t));
        }
        self.latent = ld.zip(lb);
        Ok(())
    }
}
