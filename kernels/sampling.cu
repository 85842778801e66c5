// Token selection on the device, so decoding downloads one u32 per sequence instead of the
// vocabulary's logits. CPU twins: src/backend/cpu/sampling.rs (`argmax`, `sample_top_p`, which
// define both ops exactly); launchers: src/backend/cuda/sampling.rs.
//
// Contract
//   argmax_T
//     logits [rows, width]  T
//     out    [rows]         u32: index of the largest value of each row, the first one on ties
//                           (torch.argmax); NaN never wins; a row of only NaN gives 0.   (=)
//   sample_top_p_T
//     logits   [rows, width]  T
//     uniforms [rows]         f32 in [0, 1), one draw per row
//     out      [rows]         u32: the top-p sample of each row                          (=)
//     p_i = exp_nonpos((l_i - max) / temperature) (bit-identical to the twin's); the nucleus is
//     {i : p_i >= t*} with t* the largest threshold whose kept mass reaches top_p * total
//     (ties at the boundary all kept); the token is the first kept one, in index order, whose
//     cumulative mass exceeds u * kept mass. temperature <= 0, or no finite maximum: argmax.
//     Sums in f64, so the twin and the kernel part only where a draw falls within rounding of
//     a cumulative boundary.
//   advance (both) [1] u32 or null: when given, incremented once after the rows are chosen (a
//     replayed decode step moves its device-side position on; see attention.cu pos_dev).
// Launch: grid.x = rows, block = 256 threads (a multiple of 32, at most 1024).
#include "common.cuh"

// (v, i) beats (bv, bi): larger value, or equal value at a smaller index.
__device__ __forceinline__ bool beats(float v, uint32_t i, float bv, uint32_t bi) {
  return v > bv || (v == bv && i < bi);
}

// The block's (max, first index of it) over `row`, NaN skipped; every thread gets it. Index
// 0xffffffff when the row is all NaN.
template <typename T>
__device__ __forceinline__ void row_argmax(const T* __restrict__ row, int width, float& bv, uint32_t& bi) {
  __shared__ float sv[32];
  __shared__ uint32_t si[32];
  bv = -INFINITY;
  bi = 0xffffffffu;
  for (int c = threadIdx.x; c < width; c += blockDim.x) {
    const float v = to_f32(row[c]);
    if (beats(v, (uint32_t)c, bv, bi)) bv = v, bi = (uint32_t)c;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const uint32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (beats(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  if (lane == 0) sv[warp] = bv, si[warp] = bi;
  __syncthreads();
  bv = lane < nwarps ? sv[lane] : -INFINITY;
  bi = lane < nwarps ? si[lane] : 0xffffffffu;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const uint32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (beats(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  __syncthreads();  // sv, si may be reused at once
}

template <typename T>
__device__ __forceinline__ void argmax_impl(const T* __restrict__ logits, int width, uint32_t* __restrict__ out,
                                            uint32_t* __restrict__ advance) {
  float bv;
  uint32_t bi;
  row_argmax(logits + (long long)blockIdx.x * width, width, bv, bi);
  if (threadIdx.x == 0) out[blockIdx.x] = bi == 0xffffffffu ? 0u : bi;
  if (advance != nullptr && threadIdx.x == 0 && blockIdx.x == 0) *advance += 1;
}

// e^x for x <= 0 from single-rounded f32 operations only (the `_rn` intrinsics keep nvcc from
// contracting them into FMAs): the same bits as the twin's `exp_nonpos`, where CUDA's expf
// and the host's differ in the last bits. 0 below -87 and for NaN.
__device__ __forceinline__ float exp_nonpos(float x) {
  if (!(x >= -87.0f)) return 0.0f;
  // The constants are the twin's: 1.442695f is the f32 of log2(e), 0.69314575f (exact in
  // f32, so k * it is exact) + 1.4286068e-6f is ln 2.
  const float k = floorf(__fadd_rn(__fmul_rn(x, 1.442695f), 0.5f));
  const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(k, 0.69314575f)), __fmul_rn(k, 1.4286068e-6f));
  float q = 1.0f / 5040.0f;
  q = __fadd_rn(__fmul_rn(q, r), 1.0f / 720.0f);
  q = __fadd_rn(__fmul_rn(q, r), 1.0f / 120.0f);
  q = __fadd_rn(__fmul_rn(q, r), 1.0f / 24.0f);
  q = __fadd_rn(__fmul_rn(q, r), 1.0f / 6.0f);
  q = __fadd_rn(__fmul_rn(q, r), 0.5f);
  q = __fadd_rn(__fmul_rn(q, r), 1.0f);
  q = __fadd_rn(__fmul_rn(q, r), 1.0f);
  return __fmul_rn(q, __uint_as_float((uint32_t)((int)k + 127) << 23));
}

template <typename T>
__device__ __forceinline__ float prob(const T* __restrict__ row, int c, float max, float temperature) {
  return exp_nonpos(__fdiv_rn(__fsub_rn(to_f32(row[c]), max), temperature));
}

// sum_{p_i >= t} p_i over the row in f64; every thread gets it. The row is re-read from
// L2 on every call (a 49152-wide bf16 row is 96 KiB).
template <typename T>
__device__ __forceinline__ double kept_mass(const T* __restrict__ row, int width, float max, float temperature,
                                            float t, double* scratch) {
  double s = 0.0;
  for (int c = threadIdx.x; c < width; c += blockDim.x) {
    const float p = prob(row, c, max, temperature);
    if (p >= t) s += (double)p;
  }
  return block_sum(s, scratch);
}

template <typename T>
__device__ __forceinline__ void sample_top_p_impl(const T* __restrict__ logits, int width,
                                                  const float* __restrict__ uniforms, float temperature,
                                                  float top_p, uint32_t* __restrict__ out,
                                                  uint32_t* __restrict__ advance) {
  __shared__ double scratch[32];
  __shared__ double incl[1024];
  // Read by later launches only, so before the choice is as good as after it.
  if (advance != nullptr && threadIdx.x == 0 && blockIdx.x == 0) *advance += 1;
  const T* row = logits + (long long)blockIdx.x * width;
  float max;
  uint32_t am;
  row_argmax(row, width, max, am);
  // Block-uniform: every thread leaves here or none does.
  if (!(temperature > 0.0f) || !(max > -INFINITY && max < INFINITY)) {
    if (threadIdx.x == 0) out[blockIdx.x] = am == 0xffffffffu ? 0u : am;
    return;
  }
  const float q = top_p >= 1.0f ? 1.0f : top_p > 0.0f ? top_p : 0.0f;
  const double target = kept_mass(row, width, max, temperature, 0.0f, scratch) * (double)q;
  // The largest t in [0, 1] with kept_mass(t) >= target, by bisection over the bit pattern
  // (non-negative floats order like their bits; 30 steps). lo always qualifies.
  uint32_t lo = 0u, hi = 0x3f800001u;
  while (hi - lo > 1u) {
    const uint32_t mid = lo + (hi - lo) / 2u;
    if (kept_mass(row, width, max, temperature, __uint_as_float(mid), scratch) >= target) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const float t = __uint_as_float(lo);
  // Each thread owns a contiguous chunk, so index order within the row is chunk order, then
  // order within the chunk.
  const int chunk = (width + (int)blockDim.x - 1) / (int)blockDim.x;
  const int begin = min(width, (int)threadIdx.x * chunk), end = min(width, begin + chunk);
  double s = 0.0;
  for (int c = begin; c < end; c++) {
    const float p = prob(row, c, max, temperature);
    if (p >= t) s += (double)p;
  }
  // Inclusive prefix over the chunks, summed in thread order by one thread: at most 1024
  // adds, and a sequential sum of non-negative terms is monotone, so the intervals
  // [incl[i-1], incl[i]) tile [0, kept mass) and exactly one thread claims the draw.
  incl[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double acc = 0.0;
    for (int i = 0; i < (int)blockDim.x; i++) incl[i] = acc += incl[i];
  }
  __syncthreads();
  const double mass = incl[blockDim.x - 1];
  const double draw = (double)uniforms[blockIdx.x] * mass;
  double acc = threadIdx.x == 0 ? 0.0 : incl[threadIdx.x - 1];
  if (acc <= draw && draw < incl[threadIdx.x]) {
    int last = begin;
    for (int c = begin; c < end; c++) {
      const float p = prob(row, c, max, temperature);
      if (p >= t) {
        acc += (double)p;
        last = c;
        if (draw < acc) break;
      }
    }
    // Rounding can leave the walk short of the draw: the chunk's last kept token.
    out[blockIdx.x] = (uint32_t)last;
  }
}

#define ARGMAX_ENTRY(SUFFIX, T)                                                                      \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      argmax_##SUFFIX(const T* __restrict__ logits, int width, uint32_t* __restrict__ out,           \
                      uint32_t* __restrict__ advance) {                                              \
    argmax_impl<T>(logits, width, out, advance);                                                     \
  }

ARGMAX_ENTRY(bf16, bf16)
ARGMAX_ENTRY(f32, float)

#define SAMPLE_TOP_P_ENTRY(SUFFIX, T)                                                                \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      sample_top_p_##SUFFIX(const T* __restrict__ logits, int width, const float* __restrict__ uniforms, \
                            float temperature, float top_p, uint32_t* __restrict__ out,           \
                            uint32_t* __restrict__ advance) {                                       \
    sample_top_p_impl<T>(logits, width, uniforms, temperature, top_p, out, advance);                 \
  }

SAMPLE_TOP_P_ENTRY(bf16, bf16)
SAMPLE_TOP_P_ENTRY(f32, float)
