//! Embedding-space attack (Schwinn et al. 2024): `n` soft tokens inserted at the end of the
//! user turn are the only variables; the loss is the mean cross-entropy of the target string
//! under teacher forcing; signed-gradient PGD with an optional L2/L-inf ball; early stop when
//! every target token is the argmax; success is then judged on the greedy generation.

use super::pgd::{sign_step, Ball};
use crate::backend::BackwardOps;
use crate::llama::{Input, Llama, LogitsMode};
use crate::model::{ChatTokenizer, Message};
use crate::objectives::ce::target_ce;
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EmbeddingAttackConfig {
    pub n_soft: usize,
    /// Text whose tokens initialise the soft tokens (repeated/truncated to `n_soft`).
    pub init: String,
    pub steps: usize,
    pub step_size: f32,
    pub ball: Ball,
    /// Stop as soon as every target token is the argmax under teacher forcing.
    pub early_stop: bool,
    /// ...or when the loss falls below this.
    pub loss_threshold: Option<f64>,
    pub gen_tokens: usize,
}

impl Default for EmbeddingAttackConfig {
    fn default() -> Self {
        Self {
            n_soft: 20,
            init: "! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! !".into(),
            steps: 100,
            step_size: 1e-3,
            ball: Ball::None,
            early_stop: true,
            loss_threshold: None,
            gen_tokens: 256,
        }
    }
}

/// Token layout of one attacked conversation: `prefix | soft | suffix | target`.
#[derive(Debug, Clone, PartialEq)]
pub struct AttackLayout {
    pub prefix: Vec<u32>,
    pub soft_init: Vec<u32>,
    pub suffix: Vec<u32>,
    pub target: Vec<u32>,
}

const PLACEHOLDER: &str = "\u{1}REPSHIELD_SOFT_TOKENS\u{1}";

impl AttackLayout {
    /// Renders the chat template with the soft tokens at the end of the user turn.
    pub fn new(
        tok: &ChatTokenizer,
        behaviour: &str,
        target: &str,
        cfg: &EmbeddingAttackConfig,
    ) -> Result<Self> {
        let text = tok.render_chat(
            &[Message::new("user", &format!("{behaviour}{PLACEHOLDER}"))],
            true,
        )?;
        let (pre, post) = text
            .split_once(PLACEHOLDER)
            .context("chat template dropped the user message")?;
        let init = tok.encode(&format!(" {}", cfg.init), false)?;
        ensure!(
            !init.is_empty(),
            "the soft-token init string {:?} tokenises to nothing",
            cfg.init
        );
        let soft_init: Vec<u32> = init.iter().cycle().take(cfg.n_soft).copied().collect();
        let target = tok.encode(target, false)?;
        ensure!(!target.is_empty(), "empty attack target");
        Ok(Self {
            prefix: tok.encode(pre, false)?,
            soft_init,
            suffix: tok.encode(post, false)?,
            target,
        })
    }
    pub fn prompt_len(&self) -> usize {
        self.prefix.len() + self.soft_init.len() + self.suffix.len()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AttackResult {
    pub steps: usize,
    pub final_loss: f64,
    /// Every target token was the argmax under teacher forcing.
    pub teacher_forced_success: bool,
    pub losses: Vec<f64>,
    /// Wall time of the optimisation (not the generation), seconds.
    pub seconds: f64,
    /// Greedy continuation after the attacked prompt.
    pub response: String,
    /// The optimised soft-token embeddings, `[n_soft, hidden]` (hard-negative mining reuses them).
    #[serde(skip)]
    pub soft: Vec<f32>,
}

/// One PGD run on one behaviour. Works with any backend that has the backward ops.
pub fn attack<B: BackwardOps>(
    model: &Llama<B>,
    tok: &ChatTokenizer,
    layout: &AttackLayout,
    cfg: &EmbeddingAttackConfig,
    stop_tokens: &[u32],
) -> Result<AttackResult> {
    let be = &model.backend;
    let d = model.cfg.hidden_size;
    let vocab = model.cfg.vocab_size;
    let n = layout.soft_init.len();
    let p0 = layout.prefix.len();
    let mut ids = layout.prefix.clone();
    ids.extend(&layout.soft_init);
    ids.extend(&layout.suffix);
    let prompt_len = ids.len();
    ids.extend(&layout.target);
    let seq = ids.len();
    let mut embeds = be.download(&model.embed_ids(&ids)?)?;
    let init: Vec<f32> = embeds[p0 * d..(p0 + n) * d].to_vec();
    // Row prompt_len - 1 + i predicts target[i].
    let targets: Vec<(usize, u32)> = layout
        .target
        .iter()
        .enumerate()
        .map(|(i, &t)| (prompt_len - 1 + i, t))
        .collect();

    let t0 = std::time::Instant::now();
    let mut losses = Vec::new();
    let mut success = false;
    let mut steps = 0;
    for step in 0..=cfg.steps {
        let e = be.upload(&embeds)?;
        let (out, acts) =
            model.forward_train(Input::Embeds(&e), 1, seq, None, &[], LogitsMode::All, true)?;
        let logits = be.download(out.logits.as_ref().expect("logits requested"))?;
        let mut dlogits = vec![0f32; logits.len()];
        let (loss, ok) = target_ce(&logits, vocab, &targets, Some(&mut dlogits));
        ensure!(loss.is_finite(), "attack step {step}: loss is not finite");
        losses.push(loss);
        success = ok;
        steps = step;
        let done = (cfg.early_stop && ok)
            || cfg.loss_threshold.is_some_and(|t| loss < t)
            || step == cfg.steps;
        if done {
            break;
        }
        let dl = be.upload_f32(&dlogits)?;
        let de = model
            .backward(&acts, &[], Some(&dl), None, None, true)?
            .expect("input gradient requested");
        let de = be.download(&de)?;
        let soft = &mut embeds[p0 * d..(p0 + n) * d];
        sign_step(
            soft,
            &de[p0 * d..(p0 + n) * d],
            &init,
            cfg.step_size,
            cfg.ball,
            d,
        );
    }

    let seconds = t0.elapsed().as_secs_f64();
    // Greedy generation after the attacked prompt (none for mining: gen_tokens = 0).
    let mut gen = Vec::new();
    if cfg.gen_tokens > 0 {
        let mut cache = model.new_cache(1, prompt_len + cfg.gen_tokens)?;
        let e = be.upload(&embeds[..prompt_len * d])?;
        let mut out = model.forward_embeds(&e, 1, &mut cache, None, &[], LogitsMode::Last)?;
        for _ in 0..cfg.gen_tokens {
            let next =
                be.argmax_rows(out.logits.as_ref().expect("logits"), model.cfg.vocab_size)?[0];
            if stop_tokens.contains(&next) {
                break;
            }
            gen.push(next);
            out = model.forward(&[next], 1, &mut cache, None, &[], LogitsMode::Last)?;
        }
    }
    let soft = embeds[p0 * d..(p0 + n) * d].to_vec();
    Ok(AttackResult {
        soft,
        steps,
        final_loss: *losses.last().expect("at least one step"),
        teacher_forced_success: success,
        losses,
        seconds,
        response: tok.decode(&gen, true)?,
    })
}
