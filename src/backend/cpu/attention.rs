//! Causal grouped-query attention against a KV cache (CPU reference of kernels/attention.cu).
//! Numerically safe softmax over the visible keys (max subtracted, masked keys exactly 0).

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
///
/// Two schedules, same math: with AVX-512 and a block of queries (prefill), a tiled one that
/// packs `K^T` once per KV head and runs `S = QK^T`, the softmax and `PV` for 64 queries at a
/// time through the matmul micro-kernel; otherwise (decode, other CPUs) one query row at a time.
pub fn attention_fwd(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    key_mask: Option<&[f32]>,
    out: &mut [f32],
    s: AttnShape,
) {
    s.check();
    let (qd, kvd) = (s.q_dim(), s.kv_dim());
    assert_eq!(q.len(), s.batch * s.q_len * qd, "attention: q size");
    assert_eq!(out.len(), q.len(), "attention: out size");
    assert_eq!(
        k_cache.len(),
        s.batch * s.capacity * kvd,
        "attention: k_cache size"
    );
    assert_eq!(v_cache.len(), k_cache.len(), "attention: v_cache size");
    if let Some(m) = key_mask {
        assert_eq!(m.len(), s.batch * s.capacity, "attention: key_mask size");
    }
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        if s.q_len >= TILED_MIN_Q {
            // SAFETY: AVX-512F was detected; sizes were checked above.
            unsafe { tiled::attention_avx512(q, k_cache, v_cache, key_mask, out, s) };
            return;
        }
        if decode::supported(s) {
            decode::attention_grouped(q, k_cache, v_cache, key_mask, out, s);
            return;
        }
    }
    attention_rows(q, k_cache, v_cache, key_mask, out, s);
}

/// Below this many queries per sequence the row schedule wins (nothing to reuse `K^T` for).
const TILED_MIN_Q: usize = 8;

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One task per (query row, head): scores, softmax and the weighted sum of values, with the
/// vector primitives of [`super::simd`].
fn attention_rows(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    key_mask: Option<&[f32]>,
    out: &mut [f32],
    s: AttnShape,
) {
    let (qd, kvd, hd) = (s.q_dim(), s.kv_dim(), s.head_dim);
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let one = |idx: usize, o: &mut [f32]| {
        let h = idx % s.n_heads;
        let row = idx / s.n_heads;
        let (b, t) = (row / s.q_len, row % s.q_len);
        let kvh = h / group;
        let qv = &q[row * qd + h * hd..row * qd + (h + 1) * hd];
        let visible = s.start_pos + t + 1;
        let base = b * s.capacity;
        SCORES.with(|cell| {
            let mut scores = cell.borrow_mut();
            scores.clear();
            scores.extend((0..visible).map(|j| {
                if key_mask.is_none_or(|m| m[base + j] != 0.0) {
                    let kr = &k_cache[(base + j) * kvd + kvh * hd..][..hd];
                    super::dot(qv, kr) * scale
                } else {
                    f32::NEG_INFINITY
                }
            }));
            o.fill(0.0);
            let max = super::simd::max(&scores);
            if max == f32::NEG_INFINITY {
                return;
            }
            let denom = super::simd::exp_shift_sum(&mut scores, max);
            for (j, &p) in scores.iter().enumerate() {
                if p != 0.0 {
                    let vr = &v_cache[(base + j) * kvd + kvh * hd..][..hd];
                    super::simd::axpy(p, vr, o);
                }
            }
            super::simd::scale(o, 1.0 / denom);
        });
    };
    let tasks = s.batch * s.q_len * s.n_heads;
    // Tiny calls (one short row) are not worth waking the pool for.
    if tasks * (s.kv_len() + 1) * hd < 1 << 14 {
        out.chunks_mut(hd).enumerate().for_each(|(i, o)| one(i, o));
    } else {
        out.par_chunks_mut(hd)
            .enumerate()
            .for_each(|(i, o)| one(i, o));
    }
}

/// Decode schedule: one task per (query row, KV head) serves all query heads of the group, so
/// each key and value row is loaded once for the group; the group's queries and outputs live in
/// registers (head_dim 64 or 128).
#[cfg(target_arch = "x86_64")]
mod decode {
    use super::super::matmul::SendPtr;
    use super::super::simd;
    use super::SCORES;
    use crate::backend::AttnShape;
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    pub fn supported(s: AttnShape) -> bool {
        matches!(s.head_dim, 64 | 128)
    }

    /// Heads per register-resident chunk: the queries (and later the outputs) of a chunk take
    /// `heads * head_dim / 16` zmm registers; 16 of them leave room for the rest.
    fn chunk_heads(hd: usize) -> usize {
        256 / hd
    }

    pub fn attention_grouped(
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        key_mask: Option<&[f32]>,
        out: &mut [f32],
        s: AttnShape,
    ) {
        let (qd, kvd, hd) = (s.q_dim(), s.kv_dim(), s.head_dim);
        let group = s.n_heads / s.n_kv_heads;
        let gc = chunk_heads(hd).min(group);
        let chunks = group.div_ceil(gc);
        let scale = 1.0 / (hd as f32).sqrt();
        let rows = s.batch * s.q_len;
        let o = SendPtr(out.as_mut_ptr());
        let task = |i: usize| {
            let ch = i % chunks;
            let kvh = (i / chunks) % s.n_kv_heads;
            let row = i / (chunks * s.n_kv_heads);
            let (b, t) = (row / s.q_len, row % s.q_len);
            let h0 = kvh * group + ch * gc;
            let g = gc.min((kvh + 1) * group - h0);
            let vis = s.start_pos + t + 1;
            let base = b * s.capacity * kvd + kvh * hd;
            let mask = key_mask.map(|m| &m[b * s.capacity..][..vis]);
            SCORES.with(|cell| {
                let mut sc = cell.borrow_mut();
                if sc.len() < g * vis {
                    sc.resize(g * vis, 0.0);
                }
                let args = Args {
                    q: q[row * qd + h0 * hd..].as_ptr(),
                    k: k_cache[base..].as_ptr(),
                    v: v_cache[base..].as_ptr(),
                    kvd,
                    vis,
                    mask,
                    scale,
                    scores: &mut sc[..g * vis],
                    // SAFETY (of the writes): heads h0..h0+g of this row belong to this task.
                    out: unsafe { o.get().add(row * qd + h0 * hd) },
                };
                // SAFETY: AVX-512F was detected by the caller; pointers cover vis rows.
                unsafe {
                    match (hd, g) {
                        (64, 1) => group_rows::<4, 1>(args),
                        (64, 2) => group_rows::<4, 2>(args),
                        (64, 3) => group_rows::<4, 3>(args),
                        (64, 4) => group_rows::<4, 4>(args),
                        (128, 1) => group_rows::<8, 1>(args),
                        (128, 2) => group_rows::<8, 2>(args),
                        _ => unreachable!("decode attention: head_dim {hd}, {g} heads"),
                    }
                }
            });
        };
        let tasks = rows * s.n_kv_heads * chunks;
        // Reading the cache is the cost (from DRAM in a real decode step): fan out unless tiny.
        if rows * s.n_heads * s.kv_len() * hd < 1 << 16 {
            (0..tasks).for_each(task);
        } else {
            (0..tasks).into_par_iter().for_each(task);
        }
    }

    struct Args<'a> {
        q: *const f32,
        k: *const f32,
        v: *const f32,
        kvd: usize,
        vis: usize,
        mask: Option<&'a [f32]>,
        scale: f32,
        scores: &'a mut [f32],
        out: *mut f32,
    }

    /// `G` consecutive query heads (`C` zmm each) against keys/values `0..vis` of one KV head.
    #[target_feature(enable = "avx512f")]
    unsafe fn group_rows<const C: usize, const G: usize>(a: Args) {
        let hd = 16 * C;
        let vis = a.vis;
        let mut qv = [[_mm512_setzero_ps(); C]; G];
        for (g, qg) in qv.iter_mut().enumerate() {
            for (c, v) in qg.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(a.q.add(g * hd + 16 * c));
            }
        }
        for j in 0..vis {
            let kr = a.k.add(j * a.kvd);
            let mut acc = [_mm512_setzero_ps(); G];
            for c in 0..C {
                let kk = _mm512_loadu_ps(kr.add(16 * c));
                for (ag, qg) in acc.iter_mut().zip(&qv) {
                    *ag = _mm512_fmadd_ps(qg[c], kk, *ag);
                }
            }
            for (g, ag) in acc.iter().enumerate() {
                *a.scores.get_unchecked_mut(g * vis + j) = _mm512_reduce_add_ps(*ag) * a.scale;
            }
        }
        let mut inv = [0f32; G];
        for (g, inv_g) in inv.iter_mut().enumerate() {
            let row = &mut a.scores[g * vis..(g + 1) * vis];
            if let Some(m) = a.mask {
                for (x, &keep) in row.iter_mut().zip(m) {
                    if keep == 0.0 {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            let max = simd::max(row);
            *inv_g = if max == f32::NEG_INFINITY {
                row.fill(0.0);
                0.0
            } else {
                1.0 / simd::exp_shift_sum(row, max)
            };
        }
        let mut o = [[_mm512_setzero_ps(); C]; G];
        for j in 0..vis {
            let vr = a.v.add(j * a.kvd);
            let mut p = [_mm512_setzero_ps(); G];
            for (g, pg) in p.iter_mut().enumerate() {
                *pg = _mm512_set1_ps(*a.scores.get_unchecked(g * vis + j));
            }
            for c in 0..C {
                let vv = _mm512_loadu_ps(vr.add(16 * c));
                for (og, pg) in o.iter_mut().zip(&p) {
                    og[c] = _mm512_fmadd_ps(*pg, vv, og[c]);
                }
            }
        }
        for (g, og) in o.iter().enumerate() {
            let sc = _mm512_set1_ps(inv[g]);
            for (c, v) in og.iter().enumerate() {
                _mm512_storeu_ps(a.out.add(g * hd + 16 * c), _mm512_mul_ps(*v, sc));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod tiled {
    use super::super::matmul::avx512::{kernel_m, pack_panel, put_scratch, take_scratch, MR, NR};
    use super::super::matmul::SendPtr;
    use super::super::simd;
    use crate::backend::AttnShape;
    use rayon::prelude::*;
    use std::cell::RefCell;

    /// Queries per task: S is QB x kv_len (147 KiB at 64 x 576), kept in L2.
    const QB: usize = 64;
    /// Keys per slice of `PV`: a 128 x 64 slice of V (32 KiB) stays in L1.
    const PV_KC: usize = 128;

    thread_local! {
        static S_TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// # Safety
    /// AVX-512F must be available; sizes as checked by `attention_fwd`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn attention_avx512(
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        key_mask: Option<&[f32]>,
        out: &mut [f32],
        s: AttnShape,
    ) {
        let (qd, kvd, hd) = (s.q_dim(), s.kv_dim(), s.head_dim);
        let group = s.n_heads / s.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let kv_len = s.kv_len();
        let key_panels = kv_len.div_ceil(NR);
        let col_panels = hd.div_ceil(NR);
        // Per (sequence, KV head): K^T as [key panel][hd][64] and V as [col panel][kv_len][64].
        let kt_len = key_panels * hd * NR;
        let v_len = col_panels * kv_len * NR;
        let per_head = kt_len + v_len;
        let heads = s.batch * s.n_kv_heads;
        let mut packed = take_scratch(heads * per_head);
        packed[..heads * per_head]
            .par_chunks_mut(per_head)
            .enumerate()
            .for_each(|(bg, dst)| {
                let (b, g) = (bg / s.n_kv_heads, bg % s.n_kv_heads);
                let (kt, vp) = dst.split_at_mut(kt_len);
                let kbase = k_cache.as_ptr().add(b * s.capacity * kvd + g * hd);
                for jp in 0..key_panels {
                    let rows = NR.min(kv_len - jp * NR);
                    pack_panel(
                        kbase.add(jp * NR * kvd),
                        kvd,
                        rows,
                        hd,
                        kt.as_mut_ptr().add(jp * hd * NR),
                    );
                }
                let vbase = &v_cache[b * s.capacity * kvd + g * hd..];
                for cp in 0..col_panels {
                    let cols = NR.min(hd - cp * NR);
                    for j in 0..kv_len {
                        let d = &mut vp[(cp * kv_len + j) * NR..][..NR];
                        d[..cols].copy_from_slice(&vbase[j * kvd + cp * NR..][..cols]);
                        d[cols..].fill(0.0);
                    }
                }
            });

        let q_blocks = s.q_len.div_ceil(QB);
        let o = SendPtr(out.as_mut_ptr());
        let packed_ref = &packed;
        (0..s.batch * s.n_heads * q_blocks)
            .into_par_iter()
            .for_each(|task| {
                let qb = task % q_blocks;
                let bh = task / q_blocks;
                let (b, h) = (bh / s.n_heads, bh % s.n_heads);
                let g = h / group;
                let head = &packed_ref[(b * s.n_kv_heads + g) * per_head..][..per_head];
                let (kt, vp) = head.split_at(kt_len);
                let (t0, t1) = (qb * QB, ((qb + 1) * QB).min(s.q_len));
                let rows = t1 - t0;
                let kv_hi = s.start_pos + t1;
                let lds = kv_hi.next_multiple_of(NR);
                let mask = key_mask.map(|m| &m[b * s.capacity..][..kv_len]);
                S_TILE.with(|cell| {
                    let mut st = cell.borrow_mut();
                    if st.len() < rows * lds + rows {
                        st.resize(rows * lds + rows, 0.0);
                    }
                    let (sm, inv) = st.split_at_mut(rows * lds);
                    let qrow0 = b * s.q_len + t0;
                    // S = scale * Q K^T, only the key panels some row of the tile can see;
                    // panel-major, so each K^T panel (hd x 64) stays in L1 across the row tiles.
                    for jp in 0..kv_hi.div_ceil(NR) {
                        let mut i0 = 0;
                        while i0 < rows {
                            let mr = MR.min(rows - i0);
                            let vis_tile = s.start_pos + t0 + i0 + mr;
                            if vis_tile > jp * NR {
                                kernel_m(
                                    mr,
                                    hd,
                                    q.as_ptr().add((qrow0 + i0) * qd + h * hd),
                                    qd,
                                    kt.as_ptr().add(jp * hd * NR),
                                    NR,
                                    sm.as_mut_ptr().add(i0 * lds + jp * NR),
                                    lds,
                                    NR.min(vis_tile - jp * NR),
                                    scale,
                                    false,
                                );
                            }
                            i0 += mr;
                        }
                    }
                    // Softmax per row over its visible keys; later keys of the tile get 0.
                    for r in 0..rows {
                        let vis = s.start_pos + t0 + r + 1;
                        let row = &mut sm[r * lds..r * lds + kv_hi];
                        if let Some(m) = mask {
                            for (x, &keep) in row[..vis].iter_mut().zip(m) {
                                if keep == 0.0 {
                                    *x = f32::NEG_INFINITY;
                                }
                            }
                        }
                        let (seen, unseen) = row.split_at_mut(vis);
                        unseen.fill(0.0);
                        let max = simd::max(seen);
                        inv[r] = if max == f32::NEG_INFINITY {
                            seen.fill(0.0);
                            0.0
                        } else {
                            1.0 / simd::exp_shift_sum(seen, max)
                        };
                    }
                    // O = P V in slices of PV_KC keys (a V slice stays in L1 across the row
                    // tiles), then each row scaled by 1 / its softmax denominator.
                    for p0 in (0..kv_hi).step_by(PV_KC) {
                        let mut i0 = 0;
                        while i0 < rows {
                            let mr = MR.min(rows - i0);
                            let vis_tile = s.start_pos + t0 + i0 + mr;
                            if vis_tile > p0 {
                                for cp in 0..col_panels {
                                    // SAFETY: rows qrow0+i0.. and columns of head h belong to
                                    // this task.
                                    kernel_m(
                                        mr,
                                        PV_KC.min(vis_tile - p0),
                                        sm.as_ptr().add(i0 * lds + p0),
                                        lds,
                                        vp.as_ptr().add((cp * kv_len + p0) * NR),
                                        NR,
                                        o.get().add((qrow0 + i0) * qd + h * hd + cp * NR),
                                        qd,
                                        NR.min(hd - cp * NR),
                                        1.0,
                                        p0 > 0,
                                    );
                                }
                            }
                            i0 += mr;
                        }
                    }
                    for (r, &inv_r) in inv.iter().enumerate().take(rows) {
                        let orow = std::slice::from_raw_parts_mut(
                            o.get().add((qrow0 + r) * qd + h * hd),
                            hd,
                        );
                        simd::scale(orow, inv_r);
                    }
                });
            });
        put_scratch(packed);
    }
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

#[cfg(test)]
mod fast_path_tests {
    use super::*;
    use crate::util::Rng;

    /// The naive definition, in f64.
    fn reference(
        q: &[f32],
        kc: &[f32],
        vc: &[f32],
        mask: Option<&[f32]>,
        s: AttnShape,
    ) -> Vec<f64> {
        let (qd, kvd, hd) = (s.q_dim(), s.kv_dim(), s.head_dim);
        let group = s.n_heads / s.n_kv_heads;
        let mut out = vec![0f64; q.len()];
        for b in 0..s.batch {
            for t in 0..s.q_len {
                for h in 0..s.n_heads {
                    let g = h / group;
                    let row = b * s.q_len + t;
                    let vis = s.start_pos + t + 1;
                    let keep = |j: usize| mask.is_none_or(|m| m[b * s.capacity + j] != 0.0);
                    let sc: Vec<f64> = (0..vis)
                        .map(|j| {
                            (0..hd)
                                .map(|d| {
                                    q[row * qd + h * hd + d] as f64
                                        * kc[(b * s.capacity + j) * kvd + g * hd + d] as f64
                                })
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = (0..vis)
                        .filter(|&j| keep(j))
                        .map(|j| sc[j])
                        .fold(f64::NEG_INFINITY, f64::max);
                    if max == f64::NEG_INFINITY {
                        continue;
                    }
                    let p: Vec<f64> = (0..vis)
                        .map(|j| if keep(j) { (sc[j] - max).exp() } else { 0.0 })
                        .collect();
                    let z: f64 = p.iter().sum();
                    for d in 0..hd {
                        out[row * qd + h * hd + d] = (0..vis)
                            .map(|j| p[j] * vc[(b * s.capacity + j) * kvd + g * hd + d] as f64)
                            .sum::<f64>()
                            / z;
                    }
                }
            }
        }
        out
    }

    /// Tiled and row schedules against the definition: odd lengths, partial panels, head dims
    /// that are not multiples of 64, a decode step, padding masks (one sequence fully masked
    /// at the start), outputs poisoned first.
    #[test]
    fn attention_matches_definition() {
        let mut r = Rng::new(5);
        let cases = [
            (1, 9, 0, 3, 1, 16),
            (2, 70, 5, 4, 2, 64),
            (1, 131, 0, 6, 3, 80),
            (1, 1, 100, 9, 3, 64),
            (2, 3, 60, 4, 4, 32),
            (1, 40, 30, 2, 1, 128),
            (2, 1, 77, 9, 3, 64),
            (1, 2, 33, 14, 2, 64),
            (1, 1, 50, 32, 8, 128),
            (1, 3, 20, 6, 1, 128),
        ];
        for &(batch, q_len, start, nh, nkv, hd) in &cases {
            for masked in [false, true] {
                let s = AttnShape {
                    batch,
                    q_len,
                    start_pos: start,
                    capacity: start + q_len + 3,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: hd,
                };
                let q: Vec<f32> = (0..batch * q_len * s.q_dim()).map(|_| r.normal()).collect();
                let kc: Vec<f32> = (0..batch * s.capacity * s.kv_dim())
                    .map(|_| r.normal() * 2.0)
                    .collect();
                let vc: Vec<f32> = (0..kc.len()).map(|_| r.normal()).collect();
                let mask: Option<Vec<f32>> = masked.then(|| {
                    (0..batch * s.capacity)
                        .map(|i| {
                            let (b, j) = (i / s.capacity, i % s.capacity);
                            // Sequence 0: left padding of 7; others: every third key hidden.
                            if b == 0 {
                                (j >= 7) as i32 as f32
                            } else {
                                (j % 3 != 1) as i32 as f32
                            }
                        })
                        .collect()
                });
                let want = reference(&q, &kc, &vc, mask.as_deref(), s);
                let mut got = vec![f32::NAN; q.len()];
                attention_fwd(&q, &kc, &vc, mask.as_deref(), &mut got, s);
                let mut rows = vec![f32::NAN; q.len()];
                attention_rows(&q, &kc, &vc, mask.as_deref(), &mut rows, s);
                for i in 0..q.len() {
                    for (name, g) in [("fwd", got[i]), ("rows", rows[i])] {
                        assert!(
                            (g as f64 - want[i]).abs() <= 1e-5 + 1e-4 * want[i].abs(),
                            "{name} {s:?} masked={masked} i={i}: {g} vs {}",
                            want[i]
                        );
                    }
                }
            }
        }
    }
}
