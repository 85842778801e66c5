//! CRL triplet objective (Simko et al. 2025; defaults of the authors' code).
//!
//! `mu^l` = mean of the tuned harmful representations over H's masked tokens (gradient flows
//! through it). Benign term over every captured index of B:
//! `relu(d_bp(h'_B, h_B) - d_bn(h'_B, mu) + m_b)`; harmful term over the target indices of H:
//! `relu(d_hp(h'_H, mu) - d_hn(h'_H, h_H) + m_h)`; each a mean over (index, masked token).
//! Representations are multiplied by their token mask first.

use super::{Distance, Reps};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TripletConfig {
    pub benign_pos: Distance,
    pub benign_neg: Distance,
    pub harmful_pos: Distance,
    pub harmful_neg: Distance,
    pub margin_benign: f64,
    pub margin_harmful: f64,
    pub w_benign: f64,
    pub w_harmful: f64,
    pub w_kl: f64,
    pub temperature: f64,
}

impl Default for TripletConfig {
    fn default() -> Self {
        Self {
            benign_pos: Distance::L2,
            benign_neg: Distance::Cos,
            harmful_pos: Distance::Cos,
            harmful_neg: Distance::Cos,
            margin_benign: 2.0,
            margin_harmful: 3.0,
            w_benign: 0.5,
            w_harmful: 0.6,
            w_kl: 0.7,
            temperature: 2.0,
        }
    }
}

/// Unweighted terms; `total` = the weighted sum of the representation terms (KL is added by
/// the caller from [`super::kl::kl_retain`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TripletTerms {
    pub benign: f64,
    pub harmful: f64,
    pub total: f64,
}

pub struct TripletGrads {
    /// d total / d h'_B, same layout as the benign tuned reps.
    pub benign: Vec<f64>,
    /// d total / d h'_H, same layout as the harmful tuned reps.
    pub harmful: Vec<f64>,
}

fn masked(v: &[f64], m: f64) -> Vec<f64> {
    v.iter().map(|x| x * m).collect()
}

/// Triplet representation terms. `benign_*` hold every index the benign term runs over;
/// `harm_tuned` holds at least those indices too (for `mu`) and `harm_orig` the `targets`.
#[allow(clippy::too_many_arguments)]
pub fn triplet_loss(
    cfg: &TripletConfig,
    benign_tuned: Reps,
    benign_orig: Reps,
    benign_mask: &[f64],
    harm_tuned: Reps,
    harm_orig: Reps,
    harm_mask: &[f64],
    targets: &[usize],
    want_grad: bool,
) -> (TripletTerms, Option<TripletGrads>) {
    let dim = benign_tuned.dim;
    assert_eq!(
        benign_mask.len(),
        benign_tuned.batch * benign_tuned.seq,
        "benign mask size"
    );
    assert_eq!(
        harm_mask.len(),
        harm_tuned.batch * harm_tuned.seq,
        "harmful mask size"
    );
    let nb: f64 = benign_mask.iter().sum();
    let nh: f64 = harm_mask.iter().sum();
    assert!(nb > 0.0 && nh > 0.0, "triplet: a set has no masked tokens");

    // mu^l for every index either term needs.
    let mut needed: Vec<usize> = benign_tuned.indices.to_vec();
    needed.extend_from_slice(targets);
    needed.sort_unstable();
    needed.dedup();
    let mu_of = |l: usize| -> Vec<f64> {
        let mut mu = vec![0.0; dim];
        for b in 0..harm_tuned.batch {
            for t in 0..harm_tuned.seq {
                let m = harm_mask[b * harm_tuned.seq + t];
                if m != 0.0 {
                    for (acc, x) in mu.iter_mut().zip(harm_tuned.row(l, b, t)) {
                        *acc += m * x * m;
                    }
                }
            }
        }
        mu.iter_mut().for_each(|x| *x /= nh);
        mu
    };
    let mus: Vec<(usize, Vec<f64>)> = needed.iter().map(|&l| (l, mu_of(l))).collect();
    let mu = |l: usize| &mus.iter().find(|m| m.0 == l).unwrap().1;
    let mut g_mu: Vec<(usize, Vec<f64>)> = needed.iter().map(|&l| (l, vec![0.0; dim])).collect();

    let mut gb = want_grad.then(|| vec![0.0; benign_tuned.data.len()]);
    let mut gh = want_grad.then(|| vec![0.0; harm_tuned.data.len()]);

    // Benign term.
    let denom_b = benign_tuned.indices.len() as f64 * nb;
    let mut benign = 0.0;
    for &l in benign_tuned.indices {
        let mu_l = mu(l);
        let gmu = &mut g_mu.iter_mut().find(|m| m.0 == l).unwrap().1;
        for b in 0..benign_tuned.batch {
            for t in 0..benign_tuned.seq {
                let m = benign_mask[b * benign_tuned.seq + t];
                if m == 0.0 {
                    continue;
                }
                let x = masked(benign_tuned.row(l, b, t), m);
                let y = masked(benign_orig.row(l, b, t), m);
                let h = cfg.benign_pos.value(&x, &y) - cfg.benign_neg.value(&x, mu_l)
                    + cfg.margin_benign;
                if h <= 0.0 {
                    continue;
                }
                benign += h * m / denom_b;
                if let Some(gb) = gb.as_mut() {
                    let w = cfg.w_benign * m / denom_b;
                    let mut gx = vec![0.0; dim];
                    cfg.benign_pos.grad(&x, &y, w, Some(&mut gx), None);
                    cfg.benign_neg.grad(&x, mu_l, -w, Some(&mut gx), Some(gmu));
                    let off = benign_tuned.row_offset(l, b, t);
                    for (g, v) in gb[off..off + dim].iter_mut().zip(&gx) {
                        *g += v * m;
                    }
                }
            }
        }
    }

    // Harmful term.
    let denom_h = targets.len() as f64 * nh;
    let mut harmful = 0.0;
    for &l in targets {
        let mu_l = mu(l);
        let gmu = &mut g_mu.iter_mut().find(|m| m.0 == l).unwrap().1;
        for b in 0..harm_tuned.batch {
            for t in 0..harm_tuned.seq {
                let m = harm_mask[b * harm_tuned.seq + t];
                if m == 0.0 {
                    continue;
                }
                let x = masked(harm_tuned.row(l, b, t), m);
                let y = masked(harm_orig.row(l, b, t), m);
                let h = cfg.harmful_pos.value(&x, mu_l) - cfg.harmful_neg.value(&x, &y)
                    + cfg.margin_harmful;
                if h <= 0.0 {
                    continue;
                }
                harmful += h * m / denom_h;
                if let Some(gh) = gh.as_mut() {
                    let w = cfg.w_harmful * m / denom_h;
                    let mut gx = vec![0.0; dim];
                    cfg.harmful_pos.grad(&x, mu_l, w, Some(&mut gx), Some(gmu));
                    cfg.harmful_neg.grad(&x, &y, -w, Some(&mut gx), None);
                    let off = harm_tuned.row_offset(l, b, t);
                    for (g, v) in gh[off..off + dim].iter_mut().zip(&gx) {
                        *g += v * m;
                    }
                }
            }
        }
    }

    // Back through mu^l = sum_t m_t * (m_t h'_t) / nh.
    if let Some(gh) = gh.as_mut() {
        for (l, gmu) in &g_mu {
            for b in 0..harm_tuned.batch {
                for t in 0..harm_tuned.seq {
                    let m = harm_mask[b * harm_tuned.seq + t];
                    if m == 0.0 {
                        continue;
                    }
                    let off = harm_tuned.row_offset(*l, b, t);
                    for (g, v) in gh[off..off + dim].iter_mut().zip(gmu) {
                        *g += v * m * m / nh;
                    }
                }
            }
        }
    }

    let terms = TripletTerms {
        benign,
        harmful,
        total: cfg.w_benign * benign + cfg.w_harmful * harmful,
    };
    let grads = want_grad.then(|| TripletGrads {
        benign: gb.unwrap(),
        harmful: gh.unwrap(),
    });
    (terms, grads)
}
