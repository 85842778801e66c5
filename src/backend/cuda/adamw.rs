//! Launcher of kernels/adamw.cu (CPU twin: train/adamw.rs).

use super::device::{Arg, CudaBackend, CudaBuf, DType};
use crate::train::adamw::AdamWConfig;
use cudarc::driver::LaunchConfig;

impl CudaBackend {
    /// One AdamW update of the f32 parameters `p` with gradient `g * grad_scale` (g f32 or
    /// bf16) and f32 moments `m`, `v`, at step `t` (1-based): bit-identical to scaling `g` in
    /// f32 and calling [`crate::train::adamw::adamw_step`].
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step(
        &self,
        cfg: &AdamWConfig,
        t: u64,
        p: &mut CudaBuf,
        g: &CudaBuf,
        grad_scale: f32,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
    ) {
        assert!(
            g.len == p.len && m.len == p.len && v.len == p.len,
            "adamw: sizes differ"
        );
        assert!(
            p.dtype == DType::F32 && m.dtype == DType::F32 && v.dtype == DType::F32,
            "adamw: parameters and moments must be f32"
        );
        assert!(t >= 1, "adamw: steps count from 1");
        if p.len == 0 {
            return;
        }
        // The host half of adamw_step, with the same types and roundings.
        let bc1 = 1.0 - cfg.beta1.powi(t as i32);
        let bc2 = 1.0 - cfg.beta2.powi(t as i32);
        let decay = (1.0 - cfg.lr * cfg.weight_decay) as f32;
        let step = cfg.lr / bc1;
        let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
        let blocks = p.len.div_ceil(256).clamp(1, self.sm_count() * 8);
        let launch = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = p.len as i64;
        let g_f32 = g.dtype.flag();
        let mut args = [
            Arg::Out(p),
            Arg::In(g),
            Arg::I32(g_f32),
            Arg::F32(grad_scale),
            Arg::Out(m),
            Arg::Out(v),
            Arg::I64(n),
            Arg::F32(b1),
            Arg::F32(b2),
            Arg::F32(1.0 - b1),
            Arg::F32(1.0 - b2),
            Arg::F32(decay),
            Arg::F64(step),
            Arg::F64(bc2),
            Arg::F64(cfg.eps),
        ];
        // SAFETY: adamw_step(float* p, const void* g, int, float grad_scale, float* m, float* v, long long n,
        // float b1, float b2, float omb1, float omb2, float decay, double step, double bc2,
        // double eps); sizes and dtypes checked above.
        unsafe { self.launch("adamw_step", launch, &mut args) };
    }
}
