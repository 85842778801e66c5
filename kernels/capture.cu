// Row gather for residual-stream capture and last-token selection.
// CPU twin: src/backend/cpu/capture.rs; launcher: src/backend/cuda/capture.rs.
//
// Contract
//   src      [src_rows_total, dim]  TIn
//   rows     [n]                    u32 on the device, each < src_rows_total (checked on the host)
//   dst      [>= dst_row + n, dim]  TOut; dst[dst_row + i, :] = src[rows[i], :]   (=, rows
//                                   dst_row..dst_row+n written, the others untouched)
// Launch: grid.x = n, block = 128 threads.
// Entry points gather_rows_{in}[_{out}]: bf16, f32, bf16_f32 (capture into f32), f32_bf16.
#include "common.cuh"

#define GATHER_ENTRY(NAME, TIN, TOUT)                                                                \
  extern "C" __global__ void __launch_bounds__(1024) NAME(const TIN* __restrict__ src,               \
                                                          const uint32_t* __restrict__ rows, int dim, \
                                                          TOUT* __restrict__ dst, long long dst_row) { \
    gather_rows_impl<TIN, TOUT>(src, rows, dim, dst, dst_row);                                       \
  }

GATHER_ENTRY(gather_rows_bf16, bf16, bf16)
GATHER_ENTRY(gather_rows_f32, float, float)
GATHER_ENTRY(gather_rows_bf16_f32, bf16, float)
GATHER_ENTRY(gather_rows_f32_bf16, float, bf16)
