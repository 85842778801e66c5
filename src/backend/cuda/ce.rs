//! Launcher of kernels/ce.cu (CPU twin: objectives/ce.rs).

use super::device::{int, Arg, CudaBackend, CudaBuf, DType};
use crate::objectives::ce::check_target_groups;
use anyhow::{Context, Result};
use cudarc::driver::LaunchConfig;

impl CudaBackend {
    /// [`crate::objectives::ce::target_ce_groups`] on logits that stay on the GPU (`[rows,
    /// vocab]`, f32 or bf16): per group of `(row, token)` targets its mean CE and whether every
    /// target token is its row's argmax. Writes the gradient of the sum of the group means into
    /// `grad` (`=`, f32 or bf16; zero on every row that is no target) when given. Downloads two
    /// numbers per target row, so it synchronises.
    pub fn target_ce(
        &self,
        logits: &CudaBuf,
        vocab: usize,
        groups: &[&[(usize, u32)]],
        grad: Option<&mut CudaBuf>,
    ) -> Result<Vec<(f64, bool)>> {
        assert!(
            vocab > 0 && logits.len.is_multiple_of(vocab),
            "target_ce: {} logits are not rows of {vocab}",
            logits.len
        );
        check_target_groups(groups, logits.len / vocab, vocab);
        let (grad_ptr, grad_f32) = match grad {
            Some(g) => {
                assert_eq!(g.len, logits.len, "target_ce: grad size");
                // The kernel writes the target rows only.
                self.stream()
                    .memset_zeros(&mut *g.data)
                    .context("zeroing the logit gradient")?;
                (self.addr(g), g.dtype.flag())
            }
            None => (0, 0),
        };
        let n: usize = groups.iter().map(|g| g.len()).sum();
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut pairs = Vec::with_capacity(2 * n);
        let mut scale = Vec::with_capacity(n);
        for g in groups {
            for &(row, tok) in *g {
                pairs.extend([row as u32, tok]);
                scale.push((1.0 / g.len() as f64) as f32);
            }
        }
        let targets = self.upload_u32(&pairs);
        let scale = self.upload_dtype(&scale, DType::F32)?;
        let mut row_loss = self.alloc_dtype(n, DType::F32)?;
        let mut row_argmax = self
            .stream()
            .alloc_zeros::<u32>(n)
            .context("allocating the target argmaxes")?;
        let cfg = LaunchConfig {
            grid_dim: (int(n, "target_ce targets") as u32, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let logits_f32 = logits.dtype.flag();
        let mut args = [
            Arg::In(logits),
            Arg::I32(logits_f32),
            Arg::I32(int(vocab, "target_ce vocab")),
            Arg::U32(&targets),
            Arg::In(&scale),
            Arg::Out(&mut row_loss),
            Arg::U32Out(&mut row_argmax),
            Arg::Ptr(grad_ptr),
            Arg::I32(grad_f32),
        ];
        // SAFETY: target_ce(const void* logits, int, int vocab, const u32* targets,
        // const float* scale, float* row_loss, u32* row_argmax, void* grad, int); every row and
        // token checked above; grad is null or rows * vocab elements of its dtype.
        unsafe { self.launch("target_ce", cfg, &mut args) };
        let loss = crate::backend::Backend::download(self, &row_loss)?;
        let argmax = self
            .stream()
            .clone_dtoh(&row_argmax)
            .context("copying the target argmaxes from the GPU")?;
        self.stream()
            .synchronize()
            .context("CUDA error before target_ce's argmaxes")?;
        let mut out = Vec::with_capacity(groups.len());
        let mut k = 0;
        for g in groups {
            // The CPU twin's f64 mean, in target order.
            let inv = g.len() as f64;
            let (mut mean, mut all_argmax) = (0.0, true);
            for &(_, tok) in *g {
                mean += loss[k] as f64 / inv;
                all_argmax &= argmax[k] == tok;
                k += 1;
            }
            out.push((mean, all_argmax));
        }
        Ok(out)
    }
}
