//! Adversarial hard-negative mining with the embedding-space attack (CRL paper): every
//! `every` optimiser steps, a short attack on the harmful prompts of the current batch finds
//! soft tokens that make the tuned model produce the harmful answer; on later steps, with
//! probability `prob` and while the running attack loss says the attack works, the harmful
//! set is run with those soft tokens inserted at the end of the user turn, so the objective
//! pushes the ATTACKED harmful representations away. Response positions do not move (the
//! prompt is left-padded), so masks and the frozen model's clean representations still align.

use super::data::{Example, TokenBatch};
use crate::attack::embedding::{attack, AttackLayout, EmbeddingAttackConfig};
use crate::backend::BackwardOps;
use crate::llama::Llama;
use crate::model::ChatTokenizer;
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
        }
    }
}

/// Resumable part of the miner (the soft tokens go to `mining.safetensors`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinerState {
    pub running_loss: Option<f64>,
    pub rng: Rng,
}

pub struct Miner {
    pub cfg: MiningConfig,
    pub state: MinerState,
    /// Optimised soft tokens per harmful example index, `[n_soft, hidden]`.
    pub soft: BTreeMap<usize, Vec<f32>>,
}

/// The harmful set's tuned-pass input with soft tokens inserted.
pub struct AdvInput {
    /// `[batch * seq, hidden]`
    pub embeds: Vec<f32>,
    /// `[batch, seq]`
    pub key_mask: Vec<f32>,
    /// Rows that carry soft tokens.
    pub rows: usize,
}

impl Miner {
    pub fn new(cfg: MiningConfig, seed: u64) -> Self {
        Self {
            cfg,
            state: MinerState {
                running_loss: None,
                rng: Rng::new(seed ^ 0x6d696e65),
            },
            soft: BTreeMap::new(),
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
        self.state.running_loss = Some(match self.state.running_loss {
            Some(prev) => self.cfg.ema * prev + (1.0 - self.cfg.ema) * mean,
            None => mean,
        });
        Ok(mean)
    }

    /// Draws whether this step mines; if so, builds the attacked input of the harmful batch.
    pub fn adversarial_input<B: BackwardOps>(
        &mut self,
        model: &Llama<B>,
        tok: &ChatTokenizer,
        tb: &TokenBatch,
        examples: &[(usize, &Example)],
        max_prompt: usize,
    ) -> Result<Option<AdvInput>> {
        let draw = self.state.rng.uniform() as f64;
        let works = self
            .state
            .running_loss
            .is_some_and(|l| l < self.cfg.success_loss);
        if draw >= self.cfg.prob || !works {
            return Ok(None);
        }
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
        Ok((rows > 0).then_some(AdvInput {
            embeds,
            key_mask,
            rows,
        }))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let bufs: Vec<(String, Vec<u8>, usize)> = self
            .soft
            .iter()
            .map(|(i, v)| (i.to_string(), bytemuck::cast_slice(v).to_vec(), v.len()))
            .collect();
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
        for (name, t) in st.tensors() {
            let i: usize = name
                .parse()
                .with_context(|| format!("{}: bad tensor name {name}", path.display()))?;
            self.soft.insert(
                i,
                t.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            );
        }
        Ok(())
    }
}
