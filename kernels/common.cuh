// Shared device helpers for every kernels/*.cu file (included, never compiled on its own).
//
// Storage dtypes: activations and frozen weights are bf16, side tensors that need precision
// (norm weights, biases, rope inv_freq, key masks, LoRA weights, logits) may be f32. Kernels
// take the streaming tensors as a template type `T` (instantiated as `_bf16` and `_f32`
// entry points) and side tensors as `const void*` plus an `is_f32` flag: the flag is uniform
// across the grid, so the branch costs nothing and one entry point serves both uploads.
// All arithmetic is f32.
#pragma once

#ifndef REPSHIELD_EMU
#include <cuda_bf16.h>
#endif
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// `T* name` pointing at the block's dynamic shared memory.
#ifdef REPSHIELD_EMU
#define DYNAMIC_SMEM(T, name) T* name = static_cast<T*>(emu_dynamic_smem())
#else
#define DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// Element `i` of a side tensor stored as f32 or bf16.
__device__ __forceinline__ float load_side(const void* p, int is_f32, long long i) {
  return is_f32 ? static_cast<const float*>(p)[i] : __bfloat162float(static_cast<const bf16*>(p)[i]);
}

__device__ __forceinline__ void store_any(void* p, int is_f32, long long i, float v) {
  if (is_f32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<bf16*>(p)[i] = __float2bfloat16_rn(v);
  }
}

// Element `i` of a GEMM output (f32 or bf16): out = scale * v, or out += scale * v.
__device__ __forceinline__ void store_out(void* out, int out_f32, long long i, float v, float scale, int accumulate) {
  v *= scale;
  if (out_f32) {
    float* o = static_cast<float*>(out) + i;
    *o = accumulate ? *o + v : v;
  } else {
    bf16* o = static_cast<bf16*>(out) + i;
    *o = __float2bfloat16_rn(accumulate ? __bfloat162float(*o) + v : v);
  }
}

// 16 bytes of T: 8 bf16 or 4 f32. The unit of every vectorised load/store, so a warp moves
// 512 contiguous bytes per instruction.
template <typename T> struct Pack16 {
  static constexpr int N = 16 / sizeof(T);
  uint4 raw;
  __device__ __forceinline__ float get(int i) const { return to_f32(reinterpret_cast<const T*>(&raw)[i]); }
  __device__ __forceinline__ void set(int i, float v) { reinterpret_cast<T*>(&raw)[i] = from_f32<T>(v); }
  __device__ __forceinline__ static Pack16 load(const T* p) {
    Pack16 r;
    r.raw = *reinterpret_cast<const uint4*>(p);
    return r;
  }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<uint4*>(p) = raw; }
};

// SwiGLU's gate activation (swiglu.cu, and the fused decode GEMV of matmul.cu).
__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

// F: float, or double where sums need it (row_stats, top-p sampling).
template <typename F> __device__ __forceinline__ F warp_sum(F v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
// `scratch` holds 32 values; the trailing barrier lets callers reuse it at once.
template <typename F> __device__ __forceinline__ F block_sum(F v, F* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : F(0);
  v = warp_sum(v);
  __syncthreads();
  return v;
}

// dst[dst_row + i, :] = src[rows[i], :] for i < n_rows, rows of width `dim`. One block per
// output row. Same-dtype rows whose width is a multiple of 16 bytes move as 16-byte packs;
// anything else (odd widths, bf16 <-> f32) element by element with conversion.
template <typename TIn, typename TOut>
__device__ __forceinline__ void gather_rows_impl(const TIn* __restrict__ src, const uint32_t* __restrict__ rows,
                                                 int dim, TOut* __restrict__ dst, long long dst_row) {
  const long long i = blockIdx.x;
  const TIn* s = src + (long long)rows[i] * dim;
  TOut* d = dst + (dst_row + i) * dim;
  // Only bf16 and f32 exist here, so equal sizes mean equal types.
  if (sizeof(TIn) == sizeof(TOut) && dim % Pack16<TIn>::N == 0) {
    const int packs = dim / Pack16<TIn>::N;
    for (int p = threadIdx.x; p < packs; p += blockDim.x)
      reinterpret_cast<uint4*>(d)[p] = reinterpret_cast<const uint4*>(s)[p];
  } else {
    for (int c = threadIdx.x; c < dim; c += blockDim.x) d[c] = from_f32<TOut>(to_f32(s[c]));
  }
}
