//! Circuit Breakers / representation rerouting (Zou et al. 2024).
//!
//! `c_retain * retain + c_cb * cb` with `progress = step / (2 * max_steps)` counted in optimiser
//! steps, `c_retain = A * progress`, `c_cb = A * (1 - progress)`.
//! `retain` = mean of `||(h' - h) * m||` over all indices and ALL (batch, token) positions
//! (padding included as zeros, the authors' convention) or, optionally, over masked tokens only;
//! `cb` = `sum relu(cos_sim(h', h)) * m / (n_targets * sum m)` over the target indices.

use super::distance::{cos_sim, cos_sim_grad, Distance};
use super::triplet::DeviceReps;
use super::Reps;
use crate::backend::BackwardOps;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CircuitBreakerConfig {
    /// A (10; Mistral 5).
    pub alpha: f64,
    /// Average the retain norm over masked tokens only instead of every padded position.
    pub retain_masked_mean: bool,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            alpha: 10.0,
            retain_masked_mean: false,
        }
    }
}

/// `(c_retain, c_cb)` at optimiser step `step` of `max_steps`.
pub fn coefficients(alpha: f64, step: usize, max_steps: usize) -> (f64, f64) {
    let progress = step as f64 / (2.0 * max_steps.max(1) as f64);
    (alpha * progress, alpha * (1.0 - progress))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CircuitBreakerTerms {
    pub retain: f64,
    pub cb: f64,
    pub c_retain: f64,
    pub c_cb: f64,
    pub total: f64,
}

pub struct CircuitBreakerGrads {
    pub retain: Vec<f64>,
    pub cb: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
pub fn circuit_breaker_loss(
    cfg: &CircuitBreakerConfig,
    step: usize,
    max_steps: usize,
    retain_tuned: Reps,
    retain_orig: Reps,
    retain_mask: &[f64],
    cb_tuned: Reps,
    cb_orig: Reps,
    cb_mask: &[f64],
    targets: &[usize],
    want_grad: bool,
) -> (CircuitBreakerTerms, Option<CircuitBreakerGrads>) {
    let (c_retain, c_cb) = coefficients(cfg.alpha, step, max_steps);
    let mut gr = want_grad.then(|| vec![0.0; retain_tuned.data.len()]);
    let mut gc = want_grad.then(|| vec![0.0; cb_tuned.data.len()]);

    let positions = (retain_tuned.batch * retain_tuned.seq) as f64;
    let count = if cfg.retain_masked_mean {
        retain_mask.iter().sum::<f64>()
    } else {
        positions
    };
    let denom_r = retain_tuned.indices.len() as f64 * count;
    let mut retain = 0.0;
    for &l in retain_tuned.indices {
        for b in 0..retain_tuned.batch {
            for t in 0..retain_tuned.seq {
                let m = retain_mask[b * retain_tuned.seq + t];
                if m == 0.0 {
                    continue; // ||0 - 0|| = 0 still counts in the denominator
                }
                let x: Vec<f64> = retain_tuned.row(l, b, t).iter().map(|v| v * m).collect();
                let y: Vec<f64> = retain_orig.row(l, b, t).iter().map(|v| v * m).collect();
                retain += Distance::L2.value(&x, &y) / denom_r;
                if let Some(g) = gr.as_mut() {
                    let off = retain_tuned.row_offset(l, b, t);
                    let mut gx = vec![0.0; x.len()];
                    Distance::L2.grad(&x, &y, c_retain / denom_r, Some(&mut gx), None);
                    g[off..off + x.len()]
                        .iter_mut()
                        .zip(gx)
                        .for_each(|(a, v)| *a += v * m);
                }
            }
        }
    }

    let n_cb: f64 = cb_mask.iter().sum();
    assert!(n_cb > 0.0, "circuit breaker set has no masked tokens");
    let denom_c = targets.len() as f64 * n_cb;
    let mut cb = 0.0;
    for &l in targets {
        for b in 0..cb_tuned.batch {
            for t in 0..cb_tuned.seq {
                let m = cb_mask[b * cb_tuned.seq + t];
                if m == 0.0 {
                    continue;
                }
                let (x, y) = (cb_tuned.row(l, b, t), cb_orig.row(l, b, t));
                let c = cos_sim(x, y);
                if c <= 0.0 {
                    continue;
                }
                cb += c * m / denom_c;
                if let Some(g) = gc.as_mut() {
                    let off = cb_tuned.row_offset(l, b, t);
                    cos_sim_grad(
                        x,
                        y,
                        c_cb * m / denom_c,
                        Some(&mut g[off..off + x.len()]),
                        None,
                    );
                }
            }
        }
    }
    let terms = CircuitBreakerTerms {
        retain,
        cb,
        c_retain,
        c_cb,
        total: c_retain * retain + c_cb * cb,
    };
    (
        terms,
        want_grad.then(|| CircuitBreakerGrads {
            retain: gr.unwrap(),
            cb: gc.unwrap(),
        }),
    )
}

/// [`circuit_breaker_loss`] on representations that stay on the model's device (see
/// [`super::triplet::triplet_loss_on`]): per-row statistics and row combinations there, the
/// weights on the host. Returns the per-index gradients (`[rows, dim]` f32) of the retain set
/// (`retain_indices`) and of the circuit-breaker set (`targets`).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn circuit_breaker_loss_on<B: BackwardOps>(
    be: &B,
    cfg: &CircuitBreakerConfig,
    step: usize,
    max_steps: usize,
    dim: usize,
    retain_indices: &[usize],
    retain_tuned: &DeviceReps<B>,
    retain_orig: &DeviceReps<B>,
    retain_mask: &[f64],
    cb_tuned: &DeviceReps<B>,
    cb_orig: &DeviceReps<B>,
    cb_mask: &[f64],
    targets: &[usize],
    want_grad: bool,
) -> anyhow::Result<(
    CircuitBreakerTerms,
    Option<(Vec<(usize, B::Buf)>, Vec<(usize, B::Buf)>)>,
)> {
    let (c_retain, c_cb) = coefficients(cfg.alpha, step, max_steps);
    let rr = retain_tuned.rows;
    let count = if cfg.retain_masked_mean {
        retain_mask.iter().sum::<f64>()
    } else {
        rr as f64
    };
    let denom_r = retain_indices.len() as f64 * count;
    let rm32: Vec<f32> = retain_mask.iter().map(|&m| m as f32).collect();
    let mut retain = 0.0;
    let mut gr = Vec::new();
    for &l in retain_indices {
        let (x, y) = (retain_tuned.get(l), retain_orig.get(l));
        let st = be.row_stats(x, y, false, Some(&rm32), dim)?;
        let (mut cx, mut cy) = (vec![0f32; rr], vec![0f32; rr]);
        for r in 0..rr {
            let m = retain_mask[r];
            if m == 0.0 {
                continue; // ||0 - 0|| = 0 still counts in the denominator
            }
            let k = Distance::L2.from_stats(st[r]);
            retain += k.value / denom_r;
            // d/dx = m * (c_retain / denom) * (m x - m y) / e
            let w = c_retain / denom_r * m * m;
            cx[r] = (w * k.da.0) as f32;
            cy[r] = (w * k.da.1) as f32;
        }
        if want_grad {
            let mut g = be.alloc_f32(rr * dim)?;
            be.row_combine(&mut g, false, Some((x, &cx)), Some((y, &cy)), None, dim);
            gr.push((l, g));
        }
    }
    let rc = cb_tuned.rows;
    let n_cb: f64 = cb_mask.iter().sum();
    assert!(n_cb > 0.0, "circuit breaker set has no masked tokens");
    let denom_c = targets.len() as f64 * n_cb;
    let mut cb = 0.0;
    let mut gc = Vec::new();
    for &l in targets {
        let (x, y) = (cb_tuned.get(l), cb_orig.get(l));
        // cos of the raw rows, as the reference (a positive mask does not change it).
        let st = be.row_stats(x, y, false, None, dim)?;
        let (mut cx, mut cy) = (vec![0f32; rc], vec![0f32; rc]);
        for r in 0..rc {
            let m = cb_mask[r];
            if m == 0.0 {
                continue;
            }
            let k = Distance::Cos.from_stats(st[r]);
            let c = 1.0 - k.value;
            if c <= 0.0 {
                continue;
            }
            cb += c * m / denom_c;
            // d cos / dx = -d (1 - cos) / dx
            let w = c_cb * m / denom_c;
            cx[r] = (-w * k.da.0) as f32;
            cy[r] = (-w * k.da.1) as f32;
        }
        if want_grad {
            let mut g = be.alloc_f32(rc * dim)?;
            be.row_combine(&mut g, false, Some((x, &cx)), Some((y, &cy)), None, dim);
            gc.push((l, g));
        }
    }
    let terms = CircuitBreakerTerms {
        retain,
        cb,
        c_retain,
        c_cb,
        total: c_retain * retain + c_cb * cb,
    };
    Ok((terms, want_grad.then_some((gr, gc))))
}
