// Embedding gather. CPU twin: src/backend/cpu/embedding.rs; launcher: src/backend/cuda/embedding.rs.
//
// Contract
//   table [vocab, dim]   TIn, row-major
//   ids   [rows]         u32 on the device, each < vocab (checked by the launcher on the host copy)
//   out   [rows, dim]    TOut, row-major; out[r, :] = table[ids[r], :]   (=, every element written)
// Launch: grid.x = rows, block = 128 threads (any multiple of 32 works).
// Entry points embedding_{in}[_{out}]: bf16, f32, bf16_f32 (bf16 table, f32 rows), f32_bf16.
//
// Backward (embedding_bwd_{bf16,f32}, by the dtype of dout)
//   dout   [rows, dim]  T
//   dtable [vocab, dim] f32; dtable[ids[r], :] += dout[r, :]          (+=, atomicAdd: repeated ids
//                       add up; the order of the additions, hence the last bits, is not fixed)
// Launch: grid.x = rows, block = 128 threads.
#include "common.cuh"

#define EMBEDDING_ENTRY(NAME, TIN, TOUT)                                                             \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      NAME(const TIN* __restrict__ table, const uint32_t* __restrict__ ids, int dim, TOUT* __restrict__ out) { \
    gather_rows_impl<TIN, TOUT>(table, ids, dim, out, 0);                                            \
  }

EMBEDDING_ENTRY(embedding_bf16, bf16, bf16)
EMBEDDING_ENTRY(embedding_f32, float, float)
EMBEDDING_ENTRY(embedding_bf16_f32, bf16, float)
EMBEDDING_ENTRY(embedding_f32_bf16, float, bf16)

template <typename T>
__device__ __forceinline__ void embedding_bwd_impl(const T* __restrict__ dout, const uint32_t* __restrict__ ids,
                                                   int dim, float* __restrict__ dtable) {
  const long long r = blockIdx.x;
  const T* src = dout + r * dim;
  float* dst = dtable + (long long)ids[r] * dim;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) atomicAdd(dst + c, to_f32(src[c]));
}

#define EMBEDDING_BWD_ENTRY(SUFFIX, T)                                                               \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      embedding_bwd_##SUFFIX(const T* __restrict__ dout, const uint32_t* __restrict__ ids, int dim,   \
                             float* __restrict__ dtable) {                                           \
    embedding_bwd_impl<T>(dout, ids, dim, dtable);                                                   \
  }

EMBEDDING_BWD_ENTRY(bf16, bf16)
EMBEDDING_BWD_ENTRY(f32, float)
