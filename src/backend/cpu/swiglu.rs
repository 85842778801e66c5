//! SwiGLU activation (CPU reference of kernels/swiglu.cu).

use rayon::prelude::*;

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `out = silu(gate) * up`.
pub fn swiglu_fwd(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(
        gate.len() == up.len() && up.len() == out.len(),
        "swiglu: sizes differ"
    );
    out.par_chunks_mut(4096)
        .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
        .for_each(|(o, (g, u))| {
            for ((oi, &gi), &ui) in o.iter_mut().zip(g).zip(u) {
                *oi = silu(gi) * ui;
            }
        });
}
