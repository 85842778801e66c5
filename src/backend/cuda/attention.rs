//! Launchers of kernels/attention.cu (CPU twin: backend/cpu/attention.rs): KV-cache store,
//! flash attention with an optional key split (flash-decoding) and the split combine.

use super::device::{int, Arg, CudaBackend, CudaBuf, DType};
use crate::backend::AttnShape;
use cudarc::driver::LaunchConfig;

/// Threads of an attention block (4 warps; kernels/attention.cu kWarps).
const ATTN_THREADS: u32 = 128;
/// Fewest keys a split is given: below this the combine costs more than the split saves.
const MIN_KEYS_PER_SPLIT: usize = 128;
const MAX_SPLITS: usize = 64;

/// How `attention` will run a shape: entry point, query rows per block, key splits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionPlan {
    pub entry: String,
    pub rows_per_block: usize,
    /// 1: one pass writes the output; more: partials per key range, then a combine kernel.
    pub splits: usize,
    pub keys_per_split: usize,
    pub grid: (u32, u32, u32),
}

impl CudaBackend {
    /// The kernel, tiling and key split `attention` uses. Splits only when the query rows alone
    /// leave SMs idle (decode, short prompts over a long cache).
    pub fn attention_plan(&self, s: AttnShape, dtype: DType) -> AttentionPlan {
        let hd = s.head_dim;
        let (hd_class, rows_per_warp) = match hd {
            1..=32 => (32, 4),
            33..=64 => (64, 4),
            65..=128 => (128, 4),
            129..=256 if dtype == DType::BF16 => (256, 2),
            _ => panic!(
                "attention: head_dim {hd} unsupported for {dtype:?} (bf16 up to 256, f32 up to 128)"
            ),
        };
        let rows_per_block = 4 * rows_per_warp;
        let group = s.n_heads / s.n_kv_heads;
        let row_blocks = (s.q_len * group).div_ceil(rows_per_block);
        let blocks = row_blocks * s.batch * s.n_kv_heads;
        let kv_len = s.kv_len();
        let mut splits = 1;
        if blocks < self.sm_count() && kv_len >= 2 * MIN_KEYS_PER_SPLIT {
            let want = (2 * self.sm_count()).div_ceil(blocks);
            splits = want.min(kv_len / MIN_KEYS_PER_SPLIT).clamp(1, MAX_SPLITS);
        }
        // Whole 32-key tiles per split, then drop splits that would be empty.
        let keys_per_split = kv_len.div_ceil(splits).next_multiple_of(32);
        let splits = kv_len.div_ceil(keys_per_split);
        assert!(
            s.batch * s.n_kv_heads < 65536,
            "attention: batch * n_kv_heads >= 65536"
        );
        AttentionPlan {
            entry: format!("attention_{}_hd{hd_class}", dtype.suffix()),
            rows_per_block,
            splits,
            keys_per_split,
            grid: (
                int(row_blocks, "attention row blocks") as u32,
                (s.batch * s.n_kv_heads) as u32,
                splits as u32,
            ),
        }
    }

    /// The preconditions of writing `k` and `v` into the caches at `s.start_pos` (`kv_store`,
    /// `rope_kv_store`): the shape's own, sizes, and one dtype for all four.
    pub(super) fn check_kv_store(
        op: &str,
        k: &CudaBuf,
        v: &CudaBuf,
        k_cache: &CudaBuf,
        v_cache: &CudaBuf,
        s: AttnShape,
    ) {
        s.check();
        let kvd = s.kv_dim();
        assert_eq!(k.len, s.batch * s.q_len * kvd, "{op}: k size");
        assert_eq!(v.len, k.len, "{op}: v size");
        assert_eq!(
            k_cache.len,
            s.batch * s.capacity * kvd,
            "{op}: k_cache size"
        );
        assert_eq!(v_cache.len, k_cache.len, "{op}: v_cache size");
        assert!(
            [v.dtype, k_cache.dtype, v_cache.dtype]
                .iter()
                .all(|&d| d == k.dtype),
            "{op}: k, v and the caches must share a dtype"
        );
    }

    pub(super) fn kv_store_impl(
        &self,
        k: &CudaBuf,
        v: &CudaBuf,
        k_cache: &mut CudaBuf,
        v_cache: &mut CudaBuf,
        s: AttnShape,
    ) {
        Self::check_kv_store("kv_store", k, v, k_cache, v_cache, s);
        let (kvd, dtype) = (s.kv_dim(), k.dtype);
        let n = int(k.len, "kv_store elements") as usize;
        let name = format!("kv_store_{}", dtype.suffix());
        let (batch, q_len, start, cap, kvd_i) = (
            int(s.batch, "batch"),
            int(s.q_len, "q_len"),
            int(s.start_pos, "start_pos"),
            int(s.capacity, "capacity"),
            int(kvd, "kv_dim"),
        );
        let blocks = n.div_ceil(256 * 8).clamp(1, self.sm_count() * 16);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = [
            Arg::In(k),
            Arg::In(v),
            Arg::Out(k_cache),
            Arg::Out(v_cache),
            Arg::I32(batch),
            Arg::I32(q_len),
            Arg::I32(start),
            Arg::I32(cap),
            Arg::I32(kvd_i),
        ];
        // SAFETY: kv_store_T(const T* k, const T* v, T* k_cache, T* v_cache, int batch,
        // int q_len, int start_pos, int capacity, int kv_dim); sizes and the cache range
        // (s.check) verified above.
        unsafe { self.launch(&name, cfg, &mut args) };
    }

    pub(super) fn attention_impl(
        &self,
        q: &CudaBuf,
        k_cache: &CudaBuf,
        v_cache: &CudaBuf,
        key_mask: Option<&CudaBuf>,
        out: &mut CudaBuf,
        s: AttnShape,
    ) {
        self.attention_launch(q, k_cache, v_cache, key_mask, out, None, s)
    }

    /// `attention` that also writes each row's log-sum-exp (`lse`: f32, `[batch * q_len *
    /// n_heads]`, row `(b * q_len + t) * n_heads + h`, log2 units of the scores
    /// `q.k log2(e) / sqrt(head_dim)`, `-inf` for a row that sees no key): what
    /// [`Self::attention_bwd_with_lse`] needs to recompute the softmax.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_with_lse(
        &self,
        q: &CudaBuf,
        k_cache: &CudaBuf,
        v_cache: &CudaBuf,
        key_mask: Option<&CudaBuf>,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        s: AttnShape,
    ) {
        self.attention_launch(q, k_cache, v_cache, key_mask, out, Some(lse), s)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_launch(
        &self,
        q: &CudaBuf,
        k_cache: &CudaBuf,
        v_cache: &CudaBuf,
        key_mask: Option<&CudaBuf>,
        out: &mut CudaBuf,
        lse: Option<&mut CudaBuf>,
        s: AttnShape,
    ) {
        s.check();
        let (qd, kvd, hd) = (s.q_dim(), s.kv_dim(), s.head_dim);
        assert_eq!(q.len, s.batch * s.q_len * qd, "attention: q size");
        assert_eq!(out.len, q.len, "attention: out size");
        assert_eq!(
            k_cache.len,
            s.batch * s.capacity * kvd,
            "attention: k_cache size"
        );
        assert_eq!(v_cache.len, k_cache.len, "attention: v_cache size");
        if let Some(m) = key_mask {
            assert_eq!(m.len, s.batch * s.capacity, "attention: key_mask size");
        }
        let dtype = q.dtype;
        assert!(
            k_cache.dtype == dtype && v_cache.dtype == dtype && out.dtype == dtype,
            "attention: q, caches and out must share a dtype"
        );
        // A replayed decode step reads its position on the device: the grid covers the whole
        // cache, and splits past the keys find none (kernels/attention.cu pos_dev).
        let pos_dev = self.step_pos(s);
        let plan = if pos_dev != 0 {
            self.attention_plan(
                AttnShape {
                    start_pos: s.capacity - s.q_len,
                    ..s
                },
                dtype,
            )
        } else {
            self.attention_plan(s, dtype)
        };
        let rows_total = s.batch * s.q_len * s.n_heads;
        let lse_ptr: u64 = match lse {
            Some(l) => {
                assert_eq!(l.dtype, DType::F32, "attention: lse must be f32");
                assert_eq!(
                    l.len, rows_total,
                    "attention: lse is not [batch * q_len * n_heads]"
                );
                self.addr(l)
            }
            None => 0,
        };

        let mut scratch = self.attn_scratch.lock().unwrap_or_else(|p| p.into_inner());
        let part_len = if plan.splits > 1 {
            plan.splits * rows_total * (hd + 2)
        } else {
            0
        };
        if part_len > 0 && scratch.as_ref().is_none_or(|b| b.len() < part_len) {
            *scratch = Some(
                self.stream()
                    .alloc_zeros::<f32>(part_len)
                    .unwrap_or_else(|e| panic!("attention: allocating split partials: {e}")),
            );
        }
        // part_o: the first splits * rows_total * hd floats; part_ml: 2 * splits * rows_total after.
        let (part_o, part_ml) = match scratch.as_ref() {
            Some(buf) if plan.splits > 1 => {
                let base = self.addr_f32(buf);
                (base, base + (plan.splits * rows_total * hd * 4) as u64)
            }
            _ => (0u64, 0u64),
        };
        let mask_ptr: u64 = key_mask.map_or(0, |m| self.addr(m));
        let mask_f32 = key_mask.map_or(0, |m| m.dtype.flag());
        let ints = [
            int(s.batch, "batch"),
            int(s.q_len, "q_len"),
            int(s.start_pos, "start_pos"),
            int(s.capacity, "capacity"),
            int(s.n_heads, "n_heads"),
            int(s.n_kv_heads, "n_kv_heads"),
            int(hd, "head_dim"),
            int(plan.keys_per_split, "keys per split"),
        ];
        let scale_log2 = std::f32::consts::LOG2_E / (hd as f32).sqrt();
        let rpb = int(plan.rows_per_block, "rows per block");
        let cfg = LaunchConfig {
            grid_dim: plan.grid,
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = vec![
            Arg::In(q),
            Arg::In(k_cache),
            Arg::In(v_cache),
            Arg::Ptr(mask_ptr),
            Arg::I32(mask_f32),
            Arg::Out(out),
            Arg::Ptr(part_o),
            Arg::Ptr(part_ml),
            Arg::Ptr(lse_ptr),
        ];
        args.extend(ints[..3].iter().map(|&v| Arg::I32(v)));
        args.push(Arg::Ptr(pos_dev));
        args.extend(ints[3..].iter().map(|&v| Arg::I32(v)));
        args.extend([Arg::F32(scale_log2), Arg::I32(rpb)]);
        // SAFETY: attention_T_hdD(const T* q, const T* k_cache, const T* v_cache, const void*
        // mask, int, T* out, float* part_o, float* part_ml, float* lse, int x 3, const u32*
        // pos_dev, int x 5, float, int);
        // sizes checked above; with splits > 1 the partials hold splits * rows_total * (hd + 2)
        // floats; lse is null (single pass and combine skip it) or rows_total floats.
        unsafe { self.launch(&plan.entry, cfg, &mut args) };

        if plan.splits > 1 {
            let name = format!("attention_combine_{}", dtype.suffix());
            let rows_i = rows_total as i64;
            let (hd_i, splits_i) = (int(hd, "head_dim"), int(plan.splits, "splits"));
            let cfg = LaunchConfig {
                grid_dim: (int(rows_total, "attention rows") as u32, 1, 1),
                block_dim: ((hd.next_multiple_of(32)).min(1024) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut args = [
                Arg::Ptr(part_o),
                Arg::Ptr(part_ml),
                Arg::Out(out),
                Arg::Ptr(lse_ptr),
                Arg::I64(rows_i),
                Arg::I32(hd_i),
                Arg::I32(splits_i),
            ];
            // SAFETY: attention_combine_T(const float* part_o, const float* part_ml, T* out,
            // float* lse, long long rows, int head_dim, int n_splits); the partials were written by the
            // launch above on the same stream.
            unsafe { self.launch(&name, cfg, &mut args) };
        }
    }

    /// Backward of causal attention over whole sequences (`start_pos == 0`, `capacity == q_len`),
    /// given the forward's `lse` (see [`Self::attention_with_lse`]): writes (`=`) dq, dk, dv.
    /// Three launches: `dsum = rowsum(dout * out)`, dq by query-row blocks, dk/dv by key blocks
    /// (each key block sums every query head of its group, so no atomics and a fixed order).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd_with_lse(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        key_mask: Option<&CudaBuf>,
        out: &CudaBuf,
        lse: &CudaBuf,
        dout: &CudaBuf,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        s: AttnShape,
    ) {
        s.check();
        assert!(
            s.start_pos == 0 && s.capacity == s.q_len,
            "attention_bwd: needs a whole sequence {s:?}"
        );
        let (qd, kvd, hd, seq) = (s.q_dim(), s.kv_dim(), s.head_dim, s.q_len);
        let rows_total = s.batch * seq * s.n_heads;
        assert!(
            q.len == s.batch * seq * qd && out.len == q.len && dout.len == q.len && dq.len == q.len,
            "attention_bwd: q, out, dout, dq must be [batch * seq, q_dim] ({s:?})"
        );
        assert!(
            k.len == s.batch * seq * kvd && v.len == k.len && dk.len == k.len && dv.len == k.len,
            "attention_bwd: k, v, dk, dv must be [batch * seq, kv_dim] ({s:?})"
        );
        assert!(
            lse.dtype == DType::F32 && lse.len == rows_total,
            "attention_bwd: lse must be f32 [batch * seq * n_heads]"
        );
        if let Some(m) = key_mask {
            assert_eq!(m.len, s.batch * seq, "attention_bwd: key_mask size");
        }
        let dtype = q.dtype;
        assert!(
            [k.dtype, v.dtype, out.dtype, dout.dtype, dq.dtype, dk.dtype, dv.dtype]
                .iter()
                .all(|&d| d == dtype),
            "attention_bwd: q, k, v, out, dout, dq, dk, dv must share a dtype"
        );
        let (hd_class, rpw_q, rpw_kv) = match (hd, dtype) {
            (1..=32, _) => (32, 4, 4),
            (33..=64, _) => (64, 4, 4),
            (65..=128, DType::BF16) => (128, 4, 4),
            (65..=128, DType::F32) => (128, 2, 2),
            (129..=256, DType::BF16) => (256, 1, 2),
            _ => panic!(
                "attention_bwd: head_dim {hd} unsupported for {dtype:?} (bf16 up to 256, f32 up to 128)"
            ),
        };
        assert!(
            s.batch * s.n_kv_heads < 65536,
            "attention_bwd: batch * n_kv_heads >= 65536"
        );
        let sfx = dtype.suffix();

        let mut dsum = self
            .alloc_dtype(rows_total, DType::F32)
            .unwrap_or_else(|e| panic!("attention_bwd: allocating dsum: {e}"));
        let cfg = LaunchConfig {
            grid_dim: (
                int(rows_total.div_ceil(4), "attention_bwd rows") as u32,
                1,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = [
            Arg::In(out),
            Arg::In(dout),
            Arg::Out(&mut dsum),
            Arg::I64(rows_total as i64),
            Arg::I32(int(hd, "head_dim")),
        ];
        // SAFETY: attention_bwd_prep_T(const T* out, const T* dout, float* dsum, long long rows,
        // int head_dim); out/dout hold rows_total * hd values, dsum rows_total.
        unsafe { self.launch(&format!("attention_bwd_prep_{sfx}"), cfg, &mut args) };

        let mask_ptr: u64 = key_mask.map_or(0, |m| self.addr(m));
        let mask_f32 = key_mask.map_or(0, |m| m.dtype.flag());
        let scale = 1.0 / (hd as f32).sqrt();
        let scale_log2 = std::f32::consts::LOG2_E * scale;
        let dims = [
            Arg::I32(int(seq, "seq")),
            Arg::I32(int(s.n_heads, "n_heads")),
            Arg::I32(int(s.n_kv_heads, "n_kv_heads")),
            Arg::I32(int(hd, "head_dim")),
            Arg::F32(scale_log2),
            Arg::F32(scale),
        ];
        let group = s.n_heads / s.n_kv_heads;
        let (q_rows, kv_keys) = (4 * rpw_q, 4 * rpw_kv);
        let cfg_q = LaunchConfig {
            grid_dim: (
                int((seq * group).div_ceil(q_rows), "attention_bwd row blocks") as u32,
                (s.batch * s.n_kv_heads) as u32,
                1,
            ),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = vec![
            Arg::In(q),
            Arg::In(k),
            Arg::In(v),
            Arg::Ptr(mask_ptr),
            Arg::I32(mask_f32),
            Arg::In(dout),
            Arg::In(lse),
            Arg::In(&dsum),
            Arg::Out(dq),
        ];
        args.extend(dims.iter().map(copy_scalar));
        args.push(Arg::I32(q_rows as i32));
        // SAFETY: attention_bwd_dq_T_hdD(const T* q, const T* k, const T* v, const void* mask,
        // int, const T* dout, const float* lse, const float* dsum, T* dq, int seq, int n_heads,
        // int n_kv_heads, int head_dim, float, float, int rows_per_block); sizes checked above.
        unsafe {
            self.launch(
                &format!("attention_bwd_dq_{sfx}_hd{hd_class}"),
                cfg_q,
                &mut args,
            )
        };

        let cfg_kv = LaunchConfig {
            grid_dim: (
                int(seq.div_ceil(kv_keys), "attention_bwd key blocks") as u32,
                (s.batch * s.n_kv_heads) as u32,
                1,
            ),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = vec![
            Arg::In(q),
            Arg::In(k),
            Arg::In(v),
            Arg::Ptr(mask_ptr),
            Arg::I32(mask_f32),
            Arg::In(dout),
            Arg::In(lse),
            Arg::In(&dsum),
            Arg::Out(dk),
            Arg::Out(dv),
        ];
        args.extend(dims.iter().map(copy_scalar));
        args.push(Arg::I32(kv_keys as i32));
        // SAFETY: attention_bwd_dkv_T_hdD(..., T* dk, T* dv, int seq, int n_heads, int n_kv_heads,
        // int head_dim, float, float, int keys_per_block); sizes checked above.
        unsafe {
            self.launch(
                &format!("attention_bwd_dkv_{sfx}_hd{hd_class}"),
                cfg_kv,
                &mut args,
            )
        };
    }

    /// The `BackwardOps::attention_bwd` entry: the trait passes no lse, so the forward is rerun
    /// into scratch to get it (one extra forward per layer), then [`Self::attention_bwd_with_lse`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_bwd_impl(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        key_mask: Option<&CudaBuf>,
        out: &CudaBuf,
        dout: &CudaBuf,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        s: AttnShape,
    ) {
        let rows_total = s.batch * s.q_len * s.n_heads;
        let mut lse = self
            .alloc_dtype(rows_total, DType::F32)
            .unwrap_or_else(|e| panic!("attention_bwd: allocating lse: {e}"));
        let mut scratch = self
            .alloc_dtype(q.len, q.dtype)
            .unwrap_or_else(|e| panic!("attention_bwd: allocating scratch: {e}"));
        self.attention_with_lse(q, k, v, key_mask, &mut scratch, &mut lse, s);
        self.attention_bwd_with_lse(q, k, v, key_mask, out, &lse, dout, dq, dk, dv, s);
    }
}

/// The scalar arguments shared by the two backward launches (buffers are never copied).
fn copy_scalar<'a>(a: &Arg<'_>) -> Arg<'a> {
    match a {
        Arg::I32(v) => Arg::I32(*v),
        Arg::I64(v) => Arg::I64(*v),
        Arg::F32(v) => Arg::F32(*v),
        Arg::Ptr(v) => Arg::Ptr(*v),
        _ => unreachable!("only scalars are shared"),
    }
}
