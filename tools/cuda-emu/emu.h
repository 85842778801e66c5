// The CUDA kernel dialect on the host, for the CPU emulator of the CUDA driver
// (tools/cuda-emu/README.md). Force-included (g++ -include) before every kernels/*.cu, which
// then compiles as ordinary C++ with REPSHIELD_EMU defined.
//
// Execution model (driver.cpp): one block at a time; every thread of the block is a fiber with
// its own stack; a fiber runs until it reaches a barrier (__syncthreads, or a warp-collective
// operation: shuffles, votes, ldmatrix, mma), and a barrier opens when every live thread of its
// scope (block or warp) has reached it. __shared__ variables are function-local statics: one
// copy, reused by each block in turn. Device memory is host memory.
#pragma once

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <deque>
#include <map>
#include <vector>

#define REPSHIELD_EMU 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// ---- runtime (driver.cpp) -------------------------------------------------------------------
struct EmuThread {
  dim3 tid;
  int linear;  // x + y * bx + z * bx * by
};
extern "C" {
EmuThread* emu_current();
const dim3* emu_block_idx();
// Distinct for every block of every launch: per-block state kept per thread resets on a change.
uint64_t emu_block_serial();
const dim3* emu_block_dim();
const dim3* emu_grid_dim();
void emu_syncthreads();
// Barrier over the current thread's warp; `mask` must name exactly the warp's live lanes
// (otherwise the emulator reports the divergence and aborts).
void emu_syncwarp(unsigned mask);
// 32 lanes x 16 words of exchange space for the current warp.
uint64_t* emu_warp_slots();
void* emu_dynamic_smem();
size_t emu_dynamic_smem_bytes();
[[noreturn]] void emu_trap(const char* what);
// Blocks the current thread until the scheduler finds phase `parity` of the mbarrier at dynamic shared memory offset
// `off` completed (emu_mbarrier_poll), letting the other threads run.
void emu_mbarrier_block(size_t off, unsigned parity);
// A scheduling point: the current thread stays runnable and resumes after the others of this round.
void emu_yield();
// Whether [p, p + n) lies inside one device allocation.
bool emu_device_range(const void* p, size_t n);
}

#define threadIdx (emu_current()->tid)
#define blockIdx (*emu_block_idx())
#define blockDim (*emu_block_dim())
#define gridDim (*emu_grid_dim())

[[noreturn]] inline void emu_trapf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void emu_trapf(const char* fmt, ...) {
  static char what[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  emu_trap(what);
}

inline void __syncthreads() { emu_syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu_syncwarp(mask); }
[[noreturn]] inline void __trap() { emu_trap("__trap() called"); }

inline int emu_lane() { return emu_current()->linear & 31; }

// ---- bf16 ------------------------------------------------------------------------------------
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = uint32_t(h.bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h.bits = uint16_t((u >> 16) | 0x40);  // quiet NaN, sign kept
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    h.bits = uint16_t(u >> 16);
  }
  return h;
}

// ---- vector types ------------------------------------------------------------------------------
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(8) float2 {
  float x, y;
};

template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }

// ---- math --------------------------------------------------------------------------------------
// Built with -ffp-contract=off, so these round once per operation like the _rn intrinsics.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return sqrt(a); }
inline float __uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline float __expf(float a) { return expf(a); }
inline float __logf(float a) { return logf(a); }
using std::max;
using std::min;

inline float atomicAdd(float* p, float v) {
  float old = *p;  // fibers of one block never run at the same time, and blocks run in turn
  *p = old + v;
  return old;
}
inline double atomicAdd(double* p, double v) {
  double old = *p;
  *p = old + v;
  return old;
}

// ---- warp collectives ------------------------------------------------------------------------
template <typename T> inline T emu_shfl_from(unsigned mask, T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  uint64_t* s = emu_warp_slots();
  const int lane = emu_lane();
  uint64_t w = 0;
  memcpy(&w, &v, sizeof(T));
  s[lane * 16] = w;
  emu_syncwarp(mask);
  if (!((mask >> (src_lane & 31)) & 1u)) emu_trap("shuffle from a lane outside the mask");
  T r;
  memcpy(&r, &s[(src_lane & 31) * 16], sizeof(T));
  emu_syncwarp(mask);
  return r;
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = emu_lane();
  int src = lane ^ lane_mask;
  if (width < 32 && (src / width) != (lane / width)) src = lane;
  return emu_shfl_from(mask, v, src);
}
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = emu_lane();
  const int src = (lane / width) * width + (src_lane % width);
  return emu_shfl_from(mask, v, src);
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = emu_lane();
  int src = lane + int(delta);
  if ((src / width) != (lane / width)) src = lane;
  return emu_shfl_from(mask, v, src);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  uint64_t* s = emu_warp_slots();
  const int lane = emu_lane();
  s[lane * 16] = pred != 0;
  emu_syncwarp(mask);
  unsigned r = 0;
  for (int l = 0; l < 32; l++)
    if (((mask >> l) & 1u) && s[l * 16]) r |= 1u << l;
  emu_syncwarp(mask);
  return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

// ---- the PTX instructions matmul.cu issues through inline asm --------------------------------
// cp.async: copied at issue (a legal schedule of an asynchronous copy); commit/wait are no-ops.
// Shared-window address of dynamic shared memory's first byte, as __cvta_generic_to_shared
// gives it to a kernel. Deliberately not a multiple of 1024 (a GPU puts reserved and static
// shared memory first): a kernel that needs aligned window addresses, such as wgmma's swizzled
// layouts, must round up itself.
constexpr uint32_t kEmuSmemWindow = 0x480;
// Offset of `p` in the launch's dynamic shared memory, trapping with `what` unless `bytes` bytes
// from there lie inside it.
inline size_t emu_smem_offset(const void* p, size_t bytes, const char* what) {
  const char* base = static_cast<const char*>(emu_dynamic_smem());
  const char* q = static_cast<const char*>(p);
  if (q < base || q + bytes > base + emu_dynamic_smem_bytes()) emu_trap(what);
  return size_t(q - base);
}
inline uint32_t emu_shared_address(const void* p) {
  return kEmuSmemWindow + uint32_t(emu_smem_offset(p, 0, "shared-window address of a pointer outside dynamic shared memory"));
}
// The bytes at shared-window address `addr`, bounds-checked against dynamic shared memory.
inline const char* emu_shared_bytes(uint32_t addr, size_t bytes) {
  if (addr < kEmuSmemWindow) emu_trap("shared-memory read (wgmma descriptor) below dynamic shared memory");
  const char* p = static_cast<const char*>(emu_dynamic_smem()) + (addr - kEmuSmemWindow);
  emu_smem_offset(p, bytes, "shared-memory read (wgmma descriptor) outside the launch's dynamic shared memory");
  return p;
}

// cp.async.cg.shared.global 16 (kernels/cp_async.cuh) at the latest schedule the PTX ISA allows:
// the destination turns to NaN bytes at issue, and the data lands when the issuing thread waits
// for its group (cp.async.wait_group N: all but the N most recent committed groups). A kernel that
// reads a stage before waiting for it, or refills a stage another thread still reads, computes
// from NaNs and fails its parity test. Copies a block never waited for are dropped with it.
// Landed bytes stay "unfenced" until their thread runs fence.proxy.async: a wgmma reading them
// before that traps (wgmma reads shared memory through the async proxy; PTX ISA, "Proxies").
struct EmuCpAsync {
  size_t off;  // of the destination in dynamic shared memory (bounds-checked at issue)
  const char* src;
  int bytes;
};
struct EmuCpAsyncState {
  std::vector<EmuCpAsync> open;
  std::deque<std::vector<EmuCpAsync>> committed;
  std::vector<size_t> unfenced;  // offsets landed, not yet fenced for the async proxy
  uint64_t block = 0;
};
// Per dynamic shared-memory byte: how many landed cp.async copies still await a proxy fence.
inline std::vector<uint16_t>& emu_unfenced_bytes() {
  static std::vector<uint16_t> marks;
  static uint64_t block = 0;
  if (block != emu_block_serial()) {
    marks.assign(emu_dynamic_smem_bytes(), 0);
    block = emu_block_serial();
  }
  return marks;
}
inline EmuCpAsyncState& emu_cp_async_state() {
  static EmuCpAsyncState q[1024];
  EmuCpAsyncState& mine = q[emu_current()->linear];
  if (mine.block != emu_block_serial()) {
    mine.open.clear();
    mine.committed.clear();
    mine.unfenced.clear();
    mine.block = emu_block_serial();
  }
  return mine;
}

inline void emu_cp_async_16(void* dst, const void* src, int src_bytes) {
  if (src_bytes > 16 || src_bytes < 0) emu_trap("cp.async with src-size outside 0..16");
  const size_t off = emu_smem_offset(dst, 16, "cp.async destination outside the launch's dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % 16 || (src_bytes && reinterpret_cast<uintptr_t>(src) % 16))
    emu_trap("cp.async.cg 16: misaligned address");
  memset(dst, 0xff, 16);
  emu_cp_async_state().open.push_back({off, static_cast<const char*>(src), src_bytes});
}
inline void emu_cp_async_commit() {
  EmuCpAsyncState& q = emu_cp_async_state();
  q.committed.push_back(std::move(q.open));
  q.open.clear();
}
inline void emu_cp_async_wait(int pending) {
  EmuCpAsyncState& q = emu_cp_async_state();
  std::vector<uint16_t>& marks = emu_unfenced_bytes();
  while (int(q.committed.size()) > pending) {
    for (const EmuCpAsync& c : q.committed.front()) {
      char* dst = static_cast<char*>(emu_dynamic_smem()) + c.off;
      memset(dst, 0, 16);
      if (c.bytes) memcpy(dst, c.src, size_t(c.bytes));
      for (int i = 0; i < 16; i++) marks[c.off + i]++;
      q.unfenced.push_back(c.off);
    }
    q.committed.pop_front();
  }
}
// fence.proxy.async.shared::cta: this thread's landed copies become visible to the async proxy.
inline void emu_fence_proxy_async() {
  EmuCpAsyncState& q = emu_cp_async_state();
  std::vector<uint16_t>& marks = emu_unfenced_bytes();
  for (size_t off : q.unfenced)
    for (int i = 0; i < 16; i++) marks[off + i]--;
  q.unfenced.clear();
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
// matrix i (16 bytes each). Without .trans lane l receives, of every matrix i, row l / 4,
// elements 2 (l % 4) and +1; with .trans, elements (row 2 (l % 4), column l / 4) and
// (row 2 (l % 4) + 1, column l / 4).
inline void emu_ldmatrix(unsigned (&r)[4], const void* p, bool trans) {
  if (reinterpret_cast<uintptr_t>(p) % 16) emu_trap("ldmatrix: row address not 16-byte aligned");
  uint64_t* s = emu_warp_slots();
  const int lane = emu_lane();
  s[lane * 16] = reinterpret_cast<uintptr_t>(p);
  emu_syncwarp(0xffffffffu);
  auto row = [&](int i, int k) { return reinterpret_cast<const char*>(s[(8 * i + k) * 16]); };
  for (int i = 0; i < 4; i++) {
    if (trans) {
      uint16_t lo, hi;
      memcpy(&lo, row(i, 2 * (lane % 4)) + 2 * (lane / 4), 2);
      memcpy(&hi, row(i, 2 * (lane % 4) + 1) + 2 * (lane / 4), 2);
      r[i] = unsigned(lo) | (unsigned(hi) << 16);
    } else {
      memcpy(&r[i], row(i, lane / 4) + 4 * (lane % 4), 4);
    }
  }
  emu_syncwarp(0xffffffffu);
}
inline void emu_ldmatrix_x4(unsigned (&r)[4], const void* p) { emu_ldmatrix(r, p, false); }
inline void emu_ldmatrix_x4_trans(unsigned (&r)[4], const void* p) { emu_ldmatrix(r, p, true); }

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, d += a b. Fragments (PTX ISA, g =
// lane / 4, t = lane % 4; a register holds two bf16, the lower-addressed one in its low half):
//   A 16x16: a[0] (g, 2t..2t+1), a[1] (g+8, 2t..), a[2] (g, 2t+8..), a[3] (g+8, 2t+8..)
//   B 16x8:  b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C 16x8:  d[0..1] (g, 2t..2t+1), d[2..3] (g+8, 2t..)
inline void emu_mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  uint64_t* s = emu_warp_slots();
  const int lane = emu_lane();
  for (int i = 0; i < 4; i++) s[lane * 16 + i] = a[i];
  s[lane * 16 + 4] = b0;
  s[lane * 16 + 5] = b1;
  emu_syncwarp(0xffffffffu);
  auto half = [](uint64_t reg, int hi) {
    __nv_bfloat16 h;
    h.bits = uint16_t(hi ? (reg >> 16) : reg);
    return __bfloat162float(h);
  };
  // A(row, k) and B(k, n) looked up in the lane that holds them.
  auto A = [&](int row, int k) {
    const int g = row % 8, hi8 = row / 8, kh = k / 8, kk = k % 8;
    const int owner = g * 4 + kk / 2;
    return half(s[owner * 16 + hi8 + 2 * kh], kk % 2);
  };
  auto B = [&](int k, int n) {
    const int kh = k / 8, kk = k % 8;
    const int owner = n * 4 + kk / 2;
    return half(s[owner * 16 + 4 + kh], kk % 2);
  };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int e = 0; e < 4; e++) {
    const int row = g + (e / 2) * 8, col = 2 * t + (e % 2);
    float acc = d[e];
    for (int k = 0; k < 16; k++) acc += A(row, k) * B(k, col);
    out[e] = acc;
  }
  emu_syncwarp(0xffffffffu);
  for (int e = 0; e < 4; e++) d[e] = out[e];
}

// ---- the PTX instructions matmul_sm90.cu issues (wgmma, sm_90a) ------------------------------
// wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 with both operands in shared memory in
// the 128-byte swizzle, A K-major, B K-major or MN-major (the transpose-B immediate), scale-d 1:
// d (64 x N) += A (64 x 16) B^T (B N x 16). The operation
// is queued when issued and runs when the thread waits for its group (wgmma.wait_group), so a
// kernel that refills a stage before waiting for the wgmma reading it computes from the new data
// and fails its parity test. Each thread computes its own fragment (PTX ISA, "Register
// Fragments": warp v of the warpgroup holds rows 16 v + lane / 4 (+ 8), column pairs
// 8 j + 2 (lane % 4)), reading A and B through the descriptors.
struct EmuWgmma {
  float* d;
  int n;
  uint64_t a, b;
  int trans_b;
};
struct EmuWgmmaQueue {
  std::vector<EmuWgmma> open;
  std::deque<std::vector<EmuWgmma>> committed;
  dim3 block;  // the block that queued them
};
inline EmuWgmmaQueue& emu_wgmma_queue() {
  static EmuWgmmaQueue q[1024];
  EmuWgmmaQueue& mine = q[emu_current()->linear];
  const dim3& b = *emu_block_idx();
  if (mine.block.x != b.x || mine.block.y != b.y || mine.block.z != b.z) {
    if (!mine.open.empty() || !mine.committed.empty())
      emu_trap("a wgmma of an earlier block was never waited for (wgmma.wait_group 0 before exit)");
    mine.block = b;
  }
  return mine;
}

// Matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start >> 4 in bits 0-13, leading
// byte offset >> 4 in bits 16-29, stride byte offset >> 4 in bits 32-45, base offset in 49-51,
// swizzle in 62-63 (1 = 128-byte). Element (row, k) of a 128-byte-swizzled operand (PTX ISA,
// "Shared Memory Matrix Layout", the canonical layouts; row is M or N):
// - K-major: rows 128 bytes apart inside groups of 8, groups SBO apart, k along the row (the
//   leading offset is unused);
// - MN-major: 64 rows along each 128-byte line, the next 64 rows LBO further; k lines 128 bytes
//   apart inside groups of 8, groups SBO apart;
// then byte-address bits 4-6 are XORed with bits 7-9.
inline float emu_wgmma_operand(uint64_t desc, int row, int k, bool mn_major) {
  if ((desc >> 62) != 1) emu_trap("wgmma: only the 128-byte swizzle is emulated");
  if ((desc >> 49) & 7) emu_trap("wgmma: a nonzero descriptor base offset is not emulated");
  const uint32_t start = uint32_t(desc & 0x3fff) << 4, lbo = uint32_t((desc >> 16) & 0x3fff) << 4,
                 sbo = uint32_t((desc >> 32) & 0x3fff) << 4;
  uint32_t addr = mn_major ? start + uint32_t(row / 64) * lbo + uint32_t(row % 64) * 2 + uint32_t(k / 8) * sbo +
                                 uint32_t(k % 8) * 128
                           : start + uint32_t(row / 8) * sbo + uint32_t(row % 8) * 128 + uint32_t(k) * 2;
  addr ^= ((addr >> 7) & 7) << 4;
  const char* p = emu_shared_bytes(addr, 2);
  const size_t off = emu_smem_offset(p, 2, "wgmma operand");
  if (emu_unfenced_bytes()[off] || emu_unfenced_bytes()[off + 1])
    emu_trap("wgmma read shared memory written by cp.async before the writer's fence.proxy.async");
  __nv_bfloat16 h;
  memcpy(&h, p, 2);
  return __bfloat162float(h);
}

inline void emu_wgmma_run(const EmuWgmma& op) {
  const int t = emu_current()->linear % 128, warp = t / 32, lane = t % 32;
  for (int j = 0; j < op.n / 8; j++) {
    for (int e = 0; e < 4; e++) {
      const int row = 16 * warp + lane / 4 + 8 * (e / 2), col = 8 * j + 2 * (lane % 4) + e % 2;
      float acc = op.d[4 * j + e];
      for (int k = 0; k < 16; k++) acc += emu_wgmma_operand(op.a, row, k, false) * emu_wgmma_operand(op.b, col, k, op.trans_b);
      op.d[4 * j + e] = acc;
    }
  }
}

inline void emu_wgmma_m64nNk16_bf16(float* d, int n, uint64_t a, uint64_t b, int trans_b) {
  if (emu_block_dim()->x % 128 || emu_block_dim()->y != 1 || emu_block_dim()->z != 1)
    emu_trap("wgmma needs whole warpgroups: blockDim (128 k, 1, 1)");
  emu_wgmma_queue().open.push_back({d, n, a, b, trans_b});
}
inline void emu_wgmma_commit() {
  EmuWgmmaQueue& q = emu_wgmma_queue();
  q.committed.push_back(std::move(q.open));
  q.open.clear();
}
inline void emu_wgmma_wait(int pending) {
  EmuWgmmaQueue& q = emu_wgmma_queue();
  while (int(q.committed.size()) > pending) {
    for (const EmuWgmma& op : q.committed.front()) emu_wgmma_run(op);
    q.committed.pop_front();
  }
}

// ---- mbarrier and TMA (cp.async.bulk.tensor), which matmul_tma_sm90.cu's pipeline issues ----------------------
// The tensor map that the emulated cuTensorMapEncodeTiled (driver.cpp) writes into the 128-byte CUtensorMap: the
// emulator's own layout, recognised by its magic number. Only rank 2 is encoded.
constexpr uint64_t kEmuTensorMapMagic = 0x4d54756d45616475ull;
struct EmuTensorMap {
  uint64_t magic;
  uint32_t dtype, elem_bytes;  // CUtensorMapDataType and its element size
  uint32_t rank, interleave, swizzle, oob_fill;  // CUtensorMapInterleave, CUtensorMapSwizzle, CUtensorMapFloatOOBfill
  uint64_t address;
  uint64_t dim[2];    // elements, innermost first
  uint64_t stride;    // bytes from one index of dimension 1 to the next (globalStrides[0])
  uint32_t box[2];    // elements, innermost first
};
static_assert(sizeof(EmuTensorMap) <= 128, "a tensor map is a 128-byte CUtensorMap");

// mbarrier objects (PTX ISA, "Parallel Synchronization and Communication Instructions: mbarrier"): an expected
// arrival count, the arrivals the current phase still needs, its transaction count (tx) and the phase number. A phase
// completes when both the pending arrivals and tx reach 0; the next one then expects `count` arrivals and no bytes.
// try_wait.parity P is true once the phase of parity P completed: (phase & 1) != P, so right after init parity 1
// passes at once and parity 0 waits for phase 0. The state lives here, keyed by the barrier's offset in dynamic
// shared memory and reset for every block; the barrier's 8 bytes hold a tag, so that a store or TMA box that
// overwrites one is caught at its next use. Traps: a barrier outside dynamic shared memory or not 8-byte aligned, used
// before mbarrier.init in this block or initialised twice, an init count outside 1..2^20-1, an arrival beyond the
// phase's count, a tx count above 2^20-1 (the PTX ISA's ranges).
//
// cp.async.bulk.tensor.2d...mbarrier::complete_tx::bytes takes the latest schedule the ISA allows. At issue its box
// turns to NaN bytes and the copy is queued on its barrier; it lands (the data copied and swizzled, its bytes counted
// as complete-tx) only when a thread waits for a phase of that barrier which then needs nothing but bytes (every
// arrival in). So a kernel that reads a stage before waiting for its full barrier computes from NaNs, and a producer
// that refills a stage before a consumer's wgmma read it (wgmma runs at wgmma.wait_group here) makes that wgmma read
// NaNs. TMA writes go through the async proxy: they neither set nor clear the cp.async "unfenced" marks, so a wgmma
// may read them without a fence.proxy.async, as on the GPU. A copy still queued when its block ends is an error.
constexpr int32_t kEmuMbarrierMax = (1 << 20) - 1;
constexpr uint64_t kEmuMbarrierTag = 0x7261697272616d62ull;  // "bmarriar": what mbarrier.init leaves in the object
struct EmuTmaCopy {
  size_t off;  // of the box in dynamic shared memory
  EmuTensorMap map;
  int c0, c1;
};
struct EmuMbarrier {
  uint32_t count = 0, pending = 0, phase = 0;
  int32_t tx = 0;  // never negative here: copies land only after every arrival (and its expect-tx) of the phase
  std::deque<EmuTmaCopy> copies;  // issued, not landed, in issue order
};
inline std::map<size_t, EmuMbarrier>& emu_mbarriers() {
  static std::map<size_t, EmuMbarrier> bars;
  static uint64_t block = 0;
  if (block != emu_block_serial()) {
    bars.clear();
    block = emu_block_serial();
  }
  return bars;
}
inline size_t emu_tma_box_bytes(const EmuTensorMap& m) { return size_t(m.box[0]) * m.box[1] * m.elem_bytes; }

// Offset of the mbarrier at `bar` in dynamic shared memory, trapping (`op` names the instruction) unless it lies
// there, 8-byte aligned.
inline size_t emu_mbarrier_offset(const uint64_t* bar, const char* op) {
  const char* base = static_cast<const char*>(emu_dynamic_smem());
  const char* p = reinterpret_cast<const char*>(bar);
  if (p < base || p + 8 > base + emu_dynamic_smem_bytes())
    emu_trapf("%s: the mbarrier is not in the launch's dynamic shared memory", op);
  const size_t off = size_t(p - base);
  if (reinterpret_cast<uintptr_t>(p) % 8 || (kEmuSmemWindow + off) % 8)
    emu_trapf("%s: the mbarrier at dynamic shared memory offset %zu is not 8-byte aligned", op, off);
  return off;
}
// The state of the initialised mbarrier at `bar`, or a trap.
inline EmuMbarrier& emu_mbarrier_state(const uint64_t* bar, const char* op, size_t* off) {
  *off = emu_mbarrier_offset(bar, op);
  auto it = emu_mbarriers().find(*off);
  if (it == emu_mbarriers().end())
    emu_trapf("%s on the mbarrier at dynamic shared memory offset %zu, which mbarrier.init has not initialised in this "
              "block", op, *off);
  uint64_t tag;
  memcpy(&tag, bar, 8);
  if (tag != kEmuMbarrierTag)
    emu_trapf("%s: the mbarrier at dynamic shared memory offset %zu was overwritten since mbarrier.init (a store or a "
              "TMA box overlaps it)", op, *off);
  return it->second;
}
inline void emu_mbarrier_try_complete(EmuMbarrier& b) {
  if (b.pending == 0 && b.tx == 0) {
    b.phase++;
    b.pending = b.count;
  }
}

inline void emu_mbarrier_init(uint64_t* bar, unsigned count) {
  const size_t off = emu_mbarrier_offset(bar, "mbarrier.init");
  if (count == 0 || count > unsigned(kEmuMbarrierMax))
    emu_trapf("mbarrier.init with count %u, outside 1..2^20-1 (offset %zu)", count, off);
  std::map<size_t, EmuMbarrier>& bars = emu_mbarriers();
  if (bars.count(off))
    emu_trapf("mbarrier.init on the mbarrier at dynamic shared memory offset %zu, already initialised in this block "
              "(the PTX ISA wants mbarrier.inval before the object's memory is reused)", off);
  for (const auto& [o, b] : bars)
    for (const EmuTmaCopy& c : b.copies)
      if (off + 8 > c.off && off < c.off + emu_tma_box_bytes(c.map))
        emu_trapf("mbarrier.init at offset %zu, inside the box of a TMA copy in flight", off);
  EmuMbarrier& b = bars[off];
  b.count = b.pending = count;
  memcpy(bar, &kEmuMbarrierTag, 8);
}
// One arrival, after `tx` more expected transaction bytes (arrive.expect_tx). A plain arrive is then a scheduling
// point, so that a thread waiting for the phase it completes (a producer waiting for a free stage) runs before this
// one goes on: a consumer that releases a stage before its wgmma has read it sees the refill's NaNs. arrive.expect_tx
// is not, so a producer runs ahead as far as its barriers let it (the ring full), where such a refill can happen; were
// it to yield, producer and consumers would advance one stage per round in step and never expose an early release.
inline void emu_mbarrier_arrive_tx(uint64_t* bar, unsigned tx, const char* op, bool yield) {
  size_t off;
  EmuMbarrier& b = emu_mbarrier_state(bar, op, &off);
  if (b.pending == 0)
    emu_trapf("%s: phase %u of the mbarrier at offset %zu has had all its %u arrivals (it waits for %d transaction "
              "bytes; %zu TMA copies queued on it land only when a thread waits for the phase): more arrivals than its "
              "count", op, b.phase, off, b.count, b.tx, b.copies.size());
  if (int64_t(b.tx) + tx > kEmuMbarrierMax)
    emu_trapf("%s: the transaction count of the mbarrier at offset %zu would reach %lld, above 2^20-1", op, off,
              (long long)b.tx + tx);
  b.tx += int32_t(tx);
  b.pending--;
  emu_mbarrier_try_complete(b);
  if (yield) emu_yield();
}
inline void emu_mbarrier_arrive(uint64_t* bar) { emu_mbarrier_arrive_tx(bar, 0, "mbarrier.arrive", true); }
inline void emu_mbarrier_arrive_expect_tx(uint64_t* bar, unsigned tx) {
  emu_mbarrier_arrive_tx(bar, tx, "mbarrier.arrive.expect_tx", false);
}
// A loop of mbarrier.try_wait.parity until it returns true: returns at once when the phase of that parity completed,
// otherwise blocks this thread until the scheduler finds it complete (emu_mbarrier_poll).
inline void emu_mbarrier_wait(uint64_t* bar, unsigned parity) {
  if (parity > 1) emu_trapf("mbarrier.try_wait.parity with parity %u (0 or 1)", parity);
  size_t off;
  while ((emu_mbarrier_state(bar, "mbarrier.try_wait.parity", &off).phase & 1) == parity)
    emu_mbarrier_block(off, parity);
}

// Lands a TMA copy: box row r (box[0] elements from element (c0, c1 + r)) goes to byte r * box[0] * elem_bytes of the
// box, elements outside the tensor as zeros (OOB fill NONE); then every 16-byte chunk moves to its swizzled
// shared-window address (128-byte swizzle: address bits 4-6 XORed with bits 7-9, as emu_wgmma_operand reads them).
inline void emu_tma_land(const EmuTmaCopy& c) {
  const EmuTensorMap& m = c.map;
  char* smem = static_cast<char*>(emu_dynamic_smem());
  const size_t esize = m.elem_bytes, row = size_t(m.box[0]) * esize;
  std::vector<char> line(row);
  for (uint32_t r = 0; r < m.box[1]; r++) {
    std::fill(line.begin(), line.end(), 0);
    const int64_t y = int64_t(c.c1) + r, x0 = std::max<int64_t>(c.c0, 0),
                  x1 = std::min<int64_t>(int64_t(c.c0) + m.box[0], int64_t(m.dim[0]));
    if (y >= 0 && y < int64_t(m.dim[1]) && x0 < x1) {
      const char* src = reinterpret_cast<const char*>(m.address) + uint64_t(y) * m.stride + uint64_t(x0) * esize;
      const size_t n = size_t(x1 - x0) * esize;
      if (!emu_device_range(src, n))
        emu_trapf("TMA load of row %lld, elements %lld..%lld: outside the device allocation of the tensor map's "
                  "address (its dims or stride exceed the buffer)", (long long)y, (long long)x0, (long long)x1 - 1);
      memcpy(line.data() + size_t(x0 - c.c0) * esize, src, n);
    }
    for (size_t j = 0; j < row; j += 16) {
      uint32_t addr = kEmuSmemWindow + uint32_t(c.off + r * row + j);
      if (m.swizzle == 3) addr ^= ((addr >> 7) & 7) << 4;
      memcpy(smem + (addr - kEmuSmemWindow), line.data() + j, 16);
    }
  }
}

// cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [dst], [tensor_map, {c0, c1}], [bar].
// The destination must be 128-byte aligned in the shared window (PTX ISA; the CUDA programming guide's TMA swizzle
// table lists 128 bytes as the shared-memory alignment of every swizzle mode). The guide adds that the 128-byte
// swizzle pattern repeats every 1024 bytes and that a buffer should be aligned to that: one that is not is still
// copied, with the pattern offset by its address bits 7-9. This emulator traps on it anyway: wgmma's descriptors
// (emu_wgmma_operand: base offset 0) read a swizzled tile from a 1024-byte boundary, so a TMA box elsewhere is a bug
// in a kernel that feeds wgmma.
inline void emu_tma_load_2d(void* dst, const void* tensor_map, int c0, int c1, uint64_t* bar) {
  EmuTensorMap m;
  memcpy(&m, tensor_map, sizeof m);
  if (m.magic != kEmuTensorMapMagic)
    emu_trap("cp.async.bulk.tensor: the tensor map was not written by the emulator's cuTensorMapEncodeTiled");
  if (m.rank != 2) emu_trapf("cp.async.bulk.tensor.2d with a tensor map of rank %u", m.rank);
  if (m.swizzle != 0 && m.swizzle != 3)
    emu_trapf("cp.async.bulk.tensor: swizzle mode %u is not emulated (NONE and 128B are)", m.swizzle);
  if (m.oob_fill != 0) emu_trap("cp.async.bulk.tensor: OOB fill NAN_REQUEST_ZERO_FMA is not emulated");
  const size_t bytes = emu_tma_box_bytes(m);
  if (m.swizzle == 3 && size_t(m.box[0]) * m.elem_bytes != 128)
    emu_trapf("cp.async.bulk.tensor: a 128-byte swizzle with %zu-byte box rows is not emulated (128-byte rows are)",
              size_t(m.box[0]) * m.elem_bytes);
  size_t bar_off;
  EmuMbarrier& b = emu_mbarrier_state(bar, "cp.async.bulk.tensor", &bar_off);
  const size_t off = emu_smem_offset(dst, bytes, "cp.async.bulk.tensor: the box is not inside the launch's dynamic "
                                                 "shared memory");
  const uint32_t addr = kEmuSmemWindow + uint32_t(off);
  if (addr % 128) emu_trapf("cp.async.bulk.tensor: destination shared address %#x is not 128-byte aligned", addr);
  if (m.swizzle == 3 && addr % 1024)
    emu_trapf("cp.async.bulk.tensor: destination shared address %#x of a 128-byte-swizzled box is not 1024-byte "
              "aligned", addr);
  for (const auto& [o, other] : emu_mbarriers())
    if (o + 8 > off && o < off + bytes)
      emu_trapf("cp.async.bulk.tensor: the box at offset %zu (%zu bytes) overlaps the mbarrier at offset %zu", off,
                bytes, o);
  memset(static_cast<char*>(dst), 0xff, bytes);
  b.copies.push_back({off, m, c0, c1});
}

// For the scheduler (driver.cpp), with the waiting thread current: whether phase `parity` of the mbarrier at offset
// `off` has completed. The barrier's copies land here, in issue order, once its phase waits for nothing but their
// bytes; a copy that brings more bytes than the phase still expects traps (on a GPU the barrier would hang).
inline bool emu_mbarrier_poll(size_t off, unsigned parity) {
  uint64_t* bar = reinterpret_cast<uint64_t*>(static_cast<char*>(emu_dynamic_smem()) + off);
  size_t o;
  EmuMbarrier& b = emu_mbarrier_state(bar, "mbarrier.try_wait.parity", &o);
  while ((b.phase & 1) == parity && b.pending == 0 && b.tx > 0 && !b.copies.empty()) {
    const EmuTmaCopy c = b.copies.front();
    b.copies.pop_front();
    emu_tma_land(c);
    b.tx -= int32_t(emu_tma_box_bytes(c.map));
    if (b.tx < 0)
      emu_trapf("a TMA copy of %zu bytes completed on the mbarrier at offset %zu, whose phase %u expected %d fewer "
                "(arrive.expect_tx announced less than its copies bring)", emu_tma_box_bytes(c.map), off, b.phase,
                -b.tx);
    emu_mbarrier_try_complete(b);
  }
  return (b.phase & 1) != parity;
}
// For a deadlock report: the state of the mbarrier at offset `off`.
inline void emu_mbarrier_describe(size_t off, char* buf, size_t n) {
  auto it = emu_mbarriers().find(off);
  if (it == emu_mbarriers().end()) {
    snprintf(buf, n, "not initialised");
    return;
  }
  const EmuMbarrier& b = it->second;
  snprintf(buf, n, "in phase %u, %u of %u arrivals pending, %d transaction bytes expected, %zu TMA copies queued",
           b.phase, b.pending, b.count, b.tx, b.copies.size());
}
// TMA copies still queued at the end of a block (then `*bar_off` names a barrier holding one): copies that no thread
// waited for, or whose bytes no arrive.expect_tx announced.
inline size_t emu_tma_in_flight(size_t* bar_off) {
  size_t n = 0;
  for (const auto& [off, b] : emu_mbarriers()) {
    if (!b.copies.empty() && !n) *bar_off = off;
    n += b.copies.size();
  }
  return n;
}
