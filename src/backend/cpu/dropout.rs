//! Counter-based inverted dropout (CPU reference of kernels/dropout.cu).

use crate::backend::dropout_mask::{dropout_scale, dropout_threshold, keep};
use rayon::prelude::*;

/// `out = x * keep / (1 - p)`, element `i` kept per [`keep`]`(seed, i, ..)`.
pub fn dropout_fwd(x: &[f32], out: &mut [f32], p: f32, seed: u64) {
    assert_eq!(x.len(), out.len(), "dropout: sizes differ");
    let (threshold, scale) = (dropout_threshold(p), dropout_scale(p));
    const CHUNK: usize = 4096;
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (o, x))| {
            let base = (c * CHUNK) as u64;
            for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                *o = if keep(seed, base + j as u64, threshold) {
                    x * scale
                } else {
                    0.0
                };
            }
        });
}
