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
    /// Record the decode step once and replay it for every later token (a CUDA graph on the
    /// CUDA backend: one call queues the step's few hundred launches). Ignored where the
    /// backend has no such replay (the CPU). The tokens are the step-by-step loop's, up to
    /// rounding: the replayed attention splits the keys by the cache's capacity.
    pub replay: bool,
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
    if opts.replay {
        if let Some(out) = B::generate_replayed(model, prompt, opts, &mut on_token) {
            return out;
        }
    }
    let mut cache = model.new_cache(1, prompt.len() + opts.max_new_tokens)?;
    let mut rng = sampling_rng(&opts.sampling);
    let mut out = Vec::with_capacity(opts.max_new_tokens);
    let mut input = prompt.to_vec();
    while out.len() < opts.max_new_tokens {
        let next = forward_choose(model, &input, &mut cache, opts, &mut rng)?;
        if emit(&mut out, next, opts, &mut on_token)? {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}

/// The host generator of top-p's uniforms (one draw per token, prompt's token first).
fn sampling_rng(s: &Sampling) -> Rng {
    match s {
        Sampling::TopP { seed, .. } => Rng::new(*seed),
        Sampling::Greedy => Rng::new(0),
    }
}

/// The forward of `ids` (one sequence) at the cache's end, then the next token from its last
/// position. Token selection runs where the logits are: one id comes back, not the vocabulary.
fn forward_choose<B: Backend>(
    model: &Llama<B>,
    ids: &[u32],
    cache: &mut super::KvCache<B>,
    opts: &GenerateOptions,
    rng: &mut Rng,
) -> Result<u32> {
    let fwd = model.forward(ids, 1, cache, None, &[], LogitsMode::Last)?;
    let logits = fwd.logits.as_ref().expect("logits requested");
    let vocab = model.cfg.vocab_size;
    Ok(match opts.sampling {
        Sampling::Greedy => model.backend.argmax_rows(logits, vocab)?[0],
        Sampling::TopP {
            temperature, top_p, ..
        } => {
            let u = rng.uniform();
            model
                .backend
                .sample_top_p_rows(logits, vocab, temperature, top_p, &[u])?[0]
        }
    })
}

/// Appends `next` and reports it; true when generation ends with it (a stop token, or
/// `max_new_tokens` reached).
fn emit(
    out: &mut Vec<u32>,
    next: u32,
    opts: &GenerateOptions,
    on_token: &mut impl FnMut(u32) -> Result<()>,
) -> Result<bool> {
    out.push(next);
    on_token(next)?;
    Ok(opts.stop_tokens.contains(&next) || out.len() >= opts.max_new_tokens)
}

/// [`generate`] with the decode step recorded into a CUDA graph: the prompt and the first
/// step run op by op (the step also sizes the scratch it grows on first use), the second is
/// recorded, and every later token is one replay. The step's position and token live on the
/// device (`CudaBackend::step_state`), the step ends by choosing the next token there, and
/// the host reads back 8 bytes per token.
#[cfg(feature = "cuda")]
pub(crate) fn generate_graph(
    model: &Llama<crate::backend::cuda::CudaBackend>,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    use crate::backend::cuda::StepChoice;
    if opts.max_new_tokens == 0 {
        return Ok(Vec::new());
    }
    let be = &model.backend;
    let mut cache = model.new_cache(1, prompt.len() + opts.max_new_tokens)?;
    let mut rng = sampling_rng(&opts.sampling);
    let mut out = Vec::with_capacity(opts.max_new_tokens);
    let mut on_token = on_token;
    let first = forward_choose(model, prompt, &mut cache, opts, &mut rng)?;
    if emit(&mut out, first, opts, &mut on_token)? {
        return Ok(out);
    }
    let choice = match opts.sampling {
        Sampling::Greedy => StepChoice::Argmax,
        Sampling::TopP {
            temperature, top_p, ..
        } => StepChoice::TopP { temperature, top_p },
    };
    let mut ws = model.decode_workspace(1)?;
    let mut state = be.step_state(cache.len, first)?;
    let mut graph = None;
    loop {
        if let Sampling::TopP { .. } = opts.sampling {
            be.set_step_uniform(&mut state, rng.uniform())?;
        }
        match &graph {
            Some(g) => be.replay(g)?,
            None => be.with_step_state(&state, || {
                graph_step(model, &mut cache, &mut ws, choice, &state)
            })?,
        }
        let (pos, next) = be.read_step_state(&state)?;
        anyhow::ensure!(
            pos == prompt.len() + out.len(),
            "replayed decode step: the device is at position {pos}, not {}",
            prompt.len() + out.len()
        );
        if emit(&mut out, next, opts, &mut on_token)? {
            return Ok(out);
        }
        if graph.is_none() {
            graph = Some(be.with_step_state(&state, || {
                be.record(|| graph_step(model, &mut cache, &mut ws, choice, &state))
            })?);
        }
    }
}

/// One decode step in step mode: the forward, then the next token into `state`.
#[cfg(feature = "cuda")]
fn graph_step(
    model: &Llama<crate::backend::cuda::CudaBackend>,
    cache: &mut super::KvCache<crate::backend::cuda::CudaBackend>,
    ws: &mut super::DecodeWorkspace<crate::backend::cuda::CudaBackend>,
    choice: crate::backend::cuda::StepChoice,
    state: &crate::backend::cuda::StepState,
) -> Result<()> {
    // The token is read from the state; token 0 only passes decode_step's checks.
    model.decode_step(&[0], cache, ws)?;
    model
        .backend
        .choose_into_step(&ws.logits, model.cfg.vocab_size, choice, state);
    Ok(())
}
