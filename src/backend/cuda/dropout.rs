//! Launcher of kernels/dropout.cu (CPU twin: backend/cpu/dropout.rs).

use super::device::{Arg, CudaBackend, CudaBuf};
use super::swiglu::elementwise_config;
use crate::backend::dropout_mask::{dropout_scale, dropout_threshold};

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
        let cfg = elementwise_config(self, out.len, out.dtype.size());
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
