//! Vector primitives shared by the CPU ops, with run-time dispatch on the instruction set:
//! AVX-512F, then AVX2+FMA, then portable Rust. The binary is built for baseline x86-64, so
//! every wide kernel sits behind `#[target_feature]` and is only called after detection.
//!
//! Accuracy: `exp` is a Cephes-style polynomial (max relative error ~2 ulp, exact 0 for
//! `-inf`, `inf` above 88.7); dot products accumulate in f32 in a different order than a
//! sequential loop, like any BLAS.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Portable,
    Avx2,
    Avx512,
}

/// The widest instruction set usable here (`REPSHIELD_CPU_ISA=portable|avx2` caps it, to test
/// and benchmark the narrower paths on a wide machine).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = detect();
        match std::env::var("REPSHIELD_CPU_ISA").ok().as_deref() {
            Some("portable") => Level::Portable,
            Some("avx2") => detected.min(Level::Avx2),
            _ => detected,
        }
    })
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Level::Avx2;
        }
    }
    Level::Portable
}

/// `sum_i a[i] * b[i]`.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the feature was detected; lengths are equal.
        Level::Avx512 => return unsafe { x86::dot_avx512(a, b) },
        Level::Avx2 => return unsafe { x86::dot_avx2(a, b) },
        Level::Portable => {}
    }
    dot_portable(a, b)
}

pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums (plain mul + add: `mul_add` without hardware FMA is a libm call).
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y[i] += alpha * x[i]`.
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 {
        // SAFETY: the feature was detected; lengths are equal.
        return unsafe { x86::axpy_avx512(alpha, x, y) };
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// In place `x[i] = exp(x[i] - shift)`; returns the sum of the results.
#[inline]
pub fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 {
        // SAFETY: the feature was detected.
        return unsafe { x86::exp_shift_sum_avx512(x, shift) };
    }
    let mut s = 0f32;
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
        s += *v;
    }
    s
}

/// Largest element (`-inf` for an empty slice).
#[inline]
pub fn max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 {
        // SAFETY: the feature was detected.
        return unsafe { x86::max_avx512(x) };
    }
    x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `x[i] *= s`.
#[inline]
pub fn scale(x: &mut [f32], s: f32) {
    for v in x.iter_mut() {
        *v *= s;
    }
}

/// `out[i] = w[i] * (x[i] * s)` (the RMSNorm output, in transformers' order of operations).
#[inline]
pub fn scale_mul(x: &[f32], s: f32, w: &[f32], out: &mut [f32]) {
    assert!(
        x.len() == w.len() && w.len() == out.len(),
        "scale_mul: lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 {
        // SAFETY: the feature was detected; lengths are equal.
        return unsafe { x86::scale_mul_avx512(x, s, w, out) };
    }
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = wi * (xi * s);
    }
}

/// `out[i] = silu(gate[i]) * up[i]`, `silu(g) = g / (1 + exp(-g))`.
#[inline]
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 {
        // SAFETY: the feature was detected; lengths are equal.
        return unsafe { x86::swiglu_avx512(gate, up, out) };
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// The wide kernels. Every function here requires the instruction set named in its
/// `target_feature` attribute to be present (see [`level`]).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::missing_safety_doc)]
pub mod x86 {
    use std::arch::x86_64::*;

    /// Mask with the low `n` (< 16) lanes set.
    #[inline(always)]
    pub fn tail_mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (j, s) in acc.iter_mut().enumerate() {
                *s = _mm512_fmadd_ps(
                    _mm512_loadu_ps(pa.add(i + 16 * j)),
                    _mm512_loadu_ps(pb.add(i + 16 * j)),
                    *s,
                );
            }
            i += 64;
        }
        while i + 16 <= n {
            acc[0] = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i)),
                _mm512_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            acc[1] = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(m, pa.add(i)),
                _mm512_maskz_loadu_ps(m, pb.add(i)),
                acc[1],
            );
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, s) in acc.iter_mut().enumerate() {
                *s = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8 * j)),
                    _mm256_loadu_ps(pb.add(i + 8 * j)),
                    *s,
                );
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        let mut tail = 0f32;
        while i < n {
            tail += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        lanes.iter().sum::<f32>() + tail
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy_avx512(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let a = _mm512_set1_ps(alpha);
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        while i + 16 <= n {
            let v = _mm512_fmadd_ps(a, _mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(py.add(i)));
            _mm512_storeu_ps(py.add(i), v);
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            let v = _mm512_fmadd_ps(
                a,
                _mm512_maskz_loadu_ps(m, px.add(i)),
                _mm512_maskz_loadu_ps(m, py.add(i)),
            );
            _mm512_mask_storeu_ps(py.add(i), m, v);
        }
    }

    /// exp(x) for 16 lanes: n = round(x log2 e), r = x - n ln 2 (two-part constant),
    /// Cephes' degree-5 polynomial for exp(r) on [-ln2/2, ln2/2], then 2^n by `vscalefps`
    /// (which handles the overflow to inf and the underflow to 0 itself).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp512(x: __m512) -> __m512 {
        // Below -104 the result is 0 in f32 (and -inf must not produce NaN through r).
        let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
        let x = _mm512_min_ps(x, _mm512_set1_ps(89.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
        let r2 = _mm512_mul_ps(r, r);
        let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
        _mm512_scalef_ps(y, n)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shift_sum_avx512(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let sh = _mm512_set1_ps(shift);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), sh));
            _mm512_storeu_ps(p.add(i), e);
            acc = _mm512_add_ps(acc, e);
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), sh));
            let e = _mm512_maskz_mov_ps(m, e);
            _mm512_mask_storeu_ps(p.add(i), m, e);
            acc = _mm512_add_ps(acc, e);
        }
        _mm512_reduce_add_ps(acc)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn scale_mul_avx512(x: &[f32], s: f32, w: &[f32], out: &mut [f32]) {
        let n = x.len();
        let (px, pw, po) = (x.as_ptr(), w.as_ptr(), out.as_mut_ptr());
        let sv = _mm512_set1_ps(s);
        let mut i = 0;
        while i + 16 <= n {
            let v = _mm512_mul_ps(
                _mm512_loadu_ps(pw.add(i)),
                _mm512_mul_ps(_mm512_loadu_ps(px.add(i)), sv),
            );
            _mm512_storeu_ps(po.add(i), v);
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            let v = _mm512_mul_ps(
                _mm512_maskz_loadu_ps(m, pw.add(i)),
                _mm512_mul_ps(_mm512_maskz_loadu_ps(m, px.add(i)), sv),
            );
            _mm512_mask_storeu_ps(po.add(i), m, v);
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn max_avx512(x: &[f32]) -> f32 {
        let n = x.len();
        let p = x.as_ptr();
        let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 16 <= n {
            acc = _mm512_max_ps(acc, _mm512_loadu_ps(p.add(i)));
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            acc = _mm512_mask_max_ps(acc, m, acc, _mm512_maskz_loadu_ps(m, p.add(i)));
        }
        _mm512_reduce_max_ps(acc)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn swiglu_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = gate.len();
        let (pg, pu, po) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
        let one = _mm512_set1_ps(1.0);
        let f = |g: __m512, u: __m512| {
            let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
            _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u)
        };
        let mut i = 0;
        while i + 16 <= n {
            let v = f(_mm512_loadu_ps(pg.add(i)), _mm512_loadu_ps(pu.add(i)));
            _mm512_storeu_ps(po.add(i), v);
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            let v = f(
                _mm512_maskz_loadu_ps(m, pg.add(i)),
                _mm512_maskz_loadu_ps(m, pu.add(i)),
            );
            _mm512_mask_storeu_ps(po.add(i), m, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut xs: Vec<f32> = (-2000..1600).map(|i| i as f32 * 0.05).collect();
        xs.extend([f32::NEG_INFINITY, -104.5, -87.0, 0.0, -0.0, 1e-8]);
        let mut got = xs.clone();
        let s = exp_shift_sum(&mut got, 0.0);
        let mut want_sum = 0f64;
        for (&x, &g) in xs.iter().zip(&got) {
            let w = x.exp();
            if w.is_infinite() {
                assert_eq!(g, w, "exp({x})");
                continue;
            }
            want_sum += w as f64;
            let tol = 4.0 * f32::EPSILON * w.abs() + 1e-37;
            assert!((g - w).abs() <= tol, "exp({x}) = {g}, want {w}");
        }
        assert!(((s as f64 - want_sum) / want_sum).abs() < 1e-5);
        let mut big = [88.0f32, 88.7, 88.75, 100.0, f32::INFINITY];
        let want = big.map(f32::exp);
        exp_shift_sum(&mut big, 0.0);
        for (g, w) in big.iter().zip(want) {
            assert!(
                *g == w || (g - w).abs() <= 4.0 * f32::EPSILON * w,
                "{g} vs {w}"
            );
        }
    }

    #[test]
    fn dot_axpy_swiglu_match_scalar() {
        for n in [0usize, 1, 7, 15, 16, 17, 63, 64, 65, 200, 577] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.03)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.02)
                .collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let got = dot(&a, &b) as f64;
            assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "n={n}");

            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() <= 1e-6);
            }
            let mut out = vec![f32::NAN; n];
            swiglu(&a, &b, &mut out);
            for i in 0..n {
                let w = a[i] / (1.0 + (-a[i]).exp()) * b[i];
                assert!(
                    (out[i] - w).abs() <= 1e-6 * (1.0 + w.abs()),
                    "swiglu n={n} i={i}"
                );
            }
            let m = max(&a);
            assert_eq!(m, a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)));
        }
    }
}
