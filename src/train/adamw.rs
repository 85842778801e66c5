//! AdamW on the LoRA factors (torch.optim.AdamW semantics: decoupled weight decay applied as
//! `p *= 1 - lr * wd` before the Adam update, bias-corrected moments).

use crate::backend::BackwardOps;
use crate::llama::{Llama, LoraAdapter, LoraGrads};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// First and second moments of one parameter tensor.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Moments {
    pub fn new(n: usize) -> Self {
        Self {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

/// One AdamW update of `p` with gradient `g` at step `t` (1-based).
pub fn adamw_step(cfg: &AdamWConfig, t: u64, p: &mut [f32], g: &[f32], st: &mut Moments) {
    assert!(
        p.len() == g.len() && st.m.len() == p.len() && st.v.len() == p.len(),
        "adamw: sizes differ"
    );
    assert!(t >= 1, "adamw: steps count from 1");
    let bc1 = 1.0 - cfg.beta1.powi(t as i32);
    let bc2 = 1.0 - cfg.beta2.powi(t as i32);
    let decay = (1.0 - cfg.lr * cfg.weight_decay) as f32;
    let step = cfg.lr / bc1;
    let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
    for i in 0..p.len() {
        let gi = g[i];
        st.m[i] = b1 * st.m[i] + (1.0 - b1) * gi;
        st.v[i] = b2 * st.v[i] + (1.0 - b2) * gi * gi;
        let denom = ((st.v[i] as f64) / bc2).sqrt() + cfg.eps;
        p[i] = p[i] * decay - (step * st.m[i] as f64 / denom) as f32;
    }
}

/// AdamW over every LoRA pair of a model, on the model's device: the factors are updated in
/// place in the model's LoRA buffers and the moments live next to them, so a training step
/// moves no parameter to the host. [`LoraOptimizer::download`] brings the state back for a
/// checkpoint.
pub struct LoraOptimizer<B: BackwardOps> {
    /// `(layer, module)` of each pair, in the adapter's order.
    pairs: Vec<(usize, crate::llama::LoraModule)>,
    /// `[m_a, v_a, m_b, v_b]` per pair.
    moments: Vec<[B::Buf; 4]>,
}

impl<B: BackwardOps> LoraOptimizer<B> {
    /// Uploads `moments` (one `(A, B)` pair per adapter pair) to the model's device.
    pub fn new(be: &B, adapter: &LoraAdapter, moments: &[(Moments, Moments)]) -> Result<Self> {
        anyhow::ensure!(
            moments.len() == adapter.pairs.len(),
            "optimiser state has {} LoRA pairs, the adapter {}",
            moments.len(),
            adapter.pairs.len()
        );
        let moments = moments
            .iter()
            .map(|(a, b)| {
                Ok([
                    be.upload_f32(&a.m)?,
                    be.upload_f32(&a.v)?,
                    be.upload_f32(&b.m)?,
                    be.upload_f32(&b.v)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            pairs: adapter.pairs.iter().map(|p| (p.layer, p.module)).collect(),
            moments,
        })
    }

    /// One step (`t` 1-based) of every pair with gradients `grads * grad_scale`.
    pub fn step(
        &mut self,
        cfg: &AdamWConfig,
        t: u64,
        model: &mut Llama<B>,
        grads: &LoraGrads<B>,
        grad_scale: f32,
    ) -> Result<()> {
        let Llama {
            backend, layers, ..
        } = model;
        for (&(layer, module), [ma, va, mb, vb]) in self.pairs.iter().zip(&mut self.moments) {
            let (ga, gb) = grads
                .get(layer, module)
                .with_context(|| format!("no gradient for LoRA layer {layer} {module:?}"))?;
            let lora = layers[layer].lora[module as usize]
                .as_mut()
                .with_context(|| format!("LoRA layer {layer} {module:?} is not attached"))?;
            backend.adamw_step(cfg, t, &mut lora.a, ga, grad_scale, ma, va);
            backend.adamw_step(cfg, t, &mut lora.b, gb, grad_scale, mb, vb);
        }
        Ok(())
    }

    /// The factors (into `adapter`) and the moments, from the device.
    pub fn download(
        &self,
        model: &Llama<B>,
        adapter: &mut LoraAdapter,
    ) -> Result<Vec<(Moments, Moments)>> {
        let be = &model.backend;
        let mut out = Vec::with_capacity(self.moments.len());
        for (p, [ma, va, mb, vb]) in adapter.pairs.iter_mut().zip(&self.moments) {
            let lora = model.lora(p.layer, p.module).with_context(|| {
                format!("LoRA layer {} {:?} is not attached", p.layer, p.module)
            })?;
            p.a = be.download(&lora.a)?;
            p.b = be.download(&lora.b)?;
            out.push((
                Moments {
                    m: be.download(ma)?,
                    v: be.download(va)?,
                },
                Moments {
                    m: be.download(mb)?,
                    v: be.download(vb)?,
                },
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    /// on p = [1.0, -2.0] with gradients [0.5, -1.5] then [0.1, 0.2], worked by hand:
    /// step 1: m = [0.05, -0.15], v = [2.5e-4, 2.25e-3], m_hat/sqrt(v_hat) = [1, -1];
    ///         p = p * (1 - 0.001) - 0.1 * [1, -1] = [0.899, -1.898].
    #[test]
    fn matches_torch_first_step() {
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut p = vec![1.0f32, -2.0];
        let mut st = Moments::new(2);
        adamw_step(&cfg, 1, &mut p, &[0.5, -1.5], &mut st);
        assert!(
            (p[0] - 0.899).abs() < 1e-6 && (p[1] + 1.898).abs() < 1e-6,
            "{p:?}"
        );
        // Step 2 against the closed form.
        adamw_step(&cfg, 2, &mut p, &[0.1, 0.2], &mut st);
        let m = [0.9 * 0.05 + 0.1 * 0.1, 0.9 * -0.15 + 0.1 * 0.2];
        let v = [
            0.999 * 2.5e-4 + 0.001 * 0.01,
            0.999 * 2.25e-3 + 0.001 * 0.04,
        ];
        let want: Vec<f64> = [0.899f64, -1.898]
            .iter()
            .enumerate()
            .map(|(i, p0)| {
                let mh = m[i] / (1.0 - 0.81);
                let vh = v[i] / (1.0 - 0.999f64.powi(2));
                p0 * (1.0 - 0.001) - 0.1 * mh / (vh.sqrt() + 1e-8)
            })
            .collect();
        assert!(
            (p[0] as f64 - want[0]).abs() < 1e-5 && (p[1] as f64 - want[1]).abs() < 1e-5,
            "{p:?} vs {want:?}"
        );
    }
}
