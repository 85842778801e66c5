//! Autoregressive generation: prefill the prompt, then one token at a time against the KV cache.

use super::{Llama, LogitsMode};
use crate::backend::Backend;
use crate::util::Rng;
use anyhow::Result;

#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Temperature, then nucleus (top-p) filtering: `cpu::sampling::sample_top_p` defines it,
    /// `Backend::sample_top_p_rows` runs it on the device with one uniform per token from a
    /// `Rng` seeded with `seed`.
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

pub use crate::backend::cpu::sampling::{argmax, sample_top_p};

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
        // Token selection runs where the logits are: one id comes back, not the vocabulary.
        let logits = fwd.logits.as_ref().expect("logits requested");
        let vocab = model.cfg.vocab_size;
        let next = match opts.sampling {
            Sampling::Greedy => model.backend.argmax_rows(logits, vocab)?[0],
            Sampling::TopP {
                temperature, top_p, ..
            } => {
                let u = rng.uniform();
                model
                    .backend
                    .sample_top_p_rows(logits, vocab, temperature, top_p, &[u])?[0]
            }
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
