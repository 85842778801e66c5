//! Launcher of kernels/rmsnorm.cu (CPU twin: backend/cpu/rmsnorm.rs).

use super::device::{int, Arg, CudaBackend, CudaBuf, DType};
use cudarc::driver::LaunchConfig;

/// One block per row: enough threads for one 16-byte pack each, in whole warps, at most 256.
fn row_config(rows: usize, dim: usize) -> LaunchConfig {
    let threads = dim.div_ceil(8).next_multiple_of(32).clamp(32, 256) as u32;
    LaunchConfig {
        grid_dim: (int(rows, "rmsnorm rows") as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The entry point for a residual stream of `x` and a normed output of `out`: both bf16, both
/// f32, or an f32 stream normed into bf16 (`_f32_bf16`, the forward's residual stream).
fn entry_suffix(op: &str, x: DType, out: DType) -> &'static str {
    match (x, out) {
        (DType::BF16, DType::BF16) => "bf16",
        (DType::F32, DType::F32) => "f32",
        (DType::F32, DType::BF16) => "f32_bf16",
        (DType::BF16, DType::F32) => {
            panic!("{op}: a bf16 residual normed into f32 has no kernel (widen the residual)")
        }
    }
}

impl CudaBackend {
    pub(super) fn rmsnorm_impl(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        dim: usize,
        eps: f32,
        out: &mut CudaBuf,
    ) {
        assert!(dim > 0, "rmsnorm: dim is 0");
        assert_eq!(w.len, dim, "rmsnorm: weight length");
        assert_eq!(x.len, out.len, "rmsnorm: in/out sizes");
        assert_eq!(x.len % dim, 0, "rmsnorm: x is not rows of {dim}");
        let rows = x.len / dim;
        if rows == 0 {
            return;
        }
        let name = format!("rmsnorm_{}", entry_suffix("rmsnorm", x.dtype, out.dtype));
        let (w_f32, dim_i) = (w.dtype.flag(), int(dim, "rmsnorm dim"));
        let mut args = [
            Arg::In(x),
            Arg::In(w),
            Arg::I32(w_f32),
            Arg::Out(out),
            Arg::I32(dim_i),
            Arg::F32(eps),
        ];
        // SAFETY: rmsnorm_T(const T* x, const void* w, int, T* out, int dim, float eps); sizes
        // checked above.
        unsafe { self.launch(&name, row_config(rows, dim), &mut args) };
    }

    pub(super) fn add_rmsnorm_impl(
        &self,
        residual: &mut CudaBuf,
        delta: &CudaBuf,
        w: &CudaBuf,
        dim: usize,
        eps: f32,
        out: &mut CudaBuf,
    ) {
        assert!(dim > 0, "add_rmsnorm: dim is 0");
        assert_eq!(w.len, dim, "add_rmsnorm: weight length");
        assert_eq!(residual.len, delta.len, "add_rmsnorm: residual/delta sizes");
        assert_eq!(residual.len, out.len, "add_rmsnorm: in/out sizes");
        assert_eq!(
            residual.len % dim,
            0,
            "add_rmsnorm: residual is not rows of {dim}"
        );
        assert_eq!(
            delta.dtype, residual.dtype,
            "add_rmsnorm: the delta is added in the residual's dtype"
        );
        let rows = residual.len / dim;
        if rows == 0 {
            return;
        }
        let suffix = entry_suffix("add_rmsnorm", residual.dtype, out.dtype);
        let name = format!("add_rmsnorm_{suffix}");
        let (w_f32, dim_i) = (w.dtype.flag(), int(dim, "add_rmsnorm dim"));
        let mut args = [
            Arg::Out(residual),
            Arg::In(delta),
            Arg::In(w),
            Arg::I32(w_f32),
            Arg::Out(out),
            Arg::I32(dim_i),
            Arg::F32(eps),
        ];
        // SAFETY: add_rmsnorm_T(T* residual, const T* delta, const void* w, int, T* out, int dim,
        // float eps); sizes checked above.
        unsafe { self.launch(&name, row_config(rows, dim), &mut args) };
    }

    /// Backward of `rmsnorm` with respect to `x` (frozen weights): `dx (+)= ...`; x, dy and dx
    /// share a dtype, `w` is a side tensor.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rmsnorm_bwd_impl(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        dy: &CudaBuf,
        dim: usize,
        eps: f32,
        dx: &mut CudaBuf,
        accumulate: bool,
    ) {
        assert!(dim > 0, "rmsnorm_bwd: dim is 0");
        assert_eq!(w.len, dim, "rmsnorm_bwd: weight length");
        assert!(
            x.len == dy.len && x.len == dx.len,
            "rmsnorm_bwd: x, dy and dx sizes differ"
        );
        assert_eq!(x.len % dim, 0, "rmsnorm_bwd: x is not rows of {dim}");
        assert!(
            x.dtype == dy.dtype && x.dtype == dx.dtype,
            "rmsnorm_bwd: x, dy and dx must share a dtype"
        );
        let rows = x.len / dim;
        if rows == 0 {
            return;
        }
        let name = format!("rmsnorm_bwd_{}", x.dtype.suffix());
        let (w_f32, dim_i) = (w.dtype.flag(), int(dim, "rmsnorm_bwd dim"));
        let mut args = [
            Arg::In(x),
            Arg::In(w),
            Arg::I32(w_f32),
            Arg::In(dy),
            Arg::Out(dx),
            Arg::I32(dim_i),
            Arg::F32(eps),
            Arg::I32(accumulate as i32),
        ];
        // SAFETY: rmsnorm_bwd_T(const T* x, const void* w, int, const T* dy, T* dx, int dim,
        // float eps, int accumulate); sizes checked above.
        unsafe { self.launch(&name, row_config(rows, dim), &mut args) };
    }
}
