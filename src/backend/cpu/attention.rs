//! Causal grouped-query attention against a KV cache (CPU reference of kernels/attention.cu).
//! One query row at a time with a numerically safe softmax over the visible keys.

use crate::backend::AttnShape;
use rayon::prelude::*;

/// Copies the new keys/values `[batch * q_len, kv_dim]` into `[batch, capacity, kv_dim]` caches.
pub fn kv_store(k: &[f32], v: &[f32], k_cache: &mut [f32], v_cache: &mut [f32], s: AttnShape) {
    s.check();
    let kvd = s.kv_dim();
    assert_eq!(k.len(), s.batch * s.q_len * kvd, "kv_store: k size");
    assert_eq!(v.len(), k.len(), "kv_store: v size");
    assert_eq!(
        k_cache.len(),
        s.batch * s.capacity * kvd,
        "kv_store: k_cache size"
    );
    assert_eq!(v_cache.len(), k_cache.len(), "kv_store: v_cache size");
    for b in 0..s.batch {
        let src = b * s.q_len * kvd..(b + 1) * s.q_len * kvd;
        let dst = (b * s.capacity + s.start_pos) * kvd;
        k_cache[dst..dst + s.q_len * kvd].copy_from_slice(&k[src.clone()]);
        v_cache[dst..dst + s.q_len * kvd].copy_from_slice(&v[src]);
    }
}

/// `out[b, t, h] = softmax_j(q·k_j / sqrt(d)) v_j` over `j <= start_pos + t` with `key_mask[b, j] != 0`.
/// A query row that sees no key at all (fully padded) gets zeros.
pub fn attention_fwd(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    key_mask: Option<&[f32]>,
    out: &mut [f32],
    s: AttnShape,
) {
    s.check();
    let (qd, kvd, hd) = (s.q_dim(), s.kv_dim(), s.head_dim);
    assert_eq!(q.len(), s.batch * s.q_len * qd, "attention: q size");
    assert_eq!(out.len(), q.len(), "attention: out size");
    assert_eq!(
        k_cache.len(),
        s.batch * s.capacity * kvd,
        "attention: k_cache size"
    );
    if let Some(m) = key_mask {
        assert_eq!(m.len(), s.batch * s.capacity, "attention: key_mask size");
    }
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let h = idx % s.n_heads;
        let row = idx / s.n_heads;
        let (b, t) = (row / s.q_len, row % s.q_len);
        let kvh = h / group;
        let qv = &q[row * qd + h * hd..row * qd + (h + 1) * hd];
        let visible = s.start_pos + t + 1;
        let base = b * s.capacity;
        let mut scores = Vec::with_capacity(visible);
        let mut max = f32::NEG_INFINITY;
        for j in 0..visible {
            let keep = key_mask.is_none_or(|m| m[base + j] != 0.0);
            let sc = if keep {
                let kr = &k_cache[(base + j) * kvd + kvh * hd..(base + j) * kvd + (kvh + 1) * hd];
                super::dot(qv, kr) * scale
            } else {
                f32::NEG_INFINITY
            };
            max = max.max(sc);
            scores.push(sc);
        }
        o.fill(0.0);
        if max == f32::NEG_INFINITY {
            return;
        }
        let mut denom = 0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            denom += *sc;
        }
        let inv = 1.0 / denom;
        for (j, &p) in scores.iter().enumerate() {
            if p == 0.0 {
                continue;
            }
            let vr = &v_cache[(base + j) * kvd + kvh * hd..(base + j) * kvd + (kvh + 1) * hd];
            let w = p * inv;
            for (oi, &vi) in o.iter_mut().zip(vr) {
                *oi += w * vi;
            }
        }
    });
}

/// Backward of [`attention_fwd`] for a full sequence (`start_pos == 0`, keys/values
/// `[batch * q_len, kv_dim]`, i.e. a cache with `capacity == q_len`). Recomputes the softmax
/// row by row (flash-attention style, using `D = dout . out`), writes `dq`, `dk`, `dv` (`=`).
/// Parallel over (sequence, KV head): the query heads of a group add into the same dk/dv rows.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: Option<&[f32]>,
    out: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    s: AttnShape,
) {
    s.check();
    assert!(
        s.start_pos == 0 && s.capacity == s.q_len,
        "attention_bwd: needs a whole sequence {s:?}"
    );
    let (qd, kvd, hd, t_len) = (s.q_dim(), s.kv_dim(), s.head_dim, s.q_len);
    assert!(
        q.len() == s.batch * t_len * qd
            && out.len() == q.len()
            && dout.len() == q.len()
            && dq.len() == q.len()
    );
    assert!(
        k.len() == s.batch * t_len * kvd
            && v.len() == k.len()
            && dk.len() == k.len()
            && dv.len() == k.len()
    );
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // One task per (b, kv head) owns the dq columns of its query heads and its dk/dv columns.
    struct Ptr(*mut f32);
    unsafe impl Sync for Ptr {}
    let (dqp, dkp, dvp) = (
        Ptr(dq.as_mut_ptr()),
        Ptr(dk.as_mut_ptr()),
        Ptr(dv.as_mut_ptr()),
    );
    (0..s.batch * s.n_kv_heads)
        .into_par_iter()
        .for_each(|task| {
            let (b, kvh) = (task / s.n_kv_heads, task % s.n_kv_heads);
            let _ = (&dqp, &dkp, &dvp);
            let mut p = vec![0f32; t_len];
            let mut dkh = vec![0f32; t_len * hd];
            let mut dvh = vec![0f32; t_len * hd];
            for h in kvh * group..(kvh + 1) * group {
                for t in 0..t_len {
                    let row = b * t_len + t;
                    let qv = &q[row * qd + h * hd..row * qd + (h + 1) * hd];
                    let mut max = f32::NEG_INFINITY;
                    for j in 0..=t {
                        let keep = key_mask.is_none_or(|m| m[b * t_len + j] != 0.0);
                        p[j] = if keep {
                            let kr = &k[(b * t_len + j) * kvd + kvh * hd..][..hd];
                            super::dot(qv, kr) * scale
                        } else {
                            f32::NEG_INFINITY
                        };
                        max = max.max(p[j]);
                    }
                    let mut dqr = vec![0f32; hd];
                    if max != f32::NEG_INFINITY {
                        let mut denom = 0f32;
                        for pj in p[..=t].iter_mut() {
                            *pj = (*pj - max).exp();
                            denom += *pj;
                        }
                        let dor = &dout[row * qd + h * hd..][..hd];
                        let orow = &out[row * qd + h * hd..][..hd];
                        let dsum = super::dot(dor, orow);
                        for j in 0..=t {
                            let pj = p[j] / denom;
                            if pj == 0.0 {
                                continue;
                            }
                            let kr = &k[(b * t_len + j) * kvd + kvh * hd..][..hd];
                            let vr = &v[(b * t_len + j) * kvd + kvh * hd..][..hd];
                            let ds = pj * (super::dot(dor, vr) - dsum) * scale;
                            for i in 0..hd {
                                dqr[i] += ds * kr[i];
                                dkh[j * hd + i] += ds * qv[i];
                                dvh[j * hd + i] += pj * dor[i];
                            }
                        }
                    }
                    // SAFETY: columns h*hd.. of this row belong to this task only.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            dqr.as_ptr(),
                            dqp.0.add(row * qd + h * hd),
                            hd,
                        );
                    }
                }
            }
            for j in 0..t_len {
                let off = (b * t_len + j) * kvd + kvh * hd;
                // SAFETY: columns kvh*hd.. of sequence b belong to this task only.
                unsafe {
                    std::ptr::copy_nonoverlapping(dkh[j * hd..].as_ptr(), dkp.0.add(off), hd);
                    std::ptr::copy_nonoverlapping(dvh[j * hd..].as_ptr(), dvp.0.add(off), hd);
                }
            }
        });
}
