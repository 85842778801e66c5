// Token selection on the device, so greedy decode downloads one u32 per sequence instead of
// the vocabulary's logits. Host twin: `Backend::argmax_rows`' default (src/backend/mod.rs) and
// src/llama/generate.rs `argmax`; launcher: src/backend/cuda/sampling.rs.
//
// Contract
//   logits [rows, width]  T
//   out    [rows]         u32: index of the largest value of each row, the first one on ties
//                         (torch.argmax); NaN never wins; a row of only NaN gives 0.     (=)
// Launch: grid.x = rows, block = 256 threads (a multiple of 32, at most 1024).
#include "common.cuh"

// (v, i) beats (bv, bi): larger value, or equal value at a smaller index.
__device__ __forceinline__ bool beats(float v, uint32_t i, float bv, uint32_t bi) {
  return v > bv || (v == bv && i < bi);
}

template <typename T>
__device__ __forceinline__ void argmax_impl(const T* __restrict__ logits, int width, uint32_t* __restrict__ out) {
  __shared__ float sv[32];
  __shared__ uint32_t si[32];
  const T* row = logits + (long long)blockIdx.x * width;
  float bv = -INFINITY;
  uint32_t bi = 0xffffffffu;
  for (int c = threadIdx.x; c < width; c += blockDim.x) {
    const float v = to_f32(row[c]);
    if (beats(v, (uint32_t)c, bv, bi)) bv = v, bi = (uint32_t)c;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const uint32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (beats(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sv[warp] = bv, si[warp] = bi;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x >> 5;
    bv = lane < nwarps ? sv[lane] : -INFINITY;
    bi = lane < nwarps ? si[lane] : 0xffffffffu;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const uint32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (beats(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    if (lane == 0) out[blockIdx.x] = bi == 0xffffffffu ? 0u : bi;
  }
}

#define ARGMAX_ENTRY(SUFFIX, T)                                                                      \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      argmax_##SUFFIX(const T* __restrict__ logits, int width, uint32_t* __restrict__ out) {         \
    argmax_impl<T>(logits, width, out);                                                              \
  }

ARGMAX_ENTRY(bf16, bf16)
ARGMAX_ENTRY(f32, float)
