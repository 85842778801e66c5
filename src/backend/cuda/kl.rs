//! Launcher of kernels/kl.cu (CPU twin: objectives/kl.rs).

use super::device::{int, Arg, CudaBackend, CudaBuf, DType};
use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

impl CudaBackend {
    /// The retain KL `KL_T(p_orig || p_tuned) * T^2`, batch-mean, padded rows (`mask[r] == 0`)
    /// excluded, on logits that stay on the GPU: [`crate::objectives::kl::kl_retain`] with the
    /// same arguments. Writes `weight * d loss / d tuned` into `grad` (`=`, f32 or bf16) when
    /// given. Downloads one f32 per row (the row KLs, summed here in f64), so it synchronises.
    #[allow(clippy::too_many_arguments)]
    pub fn kl_retain(
        &self,
        orig: &CudaBuf,
        tuned: &CudaBuf,
        mask: &[f64],
        batch: usize,
        vocab: usize,
        temperature: f64,
        weight: f64,
        grad: Option<&mut CudaBuf>,
    ) -> Result<f64> {
        let rows = mask.len();
        assert!(vocab > 0, "kl: vocab is 0");
        assert_eq!(
            orig.len,
            rows * vocab,
            "kl: orig logits are not [rows={rows}, vocab={vocab}]"
        );
        assert_eq!(tuned.len, orig.len, "kl: tuned logits size");
        assert!(
            batch > 0 && rows.is_multiple_of(batch),
            "kl: mask rows {rows} not divisible by batch {batch}"
        );
        ensure!(temperature > 0.0, "kl: temperature must be positive");
        if rows == 0 {
            return Ok(0.0);
        }
        let t = temperature;
        let scale = t * t / batch as f64;
        let mask_f: Vec<f32> = mask
            .iter()
            .map(|&m| if m == 0.0 { 0.0 } else { 1.0 })
            .collect();
        let mask_g = self.upload_dtype(&mask_f, DType::F32)?;
        let mut row_kl = self.alloc_dtype(rows, DType::F32)?;
        let (grad_ptr, grad_f32) = match &grad {
            Some(g) => {
                assert_eq!(g.len, orig.len, "kl: grad size");
                (self.addr(g), g.dtype.flag())
            }
            None => (0, 0),
        };
        let cfg = LaunchConfig {
            grid_dim: (int(rows, "kl rows") as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (orig_f32, tuned_f32) = (orig.dtype.flag(), tuned.dtype.flag());
        let mut args = [
            Arg::In(orig),
            Arg::I32(orig_f32),
            Arg::In(tuned),
            Arg::I32(tuned_f32),
            Arg::In(&mask_g),
            Arg::I32(int(vocab, "kl vocab")),
            Arg::F32((1.0 / t) as f32),
            Arg::F32((weight * scale / t) as f32),
            Arg::Out(&mut row_kl),
            Arg::Ptr(grad_ptr),
            Arg::I32(grad_f32),
        ];
        // SAFETY: kl_retain(const void* orig, int, const void* tuned, int, const float* mask,
        // int vocab, float inv_t, float grad_scale, float* row_kl, void* grad, int); sizes
        // checked above; grad is null or rows * vocab elements of its dtype.
        unsafe { self.launch("kl_retain", cfg, &mut args) };
        let per_row = crate::backend::Backend::download(self, &row_kl)?;
        Ok(weight * scale * per_row.iter().map(|&x| x as f64).sum::<f64>())
    }
}
