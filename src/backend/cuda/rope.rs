//! Launcher of kernels/rope.cu (CPU twin: backend/cpu/rope.rs).

use super::device::{int, Arg, CudaBackend, CudaBuf};
use crate::backend::AttnShape;
use cudarc::driver::LaunchConfig;

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope_impl(
        &self,
        x: &mut CudaBuf,
        batch: usize,
        seq_len: usize,
        n_heads: usize,
        head_dim: usize,
        start_pos: usize,
        inv_freq: &CudaBuf,
    ) {
        self.rope_launch(
            "rope", x, batch, seq_len, n_heads, head_dim, start_pos, inv_freq,
        )
    }

    /// Backward of [`Backend::rope`](crate::backend::Backend::rope) on the gradient `dx`, in
    /// place: the inverse rotation (CPU twin: `cpu::rope::rope_bwd`).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_bwd(
        &self,
        dx: &mut CudaBuf,
        batch: usize,
        seq_len: usize,
        n_heads: usize,
        head_dim: usize,
        start_pos: usize,
        inv_freq: &CudaBuf,
    ) {
        self.rope_launch(
            "rope_bwd", dx, batch, seq_len, n_heads, head_dim, start_pos, inv_freq,
        )
    }

    /// `Backend::rope_kv_store` in one launch of `rope_kv_store_T`: q and k rotated in place,
    /// the rotated k and v written into the caches at `shape.start_pos`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope_kv_store_impl(
        &self,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: &CudaBuf,
        k_cache: &mut CudaBuf,
        v_cache: &mut CudaBuf,
        s: AttnShape,
        inv_freq: &CudaBuf,
    ) {
        Self::check_kv_store("rope_kv_store", k, v, k_cache, v_cache, s);
        let (rows, hd) = (s.batch * s.q_len, s.head_dim);
        assert_eq!(hd % 2, 0, "rope_kv_store: head_dim {hd} is odd");
        assert_eq!(q.len, rows * s.q_dim(), "rope_kv_store: q size");
        assert_eq!(q.dtype, k.dtype, "rope_kv_store: q and k dtypes differ");
        assert_eq!(inv_freq.len, hd / 2, "rope_kv_store: inv_freq size");
        let dtype = q.dtype;
        let work = rows * hd / 2;
        if work == 0 {
            return;
        }
        let cfg = LaunchConfig {
            grid_dim: (int(work.div_ceil(256), "rope blocks") as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let inv_f32 = inv_freq.dtype.flag();
        let mut args = [
            Arg::Out(q),
            Arg::Out(k),
            Arg::In(v),
            Arg::Out(k_cache),
            Arg::Out(v_cache),
            Arg::I64(rows as i64),
            Arg::I32(int(s.q_len, "rope seq_len")),
            Arg::I32(int(s.n_heads, "rope n_heads")),
            Arg::I32(int(s.n_kv_heads, "rope n_kv_heads")),
            Arg::I32(int(hd, "rope head_dim")),
            Arg::I32(int(s.start_pos + s.q_len, "rope position") - s.q_len as i32),
            Arg::Ptr(self.step_pos(s)),
            Arg::I32(int(s.capacity, "capacity")),
            Arg::In(inv_freq),
            Arg::I32(inv_f32),
        ];
        let name = format!("rope_kv_store_{}", dtype.suffix());
        // SAFETY: rope_kv_store_T(T* q, T* k, const T* v, T* k_cache, T* v_cache, long long rows,
        // int seq_len, int n_heads, int n_kv_heads, int head_dim, int start_pos, const u32*
        // pos_dev, int capacity, const void* inv_freq, int); sizes and dtypes checked above,
        // s.check() bounds the positions by the capacity (a replayed step's position: by its
        // driver, `llama::generate`).
        unsafe { self.launch(&name, cfg, &mut args) };
    }

    #[allow(clippy::too_many_arguments)]
    fn rope_launch(
        &self,
        op: &str,
        x: &mut CudaBuf,
        batch: usize,
        seq_len: usize,
        n_heads: usize,
        head_dim: usize,
        start_pos: usize,
        inv_freq: &CudaBuf,
    ) {
        assert_eq!(head_dim % 2, 0, "rope: head_dim {head_dim} is odd");
        assert_eq!(x.len, batch * seq_len * n_heads * head_dim, "rope: x size");
        assert_eq!(
            inv_freq.len,
            head_dim / 2,
            "rope: inv_freq must have head_dim/2 entries"
        );
        let rows = batch * seq_len;
        let work = rows * head_dim / 2;
        if work == 0 {
            return;
        }
        let name = format!("{op}_{}", x.dtype.suffix());
        let rows_i = rows as i64;
        let (seq_i, heads_i, hd_i) = (
            int(seq_len, "rope seq_len"),
            int(n_heads, "rope n_heads"),
            int(head_dim, "rope head_dim"),
        );
        let start_i = int(start_pos + seq_len, "rope position") - seq_i;
        let inv_f32 = inv_freq.dtype.flag();
        let cfg = LaunchConfig {
            grid_dim: (int(work.div_ceil(256), "rope blocks") as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = [
            Arg::Out(x),
            Arg::I64(rows_i),
            Arg::I32(seq_i),
            Arg::I32(heads_i),
            Arg::I32(hd_i),
            Arg::I32(start_i),
            Arg::In(inv_freq),
            Arg::I32(inv_f32),
        ];
        // SAFETY: rope_T / rope_bwd_T(T* x, long long rows, int seq_len, int n_heads, int head_dim,
        // int start_pos, const void* inv_freq, int); sizes checked above.
        unsafe { self.launch(&name, cfg, &mut args) };
    }
}
