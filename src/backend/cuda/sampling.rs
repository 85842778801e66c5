//! Launchers of kernels/sampling.cu (CPU twins: src/backend/cpu/sampling.rs, through
//! `Backend::argmax_rows`' and `Backend::sample_top_p_rows`' defaults).

use super::device::{int, Arg, CudaBackend, CudaBuf, DType};
use crate::backend::check_top_p_args;
use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};

/// One block of 256 threads per row.
fn row_config(rows: usize, what: &str) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (int(rows, what) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

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
        let mut out = self.ids_out(rows, "argmax")?;
        let mut args = [
            Arg::In(x),
            Arg::I32(int(width, "argmax width")),
            Arg::U32Out(&mut out),
            Arg::Ptr(0),
        ];
        // SAFETY: argmax_T(const T* logits, int width, u32* out, u32* advance); out holds one
        // u32 per row, advance is null.
        unsafe { self.launch(&name, row_config(rows, "argmax rows"), &mut args) };
        self.ids_back(&out, "argmax")
    }

    pub(super) fn sample_top_p_impl(
        &self,
        x: &CudaBuf,
        width: usize,
        temperature: f32,
        top_p: f32,
        uniforms: &[f32],
    ) -> Result<Vec<u32>> {
        check_top_p_args(x.len, width, temperature, top_p, uniforms)?;
        let rows = x.len / width;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let name = format!("sample_top_p_{}", x.dtype.suffix());
        let u = self.upload_dtype(uniforms, DType::F32)?;
        let mut out = self.ids_out(rows, "top-p")?;
        let mut args = [
            Arg::In(x),
            Arg::I32(int(width, "top-p width")),
            Arg::In(&u),
            Arg::F32(temperature),
            Arg::F32(top_p),
            Arg::U32Out(&mut out),
            Arg::Ptr(0),
        ];
        // SAFETY: sample_top_p_T(const T* logits, int width, const float* uniforms,
        // float temperature, float top_p, u32* out, u32* advance); uniforms and out hold one
        // value per row, advance is null.
        unsafe { self.launch(&name, row_config(rows, "top-p rows"), &mut args) };
        self.ids_back(&out, "top-p")
    }

    /// One u32 per row, poisoned (u32::MAX) so that a row the kernel fails to write shows.
    fn ids_out(&self, rows: usize, what: &str) -> Result<CudaSlice<u32>> {
        self.stream()
            .clone_htod(&vec![u32::MAX; rows])
            .with_context(|| format!("allocating the {what} output"))
    }

    fn ids_back(&self, out: &CudaSlice<u32>, what: &str) -> Result<Vec<u32>> {
        let ids = self
            .stream()
            .clone_dtoh(out)
            .with_context(|| format!("copying {what} ids from the GPU"))?;
        self.stream()
            .synchronize()
            .with_context(|| format!("CUDA error before {what}"))?;
        Ok(ids)
    }
}
