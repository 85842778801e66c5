// Cross-entropy of chosen target tokens fused with the softmax: the embedding attack's loss.
// One block per target row: one read pass keeps an online (max, sum of exponentials) and the
// first index of the maximum, merged across threads then warps; a second pass writes the
// row's gradient. Only per-target numbers go back to the host; the logits stay where they are.
// CPU twin: src/objectives/ce.rs (target_ce_groups); launcher: src/backend/cuda/ce.rs.
//
// Contract (rows of width vocab; n target rows)
//   logits  [rows, vocab] side tensor (f32 when logits_f32 != 0, else bf16)
//   targets [n, 2] u32: (row, token) pairs, rows distinct and < rows, tokens < vocab
//   scale   [n] f32: the gradient weight of each target (1 / the size of its group)
//   with m = max(logits[row]), s = sum exp(logits[row] - m), z = logits[row, token]:
//   row_loss   [n] f32: (m - z) + log(s) = -log softmax(logits[row])[token]               (=)
//   row_argmax [n] u32: first index of the row's maximum (torch.argmax; NaN never wins)   (=)
//   grad [rows, vocab] (f32 when grad_f32 != 0, else bf16) or null: on each target row
//        scale * (softmax(logits[row]) - onehot(token))                                   (=)
//        other rows untouched (the launcher zeroes the buffer first)
//   The host sums row_loss / group size in f64 per group, in target order.
// Launch: grid.x = n, block = 512 (a multiple of 32, at most 1024).
#include "common.cuh"

namespace {

// Online softmax statistics of a slice of a row: m = running max, s = sum exp(x - m),
// i = first index where m occurs (0xffffffff while the slice is empty).
struct Stats {
  float m, s;
  uint32_t i;
};

__device__ __forceinline__ void stats_add(Stats& st, float x, uint32_t c) {
  if (x > st.m) {
    st.s = st.s * expf(st.m - x) + 1.0f;  // st.m = -inf on first use: s starts over
    st.m = x;
    st.i = c;
  } else {
    st.s += expf(x - st.m);
  }
}

__device__ __forceinline__ Stats stats_merge(Stats a, Stats b) {
  if (b.i == 0xffffffffu) return a;
  if (a.i == 0xffffffffu) return b;
  const float m = fmaxf(a.m, b.m);
  const uint32_t i = a.m > b.m ? a.i : b.m > a.m ? b.i : min(a.i, b.i);
  return Stats{m, a.s * expf(a.m - m) + b.s * expf(b.m - m), i};
}

__device__ __forceinline__ Stats warp_stats(Stats v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Stats u{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o),
            __shfl_xor_sync(0xffffffffu, v.i, o)};
    v = stats_merge(v, u);
  }
  return v;
}

// Merge over the block; every thread gets the result.
__device__ __forceinline__ Stats block_stats(Stats v, Stats* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_stats(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : Stats{-INFINITY, 0.0f, 0xffffffffu};
  v = warp_stats(v);
  __syncthreads();
  return v;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(1024)
    target_ce(const void* __restrict__ logits, int logits_f32, int vocab, const uint32_t* __restrict__ targets,
              const float* __restrict__ scale, float* __restrict__ row_loss, uint32_t* __restrict__ row_argmax,
              void* __restrict__ grad, int grad_f32) {
  __shared__ Stats scratch[32];
  const uint32_t row = targets[2 * blockIdx.x], tok = targets[2 * blockIdx.x + 1];
  const long long base = (long long)row * vocab;
  Stats st{-INFINITY, 0.0f, 0xffffffffu};
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) stats_add(st, load_side(logits, logits_f32, base + c), c);
  st = block_stats(st, scratch);
  if (threadIdx.x == 0) {
    // (m - z) + log(s): exact when z is the maximum and s rounds to 1 (a forced token).
    row_loss[blockIdx.x] = (st.m - load_side(logits, logits_f32, base + tok)) + logf(st.s);
    row_argmax[blockIdx.x] = st.i == 0xffffffffu ? 0u : st.i;
  }
  if (grad == nullptr) return;
  const float w = scale[blockIdx.x], p_scale = w / st.s;
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
    const float p = expf(load_side(logits, logits_f32, base + c) - st.m) * p_scale;
    store_any(grad, grad_f32, base + c, (uint32_t)c == tok ? p - w : p);
  }
}
