//! Device-resident model: weights uploaded once, optional LoRA, KV cache.

use super::lora::{LoraAdapter, LoraModule};
use crate::backend::Backend;
use crate::model::{ModelConfig, ModelWeights};
use anyhow::Result;

pub struct DeviceLora<B: Backend> {
    pub a: B::Buf,
    pub b: B::Buf,
    pub rank: usize,
    pub scale: f32,
}

pub struct DeviceLayer<B: Backend> {
    pub attn_norm: B::Buf,
    pub q: B::Buf,
    pub k: B::Buf,
    pub v: B::Buf,
    pub o: B::Buf,
    pub q_bias: Option<B::Buf>,
    pub k_bias: Option<B::Buf>,
    pub v_bias: Option<B::Buf>,
    pub mlp_norm: B::Buf,
    pub gate: B::Buf,
    pub up: B::Buf,
    pub down: B::Buf,
    /// LoRA pairs of this layer, indexed by `LoraModule as usize`.
    pub lora: [Option<DeviceLora<B>>; 7],
}

impl<B: Backend> DeviceLayer<B> {
    pub fn weight(&self, m: LoraModule) -> &B::Buf {
        match m {
            LoraModule::Q => &self.q,
            LoraModule::K => &self.k,
            LoraModule::V => &self.v,
            LoraModule::O => &self.o,
            LoraModule::Gate => &self.gate,
            LoraModule::Up => &self.up,
            LoraModule::Down => &self.down,
        }
    }
}

pub struct Llama<B: Backend> {
    pub backend: B,
    pub cfg: ModelConfig,
    pub embed: B::Buf,
    pub layers: Vec<DeviceLayer<B>>,
    pub final_norm: B::Buf,
    /// `None` when tied to `embed`.
    pub lm_head: Option<B::Buf>,
    pub inv_freq: B::Buf,
    /// `-inv_freq`: RoPE is a rotation, so its backward is the same op at the negated angle.
    pub inv_freq_neg: B::Buf,
    /// Training forwards keep only each block's input and the backward pass recomputes the
    /// block's activations (memory for long sequences and big models, at ~1 extra forward).
    pub recompute: bool,
    /// LoRA dropout for the tuned passes of an objective step (`train::step`). Only the
    /// trainer sets it, around its own objective steps; every other forward (frozen pass,
    /// evaluation, generation, attacks, `repshield loss`) runs with `None`.
    pub lora_dropout: Option<super::LoraDropout>,
}

impl<B: Backend> Llama<B> {
    pub fn new(backend: B, cfg: &ModelConfig, w: &ModelWeights) -> Result<Self> {
        // Every tensor in one `upload_group` ("weights": one device allocation on CUDA), in
        // this order, then handed out in the same order. Matrices take the backend's storage;
        // norm weights, biases and rope's inv_freq stay f32 on every device.
        let inv = cfg.rope_inv_freq();
        let inv_neg: Vec<f32> = inv.iter().map(|x| -x).collect();
        let mut list: Vec<(&[f32], bool)> = vec![
            (&w.embed.data, false),
            (&w.final_norm.data, true),
            (&inv, true),
            (&inv_neg, true),
        ];
        if let Some(h) = &w.lm_head {
            list.push((&h.data, false));
        }
        for l in &w.layers {
            list.push((&l.attn_norm.data, true));
            for t in [&l.q, &l.k, &l.v, &l.o] {
                list.push((&t.data, false));
            }
            for t in [&l.q_bias, &l.k_bias, &l.v_bias].into_iter().flatten() {
                list.push((&t.data, true));
            }
            list.push((&l.mlp_norm.data, true));
            for t in [&l.gate, &l.up, &l.down] {
                list.push((&t.data, false));
            }
        }
        let mut bufs = backend.upload_group("weights", &list)?.into_iter();
        let mut next = || bufs.next().expect("one buffer per listed tensor");
        let (embed, final_norm, inv_freq, inv_freq_neg) = (next(), next(), next(), next());
        let lm_head = w.lm_head.as_ref().map(|_| next());
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            let attn_norm = next();
            let (q, k, v, o) = (next(), next(), next(), next());
            let q_bias = l.q_bias.as_ref().map(|_| next());
            let k_bias = l.k_bias.as_ref().map(|_| next());
            let v_bias = l.v_bias.as_ref().map(|_| next());
            let mlp_norm = next();
            let (gate, up, down) = (next(), next(), next());
            layers.push(DeviceLayer {
                attn_norm,
                q,
                k,
                v,
                o,
                q_bias,
                k_bias,
                v_bias,
                mlp_norm,
                gate,
                up,
                down,
                lora: Default::default(),
            });
        }
        Ok(Self {
            embed,
            final_norm,
            lm_head,
            layers,
            inv_freq,
            inv_freq_neg,
            recompute: false,
            lora_dropout: None,
            cfg: cfg.clone(),
            backend,
        })
    }

    pub fn lm_head(&self) -> &B::Buf {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Uploads an adapter, replacing any LoRA already attached.
    pub fn attach_lora(&mut self, adapter: &LoraAdapter) -> Result<()> {
        self.detach_lora();
        let scale = adapter.config.scale();
        for p in &adapter.pairs {
            let (fan_in, fan_out) = p.module.dims(&self.cfg);
            let r = adapter.config.rank;
            anyhow::ensure!(
                p.a.len() == r * fan_in && p.b.len() == fan_out * r,
                "LoRA layer {} {}: A must be [{r}, {fan_in}] and B [{fan_out}, {r}]",
                p.layer,
                p.module.hf_name()
            );
            let layer = self
                .layers
                .get_mut(p.layer)
                .ok_or_else(|| anyhow::anyhow!("LoRA layer {} does not exist", p.layer))?;
            layer.lora[p.module as usize] = Some(DeviceLora {
                a: self.backend.upload_f32(&p.a)?,
                b: self.backend.upload_f32(&p.b)?,
                rank: r,
                scale,
            });
        }
        Ok(())
    }

    pub fn detach_lora(&mut self) {
        for l in &mut self.layers {
            l.lora = Default::default();
        }
    }

    pub fn has_lora(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.lora.iter().any(Option::is_some))
    }

    pub fn lora(&self, layer: usize, m: LoraModule) -> Option<&DeviceLora<B>> {
        self.layers[layer].lora[m as usize].as_ref()
    }

    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache<B>> {
        let n = batch * capacity * self.cfg.kv_dim();
        let l = self.cfg.num_layers;
        // Keys of every layer, then values: one "KV cache" group.
        let mut k = self
            .backend
            .alloc_group("KV cache", &vec![(n, false); 2 * l])?;
        let v = k.split_off(l);
        Ok(KvCache {
            k,
            v,
            batch,
            capacity,
            len: 0,
        })
    }
}

/// Per-layer key/value cache, `[batch, capacity, kv_dim]` each.
pub struct KvCache<B: Backend> {
    pub k: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
    pub batch: usize,
    pub capacity: usize,
    /// Positions filled so far (same for every sequence of the batch).
    pub len: usize,
}
