// cp.async helpers shared by the tensor-core GEMMs (matmul.cu, matmul_sm90.cu). Included, never
// compiled on its own. On the CPU emulator (tools/cuda-emu) the destination turns to NaN at issue
// and the copy lands at the wait for its group: the latest schedule an asynchronous copy may take.
#pragma once

#include "common.cuh"

#ifdef REPSHIELD_EMU
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return emu_shared_address(p); }
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) { emu_cp_async_16(dst, src, src_bytes); }
__device__ __forceinline__ void cp_async_commit() { emu_cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { emu_cp_async_wait(N); }
#else
// Address of `p` in the shared-memory window (what ldmatrix, wgmma descriptors and cp.async take).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses L1; src_bytes == 0 writes zeros instead.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
#endif
