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
    if out.len() <= 4096 {
        return super::simd::swiglu(gate, up, out);
    }
    out.par_chunks_mut(4096)
        .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
        .for_each(|(o, (g, u))| super::simd::swiglu(g, u, o));
}

/// Backward of `out = silu(gate) * up`: `dgate = dout * up * silu'(gate)`, `dup = dout * silu(gate)`.
pub fn swiglu_bwd(gate: &[f32], up: &[f32], dout: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    let n = gate.len();
    assert!(
        up.len() == n && dout.len() == n && dgate.len() == n && dup.len() == n,
        "swiglu_bwd: sizes differ"
    );
    dgate
        .par_chunks_mut(4096)
        .zip(dup.par_chunks_mut(4096))
        .enumerate()
        .for_each(|(c, (dg, du))| {
            let o = c * 4096;
            for i in 0..dg.len() {
                let (g, u, d) = (gate[o + i], up[o + i], dout[o + i]);
                let s = 1.0 / (1.0 + (-g).exp());
                dg[i] = d * u * s * (1.0 + g * (1.0 - s));
                du[i] = d * g * s;
            }
        });
}
