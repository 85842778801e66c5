//! Launcher of kernels/capture.cu (CPU twin: backend/cpu/capture.rs).

use super::device::{int, Arg, CudaBackend, CudaBuf};
use cudarc::driver::LaunchConfig;

impl CudaBackend {
    /// `dst[dst_row + i] = src[src_rows[i]]`, rows of width `dim`; src and dst may differ in dtype.
    pub(super) fn gather_rows_impl(
        &self,
        src: &CudaBuf,
        src_rows: &[u32],
        dim: usize,
        dst: &mut CudaBuf,
        dst_row: usize,
    ) {
        assert!(dim > 0, "gather_rows: dim is 0");
        assert!(
            (dst_row + src_rows.len()) * dim <= dst.len,
            "gather_rows: destination too small"
        );
        let src_total = src.len / dim;
        if let Some(&bad) = src_rows.iter().find(|&&r| r as usize >= src_total) {
            panic!("gather_rows: source row {bad} out of range ({src_total} rows)");
        }
        if src_rows.is_empty() {
            return;
        }
        let name = match (src.dtype.suffix(), dst.dtype.suffix()) {
            (a, b) if a == b => format!("gather_rows_{a}"),
            (a, b) => format!("gather_rows_{a}_{b}"),
        };
        let rows_dev = self.upload_u32(src_rows);
        let dim_i = int(dim, "gather_rows dim");
        let dst_row_i = dst_row as i64;
        let cfg = LaunchConfig {
            grid_dim: (int(src_rows.len(), "gather_rows rows") as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = [
            Arg::In(src),
            Arg::U32(&rows_dev),
            Arg::I32(dim_i),
            Arg::Out(dst),
            Arg::I64(dst_row_i),
        ];
        // SAFETY: gather_rows_*(const TIN*, const u32*, int, TOUT*, long long): every source row
        // and the destination range were checked above.
        unsafe { self.launch(&name, cfg, &mut args) };
    }
}
