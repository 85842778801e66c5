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
