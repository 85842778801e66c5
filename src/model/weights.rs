//! Host-side model weights in Hugging Face naming, assembled from any tensor source
//! (safetensors files or GGUF) and checked against the config before anything runs.

use super::config::ModelConfig;
use anyhow::{bail, Result};

/// A dense f32 tensor on the host, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Where weights come from. Names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`);
/// a source in another naming (GGUF) translates. Errors name the file and the tensor.
pub trait TensorSource {
    /// Human-readable origin, used in error messages (usually a file path).
    fn origin(&self) -> String;
    fn contains(&self, name: &str) -> bool;
    /// Loads a tensor as f32 (dequantising or widening as needed).
    fn load(&self, name: &str) -> Result<HostTensor>;
}

#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: HostTensor,
    pub q: HostTensor,
    pub k: HostTensor,
    pub v: HostTensor,
    pub o: HostTensor,
    pub q_bias: Option<HostTensor>,
    pub k_bias: Option<HostTensor>,
    pub v_bias: Option<HostTensor>,
    pub mlp_norm: HostTensor,
    pub gate: HostTensor,
    pub up: HostTensor,
    pub down: HostTensor,
}

#[derive(Debug, Clone)]
pub struct ModelWeights {
    /// [vocab, hidden]
    pub embed: HostTensor,
    pub layers: Vec<LayerWeights>,
    pub final_norm: HostTensor,
    /// [vocab, hidden]; `None` when tied to `embed`.
    pub lm_head: Option<HostTensor>,
}

fn load_checked(src: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<HostTensor> {
    if !src.contains(name) {
        bail!("{}: missing tensor {name:?}", src.origin());
    }
    let t = src.load(name)?;
    if t.shape != shape {
        bail!(
            "{}: tensor {name:?} has shape {:?} but the config implies {:?}",
            src.origin(),
            t.shape,
            shape
        );
    }
    if t.data.len() != shape.iter().product::<usize>() {
        bail!(
            "{}: tensor {name:?} holds {} values, its shape says {:?}",
            src.origin(),
            t.data.len(),
            shape
        );
    }
    Ok(t)
}

impl ModelWeights {
    /// Loads every tensor the config calls for, checking each shape.
    pub fn load(cfg: &ModelConfig, src: &dyn TensorSource) -> Result<Self> {
        let d = cfg.hidden_size;
        let (qd, kvd, ff, v) = (
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let embed = load_checked(src, "model.embed_tokens.weight", &[v, d])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let t = |n: &str, s: &[usize]| load_checked(src, &format!("{p}.{n}"), s);
            let bias = |n: &str, len: usize| -> Result<Option<HostTensor>> {
                if cfg.qkv_bias {
                    Ok(Some(load_checked(
                        src,
                        &format!("{p}.self_attn.{n}.bias"),
                        &[len],
                    )?))
                } else {
                    Ok(None)
                }
            };
            layers.push(LayerWeights {
                attn_norm: t("input_layernorm.weight", &[d])?,
                q: t("self_attn.q_proj.weight", &[qd, d])?,
                k: t("self_attn.k_proj.weight", &[kvd, d])?,
                v: t("self_attn.v_proj.weight", &[kvd, d])?,
                o: t("self_attn.o_proj.weight", &[d, qd])?,
                q_bias: bias("q_proj", qd)?,
                k_bias: bias("k_proj", kvd)?,
                v_bias: bias("v_proj", kvd)?,
                mlp_norm: t("post_attention_layernorm.weight", &[d])?,
                gate: t("mlp.gate_proj.weight", &[ff, d])?,
                up: t("mlp.up_proj.weight", &[ff, d])?,
                down: t("mlp.down_proj.weight", &[d, ff])?,
            });
        }
        let final_norm = load_checked(src, "model.norm.weight", &[d])?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(load_checked(src, "lm_head.weight", &[v, d])?)
        };
        Ok(Self {
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }

    pub fn lm_head(&self) -> &HostTensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Seeded random weights at the config's shapes (benchmarks and tests; never all zeros).
    pub fn random(cfg: &ModelConfig, seed: u64) -> Self {
        let mut rng = crate::util::Rng::new(seed);
        let mut t = |shape: &[usize], scale: f32| {
            let n = shape.iter().product();
            HostTensor::new(
                shape.to_vec(),
                (0..n).map(|_| rng.normal() * scale).collect(),
            )
        };
        let d = cfg.hidden_size;
        let (qd, kvd, ff, v) = (
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let ws = 1.0 / (d as f32).sqrt();
        let embed = t(&[v, d], 1.0);
        let mut layers = Vec::new();
        for _ in 0..cfg.num_layers {
            let norm = |t: &mut dyn FnMut(&[usize], f32) -> HostTensor| {
                let mut n = t(&[d], 0.1);
                n.data.iter_mut().for_each(|x| *x += 1.0);
                n
            };
            let attn_norm = norm(&mut t);
            let q = t(&[qd, d], ws);
            let k = t(&[kvd, d], ws);
            let vv = t(&[kvd, d], ws);
            let o = t(&[d, qd], 1.0 / (qd as f32).sqrt());
            let (q_bias, k_bias, v_bias) = if cfg.qkv_bias {
                (
                    Some(t(&[qd], 0.1)),
                    Some(t(&[kvd], 0.1)),
                    Some(t(&[kvd], 0.1)),
                )
            } else {
                (None, None, None)
            };
            let mlp_norm = norm(&mut t);
            let gate = t(&[ff, d], ws);
            let up = t(&[ff, d], ws);
            let down = t(&[d, ff], 1.0 / (ff as f32).sqrt());
            layers.push(LayerWeights {
                attn_norm,
                q,
                k,
                v: vv,
                o,
                q_bias,
                k_bias,
                v_bias,
                mlp_norm,
                gate,
                up,
                down,
            });
        }
        let mut final_norm = t(&[d], 0.1);
        final_norm.data.iter_mut().for_each(|x| *x += 1.0);
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(t(&[v, d], ws))
        };
        Self {
            embed,
            layers,
            final_norm,
            lm_head,
        }
    }
}
