// wgmma helpers shared by the Hopper GEMMs (matmul_sm90.cu, matmul_tma_sm90.cu; sm_90a only).
// Included, never compiled on its own. On the CPU emulator (tools/cuda-emu) a wgmma is queued
// when issued and runs when the thread waits for its group.
#pragma once

#include "cp_async.cuh"

#ifdef REPSHIELD_EMU
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() { emu_wgmma_commit(); }
template <int N> __device__ __forceinline__ void wgmma_wait() { emu_wgmma_wait(N); }
__device__ __forceinline__ void fence_operand(float&) {}
#else
// Orders the accumulator registers' earlier accesses before the wgmma that follows.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of an accumulator across the asynchronous wgmma.
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
#endif

// wgmma matrix descriptor (PTX ISA, "Matrix Descriptor Format") of an operand in the 128-byte
// swizzle: start address >> 4 in bits 0-13; leading-dimension byte offset >> 4 in bits 16-29
// (K-major: unused by the swizzled layouts, 16 by convention; MN-major: from one 64-wide half of
// MN to the next); stride-dimension byte offset >> 4 in bits 32-45 (1024: from one group of 8
// rows to the next, rows of MN for K-major, of K for MN-major); base offset 0 (bits 49-51:
// every start is 1024-aligned but for the K-major k step's +32 bytes, which leaves the row bits
// alone); swizzle mode 1 (128-byte) in bits 62-63.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t leading = 16) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(leading >> 4) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}
