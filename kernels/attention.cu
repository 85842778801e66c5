// Causal grouped-query attention against the KV cache, flash style (online softmax, one pass
// over the keys, scores never stored), for prefill and for decode.
// CPU twin: src/backend/cpu/attention.rs; launcher: src/backend/cuda/attention.rs.
//
// Contract (T = bf16 or f32 for q, caches, out; all row-major)
//   kv_store_T:   k, v [batch * q_len, kv_dim] -> k_cache, v_cache [batch, capacity, kv_dim] at
//                 rows start_pos .. start_pos + q_len of each sequence.            (=)
//   attention_T_hdD (head_dim <= D, D in 32/64/128/256):
//     q       [batch * q_len, n_heads * head_dim]
//     caches  [batch, capacity, n_kv_heads * head_dim], keys 0 .. start_pos + q_len valid
//     mask    [batch, capacity] side tensor (f32 or bf16, 1 = attend, 0 = padding) or null
//     out     [batch * q_len, n_heads * head_dim]
//     out[b, t, h] = softmax_j(q . k_j / sqrt(head_dim)) v_j over j <= start_pos + t with
//     mask[b, j] != 0, query head h reading KV head h / (n_heads / n_kv_heads); a row that sees
//     no key gets zeros.                                                            (=)
//     With n_splits > 1 the keys are cut into n_splits ranges of kv_per_split (flash-decoding:
//     decode has too few query rows to fill the GPU), each block writes its unnormalised
//     partial (o, m, l) to part_o [n_splits, rows_total, head_dim] / part_ml [n_splits,
//     rows_total, 2] (f32, rows_total = batch * q_len * n_heads, row = (b*q_len + t)*n_heads + h)
//     and attention_combine_T merges them into out.
//     lse [rows_total] f32 or null: when given, the log-sum-exp of each row's scaled scores in
//     log2 units, m + log2(l) with scores q.k log2(e) / sqrt(head_dim); -inf for a row that
//     sees no key (=). Written by the single pass or by the combine. The backward reads it.
//   Launch: grid = (ceil(q_len * group / ROWS), batch * n_kv_heads, n_splits), block = 128
//     (4 warps), ROWS = 4 * RPW with RPW = 2 for D = 256 and 4 otherwise; the launcher passes
//     ROWS as `rows_per_block` and the kernel traps on a mismatch.
//   attention_combine_T: grid = rows_total, block = 128.
//   pos_dev [1] u32 or null: when given, start_pos is read there instead of the argument (a
//     replayed decode step's arguments are fixed; its position lives on the device). The grid
//     then covers the cache's capacity: splits past the keys find none and leave m = -inf,
//     l = 0, which the combine weighs 0.
//
// Work split: a block owns one (sequence, KV head) and ROWS query rows of that KV head's group
// (row = t * group + g), so each K/V tile loaded to shared memory serves all ROWS rows. Per
// 32-key tile, lane j scores key j for each of the warp's rows, the warp takes max and sum by
// shuffles, and for P.V each lane owns head dimensions lane + 32 c. Scores are kept in log2
// units (q pre-scaled by log2(e) / sqrt(head_dim)) so the exponentials are exp2.
#include "common.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kKeys = 32;  // keys per tile: one per lane

template <typename T> struct SmemPad;
template <> struct SmemPad<bf16> { static constexpr int v = 2; };   // K row = odd number of 32-bit words
template <> struct SmemPad<float> { static constexpr int v = 1; };

template <typename T, int DCH, int RPW>
__device__ __forceinline__ void attention_impl(const T* __restrict__ q, const T* __restrict__ k_cache,
                                               const T* __restrict__ v_cache, const void* __restrict__ mask,
                                               int mask_f32, T* __restrict__ out, float* __restrict__ part_o,
                                               float* __restrict__ part_ml, float* __restrict__ lse, int batch,
                                               int q_len, int start_pos, const uint32_t* __restrict__ pos_dev,
                                               int capacity, int n_heads, int n_kv_heads, int head_dim,
                                               int kv_per_split, float scale_log2, int rows_per_block) {
  constexpr int HDP = 32 * DCH;                 // head_dim padded to whole lanes
  constexpr int ROWS = kWarps * RPW;
  constexpr int KSTR = HDP + SmemPad<T>::v;     // K row stride (elements)
  __shared__ __align__(16) T ks[kKeys * KSTR];
  __shared__ __align__(16) T vs[kKeys * HDP];
  __shared__ float qs[ROWS][HDP];
  __shared__ float key_ok[kKeys];

  if (rows_per_block != ROWS) __trap();
  if (pos_dev != nullptr) start_pos = (int)*pos_dev;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = n_heads / n_kv_heads;
  const int rows_total = q_len * group;         // query rows of this (sequence, KV head)
  const int b = blockIdx.y / n_kv_heads, kvh = blockIdx.y % n_kv_heads;
  const int row0 = blockIdx.x * ROWS;
  const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
  const int n_splits = gridDim.z, split = blockIdx.z;

  // Pre-scaled queries of this block's rows; padding dims and missing rows are zero.
  for (int e = threadIdx.x; e < ROWS * HDP; e += blockDim.x) {
    const int r = e / HDP, d = e % HDP, R = row0 + r;
    float v = 0.0f;
    if (R < rows_total && d < head_dim) {
      const int t = R / group, h = kvh * group + R % group;
      v = to_f32(q[((long long)b * q_len + t) * q_dim + h * head_dim + d]) * scale_log2;
    }
    qs[r][d] = v;
  }

  // Keys this block can see: causal limit of its last row, then its split's range.
  const int last_t = (min(row0 + ROWS, rows_total) - 1) / group;  // grid sizing: row0 < rows_total
  const int block_end = start_pos + last_t + 1;
  const int k_begin = split * kv_per_split;
  const int k_end = min(k_begin + kv_per_split, block_end);

  float m[RPW], l[RPW], o[RPW][DCH];
  int limit[RPW];  // last key index row r may see; -1 for rows past the end
#pragma unroll
  for (int r = 0; r < RPW; r++) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < DCH; c++) o[r][c] = 0.0f;
    const int R = row0 + warp * RPW + r;
    limit[r] = R < rows_total ? start_pos + R / group : -1;
  }

  const long long cache_base = (long long)b * capacity * kv_dim + (long long)kvh * head_dim;
  for (int j0 = k_begin; j0 < k_end; j0 += kKeys) {
    __syncthreads();  // previous tile fully consumed (and qs written, on the first pass)
    for (int e = threadIdx.x; e < kKeys * HDP; e += blockDim.x) {
      const int j = e / HDP, d = e % HDP, key = j0 + j;
      T kv = from_f32<T>(0.0f), vv = from_f32<T>(0.0f);
      if (key < k_end && d < head_dim) {
        const long long g = cache_base + (long long)key * kv_dim + d;
        kv = k_cache[g];
        vv = v_cache[g];
      }
      ks[j * KSTR + d] = kv;
      vs[j * HDP + d] = vv;
    }
    if (threadIdx.x < kKeys) {
      const int key = j0 + threadIdx.x;
      bool ok = key < k_end;
      if (ok && mask != nullptr) ok = load_side(mask, mask_f32, (long long)b * capacity + key) != 0.0f;
      key_ok[threadIdx.x] = ok ? 1.0f : 0.0f;
    }
    __syncthreads();

    // Scores: lane j against key j0 + j, for each of this warp's rows.
    float s[RPW];
#pragma unroll
    for (int r = 0; r < RPW; r++) s[r] = 0.0f;
    const T* krow = ks + lane * KSTR;
#pragma unroll 8
    for (int d = 0; d < HDP; d++) {
      const float kd = to_f32(krow[d]);
#pragma unroll
      for (int r = 0; r < RPW; r++) s[r] = fmaf(qs[warp * RPW + r][d], kd, s[r]);
    }
    const int key = j0 + lane;
    float p[RPW];
    bool any = false;
#pragma unroll
    for (int r = 0; r < RPW; r++) {
      const bool visible = key_ok[lane] != 0.0f && key <= limit[r];
      s[r] = visible ? s[r] : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(s[r]));
      p[r] = 0.0f;
      if (m_new != -INFINITY) {  // else nothing visible to this row yet (uniform across the warp)
        p[r] = exp2f(s[r] - m_new);
        const float alpha = exp2f(m[r] - m_new);
        l[r] = l[r] * alpha + warp_sum(p[r]);
#pragma unroll
        for (int c = 0; c < DCH; c++) o[r][c] *= alpha;
        m[r] = m_new;
        any = true;
      }
    }
    if (!any) continue;
    // P.V: broadcast each key's probability, lane owns dims lane + 32 c.
    for (int j = 0; j < kKeys; j++) {
      float pj[RPW];
      bool nz = false;
#pragma unroll
      for (int r = 0; r < RPW; r++) {
        pj[r] = __shfl_sync(0xffffffffu, p[r], j);
        nz |= pj[r] != 0.0f;
      }
      if (!nz) continue;  // masked or beyond every row's causal limit (uniform)
#pragma unroll
      for (int c = 0; c < DCH; c++) {
        const float vd = to_f32(vs[j * HDP + lane + 32 * c]);
#pragma unroll
        for (int r = 0; r < RPW; r++) o[r][c] = fmaf(pj[r], vd, o[r][c]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RPW; r++) {
    const int R = row0 + warp * RPW + r;
    if (R >= rows_total) continue;
    const int t = R / group, h = kvh * group + R % group;
    const long long grow = ((long long)b * q_len + t) * n_heads + h;
    if (n_splits == 1) {
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
      for (int c = 0; c < DCH; c++) {
        const int d = lane + 32 * c;
        if (d < head_dim) out[grow * head_dim + d] = from_f32<T>(o[r][c] * inv);
      }
      if (lse != nullptr && lane == 0) lse[grow] = l[r] > 0.0f ? m[r] + log2f(l[r]) : -INFINITY;
    } else {
      const long long prow = (long long)split * batch * q_len * n_heads + grow;
#pragma unroll
      for (int c = 0; c < DCH; c++) {
        const int d = lane + 32 * c;
        if (d < head_dim) part_o[prow * head_dim + d] = o[r][c];
      }
      if (lane == 0) {
        part_ml[prow * 2] = m[r];
        part_ml[prow * 2 + 1] = l[r];
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void combine_impl(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                             T* __restrict__ out, float* __restrict__ lse, long long rows_total,
                                             int head_dim, int n_splits) {
  const long long row = blockIdx.x;
  float mx = -INFINITY;
  for (int s = 0; s < n_splits; s++) mx = fmaxf(mx, part_ml[(s * rows_total + row) * 2]);
  float denom = 0.0f;
  if (mx != -INFINITY)
    for (int s = 0; s < n_splits; s++) {
      const float ms = part_ml[(s * rows_total + row) * 2];
      denom += exp2f(ms - mx) * part_ml[(s * rows_total + row) * 2 + 1];
    }
  const float inv = denom > 0.0f ? 1.0f / denom : 0.0f;
  if (lse != nullptr && threadIdx.x == 0) lse[row] = denom > 0.0f ? mx + log2f(denom) : -INFINITY;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    if (inv != 0.0f)
      for (int s = 0; s < n_splits; s++) {
        const float ms = part_ml[(s * rows_total + row) * 2];
        const float wgt = ms == -INFINITY ? 0.0f : exp2f(ms - mx);
        acc += wgt * part_o[(s * rows_total + row) * head_dim + d];
      }
    out[row * head_dim + d] = from_f32<T>(acc * inv);
  }
}

template <typename T>
__device__ __forceinline__ void kv_store_impl(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache,
                                              T* __restrict__ v_cache, int batch, int q_len, int start_pos,
                                              int capacity, int kv_dim) {
  // 32-bit index math (the launcher checks batch * q_len * kv_dim < 2^31): 64-bit division
  // is a slow software routine.
  const int n = batch * q_len * kv_dim;
  const int stride = gridDim.x * blockDim.x;
  constexpr int N = Pack16<T>::N;
  const int vec = kv_dim % N == 0 ? N : 1;  // elements per step
  const int row_steps = kv_dim / vec;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n / vec; i += stride) {
    const int row = i / row_steps, c = (i - row * row_steps) * vec;
    const int b = row / q_len, t = row - b * q_len;
    const long long src = (long long)row * kv_dim + c;
    const long long dst = ((long long)b * capacity + start_pos + t) * kv_dim + c;
    if (vec == N) {
      Pack16<T>::load(k + src).store(k_cache + dst);
      Pack16<T>::load(v + src).store(v_cache + dst);
    } else {
      k_cache[dst] = k[src];
      v_cache[dst] = v[src];
    }
  }
}

}  // namespace

#define ATTENTION_ENTRY(SUFFIX, T, DCH, RPW)                                                         \
  extern "C" __global__ void __launch_bounds__(kWarps * 32, 4) attention_##SUFFIX(                      \
      const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,         \
      const void* __restrict__ mask, int mask_f32, T* __restrict__ out, float* __restrict__ part_o,  \
      float* __restrict__ part_ml, float* __restrict__ lse, int batch, int q_len, int start_pos,     \
      const uint32_t* __restrict__ pos_dev, int capacity, int n_heads, int n_kv_heads, int head_dim, \
      int kv_per_split, float scale_log2, int rows_per_block) {                                      \
    attention_impl<T, DCH, RPW>(q, k_cache, v_cache, mask, mask_f32, out, part_o, part_ml, lse, batch, q_len, \
                                start_pos, pos_dev, capacity, n_heads, n_kv_heads, head_dim, kv_per_split,    \
                                scale_log2, rows_per_block);                                         \
  }

ATTENTION_ENTRY(bf16_hd32, bf16, 1, 4)
ATTENTION_ENTRY(bf16_hd64, bf16, 2, 4)
ATTENTION_ENTRY(bf16_hd128, bf16, 4, 4)
ATTENTION_ENTRY(bf16_hd256, bf16, 8, 2)
ATTENTION_ENTRY(f32_hd32, float, 1, 4)
ATTENTION_ENTRY(f32_hd64, float, 2, 4)
ATTENTION_ENTRY(f32_hd128, float, 4, 4)

#define ATTENTION_AUX_ENTRIES(SUFFIX, T)                                                             \
  extern "C" __global__ void __launch_bounds__(1024) attention_combine_##SUFFIX(                     \
      const float* __restrict__ part_o, const float* __restrict__ part_ml, T* __restrict__ out,       \
      float* __restrict__ lse, long long rows_total, int head_dim, int n_splits) {                   \
    combine_impl<T>(part_o, part_ml, out, lse, rows_total, head_dim, n_splits);                      \
  }                                                                                                  \
  extern "C" __global__ void __launch_bounds__(1024) kv_store_##SUFFIX(                              \
      const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache, T* __restrict__ v_cache, \
      int batch, int q_len, int start_pos, int capacity, int kv_dim) {                               \
    kv_store_impl<T>(k, v, k_cache, v_cache, batch, q_len, start_pos, capacity, kv_dim);             \
  }

ATTENTION_AUX_ENTRIES(bf16, bf16)
ATTENTION_AUX_ENTRIES(f32, float)

// ---------------------------------------------------------------------------------------------
// Backward, flash style: the softmax is recomputed from the forward's log-sum-exp, never stored.
//
// Contract (whole sequences: start_pos = 0, capacity = seq, so k, v are [batch * seq, kv_dim])
//   attention_bwd_prep_T: dsum[row] = sum_d dout[row, d] * out[row, d] for every (token, head)
//     row = (b * seq + t) * n_heads + h (f32 [batch * seq * n_heads], =). grid = ceil(rows / 4),
//     block = 128 (a warp per row).
//   With p_j = exp2(s_j - lse) (s_j = q.k_j log2(e)/sqrt(hd), 0 where masked or j > t) and
//   ds_j = p_j (dout . v_j - dsum):
//   attention_bwd_dq_T_hdD:  dq[row] = (1/sqrt(hd)) sum_j ds_j k_j                      (=)
//     grid = (ceil(seq * group / ROWS), batch * n_kv_heads), block = 128; ROWS = 4 * RPW query
//     rows of one KV head's group per block, as in the forward; 32-key K/V tiles in shared memory.
//   attention_bwd_dkv_T_hdD: dk[key] = (1/sqrt(hd)) sum_rows ds k-side, dv[key] = sum_rows p dout (=)
//     summed over every query head of the KV head's group (no atomics: a block owns KEYS = 4 * RPW
//     keys of one (sequence, KV head) and streams 32-row tiles of q and dout past them).
//     grid = (ceil(seq / KEYS), batch * n_kv_heads), block = 128.
//   Both trap when the launcher's rows/keys per block disagree with the instantiation.
// Rows whose lse is -inf (they saw no key) contribute nothing and get dq = 0.

namespace {

template <typename T>
__device__ __forceinline__ void attention_bwd_prep_impl(const T* __restrict__ out, const T* __restrict__ dout,
                                                        float* __restrict__ dsum, long long rows, int head_dim) {
  const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  float acc = 0.0f;
  for (int d = lane; d < head_dim; d += 32) acc = fmaf(to_f32(dout[row * head_dim + d]), to_f32(out[row * head_dim + d]), acc);
  acc = warp_sum(acc);
  if (lane == 0) dsum[row] = acc;
}

template <typename T, int DCH, int RPW>
__device__ __forceinline__ void attention_bwd_dq_impl(const T* __restrict__ q, const T* __restrict__ k,
                                                      const T* __restrict__ v, const void* __restrict__ mask,
                                                      int mask_f32, const T* __restrict__ dout,
                                                      const float* __restrict__ lse, const float* __restrict__ dsum,
                                                      T* __restrict__ dq, int seq, int n_heads, int n_kv_heads,
                                                      int head_dim, float scale_log2, float scale, int rows_per_block) {
  constexpr int HDP = 32 * DCH;
  constexpr int ROWS = kWarps * RPW;
  constexpr int KSTR = HDP + SmemPad<T>::v;  // both K and V are read a row per lane
  __shared__ __align__(16) T ks[kKeys * KSTR];
  __shared__ __align__(16) T vs[kKeys * KSTR];
  __shared__ float qs[ROWS][HDP];
  __shared__ float dos[ROWS][HDP];
  __shared__ float key_ok[kKeys];

  if (rows_per_block != ROWS) __trap();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = n_heads / n_kv_heads;
  const int rows_total = seq * group;
  const int b = blockIdx.y / n_kv_heads, kvh = blockIdx.y % n_kv_heads;
  const int row0 = blockIdx.x * ROWS;
  const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;

  // Pre-scaled queries exactly as the forward scaled them (same products, same order), so the
  // recomputed scores match the ones its lse was taken over.
  for (int e = threadIdx.x; e < ROWS * HDP; e += blockDim.x) {
    const int r = e / HDP, d = e % HDP, R = row0 + r;
    float qv = 0.0f, dv = 0.0f;
    if (R < rows_total && d < head_dim) {
      const int t = R / group, h = kvh * group + R % group;
      const long long g = ((long long)b * seq + t) * q_dim + h * head_dim + d;
      qv = to_f32(q[g]) * scale_log2;
      dv = to_f32(dout[g]);
    }
    qs[r][d] = qv;
    dos[r][d] = dv;
  }

  float acc[RPW][DCH], row_lse[RPW], row_d[RPW];
  int limit[RPW];
#pragma unroll
  for (int r = 0; r < RPW; r++) {
#pragma unroll
    for (int c = 0; c < DCH; c++) acc[r][c] = 0.0f;
    const int R = row0 + warp * RPW + r;
    limit[r] = -1;
    row_lse[r] = -INFINITY;
    row_d[r] = 0.0f;
    if (R < rows_total) {
      const int t = R / group, h = kvh * group + R % group;
      const long long grow = ((long long)b * seq + t) * n_heads + h;
      row_lse[r] = lse[grow];
      row_d[r] = dsum[grow];
      if (row_lse[r] != -INFINITY) limit[r] = t;
    }
  }

  const int last_t = (min(row0 + ROWS, rows_total) - 1) / group;
  const int k_end = last_t + 1;
  const long long base = (long long)b * seq * kv_dim + (long long)kvh * head_dim;
  for (int j0 = 0; j0 < k_end; j0 += kKeys) {
    __syncthreads();
    for (int e = threadIdx.x; e < kKeys * HDP; e += blockDim.x) {
      const int j = e / HDP, d = e % HDP, key = j0 + j;
      T kv = from_f32<T>(0.0f), vv = from_f32<T>(0.0f);
      if (key < k_end && d < head_dim) {
        const long long g = base + (long long)key * kv_dim + d;
        kv = k[g];
        vv = v[g];
      }
      ks[j * KSTR + d] = kv;
      vs[j * KSTR + d] = vv;
    }
    if (threadIdx.x < kKeys) {
      const int key = j0 + threadIdx.x;
      bool ok = key < k_end;
      if (ok && mask != nullptr) ok = load_side(mask, mask_f32, (long long)b * seq + key) != 0.0f;
      key_ok[threadIdx.x] = ok ? 1.0f : 0.0f;
    }
    __syncthreads();

    // Lane j: score and dout . v against key j0 + j, for each of the warp's rows.
    float s[RPW], dp[RPW];
#pragma unroll
    for (int r = 0; r < RPW; r++) s[r] = dp[r] = 0.0f;
    const T* krow = ks + lane * KSTR;
    const T* vrow = vs + lane * KSTR;
#pragma unroll 8
    for (int d = 0; d < HDP; d++) {
      const float kd = to_f32(krow[d]), vd = to_f32(vrow[d]);
#pragma unroll
      for (int r = 0; r < RPW; r++) {
        s[r] = fmaf(qs[warp * RPW + r][d], kd, s[r]);
        dp[r] = fmaf(dos[warp * RPW + r][d], vd, dp[r]);
      }
    }
    const int key = j0 + lane;
    float ds[RPW];
#pragma unroll
    for (int r = 0; r < RPW; r++) {
      const bool visible = key_ok[lane] != 0.0f && key <= limit[r];
      const float p = visible ? exp2f(s[r] - row_lse[r]) : 0.0f;
      ds[r] = p * (dp[r] - row_d[r]);
    }
    // dq += ds_j k_j: broadcast each key's ds, lane owns dims lane + 32 c.
    for (int j = 0; j < kKeys; j++) {
      float dj[RPW];
      bool nz = false;
#pragma unroll
      for (int r = 0; r < RPW; r++) {
        dj[r] = __shfl_sync(0xffffffffu, ds[r], j);
        nz |= dj[r] != 0.0f;
      }
      if (!__any_sync(0xffffffffu, nz)) continue;
#pragma unroll
      for (int c = 0; c < DCH; c++) {
        const float kd = to_f32(ks[j * KSTR + lane + 32 * c]);
#pragma unroll
        for (int r = 0; r < RPW; r++) acc[r][c] = fmaf(dj[r], kd, acc[r][c]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RPW; r++) {
    const int R = row0 + warp * RPW + r;
    if (R >= rows_total) continue;
    const int t = R / group, h = kvh * group + R % group;
    const long long g = ((long long)b * seq + t) * q_dim + h * head_dim;
#pragma unroll
    for (int c = 0; c < DCH; c++) {
      const int d = lane + 32 * c;
      if (d < head_dim) dq[g + d] = from_f32<T>(acc[r][c] * scale);
    }
  }
}

template <typename T, int DCH, int RPW>
__device__ __forceinline__ void attention_bwd_dkv_impl(const T* __restrict__ q, const T* __restrict__ k,
                                                       const T* __restrict__ v, const void* __restrict__ mask,
                                                       int mask_f32, const T* __restrict__ dout,
                                                       const float* __restrict__ lse, const float* __restrict__ dsum,
                                                       T* __restrict__ dk, T* __restrict__ dv, int seq, int n_heads,
                                                       int n_kv_heads, int head_dim, float scale_log2, float scale,
                                                       int keys_per_block) {
  constexpr int HDP = 32 * DCH;
  constexpr int KEYS = kWarps * RPW;
  constexpr int QROWS = 32;                  // query rows per tile: one per lane
  constexpr int QSTR = HDP + SmemPad<T>::v;  // q and dout rows are read a row per lane
  __shared__ __align__(16) T qt[QROWS * QSTR];
  __shared__ __align__(16) T dt[QROWS * QSTR];
  __shared__ __align__(16) T kb[KEYS * HDP];
  __shared__ __align__(16) T vb[KEYS * HDP];
  __shared__ float lse_t[QROWS], d_t[QROWS];
  __shared__ int tok_t[QROWS];

  if (keys_per_block != KEYS) __trap();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = n_heads / n_kv_heads;
  const int rows_total = seq * group;
  const int b = blockIdx.y / n_kv_heads, kvh = blockIdx.y % n_kv_heads;
  const int key0 = blockIdx.x * KEYS;
  const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
  const long long kv_base = (long long)b * seq * kv_dim + (long long)kvh * head_dim;

  for (int e = threadIdx.x; e < KEYS * HDP; e += blockDim.x) {
    const int j = e / HDP, d = e % HDP, key = key0 + j;
    T kv = from_f32<T>(0.0f), vv = from_f32<T>(0.0f);
    if (key < seq && d < head_dim) {
      const long long g = kv_base + (long long)key * kv_dim + d;
      kv = k[g];
      vv = v[g];
    }
    kb[j * HDP + d] = kv;
    vb[j * HDP + d] = vv;
  }

  float gk[RPW][DCH], gv[RPW][DCH];
  int my_key[RPW];  // -1: past the sequence or masked (its gradients are zero)
#pragma unroll
  for (int r = 0; r < RPW; r++) {
#pragma unroll
    for (int c = 0; c < DCH; c++) gk[r][c] = gv[r][c] = 0.0f;
    const int key = key0 + warp * RPW + r;
    bool ok = key < seq;
    if (ok && mask != nullptr) ok = load_side(mask, mask_f32, (long long)b * seq + key) != 0.0f;
    my_key[r] = ok ? key : -1;
  }

  // Only rows at or after the block's first key can see any of its keys (causal).
  for (int R0 = min(key0, seq) * group; R0 < rows_total; R0 += QROWS) {
    __syncthreads();  // previous tile consumed (and kb/vb written, on the first pass)
    for (int e = threadIdx.x; e < QROWS * HDP; e += blockDim.x) {
      const int i = e / HDP, d = e % HDP, R = R0 + i;
      T qv = from_f32<T>(0.0f), dd = from_f32<T>(0.0f);
      if (R < rows_total && d < head_dim) {
        const int t = R / group, h = kvh * group + R % group;
        const long long g = ((long long)b * seq + t) * q_dim + h * head_dim + d;
        qv = q[g];
        dd = dout[g];
      }
      qt[i * QSTR + d] = qv;
      dt[i * QSTR + d] = dd;
    }
    if (threadIdx.x < QROWS) {
      const int R = R0 + threadIdx.x;
      float l = -INFINITY, ds = 0.0f;
      int t = -1;
      if (R < rows_total) {
        t = R / group;
        const long long grow = ((long long)b * seq + t) * n_heads + kvh * group + R % group;
        l = lse[grow];
        ds = dsum[grow];
      }
      lse_t[threadIdx.x] = l;
      d_t[threadIdx.x] = ds;
      tok_t[threadIdx.x] = l == -INFINITY ? -1 : t;
    }
    __syncthreads();

    // Lane i: query row R0 + i against each of the warp's keys.
    float s[RPW], dp[RPW];
#pragma unroll
    for (int r = 0; r < RPW; r++) s[r] = dp[r] = 0.0f;
    const T* qrow = qt + lane * QSTR;
    const T* drow = dt + lane * QSTR;
#pragma unroll 8
    for (int d = 0; d < HDP; d++) {
      const float qd = to_f32(qrow[d]), dd = to_f32(drow[d]);
#pragma unroll
      for (int r = 0; r < RPW; r++) {
        s[r] = fmaf(qd, to_f32(kb[(warp * RPW + r) * HDP + d]), s[r]);
        dp[r] = fmaf(dd, to_f32(vb[(warp * RPW + r) * HDP + d]), dp[r]);
      }
    }
    const int tok = tok_t[lane];
    const float row_lse = lse_t[lane], row_d = d_t[lane];
    float p[RPW], ds[RPW];
#pragma unroll
    for (int r = 0; r < RPW; r++) {
      const bool visible = my_key[r] >= 0 && my_key[r] <= tok;
      p[r] = visible ? exp2f(s[r] * scale_log2 - row_lse) : 0.0f;
      ds[r] = p[r] * (dp[r] - row_d);
    }
    // dv += p_i dout_i, dk += ds_i q_i: broadcast each row's weights, lane owns dims lane + 32 c.
    for (int i = 0; i < QROWS; i++) {
      float pi[RPW], di[RPW];
      bool nz = false;
#pragma unroll
      for (int r = 0; r < RPW; r++) {
        pi[r] = __shfl_sync(0xffffffffu, p[r], i);
        di[r] = __shfl_sync(0xffffffffu, ds[r], i);
        nz |= pi[r] != 0.0f;
      }
      if (!__any_sync(0xffffffffu, nz)) continue;
#pragma unroll
      for (int c = 0; c < DCH; c++) {
        const float qd = to_f32(qt[i * QSTR + lane + 32 * c]);
        const float dd = to_f32(dt[i * QSTR + lane + 32 * c]);
#pragma unroll
        for (int r = 0; r < RPW; r++) {
          gv[r][c] = fmaf(pi[r], dd, gv[r][c]);
          gk[r][c] = fmaf(di[r], qd, gk[r][c]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RPW; r++) {
    const int key = key0 + warp * RPW + r;
    if (key >= seq) continue;
    const long long g = kv_base + (long long)key * kv_dim;
#pragma unroll
    for (int c = 0; c < DCH; c++) {
      const int d = lane + 32 * c;
      if (d < head_dim) {
        dk[g + d] = from_f32<T>(gk[r][c] * scale);
        dv[g + d] = from_f32<T>(gv[r][c]);
      }
    }
  }
}

}  // namespace

#define ATTENTION_BWD_ENTRIES(SUFFIX, T, DCH, RPW_Q, RPW_KV)                                         \
  extern "C" __global__ void __launch_bounds__(kWarps * 32, 4) attention_bwd_dq_##SUFFIX(               \
      const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const void* __restrict__ mask, \
      int mask_f32, const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dsum, \
      T* __restrict__ dq, int seq, int n_heads, int n_kv_heads, int head_dim, float scale_log2, float scale, \
      int rows_per_block) {                                                                          \
    attention_bwd_dq_impl<T, DCH, RPW_Q>(q, k, v, mask, mask_f32, dout, lse, dsum, dq, seq, n_heads, n_kv_heads, \
                                         head_dim, scale_log2, scale, rows_per_block);               \
  }                                                                                                  \
  extern "C" __global__ void __launch_bounds__(kWarps * 32, 4) attention_bwd_dkv_##SUFFIX(              \
      const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const void* __restrict__ mask, \
      int mask_f32, const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dsum, \
      T* __restrict__ dk, T* __restrict__ dv, int seq, int n_heads, int n_kv_heads, int head_dim,    \
      float scale_log2, float scale, int keys_per_block) {                                           \
    attention_bwd_dkv_impl<T, DCH, RPW_KV>(q, k, v, mask, mask_f32, dout, lse, dsum, dk, dv, seq, n_heads,   \
                                           n_kv_heads, head_dim, scale_log2, scale, keys_per_block); \
  }

// (suffix, T, dims per lane, query rows per warp of dq, keys per warp of dk/dv): the smaller
// counts keep the static shared memory of hd256 bf16 and hd128 f32 under 48 KiB.
ATTENTION_BWD_ENTRIES(bf16_hd32, bf16, 1, 4, 4)
ATTENTION_BWD_ENTRIES(bf16_hd64, bf16, 2, 4, 4)
ATTENTION_BWD_ENTRIES(bf16_hd128, bf16, 4, 4, 4)
ATTENTION_BWD_ENTRIES(bf16_hd256, bf16, 8, 1, 2)
ATTENTION_BWD_ENTRIES(f32_hd32, float, 1, 4, 4)
ATTENTION_BWD_ENTRIES(f32_hd64, float, 2, 4, 4)
ATTENTION_BWD_ENTRIES(f32_hd128, float, 4, 2, 2)

#define ATTENTION_BWD_PREP_ENTRY(SUFFIX, T)                                                          \
  extern "C" __global__ void __launch_bounds__(1024) attention_bwd_prep_##SUFFIX(                    \
      const T* __restrict__ out, const T* __restrict__ dout, float* __restrict__ dsum, long long rows, int head_dim) { \
    attention_bwd_prep_impl<T>(out, dout, dsum, rows, head_dim);                                     \
  }

ATTENTION_BWD_PREP_ENTRY(bf16, bf16)
ATTENTION_BWD_PREP_ENTRY(f32, float)
