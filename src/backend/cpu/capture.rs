//! Row gather for residual-stream capture and last-token selection
//! (CPU reference of kernels/capture.cu).

/// `dst[dst_row + i] = src[src_rows[i]]`, rows of width `dim`.
pub fn gather_rows(src: &[f32], src_rows: &[u32], dim: usize, dst: &mut [f32], dst_row: usize) {
    assert!(
        (dst_row + src_rows.len()) * dim <= dst.len(),
        "gather_rows: destination too small"
    );
    for (i, &r) in src_rows.iter().enumerate() {
        let r = r as usize;
        assert!(
            (r + 1) * dim <= src.len(),
            "gather_rows: source row {r} out of range"
        );
        let d = (dst_row + i) * dim;
        dst[d..d + dim].copy_from_slice(&src[r * dim..(r + 1) * dim]);
    }
}
