//! Launcher of kernels/rows.cu (CPU twin: backend/cpu/rows.rs): the per-row statistics and row
//! combinations of the representation objectives.

use super::device::{int, Arg, CudaBackend, CudaBuf, DType};
use anyhow::Result;
use cudarc::driver::LaunchConfig;

fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (int(rows, "rows") as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// See `BackwardOps::row_stats`. Downloads `4 * rows` floats (it synchronises).
    pub fn row_stats_impl(
        &self,
        x: &CudaBuf,
        y: &CudaBuf,
        y_vec: bool,
        scale: Option<&[f32]>,
        dim: usize,
    ) -> Result<Vec<[f64; 4]>> {
        assert!(
            dim > 0 && x.len.is_multiple_of(dim),
            "row_stats: x is not rows of {dim}"
        );
        let rows = x.len / dim;
        assert_eq!(y.len, if y_vec { dim } else { x.len }, "row_stats: y size");
        if rows == 0 {
            return Ok(Vec::new());
        }
        let scale_g = scale
            .map(|s| {
                assert_eq!(s.len(), rows, "row_stats: scale size");
                self.upload_dtype(s, DType::F32)
            })
            .transpose()?;
        let mut stats = self.alloc_dtype(rows * 4, DType::F32)?;
        let scale_ptr = scale_g.as_ref().map_or(0, |b| self.addr(b));
        let (x_f32, y_f32) = (x.dtype.flag(), y.dtype.flag());
        let mut args = [
            Arg::In(x),
            Arg::I32(x_f32),
            Arg::In(y),
            Arg::I32(y_f32),
            Arg::I32(y_vec as i32),
            Arg::Ptr(scale_ptr),
            Arg::I32(int(dim, "row_stats dim")),
            Arg::Out(&mut stats),
        ];
        // SAFETY: row_stats(const void* x, int, const void* y, int, int y_vec, const float* scale,
        // int dim, float* stats); x is rows x dim, y rows x dim or dim, scale null or rows,
        // stats rows x 4 (checked above).
        unsafe { self.launch("row_stats", per_row(rows), &mut args) };
        let flat = crate::backend::Backend::download(self, &stats)?;
        Ok(flat
            .chunks_exact(4)
            .map(|c| [c[0] as f64, c[1] as f64, c[2] as f64, c[3] as f64])
            .collect())
    }

    /// See `BackwardOps::row_combine`.
    #[allow(clippy::type_complexity)]
    pub fn row_combine_impl(
        &self,
        out: &mut CudaBuf,
        accumulate: bool,
        x: Option<(&CudaBuf, &[f32])>,
        y: Option<(&CudaBuf, &[f32])>,
        v: Option<(&CudaBuf, &[f32])>,
        dim: usize,
    ) -> Result<()> {
        assert!(
            dim > 0 && out.len.is_multiple_of(dim),
            "row_combine: out is not rows of {dim}"
        );
        let rows = out.len / dim;
        for (t, c) in [x, y].iter().flatten() {
            assert!(
                t.len == out.len && c.len() == rows,
                "row_combine: row term size"
            );
        }
        if let Some((t, c)) = v {
            assert!(
                t.len == dim && c.len() == rows,
                "row_combine: vector term size"
            );
        }
        if rows == 0 {
            return Ok(());
        }
        // Each present term: (tensor address, is_f32, uploaded coefficients).
        let term = |t: Option<(&CudaBuf, &[f32])>| -> Result<(u64, i32, Option<CudaBuf>)> {
            Ok(match t {
                Some((b, c)) => (
                    self.addr(b),
                    b.dtype.flag(),
                    Some(self.upload_dtype(c, DType::F32)?),
                ),
                None => (0, 0, None),
            })
        };
        let (xp, xf, xc) = term(x)?;
        let (yp, yf, yc) = term(y)?;
        let (vp, vf, vc) = term(v)?;
        let c = |b: &Option<CudaBuf>| b.as_ref().map_or(0, |b| self.addr(b));
        let (xcp, ycp, vcp) = (c(&xc), c(&yc), c(&vc));
        let out_f32 = out.dtype.flag();
        let mut args = [
            Arg::Out(out),
            Arg::I32(out_f32),
            Arg::I32(accumulate as i32),
            Arg::Ptr(xp),
            Arg::I32(xf),
            Arg::Ptr(xcp),
            Arg::Ptr(yp),
            Arg::I32(yf),
            Arg::Ptr(ycp),
            Arg::Ptr(vp),
            Arg::I32(vf),
            Arg::Ptr(vcp),
            Arg::I32(int(dim, "row_combine dim")),
        ];
        // SAFETY: row_combine(void* out, int, int, const void* x, int, const float* cx,
        // const void* y, int, const float* cy, const void* v, int, const float* cv, int dim);
        // sizes checked above; absent terms are null pointers.
        unsafe { self.launch("row_combine", per_row(rows), &mut args) };
        Ok(())
    }
}
