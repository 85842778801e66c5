//! RMSNorm, plain and fused with the residual add (CPU reference of kernels/rmsnorm.cu).
//! Statistics in f64-free f32 with a wide accumulator, like transformers' float32 path.

use rayon::prelude::*;

fn norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f32 = super::dot(x, x);
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    super::simd::scale_mul(x, inv, w, out);
}

/// `out = x / sqrt(mean(x^2) + eps) * w`, per row of width `dim`.
pub fn rmsnorm_fwd(x: &[f32], w: &[f32], dim: usize, eps: f32, out: &mut [f32]) {
    assert_eq!(w.len(), dim, "rmsnorm: weight length");
    assert_eq!(x.len(), out.len(), "rmsnorm: in/out sizes");
    if x.len() <= SERIAL_MAX {
        out.chunks_mut(dim)
            .zip(x.chunks(dim))
            .for_each(|(o, xr)| norm_row(xr, w, eps, o));
        return;
    }
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(o, xr)| norm_row(xr, w, eps, o));
}

/// Up to this many values a call stays on the calling thread (a decode step's single row is
/// cheaper than waking the pool).
const SERIAL_MAX: usize = 1 << 13;
/// Rows per parallel task (one row is far too little work to schedule).
const ROWS_PER_TASK: usize = 16;

/// `residual += delta; out = rmsnorm(residual) * w`.
pub fn add_rmsnorm_fwd(
    residual: &mut [f32],
    delta: &[f32],
    w: &[f32],
    dim: usize,
    eps: f32,
    out: &mut [f32],
) {
    assert_eq!(
        residual.len(),
        delta.len(),
        "add_rmsnorm: residual/delta sizes"
    );
    assert_eq!(residual.len(), out.len(), "add_rmsnorm: in/out sizes");
    let one = |r: &mut [f32], d: &[f32], o: &mut [f32]| {
        for (ri, di) in r.iter_mut().zip(d) {
            *ri += di;
        }
        norm_row(r, w, eps, o);
    };
    if residual.len() <= SERIAL_MAX {
        residual
            .chunks_mut(dim)
            .zip(delta.chunks(dim))
            .zip(out.chunks_mut(dim))
            .for_each(|((r, d), o)| one(r, d, o));
        return;
    }
    residual
        .par_chunks_mut(dim)
        .zip(delta.par_chunks(dim))
        .zip(out.par_chunks_mut(dim))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((r, d), o)| one(r, d, o));
}

/// Backward of `y = rmsnorm(x) * w` with respect to `x` (the weights are frozen):
/// `dx (+)= r * (w*dy) - x * r^3 / n * sum(w*dy*x)`, `r = 1/sqrt(mean(x^2) + eps)`.
pub fn rmsnorm_bwd(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dim: usize,
    eps: f32,
    dx: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(w.len(), dim, "rmsnorm_bwd: weight length");
    assert!(
        x.len() == dy.len() && x.len() == dx.len(),
        "rmsnorm_bwd: sizes differ"
    );
    dx.par_chunks_mut(dim)
        .zip(x.par_chunks(dim).zip(dy.par_chunks(dim)))
        .for_each(|(d, (xr, dyr))| {
            let n = dim as f32;
            let r = 1.0 / (super::dot(xr, xr) / n + eps).sqrt();
            let mut s = 0f32;
            for i in 0..dim {
                s += w[i] * dyr[i] * xr[i];
            }
            let c = r * r * r * s / n;
            for i in 0..dim {
                let g = r * w[i] * dyr[i] - xr[i] * c;
                d[i] = if accumulate { d[i] + g } else { g };
            }
        });
}
