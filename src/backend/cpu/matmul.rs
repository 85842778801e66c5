//! Projection GEMM `out = (acc ? out : 0) + scale * x W^T` (CPU reference of kernels/matmul.cu).
//! Large `m` goes to the `gemm` crate's blocked AVX kernels; small `m` (decode) is a
//! memory-bound matrix-vector product over rows of `W`, parallel over output features.

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
    // Parallel over blocks of output features; every thread streams its slice of W once and
    // serves all m rows of x from cache.
    const BLOCK: usize = 64;
    let mut partial = vec![0f32; m * n];
    partial
        .par_chunks_mut(BLOCK * m)
        .enumerate()
        .for_each(|(blk, p)| {
            let j0 = blk * BLOCK;
            let nb = p.len() / m;
            for jj in 0..nb {
                let wr = &w[(j0 + jj) * k..(j0 + jj + 1) * k];
                for i in 0..m {
                    p[jj * m + i] = super::dot(&x[i * k..(i + 1) * k], wr);
                }
            }
        });
    for i in 0..m {
        for j in 0..n {
            let v = scale * partial[j * m + i];
            let o = &mut out[i * n + j];
            *o = if accumulate { *o + v } else { v };
        }
    }
}
