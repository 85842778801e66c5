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

    pub(super) fn kv_store_impl(
        &self,
        k: &CudaBuf,
        v: &CudaBuf,
        k_cache: &mut CudaBuf,
        v_cache: &mut CudaBuf,
        s: AttnShape,
    ) {
        s.check();
        let kvd = s.kv_dim();
        assert_eq!(k.len, s.batch * s.q_len * kvd, "kv_store: k size");
        assert_eq!(v.len, k.len, "kv_store: v size");
        assert_eq!(
            k_cache.len,
            s.batch * s.capacity * kvd,
            "kv_store: k_cache size"
        );
        assert_eq!(v_cache.len, k_cache.len, "kv_store: v_cache size");
        let dtype = k.dtype;
        assert!(
            v.dtype == dtype && k_cache.dtype == dtype && v_cache.dtype == dtype,
            "kv_store: k, v and the caches must share a dtype"
        );
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
        let plan = self.attention_plan(s, dtype);
        let rows_total = s.batch * s.q_len * s.n_heads;

        let mut scratch = self
            .dev
            .attn_scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner());
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
        ];
        args.extend(ints.map(Arg::I32));
        args.extend([Arg::F32(scale_log2), Arg::I32(rpb)]);
        // SAFETY: attention_T_hdD(const T* q, const T* k_cache, const T* v_cache, const void*
        // mask, int, T* out, float* part_o, float* part_ml, int x 8, float, int); sizes checked
        // above; with splits > 1 the partials hold splits * rows_total * (hd + 2) floats.
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
                Arg::I64(rows_i),
                Arg::I32(hd_i),
                Arg::I32(splits_i),
            ];
            // SAFETY: attention_combine_T(const float* part_o, const float* part_ml, T* out,
            // long long rows, int head_dim, int n_splits); the partials were written by the
            // launch above on the same stream.
            unsafe { self.launch(&name, cfg, &mut args) };
        }
    }
}
