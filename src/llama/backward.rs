//! Backward pass, written by hand in reverse order of `forward.rs`. Gradients flow to the LoRA
//! factors and to the input embeddings; frozen weights get no gradient buffers.

use super::forward::{clone_f32, dropout_input, Activations, LayerActs};
use super::lora::{LoraDropout, LoraModule};
use super::model::{DeviceLayer, Llama};
use crate::backend::{AttnShape, BackwardOps};
use anyhow::{ensure, Result};

/// `(dA, dB)` of each of a block's seven projections that carries LoRA.
pub type BlockLoraGrads<B> = [Option<(
    <B as crate::backend::Backend>::Buf,
    <B as crate::backend::Backend>::Buf,
)>; 7];

/// Gradient buffers of every attached LoRA pair, indexed `[layer][module]`; accumulated (`+=`)
/// across backward calls (gradient accumulation) until [`LoraGrads::zero`].
pub struct LoraGrads<B: BackwardOps> {
    pub grads: Vec<BlockLoraGrads<B>>,
    /// `(dD, db)` of a latent adversary (see `latent.rs`), when the caller asks for them.
    pub latent: Option<(B::Buf, B::Buf)>,
}

impl<B: BackwardOps> LoraGrads<B> {
    pub fn new(model: &Llama<B>) -> Result<Self> {
        let mut grads = Vec::with_capacity(model.layers.len());
        for l in &model.layers {
            let mut slot: BlockLoraGrads<B> = Default::default();
            for (i, lo) in l.lora.iter().enumerate() {
                if let Some(lo) = lo {
                    let (a, b) = (model.backend.len(&lo.a), model.backend.len(&lo.b));
                    slot[i] = Some((model.backend.alloc_f32(a)?, model.backend.alloc_f32(b)?));
                }
            }
            grads.push(slot);
        }
        Ok(Self {
            grads,
            latent: None,
        })
    }

    /// Also collect the gradients of a latent adversary's `D` and `b`.
    pub fn with_latent(mut self, be: &B, hidden: usize) -> Result<Self> {
        self.latent = Some((be.alloc_f32(hidden * hidden)?, be.alloc_f32(hidden)?));
        Ok(self)
    }

    pub fn zero(&mut self, be: &B) -> Result<()> {
        for slot in self.grads.iter_mut().flatten().flatten() {
            let (na, nb) = (be.len(&slot.0), be.len(&slot.1));
            *slot = (be.alloc_f32(na)?, be.alloc_f32(nb)?);
        }
        if let Some((gd, gb)) = self.latent.as_mut() {
            let (nd, nb) = (be.len(gd), be.len(gb));
            *gd = be.alloc_f32(nd)?;
            *gb = be.alloc_f32(nb)?;
        }
        Ok(())
    }

    pub fn get(&self, layer: usize, m: LoraModule) -> Option<&(B::Buf, B::Buf)> {
        self.grads[layer][m as usize].as_ref()
    }
}

impl<B: BackwardOps> Llama<B> {
    /// Backpropagates gradients with respect to captured hidden states (`d_hidden`, each
    /// `[rows, hidden]`) and, optionally, to all-position logits (`[rows, vocab]`). LoRA
    /// gradients are added into `grads`; returns the gradient with respect to the input
    /// embeddings (hidden-state index 0) when `want_input` is set.
    pub fn backward(
        &self,
        acts: &Activations<B>,
        d_hidden: &[(usize, &B::Buf)],
        d_logits: Option<&B::Buf>,
        key_mask: Option<&B::Buf>,
        mut grads: Option<&mut LoraGrads<B>>,
        want_input: bool,
    ) -> Result<Option<B::Buf>> {
        let cfg = &self.cfg;
        let be = &self.backend;
        let (batch, seq) = (acts.batch, acts.seq);
        let rows = batch * seq;
        let (d, qd, kvd, ff) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let nl = cfg.num_layers;
        let recorded = if acts.recompute {
            acts.checkpoints.len()
        } else {
            acts.layers.len()
        };
        ensure!(
            recorded == nl,
            "backward: activations of {} blocks, model has {nl}",
            recorded
        );
        for (i, g) in d_hidden {
            ensure!(*i <= nl, "backward: hidden-state index {i} > {nl}");
            ensure!(
                be.len(g) == rows * d,
                "backward: gradient of hidden state {i} has the wrong size"
            );
        }
        let grad_of = |idx: usize| {
            d_hidden
                .iter()
                .filter(move |(i, _)| *i == idx)
                .map(|(_, g)| *g)
        };

        // Index L and the logits both sit after the final norm.
        let mut dxn = be.alloc(rows * d)?;
        if let Some(dl) = d_logits {
            ensure!(
                be.len(dl) == rows * cfg.vocab_size,
                "backward: logits gradient must cover every position"
            );
            be.gemm(
                dl,
                self.lm_head(),
                &mut dxn,
                rows,
                d,
                cfg.vocab_size,
                false,
                false,
                1.0,
                false,
            );
        }
        for g in grad_of(nl) {
            be.axpy(1.0, g, &mut dxn);
        }
        let mut dh = be.alloc(rows * d)?;
        be.rmsnorm_bwd(
            &acts.h_last,
            &self.final_norm,
            &dxn,
            d,
            cfg.rms_eps,
            &mut dh,
            false,
        );

        let shape = AttnShape {
            batch,
            q_len: seq,
            start_pos: 0,
            capacity: seq,
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        };
        let mut d_act = be.alloc(rows * ff)?;
        let mut dgate = be.alloc(rows * ff)?;
        let mut dup = be.alloc(rows * ff)?;
        let mut dx = be.alloc(rows * d)?;
        let mut d_att = be.alloc(rows * qd)?;
        let mut dq = be.alloc(rows * qd)?;
        let mut dk = be.alloc(rows * kvd)?;
        let mut dv = be.alloc(rows * kvd)?;
        let mut ones = None;
        for li in (0..nl).rev() {
            if li + 1 < nl {
                for g in grad_of(li + 1) {
                    be.axpy(1.0, g, &mut dh);
                }
            }
            if let Some(lat) = acts.latent.as_ref().filter(|l| l.index == li + 1) {
                // x_post = x_pre + x_pre D^T + b: dD += dh^T x_pre, db += sum of dh's rows,
                // dx_pre = dh + dh D.
                if let Some((gd, gb)) = grads.as_deref_mut().and_then(|g| g.latent.as_mut()) {
                    be.gemm(&dh, &lat.x_pre, gd, d, d, rows, true, false, 1.0, true);
                    let ones = ones.get_or_insert(be.upload_f32(&vec![1.0; rows])?);
                    be.gemm(ones, &dh, gb, 1, d, rows, false, false, 1.0, true);
                }
                let mut t = be.alloc(rows * d)?;
                be.gemm(&dh, &lat.d, &mut t, rows, d, d, false, false, 1.0, false);
                be.axpy(1.0, &t, &mut dh);
            }
            let layer = &self.layers[li];
            let rebuilt;
            let a: &LayerActs<B> = if acts.recompute {
                rebuilt = self.recompute_block(
                    li,
                    &acts.checkpoints[li],
                    key_mask,
                    shape,
                    acts.used_lora,
                    acts.dropout,
                )?;
                &rebuilt
            } else {
                &acts.layers[li]
            };
            let h_in = a.h_in.as_ref().expect("recorded forward");
            let h_mid = a.h_mid.as_ref().expect("recorded forward");
            let mut g = grads.as_deref_mut();

            // MLP half: h_out = h_mid + down(silu(gate(xn2)) * up(xn2)).
            self.project_bwd(
                layer,
                li,
                LoraModule::Down,
                acts.used_lora,
                acts.dropout,
                &dh,
                &a.act,
                &mut d_act,
                false,
                &mut g,
            )?;
            be.swiglu_bwd(&a.gate, &a.up, &d_act, &mut dgate, &mut dup);
            self.project_bwd(
                layer,
                li,
                LoraModule::Gate,
                acts.used_lora,
                acts.dropout,
                &dgate,
                &a.xn2,
                &mut dx,
                false,
                &mut g,
            )?;
            self.project_bwd(
                layer,
                li,
                LoraModule::Up,
                acts.used_lora,
                acts.dropout,
                &dup,
                &a.xn2,
                &mut dx,
                true,
                &mut g,
            )?;
            be.rmsnorm_bwd(h_mid, &layer.mlp_norm, &dx, d, cfg.rms_eps, &mut dh, true);

            // Attention half: h_mid = h_in + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))).
            self.project_bwd(
                layer,
                li,
                LoraModule::O,
                acts.used_lora,
                acts.dropout,
                &dh,
                &a.att,
                &mut d_att,
                false,
                &mut g,
            )?;
            let (k_all, v_all) = (
                a.k_all.as_ref().expect("recorded"),
                a.v_all.as_ref().expect("recorded"),
            );
            be.attention_bwd(
                &a.q, k_all, v_all, key_mask, &a.att, &d_att, &mut dq, &mut dk, &mut dv, shape,
            );
            be.rope(
                &mut dq,
                batch,
                seq,
                cfg.num_heads,
                cfg.head_dim,
                0,
                &self.inv_freq_neg,
            );
            be.rope(
                &mut dk,
                batch,
                seq,
                cfg.num_kv_heads,
                cfg.head_dim,
                0,
                &self.inv_freq_neg,
            );
            self.project_bwd(
                layer,
                li,
                LoraModule::Q,
                acts.used_lora,
                acts.dropout,
                &dq,
                &a.xn1,
                &mut dx,
                false,
                &mut g,
            )?;
            self.project_bwd(
                layer,
                li,
                LoraModule::K,
                acts.used_lora,
                acts.dropout,
                &dk,
                &a.xn1,
                &mut dx,
                true,
                &mut g,
            )?;
            self.project_bwd(
                layer,
                li,
                LoraModule::V,
                acts.used_lora,
                acts.dropout,
                &dv,
                &a.xn1,
                &mut dx,
                true,
                &mut g,
            )?;
            be.rmsnorm_bwd(h_in, &layer.attn_norm, &dx, d, cfg.rms_eps, &mut dh, true);
        }
        for g in grad_of(0) {
            be.axpy(1.0, g, &mut dh);
        }
        Ok(want_input.then_some(dh))
    }

    /// Reruns block `li` from its recorded input to rebuild the activations its backward reads.
    fn recompute_block(
        &self,
        li: usize,
        h_in: &B::Buf,
        key_mask: Option<&B::Buf>,
        shape: AttnShape,
        use_lora: bool,
        dropout: Option<LoraDropout>,
    ) -> Result<LayerActs<B>> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let rows = shape.batch * shape.q_len;
        let d = cfg.hidden_size;
        let mut x = clone_f32(be, h_in, rows, d)?;
        let mut xn = be.alloc(rows * d)?;
        be.rmsnorm(&x, &self.layers[li].attn_norm, d, cfg.rms_eps, &mut xn);
        let mut a = LayerActs::new(be, rows, cfg)?;
        let (mut kc, mut vc) = (
            be.alloc(rows * cfg.kv_dim())?,
            be.alloc(rows * cfg.kv_dim())?,
        );
        let rank = self.layers[li]
            .lora
            .iter()
            .flatten()
            .map(|l| l.rank)
            .max()
            .unwrap_or(1);
        let mut scratch = super::forward::BlockScratch::new(be, rows, cfg, rank)?;
        self.block(
            li,
            &mut x,
            &mut xn,
            &mut a,
            &mut kc,
            &mut vc,
            key_mask,
            shape,
            use_lora,
            dropout,
            true,
            &mut scratch,
        )?;
        Ok(a)
    }

    /// Backward of `y = x W^T + s (x_d A^T) B^T` with `x_d = x * keep / (1 - p)` under the
    /// pass's dropout (else `x_d = x`): `dx (+)= dy W + drop(s (dy B) A)`,
    /// `dA += s (dy B)^T x_d`, `dB += s dy^T (x_d A^T)`; `drop` is the forward's mask and scale.
    #[allow(clippy::too_many_arguments)]
    fn project_bwd(
        &self,
        layer: &DeviceLayer<B>,
        li: usize,
        m: LoraModule,
        use_lora: bool,
        dropout: Option<LoraDropout>,
        dy: &B::Buf,
        x: &B::Buf,
        dx: &mut B::Buf,
        accumulate: bool,
        grads: &mut Option<&mut LoraGrads<B>>,
    ) -> Result<()> {
        let be = &self.backend;
        let (fan_in, fan_out) = m.dims(&self.cfg);
        let rows = be.len(x) / fan_in;
        be.gemm(
            dy,
            layer.weight(m),
            dx,
            rows,
            fan_in,
            fan_out,
            false,
            false,
            1.0,
            accumulate,
        );
        let Some(l) = layer.lora[m as usize].as_ref().filter(|_| use_lora) else {
            return Ok(());
        };
        let dropout = dropout.map(|d| d.module(li, m));
        let r = l.rank;
        let mut t = be.alloc(rows * r)?;
        be.gemm(dy, &l.b, &mut t, rows, r, fan_out, false, false, 1.0, false);
        if let Some(g) = grads.as_deref_mut() {
            if let Some((ga, gb)) = g.grads[li][m as usize].as_mut() {
                let dropped = dropout.map(|d| dropout_input(be, x, d)).transpose()?;
                let x = dropped.as_ref().unwrap_or(x);
                be.gemm(&t, x, ga, r, fan_in, rows, true, false, l.scale, true);
                let mut u = be.alloc(rows * r)?;
                be.matmul(x, &l.a, &mut u, rows, r, fan_in, 1.0, false);
                be.gemm(dy, &u, gb, fan_out, r, rows, true, false, l.scale, true);
            }
        }
        match dropout {
            None => be.gemm(&t, &l.a, dx, rows, fan_in, r, false, false, l.scale, true),
            Some(d) => {
                // In f32 until it joins dx: one rounding, as in the undropped path.
                let mut g = be.alloc_f32(rows * fan_in)?;
                be.gemm(
                    &t, &l.a, &mut g, rows, fan_in, r, false, false, l.scale, false,
                );
                let mut gd = be.alloc_f32(rows * fan_in)?;
                be.dropout(&g, &mut gd, d.p, d.seed);
                be.axpy(1.0, &gd, dx);
            }
        }
        Ok(())
    }
}
