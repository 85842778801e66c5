//! Launcher of kernels/dropout.cu (CPU twin: backend/cpu/dropout.rs).

use super::device::{int, Arg, CudaBackend, CudaBuf};
use crate::backend::dropout_mask::{dropout_scale, dropout_threshold};
use cudarc::driver::LaunchConfig;

impl CudaBackend {
    pub(super) fn dropout_impl(&self, x: &CudaBuf, out: &mut CudaBuf, p: f32, seed: u64) {
        assert_eq!(x.len, out.len, "dropout: sizes differ");
        assert_eq!(x.dtype, out.dtype, "dropout: x and out must share a dtype");
        if out.len == 0 {
            return;
        }
        // Both derived on the host, once, so the kernel compares and scales exactly as the CPU.
        let (threshold, scale) = (dropout_threshold(p), dropout_scale(p));
        let name = format!("dropout_{}", out.dtype.suffix());
        let threads = 256;
        let per_thread = 16 / out.dtype.size();
        let blocks = out
            .len
            .div_ceil(per_thread * threads)
            .min(self.sm_count() * 8)
            .max(1);
        let cfg = LaunchConfig {
            grid_dim: (int(blocks, "dropout blocks") as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = [
            Arg::In(x),
            Arg::Out(out),
            Arg::I64(x.len as i64),
            // The kernel reads the same 64 bits as `unsigned long long`.
            Arg::I64(seed as i64),
            // At most 2^24: fits the kernel's `unsigned int` through an `int` slot.
            Arg::I32(threshold as i32),
            Arg::F32(scale),
        ];
        // SAFETY: dropout_T(const T* x, T* out, long long n, unsigned long long seed,
        // unsigned int threshold, float scale); sizes and dtypes checked above.
        unsafe { self.launch(&name, cfg, &mut args) };
    }
}
