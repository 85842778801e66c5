// SwiGLU activation. CPU twin: src/backend/cpu/swiglu.rs; launcher: src/backend/cuda/swiglu.rs.
//
// Contract
//   gate, up, out  [n]  T (same length, no aliasing of out with the inputs)
//   out = silu(gate) * up = gate / (1 + exp(-gate)) * up     (=)
// Launch: grid-stride over 16-byte packs when n is a multiple of the pack, else over elements;
// 256 threads per block, as many blocks as the launcher chooses.
#include "common.cuh"

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

template <typename T>
__device__ __forceinline__ void swiglu_impl(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                                            long long n) {
  constexpr int N = Pack16<T>::N;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (n % N == 0) {
    for (; i < n / N; i += stride) {
      const Pack16<T> g = Pack16<T>::load(gate + i * N), u = Pack16<T>::load(up + i * N);
      Pack16<T> o;
#pragma unroll
      for (int j = 0; j < N; j++) o.set(j, silu(g.get(j)) * u.get(j));
      o.store(out + i * N);
    }
  } else {
    for (; i < n; i += stride) out[i] = from_f32<T>(silu(to_f32(gate[i])) * to_f32(up[i]));
  }
}

#define SWIGLU_ENTRY(SUFFIX, T)                                                                      \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      swiglu_##SUFFIX(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, long long n) { \
    swiglu_impl<T>(gate, up, out, n);                                                                \
  }

SWIGLU_ENTRY(bf16, bf16)
SWIGLU_ENTRY(f32, float)
