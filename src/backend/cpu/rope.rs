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
    TABLE.with(|cell| {
        let mut table = cell.borrow_mut();
        table.fill(inv_freq, start_pos, seq_len);
        let table = &*table;
        let apply = |r: usize, xr: &mut [f32]| {
            let t = r % seq_len;
            let cos = &table.cos[t * half..(t + 1) * half];
            let sin = &table.sin[t * half..(t + 1) * half];
            for h in xr.chunks_exact_mut(head_dim) {
                let (lo, hi) = h.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * cos[i] - b * sin[i];
                    hi[i] = b * cos[i] + a * sin[i];
                }
            }
        };
        if x.len() < 1 << 14 {
            x.chunks_mut(row)
                .enumerate()
                .for_each(|(r, xr)| apply(r, xr));
        } else {
            x.par_chunks_mut(row)
                .enumerate()
                .with_min_len(16)
                .for_each(|(r, xr)| apply(r, xr));
        }
    });
}

/// cos/sin of `inv_freq[i] * pos` for a run of positions. Kept per thread and reused while the
/// frequencies and positions repeat (q and k of every layer of one forward call share it).
#[derive(Default)]
struct AngleTable {
    inv_freq: Vec<f32>,
    start: usize,
    len: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl AngleTable {
    fn fill(&mut self, inv_freq: &[f32], start: usize, len: usize) {
        if self.inv_freq == inv_freq && self.start == start && self.len == len {
            return;
        }
        let half = inv_freq.len();
        self.cos.clear();
        self.sin.clear();
        for t in 0..len {
            let pos = (start + t) as f32;
            for &f in inv_freq {
                let a = f * pos;
                self.cos.push(a.cos());
                self.sin.push(a.sin());
            }
        }
        debug_assert_eq!(self.cos.len(), len * half);
        self.inv_freq.clear();
        self.inv_freq.extend_from_slice(inv_freq);
        self.start = start;
        self.len = len;
    }
}

thread_local! {
    static TABLE: std::cell::RefCell<AngleTable> = std::cell::RefCell::new(AngleTable::default());
}

/// Backward of [`rope_fwd`] on the gradient, in place: the rotation by the opposite angle (the
/// transpose of the forward's rotation), i.e. the forward with `inv_freq` negated.
pub fn rope_bwd(
    dx: &mut [f32],
    seq_len: usize,
    n_heads: usize,
    head_dim: usize,
    start_pos: usize,
    inv_freq: &[f32],
) {
    let neg: Vec<f32> = inv_freq.iter().map(|f| -f).collect();
    rope_fwd(dx, seq_len, n_heads, head_dim, start_pos, &neg)
}
