// GEMMs on Hopper's warpgroup tensor cores (wgmma, sm_90a only). CPU twin:
// src/backend/cpu/matmul.rs; launcher: src/backend/cuda/matmul.rs (MatmulKernel::Wgmma128 and
// GemmKernel::WgmmaNn128), which takes them on a GPU of compute capability 9.0 wherever the
// 128x128 mma.sync kernels of matmul.cu would run. build.rs compiles every *_sm90.cu file for
// compute_90a, and the backend loads those modules on compute capability 9.0 only (sm_90a code
// runs on no other GPU).
//
// matmul_bf16_wgmma_128x128: exactly matmul_bf16_128x128's contract (kernels/matmul.cu). x [M, K]
//   and w [N, K] bf16, row-major; out [M, N] = (accumulate ? out : 0) + scale * x w^T, bf16 or
//   f32 (out_f32), f32 accumulation. K % 8 == 0 and 16-byte-aligned x, w; any M, N, K otherwise:
//   rows past M/N and chunks past K are zero-filled by cp.async (src-size 0), the epilogue stores
//   in-bounds elements.
// gemm_nn_bf16_wgmma_128x128: exactly gemm_nn_bf16_128x128's contract, the backward's dX = dY W:
//   a [M, K] and b [K, N] bf16, row-major; out = (accumulate ? out : 0) + scale * a b. Also needs
//   N % 8 == 0 and a 16-byte-aligned b (its rows are read in 16-byte chunks along N).
//
// Both: grid = (ceil(N / 128), ceil(M / 128)); block = 256 threads = 2 warpgroups. Warpgroup g
//   computes rows 64 g .. 64 g + 63 of the block's 128x128 tile with wgmma.mma_async m64n128k16:
//   both operands read from shared memory through matrix descriptors, the accumulators in
//   registers (64 f32 per thread).
//   K advances 64 at a time through a ring of kStages shared-memory stages that cp.async fills
//   kAhead = kStages - 2 tiles ahead. The stage a thread refills in iteration kt was read by the
//   wgmma of iteration kt - 2, which every warpgroup waited for (wgmma.wait_group 1 at the end of
//   iteration kt - 1) before the barrier of iteration kt.
//   Shared-memory layouts (PTX ISA, "Shared Memory Matrix Layout"), all in the 128-byte swizzle:
//   16-byte chunk c of a 128-byte row r is stored at chunk c ^ (r % 8), which also spreads
//   cp.async stores and wgmma reads over all banks.
//   - K-major (x, w, a): one operand's stage is [128 rows][64 k] bf16, 128 bytes a row; groups
//     of 8 rows are 1024 bytes apart (the descriptor's stride offset), and the k step of 16 moves
//     the start 32 bytes along the row.
//   - MN-major (b of the NN kernel, wgmma's transpose bit for B): the stage holds b's [64 k][128 n]
//     tile as two [64 k][64 n] halves of 8192 bytes, each k row 128 bytes of n; the halves are the
//     descriptor's leading offset apart (8192), groups of 8 k rows its stride offset (1024), and
//     the k step of 16 moves the start 16 rows (2048 bytes).
//   The swizzle is a function of the shared address, so stages start at 1024-byte shared
//   addresses (its period); the launcher adds 1024 bytes of slack for that.
//   dynamic shared memory = kStages * 2 * 16384 + 1024 = 164864 bytes (raised at load).
#include "common.cuh"
#include "cp_async.cuh"
#include "wgmma.cuh"

namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64;
constexpr int kStages = 5, kAhead = kStages - 2;
constexpr int kThreads = 256;
constexpr int kOperandBytes = kBM * kBK * 2;  // one operand's tile in one stage (kBM == kBN)
constexpr int kStageBytes = 2 * kOperandBytes;
static_assert(kBM == kBN && kBK * 2 == 128, "the 128-byte swizzle needs 64 bf16 of k a row");

#ifdef REPSHIELD_EMU
// The CPU emulator (tools/cuda-emu/emu.h) runs wgmma when the thread waits for its group.
__device__ __forceinline__ void fence_proxy_async() { emu_fence_proxy_async(); }
template <int kTransB> __device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b) {
  emu_wgmma_m64nNk16_bf16(d, 128, a, b, kTransB);
}
#else
// Makes this thread's generic-proxy writes to shared memory (cp.async) visible to the async
// proxy that wgmma reads its operands through.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// d (64 x 128, f32) += a (64 x 16) b^T (b 128 x 16), bf16 in shared memory: A K-major, B K-major
// (kTransB 0) or MN-major (kTransB 1, wgmma's transpose bit). scale-d = 1 (accumulate), A and B
// unscaled.
template <int kTransB> __device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, %66;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "n"(kTransB));
}
#endif

// out = (accumulate ? out : 0) + scale * x op(w): op(w) = w^T for w [N, K] (kNN false), w itself
// for w [K, N] (kNN true).
template <bool kNN>
__device__ __forceinline__ void wgmma_gemm(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                           void* __restrict__ out, int out_f32, int M, int N, int K, float scale,
                                           int accumulate) {
  DYNAMIC_SMEM(uint4, smem_raw);
  // The ring starts at the first 1024-byte boundary of the shared window.
  const uint32_t raw_addr = smem_u32(smem_raw);
  const uint32_t pad = (1024u - (raw_addr & 1023u)) & 1023u;
  char* ring = reinterpret_cast<char*>(smem_raw) + pad;
  const uint32_t ring_addr = raw_addr + pad;

  const int tid = threadIdx.x, wg = tid >> 7;
  const int block_m = blockIdx.y * kBM, block_n = blockIdx.x * kBN;
  const int k_tiles = (K + kBK - 1) / kBK;

  // Tile kt of x and of w into stage s: 2 x 1024 16-byte chunks, 4 + 4 per thread.
  auto load_stage = [&](int s, int kt) {
    char* a = ring + s * kStageBytes;
    char* b = a + kOperandBytes;
    const int k0 = kt * kBK;
#pragma unroll
    for (int i = 0; i < kBM * 8 / kThreads; i++) {
      const int c = tid + i * kThreads;
      {  // x: row m of the tile, chunk of 8 k
        const int row = c >> 3, chunk = c & 7, gk = k0 + chunk * 8, gm = block_m + row;
        const bool ok = gm < M && gk < K;
        cp_async_16(a + row * 128 + ((chunk ^ (row & 7)) << 4), ok ? x + (long long)gm * K + gk : x, ok ? 16 : 0);
      }
      if constexpr (!kNN) {  // w [N, K]: row n, chunk of 8 k (K-major, as x)
        const int row = c >> 3, chunk = c & 7, gk = k0 + chunk * 8, gn = block_n + row;
        const bool ok = gn < N && gk < K;
        cp_async_16(b + row * 128 + ((chunk ^ (row & 7)) << 4), ok ? w + (long long)gn * K + gk : w, ok ? 16 : 0);
      } else {  // w [K, N]: k row r, chunk of 8 n in half h of the tile's 128 n (MN-major)
        const int r = c >> 4, h = (c >> 3) & 1, chunk = c & 7, gk = k0 + r, gn = block_n + (c & 15) * 8;
        const bool ok = gk < K && gn < N;
        cp_async_16(b + h * (kBK * 128) + r * 128 + ((chunk ^ (r & 7)) << 4), ok ? w + (long long)gk * N + gn : w,
                    ok ? 16 : 0);
      }
    }
  };

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; i++) acc[i] = 0.0f;

  // Prologue: kAhead tiles in flight. Every iteration commits exactly one cp.async group
  // (possibly empty), so wait_group<kAhead - 1> always means "tile kt has landed".
#pragma unroll
  for (int s = 0; s < kAhead; s++) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; kt++) {
    cp_async_wait<kAhead - 1>();
    fence_proxy_async();
    // Tile kt is visible to every warpgroup, and the wgmma of iteration kt - 2 is done in all of
    // them (each waited for it before getting here): its stage is free for the prefetch below.
    __syncthreads();
    const int s = kt % kStages;
    const uint32_t a_addr = ring_addr + s * kStageBytes + wg * (64 * 128);
    const uint32_t b_addr = ring_addr + s * kStageBytes + kOperandBytes;
#pragma unroll
    for (int i = 0; i < 64; i++) fence_operand(acc[i]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; kk++) {
      if constexpr (!kNN) {
        wgmma_m64n128k16<0>(acc, smem_desc(a_addr + kk * 32), smem_desc(b_addr + kk * 32));
      } else {
        wgmma_m64n128k16<1>(acc, smem_desc(a_addr + kk * 32), smem_desc(b_addr + kk * 16 * 128, kBK * 128));
      }
    }
    wgmma_commit();
#pragma unroll
    for (int i = 0; i < 64; i++) fence_operand(acc[i]);
    const int next = kt + kAhead;
    if (next < k_tiles) load_stage(next % kStages, next);
    cp_async_commit();
    wgmma_wait<1>();  // iteration kt - 1's wgmma is done (see the barrier above)
  }
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < 64; i++) fence_operand(acc[i]);
  cp_async_wait<0>();

  // Accumulator fragment of m64nNk16 (PTX ISA, "Register Fragments"): warp v of the warpgroup
  // holds rows 16 v .. 16 v + 15; acc[4 j + e] is row 16 v + lane / 4 + 8 (e / 2), column
  // 8 j + 2 (lane % 4) + e % 2.
  const int warp = (tid >> 5) & 3, lane = tid & 31;
  const int r0 = block_m + wg * 64 + warp * 16 + (lane >> 2);
#pragma unroll
  for (int j = 0; j < kBN / 8; j++) {
    const int c0 = block_n + j * 8 + (lane & 3) * 2;
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int r = r0 + (e >> 1) * 8, c = c0 + (e & 1);
      if (r < M && c < N) store_out(out, out_f32, (long long)r * N + c, acc[j * 4 + e], scale, accumulate);
    }
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
    matmul_bf16_wgmma_128x128(const bf16* __restrict__ x, const bf16* __restrict__ w, void* __restrict__ out,
                              int out_f32, int M, int N, int K, float scale, int accumulate) {
  wgmma_gemm<false>(x, w, out, out_f32, M, N, K, scale, accumulate);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    gemm_nn_bf16_wgmma_128x128(const bf16* __restrict__ a, const bf16* __restrict__ b, void* __restrict__ out,
                               int out_f32, int M, int N, int K, float scale, int accumulate) {
  wgmma_gemm<true>(a, b, out, out_f32, M, N, K, scale, accumulate);
}
