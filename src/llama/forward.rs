//! Forward pass with residual-stream capture, optionally recording the activations the
//! backward pass needs.
//!
//! Hidden-state indices follow transformers' `output_hidden_states`: 0 = token embeddings,
//! i = output of block i-1 for 1 <= i < L, L = final block's output after the final norm.

use super::model::{DeviceLayer, KvCache, Llama};
use super::{LoraDropout, LoraModule};
use crate::backend::{AttnShape, Backend};
use anyhow::{ensure, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    None,
    /// Only the last position of each sequence: `[batch, vocab]`.
    Last,
    /// Every position: `[batch * seq_len, vocab]`.
    All,
}

/// What enters the first block: token ids, or embeddings (`[rows, hidden]`; soft tokens of the
/// embedding-space attack).
pub enum Input<'a, B: Backend> {
    Ids(&'a [u32]),
    Embeds(&'a B::Buf),
}

pub struct ForwardOutput<B: Backend> {
    pub logits: Option<B::Buf>,
    /// `(index, [batch * seq_len, hidden])` for each requested hidden-state index, in increasing index order.
    pub hidden: Vec<(usize, B::Buf)>,
}

/// One block's intermediate tensors. Inference reuses one set for every block; a recording
/// (training) forward keeps one set per block for the backward pass.
pub struct LayerActs<B: Backend> {
    /// Residual stream entering the block (recorded only).
    pub h_in: Option<B::Buf>,
    pub xn1: B::Buf,
    pub q: B::Buf,
    pub k: B::Buf,
    pub v: B::Buf,
    pub att: B::Buf,
    /// Residual stream after the attention half (recorded only).
    pub h_mid: Option<B::Buf>,
    pub xn2: B::Buf,
    pub gate: B::Buf,
    pub up: B::Buf,
    pub act: B::Buf,
    /// Post-RoPE keys and values of the whole sequence, `[batch * seq, kv_dim]` (recorded only).
    pub k_all: Option<B::Buf>,
    pub v_all: Option<B::Buf>,
}

/// Buffers a block uses only while it runs, allocated once per forward (or recompute) and
/// reused by every block: the LoRA pairs' `x_d A^T` and the attention/MLP output before the
/// residual add.
pub(crate) struct BlockScratch<B: Backend> {
    pub lora: B::Buf,
    /// The other projections' `x A^T` when several run as one op (`Backend::qkv_proj`: k and
    /// v; `Backend::gate_up_swiglu`: up; the first one's goes to `lora`), allocated on first use.
    pub lora_more: [Option<B::Buf>; 2],
    pub proj: B::Buf,
}

impl<B: Backend> BlockScratch<B> {
    pub(crate) fn new(
        be: &B,
        rows: usize,
        cfg: &crate::model::ModelConfig,
        rank: usize,
    ) -> Result<Self> {
        Ok(Self {
            lora: be.alloc(rows * rank)?,
            lora_more: [None, None],
            // f32 like the residual stream it is added to (clone_f32).
            proj: be.alloc_f32(rows * cfg.hidden_size)?,
        })
    }
}

/// The buffers of one decode step (one token for each of `batch` sequences), allocated once
/// so that [`Llama::decode_step`] allocates nothing: a step recorded into a CUDA graph and
/// replayed must not.
pub struct DecodeWorkspace<B: Backend> {
    pub batch: usize,
    x: B::Buf,
    xn: B::Buf,
    acts: LayerActs<B>,
    scratch: BlockScratch<B>,
    /// `[batch, vocab]` f32, written by each step.
    pub logits: B::Buf,
}

/// Everything the backward pass reads.
pub struct Activations<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    pub layers: Vec<LayerActs<B>>,
    /// Residual after the last block (input of the final norm), in the working precision.
    pub h_last: B::Buf,
    /// Final-normed stream (hidden-state index L).
    pub xn_final: B::Buf,
    pub used_lora: bool,
    /// With per-block recompute: the residual stream entering each block (`layers` is then
    /// empty and the backward pass reruns each block from its checkpoint).
    pub checkpoints: Vec<B::Buf>,
    pub recompute: bool,
    /// The latent adversary's input, when the forward ran with one.
    pub latent: Option<super::latent::LatentActs<B>>,
    /// The LoRA dropout the forward applied (its masks are regenerated from this).
    pub dropout: Option<LoraDropout>,
}

impl<B: Backend> LayerActs<B> {
    pub(crate) fn new(be: &B, rows: usize, cfg: &crate::model::ModelConfig) -> Result<Self> {
        let (d, qd, kvd, ff) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let sizes = [d, qd, kvd, kvd, qd, d, ff, ff, ff].map(|w| (rows * w, false));
        let mut b = be.alloc_group("activations", &sizes)?.into_iter();
        let mut next = || b.next().expect("one buffer per size");
        Ok(Self {
            h_in: None,
            xn1: next(),
            q: next(),
            k: next(),
            v: next(),
            att: next(),
            h_mid: None,
            xn2: next(),
            gate: next(),
            up: next(),
            act: next(),
            k_all: None,
            v_all: None,
        })
    }
}

/// A LoRA pair's term for a fused projection op: its `x A^T` (`xa`, computed when the pair is
/// there) and B, rank and scale.
fn lora_term<'a, B: Backend>(
    lora: Option<(&'a super::model::DeviceLora<B>, Option<LoraDropout>)>,
    xa: Option<&'a B::Buf>,
) -> crate::backend::LoraTerm<'a, B::Buf> {
    lora.map(|(l, _)| (xa.expect("down projection ran"), &l.b, l.rank, l.scale))
}

/// `x * keep / (1 - p)` under `d`'s mask, in a new buffer of `x`'s precision.
pub(crate) fn dropout_input<B: Backend>(be: &B, x: &B::Buf, d: LoraDropout) -> Result<B::Buf> {
    let mut out = be.alloc(be.len(x))?;
    be.dropout(x, &mut out, d.p, d.seed);
    Ok(out)
}

/// A copy of `src` (`rows` rows of width `dim`) in the working precision.
pub(crate) fn clone_buf<B: Backend>(
    be: &B,
    src: &B::Buf,
    rows: usize,
    dim: usize,
) -> Result<B::Buf> {
    copy_rows(be, src, rows, dim, be.alloc(rows * dim)?)
}

/// A copy of `src` in f32 storage: the residual stream's precision.
///
/// The residual stream (`x` of [`Llama::block`]) is summed over every block, so it is kept in
/// f32 on every device: in bf16 storage its rounding accumulates over the depth of the model
/// (on SmolLM2's 30 blocks, logits 3e-2 away from the f32 engine instead of 1e-2). The
/// activations normed from it (and the copies the backward reads, `h_in`/`h_mid`) stay in the
/// working precision.
pub(crate) fn clone_f32<B: Backend>(
    be: &B,
    src: &B::Buf,
    rows: usize,
    dim: usize,
) -> Result<B::Buf> {
    copy_rows(be, src, rows, dim, be.alloc_f32(rows * dim)?)
}

/// `out` (returned) with the first `rows` rows of `src` copied in, converted to its dtype.
fn copy_rows<B: Backend>(
    be: &B,
    src: &B::Buf,
    rows: usize,
    dim: usize,
    mut out: B::Buf,
) -> Result<B::Buf> {
    let all: Vec<u32> = (0..rows as u32).collect();
    be.gather_rows(src, &all, dim, &mut out, 0);
    Ok(out)
}

impl<B: Backend> Llama<B> {
    /// Runs `ids` (`[batch, seq_len]`, row-major) at positions `cache.len ..`, appending to the cache.
    /// `key_mask` (`[batch, capacity]`, 1/0) excludes padded positions from attention.
    pub fn forward(
        &self,
        ids: &[u32],
        batch: usize,
        cache: &mut KvCache<B>,
        key_mask: Option<&B::Buf>,
        capture: &[usize],
        logits: LogitsMode,
    ) -> Result<ForwardOutput<B>> {
        let (out, _) = self.run(
            Input::Ids(ids),
            ids.len(),
            batch,
            cache,
            key_mask,
            capture,
            logits,
            true,
            false,
            None,
            None,
        )?;
        Ok(out)
    }

    /// Buffers for [`Llama::decode_step`] on `batch` sequences. The LoRA scratch is sized for
    /// the attached adapter: attach before, not after.
    pub fn decode_workspace(&self, batch: usize) -> Result<DecodeWorkspace<B>> {
        let (be, cfg) = (&self.backend, &self.cfg);
        let rank = self.lora_ranks().max().unwrap_or(1);
        let mut scratch = BlockScratch::new(be, batch, cfg, rank)?;
        if self.lora_ranks().next().is_some() {
            // qkv_proj and gate_up_swiglu put the other projections' x A^T here.
            scratch.lora_more = [Some(be.alloc(batch * rank)?), Some(be.alloc(batch * rank)?)];
        }
        Ok(DecodeWorkspace {
            batch,
            x: be.alloc_f32(batch * cfg.hidden_size)?,
            xn: be.alloc(batch * cfg.hidden_size)?,
            acts: LayerActs::new(be, batch, cfg)?,
            scratch,
            logits: be.alloc_f32(batch * cfg.vocab_size)?,
        })
    }

    /// Ranks of the attached LoRA pairs, one per module and layer.
    fn lora_ranks(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers
            .iter()
            .flat_map(|l| l.lora.iter().flatten())
            .map(|l| l.rank)
    }

    /// Whether every attached LoRA pair has one rank (or none is attached): then
    /// [`Llama::decode_step`] allocates nothing, where mixed ranks resize its scratch.
    pub fn uniform_lora_rank(&self) -> bool {
        let mut r = self.lora_ranks();
        r.next().is_none_or(|first| r.all(|x| x == first))
    }

    /// One decode step: `ids` (one token per sequence) at position `cache.len`, appended to
    /// the cache, the logits `[batch, vocab]` into `ws.logits`. What
    /// `forward(ids, batch, cache, None, &[], LogitsMode::Last)` computes, in `ws`'s buffers.
    pub fn decode_step(
        &self,
        ids: &[u32],
        cache: &mut KvCache<B>,
        ws: &mut DecodeWorkspace<B>,
    ) -> Result<()> {
        let (be, cfg) = (&self.backend, &self.cfg);
        let (batch, d) = (ws.batch, cfg.hidden_size);
        ensure!(
            ids.len() == batch && cache.batch == batch,
            "decode_step: {} ids for a workspace of {batch} and a cache of {} sequences",
            ids.len(),
            cache.batch
        );
        ensure!(
            cache.len < cache.capacity,
            "decode_step: the KV cache is full ({} positions)",
            cache.capacity
        );
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            anyhow::bail!(
                "token id {bad} is outside the vocabulary ({})",
                cfg.vocab_size
            );
        }
        let shape = AttnShape {
            batch,
            q_len: 1,
            start_pos: cache.len,
            capacity: cache.capacity,
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        };
        be.embedding(&self.embed, ids, d, &mut ws.x);
        be.rmsnorm(&ws.x, &self.layers[0].attn_norm, d, cfg.rms_eps, &mut ws.xn);
        for li in 0..self.layers.len() {
            let (kc, vc) = (&mut cache.k[li], &mut cache.v[li]);
            self.block(
                li,
                &mut ws.x,
                &mut ws.xn,
                &mut ws.acts,
                kc,
                vc,
                None,
                shape,
                true,
                None,
                false,
                &mut ws.scratch,
            )?;
        }
        cache.len += 1;
        be.matmul(
            &ws.xn,
            self.lm_head(),
            &mut ws.logits,
            batch,
            cfg.vocab_size,
            d,
            1.0,
            false,
        );
        Ok(())
    }

    /// Like [`Llama::forward`], from embeddings (`[batch * seq, hidden]`) instead of token ids.
    pub fn forward_embeds(
        &self,
        embeds: &B::Buf,
        batch: usize,
        cache: &mut KvCache<B>,
        key_mask: Option<&B::Buf>,
        capture: &[usize],
        logits: LogitsMode,
    ) -> Result<ForwardOutput<B>> {
        let rows = self.backend.len(embeds) / self.cfg.hidden_size;
        let (out, _) = self.run(
            Input::Embeds(embeds),
            rows,
            batch,
            cache,
            key_mask,
            capture,
            logits,
            true,
            false,
            None,
            None,
        )?;
        Ok(out)
    }

    /// Token embeddings of `ids` (`[ids.len(), hidden]`).
    pub fn embed_ids(&self, ids: &[u32]) -> Result<B::Buf> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            anyhow::bail!(
                "token id {bad} is outside the vocabulary ({})",
                self.cfg.vocab_size
            );
        }
        let mut x = self.backend.alloc(ids.len() * self.cfg.hidden_size)?;
        self.backend
            .embedding(&self.embed, ids, self.cfg.hidden_size, &mut x);
        Ok(x)
    }

    /// A whole-sequence forward that records activations for [`Llama::backward`].
    /// `use_lora = false` gives the frozen model's representations (same weights, LoRA skipped).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_train(
        &self,
        input: Input<B>,
        batch: usize,
        seq: usize,
        key_mask: Option<&B::Buf>,
        capture: &[usize],
        logits: LogitsMode,
        use_lora: bool,
    ) -> Result<(ForwardOutput<B>, Activations<B>)> {
        self.forward_train_hooked(input, batch, seq, key_mask, capture, logits, use_lora, None)
    }

    /// [`Llama::forward_train`] with a latent adversary in the residual stream.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_train_hooked(
        &self,
        input: Input<B>,
        batch: usize,
        seq: usize,
        key_mask: Option<&B::Buf>,
        capture: &[usize],
        logits: LogitsMode,
        use_lora: bool,
        hook: Option<&super::latent::LatentHook<B>>,
    ) -> Result<(ForwardOutput<B>, Activations<B>)> {
        self.forward_train_dropout(
            input, batch, seq, key_mask, capture, logits, use_lora, hook, None,
        )
    }

    /// [`Llama::forward_train_hooked`] with LoRA dropout (training only; ignored when
    /// `use_lora` is false). [`Llama::backward`] reapplies the same masks.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_train_dropout(
        &self,
        input: Input<B>,
        batch: usize,
        seq: usize,
        key_mask: Option<&B::Buf>,
        capture: &[usize],
        logits: LogitsMode,
        use_lora: bool,
        hook: Option<&super::latent::LatentHook<B>>,
        dropout: Option<LoraDropout>,
    ) -> Result<(ForwardOutput<B>, Activations<B>)> {
        let dropout = dropout.filter(|d| use_lora && d.p > 0.0);
        let mut cache = self.new_cache(batch, seq)?;
        let (out, acts) = self.run(
            input,
            batch * seq,
            batch,
            &mut cache,
            key_mask,
            capture,
            logits,
            use_lora,
            true,
            hook,
            dropout,
        )?;
        Ok((out, acts.expect("recording forward returns activations")))
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        input: Input<B>,
        rows: usize,
        batch: usize,
        cache: &mut KvCache<B>,
        key_mask: Option<&B::Buf>,
        capture: &[usize],
        logits: LogitsMode,
        use_lora: bool,
        record: bool,
        hook: Option<&super::latent::LatentHook<B>>,
        dropout: Option<LoraDropout>,
    ) -> Result<(ForwardOutput<B>, Option<Activations<B>>)> {
        let cfg = &self.cfg;
        let be = &self.backend;
        let d = cfg.hidden_size;
        ensure!(
            batch > 0 && rows > 0 && rows.is_multiple_of(batch),
            "forward: {rows} rows do not split into {batch} sequences"
        );
        ensure!(
            batch == cache.batch,
            "forward: batch {batch} but the KV cache holds {}",
            cache.batch
        );
        let seq = rows / batch;
        ensure!(
            cache.len + seq <= cache.capacity,
            "forward: {} cached + {seq} new tokens exceed the KV cache capacity {}",
            cache.len,
            cache.capacity
        );
        if let Some(h) = hook {
            ensure!(
                h.index >= 1 && h.index < cfg.num_layers,
                "latent adversary at hidden-state index {} is not between blocks",
                h.index
            );
        }
        let mut latent = None;
        for &c in capture {
            ensure!(
                c <= cfg.num_layers,
                "hidden-state index {c} > num_layers {}",
                cfg.num_layers
            );
        }
        let shape = AttnShape {
            batch,
            q_len: seq,
            start_pos: cache.len,
            capacity: cache.capacity,
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        };

        let mut hidden = Vec::new();
        let keep = |idx: usize, buf: &B::Buf, hidden: &mut Vec<(usize, B::Buf)>| -> Result<()> {
            if capture.contains(&idx) {
                hidden.push((idx, clone_buf(be, buf, rows, d)?));
            }
            Ok(())
        };

        let mut x = match input {
            Input::Ids(ids) => {
                ensure!(
                    ids.len() == rows,
                    "forward: {} ids for {rows} rows",
                    ids.len()
                );
                if let Some(&bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                    anyhow::bail!(
                        "token id {bad} is outside the vocabulary ({})",
                        cfg.vocab_size
                    );
                }
                // The residual stream is f32 (clone_f32).
                let mut x = be.alloc_f32(rows * d)?;
                be.embedding(&self.embed, ids, d, &mut x);
                x
            }
            Input::Embeds(e) => {
                ensure!(
                    be.len(e) == rows * d,
                    "forward: embeddings hold {} values, expected {rows} x {d}",
                    be.len(e)
                );
                clone_f32(be, e, rows, d)?
            }
        };
        keep(0, &x, &mut hidden)?;

        let max_rank = self.lora_ranks().max().unwrap_or(1);
        let mut scratch = BlockScratch::new(be, rows, cfg, max_rank)?;
        let mut recorded = Vec::new();
        let recompute = self.recompute;
        let mut checkpoints = Vec::new();
        let mut shared = if record && !recompute {
            None
        } else {
            Some(LayerActs::new(be, rows, cfg)?)
        };
        let mut xn = be.alloc(rows * d)?;
        be.rmsnorm(&x, &self.layers[0].attn_norm, d, cfg.rms_eps, &mut xn);
        for li in 0..self.layers.len() {
            let mut fresh = if record && !recompute {
                Some(LayerActs::new(be, rows, cfg)?)
            } else {
                None
            };
            if record && recompute {
                // f32 like the stream itself, so the recomputed block is the one that ran.
                checkpoints.push(clone_f32(be, &x, rows, d)?);
            }
            let a = fresh
                .as_mut()
                .or(shared.as_mut())
                .expect("one activation set");
            let (kc, vc) = (&mut cache.k[li], &mut cache.v[li]);
            let keep_acts = record && !recompute;
            self.block(
                li,
                &mut x,
                &mut xn,
                a,
                kc,
                vc,
                key_mask,
                shape,
                use_lora,
                dropout,
                keep_acts,
                &mut scratch,
            )?;
            if let Some(h) = hook.filter(|h| h.index == li + 1) {
                // x <- x + D x + b, and the next block's input norm again.
                let x_pre = clone_buf(be, &x, rows, d)?;
                be.matmul(&x_pre, &h.d, &mut x, rows, d, d, 1.0, true);
                be.add_bias(&mut x, &h.b);
                be.rmsnorm(&x, &self.layers[li + 1].attn_norm, d, cfg.rms_eps, &mut xn);
                if record {
                    latent = Some(super::latent::LatentActs {
                        index: h.index,
                        x_pre,
                        d: clone_buf(be, &h.d, d, d)?,
                    });
                }
            }
            if li + 1 < cfg.num_layers {
                keep(li + 1, &x, &mut hidden)?;
            }
            if let Some(a) = fresh {
                recorded.push(a);
            }
        }
        // xn now holds the final-normed stream: hidden-state index L.
        keep(cfg.num_layers, &xn, &mut hidden)?;
        cache.len += seq;

        let logits = match logits {
            LogitsMode::None => None,
            LogitsMode::All => {
                let mut out = be.alloc_f32(rows * cfg.vocab_size)?;
                be.matmul(
                    &xn,
                    self.lm_head(),
                    &mut out,
                    rows,
                    cfg.vocab_size,
                    d,
                    1.0,
                    false,
                );
                Some(out)
            }
            LogitsMode::Last => {
                // One token per sequence (decode): the last rows are all of them.
                let xl = if seq == 1 {
                    None
                } else {
                    let last: Vec<u32> = (0..batch).map(|b| (b * seq + seq - 1) as u32).collect();
                    let mut xl = be.alloc(batch * d)?;
                    be.gather_rows(&xn, &last, d, &mut xl, 0);
                    Some(xl)
                };
                let mut out = be.alloc_f32(batch * cfg.vocab_size)?;
                be.matmul(
                    xl.as_ref().unwrap_or(&xn),
                    self.lm_head(),
                    &mut out,
                    batch,
                    cfg.vocab_size,
                    d,
                    1.0,
                    false,
                );
                Some(out)
            }
        };
        let acts = if record {
            Some(Activations {
                batch,
                seq,
                layers: recorded,
                checkpoints,
                recompute,
                // The final norm's backward takes its input in the working precision.
                h_last: clone_buf(be, &x, rows, d)?,
                xn_final: xn,
                used_lora: use_lora,
                latent,
                dropout,
            })
        } else {
            None
        };
        Ok((ForwardOutput { logits, hidden }, acts))
    }

    /// Decoder block `li`: `x` enters as the residual stream and leaves as the block's output;
    /// `xn` enters as `rmsnorm(x)` with this block's input norm and leaves as the output normed
    /// with the next norm (the next block's, or the final norm). `record` keeps what the
    /// backward pass reads (`h_in`, `h_mid`, post-RoPE keys and values) in `a`. `dropout`
    /// (with `use_lora`) drops inputs of the LoRA paths, one mask per module.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block(
        &self,
        li: usize,
        x: &mut B::Buf,
        xn: &mut B::Buf,
        a: &mut LayerActs<B>,
        k_cache: &mut B::Buf,
        v_cache: &mut B::Buf,
        key_mask: Option<&B::Buf>,
        shape: AttnShape,
        use_lora: bool,
        dropout: Option<LoraDropout>,
        record: bool,
        scratch: &mut BlockScratch<B>,
    ) -> Result<()> {
        let BlockScratch {
            lora: lora_tmp,
            lora_more,
            proj,
        } = scratch;
        let cfg = &self.cfg;
        let be = &self.backend;
        let layer = &self.layers[li];
        let (d, rows) = (cfg.hidden_size, shape.batch * shape.q_len);
        std::mem::swap(&mut a.xn1, xn);
        if record {
            a.h_in = Some(clone_buf(be, x, rows, d)?);
        }
        let lora = |m: LoraModule| {
            if use_lora {
                layer.lora[m as usize]
                    .as_ref()
                    .map(|l| (l, dropout.map(|d| d.module(li, m))))
            } else {
                None
            }
        };
        if record || dropout.is_some() {
            // Training keeps the three projections apart: each has its own dropout mask.
            for (m, out) in [
                (LoraModule::Q, &mut a.q),
                (LoraModule::K, &mut a.k),
                (LoraModule::V, &mut a.v),
            ] {
                self.project(layer, m, lora(m), &a.xn1, out, rows, lora_tmp)?;
            }
        } else {
            self.qkv_proj(
                layer,
                [
                    lora(LoraModule::Q),
                    lora(LoraModule::K),
                    lora(LoraModule::V),
                ],
                a,
                rows,
                lora_tmp,
                lora_more,
            )?;
        }
        if let Some(b) = &layer.q_bias {
            be.add_bias(&mut a.q, b);
        }
        if let Some(b) = &layer.k_bias {
            be.add_bias(&mut a.k, b);
        }
        if let Some(b) = &layer.v_bias {
            be.add_bias(&mut a.v, b);
        }
        be.rope_kv_store(
            &mut a.q,
            &mut a.k,
            &a.v,
            k_cache,
            v_cache,
            shape,
            &self.inv_freq,
        );
        be.attention(&a.q, k_cache, v_cache, key_mask, &mut a.att, shape);
        self.project(
            layer,
            LoraModule::O,
            lora(LoraModule::O),
            &a.att,
            proj,
            rows,
            lora_tmp,
        )?;
        be.add_rmsnorm(x, proj, &layer.mlp_norm, d, cfg.rms_eps, &mut a.xn2);
        if record {
            a.h_mid = Some(clone_buf(be, x, rows, d)?);
        }
        if record || dropout.is_some() {
            // Training keeps gate and up for the backward.
            self.project(
                layer,
                LoraModule::Gate,
                lora(LoraModule::Gate),
                &a.xn2,
                &mut a.gate,
                rows,
                lora_tmp,
            )?;
            self.project(
                layer,
                LoraModule::Up,
                lora(LoraModule::Up),
                &a.xn2,
                &mut a.up,
                rows,
                lora_tmp,
            )?;
            be.swiglu(&a.gate, &a.up, &mut a.act);
        } else {
            self.gate_up_swiglu(
                layer,
                lora(LoraModule::Gate),
                lora(LoraModule::Up),
                a,
                rows,
                lora_tmp,
                &mut lora_more[0],
            )?;
        }
        self.project(
            layer,
            LoraModule::Down,
            lora(LoraModule::Down),
            &a.act,
            proj,
            rows,
            lora_tmp,
        )?;
        let next_norm = self
            .layers
            .get(li + 1)
            .map_or(&self.final_norm, |n| &n.attn_norm);
        be.add_rmsnorm(x, proj, next_norm, d, cfg.rms_eps, xn);
        if record {
            a.k_all = Some(clone_buf(be, k_cache, rows, cfg.kv_dim())?);
            a.v_all = Some(clone_buf(be, v_cache, rows, cfg.kv_dim())?);
        }
        Ok(())
    }

    /// `tmp = x A^T` for a LoRA pair (`x` already dropped out where the pass drops), `tmp`
    /// reallocated to `[rows, rank]` when its size differs: the first half of a LoRA term.
    fn lora_down(
        &self,
        l: &super::model::DeviceLora<B>,
        x: &B::Buf,
        rows: usize,
        fan_in: usize,
        tmp: &mut B::Buf,
    ) -> Result<()> {
        let be = &self.backend;
        if be.len(tmp) != rows * l.rank {
            *tmp = be.alloc(rows * l.rank)?;
        }
        be.matmul(x, &l.a, tmp, rows, l.rank, fan_in, 1.0, false);
        Ok(())
    }

    /// [`Llama::lora_down`] into an optional scratch slot, allocated on first use.
    fn lora_down_slot(
        &self,
        l: &super::model::DeviceLora<B>,
        x: &B::Buf,
        rows: usize,
        fan_in: usize,
        slot: &mut Option<B::Buf>,
    ) -> Result<()> {
        if slot.is_none() {
            *slot = Some(self.backend.alloc(rows * l.rank)?);
        }
        self.lora_down(l, x, rows, fan_in, slot.as_mut().expect("allocated above"))
    }

    /// `a.q`, `a.k`, `a.v` from `a.xn1` through `Backend::qkv_proj` (one launch at decode on
    /// CUDA): the LoRA pairs' `x A^T` go to `tmp_q` and `tmp_kv` first. No dropout (inference
    /// only).
    fn qkv_proj(
        &self,
        layer: &DeviceLayer<B>,
        lora: [Option<(&super::model::DeviceLora<B>, Option<LoraDropout>)>; 3],
        a: &mut LayerActs<B>,
        rows: usize,
        tmp_q: &mut B::Buf,
        tmp_kv: &mut [Option<B::Buf>; 2],
    ) -> Result<()> {
        let cfg = &self.cfg;
        let d = cfg.hidden_size;
        if let Some((l, _)) = lora[0] {
            self.lora_down(l, &a.xn1, rows, d, tmp_q)?;
        }
        for (lora, slot) in lora[1..].iter().zip(tmp_kv.iter_mut()) {
            if let Some((l, _)) = lora {
                self.lora_down_slot(l, &a.xn1, rows, d, slot)?;
            }
        }
        let [tk, tv] = &*tmp_kv;
        self.backend.qkv_proj(
            &a.xn1,
            [&layer.q, &layer.k, &layer.v],
            [
                lora_term(lora[0], Some(&*tmp_q)),
                lora_term(lora[1], tk.as_ref()),
                lora_term(lora[2], tv.as_ref()),
            ],
            [&mut a.q, &mut a.k, &mut a.v],
            rows,
            [cfg.q_dim(), cfg.kv_dim(), cfg.kv_dim()],
            d,
        );
        Ok(())
    }

    /// `a.act = silu(gate) * up` from `a.xn2` through `Backend::gate_up_swiglu` (one launch at
    /// decode on CUDA): the LoRA pairs' `x A^T` go to `tmp_gate` and `tmp_up` first. No
    /// dropout (inference only); `a.gate` and `a.up` are left unspecified.
    #[allow(clippy::too_many_arguments)]
    fn gate_up_swiglu(
        &self,
        layer: &DeviceLayer<B>,
        lora_g: Option<(&super::model::DeviceLora<B>, Option<LoraDropout>)>,
        lora_u: Option<(&super::model::DeviceLora<B>, Option<LoraDropout>)>,
        a: &mut LayerActs<B>,
        rows: usize,
        tmp_gate: &mut B::Buf,
        tmp_up: &mut Option<B::Buf>,
    ) -> Result<()> {
        let be = &self.backend;
        let (d, ff) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        if let Some((l, _)) = lora_g {
            self.lora_down(l, &a.xn2, rows, d, tmp_gate)?;
        }
        if let Some((l, _)) = lora_u {
            self.lora_down_slot(l, &a.xn2, rows, d, tmp_up)?;
        }
        be.gate_up_swiglu(
            &a.xn2,
            &layer.gate,
            &layer.up,
            lora_term(lora_g, Some(&*tmp_gate)),
            lora_term(lora_u, tmp_up.as_ref()),
            &mut a.gate,
            &mut a.up,
            &mut a.act,
            rows,
            ff,
            d,
        );
        Ok(())
    }

    /// `out = x W^T (+ scale * (x_d A^T) B^T when a LoRA pair is given)`, with
    /// `x_d = x * keep / (1 - p)` under the pair's dropout, else `x`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn project(
        &self,
        layer: &DeviceLayer<B>,
        m: LoraModule,
        lora: Option<(&super::model::DeviceLora<B>, Option<LoraDropout>)>,
        x: &B::Buf,
        out: &mut B::Buf,
        rows: usize,
        tmp: &mut B::Buf,
    ) -> Result<()> {
        let (fan_in, fan_out) = m.dims(&self.cfg);
        let be = &self.backend;
        let Some((l, dropout)) = lora else {
            be.matmul(x, layer.weight(m), out, rows, fan_out, fan_in, 1.0, false);
            return Ok(());
        };
        let dropped = dropout.map(|d| dropout_input(be, x, d)).transpose()?;
        self.lora_down(l, dropped.as_ref().unwrap_or(x), rows, fan_in, tmp)?;
        let w = layer.weight(m);
        be.matmul_lora(x, w, tmp, &l.b, out, rows, fan_out, fan_in, l.rank, l.scale);
        Ok(())
    }
}
