// Counter-based inverted dropout (LoRA dropout). CPU twin: src/backend/cpu/dropout.rs;
// launcher: src/backend/cuda/dropout.rs; the mask is defined in src/backend/mod.rs
// (`dropout_mask`), and this file must compute exactly the same bits.
//
// Contract
//   x, out  [n]  T (same length, out does not alias x)
//   out[i] = keep(i) ? x[i] * scale : 0                          (=)
//   keep(i) = (splitmix64_out(seed + (i + 1) * GOLDEN) >> 40) >= threshold
//   threshold = round(p * 2^24) and scale = (float)(1 / (1 - p)), both computed by the host.
//   The same launch on a gradient is the backward (d x = d out * keep * scale).
// Launch: grid-stride over 16-byte packs when n is a multiple of the pack, else over elements;
// 256 threads per block, as many blocks as the launcher chooses.
#include "common.cuh"

#define DROPOUT_GOLDEN 0x9E3779B97F4A7C15ull

__device__ __forceinline__ unsigned long long splitmix64_out(unsigned long long z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ float dropout_one(float x, unsigned long long seed, long long i, unsigned int threshold,
                                             float scale) {
  const unsigned long long h = splitmix64_out(seed + (unsigned long long)(i + 1) * DROPOUT_GOLDEN);
  return (unsigned int)(h >> 40) >= threshold ? x * scale : 0.0f;
}

template <typename T>
__device__ __forceinline__ void dropout_impl(const T* __restrict__ x, T* __restrict__ out, long long n,
                                             unsigned long long seed, unsigned int threshold, float scale) {
  constexpr int N = Pack16<T>::N;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (n % N == 0) {
    for (; i < n / N; i += stride) {
      const Pack16<T> v = Pack16<T>::load(x + i * N);
      Pack16<T> o;
#pragma unroll
      for (int j = 0; j < N; j++) o.set(j, dropout_one(v.get(j), seed, i * N + j, threshold, scale));
      o.store(out + i * N);
    }
  } else {
    for (; i < n; i += stride) out[i] = from_f32<T>(dropout_one(to_f32(x[i]), seed, i, threshold, scale));
  }
}

#define DROPOUT_ENTRY(SUFFIX, T)                                                                     \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      dropout_##SUFFIX(const T* __restrict__ x, T* __restrict__ out, long long n, unsigned long long seed, \
                       unsigned int threshold, float scale) {                                        \
    dropout_impl<T>(x, out, n, seed, threshold, scale);                                              \
  }

DROPOUT_ENTRY(bf16, bf16)
DROPOUT_ENTRY(f32, float)
