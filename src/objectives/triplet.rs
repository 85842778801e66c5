//! CRL triplet objective (Simko et al. 2025; defaults of the authors' code).
//!
//! `mu^l` = mean of the tuned harmful representations over H's masked tokens (gradient flows
//! through it). Benign term over every captured index of B:
//! `relu(d_bp(h'_B, h_B) - d_bn(h'_B, mu) + m_b)`; harmful term over the target indices of H:
//! `relu(d_hp(h'_H, mu) - d_hn(h'_H, h_H) + m_h)`; each a mean over (index, masked token).
//! Representations are multiplied by their token mask first.

use super::{Distance, Reps};
use crate::backend::BackwardOps;
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

/// One set's representations where the model left them: `(hidden-state index, [rows, dim])`.
pub struct DeviceReps<'a, B: BackwardOps> {
    pub bufs: Vec<(usize, &'a B::Buf)>,
    pub rows: usize,
}

impl<B: BackwardOps> DeviceReps<'_, B> {
    pub fn get(&self, l: usize) -> &B::Buf {
        self.bufs
            .iter()
            .find(|b| b.0 == l)
            .unwrap_or_else(|| panic!("hidden-state index {l} was not captured"))
            .1
    }
}

/// Per-index gradients of [`triplet_loss_on`], `[rows, dim]` f32 on the device.
pub struct DeviceTripletGrads<B: BackwardOps> {
    pub benign: Vec<(usize, B::Buf)>,
    pub harmful: Vec<(usize, B::Buf)>,
}

/// [`triplet_loss`] on representations that stay on the model's device: the O(rows x dim)
/// work (the harmful means, the pair statistics, the gradients) runs as device ops
/// (`gemm`, `row_stats`, `row_combine`, `axpy`), the hinges and weights on the host in f64
/// over O(rows) numbers. `benign_*` hold `benign_indices`; `harm_tuned` holds those and the
/// `targets`, `harm_orig` the targets.
#[allow(clippy::too_many_arguments)]
pub fn triplet_loss_on<B: BackwardOps>(
    be: &B,
    cfg: &TripletConfig,
    dim: usize,
    benign_indices: &[usize],
    benign_tuned: &DeviceReps<B>,
    benign_orig: &DeviceReps<B>,
    benign_mask: &[f64],
    harm_tuned: &DeviceReps<B>,
    harm_orig: &DeviceReps<B>,
    harm_mask: &[f64],
    targets: &[usize],
    want_grad: bool,
) -> anyhow::Result<(TripletTerms, Option<DeviceTripletGrads<B>>)> {
    let (rb, rh) = (benign_tuned.rows, harm_tuned.rows);
    assert_eq!(benign_mask.len(), rb, "benign mask size");
    assert_eq!(harm_mask.len(), rh, "harmful mask size");
    let nb: f64 = benign_mask.iter().sum();
    let nh: f64 = harm_mask.iter().sum();
    assert!(nb > 0.0 && nh > 0.0, "triplet: a set has no masked tokens");
    let bm32: Vec<f32> = benign_mask.iter().map(|&m| m as f32).collect();
    let hm32: Vec<f32> = harm_mask.iter().map(|&m| m as f32).collect();

    // mu^l = sum_t m_t (m_t h'_t) / nh, as a [1, rows] x [rows, dim] product.
    let mut needed: Vec<usize> = benign_indices.to_vec();
    needed.extend_from_slice(targets);
    needed.sort_unstable();
    needed.dedup();
    let w_mu: Vec<f32> = harm_mask.iter().map(|&m| (m * m / nh) as f32).collect();
    let w_mu_buf = be.upload_f32(&w_mu)?;
    let mut mus = Vec::with_capacity(needed.len());
    for &l in &needed {
        let mut mu = be.alloc_f32(dim)?;
        be.gemm(
            &w_mu_buf,
            harm_tuned.get(l),
            &mut mu,
            1,
            dim,
            rh,
            false,
            false,
            1.0,
            false,
        );
        mus.push((l, mu));
    }
    let mu = |l: usize| &mus.iter().find(|m| m.0 == l).unwrap().1;
    // d total / d mu^l: sum_r c_r h'_r (coefficients per harmful row) + s mu^l.
    let mut gmu_rows: Vec<(usize, Vec<f32>, f64)> =
        needed.iter().map(|&l| (l, vec![0f32; rh], 0.0)).collect();
    // The same gradient on the device, summed there: the benign rows' part as the benign term
    // finds it, the harmful rows' part and s mu^l at the end.
    let mut gmu_dev: Vec<(usize, B::Buf)> = Vec::new();
    let mut gh: Vec<(usize, B::Buf)> = Vec::new();
    if want_grad {
        for &l in &needed {
            gmu_dev.push((l, be.alloc_f32(dim)?));
            gh.push((l, be.alloc_f32(rh * dim)?));
        }
    }
    let mut gb: Vec<(usize, B::Buf)> = Vec::new();

    // Benign term: relu(d_bp(x, y) - d_bn(x, mu) + m_b), x = m h'_B, y = m h_B.
    let denom_b = benign_indices.len() as f64 * nb;
    let mut benign = 0.0;
    for &l in benign_indices {
        let (x, y) = (benign_tuned.get(l), benign_orig.get(l));
        let sp = be.row_stats(x, y, false, Some(&bm32), dim)?;
        let sn = be.row_stats(x, mu(l), true, Some(&bm32), dim)?;
        let (mut cx, mut cy, mut cv) = (vec![0f32; rb], vec![0f32; rb], vec![0f32; rb]);
        let gmu = gmu_rows.iter_mut().find(|g| g.0 == l).unwrap();
        let mut gmu_x = vec![0f32; rb];
        for r in 0..rb {
            let m = benign_mask[r];
            if m == 0.0 {
                continue;
            }
            let (p, n) = (
                cfg.benign_pos.from_stats(sp[r]),
                cfg.benign_neg.from_stats(sn[r]),
            );
            let h = p.value - n.value + cfg.margin_benign;
            if h <= 0.0 {
                continue;
            }
            benign += h * m / denom_b;
            let w = cfg.w_benign * m / denom_b;
            // d/dh'_r = m (w dp/dx - w dn/dx), with x = m h', y = m h.
            cx[r] = (w * m * m * (p.da.0 - n.da.0)) as f32;
            cy[r] = (w * m * m * p.da.1) as f32;
            cv[r] = (-w * m * n.da.1) as f32;
            // d/dmu = -w dn/db = -w (n.db.0 m h' + n.db.1 mu).
            gmu_x[r] = (-w * m * n.db.0) as f32;
            gmu.2 += -w * n.db.1;
        }
        if want_grad {
            let mut g = be.alloc_f32(rb * dim)?;
            be.row_combine(
                &mut g,
                false,
                Some((x, &cx)),
                Some((y, &cy)),
                Some((mu(l), &cv)),
                dim,
            );
            gb.push((l, g));
            // The benign rows' pull on mu^l.
            let coef = be.upload_f32(&gmu_x)?;
            let gm = &mut gmu_dev.iter_mut().find(|g| g.0 == l).unwrap().1;
            be.gemm(&coef, x, gm, 1, dim, rb, false, false, 1.0, true);
        }
    }

    // Harmful term: relu(d_hp(x, mu) - d_hn(x, y) + m_h), x = m h'_H, y = m h_H.
    let denom_h = targets.len() as f64 * nh;
    let mut harmful = 0.0;
    for &l in targets {
        let (x, y) = (harm_tuned.get(l), harm_orig.get(l));
        let sp = be.row_stats(x, mu(l), true, Some(&hm32), dim)?;
        let sn = be.row_stats(x, y, false, Some(&hm32), dim)?;
        let (mut cx, mut cy, mut cv) = (vec![0f32; rh], vec![0f32; rh], vec![0f32; rh]);
        let gmu = gmu_rows.iter_mut().find(|g| g.0 == l).unwrap();
        for r in 0..rh {
            let m = harm_mask[r];
            if m == 0.0 {
                continue;
            }
            let (p, n) = (
                cfg.harmful_pos.from_stats(sp[r]),
                cfg.harmful_neg.from_stats(sn[r]),
            );
            let h = p.value - n.value + cfg.margin_harmful;
            if h <= 0.0 {
                continue;
            }
            harmful += h * m / denom_h;
            let w = cfg.w_harmful * m / denom_h;
            cx[r] = (w * m * m * (p.da.0 - n.da.0)) as f32;
            cv[r] = (w * m * p.da.1) as f32;
            cy[r] = (-w * m * m * n.da.1) as f32;
            // d/dmu = w dp/db = w (p.db.0 m h' + p.db.1 mu).
            gmu.1[r] += (w * m * p.db.0) as f32;
            gmu.2 += w * p.db.1;
        }
        if want_grad {
            let g = &mut gh.iter_mut().find(|g| g.0 == l).unwrap().1;
            be.row_combine(
                g,
                true,
                Some((x, &cx)),
                Some((y, &cy)),
                Some((mu(l), &cv)),
                dim,
            );
        }
    }

    // Back through mu^l: its gradient is sum_r c_r h'_r + s mu^l; every harmful row gets
    // (m_r^2 / nh) of it.
    if want_grad {
        for ((l, c, s), (_, gm)) in gmu_rows.iter().zip(&mut gmu_dev) {
            let coef = be.upload_f32(c)?;
            be.gemm(
                &coef,
                harm_tuned.get(*l),
                gm,
                1,
                dim,
                rh,
                false,
                false,
                1.0,
                true,
            );
            be.axpy(*s as f32, mu(*l), gm);
            let g = &mut gh.iter_mut().find(|g| g.0 == *l).unwrap().1;
            be.row_combine(g, true, None, None, Some((gm, &w_mu)), dim);
        }
    }
    let terms = TripletTerms {
        benign,
        harmful,
        total: cfg.w_benign * benign + cfg.w_harmful * harmful,
    };
    Ok((
        terms,
        want_grad.then_some(DeviceTripletGrads {
            benign: gb,
            harmful: gh,
        }),
    ))
}
