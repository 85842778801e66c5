//! Embedding-space attack (Schwinn et al. 2024): `n` soft tokens inserted at the end of the
//! user turn are the only variables; the loss is the mean cross-entropy of the target string
//! under teacher forcing; signed-gradient PGD with an optional L2/L-inf ball; early stop when
//! every target token is the argmax; success is then judged on the greedy generation.

use super::pgd::{update_step, Ball, Update};
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
    /// Signed-step size, or Adam's learning rate.
    pub step_size: f32,
    pub update: Update,
    pub ball: Ball,
    /// Stop as soon as every target token is the argmax under teacher forcing.
    pub early_stop: bool,
    /// ...or when the loss falls below this.
    pub loss_threshold: Option<f64>,
    pub gen_tokens: usize,
    /// Restart number: 0 starts from the init tokens' embeddings; restart r >= 1 adds Gaussian
    /// noise seeded by r, of standard deviation `init_noise` x the init embeddings' RMS, then
    /// projects the start onto the ball (which stays centred on the init tokens).
    pub restart: usize,
    pub init_noise: f32,
}

impl Default for EmbeddingAttackConfig {
    fn default() -> Self {
        Self {
            n_soft: 20,
            init: "! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! !".into(),
            steps: 100,
            step_size: 1e-3,
            update: Update::Sign,
            ball: Ball::None,
            early_stop: true,
            loss_threshold: None,
            gen_tokens: 256,
            restart: 0,
            init_noise: 0.5,
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

/// The start of restart `cfg.restart` from the init tokens' embeddings `init` (see
/// [`EmbeddingAttackConfig::restart`]).
pub fn restart_start(init: &[f32], cfg: &EmbeddingAttackConfig, dim: usize) -> Vec<f32> {
    let mut e = init.to_vec();
    if cfg.restart == 0 || cfg.init_noise == 0.0 {
        return e;
    }
    let rms = (init.iter().map(|x| x * x).sum::<f32>() / init.len().max(1) as f32).sqrt();
    let mut rng = crate::util::Rng::new(0x72657374 ^ cfg.restart as u64);
    for x in &mut e {
        *x += rng.normal() * cfg.init_noise * rms;
    }
    super::pgd::project(&mut e, init, cfg.ball, dim);
    e
}

/// Embeddings of one attacked conversation with its soft-token rows, and the target rows.
struct Prepared {
    embeds: Vec<f32>,
    /// First soft-token row.
    p0: usize,
    prompt_len: usize,
    seq: usize,
    /// `(row, token)`: row `prompt_len - 1 + i` predicts `target[i]`.
    targets: Vec<(usize, u32)>,
}

fn prepare<B: BackwardOps>(model: &Llama<B>, layout: &AttackLayout) -> Result<Prepared> {
    let mut ids = layout.prefix.clone();
    ids.extend(&layout.soft_init);
    ids.extend(&layout.suffix);
    let prompt_len = ids.len();
    ids.extend(&layout.target);
    let targets = layout
        .target
        .iter()
        .enumerate()
        .map(|(i, &t)| (prompt_len - 1 + i, t))
        .collect();
    Ok(Prepared {
        embeds: model.backend.download(&model.embed_ids(&ids)?)?,
        p0: layout.prefix.len(),
        prompt_len,
        seq: ids.len(),
        targets,
    })
}

/// Target CE of one conversation, whether every target token is the argmax, and (unless
/// `want_grad` is false) the gradient with respect to its soft-token rows.
fn loss_and_grad<B: BackwardOps>(
    model: &Llama<B>,
    p: &Prepared,
    n_soft: usize,
    want_grad: bool,
) -> Result<(f64, bool, Option<Vec<f32>>)> {
    let be = &model.backend;
    let d = model.cfg.hidden_size;
    let e = be.upload(&p.embeds)?;
    let (out, acts) = model.forward_train(
        Input::Embeds(&e),
        1,
        p.seq,
        None,
        &[],
        LogitsMode::All,
        true,
    )?;
    let logits = be.download(out.logits.as_ref().expect("logits requested"))?;
    let mut dlogits = vec![0f32; logits.len()];
    let (loss, ok) = target_ce(
        &logits,
        model.cfg.vocab_size,
        &p.targets,
        Some(&mut dlogits),
    );
    if !want_grad {
        return Ok((loss, ok, None));
    }
    let dl = be.upload_f32(&dlogits)?;
    let de = model
        .backward(&acts, &[], Some(&dl), None, None, true)?
        .expect("input gradient requested");
    let de = be.download(&de)?;
    Ok((loss, ok, Some(de[p.p0 * d..(p.p0 + n_soft) * d].to_vec())))
}

/// Greedy continuation after the first `prompt_len` rows of `embeds`.
fn generate_after<B: BackwardOps>(
    model: &Llama<B>,
    tok: &ChatTokenizer,
    embeds: &[f32],
    prompt_len: usize,
    gen_tokens: usize,
    stop_tokens: &[u32],
) -> Result<String> {
    let be = &model.backend;
    let d = model.cfg.hidden_size;
    let mut gen = Vec::new();
    if gen_tokens > 0 {
        let mut cache = model.new_cache(1, prompt_len + gen_tokens)?;
        let e = be.upload(&embeds[..prompt_len * d])?;
        let mut out = model.forward_embeds(&e, 1, &mut cache, None, &[], LogitsMode::Last)?;
        for _ in 0..gen_tokens {
            let next =
                be.argmax_rows(out.logits.as_ref().expect("logits"), model.cfg.vocab_size)?[0];
            if stop_tokens.contains(&next) {
                break;
            }
            gen.push(next);
            out = model.forward(&[next], 1, &mut cache, None, &[], LogitsMode::Last)?;
        }
    }
    tok.decode(&gen, true)
}

/// One PGD run on one behaviour. Works with any backend that has the backward ops.
pub fn attack<B: BackwardOps>(
    model: &Llama<B>,
    tok: &ChatTokenizer,
    layout: &AttackLayout,
    cfg: &EmbeddingAttackConfig,
    stop_tokens: &[u32],
) -> Result<AttackResult> {
    let d = model.cfg.hidden_size;
    let n = layout.soft_init.len();
    let mut p = prepare(model, layout)?;
    let soft_rows = p.p0 * d..(p.p0 + n) * d;
    let init: Vec<f32> = p.embeds[soft_rows.clone()].to_vec();
    p.embeds[soft_rows.clone()].copy_from_slice(&restart_start(&init, cfg, d));

    let t0 = std::time::Instant::now();
    let mut losses = Vec::new();
    let mut success = false;
    let mut steps = 0;
    let mut adam = None;
    for step in 0..=cfg.steps {
        let done_after = |loss: f64, ok: bool| {
            (cfg.early_stop && ok) || cfg.loss_threshold.is_some_and(|t| loss < t)
        };
        // The last evaluation needs no gradient.
        let (loss, ok, grad) = loss_and_grad(model, &p, n, step < cfg.steps)?;
        ensure!(loss.is_finite(), "attack step {step}: loss is not finite");
        losses.push(loss);
        success = ok;
        steps = step;
        if done_after(loss, ok) || step == cfg.steps {
            break;
        }
        let grad = grad.expect("gradient requested");
        update_step(
            cfg.update,
            &mut p.embeds[soft_rows.clone()],
            &grad,
            &init,
            &mut adam,
            cfg.step_size,
            cfg.ball,
            d,
        );
    }
    let seconds = t0.elapsed().as_secs_f64();
    // Greedy generation after the attacked prompt (none for mining: gen_tokens = 0).
    let response = generate_after(
        model,
        tok,
        &p.embeds,
        p.prompt_len,
        cfg.gen_tokens,
        stop_tokens,
    )?;
    Ok(AttackResult {
        soft: p.embeds[soft_rows].to_vec(),
        steps,
        final_loss: *losses.last().expect("at least one step"),
        teacher_forced_success: success,
        losses,
        seconds,
        response,
    })
}

/// Several behaviours attacked as one batch (the same attack as [`attack`] for each): the
/// conversations are left-padded to the longest one with the padded keys masked, so a single
/// forward and backward serve every behaviour still running; each keeps its own soft tokens,
/// loss curve, update rule state and early stop, and leaves the batch when done. A step's wall
/// time is shared among the behaviours it served. Generation then runs per behaviour.
pub fn attack_batch<B: BackwardOps>(
    model: &Llama<B>,
    tok: &ChatTokenizer,
    layouts: &[AttackLayout],
    cfg: &EmbeddingAttackConfig,
    stop_tokens: &[u32],
) -> Result<Vec<AttackResult>> {
    let be = &model.backend;
    let (d, vocab) = (model.cfg.hidden_size, model.cfg.vocab_size);
    let k = layouts.len();
    let mut ps: Vec<Prepared> = layouts
        .iter()
        .map(|l| prepare(model, l))
        .collect::<Result<_>>()?;
    let n_of = |i: usize| layouts[i].soft_init.len();
    let inits: Vec<Vec<f32>> = (0..k)
        .map(|i| ps[i].embeds[ps[i].p0 * d..(ps[i].p0 + n_of(i)) * d].to_vec())
        .collect();
    for (i, p) in ps.iter_mut().enumerate() {
        let rows = p.p0 * d..(p.p0 + n_of(i)) * d;
        p.embeds[rows].copy_from_slice(&restart_start(&inits[i], cfg, d));
    }
    let mut adam = vec![None; k];
    let mut losses = vec![Vec::new(); k];
    let mut seconds = vec![0.0; k];
    let mut steps = vec![0; k];
    let mut success = vec![false; k];
    let mut done = vec![false; k];
    for step in 0..=cfg.steps {
        let active: Vec<usize> = (0..k).filter(|&i| !done[i]).collect();
        if active.is_empty() {
            break;
        }
        let t0 = std::time::Instant::now();
        let t = active.iter().map(|&i| ps[i].seq).max().expect("active");
        let rows = active.len() * t;
        let mut embeds = vec![0f32; rows * d];
        let mut mask = vec![0f32; rows];
        for (a, &i) in active.iter().enumerate() {
            let off = a * t + t - ps[i].seq;
            embeds[off * d..(a + 1) * t * d].copy_from_slice(&ps[i].embeds);
            mask[off..(a + 1) * t].fill(1.0);
        }
        let e = be.upload(&embeds)?;
        let m = be.upload_f32(&mask)?;
        let (out, acts) = model.forward_train(
            Input::Embeds(&e),
            active.len(),
            t,
            Some(&m),
            &[],
            LogitsMode::All,
            true,
        )?;
        let logits = be.download(out.logits.as_ref().expect("logits requested"))?;
        let mut dlogits = vec![0f32; logits.len()];
        let mut update = Vec::new();
        for (a, &i) in active.iter().enumerate() {
            let pad = t - ps[i].seq;
            let targets: Vec<(usize, u32)> =
                ps[i].targets.iter().map(|&(r, tk)| (r + pad, tk)).collect();
            let span = a * t * vocab..(a + 1) * t * vocab;
            let (loss, ok) = target_ce(
                &logits[span.clone()],
                vocab,
                &targets,
                Some(&mut dlogits[span]),
            );
            ensure!(
                loss.is_finite(),
                "attack step {step}, behaviour {i}: loss is not finite"
            );
            losses[i].push(loss);
            (success[i], steps[i]) = (ok, step);
            let stop = (cfg.early_stop && ok)
                || cfg.loss_threshold.is_some_and(|th| loss < th)
                || step == cfg.steps;
            if stop {
                done[i] = true;
            } else {
                update.push((a, i));
            }
        }
        if !update.is_empty() {
            let dl = be.upload_f32(&dlogits)?;
            let de = model
                .backward(&acts, &[], Some(&dl), Some(&m), None, true)?
                .expect("input gradient requested");
            let de = be.download(&de)?;
            for (a, i) in update {
                let (p0, n) = (ps[i].p0, n_of(i));
                let row0 = a * t + t - ps[i].seq + p0;
                update_step(
                    cfg.update,
                    &mut ps[i].embeds[p0 * d..(p0 + n) * d],
                    &de[row0 * d..(row0 + n) * d],
                    &inits[i],
                    &mut adam[i],
                    cfg.step_size,
                    cfg.ball,
                    d,
                );
            }
        }
        let share = t0.elapsed().as_secs_f64() / active.len() as f64;
        for &i in &active {
            seconds[i] += share;
        }
    }
    (0..k)
        .map(|i| {
            let p = &ps[i];
            Ok(AttackResult {
                response: generate_after(
                    model,
                    tok,
                    &p.embeds,
                    p.prompt_len,
                    cfg.gen_tokens,
                    stop_tokens,
                )?,
                soft: p.embeds[p.p0 * d..(p.p0 + n_of(i)) * d].to_vec(),
                steps: steps[i],
                final_loss: *losses[i].last().expect("at least one step"),
                teacher_forced_success: success[i],
                losses: std::mem::take(&mut losses[i]),
                seconds: seconds[i],
            })
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct UniversalResult {
    pub steps: usize,
    /// Mean target CE over the training behaviours before every update and after the last.
    pub losses: Vec<f64>,
    /// Training behaviours whose target is forced under teacher forcing at the end.
    pub train_forced: usize,
    pub seconds: f64,
    /// The shared soft tokens, `[n_soft, hidden]`.
    #[serde(skip)]
    pub soft: Vec<f32>,
}

/// Universal mode: ONE set of soft tokens optimised on several behaviours at once (the mean
/// target CE; the signed step follows the summed gradient), initialised from the first
/// layout's init tokens. Early stop when every training target is forced.
pub fn universal_attack<B: BackwardOps>(
    model: &Llama<B>,
    layouts: &[AttackLayout],
    cfg: &EmbeddingAttackConfig,
) -> Result<UniversalResult> {
    ensure!(
        !layouts.is_empty(),
        "universal attack: no training behaviours"
    );
    let d = model.cfg.hidden_size;
    let n = layouts[0].soft_init.len();
    let mut ps: Vec<Prepared> = layouts
        .iter()
        .map(|l| prepare(model, l))
        .collect::<Result<_>>()?;
    let init: Vec<f32> = ps[0].embeds[ps[0].p0 * d..(ps[0].p0 + n) * d].to_vec();
    let mut soft = restart_start(&init, cfg, d);
    let t0 = std::time::Instant::now();
    let mut losses = Vec::new();
    let (mut steps, mut forced) = (0, 0);
    let mut adam = None;
    for step in 0..=cfg.steps {
        let want_grad = step < cfg.steps;
        let mut grad = vec![0f32; n * d];
        let (mut total, mut ok_count) = (0.0, 0);
        for p in &mut ps {
            p.embeds[p.p0 * d..(p.p0 + n) * d].copy_from_slice(&soft);
            let (loss, ok, g) = loss_and_grad(model, p, n, want_grad)?;
            ensure!(
                loss.is_finite(),
                "universal attack step {step}: loss is not finite"
            );
            total += loss;
            ok_count += ok as usize;
            if let Some(g) = g {
                grad.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
            }
        }
        let loss = total / ps.len() as f64;
        losses.push(loss);
        (steps, forced) = (step, ok_count);
        let done = (cfg.early_stop && ok_count == ps.len())
            || cfg.loss_threshold.is_some_and(|t| loss < t)
            || step == cfg.steps;
        if done {
            break;
        }
        update_step(
            cfg.update,
            &mut soft,
            &grad,
            &init,
            &mut adam,
            cfg.step_size,
            cfg.ball,
            d,
        );
    }
    Ok(UniversalResult {
        steps,
        losses,
        train_forced: forced,
        seconds: t0.elapsed().as_secs_f64(),
        soft,
    })
}

/// Teacher-forced success and greedy generation of a held-out behaviour with given soft tokens.
pub fn apply_soft<B: BackwardOps>(
    model: &Llama<B>,
    tok: &ChatTokenizer,
    layout: &AttackLayout,
    soft: &[f32],
    gen_tokens: usize,
    stop_tokens: &[u32],
) -> Result<AttackResult> {
    let d = model.cfg.hidden_size;
    let n = layout.soft_init.len();
    ensure!(
        soft.len() == n * d,
        "soft tokens: {} values, the layout needs {n} x {d}",
        soft.len()
    );
    let mut p = prepare(model, layout)?;
    p.embeds[p.p0 * d..(p.p0 + n) * d].copy_from_slice(soft);
    let (loss, ok, _) = loss_and_grad(model, &p, n, false)?;
    let response = generate_after(model, tok, &p.embeds, p.prompt_len, gen_tokens, stop_tokens)?;
    Ok(AttackResult {
        steps: 0,
        final_loss: loss,
        teacher_forced_success: ok,
        losses: vec![loss],
        seconds: 0.0,
        response,
        soft: soft.to_vec(),
    })
}
