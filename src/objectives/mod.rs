//! The safety objectives (definitions: OBJECTIVES.md): value and gradient with respect to the
//! captured representations and logits. This is the f64 CPU reference; the trainer converts
//! its f32 captures in and the gradients out, and the CUDA kernels are checked against it.
//!
//! Representations of one set (benign, harmful, retain ...) are laid out `[n_idx, batch, seq, dim]`
//! for the hidden-state indices the objective needs, with a token mask `[batch, seq]` (1/0).

pub mod ce;
pub mod circuit_breaker;
pub mod distance;
pub mod kl;
pub mod repbend;
pub mod triplet;

pub use distance::Distance;

/// Representations of one set at several hidden-state indices: `[n_idx, batch, seq, dim]`.
#[derive(Debug, Clone, Copy)]
pub struct Reps<'a> {
    pub data: &'a [f64],
    /// The hidden-state index (transformers' `output_hidden_states` numbering) of each slab.
    pub indices: &'a [usize],
    pub batch: usize,
    pub seq: usize,
    pub dim: usize,
}

impl<'a> Reps<'a> {
    pub fn new(
        data: &'a [f64],
        indices: &'a [usize],
        batch: usize,
        seq: usize,
        dim: usize,
    ) -> Self {
        assert_eq!(
            data.len(),
            indices.len() * batch * seq * dim,
            "Reps: data is not [n_idx, batch, seq, dim]"
        );
        Self {
            data,
            indices,
            batch,
            seq,
            dim,
        }
    }
    pub fn slab_len(&self) -> usize {
        self.batch * self.seq * self.dim
    }
    /// Position of hidden-state index `l` among this set's slabs.
    pub fn slot(&self, l: usize) -> usize {
        self.indices
            .iter()
            .position(|&i| i == l)
            .unwrap_or_else(|| {
                panic!(
                    "hidden-state index {l} was not captured (have {:?})",
                    self.indices
                )
            })
    }
    /// The vector of index `l`, sequence `b`, token `t`.
    pub fn row(&self, l: usize, b: usize, t: usize) -> &'a [f64] {
        let off = self.slot(l) * self.slab_len() + (b * self.seq + t) * self.dim;
        &self.data[off..off + self.dim]
    }
    pub fn row_offset(&self, l: usize, b: usize, t: usize) -> usize {
        self.slot(l) * self.slab_len() + (b * self.seq + t) * self.dim
    }
}

/// Sum of a token mask.
pub fn mask_sum(mask: &[f64]) -> f64 {
    mask.iter().sum()
}
