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
// Launch: one thread per (row, i), 1-D grid of ceil(rows * half / 256) blocks of 256. Each thread
// computes its sin/cos once and applies it to every head of the row. Accurate sincosf, not the
// intrinsic: angles reach thousands of radians at long positions.
#include "common.cuh"

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
  T* row = x + r * (long long)n_heads * head_dim;
  for (int h = 0; h < n_heads; h++) {
    T* p = row + h * head_dim;
    const float a = to_f32(p[i]), b = to_f32(p[i + half]);
    p[i] = from_f32<T>(a * c - b * s);
    p[i + half] = from_f32<T>(b * c + a * s);
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

ROPE_ENTRY(bf16, bf16)
ROPE_ENTRY(f32, float)
