//! Launcher of kernels/swiglu.cu (CPU twin: backend/cpu/swiglu.rs).

use super::device::{int, Arg, CudaBackend, CudaBuf};
use cudarc::driver::LaunchConfig;

impl CudaBackend {
    pub(super) fn swiglu_impl(&self, gate: &CudaBuf, up: &CudaBuf, out: &mut CudaBuf) {
        assert!(
            gate.len == up.len && up.len == out.len,
            "swiglu: sizes differ"
        );
        assert!(
            gate.dtype == up.dtype && up.dtype == out.dtype,
            "swiglu: gate, up and out must share a dtype"
        );
        if out.len == 0 {
            return;
        }
        let name = format!("swiglu_{}", out.dtype.suffix());
        let n = out.len as i64;
        let threads = 256;
        // A few waves of packs; the kernel strides over the rest.
        let per_thread = 16 / out.dtype.size();
        let blocks = out
            .len
            .div_ceil(per_thread * threads)
            .min(self.sm_count() * 8)
            .max(1);
        let cfg = LaunchConfig {
            grid_dim: (int(blocks, "swiglu blocks") as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = [Arg::In(gate), Arg::In(up), Arg::Out(out), Arg::I64(n)];
        // SAFETY: swiglu_T(const T* gate, const T* up, T* out, long long n); sizes checked above.
        unsafe { self.launch(&name, cfg, &mut args) };
    }
}
