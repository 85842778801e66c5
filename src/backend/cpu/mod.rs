//! The f32 CPU reference backend: one file per op family, mirroring kernels/.

pub mod attention;
pub mod capture;
pub mod embedding;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod simd;
pub mod swiglu;

use super::{AttnShape, Backend};
use anyhow::Result;

/// Dot product, vectorised for the widest instruction set this CPU has (see [`simd`]).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    simd::dot(a, b)
}

#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    type Buf = Vec<f32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn embedding(&self, table: &Vec<f32>, ids: &[u32], dim: usize, out: &mut Vec<f32>) {
        embedding::embedding_fwd(table, ids, dim, out)
    }
    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, dim: usize, eps: f32, out: &mut Vec<f32>) {
        rmsnorm::rmsnorm_fwd(x, w, dim, eps, out)
    }
    fn add_rmsnorm(
        &self,
        residual: &mut Vec<f32>,
        delta: &Vec<f32>,
        w: &Vec<f32>,
        dim: usize,
        eps: f32,
        out: &mut Vec<f32>,
    ) {
        rmsnorm::add_rmsnorm_fwd(residual, delta, w, dim, eps, out)
    }
    fn matmul(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        out: &mut Vec<f32>,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
        accumulate: bool,
    ) {
        matmul::matmul_fwd(x, w, out, m, n, k, scale, accumulate)
    }
    fn add_bias(&self, x: &mut Vec<f32>, bias: &Vec<f32>) {
        assert_eq!(
            x.len() % bias.len(),
            0,
            "add_bias: rows are not a multiple of the bias"
        );
        for row in x.chunks_exact_mut(bias.len()) {
            for (xi, bi) in row.iter_mut().zip(bias) {
                *xi += bi;
            }
        }
    }
    fn rope(
        &self,
        x: &mut Vec<f32>,
        batch: usize,
        seq_len: usize,
        n_heads: usize,
        head_dim: usize,
        start_pos: usize,
        inv_freq: &Vec<f32>,
    ) {
        assert_eq!(
            x.len(),
            batch * seq_len * n_heads * head_dim,
            "rope: x size"
        );
        rope::rope_fwd(x, seq_len, n_heads, head_dim, start_pos, inv_freq)
    }
    fn kv_store(
        &self,
        k: &Vec<f32>,
        v: &Vec<f32>,
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
        shape: AttnShape,
    ) {
        attention::kv_store(k, v, k_cache, v_cache, shape)
    }
    fn attention(
        &self,
        q: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        key_mask: Option<&Vec<f32>>,
        out: &mut Vec<f32>,
        shape: AttnShape,
    ) {
        attention::attention_fwd(
            q,
            k_cache,
            v_cache,
            key_mask.map(|m| m.as_slice()),
            out,
            shape,
        )
    }
    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>) {
        swiglu::swiglu_fwd(gate, up, out)
    }
    fn gather_rows(
        &self,
        src: &Vec<f32>,
        src_rows: &[u32],
        dim: usize,
        dst: &mut Vec<f32>,
        dst_row: usize,
    ) {
        capture::gather_rows(src, src_rows, dim, dst, dst_row)
    }
}

impl super::BackwardOps for CpuBackend {
    fn gemm(
        &self,
        a: &Vec<f32>,
        b: &Vec<f32>,
        out: &mut Vec<f32>,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        scale: f32,
        accumulate: bool,
    ) {
        matmul::gemm_fwd(a, b, out, m, n, k, trans_a, trans_b, scale, accumulate)
    }
    fn rmsnorm_bwd(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dy: &Vec<f32>,
        dim: usize,
        eps: f32,
        dx: &mut Vec<f32>,
        accumulate: bool,
    ) {
        rmsnorm::rmsnorm_bwd(x, w, dy, dim, eps, dx, accumulate)
    }
    fn attention_bwd(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        key_mask: Option<&Vec<f32>>,
        out: &Vec<f32>,
        dout: &Vec<f32>,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        shape: AttnShape,
    ) {
        attention::attention_bwd(
            q,
            k,
            v,
            key_mask.map(|m| m.as_slice()),
            out,
            dout,
            dq,
            dk,
            dv,
            shape,
        )
    }
    fn swiglu_bwd(
        &self,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        dout: &Vec<f32>,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
    ) {
        swiglu::swiglu_bwd(gate, up, dout, dgate, dup)
    }
    fn axpy(&self, alpha: f32, x: &Vec<f32>, y: &mut Vec<f32>) {
        assert_eq!(x.len(), y.len(), "axpy: sizes differ");
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += alpha * xi;
        }
    }
}
