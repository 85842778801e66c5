// Projection GEMM and bias. CPU twin: src/backend/cpu/matmul.rs (and CpuBackend::add_bias);
// launcher: src/backend/cuda/matmul.rs, which picks the entry point.
//
// Contract (all row-major)
//   x   [M, K]   activations
//   w   [N, K]   weights in nn.Linear layout, so the product is x w^T
//   out [M, N]   out = (accumulate ? out : 0) + scale * x w^T      (= or +=, per `accumulate`)
//   out is bf16 or f32 (out_f32 flag); accumulation is always f32.
//
// Entry points
//   matmul_bf16_128x128, matmul_bf16_64x64
//       x, w bf16. Tensor cores (mma.sync m16n8k16 bf16 -> f32) fed by a 4-stage cp.async
//       pipeline. Requires K % 8 == 0 (16-byte chunks) and 16-byte-aligned x, w; any M, N, K
//       otherwise: rows/columns past M/N and chunks past K are zero-filled by cp.async
//       (src-size 0) and the epilogue stores only in-bounds elements.
//       grid = (ceil(N / BN), ceil(M / BM)); block = 256 (128x128) or 128 (64x64) threads;
//       dynamic shared memory = 4 * (BM + BN) * 40 * 2 bytes (81920 for 128x128: the launcher
//       raises the function's limit above 48 KiB at load).
//   matvec_bf16
//       decode path, M <= 8: one warp per output feature streams its row of w once with 16-byte
//       loads and serves all M rows of x (bandwidth-bound: w is read exactly once). K % 8 == 0.
//       grid = ceil(N / 8), block = 256.
//   matvec_lora_bf16
//       matvec_bf16 with a LoRA pair's up projection fused into its epilogue:
//       out = (accumulate ? out : 0) + scale * x w^T + lora_scale * xa lb^T, one rounding, where
//       xa [M, rank] (= x_d A^T, computed first) and lb [N, rank] (= B) are side tensors (f32 or
//       bf16 per flag). Saves decode the up-projection launch and a read-modify-write of out per
//       adapted projection. Same grid as matvec_bf16.
//   matvec_qkv_bf16
//       the attention's three input projections at decode, M <= 8, in one launch: the warps of
//       features [0, Nq) compute q = x wq^T, the next Nk k = x wk^T, the last Nv v = x wv^T,
//       each with its own optional LoRA term (xa null: none) and out pointer, exactly as
//       matvec_lora_bf16 would (scale 1, no accumulate). The three outputs share out_f32.
//       grid = ceil((Nq + Nk + Nv) / 8), block = 256.
//   matvec_swiglu_bf16
//       the MLP's gate/up half at decode, M <= 8: act [M, N] = silu(x wg^T + LoRA_g) * (x wu^T +
//       LoRA_u), each LoRA term optional (xa null) as in matvec_lora_bf16; one warp per feature
//       reads its row of wg and of wu once. gate and up are not stored. Same grid as matvec_bf16.
//   matmul_generic
//       any dtype mix (x_f32, w_f32, out_f32 flags) and any K: 64x64 SIMT tiles, f32 math. For
//       LoRA factors kept in f32 and shapes the tensor-core path does not take.
//       grid = (ceil(N / 64), ceil(M / 64)), block = 256.
//   add_bias_{bf16,f32}
//       x [rows, width] += bias [width] (side tensor, f32 or bf16).   (+=)
//
// Backward
//   gemm_nn_bf16_128x128, gemm_nn_bf16_64x64
//       out [M, N] = (accumulate ? out : 0) + scale * a b, a [M, K] and b [K, N] bf16, both
//       row-major (dX = dY W with W [out, in]: no transposed copy of the frozen weight). The
//       tensor-core kernel above with b's tiles stored k-major in shared memory ([BK][BN + 8])
//       and read with ldmatrix.trans. Requires K % 8 == 0 and N % 8 == 0 (16-byte chunks of
//       a's and b's rows) and 16-byte-aligned a, b; ragged M, N, K as above.
//       grid = (ceil(N / BN), ceil(M / BM)); block = 256 / 128; dynamic shared memory
//       = 4 * (BM * 40 + 32 * (BN + 8)) * 2 bytes (75776 for 128x128, raised at load).
//   gemm_generic
//       out [M, N] = (accumulate ? out : 0) + scale * op(a) op(b)     (= or +=)
//       op(a) = a [M, K], or with trans_a the transpose of a [K, M];
//       op(b) = b [K, N], or with trans_b the transpose of b [N, K] (so trans_b = 1 is matmul's
//       x w^T). dX = dY W is (0, 0) with b = W [out, in]; dW = dY^T X is (1, 0).
//       Any dtype mix (a_f32, b_f32, out_f32 flags), any M, N, K: the SIMT 64x64 tiles of
//       matmul_generic, with each operand's tile load coalesced along whichever of its two
//       dimensions is contiguous. grid = (ceil(N / 64), ceil(M / 64)), block = 256.
//   gemm_thin_32x16, gemm_thin_16x32
//       gemm_generic's contract, for a thin side (M or N <= 64: a LoRA rank) and a long K: a
//       block owns a 32x16 (thin in N) or 16x32 (thin in M) output tile and its 8 warps split
//       each 128-deep K chunk, their partial tiles summed in warp order (deterministic).
//       grid = (ceil(N / TN), ceil(M / TM)), block = 256.
//   matvec_generic
//       matmul_generic's contract at decode (M <= 8) for what matvec_bf16 cannot take (f32 LoRA
//       factors, K % 8 != 0), plus `tpf`: the threads per output feature, 256 (a block each:
//       few features, e.g. a LoRA rank) or 32 (a warp each), striding K.
//       grid = ceil(N / (256 / tpf)), block = 256.
//   split_f32_bf16
//       hi [n], lo [n] (bf16) = a [n] (f32) as hi + lo, |a - hi - lo| <= 2^-18 |a|: gemm's f32 a
//       (the logits gradient into lm_head) as two bf16 tensor-core GEMMs.     (=)
//       grid-stride over elements, block = 256.
//   axpy_{x}[_{y}] (bf16, f32, bf16_f32, f32_bf16: x's dtype, then y's when it differs)
//       y [n] += alpha * x [n]                                       (+=)
//       grid-stride over elements, block = 256.
#include "common.cuh"
#include "cp_async.cuh"

namespace {

#ifdef REPSHIELD_EMU
// The CPU emulator (tools/cuda-emu) runs these instructions as warp collectives.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) { emu_ldmatrix_x4(r, p); }
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) { emu_ldmatrix_x4_trans(r, p); }
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  emu_mma_bf16_16816(d, a, b0, b1);
}
#else
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// The same four 8x8 matrices, each transposed on the way: lane l receives elements (2 (l % 4), l / 4)
// and (2 (l % 4) + 1, l / 4) of every matrix. With rows = k and columns = n in shared memory, that
// is exactly an m16n8k16 B fragment.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// d += a b for one m16n8k16 tile: a row-major 16x16, b "col" 16x8 (= 8 rows of w, k-contiguous).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

constexpr int kBK = 32;          // k per pipeline stage: two m16n8k16 steps
constexpr int kBKP = kBK + 8;    // padded smem row (80 bytes): ldmatrix rows hit distinct banks
constexpr int kStages = 4;

// B_KN = false: w is [N, K] (x w^T, the projections); true: w is [K, N] (x w, the backward's dX).
template <int BM, int BN, int WM, int WN, bool B_KN = false>
__device__ __forceinline__ void gemm_tc(const bf16* __restrict__ x, const bf16* __restrict__ w, void* __restrict__ out,
                                        int out_f32, int M, int N, int K, float scale, int accumulate) {
  constexpr int WARPS_N = BN / WN;
  constexpr int THREADS = (BM / WM) * WARPS_N * 32;
  constexpr int MT = WM / 16, NT = WN / 8;
  constexpr int CHUNKS_PER_ROW = kBK / 8;
  static_assert(NT % 2 == 0, "B fragments are loaded two n8 tiles at a time");
  static_assert((BM * CHUNKS_PER_ROW) % THREADS == 0 && (BN * CHUNKS_PER_ROW) % THREADS == 0, "tile/threads");
  constexpr int BNP = BN + 8;  // padded k-major B row (B_KN): 8 rows of ldmatrix hit distinct banks
  constexpr int B_STAGE = B_KN ? kBK * BNP : BN * kBKP;

  DYNAMIC_SMEM(uint4, smem_raw);
  bf16* As = reinterpret_cast<bf16*>(smem_raw);        // [kStages][BM][kBKP]
  bf16* Bs = As + kStages * BM * kBKP;                 // [kStages][BN][kBKP], or [kStages][kBK][BNP]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int block_m = blockIdx.y * BM, block_n = blockIdx.x * BN;
  const int k_tiles = (K + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * kBK;
#pragma unroll
    for (int i = 0; i < BM * CHUNKS_PER_ROW / THREADS; i++) {
      const int c = tid + i * THREADS, row = c / CHUNKS_PER_ROW, kc = (c % CHUNKS_PER_ROW) * 8;
      const int gm = block_m + row, gk = k0 + kc;
      const bool ok = gm < M && gk < K;
      cp_async_16(As + (stage * BM + row) * kBKP + kc, ok ? x + (long long)gm * K + gk : x, ok ? 16 : 0);
    }
    if constexpr (B_KN) {
      constexpr int N_CHUNKS = BN / 8;
#pragma unroll
      for (int i = 0; i < kBK * N_CHUNKS / THREADS; i++) {
        const int c = tid + i * THREADS, kr = c / N_CHUNKS, nc = (c % N_CHUNKS) * 8;
        const int gk = k0 + kr, gn = block_n + nc;
        const bool ok = gk < K && gn < N;
        cp_async_16(Bs + stage * B_STAGE + kr * BNP + nc, ok ? w + (long long)gk * N + gn : w, ok ? 16 : 0);
      }
    } else {
#pragma unroll
      for (int i = 0; i < BN * CHUNKS_PER_ROW / THREADS; i++) {
        const int c = tid + i * THREADS, row = c / CHUNKS_PER_ROW, kc = (c % CHUNKS_PER_ROW) * 8;
        const int gn = block_n + row, gk = k0 + kc;
        const bool ok = gn < N && gk < K;
        cp_async_16(Bs + stage * B_STAGE + row * kBKP + kc, ok ? w + (long long)gn * K + gk : w, ok ? 16 : 0);
      }
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; i++)
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

  // Prologue: kStages - 1 tiles in flight. Every iteration commits exactly one group (possibly
  // empty) so that wait_group<kStages - 2> always means "tile kt has landed".
#pragma unroll
  for (int s = 0; s < kStages - 1; s++) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; kt++) {
    cp_async_wait<kStages - 2>();
    // Tile kt is visible to all threads, and everyone is done with the stage that the
    // prefetch below overwrites (it was consumed in iteration kt - 1).
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage(next % kStages, next);
    cp_async_commit();

    const int stage = kt % kStages;
    const bf16* a_st = As + stage * BM * kBKP;
    const bf16* b_st = Bs + stage * B_STAGE;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      unsigned a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; i++) {
        // lanes 0-15 address rows 0-15 at k, lanes 16-31 the same rows at k + 8: the four 8x8
        // matrices come back in exactly the a0..a3 order of the m16n8k16 A fragment.
        const int row = warp_m * WM + i * 16 + (lane & 15);
        ldmatrix_x4(a[i], a_st + row * kBKP + kk + (lane >> 4) * 8);
      }
      unsigned b[NT][2];
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        // matrices: (n 0-7, k), (n 0-7, k+8), (n 8-15, k), (n 8-15, k+8) -> b[j], b[j+1]
        unsigned r[4];
        if constexpr (B_KN) {
          // lane l addresses k row (l & 7) + 8 ((l >> 3) & 1) of the n columns 8 (l >> 4) + 0..7
          const int krow = kk + (lane & 7) + (((lane >> 3) & 1) << 3);
          const int ncol = warp_n * WN + j * 8 + ((lane >> 4) << 3);
          ldmatrix_x4_trans(r, b_st + krow * BNP + ncol);
        } else {
          const int nrow = warp_n * WN + j * 8 + (lane & 7) + ((lane >> 4) << 3);
          ldmatrix_x4(r, b_st + nrow * kBKP + kk + ((lane >> 3) & 1) * 8);
        }
        b[j][0] = r[0];
        b[j][1] = r[1];
        b[j + 1][0] = r[2];
        b[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < NT; j++) mma_bf16_16816(acc[i][j], a[i], b[j][0], b[j][1]);
    }
  }
  cp_async_wait<0>();

  // Accumulator fragment: c0,c1 at (row g, cols 2t, 2t+1), c2,c3 at (row g + 8, same cols),
  // g = lane / 4, t = lane % 4.
#pragma unroll
  for (int i = 0; i < MT; i++) {
#pragma unroll
    for (int j = 0; j < NT; j++) {
      const int r0 = block_m + warp_m * WM + i * 16 + (lane >> 2);
      const int c0 = block_n + warp_n * WN + j * 8 + (lane & 3) * 2;
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int r = r0 + (e >> 1) * 8, c = c0 + (e & 1);
        if (r < M && c < N) store_out(out, out_f32, (long long)r * N + c, acc[i][j][e], scale, accumulate);
      }
    }
  }
}

// One warp per output feature n; all m <= 8 rows of x against that row of w.
// xa_i . lb_n over the rank, split across the lanes of a warp and summed (every lane gets it).
__device__ __forceinline__ float lora_dot(const void* __restrict__ xa, int xa_f32, const void* __restrict__ lb,
                                          int lb_f32, int rank, int i, int n, int lane) {
  float l = 0.0f;
  for (int r = lane; r < rank; r += 32)
    l = fmaf(load_side(xa, xa_f32, (long long)i * rank + r), load_side(lb, lb_f32, (long long)n * rank + r), l);
  return warp_sum(l);
}

// With `xa` given, the LoRA up projection is fused in: out[i, n] gets
// scale * x_i . w_n + lora_scale * xa_i . lb_n, rounded once, where xa [M, rank] = x_d A^T was
// computed before and lb [N, rank] is B. The lanes of the warp split the rank.
// `n` is warp-uniform: the whole warp computes feature n.
__device__ __forceinline__ void matvec_row(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                           void* __restrict__ out, int out_f32, int M, int N, int K, float scale,
                                           int accumulate, const void* __restrict__ xa, int xa_f32,
                                           const void* __restrict__ lb, int lb_f32, int rank, float lora_scale,
                                           int n) {
  constexpr int MAXM = 8;
  const int lane = threadIdx.x & 31;
  const uint4* wr = reinterpret_cast<const uint4*>(w + (long long)n * K);
  const int packs = K >> 3;
  float acc[MAXM];
#pragma unroll
  for (int i = 0; i < MAXM; i++) acc[i] = 0.0f;
  for (int p = lane; p < packs; p += 32) {
    Pack16<bf16> wp;
    wp.raw = __ldcs(wr + p);  // streamed once: do not let it evict x from L1
#pragma unroll
    for (int i = 0; i < MAXM; i++) {
      if (i < M) {
        Pack16<bf16> xp;
        xp.raw = __ldg(reinterpret_cast<const uint4*>(x + (long long)i * K) + p);
#pragma unroll
        for (int e = 0; e < 8; e++) acc[i] = fmaf(xp.get(e), wp.get(e), acc[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MAXM; i++) {
    if (i < M) {
      const float v = warp_sum(acc[i]);
      if (xa == nullptr) {
        if (lane == 0) store_out(out, out_f32, (long long)i * N + n, v, scale, accumulate);
      } else {
        const float l = lora_dot(xa, xa_f32, lb, lb_f32, rank, i, n, lane);
        if (lane == 0) store_out(out, out_f32, (long long)i * N + n, fmaf(lora_scale, l, scale * v), 1.0f, accumulate);
      }
    }
  }
}

__device__ __forceinline__ void matvec_impl(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                            void* __restrict__ out, int out_f32, int M, int N, int K, float scale,
                                            int accumulate, const void* __restrict__ xa, int xa_f32,
                                            const void* __restrict__ lb, int lb_f32, int rank, float lora_scale) {
  const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n >= N) return;
  matvec_row(x, w, out, out_f32, M, N, K, scale, accumulate, xa, xa_f32, lb, lb_f32, rank, lora_scale, n);
}

// The MLP's first half at decode: the warp of feature n streams row n of both wg and wu once
// against all M <= 8 rows of x and stores act = silu(g) * u with g = x wg_n (+ LoRA), u = x
// wu_n (+ LoRA), each LoRA term as in matvec_impl (xa null: none). gate and up never reach
// memory.
__device__ __forceinline__ void matvec_swiglu_impl(const bf16* __restrict__ x, const bf16* __restrict__ wg,
                                                   const bf16* __restrict__ wu, void* __restrict__ act, int act_f32,
                                                   int M, int N, int K, const void* __restrict__ xa_g, int xa_g_f32,
                                                   const void* __restrict__ lb_g, int lb_g_f32, int rank_g,
                                                   float scale_g, const void* __restrict__ xa_u, int xa_u_f32,
                                                   const void* __restrict__ lb_u, int lb_u_f32, int rank_u,
                                                   float scale_u) {
  constexpr int MAXM = 8;
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n >= N) return;
  const uint4* gr = reinterpret_cast<const uint4*>(wg + (long long)n * K);
  const uint4* ur = reinterpret_cast<const uint4*>(wu + (long long)n * K);
  const int packs = K >> 3;
  float ag[MAXM], au[MAXM];
#pragma unroll
  for (int i = 0; i < MAXM; i++) ag[i] = 0.0f, au[i] = 0.0f;
  for (int p = lane; p < packs; p += 32) {
    Pack16<bf16> gp, up;
    gp.raw = __ldcs(gr + p);
    up.raw = __ldcs(ur + p);
#pragma unroll
    for (int i = 0; i < MAXM; i++) {
      if (i < M) {
        Pack16<bf16> xp;
        xp.raw = __ldg(reinterpret_cast<const uint4*>(x + (long long)i * K) + p);
#pragma unroll
        for (int e = 0; e < 8; e++) {
          ag[i] = fmaf(xp.get(e), gp.get(e), ag[i]);
          au[i] = fmaf(xp.get(e), up.get(e), au[i]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MAXM; i++) {
    if (i < M) {
      float g = warp_sum(ag[i]), u = warp_sum(au[i]);
      if (xa_g != nullptr) g = fmaf(scale_g, lora_dot(xa_g, xa_g_f32, lb_g, lb_g_f32, rank_g, i, n, lane), g);
      if (xa_u != nullptr) u = fmaf(scale_u, lora_dot(xa_u, xa_u_f32, lb_u, lb_u_f32, rank_u, i, n, lane), u);
      if (lane == 0) store_any(act, act_f32, (long long)i * N + n, silu(g) * u);
    }
  }
}

// 64x64 output tile, 16x16 threads, each 4x4 outputs strided by 16 (conflict-free smem reads).
__device__ __forceinline__ void gemm_generic(const void* __restrict__ x, int x_f32, const void* __restrict__ w,
                                             int w_f32, void* __restrict__ out, int out_f32, int M, int N, int K,
                                             float scale, int accumulate) {
  constexpr int T = 64, BK = 16;
  __shared__ float xs[BK][T + 1];
  __shared__ float ws[BK][T + 1];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int block_m = blockIdx.y * T, block_n = blockIdx.x * T;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
    for (int i = 0; i < T * BK / 256; i++) {
      const int e = threadIdx.x + i * 256, row = e / BK, kk = e % BK;
      const int gk = k0 + kk, gm = block_m + row, gn = block_n + row;
      xs[kk][row] = (gm < M && gk < K) ? load_side(x, x_f32, (long long)gm * K + gk) : 0.0f;
      ws[kk][row] = (gn < N && gk < K) ? load_side(w, w_f32, (long long)gn * K + gk) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk++) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; i++) a[i] = xs[kk][ty + 16 * i], b[i] = ws[kk][tx + 16 * i];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int r = block_m + ty + 16 * i, c = block_n + tx + 16 * j;
      if (r < M && c < N) store_out(out, out_f32, (long long)r * N + c, acc[i][j], scale, accumulate);
    }
}

// One 64-row x 16-k tile of an operand into `dst[kk][row]`: element (row, k) sits at
// p[row * rs + k * ks]. Consecutive threads walk the contiguous dimension (k when ks == 1, else
// the row), so the global reads coalesce for either layout.
__device__ __forceinline__ void load_tile_strided(float (*dst)[65], const void* __restrict__ p, int is_f32,
                                                  long long rs, long long ks, int rows, int K, int row0, int k0) {
  constexpr int T = 64, BK = 16;
  const bool k_contig = ks == 1;
#pragma unroll
  for (int i = 0; i < T * BK / 256; i++) {
    const int e = threadIdx.x + i * 256;
    const int row = k_contig ? e / BK : e % T;
    const int kk = k_contig ? e % BK : e / T;
    const int gr = row0 + row, gk = k0 + kk;
    dst[kk][row] = (gr < rows && gk < K) ? load_side(p, is_f32, (long long)gr * rs + (long long)gk * ks) : 0.0f;
  }
}

__device__ __forceinline__ void gemm_strided(const void* __restrict__ a, int a_f32, const void* __restrict__ b,
                                             int b_f32, void* __restrict__ out, int out_f32, int M, int N, int K,
                                             int trans_a, int trans_b, float scale, int accumulate) {
  constexpr int T = 64, BK = 16;
  __shared__ float as[BK][T + 1];
  __shared__ float bs[BK][T + 1];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int block_m = blockIdx.y * T, block_n = blockIdx.x * T;
  // (row stride, k stride) of op(a) as [M, K] and of op(b)^T as [N, K].
  const long long a_rs = trans_a ? 1 : K, a_ks = trans_a ? M : 1;
  const long long b_rs = trans_b ? K : 1, b_ks = trans_b ? 1 : N;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += BK) {
    load_tile_strided(as, a, a_f32, a_rs, a_ks, M, K, block_m, k0);
    load_tile_strided(bs, b, b_f32, b_rs, b_ks, N, K, block_n, k0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk++) {
      float x[4], y[4];
#pragma unroll
      for (int i = 0; i < 4; i++) x[i] = as[kk][ty + 16 * i], y[i] = bs[kk][tx + 16 * i];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = fmaf(x[i], y[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int r = block_m + ty + 16 * i, c = block_n + tx + 16 * j;
      if (r < M && c < N) store_out(out, out_f32, (long long)r * N + c, acc[i][j], scale, accumulate);
    }
}

// Products with one thin side and a long K: the LoRA factors' GEMMs (x A^T, dY B, (dY B)^T x,
// dY^T (x A^T) at rank 8..64). gemm_strided's 64x64 tiles would leave most of a tile idle and give
// a rank-16 product over 4096 rows only 64 blocks, each walking all of K alone. Here a block owns
// a TM x TN tile (32x16 or 16x32: 512 outputs) and its 8 warps split every 128-deep K chunk, 16 k
// each, every lane a 4x4 micro-tile read as float4s; the next chunk's loads are in flight (in
// registers) while the warps work on this one. At the end the 8 warps' partial tiles are summed
// in shared memory in warp order: one fixed summation order, no atomics.
constexpr int kThinBK = 128;

// PER elements of op(p) (row stride rs, k stride ks) for rows [row0, row0 + T) and k in
// [k0, k0 + kThinBK), zero past `rows` and K, walking whichever dimension is contiguous so the
// loads coalesce: thread t's element i is (row_t + i drow, kk_t + i dkk). thin_stage puts them
// at [kk][row] of a (T + 4)-float-row tile.
template <int T, int PER, typename E>
__device__ __forceinline__ void thin_fetch_as(float (&r)[PER], const E* __restrict__ p, long long rs, long long ks,
                                              int rows, int K, int row0, int k0) {
  const bool k_contig = ks == 1;
  const int row_t = k_contig ? threadIdx.x / kThinBK : threadIdx.x % T;
  const int kk_t = k_contig ? threadIdx.x % kThinBK : threadIdx.x / T;
  const int drow = k_contig ? 256 / kThinBK : 0, dkk = k_contig ? 0 : 256 / T;
  const E* q = p + (long long)(row0 + row_t) * rs + (long long)(k0 + kk_t) * ks;
  const long long step = drow * rs + dkk * ks;
#pragma unroll
  for (int i = 0; i < PER; i++) {
    const int gr = row0 + row_t + i * drow, gk = k0 + kk_t + i * dkk;
    r[i] = (gr < rows && gk < K) ? to_f32(q[i * step]) : 0.0f;
  }
}

template <int T, int PER>
__device__ __forceinline__ void thin_fetch(float (&r)[PER], const void* __restrict__ p, int is_f32, long long rs,
                                           long long ks, int rows, int K, int row0, int k0) {
  if (is_f32) {
    thin_fetch_as<T>(r, static_cast<const float*>(p), rs, ks, rows, K, row0, k0);
  } else {
    thin_fetch_as<T>(r, static_cast<const bf16*>(p), rs, ks, rows, K, row0, k0);
  }
}

template <int T, int PER>
__device__ __forceinline__ void thin_stage(float* __restrict__ dst, const float (&r)[PER], bool k_contig) {
#pragma unroll
  for (int i = 0; i < PER; i++) {
    const int e = threadIdx.x + i * 256;
    const int row = k_contig ? e / kThinBK : e % T;
    const int kk = k_contig ? e % kThinBK : e / T;
    dst[kk * (T + 4) + row] = r[i];
  }
}

template <int TM, int TN>
__device__ __forceinline__ void gemm_thin(const void* __restrict__ a, int a_f32, const void* __restrict__ b,
                                          int b_f32, void* __restrict__ out, int out_f32, int M, int N, int K,
                                          int trans_a, int trans_b, float scale, int accumulate) {
  constexpr int WARPS = 8, KW = kThinBK / WARPS;
  constexpr int TX = TN / 4, TY = TM / 4;
  static_assert(TX * TY == 32, "one 4x4 micro-tile per lane");
  constexpr int A_PER = TM * kThinBK / 256, B_PER = TN * kThinBK / 256;
  constexpr int AS = kThinBK * (TM + 4), BS = kThinBK * (TN + 4);
  static_assert(AS + BS >= WARPS * TM * TN, "the partial tiles reuse the stages");
  // Rows padded by 4 floats: float4 reads stay aligned, the k-contiguous stores spread over 8 banks.
  __shared__ __align__(16) float smem[AS + BS];
  float* as = smem;
  float* bs = smem + AS;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ty = lane / TX, tx = lane % TX;
  const int block_m = blockIdx.y * TM, block_n = blockIdx.x * TN;
  // (row stride, k stride) of op(a) as [M, K] and of op(b)^T as [N, K].
  const long long a_rs = trans_a ? 1 : K, a_ks = trans_a ? M : 1;
  const long long b_rs = trans_b ? K : 1, b_ks = trans_b ? 1 : N;
  float ra[A_PER], rb[B_PER];
  thin_fetch<TM>(ra, a, a_f32, a_rs, a_ks, M, K, block_m, 0);
  thin_fetch<TN>(rb, b, b_f32, b_rs, b_ks, N, K, block_n, 0);
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += kThinBK) {
    thin_stage<TM>(as, ra, a_ks == 1);
    thin_stage<TN>(bs, rb, b_ks == 1);
    __syncthreads();
    if (k0 + kThinBK < K) {
      thin_fetch<TM>(ra, a, a_f32, a_rs, a_ks, M, K, block_m, k0 + kThinBK);
      thin_fetch<TN>(rb, b, b_f32, b_rs, b_ks, N, K, block_n, k0 + kThinBK);
    }
#pragma unroll
    for (int j = 0; j < KW; j++) {
      const int kk = warp * KW + j;
      const float4 x = *reinterpret_cast<const float4*>(as + kk * (TM + 4) + ty * 4);
      const float4 y = *reinterpret_cast<const float4*>(bs + kk * (TN + 4) + tx * 4);
      const float xv[4] = {x.x, x.y, x.z, x.w}, yv[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int c = 0; c < 4; c++) acc[i][c] = fmaf(xv[i], yv[c], acc[i][c]);
    }
    __syncthreads();
  }
  float* part = smem;  // [WARPS][TM * TN], over the stages (every warp is past the last barrier)
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int c = 0; c < 4; c++) part[warp * TM * TN + (ty * 4 + i) * TN + tx * 4 + c] = acc[i][c];
  __syncthreads();
  for (int o = threadIdx.x; o < TM * TN; o += 256) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; w++) v += part[w * TM * TN + o];
    const int r = block_m + o / TN, c = block_n + o % TN;
    if (r < M && c < N) store_out(out, out_f32, (long long)r * N + c, v, scale, accumulate);
  }
}

// The decode path for operands the bf16 GEMV cannot take (f32 LoRA factors: x A^T at M <= 8,
// or K % 8 != 0): `tpf` threads per output feature (256 / tpf features a block), striding K;
// summed per warp, then (tpf = 256) across the warps in order. A rank-16 x A^T has 16
// features, too few for a warp each to keep the loads in flight, so the launcher gives each a
// whole block; wide products (f32 weights) get a warp per feature.
__device__ __forceinline__ void matvec_generic_impl(const void* __restrict__ x, int x_f32, const void* __restrict__ w,
                                                    int w_f32, void* __restrict__ out, int out_f32, int M, int N,
                                                    int K, float scale, int accumulate, int tpf) {
  constexpr int MAXM = 8, WARPS = 8;
  __shared__ float part[WARPS][MAXM];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = threadIdx.x % tpf, n = blockIdx.x * (256 / tpf) + threadIdx.x / tpf;
  float acc[MAXM];
#pragma unroll
  for (int i = 0; i < MAXM; i++) acc[i] = 0.0f;
  if (n < N) {
#pragma unroll 2
    for (int k = t; k < K; k += tpf) {
      const float wv = load_side(w, w_f32, (long long)n * K + k);
#pragma unroll
      for (int i = 0; i < MAXM; i++)
        if (i < M) acc[i] = fmaf(load_side(x, x_f32, (long long)i * K + k), wv, acc[i]);
    }
  }
  // Every lane of a warp shares its feature (tpf >= 32), so the shuffles see whole warps.
#pragma unroll
  for (int i = 0; i < MAXM; i++) {
    if (i < M) acc[i] = warp_sum(acc[i]);
  }
  if (tpf == 32) {
    if (n < N && lane < M) {
      float v = 0.0f;
#pragma unroll
      for (int i = 0; i < MAXM; i++) v = i == lane ? acc[i] : v;
      store_out(out, out_f32, (long long)lane * N + n, v, scale, accumulate);
    }
    return;
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < MAXM; i++) part[warp][i] = acc[i];
  }
  __syncthreads();
  if (threadIdx.x < M) {
    float v = 0.0f;
#pragma unroll
    for (int wi = 0; wi < WARPS; wi++) v += part[wi][threadIdx.x];
    store_out(out, out_f32, (long long)threadIdx.x * N + n, v, scale, accumulate);
  }
}

// a = hi + lo with hi = bf16(a) and lo = bf16(a - hi): 16 significant bits, |a - hi - lo| <=
// 2^-18 |a|. Lets an f32 operand ride the bf16 tensor cores as two GEMMs (the logits gradient
// through lm_head). lo is 0 where hi is not finite (inf - inf would make it NaN).
__device__ __forceinline__ void split_bf16_impl(const float* __restrict__ a, bf16* __restrict__ hi,
                                                bf16* __restrict__ lo, long long n) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float v = a[i];
    const bf16 h = __float2bfloat16_rn(v);
    const float hf = __bfloat162float(h);
    hi[i] = h;
    lo[i] = __float2bfloat16_rn(isfinite(hf) ? v - hf : 0.0f);
  }
}

template <typename TX, typename TY>
__device__ __forceinline__ void axpy_impl(float alpha, const TX* __restrict__ x, TY* __restrict__ y, long long n) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    y[i] = from_f32<TY>(fmaf(alpha, to_f32(x[i]), to_f32(y[i])));
}

template <typename T>
__device__ __forceinline__ void add_bias_impl(T* __restrict__ x, const void* __restrict__ bias, int bias_f32,
                                              long long n, int width) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    x[i] = from_f32<T>(to_f32(x[i]) + load_side(bias, bias_f32, i % width));
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256)
    matmul_bf16_128x128(const bf16* __restrict__ x, const bf16* __restrict__ w, void* __restrict__ out, int out_f32,
                        int M, int N, int K, float scale, int accumulate) {
  gemm_tc<128, 128, 64, 32>(x, w, out, out_f32, M, N, K, scale, accumulate);
}

extern "C" __global__ void __launch_bounds__(128)
    matmul_bf16_64x64(const bf16* __restrict__ x, const bf16* __restrict__ w, void* __restrict__ out, int out_f32,
                      int M, int N, int K, float scale, int accumulate) {
  gemm_tc<64, 64, 32, 32>(x, w, out, out_f32, M, N, K, scale, accumulate);
}

extern "C" __global__ void __launch_bounds__(256)
    gemm_nn_bf16_128x128(const bf16* __restrict__ a, const bf16* __restrict__ b, void* __restrict__ out, int out_f32,
                         int M, int N, int K, float scale, int accumulate) {
  gemm_tc<128, 128, 64, 32, true>(a, b, out, out_f32, M, N, K, scale, accumulate);
}

extern "C" __global__ void __launch_bounds__(128)
    gemm_nn_bf16_64x64(const bf16* __restrict__ a, const bf16* __restrict__ b, void* __restrict__ out, int out_f32,
                       int M, int N, int K, float scale, int accumulate) {
  gemm_tc<64, 64, 32, 32, true>(a, b, out, out_f32, M, N, K, scale, accumulate);
}

extern "C" __global__ void __launch_bounds__(256)
    matvec_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w, void* __restrict__ out, int out_f32, int M,
                int N, int K, float scale, int accumulate) {
  matvec_impl(x, w, out, out_f32, M, N, K, scale, accumulate, nullptr, 0, nullptr, 0, 0, 0.0f);
}

extern "C" __global__ void __launch_bounds__(256)
    matvec_lora_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w, void* __restrict__ out, int out_f32,
                     int M, int N, int K, float scale, int accumulate, const void* __restrict__ xa, int xa_f32,
                     const void* __restrict__ lb, int lb_f32, int rank, float lora_scale) {
  matvec_impl(x, w, out, out_f32, M, N, K, scale, accumulate, xa, xa_f32, lb, lb_f32, rank, lora_scale);
}

// One projection of matvec_qkv_bf16: its weight, output, feature count and LoRA term.
#define QKV_PARAMS(P)                                                                                    \
  const bf16 *__restrict__ w##P, void *__restrict__ out##P, int N##P, const void *__restrict__ xa##P, \
      int xa##P##_f32, const void *__restrict__ lb##P, int lb##P##_f32, int rank##P, float scale##P
#define QKV_ROW(P, n)                                                                                          \
  matvec_row(x, w##P, out##P, out_f32, M, N##P, K, 1.0f, 0, xa##P, xa##P##_f32, lb##P, lb##P##_f32, rank##P, \
             scale##P, n)

extern "C" __global__ void __launch_bounds__(256)
    matvec_qkv_bf16(const bf16* __restrict__ x, int out_f32, int M, int K, QKV_PARAMS(q), QKV_PARAMS(k),
                    QKV_PARAMS(v)) {
  // Warp-uniform: each warp owns one feature of one of the three projections.
  const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n < Nq) {
    QKV_ROW(q, n);
  } else if (n < Nq + Nk) {
    QKV_ROW(k, n - Nq);
  } else if (n < Nq + Nk + Nv) {
    QKV_ROW(v, n - Nq - Nk);
  }
}

extern "C" __global__ void __launch_bounds__(256)
    matvec_swiglu_bf16(const bf16* __restrict__ x, const bf16* __restrict__ wg, const bf16* __restrict__ wu,
                       void* __restrict__ act, int act_f32, int M, int N, int K, const void* __restrict__ xa_g,
                       int xa_g_f32, const void* __restrict__ lb_g, int lb_g_f32, int rank_g, float scale_g,
                       const void* __restrict__ xa_u, int xa_u_f32, const void* __restrict__ lb_u, int lb_u_f32,
                       int rank_u, float scale_u) {
  matvec_swiglu_impl(x, wg, wu, act, act_f32, M, N, K, xa_g, xa_g_f32, lb_g, lb_g_f32, rank_g, scale_g, xa_u, xa_u_f32,
                     lb_u, lb_u_f32, rank_u, scale_u);
}

extern "C" __global__ void __launch_bounds__(256)
    matmul_generic(const void* __restrict__ x, int x_f32, const void* __restrict__ w, int w_f32,
                   void* __restrict__ out, int out_f32, int M, int N, int K, float scale, int accumulate) {
  gemm_generic(x, x_f32, w, w_f32, out, out_f32, M, N, K, scale, accumulate);
}

#define ADD_BIAS_ENTRY(SUFFIX, T)                                                                    \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      add_bias_##SUFFIX(T* __restrict__ x, const void* __restrict__ bias, int bias_f32, long long n, int width) { \
    add_bias_impl<T>(x, bias, bias_f32, n, width);                                                   \
  }

ADD_BIAS_ENTRY(bf16, bf16)
ADD_BIAS_ENTRY(f32, float)

extern "C" __global__ void __launch_bounds__(256)
    gemm_generic(const void* __restrict__ a, int a_f32, const void* __restrict__ b, int b_f32, void* __restrict__ out,
                 int out_f32, int M, int N, int K, int trans_a, int trans_b, float scale, int accumulate) {
  gemm_strided(a, a_f32, b, b_f32, out, out_f32, M, N, K, trans_a, trans_b, scale, accumulate);
}

extern "C" __global__ void __launch_bounds__(256)
    gemm_thin_32x16(const void* __restrict__ a, int a_f32, const void* __restrict__ b, int b_f32,
                    void* __restrict__ out, int out_f32, int M, int N, int K, int trans_a, int trans_b, float scale,
                    int accumulate) {
  gemm_thin<32, 16>(a, a_f32, b, b_f32, out, out_f32, M, N, K, trans_a, trans_b, scale, accumulate);
}

extern "C" __global__ void __launch_bounds__(256)
    gemm_thin_16x32(const void* __restrict__ a, int a_f32, const void* __restrict__ b, int b_f32,
                    void* __restrict__ out, int out_f32, int M, int N, int K, int trans_a, int trans_b, float scale,
                    int accumulate) {
  gemm_thin<16, 32>(a, a_f32, b, b_f32, out, out_f32, M, N, K, trans_a, trans_b, scale, accumulate);
}

extern "C" __global__ void __launch_bounds__(256)
    matvec_generic(const void* __restrict__ x, int x_f32, const void* __restrict__ w, int w_f32,
                   void* __restrict__ out, int out_f32, int M, int N, int K, float scale, int accumulate, int tpf) {
  matvec_generic_impl(x, x_f32, w, w_f32, out, out_f32, M, N, K, scale, accumulate, tpf);
}

extern "C" __global__ void __launch_bounds__(256)
    split_f32_bf16(const float* __restrict__ a, bf16* __restrict__ hi, bf16* __restrict__ lo, long long n) {
  split_bf16_impl(a, hi, lo, n);
}

#define AXPY_ENTRY(NAME, TX, TY)                                                                     \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      NAME(float alpha, const TX* __restrict__ x, TY* __restrict__ y, long long n) {                 \
    axpy_impl<TX, TY>(alpha, x, y, n);                                                               \
  }

AXPY_ENTRY(axpy_bf16, bf16, bf16)
AXPY_ENTRY(axpy_f32, float, float)
AXPY_ENTRY(axpy_bf16_f32, bf16, float)
AXPY_ENTRY(axpy_f32_bf16, float, bf16)
