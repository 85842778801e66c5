// Embedding gather. CPU twin: src/backend/cpu/embedding.rs; launcher: src/backend/cuda/embedding.rs.
//
// Contract
//   table [vocab, dim]   TIn, row-major
//   ids   [rows]         u32 on the device, each < vocab (checked by the launcher on the host copy)
//   out   [rows, dim]    TOut, row-major; out[r, :] = table[ids[r], :]   (=, every element written)
// Launch: grid.x = rows, block = 128 threads (any multiple of 32 works).
// Entry points embedding_{in}[_{out}]: bf16, f32, bf16_f32 (bf16 table, f32 rows), f32_bf16.
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
