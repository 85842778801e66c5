//! Launcher of kernels/swiglu.cu (CPU twin: backend/cpu/swiglu.rs).

use super::device::{int, Arg, CudaBackend, CudaBuf};
use cudarc::driver::LaunchConfig;

/// A few waves of 16-byte packs over `len` elements; the kernels grid-stride over the rest.
pub(super) fn elementwise_config(be: &CudaBackend, len: usize, elem_bytes: usize) -> LaunchConfig {
    let threads = 256;
    let per_thread = 16 / elem_bytes;
    let blocks = len
        .div_ceil(per_thread * threads)
        .min(be.sm_count() * 8)
        .max(1);
    LaunchConfig {
        grid_dim: (int(blocks, "elementwise blocks") as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

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
        let cfg = elementwise_config(self, out.len, out.dtype.size());
        let mut args = [Arg::In(gate), Arg::In(up), Arg::Out(out), Arg::I64(n)];
        // SAFETY: swiglu_T(const T* gate, const T* up, T* out, long long n); sizes checked above.
        unsafe { self.launch(&name, cfg, &mut args) };
    }

    pub(super) fn swiglu_bwd_impl(
        &self,
        gate: &CudaBuf,
        up: &CudaBuf,
        dout: &CudaBuf,
        dgate: &mut CudaBuf,
        dup: &mut CudaBuf,
    ) {
        let n = gate.len;
        assert!(
            up.len == n && dout.len == n && dgate.len == n && dup.len == n,
            "swiglu_bwd: sizes differ"
        );
        let dtype = gate.dtype;
        assert!(
            [up.dtype, dout.dtype, dgate.dtype, dup.dtype]
                .iter()
                .all(|&d| d == dtype),
            "swiglu_bwd: gate, up, dout, dgate and dup must share a dtype"
        );
        if n == 0 {
            return;
        }
        let name = format!("swiglu_bwd_{}", dtype.suffix());
        let cfg = elementwise_config(self, n, dtype.size());
        let mut args = [
            Arg::In(gate),
            Arg::In(up),
            Arg::In(dout),
            Arg::Out(dgate),
            Arg::Out(dup),
            Arg::I64(n as i64),
        ];
        // SAFETY: swiglu_bwd_T(const T* gate, const T* up, const T* dout, T* dgate, T* dup,
        // long long n); sizes checked above.
        unsafe { self.launch(&name, cfg, &mut args) };
    }
}
