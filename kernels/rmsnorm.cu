// RMSNorm, plain and fused with the residual add (the pre-norm block boundary).
// CPU twin: src/backend/cpu/rmsnorm.rs; launcher: src/backend/cuda/rmsnorm.rs.
//
// Contract (rows of width dim, row-major; R = the residual stream's dtype (x, residual,
// delta), T = out's; entry points `_bf16` (R = T = bf16), `_f32` (R = T = f32) and `_f32_bf16`
// (an f32 residual stream normed into bf16 activations: R = f32, T = bf16))
//   rmsnorm_*:      out = x / sqrt(mean(x^2) + eps) * w                          (x is R; out =)
//   add_rmsnorm_*:  residual += delta (rounded to R); out = rmsnorm(residual) * w  (residual +=, out =)
//   w [dim] is a side tensor: f32 when w_f32 != 0, else bf16.
//   The statistics of add_rmsnorm are taken over the residual as stored (rounded to R), so the
//   normalised row is exactly the norm of what later layers read back. With an f32 residual
//   the stream keeps f32 precision across every block; only the normed copy is rounded to T.
//   rmsnorm_bwd_T:  dx (+)= r * w * dy - x * r^3 / dim * sum(w * dy * x), r = 1 / sqrt(mean(x^2) + eps)
//                   (= or += per `accumulate`; the norm weights are frozen, so no dw). x, dy, dx
//                   are T; dx may alias neither x nor dy.
// Launch: grid.x = rows, block = 256 threads (a multiple of 32). x and out may not alias.
#include "common.cuh"

// N consecutive elements of T as whole 16-byte words (N * sizeof(T) a multiple of 16): the
// residual's and delta's share of one of T's 16-byte packs when R is wider than T.
template <typename T, int N> struct PackN {
  static constexpr int WORDS = N * (int)sizeof(T) / 16;
  uint4 raw[WORDS];
  __device__ __forceinline__ float get(int i) const { return to_f32(reinterpret_cast<const T*>(raw)[i]); }
  __device__ __forceinline__ void set(int i, float v) { reinterpret_cast<T*>(raw)[i] = from_f32<T>(v); }
  __device__ __forceinline__ static PackN load(const T* p) {
    PackN r;
#pragma unroll
    for (int w = 0; w < WORDS; w++) r.raw[w] = reinterpret_cast<const uint4*>(p)[w];
    return r;
  }
  __device__ __forceinline__ void store(T* p) const {
#pragma unroll
    for (int w = 0; w < WORDS; w++) reinterpret_cast<uint4*>(p)[w] = raw[w];
  }
};

template <typename R, typename T, bool kAdd>
__device__ __forceinline__ void rmsnorm_row(R* __restrict__ x, const R* __restrict__ delta, const void* __restrict__ w,
                                            int w_f32, T* __restrict__ out, int dim, float eps) {
  __shared__ float scratch[32];
  const long long base = (long long)blockIdx.x * dim;
  R* xr = x + base;
  T* orow = out + base;
  // One 16-byte pack of T (delta, out) and the same N elements of R (one or two words).
  constexpr int N = Pack16<T>::N;
  static_assert(sizeof(R) >= sizeof(T), "the residual is at least as wide as the activations");
  float ss = 0.0f;
  if (dim % N == 0) {
    const int packs = dim / N;
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
      PackN<R, N> v = PackN<R, N>::load(xr + p * N);
      if (kAdd) {
        const PackN<R, N> d = PackN<R, N>::load(delta + base + p * N);
#pragma unroll
        for (int i = 0; i < N; i++) v.set(i, v.get(i) + d.get(i));
        v.store(xr + p * N);
      }
#pragma unroll
      for (int i = 0; i < N; i++) ss += v.get(i) * v.get(i);
    }
  } else {
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
      float v = to_f32(xr[c]);
      if (kAdd) {
        const R r = from_f32<R>(v + to_f32(delta[base + c]));
        xr[c] = r;
        v = to_f32(r);
      }
      ss += v * v;
    }
  }
  ss = block_sum(ss, scratch);
  const float inv = rsqrtf(ss / (float)dim + eps);
  // Second pass reads back exactly the elements this thread wrote above: no barrier needed.
  if (dim % N == 0) {
    const int packs = dim / N;
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
      const PackN<R, N> v = PackN<R, N>::load(xr + p * N);
      Pack16<T> o;
#pragma unroll
      for (int i = 0; i < N; i++) o.set(i, load_side(w, w_f32, p * N + i) * (v.get(i) * inv));
      o.store(orow + p * N);
    }
  } else {
    for (int c = threadIdx.x; c < dim; c += blockDim.x)
      orow[c] = from_f32<T>(load_side(w, w_f32, c) * (to_f32(xr[c]) * inv));
  }
}

// Two row reductions (sum x^2 and sum w dy x) in one read of the row, then one write.
template <typename T>
__device__ __forceinline__ void rmsnorm_bwd_row(const T* __restrict__ x, const void* __restrict__ w, int w_f32,
                                                const T* __restrict__ dy, T* __restrict__ dx, int dim, float eps,
                                                int accumulate) {
  __shared__ float scratch[32];
  const long long base = (long long)blockIdx.x * dim;
  const T* xr = x + base;
  const T* dyr = dy + base;
  T* dxr = dx + base;
  constexpr int N = Pack16<T>::N;
  const bool vec = dim % N == 0;
  float ss = 0.0f, swdx = 0.0f;
  if (vec) {
    for (int p = threadIdx.x; p < dim / N; p += blockDim.x) {
      const Pack16<T> xv = Pack16<T>::load(xr + p * N), dv = Pack16<T>::load(dyr + p * N);
#pragma unroll
      for (int i = 0; i < N; i++) {
        ss += xv.get(i) * xv.get(i);
        swdx += load_side(w, w_f32, p * N + i) * dv.get(i) * xv.get(i);
      }
    }
  } else {
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
      const float xv = to_f32(xr[c]);
      ss += xv * xv;
      swdx += load_side(w, w_f32, c) * to_f32(dyr[c]) * xv;
    }
  }
  ss = block_sum(ss, scratch);
  swdx = block_sum(swdx, scratch);
  const float r = rsqrtf(ss / (float)dim + eps);
  const float c = r * r * r * swdx / (float)dim;
  if (vec) {
    for (int p = threadIdx.x; p < dim / N; p += blockDim.x) {
      const Pack16<T> xv = Pack16<T>::load(xr + p * N), dv = Pack16<T>::load(dyr + p * N);
      Pack16<T> o;
      if (accumulate) o = Pack16<T>::load(dxr + p * N);
#pragma unroll
      for (int i = 0; i < N; i++) {
        const float g = r * load_side(w, w_f32, p * N + i) * dv.get(i) - xv.get(i) * c;
        o.set(i, accumulate ? o.get(i) + g : g);
      }
      o.store(dxr + p * N);
    }
  } else {
    for (int c2 = threadIdx.x; c2 < dim; c2 += blockDim.x) {
      const float g = r * load_side(w, w_f32, c2) * to_f32(dyr[c2]) - to_f32(xr[c2]) * c;
      dxr[c2] = from_f32<T>(accumulate ? to_f32(dxr[c2]) + g : g);
    }
  }
}

#define RMSNORM_FWD_ENTRIES(SUFFIX, R, T)                                                           \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      rmsnorm_##SUFFIX(const R* __restrict__ x, const void* __restrict__ w, int w_f32, T* __restrict__ out, \
                       int dim, float eps) {                                                         \
    rmsnorm_row<R, T, false>(const_cast<R*>(x), nullptr, w, w_f32, out, dim, eps);                   \
  }                                                                                                  \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      add_rmsnorm_##SUFFIX(R* __restrict__ residual, const R* __restrict__ delta, const void* __restrict__ w, \
                           int w_f32, T* __restrict__ out, int dim, float eps) {                     \
    rmsnorm_row<R, T, true>(residual, delta, w, w_f32, out, dim, eps);                               \
  }

#define RMSNORM_BWD_ENTRY(SUFFIX, T)                                                                 \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      rmsnorm_bwd_##SUFFIX(const T* __restrict__ x, const void* __restrict__ w, int w_f32,           \
                           const T* __restrict__ dy, T* __restrict__ dx, int dim, float eps, int accumulate) { \
    rmsnorm_bwd_row<T>(x, w, w_f32, dy, dx, dim, eps, accumulate);                                   \
  }

RMSNORM_FWD_ENTRIES(bf16, bf16, bf16)
RMSNORM_FWD_ENTRIES(f32, float, float)
RMSNORM_FWD_ENTRIES(f32_bf16, float, bf16)
RMSNORM_BWD_ENTRY(bf16, bf16)
RMSNORM_BWD_ENTRY(f32, float)
