//! Launcher of kernels/embedding.cu (CPU twin: backend/cpu/embedding.rs).

use super::device::{int, Arg, CudaBackend, CudaBuf, DType};
use cudarc::driver::LaunchConfig;

impl CudaBackend {
    /// `out[r] = table[ids[r]]`, rows of width `dim`; table and out may differ in dtype.
    pub(super) fn embedding_impl(
        &self,
        table: &CudaBuf,
        ids: &[u32],
        dim: usize,
        out: &mut CudaBuf,
    ) {
        assert!(dim > 0, "embedding: dim is 0");
        assert_eq!(table.len % dim, 0, "embedding: table is not rows of {dim}");
        assert_eq!(
            out.len,
            ids.len() * dim,
            "embedding: out has the wrong size"
        );
        let vocab = table.len / dim;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            panic!("embedding: token id {bad} >= vocab {vocab}");
        }
        if ids.is_empty() {
            return;
        }
        let name = match (table.dtype.suffix(), out.dtype.suffix()) {
            (a, b) if a == b => format!("embedding_{a}"),
            (a, b) => format!("embedding_{a}_{b}"),
        };
        // A replayed decode step's token is the one its previous step chose, on the device.
        let step_token = self.step_token(ids.len());
        let ids_dev = (step_token == 0).then(|| self.upload_u32(ids));
        let dim_i = int(dim, "embedding dim");
        let cfg = LaunchConfig {
            grid_dim: (int(ids.len(), "embedding rows") as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = [
            Arg::In(table),
            match &ids_dev {
                Some(d) => Arg::U32(d),
                None => Arg::Ptr(step_token),
            },
            Arg::I32(dim_i),
            Arg::Out(out),
        ];
        // SAFETY: embedding_*(const TIN* table, const u32* ids, int dim, TOUT* out): sizes checked
        // above, ids checked against the vocabulary (a step's token: chosen by argmax or top-p
        // over the vocabulary's logits).
        unsafe { self.launch(&name, cfg, &mut args) };
    }

    /// Backward of `embedding`: `dtable[ids[r]] += dout[r]` (atomic f32 adds, so repeated ids
    /// add up in an unspecified order). `dtable` must be an f32 buffer.
    pub fn embedding_bwd(&self, dout: &CudaBuf, ids: &[u32], dim: usize, dtable: &mut CudaBuf) {
        assert!(dim > 0, "embedding_bwd: dim is 0");
        assert_eq!(
            dtable.dtype,
            DType::F32,
            "embedding_bwd: dtable must be f32 (atomic adds)"
        );
        assert_eq!(
            dtable.len % dim,
            0,
            "embedding_bwd: dtable is not rows of {dim}"
        );
        assert_eq!(
            dout.len,
            ids.len() * dim,
            "embedding_bwd: dout has the wrong size"
        );
        let vocab = dtable.len / dim;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            panic!("embedding_bwd: token id {bad} >= vocab {vocab}");
        }
        if ids.is_empty() {
            return;
        }
        let name = format!("embedding_bwd_{}", dout.dtype.suffix());
        let ids_dev = self.upload_u32(ids);
        let cfg = LaunchConfig {
            grid_dim: (int(ids.len(), "embedding_bwd rows") as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = [
            Arg::In(dout),
            Arg::U32(&ids_dev),
            Arg::I32(int(dim, "embedding_bwd dim")),
            Arg::Out(dtable),
        ];
        // SAFETY: embedding_bwd_T(const T* dout, const u32* ids, int dim, float* dtable): sizes
        // and ids checked above, dtable is f32.
        unsafe { self.launch(&name, cfg, &mut args) };
    }
}
