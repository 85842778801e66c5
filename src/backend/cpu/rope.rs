//! Rotary position embedding, rotate-half convention (CPU reference of kernels/rope.cu).

use rayon::prelude::*;

/// In place on `[batch * seq_len, n_heads * head_dim]`; token `t` sits at `start_pos + t`.
/// Angles are computed as transformers does: `f32(inv_freq) * f32(pos)`, then cos/sin.
pub fn rope_fwd(
    x: &mut [f32],
    seq_len: usize,
    n_heads: usize,
    head_dim: usize,
    start_pos: usize,
    inv_freq: &[f32],
) {
    let half = head_dim / 2;
    assert_eq!(
        inv_freq.len(),
        half,
        "rope: inv_freq must have head_dim/2 entries"
    );
    let row = n_heads * head_dim;
    assert_eq!(x.len() % row, 0, "rope: x is not a whole number of rows");
    x.par_chunks_mut(row).enumerate().for_each(|(r, xr)| {
        let pos = (start_pos + r % seq_len) as f32;
        let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
        for i in 0..half {
            let a = inv_freq[i] * pos;
            cos[i] = a.cos();
            sin[i] = a.sin();
        }
        for h in xr.chunks_exact_mut(head_dim) {
            let (lo, hi) = h.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * cos[i] - b * sin[i];
                hi[i] = b * cos[i] + a * sin[i];
            }
        }
    });
}
