// SwiGLU activation. CPU twin: src/backend/cpu/swiglu.rs; launcher: src/backend/cuda/swiglu.rs.
//
// Contract
//   gate, up, out  [n]  T (same length, no aliasing of out with the inputs)
//   out = silu(gate) * up = gate / (1 + exp(-gate)) * up     (=)
//   swiglu_bwd_T: with s = sigmoid(gate),                    (= for both outputs)
//     dgate = dout * up * s * (1 + gate * (1 - s)),  dup = dout * gate * s
//     (all five tensors [n] T; the outputs alias none of the inputs)
// Launch: grid-stride over 16-byte packs when n is a multiple of the pack, else over elements;
// 256 threads per block, as many blocks as the launcher chooses.
#include "common.cuh"

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

template <typename T>
__device__ __forceinline__ void swiglu_bwd_impl(const T* __restrict__ gate, const T* __restrict__ up,
                                                const T* __restrict__ dout, T* __restrict__ dgate,
                                                T* __restrict__ dup, long long n) {
  constexpr int N = Pack16<T>::N;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  auto one = [](float g, float u, float d, float& dg, float& du) {
    const float s = 1.0f / (1.0f + expf(-g));
    dg = d * u * s * (1.0f + g * (1.0f - s));
    du = d * g * s;
  };
  if (n % N == 0) {
    for (; i < n / N; i += stride) {
      const Pack16<T> g = Pack16<T>::load(gate + i * N), u = Pack16<T>::load(up + i * N),
                      d = Pack16<T>::load(dout + i * N);
      Pack16<T> og, ou;
#pragma unroll
      for (int j = 0; j < N; j++) {
        float dg, du;
        one(g.get(j), u.get(j), d.get(j), dg, du);
        og.set(j, dg);
        ou.set(j, du);
      }
      og.store(dgate + i * N);
      ou.store(dup + i * N);
    }
  } else {
    for (; i < n; i += stride) {
      float dg, du;
      one(to_f32(gate[i]), to_f32(up[i]), to_f32(dout[i]), dg, du);
      dgate[i] = from_f32<T>(dg);
      dup[i] = from_f32<T>(du);
    }
  }
}

#define SWIGLU_ENTRY(SUFFIX, T)                                                                      \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      swiglu_##SUFFIX(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, long long n) { \
    swiglu_impl<T>(gate, up, out, n);                                                                \
  }                                                                                                  \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      swiglu_bwd_##SUFFIX(const T* __restrict__ gate, const T* __restrict__ up, const T* __restrict__ dout, \
                          T* __restrict__ dgate, T* __restrict__ dup, long long n) {                 \
    swiglu_bwd_impl<T>(gate, up, dout, dgate, dup, n);                                               \
  }

SWIGLU_ENTRY(bf16, bf16)
SWIGLU_ENTRY(f32, float)
