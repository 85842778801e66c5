//! CPU twin of kernels/rows.cu: per-row statistics and row combinations for the representation
//! objectives (see the kernel file for the contract).

use rayon::prelude::*;

/// `(|a|^2, |b|^2, a.b, |a - b|^2)` per row, `a = scale_r x_r`, `b = scale_r y_r` (or `b = y`
/// for every row when `y_vec`), summed in f64.
pub fn row_stats(
    x: &[f32],
    y: &[f32],
    y_vec: bool,
    scale: Option<&[f32]>,
    dim: usize,
) -> Vec<[f64; 4]> {
    assert!(
        dim > 0 && x.len().is_multiple_of(dim),
        "row_stats: x is not rows of {dim}"
    );
    let rows = x.len() / dim;
    assert_eq!(
        y.len(),
        if y_vec { dim } else { x.len() },
        "row_stats: y size"
    );
    if let Some(s) = scale {
        assert_eq!(s.len(), rows, "row_stats: scale size");
    }
    x.par_chunks_exact(dim)
        .enumerate()
        .map(|(r, xr)| {
            let s = scale.map_or(1.0, |s| s[r]);
            let (sy, yr) = if y_vec {
                (1.0, y)
            } else {
                (s, &y[r * dim..(r + 1) * dim])
            };
            let mut st = [0f64; 4];
            for (&xv, &yv) in xr.iter().zip(yr) {
                let (a, b) = ((s * xv) as f64, (sy * yv) as f64);
                st[0] += a * a;
                st[1] += b * b;
                st[2] += a * b;
                st[3] += (a - b) * (a - b);
            }
            st
        })
        .collect()
}

/// `out_r (=|+=) cx_r x_r + cy_r y_r + cv_r v`; a term is skipped when absent or when its
/// coefficient is 0 (f32 math, the kernel's order).
pub fn row_combine(
    out: &mut [f32],
    accumulate: bool,
    x: Option<(&[f32], &[f32])>,
    y: Option<(&[f32], &[f32])>,
    v: Option<(&[f32], &[f32])>,
    dim: usize,
) {
    assert!(
        dim > 0 && out.len().is_multiple_of(dim),
        "row_combine: out is not rows of {dim}"
    );
    let rows = out.len() / dim;
    for (t, c) in [x, y].iter().flatten() {
        assert!(
            t.len() == out.len() && c.len() == rows,
            "row_combine: row term size"
        );
    }
    if let Some((t, c)) = v {
        assert!(
            t.len() == dim && c.len() == rows,
            "row_combine: vector term size"
        );
    }
    out.par_chunks_exact_mut(dim)
        .enumerate()
        .for_each(|(r, o)| {
            let coef = |term: Option<(&[f32], &[f32])>| term.map_or(0.0, |(_, c)| c[r]);
            let (ax, ay, av) = (coef(x), coef(y), coef(v));
            for (c, oc) in o.iter_mut().enumerate() {
                let mut t = if accumulate { *oc } else { 0.0 };
                if ax != 0.0 {
                    t += ax * x.unwrap().0[r * dim + c];
                }
                if ay != 0.0 {
                    t += ay * y.unwrap().0[r * dim + c];
                }
                if av != 0.0 {
                    t += av * v.unwrap().0[c];
                }
                *oc = t;
            }
        });
}
