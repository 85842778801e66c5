//! Launcher of kernels/sampling.cu (host twin: `Backend::argmax_rows`' default).

use super::device::{int, Arg, CudaBackend, CudaBuf};
use anyhow::{ensure, Context, Result};
use cudarc::driver::LaunchConfig;

impl CudaBackend {
    pub(super) fn argmax_impl(&self, x: &CudaBuf, width: usize) -> Result<Vec<u32>> {
        ensure!(
            width > 0 && x.len.is_multiple_of(width),
            "argmax_rows: {} values are not rows of {width}",
            x.len
        );
        let rows = x.len / width;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let name = format!("argmax_{}", x.dtype.suffix());
        let mut out = self
            .stream()
            .alloc_zeros::<u32>(rows)
            .context("allocating argmax output")?;
        let width_i = int(width, "argmax width");
        let cfg = LaunchConfig {
            grid_dim: (int(rows, "argmax rows") as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = [Arg::In(x), Arg::I32(width_i), Arg::U32Out(&mut out)];
        // SAFETY: argmax_T(const T* logits, int width, u32* out); out holds one u32 per row.
        unsafe { self.launch(&name, cfg, &mut args) };
        let ids = self
            .stream()
            .clone_dtoh(&out)
            .context("copying argmax from the GPU")?;
        self.stream()
            .synchronize()
            .context("CUDA error before argmax")?;
        Ok(ids)
    }
}
