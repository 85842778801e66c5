// Rotary position embedding, rotate-half convention, in place.
// CPU twin: src/backend/cpu/rope.rs; launcher: src/backend/cuda/rope.rs.
//
// Contract
//   x        [rows = batch * seq_len, n_heads * head_dim]  T, row-major, rotated in place (=)
//   inv_freq [head_dim / 2]   side tensor (f32 when inv_freq_f32 != 0, else bf16)
//   row r holds token t = r % seq_len at position pos = start_pos + t; for every head h and
//   i < half = head_dim / 2, with a = inv_freq[i] * f32(pos) (product in f32, as transformers):
//     x[r, h, i]        = x[r, h, i] cos(a) - x[r, h, i + half] sin(a)
//     x[r, h, i + half] = x[r, h, i + half] cos(a) + x[r, h, i] sin(a)
//   rope_bwd_T: the same rotation by -a (the transpose of the forward's rotation), applied to the
//   gradient in place; identical to rope_T with inv_freq negated (the CPU twin's definition).
//   rope_kv_store_T: the attention's rope and cache write in one launch: q [rows, n_heads *
//                 head_dim] and k [rows, n_kv_heads * head_dim] rotated in place as rope_T
//                 does, then the rotated k and v [rows, kv_dim] written into k_cache, v_cache
//                 [batch, capacity, kv_dim] at rows start_pos .. start_pos + seq_len of each
//                 sequence (as kv_store_T; q, k, (k_cache, v_cache) =). Exactly rope_T on q, on k,
//                 then kv_store_T, whose three launches it replaces. pos_dev, when not null,
//                 holds start_pos on the device and replaces the argument (a replayed decode
//                 step, whose arguments are fixed, reads its position there).
// Launch: one thread per (row, i), 1-D grid of ceil(rows * half / 256) blocks of 256. Each thread
// computes its sin/cos once and applies it to every head of the row. Accurate sincosf, not the
// intrinsic: angles reach thousands of radians at long positions.
#include "common.cuh"

// Rotates the pair (i, i + half) of every head of one row by (c, s); `cache` (when given)
// receives the rotated row too.
template <typename T>
__device__ __forceinline__ void rotate_heads(T* __restrict__ row, T* __restrict__ cache, int n_heads, int head_dim,
                                             int i, float c, float s) {
  const int half = head_dim >> 1;
  for (int h = 0; h < n_heads; h++) {
    const int o = h * head_dim;
    const float a = to_f32(row[o + i]), b = to_f32(row[o + i + half]);
    const T lo = from_f32<T>(a * c - b * s), hi = from_f32<T>(b * c + a * s);
    row[o + i] = lo;
    row[o + i + half] = hi;
    if (cache != nullptr) {
      cache[o + i] = lo;
      cache[o + i + half] = hi;
    }
  }
}

template <typename T, bool kInverse>
__device__ __forceinline__ void rope_impl(T* __restrict__ x, long long rows, int seq_len, int n_heads, int head_dim,
                                          int start_pos, const void* __restrict__ inv_freq, int inv_freq_f32) {
  const int half = head_dim >> 1;
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * half) return;
  const long long r = idx / half;
  const int i = (int)(idx - r * half);
  const float pos = (float)(start_pos + (int)(r % seq_len));
  float s, c;
  sincosf(load_side(inv_freq, inv_freq_f32, i) * pos, &s, &c);
  if (kInverse) s = -s;  // sincosf is odd in its argument: exactly the forward with -inv_freq
  rotate_heads<T>(x + r * (long long)n_heads * head_dim, nullptr, n_heads, head_dim, i, c, s);
}

template <typename T>
__device__ __forceinline__ void rope_kv_store_impl(T* __restrict__ q, T* __restrict__ k, const T* __restrict__ v,
                                                   T* __restrict__ k_cache, T* __restrict__ v_cache, long long rows,
                                                   int seq_len, int n_heads, int n_kv_heads, int head_dim,
                                                   int start_pos, const uint32_t* __restrict__ pos_dev,
                                                   int capacity, const void* __restrict__ inv_freq,
                                                   int inv_freq_f32) {
  if (pos_dev != nullptr) start_pos = (int)*pos_dev;
  const int half = head_dim >> 1;
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * half) return;
  const long long r = idx / half;
  const int i = (int)(idx - r * half);
  const int t = (int)(r % seq_len);
  const long long b = r / seq_len;
  float s, c;
  sincosf(load_side(inv_freq, inv_freq_f32, i) * (float)(start_pos + t), &s, &c);
  rotate_heads<T>(q + r * (long long)n_heads * head_dim, nullptr, n_heads, head_dim, i, c, s);
  const long long kv_dim = (long long)n_kv_heads * head_dim;
  const long long dst = (b * capacity + start_pos + t) * kv_dim;
  rotate_heads<T>(k + r * kv_dim, k_cache + dst, n_kv_heads, head_dim, i, c, s);
  // The same (i, i + half) columns of v: the row's threads together copy all of it.
  const T* vr = v + r * kv_dim;
  for (int h = 0; h < n_kv_heads; h++) {
    const int o = h * head_dim;
    v_cache[dst + o + i] = vr[o + i];
    v_cache[dst + o + i + half] = vr[o + i + half];
  }
}

#define ROPE_ENTRY(SUFFIX, T)                                                                        \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      rope_##SUFFIX(T* __restrict__ x, long long rows, int seq_len, int n_heads, int head_dim, int start_pos, \
                    const void* __restrict__ inv_freq, int inv_freq_f32) {                           \
    rope_impl<T, false>(x, rows, seq_len, n_heads, head_dim, start_pos, inv_freq, inv_freq_f32);     \
  }                                                                                                  \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      rope_bwd_##SUFFIX(T* __restrict__ x, long long rows, int seq_len, int n_heads, int head_dim, int start_pos, \
                        const void* __restrict__ inv_freq, int inv_freq_f32) {                       \
    rope_impl<T, true>(x, rows, seq_len, n_heads, head_dim, start_pos, inv_freq, inv_freq_f32);      \
  }

#define ROPE_KV_STORE_ENTRY(SUFFIX, T)                                                               \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      rope_kv_store_##SUFFIX(T* __restrict__ q, T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache, \
                             T* __restrict__ v_cache, long long rows, int seq_len, int n_heads, int n_kv_heads, \
                             int head_dim, int start_pos, const uint32_t* __restrict__ pos_dev, int capacity, \
                             const void* __restrict__ inv_freq, int inv_freq_f32) {                  \
    rope_kv_store_impl<T>(q, k, v, k_cache, v_cache, rows, seq_len, n_heads, n_kv_heads, head_dim, start_pos, \
                          pos_dev, capacity, inv_freq, inv_freq_f32);                                \
  }

ROPE_KV_STORE_ENTRY(bf16, bf16)
ROPE_KV_STORE_ENTRY(f32, float)
ROPE_ENTRY(bf16, bf16)
ROPE_ENTRY(f32, float)
