// Self-test of the emulator's mbarriers, TMA copies, tensor maps and by-value struct parameters, without the Rust
// side (tools/cuda-emu/selftest.sh builds and runs it). Compiled like kernels/*.cu (emu.h force-included) into a
// libcuda.so.1 of its own with driver.cpp: the kernels below are found through the `.entry` declarations of a
// PTX-like string, as the backend's are, and launched through the driver API. `selftest CASE` runs one case: 0 when
// it passes; the trap cases abort with the emulator's message, which selftest.sh checks.

typedef int CUresult;
extern "C" {
CUresult cuModuleLoadData(void** module, const void* image);
CUresult cuModuleGetFunction(void** f, void* module, const char* name);
CUresult cuMemAlloc_v2(unsigned long long* p, size_t bytes);
CUresult cuMemcpyHtoD_v2(unsigned long long dst, const void* src, size_t n);
CUresult cuMemcpyDtoH_v2(void* dst, unsigned long long src, size_t n);
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, void* stream, void** params, void** extra);
CUresult cuTensorMapEncodeTiled(void* tensorMap, int dataType, unsigned rank, void* globalAddress,
                                const unsigned long long* globalDim, const unsigned long long* globalStrides,
                                const unsigned* boxDim, const unsigned* elementStrides, int interleave, int swizzle,
                                int l2Promotion, int oobFill);
CUresult cuStreamCreate(void** s, unsigned flags);
CUresult cuStreamBeginCapture_v2(void* s, int mode);
CUresult cuStreamEndCapture(void* s, void** graph);
CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long flags);
CUresult cuGraphLaunch(void* exec, void* stream);
}

namespace {

struct alignas(64) TensorMap {  // CUtensorMap
  uint64_t opaque[16];
};

// ---- kernels ---------------------------------------------------------------------------------------------------
// The pipeline: a [kRows, kCols] u16 matrix (row stride kStride elements) goes through a 2-stage ring of
// kBoxRows x kBoxCols boxes with the 128-byte swizzle, tiles covering rows -8..55 and columns 0..191 (out of bounds
// on every side but the left). Lane 0 of warp 0 produces; warps 1 and 2 un-swizzle each box into `out`
// ([kOutRows, kOutCols], row y + 8 for tensor row y) and release the stage.
constexpr int kRows = 40, kCols = 150, kStride = 160, kBoxRows = 16, kBoxCols = 64, kStageBytes = kBoxRows * 128;
constexpr int kStages = 2, kTilesX = 3, kTilesY = 4, kConsumers = 64, kOutRows = kTilesY * kBoxRows,
              kOutCols = kTilesX * kBoxCols;
enum Fault { kNone, kReadEarly, kReleaseEarly, kShortTx };

char* aligned_smem() {  // dynamic shared memory from its first 1024-byte window boundary
  char* smem = static_cast<char*>(emu_dynamic_smem());
  return smem + (1024 - emu_shared_address(smem) % 1024) % 1024;
}

}  // namespace

extern "C" void selftest_pipeline(const TensorMap& map, uint16_t* out, int fault) {
  char* base = aligned_smem();
  uint64_t* full = reinterpret_cast<uint64_t*>(base + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  const int t = threadIdx.x, tiles = kTilesX * kTilesY;
  if (t == 0) {
    for (int s = 0; s < kStages; s++) {
      emu_mbarrier_init(&full[s], 1);
      emu_mbarrier_init(&empty[s], kConsumers);
    }
  }
  __syncthreads();
  if (t < 32) {
    if (t != 0) return;
    for (int i = 0; i < tiles; i++) {
      const int s = i % kStages;
      if (i >= kStages) emu_mbarrier_wait(&empty[s], (i / kStages - 1) & 1);
      // Both orders are legal: the copy may be issued before the arrival that announces its bytes.
      const unsigned tx = kStageBytes + (fault == kShortTx ? 16 : 0);
      if (i % 2 == 0) emu_mbarrier_arrive_expect_tx(&full[s], tx);
      emu_tma_load_2d(base + s * kStageBytes, &map, i % kTilesX * kBoxCols, i / kTilesX * kBoxRows - 8, &full[s]);
      if (i % 2 == 1) emu_mbarrier_arrive_expect_tx(&full[s], tx);
    }
    return;
  }
  for (int i = 0; i < tiles; i++) {
    const int s = i % kStages;
    if (fault != kReadEarly) emu_mbarrier_wait(&full[s], (i / kStages) & 1);
    if (fault == kReleaseEarly) emu_mbarrier_arrive(&empty[s]);
    const char* stage = base + s * kStageBytes;
    for (int ch = t - 32; ch < kBoxRows * 8; ch += kConsumers) {  // 16-byte chunk j of box row r
      const int r = ch / 8, j = ch % 8;
      uint32_t addr = emu_shared_address(stage) + uint32_t(r * 128 + j * 16);
      addr ^= ((addr >> 7) & 7) << 4;
      const int y = i / kTilesX * kBoxRows + r, x = i % kTilesX * kBoxCols + j * 8;
      memcpy(out + y * kOutCols + x, emu_shared_bytes(addr, 16), 16);
    }
    if (fault == kReadEarly) emu_mbarrier_wait(&full[s], (i / kStages) & 1);
    if (fault != kReleaseEarly) emu_mbarrier_arrive(&empty[s]);
  }
}

// TMA-loaded operands read by the emulated wgmma: d (64 x 64, f32) = A (64 x 64) B^T (B 64 x 64), both bf16 and
// K-major in the 128-byte swizzle, one box each, one barrier; 128 threads.
namespace {
uint64_t smem_desc(uint32_t addr) {  // K-major, 128-byte swizzle, 8-row groups 1024 bytes apart
  return ((addr >> 4) & 0x3fff) | (1ull << 16) | (uint64_t(1024 >> 4) << 32) | (1ull << 62);
}
}  // namespace
extern "C" void selftest_wgmma(const TensorMap& a_map, const TensorMap& b_map, float* d_out) {
  char* base = aligned_smem();
  uint64_t* bar = reinterpret_cast<uint64_t*>(base + 2 * 8192);
  if (threadIdx.x == 0) emu_mbarrier_init(bar, 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    emu_mbarrier_arrive_expect_tx(bar, 2 * 8192);
    emu_tma_load_2d(base, &a_map, 0, 0, bar);
    emu_tma_load_2d(base + 8192, &b_map, 0, 0, bar);
  }
  emu_mbarrier_wait(bar, 0);
  float d[32] = {0};
  for (int kk = 0; kk < 4; kk++)  // k steps of 16 elements: 32 bytes along the swizzled 128-byte rows
    emu_wgmma_m64nNk16_bf16(d, 64, smem_desc(emu_shared_address(base) + 32 * kk),
                            smem_desc(emu_shared_address(base + 8192) + 32 * kk), 0);
  emu_wgmma_commit();
  emu_wgmma_wait(0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int j = 0; j < 8; j++)
    for (int e = 0; e < 4; e++)
      d_out[(16 * warp + lane / 4 + 8 * (e / 2)) * 64 + 8 * j + 2 * (lane % 4) + e % 2] = d[4 * j + e];
}

// One thread commits one misuse (or, for kOk, none) on the pipeline's tensor map.
enum Misuse {
  kOk, kUninit, kCount0, kMisaligned, kDoubleInit, kArrivals, kTxOverflow, kParity, kTmaAlign128, kTmaAlign1024,
  kTmaMap, kTmaBounds, kTmaUninitBar, kInFlight, kOverwrite, kOverlap, kTxExcess,
};
extern "C" void selftest_misuse(const TensorMap& map, int which) {
  char* base = aligned_smem();
  uint64_t* bar = reinterpret_cast<uint64_t*>(base + 8192);
  char* end = static_cast<char*>(emu_dynamic_smem()) + emu_dynamic_smem_bytes();
  TensorMap bogus{};
  if (which == kUninit) emu_mbarrier_wait(bar, 0);
  if (which == kTmaUninitBar) emu_tma_load_2d(base, &map, 0, 0, bar);
  emu_mbarrier_init(bar, which == kCount0 ? 0 : 1);
  switch (which) {
    case kMisaligned: emu_mbarrier_init(reinterpret_cast<uint64_t*>(base + 8196), 1); break;
    case kDoubleInit: emu_mbarrier_init(bar, 1); break;
    case kArrivals: emu_mbarrier_arrive_expect_tx(bar, 16); emu_mbarrier_arrive(bar); break;
    case kTxOverflow: emu_mbarrier_arrive_expect_tx(bar, 1u << 20); break;
    case kParity: emu_mbarrier_wait(bar, 2); break;
    case kTmaAlign128: emu_tma_load_2d(base + 16, &map, 0, 0, bar); break;
    case kTmaAlign1024: emu_tma_load_2d(base + 128, &map, 0, 0, bar); break;
    case kTmaMap: emu_tma_load_2d(base, &bogus, 0, 0, bar); break;
    case kTmaBounds: emu_tma_load_2d(end - 1024, &map, 0, 0, bar); break;
    case kInFlight: emu_mbarrier_arrive_expect_tx(bar, kStageBytes); emu_tma_load_2d(base, &map, 0, 0, bar); break;
    case kOverwrite: memset(bar, 0, 8); emu_mbarrier_arrive(bar); break;
    case kOverlap: emu_tma_load_2d(base + 8192 - 1024, &map, 0, 0, bar); break;
    case kTxExcess:
      emu_mbarrier_arrive_expect_tx(bar, kStageBytes / 2);
      emu_tma_load_2d(base, &map, 0, 0, bar);
      emu_mbarrier_wait(bar, 0);
      break;
    case kOk:
      emu_mbarrier_wait(bar, 1);  // the phase before the first: passes at once
      emu_mbarrier_arrive_expect_tx(bar, kStageBytes);
      emu_tma_load_2d(base, &map, 0, 0, bar);
      emu_mbarrier_wait(bar, 0);
      break;
  }
}

// ---- host side -------------------------------------------------------------------------------------------------
namespace {

const char kPtx[] = R"(.version 8.0
.target sm_90a
.address_size 64
.visible .entry selftest_pipeline(
	.param .align 64 .b8 selftest_pipeline_param_0[128],
	.param .u64 .ptr .align 1 selftest_pipeline_param_1,
	.param .u32 selftest_pipeline_param_2
)
{ ret; }
.visible .entry selftest_wgmma(
	.param .align 64 .b8 selftest_wgmma_param_0[128],
	.param .align 64 .b8 selftest_wgmma_param_1[128],
	.param .u64 .ptr .align 1 selftest_wgmma_param_2
)
{ ret; }
.visible .entry selftest_misuse(
	.param .align 64 .b8 selftest_misuse_param_0[128],
	.param .u32 selftest_misuse_param_1
)
{ ret; }
)";

#define CHECK(call)                                                                \
  do {                                                                             \
    const CUresult r_ = (call);                                                    \
    if (r_) {                                                                      \
      fprintf(stderr, "selftest: %s failed: %d (line %d)\n", #call, r_, __LINE__); \
      exit(1);                                                                     \
    }                                                                              \
  } while (0)

void* function(const char* name) {
  static void* module = [] {
    void* m;
    CHECK(cuModuleLoadData(&m, kPtx));
    return m;
  }();
  void* f;
  CHECK(cuModuleGetFunction(&f, module, name));
  return f;
}
unsigned long long upload(const void* host, size_t bytes) {
  unsigned long long p;
  CHECK(cuMemAlloc_v2(&p, bytes));
  CHECK(cuMemcpyHtoD_v2(p, host, bytes));
  return p;
}
CUresult encode(TensorMap* map, int dtype, void* address, unsigned long long dim0, unsigned long long dim1,
                unsigned long long stride, unsigned box0, unsigned box1, int swizzle, unsigned rank = 2,
                unsigned estride1 = 1) {
  const unsigned long long dims[3] = {dim0, dim1, 1}, strides[2] = {stride, stride * dim1};
  const unsigned box[3] = {box0, box1, 1}, estrides[3] = {1, estride1, 1};
  return cuTensorMapEncodeTiled(map, dtype, rank, address, dims, strides, box, estrides, 0, swizzle, 0, 0);
}

// The pipeline's input: distinct values, never 0 or 0xffff; the padding columns hold 0x7777, which must not appear.
std::vector<uint16_t> pipeline_input() {
  std::vector<uint16_t> in(size_t(kRows) * kStride, 0x7777);
  for (int y = 0; y < kRows; y++)
    for (int x = 0; x < kCols; x++) in[size_t(y) * kStride + x] = uint16_t(1 + y * kCols + x);
  return in;
}
// Runs the pipeline (captured into a graph and replayed when `graph`) and returns `out`.
std::vector<uint16_t> run_pipeline(Fault fault, bool graph) {
  const std::vector<uint16_t> in = pipeline_input();
  const unsigned long long d_in = upload(in.data(), in.size() * 2);
  std::vector<uint16_t> out(size_t(kOutRows) * kOutCols, 0x5555);
  unsigned long long d_out = upload(out.data(), out.size() * 2);
  TensorMap map;
  CHECK(encode(&map, 9, reinterpret_cast<void*>(d_in), kCols, kRows, kStride * 2, kBoxCols, kBoxRows, 3));
  int f = fault;
  void* args[] = {&map, &d_out, &f};
  const unsigned smem = kStages * kStageBytes + 4 * 8 + 1024;
  if (graph) {
    void *stream, *g, *exec;
    CHECK(cuStreamCreate(&stream, 0));
    CHECK(cuStreamBeginCapture_v2(stream, 1));
    CHECK(cuLaunchKernel(function("selftest_pipeline"), 1, 1, 1, 96, 1, 1, smem, stream, args, nullptr));
    CHECK(cuStreamEndCapture(stream, &g));
    CHECK(cuGraphInstantiateWithFlags(&exec, g, 0));
    map = TensorMap{};  // the replay must use the map's bytes as captured
    CHECK(cuGraphLaunch(exec, stream));
  } else {
    CHECK(cuLaunchKernel(function("selftest_pipeline"), 1, 1, 1, 96, 1, 1, smem, nullptr, args, nullptr));
  }
  CHECK(cuMemcpyDtoH_v2(out.data(), d_out, out.size() * 2));
  return out;
}
int check_pipeline(bool graph) {
  const std::vector<uint16_t> in = pipeline_input(), out = run_pipeline(kNone, graph);
  int bad = 0;
  for (int row = 0; row < kOutRows; row++)
    for (int x = 0; x < kOutCols; x++) {
      const int y = row - 8;
      const uint16_t want = y >= 0 && y < kRows && x < kCols ? in[size_t(y) * kStride + x] : 0;
      if (out[size_t(row) * kOutCols + x] != want && bad++ < 5)
        fprintf(stderr, "selftest: element (%d, %d) is %#x, want %#x\n", y, x, out[size_t(row) * kOutCols + x], want);
    }
  return bad != 0;
}

int check_wgmma() {
  std::vector<uint16_t> a(64 * 64), b(64 * 64);
  auto bf16 = [](int v) { return __float2bfloat16_rn(float(v)).bits; };
  for (int i = 0; i < 64 * 64; i++) {
    a[i] = bf16(i * 7 % 5 - 2);
    b[i] = bf16(i * 11 % 7 - 3);
  }
  const unsigned long long d_a = upload(a.data(), a.size() * 2), d_b = upload(b.data(), b.size() * 2);
  std::vector<float> d(64 * 64, -1.0f);
  unsigned long long d_d = upload(d.data(), d.size() * 4);
  TensorMap a_map, b_map;
  CHECK(encode(&a_map, 9, reinterpret_cast<void*>(d_a), 64, 64, 128, 64, 64, 3));
  CHECK(encode(&b_map, 9, reinterpret_cast<void*>(d_b), 64, 64, 128, 64, 64, 3));
  void* args[] = {&a_map, &b_map, &d_d};
  CHECK(cuLaunchKernel(function("selftest_wgmma"), 1, 1, 1, 128, 1, 1, 2 * 8192 + 8 + 1024, nullptr, args, nullptr));
  CHECK(cuMemcpyDtoH_v2(d.data(), d_d, d.size() * 4));
  int bad = 0;
  for (int m = 0; m < 64; m++)
    for (int n = 0; n < 64; n++) {
      float want = 0;  // small integers: exact in bf16 and in any summation order
      for (int k = 0; k < 64; k++) want += float((m * 64 + k) * 7 % 5 - 2) * float((n * 64 + k) * 11 % 7 - 3);
      if (d[m * 64 + n] != want && bad++ < 5)
        fprintf(stderr, "selftest: d(%d, %d) = %g, want %g\n", m, n, d[m * 64 + n], want);
    }
  return bad != 0;
}

// cuTensorMapEncodeTiled's validation (each refusal also prints a line).
int check_encode() {
  unsigned long long p;
  CHECK(cuMemAlloc_v2(&p, 1 << 16));
  void* g = reinterpret_cast<void*>(p);
  alignas(64) unsigned char raw[256];
  TensorMap* map = reinterpret_cast<TensorMap*>(raw);
  struct Case {
    const char* what;
    CUresult got, want;
  } cases[] = {
      {"valid", encode(map, 9, g, 150, 40, 320, 64, 16, 3), 0},
      {"map not 64-byte aligned", encode(reinterpret_cast<TensorMap*>(raw + 8), 9, g, 64, 64, 128, 64, 16, 3), 1},
      {"address not 16-byte aligned", encode(map, 9, static_cast<char*>(g) + 8, 64, 64, 128, 64, 16, 3), 1},
      {"data type 16", encode(map, 16, g, 64, 64, 128, 64, 16, 3), 1},
      {"dim 0", encode(map, 9, g, 0, 64, 128, 64, 16, 3), 1},
      {"stride not a multiple of 16", encode(map, 9, g, 150, 40, 300, 64, 16, 3), 1},
      {"stride below a row", encode(map, 9, g, 150, 40, 288, 64, 16, 3), 1},
      {"box 257", encode(map, 9, g, 512, 64, 1024, 64, 257, 0), 1},
      {"inner box not a multiple of 16 bytes", encode(map, 9, g, 64, 64, 128, 12, 16, 0), 1},
      {"inner box above the swizzle span", encode(map, 9, g, 128, 64, 256, 72, 16, 3), 1},
      {"rank 0", encode(map, 9, g, 64, 64, 128, 64, 16, 3, 0), 1},
      {"rank 3", encode(map, 9, g, 64, 64, 128, 64, 16, 3, 3), 801},
      {"element stride 2", encode(map, 9, g, 64, 64, 128, 64, 16, 3, 2, 2), 801},
  };
  int bad = 0;
  for (const Case& c : cases)
    if (c.got != c.want) {
      fprintf(stderr, "selftest: encode %s returned %d, want %d\n", c.what, c.got, c.want);
      bad++;
    }
  uint64_t magic;
  encode(map, 9, g, 150, 40, 320, 64, 16, 3);
  memcpy(&magic, map, 8);
  if (magic != kEmuTensorMapMagic) {
    fprintf(stderr, "selftest: the valid map has no magic number\n");
    bad++;
  }
  return bad != 0;
}

int run_misuse(int which) {
  std::vector<uint16_t> in = pipeline_input();
  const unsigned long long d_in = upload(in.data(), in.size() * 2);
  TensorMap map;
  CHECK(encode(&map, 9, reinterpret_cast<void*>(d_in), kCols, kRows, kStride * 2, kBoxCols, kBoxRows, 3));
  void* args[] = {&map, &which};
  CHECK(cuLaunchKernel(function("selftest_misuse"), 1, 1, 1, 1, 1, 1, 8192 + 1024 + 1024, nullptr, args, nullptr));
  return 0;
}

}  // namespace

extern "C" int emu_selftest(int argc, char** argv) {
  static const char* const misuses[] = {  // in the order of Misuse
      "ok",      "uninit",     "count0",         "misaligned", "double-init", "arrivals",
      "tx-overflow", "parity", "tma-align128",   "tma-align1024", "tma-map", "tma-bounds",
      "tma-uninit-bar", "in-flight", "overwrite", "overlap", "tx-excess",
  };
  const char* c = argc > 1 ? argv[1] : "";
  if (!strcmp(c, "pipeline")) return check_pipeline(false);
  if (!strcmp(c, "graph")) return check_pipeline(true);
  if (!strcmp(c, "wgmma")) return check_wgmma();
  if (!strcmp(c, "encode")) return check_encode();
  if (!strcmp(c, "read-early")) {
    // A planted fault: the consumers read each stage before waiting for it. Under the latest schedule every such
    // read sees NaN bytes (a copy that landed at issue would leave most of them right).
    const std::vector<uint16_t> out = run_pipeline(kReadEarly, false);
    const size_t nan = size_t(std::count(out.begin(), out.end(), uint16_t(0xffff)));
    fprintf(stderr, "selftest: %zu of %zu elements read as NaN\n", nan, out.size());
    return nan != out.size();
  }
  if (!strcmp(c, "release-early")) {
    // A planted fault: the consumers release each stage before reading it. The last release lets the waiting
    // producer run, and in forward order it refills the stage before the consumers read it.
    const std::vector<uint16_t> out = run_pipeline(kReleaseEarly, false);
    const size_t nan = size_t(std::count(out.begin(), out.end(), uint16_t(0xffff)));
    fprintf(stderr, "selftest: %zu of %zu elements read as NaN\n", nan, out.size());
    return nan == 0;
  }
  if (!strcmp(c, "deadlock")) {  // a planted fault: the full barriers expect 16 bytes more than the box
    run_pipeline(kShortTx, false);
    return 1;
  }
  for (int i = 0; i < int(sizeof misuses / sizeof *misuses); i++)
    if (!strcmp(c, misuses[i])) {
      run_misuse(i);
      return i != kOk;  // the others should have trapped
    }
  fprintf(stderr, "selftest: unknown case `%s`\n", c);
  return 2;
}
