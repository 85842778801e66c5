//! One micro-batch of an objective: forwards of the tuned and frozen model, the loss and its
//! gradient with respect to the captured representations and logits, and the backward pass
//! into the LoRA gradients.

use super::data::{MaskMode, TokenBatch};
use super::mining::AdvInput;
use crate::backend::BackwardOps;
use crate::llama::{Activations, Input, LatentHook, Llama, LogitsMode, LoraGrads};
use crate::objectives::circuit_breaker::{circuit_breaker_loss_on, CircuitBreakerConfig};
use crate::objectives::repbend::{repbend_loss_on, RepBendConfig};
use crate::objectives::triplet::{triplet_loss_on, DeviceReps, TripletConfig};
use anyhow::{ensure, Result};
use serde::Serialize;

/// Every term of one evaluation, unweighted, plus the weighted total.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LossTerms {
    pub terms: Vec<(String, f64)>,
    pub total: f64,
}

impl LossTerms {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.terms.iter().find(|t| t.0 == name).map(|t| t.1)
    }
    /// Running sum (for gradient accumulation: divide by the count afterwards).
    pub fn add(&mut self, other: &LossTerms) {
        if self.terms.is_empty() {
            self.terms = other.terms.iter().map(|(n, _)| (n.clone(), 0.0)).collect();
        }
        for ((_, a), (_, b)) in self.terms.iter_mut().zip(&other.terms) {
            *a += b;
        }
        self.total += other.total;
    }
    pub fn scale(&mut self, s: f64) {
        self.terms.iter_mut().for_each(|t| t.1 *= s);
        self.total *= s;
    }
    /// The first non-finite term, for a clear NaN report.
    pub fn non_finite(&self) -> Option<&str> {
        if !self.total.is_finite() {
            return Some(
                self.terms
                    .iter()
                    .find(|t| !t.1.is_finite())
                    .map_or("total", |t| t.0.as_str()),
            );
        }
        self.terms
            .iter()
            .find(|t| !t.1.is_finite())
            .map(|t| t.0.as_str())
    }
}

/// The frozen model's output on one micro-batch, read from a capture file
/// (`train::frozen`) instead of recomputed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FrozenSet {
    /// `[n_idx, batch * seq, dim]` at the set's frozen indices (increasing), as the frozen
    /// forward returns them; empty when only logits are read.
    pub reps: Vec<f64>,
    /// `[batch * seq, vocab]`.
    pub logits: Option<Vec<f32>>,
}

/// Frozen outputs per set of a step; a `None` set runs the frozen forward.
#[derive(Debug, Clone, Default)]
pub struct FrozenInputs {
    pub benign: Option<FrozenSet>,
    pub harmful: Option<FrozenSet>,
    pub retain: Option<FrozenSet>,
}

/// One set's tuned forward (recorded) and frozen forward, captured at `indices`.
struct SetPass<B: BackwardOps> {
    acts: Activations<B>,
    key_mask: B::Buf,
    /// Hidden states of the tuned pass per captured index, `[rows, dim]` on the device.
    tuned: Vec<(usize, B::Buf)>,
    /// The frozen model's, per index (computed, or uploaded from a capture file).
    orig: Vec<(usize, B::Buf)>,
    /// `[rows, vocab]` f32 on the device: the retain KL reads them where they are.
    tuned_logits: Option<B::Buf>,
    orig_logits: Option<B::Buf>,
}

/// Host f64 slabs `[n_idx, rows, dim]` (the layout of `Reps`) as per-index device buffers.
fn unstack<B: BackwardOps>(
    be: &B,
    data: &[f64],
    indices: &[usize],
) -> Result<Vec<(usize, B::Buf)>> {
    let slab = data.len() / indices.len().max(1);
    indices
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            let v: Vec<f32> = data[k * slab..(k + 1) * slab]
                .iter()
                .map(|&x| x as f32)
                .collect();
            Ok((i, be.upload_f32(&v)?))
        })
        .collect()
}

fn device_reps<B: BackwardOps>(bufs: &[(usize, B::Buf)], rows: usize) -> DeviceReps<'_, B> {
    DeviceReps {
        bufs: bufs.iter().map(|(i, b)| (*i, b)).collect(),
        rows,
    }
}

/// Which data set a pass runs, so each tuned forward of a micro-batch draws its own LoRA
/// dropout masks (PEFT draws fresh masks on every forward call).
#[derive(Debug, Clone, Copy)]
enum SetId {
    Benign = 0,
    Harmful = 1,
    Retain = 2,
}

/// `adv` attacks the tuned pass (hard-negative mining: soft tokens in its input, or the latent
/// adversary in its residual stream); the frozen pass always sees the clean tokens, which is
/// why `frozen` (its captured output, when given) stands in for it. The tuned pass applies
/// the model's LoRA dropout, when set, with masks of its own for `set`.
#[allow(clippy::too_many_arguments)]
fn run_set<B: BackwardOps>(
    model: &Llama<B>,
    set: SetId,
    tb: &TokenBatch,
    indices: &[usize],
    orig_indices: &[usize],
    logits: bool,
    adv: Option<&AdvInput>,
    frozen: Option<FrozenSet>,
) -> Result<SetPass<B>> {
    let be = &model.backend;
    let clean_mask = be.upload_f32(&tb.attention_mask)?;
    let (adv_bufs, hook) = match adv {
        Some(AdvInput::Embeds {
            embeds, key_mask, ..
        }) => (Some((be.upload(embeds)?, be.upload_f32(key_mask)?)), None),
        Some(AdvInput::Latent { index, d, b, .. }) => (
            None,
            Some(LatentHook::new(be, *index, model.cfg.num_layers, d, b)?),
        ),
        None => (None, None),
    };
    let mode = if logits {
        LogitsMode::All
    } else {
        LogitsMode::None
    };
    let (tuned_input, tuned_mask) = match &adv_bufs {
        Some((e, m)) => (Input::Embeds(e), m),
        None => (Input::Ids(&tb.input_ids), &clean_mask),
    };
    let (out, acts) = model.forward_train_dropout(
        tuned_input,
        tb.batch,
        tb.seq,
        Some(tuned_mask),
        indices,
        mode,
        true,
        hook.as_ref(),
        model.lora_dropout.map(|d| d.stream(set as u64)),
    )?;
    let (orig, orig_logits) = match frozen {
        Some(f) => {
            let mut n_idx = orig_indices.to_vec();
            n_idx.sort_unstable();
            n_idx.dedup();
            ensure!(
                f.reps.len() == n_idx.len() * tb.batch * tb.seq * model.cfg.hidden_size,
                "frozen representations: {} values for indices {orig_indices:?} of a [{}, {}] batch",
                f.reps.len(),
                tb.batch,
                tb.seq
            );
            ensure!(
                f.logits.is_some() == logits,
                "frozen representations: logits {} but the objective {} them",
                if f.logits.is_some() {
                    "given"
                } else {
                    "missing"
                },
                if logits { "needs" } else { "does not read" }
            );
            let logits = f.logits.map(|l| be.upload_f32(&l)).transpose()?;
            (unstack(be, &f.reps, &n_idx)?, logits)
        }
        None => {
            let (orig_out, _) = model.forward_train(
                Input::Ids(&tb.input_ids),
                tb.batch,
                tb.seq,
                Some(&clean_mask),
                orig_indices,
                mode,
                false,
            )?;
            (orig_out.hidden, orig_out.logits)
        }
    };
    Ok(SetPass {
        tuned: out.hidden,
        orig,
        tuned_logits: out.logits,
        orig_logits,
        acts,
        key_mask: match adv_bufs {
            Some((_, m)) => m,
            None => clean_mask,
        },
    })
}

/// Backpropagates `d_hidden` (per captured index, `[rows, dim]` on the device) and `d_logits`
/// through a set's activations.
fn backward_set<B: BackwardOps>(
    model: &Llama<B>,
    pass: &SetPass<B>,
    bufs: &[(usize, B::Buf)],
    d_logits: Option<&B::Buf>,
    grads: &mut LoraGrads<B>,
) -> Result<()> {
    let refs: Vec<(usize, &B::Buf)> = bufs.iter().map(|(i, b)| (*i, b)).collect();
    model.backward(
        &pass.acts,
        &refs,
        d_logits,
        Some(&pass.key_mask),
        Some(grads),
        false,
    )?;
    Ok(())
}

fn f64_mask(tb: &TokenBatch, mode: MaskMode) -> Vec<f64> {
    tb.mask(mode)
}

/// KL retain term on `retain`: value, and its backward into `grads` when `grads` is given.
fn retain_kl<B: BackwardOps>(
    model: &Llama<B>,
    retain: &TokenBatch,
    temperature: f64,
    weight: f64,
    grads: Option<&mut LoraGrads<B>>,
    frozen: Option<FrozenSet>,
) -> Result<f64> {
    let all: [usize; 0] = [];
    let pass = run_set(model, SetId::Retain, retain, &all, &all, true, None, frozen)?;
    let mask: Vec<f64> = retain.attention_mask.iter().map(|&m| m as f64).collect();
    let (zo, zt) = (
        pass.orig_logits.as_ref().unwrap(),
        pass.tuned_logits.as_ref().unwrap(),
    );
    let be = &model.backend;
    let vocab = model.cfg.vocab_size;
    // Fused on the logits' device; the gradient comes back already scaled by `weight`.
    let grads = grads.filter(|_| weight != 0.0);
    let mut dlog = grads
        .as_ref()
        .map(|_| be.alloc_f32(mask.len() * vocab))
        .transpose()?;
    let w = if dlog.is_some() { weight } else { 1.0 };
    let kl = be.kl_retain(
        zo,
        zt,
        &mask,
        retain.batch,
        vocab,
        temperature,
        w,
        dlog.as_mut(),
    )? / w;
    if let (Some(g), Some(d)) = (grads, dlog.as_ref()) {
        backward_set(model, &pass, &[], Some(d), g)?;
    }
    Ok(kl)
}

/// CRL triplet: benign set B, harmful set H, retain set R.
#[allow(clippy::too_many_arguments)]
pub fn triplet_step<B: BackwardOps>(
    model: &Llama<B>,
    cfg: &TripletConfig,
    mask: MaskMode,
    targets: &[usize],
    benign: &TokenBatch,
    harmful: &TokenBatch,
    retain: &TokenBatch,
    mut grads: Option<&mut LoraGrads<B>>,
    adv: Option<&AdvInput>,
    frozen: FrozenInputs,
) -> Result<LossTerms> {
    let c = &model.cfg;
    let all: Vec<usize> = (0..=c.num_layers).collect();
    let d = c.hidden_size;
    let h = run_set(
        model,
        SetId::Harmful,
        harmful,
        &all,
        targets,
        false,
        adv,
        frozen.harmful,
    )?;
    let b = run_set(
        model,
        SetId::Benign,
        benign,
        &all,
        &all,
        false,
        None,
        frozen.benign,
    )?;
    let (bm, hm) = (f64_mask(benign, mask), f64_mask(harmful, mask));
    // On the device the hidden states stay where the forwards left them.
    let (terms, g) = triplet_loss_on(
        &model.backend,
        cfg,
        d,
        &all,
        &device_reps(&b.tuned, benign.batch * benign.seq),
        &device_reps(&b.orig, benign.batch * benign.seq),
        &bm,
        &device_reps(&h.tuned, harmful.batch * harmful.seq),
        &device_reps(&h.orig, harmful.batch * harmful.seq),
        &hm,
        targets,
        grads.is_some(),
    )?;
    if let (Some(gr), Some(g)) = (grads.as_deref_mut(), g) {
        backward_set(model, &b, &g.benign, None, gr)?;
        drop(b);
        backward_set(model, &h, &g.harmful, None, gr)?;
    }
    drop(h);
    let kl = retain_kl(
        model,
        retain,
        cfg.temperature,
        cfg.w_kl,
        grads,
        frozen.retain,
    )?;
    Ok(LossTerms {
        terms: vec![
            ("benign".into(), terms.benign),
            ("harmful".into(), terms.harmful),
            ("kl".into(), kl),
        ],
        total: terms.total + cfg.w_kl * kl,
    })
}

/// RepBend: safe set S (benign pairs + refusals), unsafe set U, retain set R.
#[allow(clippy::too_many_arguments)]
pub fn repbend_step<B: BackwardOps>(
    model: &Llama<B>,
    cfg: &RepBendConfig,
    mask: MaskMode,
    targets: &[usize],
    safe: &TokenBatch,
    unsafe_: &TokenBatch,
    retain: &TokenBatch,
    mut grads: Option<&mut LoraGrads<B>>,
    adv: Option<&AdvInput>,
    frozen: FrozenInputs,
) -> Result<LossTerms> {
    let c = &model.cfg;
    let all: Vec<usize> = (0..=c.num_layers).collect();
    let d = c.hidden_size;
    let s = run_set(
        model,
        SetId::Benign,
        safe,
        &all,
        &all,
        false,
        None,
        frozen.benign,
    )?;
    let u = run_set(
        model,
        SetId::Harmful,
        unsafe_,
        targets,
        targets,
        false,
        adv,
        frozen.harmful,
    )?;
    let (sm, um) = (f64_mask(safe, mask), f64_mask(unsafe_, mask));
    let (terms, g) = repbend_loss_on(
        &model.backend,
        cfg,
        d,
        &all,
        &device_reps(&s.tuned, safe.batch * safe.seq),
        &device_reps(&s.orig, safe.batch * safe.seq),
        &sm,
        &device_reps(&u.tuned, unsafe_.batch * unsafe_.seq),
        &device_reps(&u.orig, unsafe_.batch * unsafe_.seq),
        &um,
        unsafe_.seq,
        &unsafe_.last_prompt_index,
        targets,
        grads.is_some(),
    )?;
    if let (Some(gr), Some((gs, gu))) = (grads.as_deref_mut(), g) {
        backward_set(model, &s, &gs, None, gr)?;
        backward_set(model, &u, &gu, None, gr)?;
    }
    drop((s, u));
    let kl = retain_kl(
        model,
        retain,
        cfg.temperature,
        cfg.epsilon,
        grads,
        frozen.retain,
    )?;
    Ok(LossTerms {
        terms: vec![
            ("safe_dist".into(), terms.safe_dist),
            ("unsafe_dist".into(), terms.unsafe_dist),
            ("unsafe_cos".into(), terms.unsafe_cos),
            ("kl".into(), kl),
        ],
        total: terms.total + cfg.epsilon * kl,
    })
}

/// Circuit Breakers: retain set R (the retain-chat batch), circuit-breaker set C (harmful).
#[allow(clippy::too_many_arguments)]
pub fn circuit_breaker_step<B: BackwardOps>(
    model: &Llama<B>,
    cfg: &CircuitBreakerConfig,
    step: usize,
    max_steps: usize,
    targets: &[usize],
    retain: &TokenBatch,
    harmful: &TokenBatch,
    grads: Option<&mut LoraGrads<B>>,
    adv: Option<&AdvInput>,
    frozen: FrozenInputs,
) -> Result<LossTerms> {
    let c = &model.cfg;
    let all: Vec<usize> = (0..=c.num_layers).collect();
    let d = c.hidden_size;
    let r = run_set(
        model,
        SetId::Retain,
        retain,
        &all,
        &all,
        false,
        None,
        frozen.retain,
    )?;
    let h = run_set(
        model,
        SetId::Harmful,
        harmful,
        targets,
        targets,
        false,
        adv,
        frozen.harmful,
    )?;
    let rm = f64_mask(retain, MaskMode::All);
    let hm = f64_mask(harmful, MaskMode::All);
    let (terms, g) = circuit_breaker_loss_on(
        &model.backend,
        cfg,
        step,
        max_steps,
        d,
        &all,
        &device_reps(&r.tuned, retain.batch * retain.seq),
        &device_reps(&r.orig, retain.batch * retain.seq),
        &rm,
        &device_reps(&h.tuned, harmful.batch * harmful.seq),
        &device_reps(&h.orig, harmful.batch * harmful.seq),
        &hm,
        targets,
        grads.is_some(),
    )?;
    if let (Some(gr), Some((g_r, g_c))) = (grads, g) {
        backward_set(model, &r, &g_r, None, gr)?;
        backward_set(model, &h, &g_c, None, gr)?;
    }
    Ok(LossTerms {
        terms: vec![
            ("retain".into(), terms.retain),
            ("cb".into(), terms.cb),
            ("c_retain".into(), terms.c_retain),
            ("c_cb".into(), terms.c_cb),
        ],
        total: terms.total,
    })
}
