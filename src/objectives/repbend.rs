//! RepBend (Yousefpour et al. 2025): four-term representation bending.
//!
//! `a * mean_S ||h'-h|| (all indices) - b * mean_U ||h'-h|| (target indices)
//!  + g * mean_{l in target} mean_{i != j} (1 - cos_sim(h'_i, h'_j))` over U's last prompt token
//! `+ e * KL` (the KL term is added by the caller). Means are over (index, masked token).

use super::distance::{cos_sim, cos_sim_grad, Distance};
use super::triplet::DeviceReps;
use super::Reps;
use crate::backend::BackwardOps;
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

/// [`masked_l2_mean`] on device representations; writes `w * grad` per index into `grads`.
#[allow(clippy::too_many_arguments)]
fn masked_l2_mean_on<B: BackwardOps>(
    be: &B,
    tuned: &DeviceReps<B>,
    orig: &DeviceReps<B>,
    mask: &[f64],
    indices: &[usize],
    dim: usize,
    w: f64,
    grads: Option<&mut Vec<(usize, B::Buf)>>,
) -> anyhow::Result<f64> {
    let n: f64 = mask.iter().sum();
    assert!(n > 0.0, "masked mean over an empty mask");
    let denom = indices.len() as f64 * n;
    let rows = tuned.rows;
    let m32: Vec<f32> = mask.iter().map(|&m| m as f32).collect();
    let mut total = 0.0;
    let mut out = Vec::new();
    for &l in indices {
        let (x, y) = (tuned.get(l), orig.get(l));
        let st = be.row_stats(x, y, false, Some(&m32), dim)?;
        let (mut cx, mut cy) = (vec![0f32; rows], vec![0f32; rows]);
        for r in 0..rows {
            let m = mask[r];
            if m == 0.0 {
                continue;
            }
            let k = Distance::L2.from_stats(st[r]);
            total += m * k.value / denom;
            // d/dx = m * (w m / denom) * (m x - m y) / e
            let c = w * m * m * m / denom;
            cx[r] = (c * k.da.0) as f32;
            cy[r] = (c * k.da.1) as f32;
        }
        if grads.is_some() {
            let mut g = be.alloc_f32(rows * dim)?;
            be.row_combine(&mut g, false, Some((x, &cx)), Some((y, &cy)), None, dim);
            out.push((l, g));
        }
    }
    if let Some(g) = grads {
        *g = out;
    }
    Ok(total)
}

/// [`repbend_loss`] on representations that stay on the model's device (see
/// [`super::triplet::triplet_loss_on`]). The pairwise cosines among the unsafe sequences' last
/// prompt rows touch `batch` rows per target index: those rows are gathered and brought to the
/// host, and their gradient goes back through a `[rows, batch] x [batch, dim]` product with a
/// 0/1 selection matrix. Returns per-index gradients of the safe set (`safe_indices`) and of
/// the unsafe set (`targets`).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn repbend_loss_on<B: BackwardOps>(
    be: &B,
    cfg: &RepBendConfig,
    dim: usize,
    safe_indices: &[usize],
    safe_tuned: &DeviceReps<B>,
    safe_orig: &DeviceReps<B>,
    safe_mask: &[f64],
    unsafe_tuned: &DeviceReps<B>,
    unsafe_orig: &DeviceReps<B>,
    unsafe_mask: &[f64],
    unsafe_seq: usize,
    unsafe_last_prompt: &[usize],
    targets: &[usize],
    want_grad: bool,
) -> anyhow::Result<(
    RepBendTerms,
    Option<(Vec<(usize, B::Buf)>, Vec<(usize, B::Buf)>)>,
)> {
    let mut gs = Vec::new();
    let mut gu = Vec::new();
    let safe_dist = masked_l2_mean_on(
        be,
        safe_tuned,
        safe_orig,
        safe_mask,
        safe_indices,
        dim,
        cfg.alpha,
        want_grad.then_some(&mut gs),
    )?;
    let unsafe_dist = masked_l2_mean_on(
        be,
        unsafe_tuned,
        unsafe_orig,
        unsafe_mask,
        targets,
        dim,
        -cfg.beta,
        want_grad.then_some(&mut gu),
    )?;
    let nb = unsafe_last_prompt.len();
    assert_eq!(
        unsafe_tuned.rows,
        nb * unsafe_seq,
        "one last-prompt index per unsafe sequence"
    );
    let pairs = (nb * nb.saturating_sub(1)) as f64;
    let mut unsafe_cos = 0.0;
    if pairs > 0.0 {
        let w = 1.0 / (targets.len() as f64 * pairs);
        let rows: Vec<u32> = unsafe_last_prompt
            .iter()
            .enumerate()
            .map(|(i, &t)| (i * unsafe_seq + t) as u32)
            .collect();
        // Selection matrix: row r of the set gets the gradient of picked row i when r = rows[i].
        let mut sel = vec![0f32; unsafe_tuned.rows * nb];
        for (i, &r) in rows.iter().enumerate() {
            sel[r as usize * nb + i] = 1.0;
        }
        let sel = be.upload_f32(&sel)?;
        for &l in targets {
            let mut picked = be.alloc_f32(nb * dim)?;
            be.gather_rows(unsafe_tuned.get(l), &rows, dim, &mut picked, 0);
            let v: Vec<f64> = be
                .download(&picked)?
                .into_iter()
                .map(|x| x as f64)
                .collect();
            let mut gsel = vec![0f64; nb * dim];
            for i in 0..nb {
                for j in 0..nb {
                    if i == j {
                        continue;
                    }
                    let (vi, vj) = (&v[i * dim..(i + 1) * dim], &v[j * dim..(j + 1) * dim]);
                    unsafe_cos += w * (1.0 - cos_sim(vi, vj));
                    if want_grad {
                        let (mut gi, mut gj) = (vec![0.0; dim], vec![0.0; dim]);
                        cos_sim_grad(vi, vj, -cfg.gamma * w, Some(&mut gi), Some(&mut gj));
                        gsel[i * dim..(i + 1) * dim]
                            .iter_mut()
                            .zip(&gi)
                            .for_each(|(a, b)| *a += b);
                        gsel[j * dim..(j + 1) * dim]
                            .iter_mut()
                            .zip(&gj)
                            .for_each(|(a, b)| *a += b);
                    }
                }
            }
            if want_grad {
                let gsel: Vec<f32> = gsel.iter().map(|&x| x as f32).collect();
                let gsel = be.upload_f32(&gsel)?;
                let g = &mut gu
                    .iter_mut()
                    .find(|g| g.0 == l)
                    .ok_or_else(|| anyhow::anyhow!("no unsafe gradient slot for index {l}"))?
                    .1;
                be.gemm(
                    &sel,
                    &gsel,
                    g,
                    unsafe_tuned.rows,
                    dim,
                    nb,
                    false,
                    false,
                    1.0,
                    true,
                );
            }
        }
    }
    let total = cfg.alpha * safe_dist - cfg.beta * unsafe_dist + cfg.gamma * unsafe_cos;
    Ok((
        RepBendTerms {
            safe_dist,
            unsafe_dist,
            unsafe_cos,
            total,
        },
        want_grad.then_some((gs, gu)),
    ))
}
