// GEMMs on Hopper with TMA loads and warp specialisation (sm_90a only). CPU twin:
// src/backend/cpu/matmul.rs; launcher: src/backend/cuda/matmul.rs (MatmulKernel::WgmmaTma128x256,
// GemmKernel::WgmmaTmaNn128x256), which takes them on a GPU of compute capability 9.0 for the
// large GEMMs, where the 128x128 wgmma kernels of matmul_sm90.cu would otherwise run.
//
// matmul_bf16_wgmma_tma_128x256: matmul_bf16_128x128's contract (kernels/matmul.cu) with the
//   operands described by TMA tensor maps instead of pointers: x [M, K] and w [N, K] bf16,
//   row-major; out [M, N] = (accumulate ? out : 0) + scale * x w^T, bf16 or f32 (out_f32), f32
//   accumulation. The launcher encodes the maps (cuTensorMapEncodeTiled): dims {K, M} and {K, N},
//   row stride 2 K bytes (so K % 8 == 0, 16-byte-aligned x and w), boxes {64, 128} and {64, 256},
//   the 128-byte swizzle, out-of-bounds elements filled with zeros. Any M, N, K otherwise: the
//   TMA unit zero-fills rows past M/N and k past K, and the epilogue stores in-bounds elements.
// gemm_nn_bf16_wgmma_tma_128x256: gemm_nn_bf16_128x128's contract, the backward's dX = dY W:
//   a [M, K] and b [K, N] bf16, row-major, as tensor maps (a as x above; b: dims {N, K}, row
//   stride 2 N bytes, so N % 8 == 0, box {64, 64}); out = (accumulate ? out : 0) + scale * a b.
//   b's [64 k][256 n] tile is loaded MN-major as four [64 k][64 n] boxes of 8192 bytes, each k
//   row 128 bytes of n in the 128-byte swizzle, and read by wgmma with its transpose bit for B:
//   leading offset 8192 (from one 64-wide group of n to the next), stride offset 1024 (8 k
//   rows), the k step of 16 moves the start 2048 bytes (matmul_sm90.cu's `a b` kernel, with
//   four groups of n instead of two).
//
// grid = (ceil(N / 256), ceil(M / 128)); block = 384 threads = 3 warpgroups.
// - Warpgroup 0 is the producer: it gives up registers (setmaxnreg.dec 40) and one thread issues
//   every load. For k tile kt it waits until stage kt % kStages is free (its `empty` barrier),
//   announces the stage's 48 KiB to the stage's `full` barrier (arrive.expect_tx) and issues the
//   TMA loads (two; five for the `a b` kernel) that complete that many bytes on it.
// - Warpgroups 1 and 2 are the consumers (setmaxnreg.inc 232): consumer c computes rows
//   64 c .. 64 c + 63 of the block's 128 x 256 tile with wgmma.mma_async m64n256k16, 128 f32
//   accumulators a thread. It waits for the stage's `full` barrier, issues the stage's four
//   k-steps of 16 as one wgmma group, and once wgmma.wait_group 1 says that the previous
//   stage's group is done, lane 0 of each of its warps arrives on that stage's `empty` barrier
//   (8 arrivals free a stage: every consumer warp has finished reading it).
//   Nothing but waits and wgmma run in the consumers' main loop; the loads never stall them
//   unless the ring (kStages deep) runs dry.
// - mbarrier phases: the full barrier of stage s completes phase r when the data of k tile
//   r kStages + s has landed, so tile kt waits for parity (kt / kStages) & 1; the empty barrier
//   of s completes phase r when tile r kStages + s has been read, so the producer waits for parity
//   (kt / kStages - 1) & 1 before reusing s for tile kt >= kStages.
// Shared memory (the 128-byte swizzle as matmul_sm90.cu; TMA writes it, so no cp.async and no
// proxy fence): kStages stages of [128 rows][64 k] of x then [256 rows][64 k] of w (or b's four
// [64 k][64 n] groups), 128 bytes a row, from the first 1024-byte boundary of the window; then
// the 2 kStages mbarriers.
//   dynamic shared memory = 1024 + kStages * 49152 + 2 kStages * 8 = 197696 bytes (raised at load).
#include "common.cuh"
#include "cp_async.cuh"
#include "wgmma.cuh"

namespace {

constexpr int kBM = 128, kBN = 256, kBK = 64;
constexpr int kStages = 4;
constexpr int kThreads = 384;
constexpr int kABytes = kBM * kBK * 2, kBBytes = kBN * kBK * 2;
constexpr int kStageBytes = kABytes + kBBytes;
constexpr int kConsumerWarps = 8;
static_assert(kBK * 2 == 128, "the 128-byte swizzle needs 64 bf16 of k a row");
static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "every operand tile starts on the swizzle's period");

// The 128-byte CUtensorMap the launcher encodes, passed by value as a __grid_constant__ parameter
// (its address is then a generic address the TMA unit reads the map from).
struct alignas(64) TensorMap {
  unsigned long long opaque[16];
};

#ifdef REPSHIELD_EMU
// The CPU emulator (tools/cuda-emu) passes a by-value parameter block by reference.
#define TENSOR_MAP_PARAM(name) const TensorMap& name
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) { emu_mbarrier_init(bar, count); }
__device__ __forceinline__ void fence_mbarrier_init() {}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) { emu_mbarrier_arrive(bar); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
  emu_mbarrier_arrive_expect_tx(bar, bytes);
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) { emu_mbarrier_wait(bar, parity); }
__device__ __forceinline__ void tma_load_2d(void* dst, const TensorMap& map, int c0, int c1, uint64_t* bar) {
  emu_tma_load_2d(dst, &map, c0, c1, bar);
}
template <int N> __device__ __forceinline__ void setmaxnreg_inc() {}
template <int N> __device__ __forceinline__ void setmaxnreg_dec() {}
template <int kTransB> __device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t a, uint64_t b) {
  emu_wgmma_m64nNk16_bf16(d, 256, a, b, kTransB);
}
#else
#define TENSOR_MAP_PARAM(name) const __grid_constant__ TensorMap name
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (the TMA unit) before first use.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
// Spins until the barrier's phase of this parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  const uint32_t addr = smem_u32(bar);
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}
// Box {c0 (k), c1 (row)} of the tensor `map` describes into dst; completes its bytes on bar.
__device__ __forceinline__ void tma_load_2d(void* dst, const TensorMap& map, int c0, int c1, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
      : "memory");
}
template <int N> __device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
// d (64 x 256, f32) += a (64 x 16) b^T (b 256 x 16), bf16 in shared memory: A K-major, B K-major
// (kTransB 0) or MN-major (kTransB 1, wgmma's transpose bit). scale-d = 1, A and B unscaled.
template <int kTransB> __device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, %130;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(a), "l"(b), "n"(kTransB));
}
#endif

// out = (accumulate ? out : 0) + scale * x op(w): op(w) = w^T for w [N, K] (kNN false), w itself
// for w [K, N] (kNN true).
template <bool kNN>
__device__ __forceinline__ void tma_gemm(const TensorMap& x_map, const TensorMap& w_map, void* __restrict__ out,
                                         int out_f32, int M, int N, int K, float scale, int accumulate) {
  DYNAMIC_SMEM(uint4, smem_raw);
  const uint32_t raw_addr = smem_u32(smem_raw);
  const uint32_t pad = (1024u - (raw_addr & 1023u)) & 1023u;
  char* ring = reinterpret_cast<char*>(smem_raw) + pad;
  const uint32_t ring_addr = raw_addr + pad;
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + kStages * kStageBytes);
  uint64_t* empty = full + kStages;

  const int tid = threadIdx.x, wg = tid >> 7;
  const int block_m = blockIdx.y * kBM, block_n = blockIdx.x * kBN;
  const int k_tiles = (K + kBK - 1) / kBK;

  if (tid == 0) {
    for (int s = 0; s < kStages; s++) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumerWarps);
    }
    fence_mbarrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    setmaxnreg_dec<40>();
    if (tid == 0) {
      for (int kt = 0; kt < k_tiles; kt++) {
        const int s = kt % kStages;
        if (kt >= kStages) mbar_wait(&empty[s], ((kt / kStages) - 1) & 1);
        char* a = ring + s * kStageBytes;
        mbar_arrive_expect_tx(&full[s], kStageBytes);
        tma_load_2d(a, x_map, kt * kBK, block_m, &full[s]);
        if constexpr (!kNN) {
          tma_load_2d(a + kABytes, w_map, kt * kBK, block_n, &full[s]);
        } else {  // box {64 n, 64 k} at (n, k): one 64-wide group of n, MN-major
#pragma unroll
          for (int h = 0; h < kBN / 64; h++)
            tma_load_2d(a + kABytes + h * (kBK * 128), w_map, block_n + h * 64, kt * kBK, &full[s]);
        }
      }
    }
  } else {
    // The producer and the consumers are the two branches of one if/else: setmaxnreg takes
    // effect only so (and with the register cap of __launch_bounds__(kThreads, 1) at entry).
    setmaxnreg_inc<232>();
    const int c = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31;
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; i++) acc[i] = 0.0f;

    for (int kt = 0; kt < k_tiles; kt++) {
      const int s = kt % kStages;
      mbar_wait(&full[s], (kt / kStages) & 1);
      const uint32_t a_addr = ring_addr + s * kStageBytes + c * (64 * 128);
      const uint32_t b_addr = ring_addr + s * kStageBytes + kABytes;
#pragma unroll
      for (int i = 0; i < 128; i++) fence_operand(acc[i]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; kk++) {
        if constexpr (!kNN) {
          wgmma_m64n256k16<0>(acc, smem_desc(a_addr + kk * 32), smem_desc(b_addr + kk * 32));
        } else {
          wgmma_m64n256k16<1>(acc, smem_desc(a_addr + kk * 32), smem_desc(b_addr + kk * 16 * 128, kBK * 128));
        }
      }
      wgmma_commit();
#pragma unroll
      for (int i = 0; i < 128; i++) fence_operand(acc[i]);
      wgmma_wait<1>();  // tile kt - 1's group is done: this warp has finished reading its stage
      if (kt > 0 && lane == 0) mbar_arrive(&empty[(kt - 1) % kStages]);
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < 128; i++) fence_operand(acc[i]);

    // Accumulator fragment of m64nNk16 (PTX ISA, "Register Fragments"): warp v of the warpgroup
    // holds rows 16 v .. 16 v + 15; acc[4 j + e] is row 16 v + lane / 4 + 8 (e / 2), column
    // 8 j + 2 (lane % 4) + e % 2.
    const int r0 = block_m + c * 64 + warp * 16 + (lane >> 2);
#pragma unroll
    for (int j = 0; j < kBN / 8; j++) {
      const int c0 = block_n + j * 8 + (lane & 3) * 2;
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int r = r0 + (e >> 1) * 8, col = c0 + (e & 1);
        if (r < M && col < N) store_out(out, out_f32, (long long)r * N + col, acc[j * 4 + e], scale, accumulate);
      }
    }
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads, 1)
    matmul_bf16_wgmma_tma_128x256(TENSOR_MAP_PARAM(x_map), TENSOR_MAP_PARAM(w_map), void* __restrict__ out,
                                  int out_f32, int M, int N, int K, float scale, int accumulate) {
  tma_gemm<false>(x_map, w_map, out, out_f32, M, N, K, scale, accumulate);
}

extern "C" __global__ void __launch_bounds__(kThreads, 1)
    gemm_nn_bf16_wgmma_tma_128x256(TENSOR_MAP_PARAM(a_map), TENSOR_MAP_PARAM(b_map), void* __restrict__ out,
                                   int out_f32, int M, int N, int K, float scale, int accumulate) {
  tma_gemm<true>(a_map, b_map, out, out_f32, M, N, K, scale, accumulate);
}
