//! Embedding-space attack (Schwinn et al. 2024): `n` soft tokens inserted at the end of the
//! user turn are the only variables; the loss is the mean cross-entropy of the target string
//! under teacher forcing; signed-gradient PGD with an optional L2/L-inf ball; early stop when
//! every target token is the argmax; success is then judged on the greedy generation.

use super::pgd::{Ball, DeviceAdam, Update};
use crate::backend::{Backend, BackwardOps};
use crate::llama::{Input, Llama, LogitsMode};
use crate::model::{ChatTokenizer, Message};
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
    if !restart_moves(cfg) {
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

/// Whether restart `cfg.restart` starts anywhere but at the init tokens.
fn restart_moves(cfg: &EmbeddingAttackConfig) -> bool {
    cfg.restart != 0 && cfg.init_noise != 0.0
}

/// One attacked conversation on the model's device, and where its soft tokens and targets sit.
struct Prepared<B: Backend> {
    /// `[seq, hidden]` embeddings of the token ids in the working precision. The soft rows
    /// hold whatever was written there last; every user overwrites them first.
    embeds: B::Buf,
    /// First soft-token row.
    p0: usize,
    prompt_len: usize,
    seq: usize,
    /// `(row, token)`: row `prompt_len - 1 + i` predicts `target[i]`.
    targets: Vec<(usize, u32)>,
}

fn prepare<B: BackwardOps>(model: &Llama<B>, layout: &AttackLayout) -> Result<Prepared<B>> {
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
        embeds: model.embed_ids(&ids)?,
        p0: layout.prefix.len(),
        prompt_len,
        seq: ids.len(),
        targets,
    })
}

/// Row indices `start..start + n`, for `gather_rows`.
fn row_range(start: usize, n: usize) -> Vec<u32> {
    (start as u32..(start + n) as u32).collect()
}

/// Writes the soft tokens `soft` (`[n, dim]`) into rows `row0..row0 + n` of `embeds`, in the
/// precision of `embeds`, on the device.
fn write_soft<B: Backend>(be: &B, soft: &B::Buf, embeds: &mut B::Buf, row0: usize, dim: usize) {
    be.gather_rows(soft, &row_range(0, be.len(soft) / dim), dim, embeds, row0);
}

/// The soft tokens of one run on the model's device (f32 `[n_soft, hidden]`, like the ball's
/// centre, the gradient rows they are updated with and the Adam moments), so that a step moves
/// no embedding through the host.
struct SoftTokens<B: BackwardOps> {
    soft: B::Buf,
    /// The init tokens' embeddings: the centre of the ball.
    init: B::Buf,
    grad: B::Buf,
    adam: Option<DeviceAdam<B::Buf>>,
}

impl<B: BackwardOps> SoftTokens<B> {
    /// Restart `cfg.restart` from the init tokens in the soft rows of `p`.
    fn start(
        model: &Llama<B>,
        p: &Prepared<B>,
        n: usize,
        cfg: &EmbeddingAttackConfig,
    ) -> Result<Self> {
        let be = &model.backend;
        let d = model.cfg.hidden_size;
        let mut init = be.alloc_f32(n * d)?;
        be.gather_rows(&p.embeds, &row_range(p.p0, n), d, &mut init, 0);
        let soft = if restart_moves(cfg) {
            // The noise is drawn on the host, once per run.
            be.upload_f32(&restart_start(&be.download(&init)?, cfg, d))?
        } else {
            let mut soft = be.alloc_f32(n * d)?;
            be.gather_rows(&init, &row_range(0, n), d, &mut soft, 0);
            soft
        };
        Ok(Self {
            soft,
            init,
            grad: be.alloc_f32(n * d)?,
            adam: None,
        })
    }

    /// One PGD update with rows `row0..row0 + n` of the input gradient `de`.
    fn update(
        &mut self,
        be: &B,
        de: &B::Buf,
        row0: usize,
        cfg: &EmbeddingAttackConfig,
        dim: usize,
    ) -> Result<()> {
        let n = be.len(&self.soft) / dim;
        be.gather_rows(de, &row_range(row0, n), dim, &mut self.grad, 0);
        be.pgd_step(
            cfg.update,
            &mut self.soft,
            &self.grad,
            &self.init,
            &mut self.adam,
            cfg.step_size,
            cfg.ball,
            dim,
        )
    }
}

/// Target CE of one conversation (its embeddings as they are in `p`), whether every target
/// token is the argmax, and (unless `want_grad` is false) the gradient with respect to every
/// input row, on the model's device.
fn loss_and_grad<B: BackwardOps>(
    model: &Llama<B>,
    p: &Prepared<B>,
    want_grad: bool,
) -> Result<(f64, bool, Option<B::Buf>)> {
    let be = &model.backend;
    let (out, acts) = model.forward_train(
        Input::Embeds(&p.embeds),
        1,
        p.seq,
        None,
        &[],
        LogitsMode::All,
        true,
    )?;
    let logits = out.logits.as_ref().expect("logits requested");
    let mut dlogits = if want_grad {
        Some(be.alloc_f32(be.len(logits))?)
    } else {
        None
    };
    let (loss, ok) = be.target_ce(
        logits,
        model.cfg.vocab_size,
        &[&p.targets],
        dlogits.as_mut(),
    )?[0];
    let Some(dl) = dlogits else {
        return Ok((loss, ok, None));
    };
    let de = model
        .backward(&acts, &[], Some(&dl), None, None, true)?
        .expect("input gradient requested");
    Ok((loss, ok, Some(de)))
}

/// Greedy continuation after the prompt of `p` with the soft tokens `soft`.
fn generate_after<B: BackwardOps>(
    model: &Llama<B>,
    tok: &ChatTokenizer,
    p: &Prepared<B>,
    soft: &B::Buf,
    gen_tokens: usize,
    stop_tokens: &[u32],
) -> Result<String> {
    let be = &model.backend;
    let d = model.cfg.hidden_size;
    let mut gen = Vec::new();
    if gen_tokens > 0 {
        let mut cache = model.new_cache(1, p.prompt_len + gen_tokens)?;
        let mut e = be.alloc(p.prompt_len * d)?;
        be.gather_rows(&p.embeds, &row_range(0, p.prompt_len), d, &mut e, 0);
        write_soft(be, soft, &mut e, p.p0, d);
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

/// One PGD run on one behaviour: [`attack_batch`] of one (a batch of one needs no padding,
/// so it is exactly the single-behaviour attack). Works with any backend that has the
/// backward ops.
pub fn attack<B: BackwardOps>(
    model: &Llama<B>,
    tok: &ChatTokenizer,
    layout: &AttackLayout,
    cfg: &EmbeddingAttackConfig,
    stop_tokens: &[u32],
) -> Result<AttackResult> {
    let mut results = attack_batch(model, tok, std::slice::from_ref(layout), cfg, stop_tokens)?;
    Ok(results.pop().expect("one result per layout"))
}

/// The embeddings and key mask of the behaviours still running, left-padded to the longest;
/// kept while the same behaviours run, so a step only rewrites their soft rows.
struct Batch<B: Backend> {
    active: Vec<usize>,
    /// Rows per sequence.
    t: usize,
    embeds: B::Buf,
    /// `None` when no sequence is padded.
    mask: Option<B::Buf>,
}

impl<B: Backend> Batch<B> {
    fn new(be: &B, ps: &[Prepared<B>], active: Vec<usize>, dim: usize) -> Result<Self> {
        let t = active.iter().map(|&i| ps[i].seq).max().expect("active");
        let mut embeds = be.alloc(active.len() * t * dim)?;
        let mut mask = vec![0f32; active.len() * t];
        for (a, &i) in active.iter().enumerate() {
            let off = a * t + t - ps[i].seq;
            be.gather_rows(
                &ps[i].embeds,
                &row_range(0, ps[i].seq),
                dim,
                &mut embeds,
                off,
            );
            mask[off..(a + 1) * t].fill(1.0);
        }
        let padded = active.iter().any(|&i| ps[i].seq < t);
        let mask = if padded {
            Some(be.upload_f32(&mask)?)
        } else {
            None
        };
        Ok(Self {
            active,
            t,
            embeds,
            mask,
        })
    }

    /// First row of the `a`-th running sequence, `p`.
    fn row0(&self, a: usize, p: &Prepared<B>) -> usize {
        a * self.t + self.t - p.seq
    }
}

/// Several behaviours attacked as one batch (the same attack as [`attack`] for each): the
/// conversations are left-padded to the longest one with the padded keys masked, so a single
/// forward and backward serve every behaviour still running; each keeps its own soft tokens,
/// loss curve, update rule state and early stop, and leaves the batch when done. A step's wall
/// time is shared among the behaviours it served. Generation then runs per behaviour.
///
/// Everything stays on the model's device: the logits are reduced there to one loss and
/// argmax per target token, the gradient rows of the soft tokens are updated there and written
/// back into the batch's embeddings. The host sees O(target tokens) numbers per step, and
/// each behaviour's final soft tokens.
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
    let ps: Vec<Prepared<B>> = layouts
        .iter()
        .map(|l| prepare(model, l))
        .collect::<Result<_>>()?;
    let mut softs: Vec<SoftTokens<B>> = ps
        .iter()
        .zip(layouts)
        .map(|(p, l)| SoftTokens::start(model, p, l.soft_init.len(), cfg))
        .collect::<Result<_>>()?;
    let mut losses = vec![Vec::new(); k];
    let mut seconds = vec![0.0; k];
    let mut steps = vec![0; k];
    let mut success = vec![false; k];
    let mut done = vec![false; k];
    let mut batch: Option<Batch<B>> = None;
    for step in 0..=cfg.steps {
        let active: Vec<usize> = (0..k).filter(|&i| !done[i]).collect();
        if active.is_empty() {
            break;
        }
        let t0 = std::time::Instant::now();
        if batch.as_ref().is_none_or(|b| b.active != active) {
            batch = Some(Batch::new(be, &ps, active.clone(), d)?);
        }
        let b = batch.as_mut().expect("built above");
        for (a, &i) in active.iter().enumerate() {
            let row0 = b.row0(a, &ps[i]) + ps[i].p0;
            write_soft(be, &softs[i].soft, &mut b.embeds, row0, d);
        }
        let (out, acts) = model.forward_train(
            Input::Embeds(&b.embeds),
            active.len(),
            b.t,
            b.mask.as_ref(),
            &[],
            LogitsMode::All,
            true,
        )?;
        let logits = out.logits.as_ref().expect("logits requested");
        let groups: Vec<Vec<(usize, u32)>> = active
            .iter()
            .enumerate()
            .map(|(a, &i)| {
                let off = b.row0(a, &ps[i]);
                ps[i].targets.iter().map(|&(r, tk)| (r + off, tk)).collect()
            })
            .collect();
        let groups: Vec<&[(usize, u32)]> = groups.iter().map(Vec::as_slice).collect();
        // The last step updates nothing.
        let mut dlogits = if step < cfg.steps {
            Some(be.alloc_f32(be.len(logits))?)
        } else {
            None
        };
        let ces = be.target_ce(logits, vocab, &groups, dlogits.as_mut())?;
        let mut update = Vec::new();
        for ((a, &i), (loss, ok)) in active.iter().enumerate().zip(ces) {
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
            let dl = dlogits.expect("a gradient before the last step");
            let de = model
                .backward(&acts, &[], Some(&dl), b.mask.as_ref(), None, true)?
                .expect("input gradient requested");
            for (a, i) in update {
                let row0 = b.row0(a, &ps[i]) + ps[i].p0;
                softs[i].update(be, &de, row0, cfg, d)?;
            }
        }
        // The update is queued on a device; the step's time includes it.
        be.synchronize()?;
        let share = t0.elapsed().as_secs_f64() / active.len() as f64;
        for &i in &active {
            seconds[i] += share;
        }
    }
    (0..k)
        .map(|i| {
            Ok(AttackResult {
                response: generate_after(
                    model,
                    tok,
                    &ps[i],
                    &softs[i].soft,
                    cfg.gen_tokens,
                    stop_tokens,
                )?,
                soft: be.download(&softs[i].soft)?,
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
/// layout's init tokens. Early stop when every training target is forced. The soft tokens,
/// the summed gradient and the update stay on the model's device.
pub fn universal_attack<B: BackwardOps>(
    model: &Llama<B>,
    layouts: &[AttackLayout],
    cfg: &EmbeddingAttackConfig,
) -> Result<UniversalResult> {
    ensure!(
        !layouts.is_empty(),
        "universal attack: no training behaviours"
    );
    let be = &model.backend;
    let d = model.cfg.hidden_size;
    let n = layouts[0].soft_init.len();
    let mut ps: Vec<Prepared<B>> = layouts
        .iter()
        .map(|l| prepare(model, l))
        .collect::<Result<_>>()?;
    let mut soft = SoftTokens::start(model, &ps[0], n, cfg)?;
    let mut grad_one = be.alloc_f32(n * d)?;
    let t0 = std::time::Instant::now();
    let mut losses = Vec::new();
    let (mut steps, mut forced) = (0, 0);
    for step in 0..=cfg.steps {
        let want_grad = step < cfg.steps;
        // Summed from zero in behaviour order, as the CPU always did.
        let mut grad = be.alloc_f32(n * d)?;
        let (mut total, mut ok_count) = (0.0, 0);
        for p in &mut ps {
            write_soft(be, &soft.soft, &mut p.embeds, p.p0, d);
            let (loss, ok, de) = loss_and_grad(model, p, want_grad)?;
            ensure!(
                loss.is_finite(),
                "universal attack step {step}: loss is not finite"
            );
            total += loss;
            ok_count += ok as usize;
            if let Some(de) = de {
                be.gather_rows(&de, &row_range(p.p0, n), d, &mut grad_one, 0);
                be.axpy(1.0, &grad_one, &mut grad);
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
        be.pgd_step(
            cfg.update,
            &mut soft.soft,
            &grad,
            &soft.init,
            &mut soft.adam,
            cfg.step_size,
            cfg.ball,
            d,
        )?;
    }
    let soft = be.download(&soft.soft)?;
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
    let be = &model.backend;
    let d = model.cfg.hidden_size;
    let n = layout.soft_init.len();
    ensure!(
        soft.len() == n * d,
        "soft tokens: {} values, the layout needs {n} x {d}",
        soft.len()
    );
    let mut p = prepare(model, layout)?;
    let on_device = be.upload_f32(soft)?;
    write_soft(be, &on_device, &mut p.embeds, p.p0, d);
    let (loss, ok, _) = loss_and_grad(model, &p, false)?;
    let response = generate_after(model, tok, &p, &on_device, gen_tokens, stop_tokens)?;
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
