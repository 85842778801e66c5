//! The f32 CPU reference backend: one file per op family, mirroring kernels/.

pub mod attention;
pub mod capture;
pub mod dropout;
pub mod embedding;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod rows;
pub mod sampling;
pub mod simd;
pub mod swiglu;

use super::{AttnShape, Backend};
use anyhow::Result;

/// Dot product, vectorised for the widest instruction set this CPU has (see [`simd`]).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    simd::dot(a, b)
}

/// Buffers from this size up ask the kernel for transparent huge pages.
const HUGE_PAGE_MIN_BYTES: usize = 2 << 20;

/// An empty vector with room for `len` values; when large, its pages are advised as huge
/// (`MADV_HUGEPAGE`) before anything touches them. Streaming weights then takes 512x fewer
/// TLB misses and page faults (decode reads every weight once per token).
fn huge_page_vec(len: usize) -> Vec<f32> {
    let v: Vec<f32> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    if len * 4 >= HUGE_PAGE_MIN_BYTES {
        const PAGE: usize = 4096;
        let start = (v.as_ptr() as usize).next_multiple_of(PAGE);
        let end = (v.as_ptr() as usize + len * 4) / PAGE * PAGE;
        if end > start {
            // SAFETY: advice only, on whole pages inside this allocation; failure is harmless.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    v
}

/// Runs `f` on a thread of rayon's global pool. The parallel ops `f` calls then fork and join
/// inside the pool, with the calling thread taking part, instead of each op parking an outside
/// caller and waking it when done (~10 us per op: hundreds of ops per decoded token). Drivers
/// that call many small ops in a row (generation) should wrap their loop in this.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    // `join` called from outside the pool runs both closures on a pool thread.
    rayon::join(f, || ()).0
}

#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    type Buf = Vec<f32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        let mut v = huge_page_vec(data.len());
        v.extend_from_slice(data);
        Ok(v)
    }
    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        if len * 4 < HUGE_PAGE_MIN_BYTES {
            return Ok(vec![0.0; len]);
        }
        let mut v = huge_page_vec(len);
        v.resize(len, 0.0);
        Ok(v)
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
    fn dropout(&self, x: &Vec<f32>, out: &mut Vec<f32>, p: f32, seed: u64) {
        dropout::dropout_fwd(x, out, p, seed)
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
    fn kl_retain(
        &self,
        orig: &Vec<f32>,
        tuned: &Vec<f32>,
        mask: &[f64],
        batch: usize,
        vocab: usize,
        temperature: f64,
        weight: f64,
        grad: Option<&mut Vec<f32>>,
    ) -> anyhow::Result<f64> {
        anyhow::ensure!(temperature > 0.0, "kl: temperature must be positive");
        Ok(crate::objectives::kl::kl_retain(
            orig,
            tuned,
            mask,
            batch,
            vocab,
            temperature,
            weight,
            grad.map(|g| g.as_mut_slice()),
        ))
    }
    fn target_ce(
        &self,
        logits: &Vec<f32>,
        vocab: usize,
        groups: &[&[(usize, u32)]],
        grad: Option<&mut Vec<f32>>,
    ) -> anyhow::Result<Vec<(f64, bool)>> {
        Ok(crate::objectives::ce::target_ce_groups(
            logits,
            vocab,
            groups,
            grad.map(|g| g.as_mut_slice()),
        ))
    }
    fn pgd_step(
        &self,
        update: crate::attack::pgd::Update,
        e: &mut Vec<f32>,
        grad: &Vec<f32>,
        init: &Vec<f32>,
        adam: &mut Option<crate::attack::pgd::DeviceAdam<Vec<f32>>>,
        step: f32,
        ball: crate::attack::pgd::Ball,
        dim: usize,
    ) -> anyhow::Result<()> {
        use crate::attack::pgd::{update_step, AdamState, DeviceAdam};
        // The moments move in and out of the host state: no copy.
        let mut state = adam.take().map(|a| AdamState {
            m: a.m,
            v: a.v,
            t: a.t,
        });
        update_step(update, e, grad, init, &mut state, step, ball, dim);
        *adam = state.map(|s| DeviceAdam {
            m: s.m,
            v: s.v,
            t: s.t,
        });
        Ok(())
    }
    fn adamw_step(
        &self,
        cfg: &crate::train::adamw::AdamWConfig,
        t: u64,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        grad_scale: f32,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) {
        let scaled: std::borrow::Cow<[f32]> = if grad_scale == 1.0 {
            g.as_slice().into()
        } else {
            g.iter().map(|&x| x * grad_scale).collect::<Vec<_>>().into()
        };
        let mut st = crate::train::adamw::Moments {
            m: std::mem::take(m),
            v: std::mem::take(v),
        };
        crate::train::adamw::adamw_step(cfg, t, p, &scaled, &mut st);
        (*m, *v) = (st.m, st.v);
    }
    fn row_stats(
        &self,
        x: &Vec<f32>,
        y: &Vec<f32>,
        y_vec: bool,
        scale: Option<&[f32]>,
        dim: usize,
    ) -> anyhow::Result<Vec<[f64; 4]>> {
        Ok(rows::row_stats(x, y, y_vec, scale, dim))
    }
    fn row_combine(
        &self,
        out: &mut Vec<f32>,
        accumulate: bool,
        x: Option<(&Vec<f32>, &[f32])>,
        y: Option<(&Vec<f32>, &[f32])>,
        v: Option<(&Vec<f32>, &[f32])>,
        dim: usize,
    ) {
        fn s<'a>(t: Option<(&'a Vec<f32>, &'a [f32])>) -> Option<(&'a [f32], &'a [f32])> {
            t.map(|(b, c)| (b.as_slice(), c))
        }
        rows::row_combine(out, accumulate, s(x), s(y), s(v), dim)
    }
}
