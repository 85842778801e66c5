// Retain KL at temperature T fused with both softmaxes: per row of logits, one read pass that
// keeps online (max, sum of exponentials, p-weighted log-ratio) statistics for the original and
// the tuned logits, and one pass that writes the gradient. No probability tensor is stored.
// CPU twin: src/objectives/kl.rs (kl_retain); launcher: src/backend/cuda/kl.rs.
//
// Contract (rows of width vocab)
//   orig, tuned [rows, vocab] side tensors (f32 when *_f32 != 0, else bf16)
//   mask        [rows] f32 (0 = padded position: KL 0 and gradient 0)
//   with a = orig / T, b = tuned / T, lo = logsumexp(a), lt = logsumexp(b), p = exp(a - lo),
//   q = exp(b - lt):
//   row_kl [rows] f32:  sum_v p (a - b) - lo + lt  = KL(p || q) of the row         (=)
//   grad   [rows, vocab] (f32 when grad_f32 != 0, else bf16) or null:
//                       grad_scale * (q - p), grad_scale = weight * T^2 / batch / T  (=)
//   The host sums row_kl in f64 and multiplies by weight * T^2 / batch (torch's batchmean).
// Launch: grid.x = rows, block = 256.
#include "common.cuh"

namespace {

// Online log-sum-exp state: m = running max, s = sum exp(x - m), w = sum exp(x - m) * r for a
// per-element weight r (the log-ratio a - b; unused for the tuned logits).
struct Lse {
  float m, s, w;
};

__device__ __forceinline__ void lse_add(Lse& st, float x, float r) {
  if (x > st.m) {
    const float f = expf(st.m - x);  // st.m = -inf on first use: f = 0, s and w start over
    st.s = st.s * f + 1.0f;
    st.w = st.w * f + r;
    st.m = x;
  } else {
    const float p = expf(x - st.m);
    st.s += p;
    st.w = fmaf(p, r, st.w);
  }
}

__device__ __forceinline__ Lse lse_merge(Lse a, Lse b) {
  if (b.m == -INFINITY) return a;
  if (a.m == -INFINITY) return b;
  const float m = fmaxf(a.m, b.m);
  const float fa = expf(a.m - m), fb = expf(b.m - m);
  return Lse{m, a.s * fa + b.s * fb, a.w * fa + b.w * fb};
}

__device__ __forceinline__ Lse warp_lse(Lse v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Lse u{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o),
          __shfl_xor_sync(0xffffffffu, v.w, o)};
    v = lse_merge(v, u);
  }
  return v;
}

// Merge over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ Lse block_lse(Lse v, Lse* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_lse(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : Lse{-INFINITY, 0.0f, 0.0f};
  v = warp_lse(v);
  __syncthreads();
  return v;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(1024)
    kl_retain(const void* __restrict__ orig, int orig_f32, const void* __restrict__ tuned, int tuned_f32,
              const float* __restrict__ mask, int vocab, float inv_t, float grad_scale, float* __restrict__ row_kl,
              void* __restrict__ grad, int grad_f32) {
  __shared__ Lse scratch[32];
  const long long row = blockIdx.x;
  const long long base = row * vocab;
  if (mask[row] == 0.0f) {
    if (threadIdx.x == 0) row_kl[row] = 0.0f;
    if (grad != nullptr)
      for (int c = threadIdx.x; c < vocab; c += blockDim.x) store_any(grad, grad_f32, base + c, 0.0f);
    return;
  }
  Lse so{-INFINITY, 0.0f, 0.0f}, st{-INFINITY, 0.0f, 0.0f};
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
    const float a = load_side(orig, orig_f32, base + c) * inv_t;
    const float b = load_side(tuned, tuned_f32, base + c) * inv_t;
    lse_add(so, a, a - b);
    lse_add(st, b, 0.0f);
  }
  so = block_lse(so, scratch);
  st = block_lse(st, scratch);
  const float lo = so.m + logf(so.s), lt = st.m + logf(st.s);
  // lt - lo regrouped as (mt - mo) + log(st / so): the maxima are close and their difference
  // exact, so a small KL does not drown in the rounding of two log-sum-exps of ~10-20.
  if (threadIdx.x == 0) row_kl[row] = so.w / so.s + (st.m - so.m) + logf(st.s / so.s);
  if (grad == nullptr) return;
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
    const float a = load_side(orig, orig_f32, base + c) * inv_t;
    const float b = load_side(tuned, tuned_f32, base + c) * inv_t;
    store_any(grad, grad_f32, base + c, grad_scale * (expf(b - lt) - expf(a - lo)));
  }
}
