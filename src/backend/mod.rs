//! The op set every device implements. Model code (`crate::llama`) is written once against
//! this trait; `cpu` is the f32 reference, `cuda` the hand-written kernels.
//!
//! Layout conventions shared by every backend:
//! - activations are row-major `[rows, dim]`, one row per token, sequences of a batch stacked
//!   (`row = b * seq_len + t`);
//! - weights are `[out, in]` (Hugging Face / PyTorch `nn.Linear` layout), so a projection is
//!   `y = x W^T`;
//! - the KV cache of one layer is `[batch, capacity, kv_dim]`.

pub mod cpu;
pub mod cuda;

use anyhow::Result;

/// Geometry of one attention call: `q_len` new tokens per sequence at positions
/// `start_pos..start_pos + q_len`, attending causally to cache entries `0..start_pos + q_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub q_len: usize,
    pub start_pos: usize,
    /// Rows reserved per sequence in the KV cache.
    pub capacity: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    pub fn kv_len(&self) -> usize {
        self.start_pos + self.q_len
    }
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Preconditions every backend relies on.
    pub fn check(&self) {
        assert!(
            self.batch > 0 && self.q_len > 0,
            "empty attention call {self:?}"
        );
        assert!(
            self.kv_len() <= self.capacity,
            "KV cache overflow: {self:?}"
        );
        assert!(
            self.n_kv_heads > 0 && self.n_heads.is_multiple_of(self.n_kv_heads),
            "query heads must be a multiple of KV heads: {self:?}"
        );
    }
}

/// Inverted dropout with a mask that is a pure function of `(seed, element index)`, so the
/// backward pass and a recomputed forward regenerate it instead of storing it, and every
/// device draws the same mask. Element `i` is dropped when the top 24 bits of splitmix64's
/// `i`-th output from state `seed` fall below [`dropout_threshold`]`(p)`; kept elements are
/// scaled by [`dropout_scale`]`(p)`.
pub mod dropout_mask {
    /// splitmix64's increment (the golden ratio in 64 bits).
    pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

    /// splitmix64's output function.
    pub fn mix64(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A seed for a sub-stream `v` of `seed` (a layer, a module, a step): distinct `v` give
    /// unrelated masks.
    pub fn derive(seed: u64, v: u64) -> u64 {
        mix64(seed ^ mix64(v.wrapping_add(GOLDEN)))
    }

    /// Drop element `i` iff `24-bit hash < threshold`: `p` on a 2^-24 grid, computed once on
    /// the host so every device compares against the same integer.
    pub fn dropout_threshold(p: f32) -> u32 {
        assert!(
            (0.0..1.0).contains(&p),
            "dropout probability {p} not in [0, 1)"
        );
        (p as f64 * (1u64 << 24) as f64).round() as u32
    }

    /// `1 / (1 - p)`, the scale of kept elements (inverted dropout), rounded once to f32.
    pub fn dropout_scale(p: f32) -> f32 {
        (1.0 / (1.0 - p as f64)) as f32
    }

    /// Whether element `i` survives (kernels/dropout.cu computes the same).
    #[inline]
    pub fn keep(seed: u64, i: u64, threshold: u32) -> bool {
        ((mix64(seed.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN))) >> 40) as u32)
            >= threshold
    }
}

/// `Backend::gate_up_swiglu`'s default: the two projections (with their LoRA terms) into
/// `gate` and `up`, then `swiglu`. Backends that fuse only some shapes run this for the rest.
#[allow(clippy::too_many_arguments)]
pub fn gate_up_swiglu_steps<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    wg: &B::Buf,
    wu: &B::Buf,
    lora_g: LoraTerm<B::Buf>,
    lora_u: LoraTerm<B::Buf>,
    gate: &mut B::Buf,
    up: &mut B::Buf,
    act: &mut B::Buf,
    m: usize,
    n: usize,
    k: usize,
) {
    project_steps(be, x, wg, lora_g, gate, m, n, k);
    project_steps(be, x, wu, lora_u, up, m, n, k);
    be.swiglu(gate, up, act);
}

/// One projection `out = x w^T` with its optional LoRA term: `matmul_lora` or `matmul`.
#[allow(clippy::too_many_arguments)]
fn project_steps<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    w: &B::Buf,
    lora: LoraTerm<B::Buf>,
    out: &mut B::Buf,
    m: usize,
    n: usize,
    k: usize,
) {
    match lora {
        Some((xa, b, rank, scale)) => be.matmul_lora(x, w, xa, b, out, m, n, k, rank, scale),
        None => be.matmul(x, w, out, m, n, k, 1.0, false),
    }
}

/// A LoRA term of a projection as the fused projection ops take it: `(xa, b, rank, scale)`
/// with `xa = x_d A^T` computed first, added as `scale * xa b^T` (`Backend::matmul_lora`).
pub type LoraTerm<'a, Buf> = Option<(&'a Buf, &'a Buf, usize, f32)>;

/// `Backend::qkv_proj`'s default: three `matmul` / `matmul_lora` calls. Backends that fuse only
/// some shapes run this for the rest.
#[allow(clippy::too_many_arguments)]
pub fn qkv_proj_steps<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    w: [&B::Buf; 3],
    lora: [LoraTerm<B::Buf>; 3],
    out: [&mut B::Buf; 3],
    m: usize,
    n: [usize; 3],
    k: usize,
) {
    for (((w, lora), out), n) in w.into_iter().zip(lora).zip(out).zip(n) {
        project_steps(be, x, w, lora, out, m, n, k);
    }
}

/// `Backend::sample_top_p_rows`' preconditions, shared by every implementation.
pub fn check_top_p_args(
    len: usize,
    width: usize,
    temperature: f32,
    top_p: f32,
    uniforms: &[f32],
) -> Result<()> {
    anyhow::ensure!(
        width > 0 && len.is_multiple_of(width),
        "sample_top_p_rows: {len} values are not rows of {width}"
    );
    anyhow::ensure!(
        uniforms.len() == len / width,
        "sample_top_p_rows: {} uniforms for {} rows",
        uniforms.len(),
        len / width
    );
    anyhow::ensure!(
        uniforms.iter().all(|u| (0.0..1.0).contains(u)),
        "sample_top_p_rows: uniforms must lie in [0, 1)"
    );
    anyhow::ensure!(
        !temperature.is_nan() && !top_p.is_nan(),
        "sample_top_p_rows: temperature {temperature}, top_p {top_p}"
    );
    Ok(())
}

pub trait Backend {
    /// A flat device buffer of f32 values (the CUDA backend stores bf16/f32 per tensor class).
    type Buf;

    fn name(&self) -> String;
    /// Uploads in the device's working precision (bf16 on CUDA): frozen weights, activations.
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// Uploads a tensor that must stay f32 on every device: norm weights, biases, rope
    /// `inv_freq`, key masks, LoRA factors. Every op accepts either kind of buffer wherever the
    /// doc says "side tensor"; the CPU stores everything in f32 anyway.
    fn upload_f32(&self, data: &[f32]) -> Result<Self::Buf> {
        self.upload(data)
    }
    /// A zero-filled buffer in the working precision.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    /// A zero-filled f32 buffer (logits, captured hidden states that feed losses).
    fn alloc_f32(&self, len: usize) -> Result<Self::Buf> {
        self.alloc(len)
    }
    /// Zeroed buffers for several tensors of one memory category at once (`"weights"`,
    /// `"KV cache"`, `"activations"`), each `(len, f32)`: f32 storage when `f32`, else what
    /// `alloc` stores. A backend may carve them from one allocation (the CUDA backend does);
    /// the default allocates each.
    fn alloc_group(
        &self,
        category: &'static str,
        specs: &[(usize, bool)],
    ) -> Result<Vec<Self::Buf>> {
        let _ = category;
        specs
            .iter()
            .map(|&(len, f32)| {
                if f32 {
                    self.alloc_f32(len)
                } else {
                    self.alloc(len)
                }
            })
            .collect()
    }
    /// `upload` / `upload_f32` (per `f32`) of several tensors into one `alloc_group`.
    fn upload_group(
        &self,
        category: &'static str,
        data: &[(&[f32], bool)],
    ) -> Result<Vec<Self::Buf>> {
        let _ = category;
        data.iter()
            .map(|&(d, f32)| {
                if f32 {
                    self.upload_f32(d)
                } else {
                    self.upload(d)
                }
            })
            .collect()
    }
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Waits for all queued work (a no-op on the CPU); for timing and error checks.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Index of the largest value of each row of width `width` (the first on ties, like
    /// `torch.argmax`; NaN never wins). Greedy decoding needs only these, not the logits.
    fn argmax_rows(&self, x: &Self::Buf, width: usize) -> Result<Vec<u32>> {
        anyhow::ensure!(
            width > 0 && self.len(x) % width == 0,
            "argmax_rows: {} values are not rows of {width}",
            self.len(x)
        );
        Ok(self
            .download(x)?
            .chunks_exact(width)
            .map(cpu::sampling::argmax)
            .collect())
    }
    /// One top-p (nucleus) sample from each row of width `width`, row `r` drawn with
    /// `uniforms[r]` in [0, 1) (drawn on the host, so seeded runs reproduce on every device).
    /// The exact definition (ties at the nucleus boundary all kept, `temperature <= 0` is
    /// argmax) is `cpu::sampling::sample_top_p`'s. Sampling needs only these, not the logits.
    fn sample_top_p_rows(
        &self,
        x: &Self::Buf,
        width: usize,
        temperature: f32,
        top_p: f32,
        uniforms: &[f32],
    ) -> Result<Vec<u32>> {
        check_top_p_args(self.len(x), width, temperature, top_p, uniforms)?;
        Ok(self
            .download(x)?
            .chunks_exact(width)
            .zip(uniforms)
            .map(|(row, &u)| cpu::sampling::sample_top_p(row, temperature, top_p, u))
            .collect())
    }

    /// `llama::generate` with the decode step recorded once and replayed per token, or `None`
    /// where the backend has no replay (the CPU: no launches to save), and `generate` runs
    /// step by step. The CUDA backend records a CUDA graph (`llama::generate::generate_graph`).
    fn generate_replayed(
        model: &crate::llama::Llama<Self>,
        prompt: &[u32],
        opts: &crate::llama::GenerateOptions,
        on_token: &mut dyn FnMut(u32) -> Result<()>,
    ) -> Option<Result<Vec<u32>>>
    where
        Self: Sized,
    {
        let _ = (model, prompt, opts, on_token);
        None
    }

    /// `out[r] = table[ids[r]]`, rows of width `dim`.
    fn embedding(&self, table: &Self::Buf, ids: &[u32], dim: usize, out: &mut Self::Buf);
    /// `out = x / rms(x) * w` per row of width `dim` (`w` a side tensor).
    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Buf, dim: usize, eps: f32, out: &mut Self::Buf);
    /// `residual += delta; out = rmsnorm(residual) * w` (the pre-norm block boundary, fused;
    /// `w` a side tensor).
    fn add_rmsnorm(
        &self,
        residual: &mut Self::Buf,
        delta: &Self::Buf,
        w: &Self::Buf,
        dim: usize,
        eps: f32,
        out: &mut Self::Buf,
    );
    /// `out[m,n] = (accumulate ? out : 0) + scale * x[m,k] @ w[n,k]^T`. Any operand may be an
    /// f32 buffer (LoRA factors, f32 logits).
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        out: &mut Self::Buf,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
        accumulate: bool,
    );
    /// A projection with a LoRA pair: `out[m,n] = x[m,k] @ w[n,k]^T + lora_scale * xa[m,r] @
    /// b[n,r]^T`, where `xa = x_d A^T` was computed by the caller. The default is the two
    /// matmuls (the second accumulating); a backend may fuse the second into the first's
    /// epilogue (the CUDA decode GEMV does), which rounds `out` once instead of twice.
    #[allow(clippy::too_many_arguments)]
    fn matmul_lora(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        xa: &Self::Buf,
        b: &Self::Buf,
        out: &mut Self::Buf,
        m: usize,
        n: usize,
        k: usize,
        rank: usize,
        lora_scale: f32,
    ) {
        self.matmul(x, w, out, m, n, k, 1.0, false);
        self.matmul(xa, b, out, m, n, rank, lora_scale, true);
    }
    /// The MLP's gate/up half: `act = silu(gate) * up` with `gate = x wg^T` and `up = x wu^T`
    /// (`x [m, k]`, `wg, wu [n, k]`), each plus an optional LoRA term `(xa, b, rank, scale)` as
    /// in `matmul_lora`. The default runs the two projections into `gate` and `up` and then
    /// `swiglu`; a backend may fuse it all (the CUDA decode GEMV does, and then leaves `gate`
    /// and `up` unwritten), so callers that need `gate` and `up` afterwards must not use it.
    #[allow(clippy::too_many_arguments)]
    fn gate_up_swiglu(
        &self,
        x: &Self::Buf,
        wg: &Self::Buf,
        wu: &Self::Buf,
        lora_g: LoraTerm<Self::Buf>,
        lora_u: LoraTerm<Self::Buf>,
        gate: &mut Self::Buf,
        up: &mut Self::Buf,
        act: &mut Self::Buf,
        m: usize,
        n: usize,
        k: usize,
    ) {
        gate_up_swiglu_steps(self, x, wg, wu, lora_g, lora_u, gate, up, act, m, n, k)
    }
    /// The attention's input projections: `out[j] = x w[j]^T` for j = q, k, v (`x [m, k]`,
    /// `w[j] [n[j], k]`), each plus an optional LoRA term as in `matmul_lora`. The default runs
    /// the three projections one after the other; a backend may run them as one launch (the
    /// CUDA decode GEMV does at decode, where the three are otherwise three launches that each
    /// stream little more than a few KiB of weights per SM).
    #[allow(clippy::too_many_arguments)]
    fn qkv_proj(
        &self,
        x: &Self::Buf,
        w: [&Self::Buf; 3],
        lora: [LoraTerm<Self::Buf>; 3],
        out: [&mut Self::Buf; 3],
        m: usize,
        n: [usize; 3],
        k: usize,
    ) {
        qkv_proj_steps(self, x, w, lora, out, m, n, k)
    }
    /// `x[r] += bias` per row of width `bias.len()` (`bias` a side tensor).
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf);
    /// Rotary embedding (rotate-half convention) in place on `[batch * seq_len, n_heads * head_dim]`,
    /// token `t` of each sequence at position `start_pos + t`; `inv_freq` (a side tensor, best
    /// uploaded with `upload_f32`: bf16 angles drift at long positions) has `head_dim / 2` entries.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Buf,
        batch: usize,
        seq_len: usize,
        n_heads: usize,
        head_dim: usize,
        start_pos: usize,
        inv_freq: &Self::Buf,
    );
    /// Writes the new keys/values `[batch * q_len, kv_dim]` into the caches at `start_pos`.
    fn kv_store(
        &self,
        k: &Self::Buf,
        v: &Self::Buf,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        shape: AttnShape,
    );
    /// The attention's rope and cache write as one op: `rope` on `q` (`n_heads`) and on `k`
    /// (`n_kv_heads`) at `shape.start_pos`, then `kv_store` of the rotated `k` and of `v`. The
    /// default runs the three; a backend may fuse them (the CUDA backend does: one launch).
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_store(
        &self,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &Self::Buf,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        shape: AttnShape,
        inv_freq: &Self::Buf,
    ) {
        let (b, t, hd) = (shape.batch, shape.q_len, shape.head_dim);
        self.rope(q, b, t, shape.n_heads, hd, shape.start_pos, inv_freq);
        self.rope(k, b, t, shape.n_kv_heads, hd, shape.start_pos, inv_freq);
        self.kv_store(k, v, k_cache, v_cache, shape);
    }
    /// Causal grouped-query attention of `q [batch * q_len, q_dim]` against the caches.
    /// `key_mask` (`[batch, capacity]`, 1 = attend, 0 = padding; a side tensor) hides padded keys.
    fn attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        key_mask: Option<&Self::Buf>,
        out: &mut Self::Buf,
        shape: AttnShape,
    );
    /// `out = silu(gate) * up`, elementwise.
    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf, out: &mut Self::Buf);
    /// `out = x * keep / (1 - p)` elementwise, `keep` from [`dropout_mask`] at `seed` (`=`;
    /// `x` and `out` the same length and precision). LoRA dropout in the training forward;
    /// the same call on a gradient is its backward.
    fn dropout(&self, x: &Self::Buf, out: &mut Self::Buf, p: f32, seed: u64);
    /// Copies `rows` rows of width `dim`: `dst[dst_row + i] = src[src_rows[i]]`. `src` and `dst`
    /// may differ in precision (capturing bf16 activations into an f32 buffer).
    fn gather_rows(
        &self,
        src: &Self::Buf,
        src_rows: &[u32],
        dim: usize,
        dst: &mut Self::Buf,
        dst_row: usize,
    );
}

/// The backward op set, for training and attacks. Separate from [`Backend`] so a device can
/// run inference before its backward kernels exist.
pub trait BackwardOps: Backend {
    /// `out[m,n] = (accumulate ? out : 0) + scale * op(a) op(b)`: `op(a)` is `a [m,k]` or, with
    /// `trans_a`, `a [k,m]` transposed; `op(b)` is `b [k,n]` or, with `trans_b`, `b [n,k]` transposed.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        a: &Self::Buf,
        b: &Self::Buf,
        out: &mut Self::Buf,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        scale: f32,
        accumulate: bool,
    );
    /// `dx (+)= d rmsnorm(x) * w / dx` applied to `dy` (norm weights are frozen).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        dim: usize,
        eps: f32,
        dx: &mut Self::Buf,
        accumulate: bool,
    );
    /// Gradients of causal attention over whole sequences (`start_pos == 0`,
    /// `capacity == q_len`, so `k`/`v` are `[batch * q_len, kv_dim]`); writes (`=`) dq, dk, dv.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        key_mask: Option<&Self::Buf>,
        out: &Self::Buf,
        dout: &Self::Buf,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        shape: AttnShape,
    );
    /// Writes (`=`) `dgate` and `dup` for `out = silu(gate) * up`.
    fn swiglu_bwd(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        dout: &Self::Buf,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
    );
    /// `y += alpha * x`.
    fn axpy(&self, alpha: f32, x: &Self::Buf, y: &mut Self::Buf);
    /// The retain KL of [`crate::objectives::kl::kl_retain`] on logits that stay where they
    /// are (`[rows, vocab]`, `mask` per row): returns `weight * KL`, writes
    /// `weight * d KL / d tuned` into `grad` (`=`) when given.
    #[allow(clippy::too_many_arguments)]
    fn kl_retain(
        &self,
        orig: &Self::Buf,
        tuned: &Self::Buf,
        mask: &[f64],
        batch: usize,
        vocab: usize,
        temperature: f64,
        weight: f64,
        grad: Option<&mut Self::Buf>,
    ) -> anyhow::Result<f64>;
    /// The attack loss of [`crate::objectives::ce::target_ce_groups`] on logits that stay
    /// where they are (`[rows, vocab]`): per group of `(row, token)` targets its mean CE and
    /// whether every target token is its row's argmax. Writes the gradient of the sum of the
    /// group means into `grad` (`=`, `[rows, vocab]`; zero on every row that is no target)
    /// when given. Only two numbers per target row leave the device.
    fn target_ce(
        &self,
        logits: &Self::Buf,
        vocab: usize,
        groups: &[&[(usize, u32)]],
        grad: Option<&mut Self::Buf>,
    ) -> anyhow::Result<Vec<(f64, bool)>>;
    /// One PGD update of soft tokens `e` (f32 `[rows, dim]`) with gradient `grad` and ball
    /// centre `init` (f32): [`crate::attack::pgd::update_step`] where the buffers live. `adam`
    /// is the Adam state, created on the first Adam step (f32 moments, like `e`).
    #[allow(clippy::too_many_arguments)]
    fn pgd_step(
        &self,
        update: crate::attack::pgd::Update,
        e: &mut Self::Buf,
        grad: &Self::Buf,
        init: &Self::Buf,
        adam: &mut Option<crate::attack::pgd::DeviceAdam<Self::Buf>>,
        step: f32,
        ball: crate::attack::pgd::Ball,
        dim: usize,
    ) -> anyhow::Result<()>;
    /// One AdamW step of f32 parameters `p` with gradient `g * grad_scale` and f32 moments
    /// `m`, `v` at step `t` (1-based): [`crate::train::adamw::adamw_step`] where the buffers live.
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        &self,
        cfg: &crate::train::adamw::AdamWConfig,
        t: u64,
        p: &mut Self::Buf,
        g: &Self::Buf,
        grad_scale: f32,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
    );
    /// `(|a|^2, |b|^2, a.b, |a - b|^2)` per row of `x` (`[rows, dim]`), with
    /// `a = scale_r x_r` and `b = scale_r y_r`, or `b = y` (a `[dim]` vector) when `y_vec`.
    /// The representation objectives' distances and gradients are functions of these.
    fn row_stats(
        &self,
        x: &Self::Buf,
        y: &Self::Buf,
        y_vec: bool,
        scale: Option<&[f32]>,
        dim: usize,
    ) -> anyhow::Result<Vec<[f64; 4]>>;
    /// `out_r (=|+=) cx_r x_r + cy_r y_r + cv_r v` for the rows of `out` (`[rows, dim]`): `x`,
    /// `y` are `[rows, dim]` and `v` a `[dim]` vector, each with its per-row coefficients.
    #[allow(clippy::type_complexity)]
    fn row_combine(
        &self,
        out: &mut Self::Buf,
        accumulate: bool,
        x: Option<(&Self::Buf, &[f32])>,
        y: Option<(&Self::Buf, &[f32])>,
        v: Option<(&Self::Buf, &[f32])>,
        dim: usize,
    );
}
