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
        let up = |t: &crate::model::HostTensor| backend.upload(&t.data);
        // Norm weights and biases stay f32 on every device.
        let side = |t: &crate::model::HostTensor| backend.upload_f32(&t.data);
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            let opt = |t: &Option<crate::model::HostTensor>| t.as_ref().map(side).transpose();
            layers.push(DeviceLayer {
                attn_norm: side(&l.attn_norm)?,
                q: up(&l.q)?,
                k: up(&l.k)?,
                v: up(&l.v)?,
                o: up(&l.o)?,
                q_bias: opt(&l.q_bias)?,
                k_bias: opt(&l.k_bias)?,
                v_bias: opt(&l.v_bias)?,
                mlp_norm: side(&l.mlp_norm)?,
                gate: up(&l.gate)?,
                up: up(&l.up)?,
                down: up(&l.down)?,
                lora: Default::default(),
            });
        }
        let inv = cfg.rope_inv_freq();
        let inv_freq = backend.upload_f32(&inv)?;
        let inv_freq_neg = backend.upload_f32(&inv.iter().map(|x| -x).collect::<Vec<_>>())?;
        Ok(Self {
            embed: up(&w.embed)?,
            final_norm: side(&w.final_norm)?,
            lm_head: w.lm_head.as_ref().map(up).transpose()?,
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
        let mut k = Vec::with_capacity(self.cfg.num_layers);
        let mut v = Vec::with_capacity(self.cfg.num_layers);
        for _ in 0..self.cfg.num_layers {
            k.push(self.backend.alloc(n)?);
            v.push(self.backend.alloc(n)?);
        }
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
