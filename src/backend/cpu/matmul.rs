//! Projection GEMM `out = (acc ? out : 0) + scale * x W^T` (CPU reference of kernels/matmul.cu).
//!
//! Three paths, all f32 with f32 accumulation:
//! - small `m` (decode): memory-bound matrix-vector products; W is streamed once, four rows at
//!   a time against all `m` rows of x, parallel over blocks of output features;
//! - AVX-512 machines, larger `m` (prefill): a BLIS-style blocked GEMM. W is packed (transposed)
//!   into panels of `NR = 64` output features x `k`, x is read in place, and a 6 x 64 register
//!   micro-kernel (24 zmm accumulators, broadcast x, 4 loads of W per k step) runs over
//!   `KC`-deep slices so the W slice stays in L1. The same micro-kernel serves the tiled
//!   attention (`QK^T` and `PV`);
//! - otherwise the `gemm` crate (AVX2/FMA kernels).

use rayon::prelude::*;

/// Below this many rows the weight matrix is streamed once per row instead of blocked.
const SMALL_M: usize = 4;

#[allow(clippy::too_many_arguments)]
pub fn matmul_fwd(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    scale: f32,
    accumulate: bool,
) {
    assert_eq!(x.len(), m * k, "matmul: x is not [m={m}, k={k}]");
    assert_eq!(w.len(), n * k, "matmul: w is not [n={n}, k={k}]");
    assert_eq!(out.len(), m * n, "matmul: out is not [m={m}, n={n}]");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    if m <= SMALL_M {
        matvec(x, w, out, m, n, k, scale, accumulate);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        // SAFETY: AVX-512F was detected; sizes were checked above.
        unsafe { avx512::gemm_nt(x, w, out, m, n, k, scale, accumulate) };
        return;
    }
    // SAFETY: the three slices were checked above to hold exactly m*k, n*k and m*n values,
    // and the strides below address only those elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// A raw pointer that may cross threads: tasks write disjoint elements through it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: every user writes only elements no other task touches (documented at each use).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Work items for `n` output features on the rayon pool: enough for balance on every thread,
/// few enough that each streams a good run of W.
fn matvec_block(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let per = n.div_ceil(threads * 4);
    per.next_multiple_of(4).max(16)
}

#[allow(clippy::too_many_arguments)]
fn matvec(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    scale: f32,
    accumulate: bool,
) {
    let block = matvec_block(n);
    let o = SendPtr(out.as_mut_ptr());
    let run = |j0: usize| {
        let j1 = (j0 + block).min(n);
        // SAFETY: this task writes out[i * n + j] for j in j0..j1 only; bounds checked by the caller.
        unsafe { matvec_range(x, w, o.get(), m, n, k, j0, j1, scale, accumulate) }
    };
    if n <= block {
        run(0);
    } else {
        (0..n.div_ceil(block))
            .into_par_iter()
            .for_each(|b| run(b * block));
    }
}

/// `out[i, j] (+)= scale * x[i] . w[j]` for `j in j0..j1`, all `m` rows.
///
/// # Safety
/// `out` must point to `m * n` writable values not written concurrently in columns `j0..j1`.
#[allow(clippy::too_many_arguments)]
unsafe fn matvec_range(
    x: &[f32],
    w: &[f32],
    out: *mut f32,
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    scale: f32,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        let f = match m {
            1 => avx512::matvec_rows::<1>,
            2 => avx512::matvec_rows::<2>,
            3 => avx512::matvec_rows::<3>,
            _ => avx512::matvec_rows::<4>,
        };
        debug_assert!(m <= 4);
        return f(x.as_ptr(), w.as_ptr(), out, n, k, j0, j1, scale, accumulate);
    }
    for j in j0..j1 {
        let wr = &w[j * k..(j + 1) * k];
        for i in 0..m {
            let v = scale * super::dot(&x[i * k..(i + 1) * k], wr);
            let o = &mut *out.add(i * n + j);
            *o = if accumulate { *o + v } else { v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::SendPtr;
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// Rows of the micro-kernel tile.
    pub const MR: usize = 6;
    /// Columns of the micro-kernel tile (4 zmm).
    pub const NR: usize = 64;
    /// Depth of one k slice: a packed W slice of KC x NR f32 (32 KiB) stays in L1.
    const KC: usize = 128;
    /// How far ahead (in rows of W) the matrix-vector kernel prefetches.
    const PREFETCH_ROWS: usize = 8;
    /// Upper bound on packed W per phase (the rest of W is packed in later phases).
    const PACK_BYTES: usize = 4 << 20;

    #[inline(always)]
    fn col_masks(nr: usize) -> [__mmask16; 4] {
        let mut m = [0 as __mmask16; 4];
        for (j, mj) in m.iter_mut().enumerate() {
            let lanes = nr.saturating_sub(16 * j).min(16);
            *mj = ((1u32 << lanes) - 1) as __mmask16;
        }
        m
    }

    /// `C[M x nr] (= or +=) alpha * A[M x kc] B[kc x nr]` with A rows at `a + i * lda`
    /// (contiguous in k), B rows of 64 values at `b + p * ldb` (values past `nr` are read but
    /// must be finite and are not stored), C rows at `c + i * ldc`.
    ///
    /// # Safety
    /// AVX-512F must be available; every addressed element must be in bounds.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel<const M: usize>(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        nr: usize,
        alpha: f32,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; M];
        let mut rows = [a; M];
        for (i, r) in rows.iter_mut().enumerate() {
            *r = a.add(i * lda);
        }
        let mut bp = b;
        for p in 0..kc {
            let b0 = _mm512_loadu_ps(bp);
            let b1 = _mm512_loadu_ps(bp.add(16));
            let b2 = _mm512_loadu_ps(bp.add(32));
            let b3 = _mm512_loadu_ps(bp.add(48));
            for (ai, row) in acc.iter_mut().zip(rows) {
                let av = _mm512_set1_ps(*row.add(p));
                ai[0] = _mm512_fmadd_ps(av, b0, ai[0]);
                ai[1] = _mm512_fmadd_ps(av, b1, ai[1]);
                ai[2] = _mm512_fmadd_ps(av, b2, ai[2]);
                ai[3] = _mm512_fmadd_ps(av, b3, ai[3]);
            }
            bp = bp.add(ldb);
        }
        let al = _mm512_set1_ps(alpha);
        let masks = col_masks(nr);
        for (i, row) in acc.iter().enumerate() {
            let cr = c.add(i * ldc);
            for j in 0..4 {
                if masks[j] == 0 {
                    break;
                }
                let mut v = _mm512_mul_ps(al, row[j]);
                if accumulate {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[j], cr.add(16 * j)));
                }
                _mm512_mask_storeu_ps(cr.add(16 * j), masks[j], v);
            }
        }
    }

    /// [`kernel`] for `1 <= m <= MR` rows.
    ///
    /// # Safety
    /// As [`kernel`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel_m(
        m: usize,
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        nr: usize,
        alpha: f32,
        accumulate: bool,
    ) {
        match m {
            6 => kernel::<6>(kc, a, lda, b, ldb, c, ldc, nr, alpha, accumulate),
            5 => kernel::<5>(kc, a, lda, b, ldb, c, ldc, nr, alpha, accumulate),
            4 => kernel::<4>(kc, a, lda, b, ldb, c, ldc, nr, alpha, accumulate),
            3 => kernel::<3>(kc, a, lda, b, ldb, c, ldc, nr, alpha, accumulate),
            2 => kernel::<2>(kc, a, lda, b, ldb, c, ldc, nr, alpha, accumulate),
            1 => kernel::<1>(kc, a, lda, b, ldb, c, ldc, nr, alpha, accumulate),
            _ => unreachable!("micro-kernel rows {m}"),
        }
    }

    /// 16 x 16 transpose: `dst[c * lds + r] = src[r * lss + c]` for `r, c < 16`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(src: *const f32, lss: usize, dst: *mut f32, lds: usize) {
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, v) in r.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(src.add(i * lss));
        }
        // Stage 1: interleave 32-bit pairs.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // Stage 2: interleave 64-bit pairs.
        for i in 0..4 {
            let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
            r[4 * i] =
                _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
            r[4 * i + 1] =
                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
            r[4 * i + 2] =
                _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
            r[4 * i + 3] =
                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
        }
        // Stage 3 and 4: 128-bit lanes.
        for i in 0..4 {
            t[i] = _mm512_shuffle_f32x4::<0x88>(r[i], r[4 + i]);
            t[4 + i] = _mm512_shuffle_f32x4::<0xdd>(r[i], r[4 + i]);
            t[8 + i] = _mm512_shuffle_f32x4::<0x88>(r[8 + i], r[12 + i]);
            t[12 + i] = _mm512_shuffle_f32x4::<0xdd>(r[8 + i], r[12 + i]);
        }
        for i in 0..4 {
            r[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[8 + i]);
            r[8 + i] = _mm512_shuffle_f32x4::<0xdd>(t[i], t[8 + i]);
            r[4 + i] = _mm512_shuffle_f32x4::<0x88>(t[4 + i], t[12 + i]);
            r[12 + i] = _mm512_shuffle_f32x4::<0xdd>(t[4 + i], t[12 + i]);
        }
        for (i, v) in r.iter().enumerate() {
            _mm512_storeu_ps(dst.add(i * lds), *v);
        }
    }

    /// Packs `rows` (<= NR) rows of a row-major `[*, k]` matrix starting at `src` (row stride
    /// `lds`) into a `[k][NR]` panel: `dst[p * NR + r] = src[r * lds + p]`, zero for `r >= rows`.
    ///
    /// # Safety
    /// AVX-512F; `src` rows `0..rows` hold `k` readable values; `dst` holds `k * NR`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_panel(src: *const f32, lds: usize, rows: usize, k: usize, dst: *mut f32) {
        let full_r = if rows == NR { NR } else { 0 };
        let k16 = k / 16 * 16;
        if full_r == NR {
            for r0 in (0..NR).step_by(16) {
                for p0 in (0..k16).step_by(16) {
                    transpose16(src.add(r0 * lds + p0), lds, dst.add(p0 * NR + r0), NR);
                }
            }
            for p in k16..k {
                for r in 0..NR {
                    *dst.add(p * NR + r) = *src.add(r * lds + p);
                }
            }
        } else {
            for p in 0..k {
                for r in 0..NR {
                    *dst.add(p * NR + r) = if r < rows { *src.add(r * lds + p) } else { 0.0 };
                }
            }
        }
    }

    thread_local! {
        static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// Takes this thread's scratch buffer (empty if a nested call holds it) with at least `len`
    /// values; give it back with [`put_scratch`].
    pub fn take_scratch(len: usize) -> Vec<f32> {
        let mut v = PACKED.with(|c| std::mem::take(&mut *c.borrow_mut()));
        if v.len() < len {
            v.resize(len, 0.0);
        }
        v
    }

    pub fn put_scratch(v: Vec<f32>) {
        PACKED.with(|c| {
            let mut cur = c.borrow_mut();
            if cur.capacity() < v.capacity() {
                *cur = v;
            }
        });
    }

    /// `out = (acc ? out : 0) + scale * x W^T` with x `[m, k]`, W `[n, k]`, out `[m, n]`.
    ///
    /// # Safety
    /// AVX-512F must be available; the slices must have the sizes the caller checked.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_nt(
        x: &[f32],
        w: &[f32],
        out: &mut [f32],
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
        accumulate: bool,
    ) {
        let threads = rayon::current_num_threads().max(1);
        let panels = n.div_ceil(NR);
        let panel_len = k * NR;
        // Enough panels for every thread: each task packs its own panel, so reading W (cold,
        // from DRAM, in a forward pass) overlaps with the other threads' arithmetic.
        if panels >= 8 * threads {
            return gemm_nt_fused(x, w, out, m, n, k, scale, accumulate);
        }
        let per_phase = (PACK_BYTES / (panel_len * 4)).clamp(1, panels);
        let mut packed = take_scratch(per_phase * panel_len);
        let k_slices = k.div_ceil(KC);
        let kc = k.div_ceil(k_slices);
        let o = SendPtr(out.as_mut_ptr());
        for phase0 in (0..panels).step_by(per_phase) {
            let np = per_phase.min(panels - phase0);
            packed[..np * panel_len]
                .par_chunks_mut(panel_len)
                .enumerate()
                .for_each(|(pi, dst)| {
                    let j0 = (phase0 + pi) * NR;
                    let rows = NR.min(n - j0);
                    pack_panel(w.as_ptr().add(j0 * k), k, rows, k, dst.as_mut_ptr());
                });
            // Split the rows too, so every thread has several tasks.
            let tiles = m.div_ceil(MR);
            let m_chunks = (8 * threads).div_ceil(np).clamp(1, tiles);
            let chunk_rows = tiles.div_ceil(m_chunks) * MR;
            let m_chunks = m.div_ceil(chunk_rows);
            let packed = &packed;
            (0..np * m_chunks).into_par_iter().for_each(|t| {
                let (pi, mc) = (t / m_chunks, t % m_chunks);
                let j0 = (phase0 + pi) * NR;
                let nr = NR.min(n - j0);
                let bpanel = packed.as_ptr().add(pi * panel_len);
                let (r0, r1) = (mc * chunk_rows, ((mc + 1) * chunk_rows).min(m));
                for s in 0..k_slices {
                    let p0 = s * kc;
                    let kcs = kc.min(k - p0);
                    let acc = accumulate || s > 0;
                    let mut i = r0;
                    while i < r1 {
                        let mr = MR.min(r1 - i);
                        // SAFETY: rows r0..r1 x columns j0..j0+nr of out belong to this task.
                        kernel_m(
                            mr,
                            kcs,
                            x.as_ptr().add(i * k + p0),
                            k,
                            bpanel.add(p0 * NR),
                            NR,
                            o.get().add(i * n + j0),
                            n,
                            nr,
                            scale,
                            acc,
                        );
                        i += mr;
                    }
                }
            });
        }
        put_scratch(packed);
    }

    thread_local! {
        static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// [`gemm_nt`] with one task per panel of W that packs its own panel (no separate packing
    /// phase); for matrices with many panels.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_nt_fused(
        x: &[f32],
        w: &[f32],
        out: &mut [f32],
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
        accumulate: bool,
    ) {
        let threads = rayon::current_num_threads().max(1);
        let panels = n.div_ceil(NR);
        let panel_len = k * NR;
        let k_slices = k.div_ceil(KC);
        let kc = k.div_ceil(k_slices);
        let tiles = m.div_ceil(MR);
        let m_chunks = (2 * threads).div_ceil(panels).clamp(1, tiles);
        let chunk_rows = tiles.div_ceil(m_chunks) * MR;
        let m_chunks = m.div_ceil(chunk_rows);
        let o = SendPtr(out.as_mut_ptr());
        (0..panels * m_chunks).into_par_iter().for_each(|t| {
            let (pi, mc) = (t / m_chunks, t % m_chunks);
            let j0 = pi * NR;
            let nr = NR.min(n - j0);
            PANEL.with(|cell| {
                let mut buf = cell.borrow_mut();
                if buf.len() < panel_len {
                    buf.resize(panel_len, 0.0);
                }
                pack_panel(w.as_ptr().add(j0 * k), k, nr, k, buf.as_mut_ptr());
                let bpanel = buf.as_ptr();
                let (r0, r1) = (mc * chunk_rows, ((mc + 1) * chunk_rows).min(m));
                for s in 0..k_slices {
                    let p0 = s * kc;
                    let kcs = kc.min(k - p0);
                    let acc = accumulate || s > 0;
                    let mut i = r0;
                    while i < r1 {
                        let mr = MR.min(r1 - i);
                        kernel_m(
                            mr,
                            kcs,
                            x.as_ptr().add(i * k + p0),
                            k,
                            bpanel.add(p0 * NR),
                            NR,
                            o.get().add(i * n + j0),
                            n,
                            nr,
                            scale,
                            acc,
                        );
                        i += mr;
                    }
                }
            });
        });
    }

    /// `out[i, j] (+)= scale * x[i] . w[j]` for `j in j0..j1` and `M` rows of x: four rows of W
    /// at a time share each load of x; one horizontal sum per output.
    ///
    /// # Safety
    /// AVX-512F; `x` holds `M * k`, `w` holds `j1 * k`, `out` `M * n` values, columns
    /// `j0..j1` of `out` not written concurrently.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matvec_rows<const M: usize>(
        x: *const f32,
        w: *const f32,
        out: *mut f32,
        n: usize,
        k: usize,
        j0: usize,
        j1: usize,
        scale: f32,
        accumulate: bool,
    ) {
        let k16 = k / 16 * 16;
        let tail = super::super::simd::x86::tail_mask(k - k16);
        let store = |i: usize, j: usize, v: f32| {
            let o = out.add(i * n + j);
            *o = if accumulate {
                *o + scale * v
            } else {
                scale * v
            };
        };
        let mut j = j0;
        while j + 4 <= j1 {
            let mut acc = [[_mm512_setzero_ps(); M]; 4];
            let wr = [
                w.add(j * k),
                w.add((j + 1) * k),
                w.add((j + 2) * k),
                w.add((j + 3) * k),
            ];
            let mut p = 0;
            while p < k16 {
                let mut xv = [_mm512_setzero_ps(); M];
                for (i, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(x.add(i * k + p));
                }
                for (accr, w_row) in acc.iter_mut().zip(wr) {
                    // W is read once: ask for the same columns PREFETCH_ROWS rows further down
                    // now (more misses in flight than the hardware prefetcher keeps).
                    _mm_prefetch::<_MM_HINT_T0>(
                        w_row.wrapping_add(PREFETCH_ROWS * k + p) as *const i8
                    );
                    let wv = _mm512_loadu_ps(w_row.add(p));
                    for (a, xi) in accr.iter_mut().zip(xv) {
                        *a = _mm512_fmadd_ps(wv, xi, *a);
                    }
                }
                p += 16;
            }
            if k16 < k {
                for (accr, w_row) in acc.iter_mut().zip(wr) {
                    let wv = _mm512_maskz_loadu_ps(tail, w_row.add(k16));
                    for (i, a) in accr.iter_mut().enumerate() {
                        let xv = _mm512_maskz_loadu_ps(tail, x.add(i * k + k16));
                        *a = _mm512_fmadd_ps(wv, xv, *a);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (i, v) in row.iter().enumerate() {
                    store(i, j + r, _mm512_reduce_add_ps(*v));
                }
            }
            j += 4;
        }
        while j < j1 {
            let wr = std::slice::from_raw_parts(w.add(j * k), k);
            for i in 0..M {
                let xr = std::slice::from_raw_parts(x.add(i * k), k);
                store(i, j, super::super::simd::x86::dot_avx512(xr, wr));
            }
            j += 1;
        }
    }
}

/// General GEMM for the backward pass: `out[m,n] = (acc ? out : 0) + scale * op(a) op(b)` where
/// `op(a)` is `a [m,k]` or, with `trans_a`, the transpose of `a [k,m]`; likewise `op(b)` is
/// `b [k,n]` or, with `trans_b`, the transpose of `b [n,k]`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_fwd(
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    scale: f32,
    accumulate: bool,
) {
    assert_eq!(
        a.len(),
        m * k,
        "gemm: a has {} values, not {m}x{k}",
        a.len()
    );
    assert_eq!(
        b.len(),
        k * n,
        "gemm: b has {} values, not {k}x{n}",
        b.len()
    );
    assert_eq!(
        out.len(),
        m * n,
        "gemm: out has {} values, not {m}x{n}",
        out.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    if m == 1 {
        // A row vector times a matrix (the weighted row sums of the objectives and the latent
        // adversary's bias gradient): summed in a fixed order, so results do not depend on how
        // a parallel GEMM would split k.
        let mut acc = vec![0f32; n];
        for p in 0..k {
            let ap = a[p];
            if trans_b {
                for (j, o) in acc.iter_mut().enumerate() {
                    *o += ap * b[j * k + p];
                }
            } else {
                for (o, &bv) in acc.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                    *o += ap * bv;
                }
            }
        }
        for (o, v) in out.iter_mut().zip(acc) {
            *o = if accumulate {
                *o + scale * v
            } else {
                scale * v
            };
        }
        return;
    }
    // (column stride, row stride) of each operand as an m x k / k x n matrix.
    let (a_cs, a_rs) = if trans_a {
        (m as isize, 1)
    } else {
        (1, k as isize)
    };
    let (b_cs, b_rs) = if trans_b {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    // SAFETY: sizes were checked above and the strides address only those elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

#[cfg(test)]
mod fast_path_tests {
    use super::*;
    use crate::util::Rng;

    fn naive(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut o = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
            }
        }
        o
    }

    /// Every path (matvec, blocked AVX-512, gemm crate) at odd and tile-multiple shapes, with
    /// `=` and `+=`, outputs poisoned first where they are overwritten.
    #[test]
    fn matmul_matches_naive_at_odd_shapes() {
        let mut r = Rng::new(11);
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 67, 33),
            (3, 130, 17),
            (4, 64, 64),
            (5, 63, 129),
            (6, 64, 128),
            (7, 65, 300),
            (13, 200, 577),
            (64, 192, 576),
            (37, 1000, 40),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| r.normal()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| r.normal()).collect();
            let want = naive(&x, &w, m, n, k);
            let mut out = vec![f32::NAN; m * n];
            matmul_fwd(&x, &w, &mut out, m, n, k, 0.5, false);
            let base: Vec<f32> = (0..m * n).map(|_| r.normal()).collect();
            let mut acc = base.clone();
            matmul_fwd(&x, &w, &mut acc, m, n, k, 0.5, true);
            let tol = 1e-5 * (k as f64).sqrt() * 4.0;
            for i in 0..m * n {
                assert!(
                    (out[i] as f64 - 0.5 * want[i]).abs() <= tol,
                    "m={m} n={n} k={k} i={i}: {} vs {}",
                    out[i],
                    0.5 * want[i]
                );
                assert!((acc[i] as f64 - base[i] as f64 - 0.5 * want[i]).abs() <= tol);
            }
        }
    }
}
