//! Forward pass with residual-stream capture.
//!
//! Hidden-state indices follow transformers' `output_hidden_states`: 0 = token embeddings,
//! i = output of block i-1 for 1 <= i < L, L = final block's output after the final norm.

use super::model::{DeviceLayer, KvCache, Llama};
use super::LoraModule;
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

pub struct ForwardOutput<B: Backend> {
    pub logits: Option<B::Buf>,
    /// `(index, [batch * seq_len, hidden])` for each requested hidden-state index, in increasing index order.
    pub hidden: Vec<(usize, B::Buf)>,
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
        let cfg = &self.cfg;
        let be = &self.backend;
        ensure!(
            batch > 0 && !ids.is_empty() && ids.len() % batch == 0,
            "forward: {} ids do not split into {batch} sequences",
            ids.len()
        );
        ensure!(
            batch == cache.batch,
            "forward: batch {batch} but the KV cache holds {}",
            cache.batch
        );
        let seq = ids.len() / batch;
        ensure!(
            cache.len + seq <= cache.capacity,
            "forward: {} cached + {seq} new tokens exceed the KV cache capacity {}",
            cache.len,
            cache.capacity
        );
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            anyhow::bail!(
                "token id {bad} is outside the vocabulary ({})",
                cfg.vocab_size
            );
        }
        for &c in capture {
            ensure!(
                c <= cfg.num_layers,
                "hidden-state index {c} > num_layers {}",
                cfg.num_layers
            );
        }
        let rows = ids.len();
        let (d, qd, kvd, ff) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
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
            for _ in capture.iter().filter(|&&c| c == idx) {
                let mut copy = be.alloc(rows * d)?;
                let all: Vec<u32> = (0..rows as u32).collect();
                be.gather_rows(buf, &all, d, &mut copy, 0);
                hidden.push((idx, copy));
            }
            Ok(())
        };

        let mut x = be.alloc(rows * d)?;
        be.embedding(&self.embed, ids, d, &mut x);
        keep(0, &x, &mut hidden)?;

        let mut xn = be.alloc(rows * d)?;
        let mut q = be.alloc(rows * qd)?;
        let mut k = be.alloc(rows * kvd)?;
        let mut v = be.alloc(rows * kvd)?;
        let mut att = be.alloc(rows * qd)?;
        let mut proj = be.alloc(rows * d)?;
        let mut gate = be.alloc(rows * ff)?;
        let mut up = be.alloc(rows * ff)?;
        let mut act = be.alloc(rows * ff)?;
        let max_rank = self
            .layers
            .iter()
            .flat_map(|l| l.lora.iter().flatten())
            .map(|l| l.rank)
            .max()
            .unwrap_or(0);
        let mut lora_tmp = be.alloc(rows * max_rank.max(1))?;

        be.rmsnorm(&x, &self.layers[0].attn_norm, d, cfg.rms_eps, &mut xn);
        for (li, layer) in self.layers.iter().enumerate() {
            self.project(layer, LoraModule::Q, &xn, &mut q, rows, &mut lora_tmp)?;
            self.project(layer, LoraModule::K, &xn, &mut k, rows, &mut lora_tmp)?;
            self.project(layer, LoraModule::V, &xn, &mut v, rows, &mut lora_tmp)?;
            if let Some(b) = &layer.q_bias {
                be.add_bias(&mut q, b);
            }
            if let Some(b) = &layer.k_bias {
                be.add_bias(&mut k, b);
            }
            if let Some(b) = &layer.v_bias {
                be.add_bias(&mut v, b);
            }
            be.rope(
                &mut q,
                batch,
                seq,
                cfg.num_heads,
                cfg.head_dim,
                cache.len,
                &self.inv_freq,
            );
            be.rope(
                &mut k,
                batch,
                seq,
                cfg.num_kv_heads,
                cfg.head_dim,
                cache.len,
                &self.inv_freq,
            );
            be.kv_store(&k, &v, &mut cache.k[li], &mut cache.v[li], shape);
            be.attention(&q, &cache.k[li], &cache.v[li], key_mask, &mut att, shape);
            self.project(layer, LoraModule::O, &att, &mut proj, rows, &mut lora_tmp)?;
            be.add_rmsnorm(&mut x, &proj, &layer.mlp_norm, d, cfg.rms_eps, &mut xn);

            self.project(layer, LoraModule::Gate, &xn, &mut gate, rows, &mut lora_tmp)?;
            self.project(layer, LoraModule::Up, &xn, &mut up, rows, &mut lora_tmp)?;
            be.swiglu(&gate, &up, &mut act);
            self.project(
                layer,
                LoraModule::Down,
                &act,
                &mut proj,
                rows,
                &mut lora_tmp,
            )?;
            let next_norm = self
                .layers
                .get(li + 1)
                .map_or(&self.final_norm, |n| &n.attn_norm);
            be.add_rmsnorm(&mut x, &proj, next_norm, d, cfg.rms_eps, &mut xn);
            if li + 1 < cfg.num_layers {
                keep(li + 1, &x, &mut hidden)?;
            }
        }
        // xn now holds the final-normed stream: hidden-state index L.
        keep(cfg.num_layers, &xn, &mut hidden)?;
        cache.len += seq;

        let logits = match logits {
            LogitsMode::None => None,
            LogitsMode::All => {
                let mut out = be.alloc(rows * cfg.vocab_size)?;
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
                let last: Vec<u32> = (0..batch).map(|b| (b * seq + seq - 1) as u32).collect();
                let mut xl = be.alloc(batch * d)?;
                be.gather_rows(&xn, &last, d, &mut xl, 0);
                let mut out = be.alloc(batch * cfg.vocab_size)?;
                be.matmul(
                    &xl,
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
        Ok(ForwardOutput { logits, hidden })
    }

    /// `out = x W^T (+ scale * (x A^T) B^T when a LoRA pair is attached)`.
    fn project(
        &self,
        layer: &DeviceLayer<B>,
        m: LoraModule,
        x: &B::Buf,
        out: &mut B::Buf,
        rows: usize,
        tmp: &mut B::Buf,
    ) -> Result<()> {
        let (fan_in, fan_out) = m.dims(&self.cfg);
        let w = match m {
            LoraModule::Q => &layer.q,
            LoraModule::K => &layer.k,
            LoraModule::V => &layer.v,
            LoraModule::O => &layer.o,
            LoraModule::Gate => &layer.gate,
            LoraModule::Up => &layer.up,
            LoraModule::Down => &layer.down,
        };
        let be = &self.backend;
        be.matmul(x, w, out, rows, fan_out, fan_in, 1.0, false);
        if let Some(l) = &layer.lora[m as usize] {
            if be.len(tmp) != rows * l.rank {
                *tmp = be.alloc(rows * l.rank)?;
            }
            be.matmul(x, &l.a, tmp, rows, l.rank, fan_in, 1.0, false);
            be.matmul(tmp, &l.b, out, rows, fan_out, l.rank, l.scale, true);
        }
        Ok(())
    }
}
