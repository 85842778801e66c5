//! Launcher of kernels/pgd.cu (CPU twin: attack/pgd.rs).

use super::device::{int, Arg, CudaBackend, CudaBuf, DType};
use crate::attack::pgd::{AdamState, Ball};
use cudarc::driver::LaunchConfig;

impl CudaBackend {
    /// `e <- proj(e - step * sign(grad))` on the GPU: [`crate::attack::pgd::sign_step`].
    pub fn pgd_sign_step(
        &self,
        e: &mut CudaBuf,
        grad: &CudaBuf,
        init: &CudaBuf,
        step: f32,
        ball: Ball,
        dim: usize,
    ) {
        self.pgd_launch(e, grad, init, None, step, (1.0, 1.0), ball, dim)
    }

    /// One Adam step then the projection, on the GPU: [`crate::attack::pgd::adam_step`]. The
    /// moments live on the device (`m`, `v`: f32, like `e`); `t` counts the steps taken and is
    /// advanced here, as `AdamState::t` is by the CPU.
    #[allow(clippy::too_many_arguments)]
    pub fn pgd_adam_step(
        &self,
        e: &mut CudaBuf,
        grad: &CudaBuf,
        init: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        t: &mut i32,
        lr: f32,
        ball: Ball,
        dim: usize,
    ) {
        *t += 1;
        // The host half of adam_step: pgd.rs's constants, powi in f32 as there.
        let c1 = 1.0 - AdamState::BETA1.powi(*t);
        let c2 = 1.0 - AdamState::BETA2.powi(*t);
        self.pgd_launch(e, grad, init, Some((m, v)), lr, (c1, c2), ball, dim)
    }

    #[allow(clippy::too_many_arguments)]
    fn pgd_launch(
        &self,
        e: &mut CudaBuf,
        grad: &CudaBuf,
        init: &CudaBuf,
        moments: Option<(&mut CudaBuf, &mut CudaBuf)>,
        step: f32,
        (c1, c2): (f32, f32),
        ball: Ball,
        dim: usize,
    ) {
        assert!(dim > 0, "pgd: dim is 0");
        assert!(
            grad.len == e.len && init.len == e.len && e.len.is_multiple_of(dim),
            "pgd: sizes differ"
        );
        assert!(
            e.dtype == DType::F32 && init.dtype == DType::F32,
            "pgd: e and init must be f32"
        );
        let (ball_i, eps) = match ball {
            Ball::None => (0, 0.0),
            Ball::L2(eps) => (1, eps),
            Ball::Linf(eps) => (2, eps),
        };
        let (m_ptr, v_ptr, adam) = match &moments {
            Some((m, v)) => {
                assert!(m.len == e.len && v.len == e.len, "adam: sizes differ");
                assert!(
                    m.dtype == DType::F32 && v.dtype == DType::F32,
                    "adam: moments must be f32"
                );
                (self.addr(m), self.addr(v), 1)
            }
            None => (0, 0, 0),
        };
        let rows = e.len / dim;
        if rows == 0 {
            return;
        }
        let threads = dim.next_multiple_of(32).clamp(32, 256) as u32;
        let cfg = LaunchConfig {
            grid_dim: (int(rows, "pgd rows") as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let grad_f32 = grad.dtype.flag();
        let mut args = [
            Arg::Out(e),
            Arg::In(grad),
            Arg::I32(grad_f32),
            Arg::In(init),
            Arg::Ptr(m_ptr),
            Arg::Ptr(v_ptr),
            Arg::I32(int(dim, "pgd dim")),
            Arg::I32(adam),
            Arg::F32(step),
            Arg::F32(c1),
            Arg::F32(c2),
            Arg::I32(ball_i),
            Arg::F32(eps),
        ];
        // SAFETY: pgd_step(float* e, const void* grad, int, const float* init, float* m,
        // float* v, int dim, int adam, float step, float c1, float c2, int ball, float eps);
        // sizes and dtypes checked above; m and v are only read with adam = 1, when given.
        unsafe { self.launch("pgd_step", cfg, &mut args) };
    }
}
