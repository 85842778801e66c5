//! Autoregressive generation: prefill the prompt, then one token at a time against the KV cache.

use super::{Llama, LogitsMode};
use crate::backend::Backend;
use crate::util::Rng;
use anyhow::Result;

#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Temperature, then nucleus (top-p) filtering.
    TopP {
        temperature: f32,
        top_p: f32,
        seed: u64,
    },
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation stops after emitting any of these (the stop token is included in the output).
    pub stop_tokens: Vec<u32>,
}

/// Index of the largest logit (first one on ties, like torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Samples from softmax(logits / temperature) restricted to the smallest set of tokens whose
/// probability mass reaches `top_p`.
pub fn sample_top_p(logits: &[f32], temperature: f32, top_p: f32, rng: &mut Rng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / temperature).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        mass += p.1 / total;
        kept += 1;
        if mass >= top_p {
            break;
        }
    }
    let probs = &probs[..kept];
    let kept_total: f32 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.uniform() * kept_total;
    for p in probs {
        if u < p.1 {
            return p.0;
        }
        u -= p.1;
    }
    probs[kept - 1].0
}

/// Generates up to `max_new_tokens` after `prompt`. `on_token` sees each new id as it is chosen.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    anyhow::ensure!(!prompt.is_empty(), "generate: empty prompt");
    let mut cache = model.new_cache(1, prompt.len() + opts.max_new_tokens)?;
    let mut rng = match opts.sampling {
        Sampling::TopP { seed, .. } => Rng::new(seed),
        Sampling::Greedy => Rng::new(0),
    };
    let mut out = Vec::with_capacity(opts.max_new_tokens);
    let mut input = prompt.to_vec();
    while out.len() < opts.max_new_tokens {
        let fwd = model.forward(&input, 1, &mut cache, None, &[], LogitsMode::Last)?;
        let logits = model
            .backend
            .download(fwd.logits.as_ref().expect("logits requested"))?;
        let next = match opts.sampling {
            Sampling::Greedy => argmax(&logits),
            Sampling::TopP {
                temperature, top_p, ..
            } => sample_top_p(&logits, temperature, top_p, &mut rng),
        };
        out.push(next);
        on_token(next)?;
        if opts.stop_tokens.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}
