//! RepBend (Yousefpour et al. 2025): four-term representation bending.
//!
//! `a * mean_S ||h'-h|| (all indices) - b * mean_U ||h'-h|| (target indices)
//!  + g * mean_{l in target} mean_{i != j} (1 - cos_sim(h'_i, h'_j))` over U's last prompt token
//! `+ e * KL` (the KL term is added by the caller). Means are over (index, masked token).

use super::distance::{cos_sim, cos_sim_grad, Distance};
use super::Reps;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepBendConfig {
    pub alpha: f64,
    pub beta: f64,
    pub gamma: f64,
    pub epsilon: f64,
    pub temperature: f64,
}

impl Default for RepBendConfig {
    fn default() -> Self {
        Self {
            alpha: 0.5,
            beta: 0.5,
            gamma: 0.1,
            epsilon: 0.3,
            temperature: 2.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RepBendTerms {
    pub safe_dist: f64,
    pub unsafe_dist: f64,
    pub unsafe_cos: f64,
    /// `a*safe - b*unsafe + g*cos` (KL added by the caller).
    pub total: f64,
}

pub struct RepBendGrads {
    pub safe: Vec<f64>,
    pub unsafe_: Vec<f64>,
}

/// Mean over (index, masked token) of `||(h' - h) * m||`; adds `w * grad` into `g`.
pub fn masked_l2_mean(
    tuned: Reps,
    orig: Reps,
    mask: &[f64],
    indices: &[usize],
    w: f64,
    mut g: Option<&mut [f64]>,
) -> f64 {
    let n: f64 = mask.iter().sum();
    assert!(n > 0.0, "masked mean over an empty mask");
    let denom = indices.len() as f64 * n;
    let mut total = 0.0;
    for &l in indices {
        for b in 0..tuned.batch {
            for t in 0..tuned.seq {
                let m = mask[b * tuned.seq + t];
                if m == 0.0 {
                    continue;
                }
                let x: Vec<f64> = tuned.row(l, b, t).iter().map(|v| v * m).collect();
                let y: Vec<f64> = orig.row(l, b, t).iter().map(|v| v * m).collect();
                total += m * Distance::L2.value(&x, &y) / denom;
                if let Some(g) = g.as_deref_mut() {
                    let off = tuned.row_offset(l, b, t);
                    let mut gx = vec![0.0; x.len()];
                    Distance::L2.grad(&x, &y, w * m / denom, Some(&mut gx), None);
                    for (gi, v) in g[off..off + x.len()].iter_mut().zip(gx) {
                        *gi += v * m;
                    }
                }
            }
        }
    }
    total
}

#[allow(clippy::too_many_arguments)]
pub fn repbend_loss(
    cfg: &RepBendConfig,
    safe_tuned: Reps,
    safe_orig: Reps,
    safe_mask: &[f64],
    unsafe_tuned: Reps,
    unsafe_orig: Reps,
    unsafe_mask: &[f64],
    unsafe_last_prompt: &[usize],
    targets: &[usize],
    want_grad: bool,
) -> (RepBendTerms, Option<RepBendGrads>) {
    let mut gs = want_grad.then(|| vec![0.0; safe_tuned.data.len()]);
    let mut gu = want_grad.then(|| vec![0.0; unsafe_tuned.data.len()]);
    let safe_dist = masked_l2_mean(
        safe_tuned,
        safe_orig,
        safe_mask,
        safe_tuned.indices,
        cfg.alpha,
        gs.as_deref_mut(),
    );
    let unsafe_dist = masked_l2_mean(
        unsafe_tuned,
        unsafe_orig,
        unsafe_mask,
        targets,
        -cfg.beta,
        gu.as_deref_mut(),
    );

    let nb = unsafe_tuned.batch;
    assert_eq!(
        unsafe_last_prompt.len(),
        nb,
        "one last-prompt index per unsafe sequence"
    );
    let pairs = (nb * nb.saturating_sub(1)) as f64;
    let mut unsafe_cos = 0.0;
    if pairs > 0.0 {
        let w = 1.0 / (targets.len() as f64 * pairs);
        for &l in targets {
            for i in 0..nb {
                for j in 0..nb {
                    if i == j {
                        continue;
                    }
                    let (vi, vj) = (
                        unsafe_tuned.row(l, i, unsafe_last_prompt[i]),
                        unsafe_tuned.row(l, j, unsafe_last_prompt[j]),
                    );
                    unsafe_cos += w * (1.0 - cos_sim(vi, vj));
                    if let Some(g) = gu.as_mut() {
                        let d = unsafe_tuned.dim;
                        let (oi, oj) = (
                            unsafe_tuned.row_offset(l, i, unsafe_last_prompt[i]),
                            unsafe_tuned.row_offset(l, j, unsafe_last_prompt[j]),
                        );
                        let mut gi = vec![0.0; d];
                        let mut gj = vec![0.0; d];
                        cos_sim_grad(vi, vj, -cfg.gamma * w, Some(&mut gi), Some(&mut gj));
                        g[oi..oi + d].iter_mut().zip(&gi).for_each(|(a, b)| *a += b);
                        g[oj..oj + d].iter_mut().zip(&gj).for_each(|(a, b)| *a += b);
                    }
                }
            }
        }
    }
    let total = cfg.alpha * safe_dist - cfg.beta * unsafe_dist + cfg.gamma * unsafe_cos;
    let terms = RepBendTerms {
        safe_dist,
        unsafe_dist,
        unsafe_cos,
        total,
    };
    (
        terms,
        want_grad.then(|| RepBendGrads {
            safe: gs.unwrap(),
            unsafe_: gu.unwrap(),
        }),
    )
}
