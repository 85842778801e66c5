//! Embedding gather (CPU reference of kernels/embedding.cu).

/// `out[r] = table[ids[r]]`; ids are checked by the caller against the vocabulary.
pub fn embedding_fwd(table: &[f32], ids: &[u32], dim: usize, out: &mut [f32]) {
    assert_eq!(
        out.len(),
        ids.len() * dim,
        "embedding: out has the wrong size"
    );
    let vocab = table.len() / dim;
    for (row, &id) in out.chunks_exact_mut(dim).zip(ids) {
        assert!(
            (id as usize) < vocab,
            "embedding: token id {id} >= vocab {vocab}"
        );
        let id = id as usize;
        row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    }
}

/// Backward of [`embedding_fwd`]: `dtable[ids[r]] += dout[r]` (repeated ids add up).
pub fn embedding_bwd(dout: &[f32], ids: &[u32], dim: usize, dtable: &mut [f32]) {
    assert_eq!(
        dout.len(),
        ids.len() * dim,
        "embedding_bwd: dout has the wrong size"
    );
    let vocab = dtable.len() / dim;
    for (row, &id) in dout.chunks_exact(dim).zip(ids) {
        assert!(
            (id as usize) < vocab,
            "embedding_bwd: token id {id} >= vocab {vocab}"
        );
        let id = id as usize;
        for (d, g) in dtable[id * dim..(id + 1) * dim].iter_mut().zip(row) {
            *d += g;
        }
    }
}
