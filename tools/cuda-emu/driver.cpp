// A CPU stand-in for libcuda.so: the part of the CUDA driver API that repshield's CUDA backend
// (through cudarc) calls, backed by host memory, running every kernel of kernels/*.cu compiled
// for the host (emu.h). See tools/cuda-emu/README.md for what it checks and what it cannot.
//
// Kernels: cuModuleLoadData parses the PTX it is given for each `.entry` and its parameter
// types; cuModuleGetFunction finds the host-compiled function of that name in this library;
// cuLaunchKernel runs the grid block by block, each block's threads as fibers (emu.h).
// x86-64 System V only: the call with a run-time parameter list relies on its register rules.
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "emu.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
enum : CUresult {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_OUT_OF_MEMORY = 2,
  CUDA_ERROR_NOT_SUPPORTED = 801,
  CUDA_ERROR_INVALID_DEVICE = 101,
  CUDA_ERROR_INVALID_IMAGE = 200,
  CUDA_ERROR_INVALID_PTX = 218,
  CUDA_ERROR_NOT_FOUND = 500,
  CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
  CUDA_ERROR_ILLEGAL_INSTRUCTION = 715,
  CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
  CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
  CUDA_ERROR_STREAM_CAPTURE_IMPLICIT = 906,
};

namespace {

[[noreturn]] void fatal(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "cuda-emu: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  abort();
}

int env_int(const char* name, int def) {
  const char* v = getenv(name);
  return v && *v ? atoi(v) : def;
}

// ---- fibers ------------------------------------------------------------------------------------
// emu_switch(save, to): saves the callee-saved registers on the current stack, stores the stack
// pointer in *save, and resumes the stack `to` (which was saved the same way, or prepared by
// new_stack to "return" into fiber_start).
extern "C" void emu_switch(void** save, void* to);
asm(R"(
.text
.p2align 4
.type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch, .-emu_switch
)");

enum State { RUNNABLE, AT_BLOCK_BARRIER, AT_WARP_BARRIER, AT_MBARRIER, DONE };

struct Fiber {
  EmuThread t;
  State state = DONE;
  unsigned warp_mask = 0;
  size_t bar_off = 0;  // AT_MBARRIER: the mbarrier (offset in dynamic shared memory) and the parity awaited
  unsigned bar_parity = 0;
  void* sp = nullptr;
  char* stack = nullptr;  // lowest usable byte; a guard page sits below it
};

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxParams = 32;

// P_BLOB: `.param .align A .b8 NAME[S]`, a struct passed by value (a `const __grid_constant__ CUtensorMap`). The
// host-compiled kernel declares it as a const reference, so it receives a pointer to the argument's bytes.
enum ParamKind { P_INT4, P_INT8, P_F32, P_F64, P_BLOB };

struct Function {
  std::string name;
  void* host = nullptr;
  std::vector<ParamKind> params;
  std::vector<size_t> blob_bytes;  // per parameter: S of a P_BLOB, 0 otherwise
  int max_dynamic_smem = 48 * 1024;
};

struct Module {
  std::map<std::string, Function*> functions;
};

struct Launch {
  Function* f;
  void** args;
};

// One kernel launch of a graph: the function, its configuration and its argument values
// (8 bytes each, a 4-byte value in the low half; a P_BLOB's bytes in `blobs`).
struct Node {
  Function* f;
  unsigned grid[3], block[3], smem;
  std::vector<uint64_t> values;
  std::vector<std::vector<uint64_t>> blobs;
};

struct Graph {
  std::vector<Node> nodes;
};

// A stream. Work runs when it is queued, except while the stream captures: launches are then
// recorded into `graph`, and anything else queued on it invalidates the capture.
struct Stream {
  Graph* graph = nullptr;   // capturing when not null
  bool invalidated = false;
  std::string why;          // what invalidated it
};

// The stream this thread captures on (the thread-local capture mode: while it captures, the
// thread may not allocate, free, copy synchronously or synchronise).
thread_local Stream* t_capturing = nullptr;

struct Emu {
  std::mutex lock;  // one launch (and one block) at a time: __shared__ statics are process-wide
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  std::vector<uint64_t> warp_slots;
  std::vector<unsigned char> dyn_smem;
  const Launch* launch = nullptr;
  uint64_t block_serial = 0;  // counts blocks run, launches included: per-block emulator state
  std::map<CUdeviceptr, size_t> allocs;  // user pointer -> usable bytes
  size_t allocated = 0;
  // REPSHIELD_EMU_ORDER=reverse runs the threads between two barriers last to first, and lets one
  // warp at a time run ahead to its next __syncthreads (the last warp first) before the others
  // pass their warp collectives: a result that changes with the order is a race (a shared-memory
  // read or write not ordered by a barrier, such as a refill of a stage that another warp has
  // still to read).
  bool reverse = [] {
    const char* v = getenv("REPSHIELD_EMU_ORDER");
    return v && !strcmp(v, "reverse");
  }();
};

Emu& emu() {
  static Emu* e = new Emu;  // never destroyed: cudarc may free buffers during process exit
  return *e;
}

// Every allocation has kRedzone bytes of kCanary before and after it; a launch that changes
// one wrote out of bounds.
constexpr size_t kRedzone = 256;
constexpr unsigned char kCanary = 0xa5;

void check_redzones(const char* after) {
  Emu& e = emu();
  for (const auto& [ptr, n] : e.allocs) {
    const auto* user = reinterpret_cast<const unsigned char*>(ptr);
    for (size_t i = 0; i < kRedzone; i++) {
      if (user[-1 - ptrdiff_t(i)] != kCanary)
        fatal("%s wrote %zu bytes before the start of a %zu-byte buffer", after, i + 1, n);
      if (user[n + i] != kCanary) fatal("%s wrote at byte %zu of a %zu-byte buffer (past its end)", after, n + i, n);
    }
  }
}

// Calls `f` with the parameter list `p`: integer-class values in the six integer registers,
// floats and doubles in the eight vector registers, the rest on the stack in parameter order,
// one 8-byte slot each (a 4-byte value in the low half), as the System V x86-64 ABI passes them.
typedef void (*Generic)(long, long, long, long, long, long, double, double, double, double, double, double, double,
                        double, long, long, long, long, long, long, long, long, long, long, long, long, long, long,
                        long, long, long, long, long, long, long, long, long, long);
constexpr int kStackSlots = 24;

void call_kernel(const Launch& l) {
  long gpr[6] = {0};
  double xmm[8] = {0};
  long stack[kStackSlots] = {0};
  int ng = 0, nx = 0, ns = 0;
  const auto& ps = l.f->params;
  for (size_t i = 0; i < ps.size(); i++) {
    const void* v = l.args[i];
    uint64_t bits = 0;
    bool vector_class = ps[i] == P_F32 || ps[i] == P_F64;
    if (ps[i] == P_BLOB)
      bits = reinterpret_cast<uintptr_t>(v);  // the kernel's const reference
    else
      memcpy(&bits, v, (ps[i] == P_INT4 || ps[i] == P_F32) ? 4 : 8);
    if (ps[i] == P_INT4) bits = uint64_t(int64_t(int32_t(uint32_t(bits))));  // sign-extend ints
    if (vector_class && nx < 8) {
      memcpy(&xmm[nx++], &bits, 8);
    } else if (!vector_class && ng < 6) {
      gpr[ng++] = long(bits);
    } else {
      if (ns == kStackSlots) fatal("%s: more stack parameters than the emulator passes", l.f->name.c_str());
      stack[ns++] = long(bits);
    }
  }
  auto g = reinterpret_cast<Generic>(l.f->host);
  g(gpr[0], gpr[1], gpr[2], gpr[3], gpr[4], gpr[5], xmm[0], xmm[1], xmm[2], xmm[3], xmm[4], xmm[5], xmm[6], xmm[7],
    stack[0], stack[1], stack[2], stack[3], stack[4], stack[5], stack[6], stack[7], stack[8], stack[9], stack[10],
    stack[11], stack[12], stack[13], stack[14], stack[15], stack[16], stack[17], stack[18], stack[19], stack[20],
    stack[21], stack[22], stack[23]);
}

[[noreturn]] void fiber_start() {
  Emu& e = emu();
  call_kernel(*e.launch);
  e.cur->state = DONE;
  emu_switch(&e.cur->sp, e.sched_sp);
  fatal("a finished fiber was resumed");
}

void prepare(Fiber& f) {
  if (!f.stack) {
    const size_t page = 4096;
    char* base = static_cast<char*>(
        mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (base == MAP_FAILED) fatal("cannot map a fiber stack");
    mprotect(base, page, PROT_NONE);  // stack overflow faults instead of corrupting a neighbour
    f.stack = base + page;
  }
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                     // fiber_start's return address: never used
  *--sp = reinterpret_cast<void*>(&fiber_start);       // emu_switch "returns" here
  for (int i = 0; i < 6; i++) *--sp = nullptr;         // rbp rbx r12 r13 r14 r15
  f.sp = sp;
  f.state = RUNNABLE;
}

std::string describe_thread(const Fiber& f) {
  char buf[160];
  const Emu& e = emu();
  snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u) warp %d lane %d", e.block_idx.x, e.block_idx.y,
           e.block_idx.z, f.t.tid.x, f.t.tid.y, f.t.tid.z, f.t.linear / 32, f.t.linear % 32);
  return buf;
}

// No thread can go on: report the kernel, what the threads wait at and one of them, preferably one waiting at an
// mbarrier (with that barrier's state), and among those one whose phase has all its arrivals and lacks only bytes.
[[noreturn]] void deadlock(int nthreads) {
  Emu& e = emu();
  int counts[DONE + 1] = {0};
  const Fiber* example[DONE + 1] = {nullptr};
  for (int k = 0; k < nthreads; k++) {
    const Fiber& f = e.fibers[e.reverse ? nthreads - 1 - k : k];
    counts[f.state]++;
    if (!example[f.state]) example[f.state] = &f;
    if (f.state == AT_MBARRIER && example[f.state] != &f && emu_mbarriers()[f.bar_off].pending == 0 &&
        emu_mbarriers()[example[f.state]->bar_off].pending != 0)
      example[f.state] = &f;
  }
  char what[320];
  if (const Fiber* f = example[AT_MBARRIER]) {
    char bar[160];
    emu_mbarrier_describe(f->bar_off, bar, sizeof bar);
    snprintf(what, sizeof what, "%s waits for parity %u of the mbarrier at dynamic shared memory offset %zu (%s)",
             describe_thread(*f).c_str(), f->bar_parity, f->bar_off, bar);
  } else if (const Fiber* f = example[AT_WARP_BARRIER]) {
    snprintf(what, sizeof what, "%s waits at a warp collective", describe_thread(*f).c_str());
  } else {
    snprintf(what, sizeof what, "%s waits at __syncthreads", describe_thread(*example[AT_BLOCK_BARRIER]).c_str());
  }
  fatal("%s: deadlock: %d threads wait at mbarriers, %d at warp collectives, %d at __syncthreads, %d exited; %s",
        e.launch->f->name.c_str(), counts[AT_MBARRIER], counts[AT_WARP_BARRIER], counts[AT_BLOCK_BARRIER],
        counts[DONE], what);
}

void run_block(int nthreads) {
  Emu& e = emu();
  for (int i = 0; i < nthreads; i++) prepare(e.fibers[i]);
  const int nwarps = (nthreads + 31) / 32;
  auto nth = [&](int k) -> Fiber& { return e.fibers[e.reverse ? nthreads - 1 - k : k]; };
  for (;;) {
    for (int k = 0; k < nthreads; k++) {
      Fiber& f = nth(k);
      if (f.state != RUNNABLE) continue;
      e.cur = &f;
      emu_switch(&e.sched_sp, f.sp);
    }
    // Threads waiting at an mbarrier whose phase completed go on; polling lands the barrier's TMA copies once
    // they are all its phase waits for (emu.h).
    for (int k = 0; k < nthreads; k++) {
      Fiber& f = nth(k);
      if (f.state != AT_MBARRIER) continue;
      e.cur = &f;  // a trap while landing names the waiting thread
      if (emu_mbarrier_poll(f.bar_off, f.bar_parity)) f.state = RUNNABLE;
    }
    e.cur = nullptr;
    int live = 0, at_block = 0, at_warp = 0, runnable = 0;
    for (int i = 0; i < nthreads; i++) {
      const State s = e.fibers[i].state;
      live += s != DONE;
      at_block += s == AT_BLOCK_BARRIER;
      at_warp += s == AT_WARP_BARRIER;
      runnable += s == RUNNABLE;
    }
    if (!live) return;
    bool opened = false;
    if (at_warp) {
      // Forward order opens every warp's collective each round (the warps advance in step);
      // reverse order only the highest waiting warp's, so that warp runs ahead of the rest.
      for (int k = 0; k < nwarps && !(e.reverse && opened); k++) {
        const int w = e.reverse ? nwarps - 1 - k : k;
        unsigned live_mask = 0, waiting = 0, on_the_way = 0;
        const Fiber* first = nullptr;
        const Fiber* odd = nullptr;
        for (int l = 0; l < 32 && w * 32 + l < nthreads; l++) {
          const Fiber& f = e.fibers[w * 32 + l];
          if (f.state != DONE) live_mask |= 1u << l;
          if (f.state == RUNNABLE || f.state == AT_MBARRIER) on_the_way |= 1u << l;
          if (f.state == AT_WARP_BARRIER) {
            waiting |= 1u << l;
            if (!first) first = &f;
            if (f.warp_mask != first->warp_mask) odd = &f;
          }
        }
        if (!waiting) continue;
        if (odd)
          fatal("%s: warp collective with mask %#x while another lane of the warp uses %#x (%s)",
                e.launch->f->name.c_str(), odd->warp_mask, first->warp_mask, describe_thread(*odd).c_str());
        // Lanes that yielded at an mbarrier arrive, or wait at an mbarrier, may still reach the collective (one lane
        // waits for a stage, then the warp goes on together); if they never do, that is reported as a deadlock.
        if (on_the_way) continue;
        if (waiting != live_mask || (first->warp_mask & live_mask) != first->warp_mask ||
            first->warp_mask != live_mask)
          fatal("%s: divergent warp collective: lanes %#x wait at a shuffle/vote/mma with mask %#x, live lanes are "
                "%#x (the others exited or wait at __syncthreads) (%s)",
                e.launch->f->name.c_str(), waiting, first->warp_mask, live_mask, describe_thread(*first).c_str());
        for (int l = 0; l < 32 && w * 32 + l < nthreads; l++) {
          Fiber& f = e.fibers[w * 32 + l];
          if (f.state == AT_WARP_BARRIER) f.state = RUNNABLE;
        }
        opened = true;
      }
    }
    if (opened || runnable) continue;
    if (at_block == live) {
      for (int i = 0; i < nthreads; i++)
        if (e.fibers[i].state == AT_BLOCK_BARRIER) e.fibers[i].state = RUNNABLE;
      continue;
    }
    deadlock(nthreads);
  }
}

// ---- PTX entry points -------------------------------------------------------------------------
// `.visible .entry NAME(\n .param .u64 .ptr .align 1 NAME_param_0,\n .param .f32 NAME_param_1 ...)`; a struct passed by
// value is `.param .align 64 .b8 NAME_param_2[128]`.
bool parse_ptx(const char* ptx, Module& m, void* self) {
  const char* p = ptx;
  while ((p = strstr(p, ".entry ")) != nullptr) {
    p += 7;
    const char* open = strchr(p, '(');
    if (!open) return false;
    std::string name(p, open);
    while (!name.empty() && (name.back() == ' ' || name.back() == '\n')) name.pop_back();
    const char* close = strchr(open, ')');
    if (!close) return false;
    auto* f = new Function;
    f->name = name;
    std::string params(open + 1, close);
    size_t pos = 0;
    while ((pos = params.find(".param ", pos)) != std::string::npos) {
      pos += 7;
      const std::string ty = params.substr(pos, 4);
      f->blob_bytes.push_back(0);
      if (params.compare(pos, 7, ".align ") == 0) {
        unsigned align = 0, bytes = 0;
        char ty8[8] = {0};
        int used = 0;
        if (sscanf(params.c_str() + pos, ".align %u %7s %*[^[][%u]%n", &align, ty8, &bytes, &used) != 3 || !used ||
            strcmp(ty8, ".b8") || !bytes)
          fatal("%s: parameter `%s` is not emulated", name.c_str(),
                params.substr(pos, params.find(',', pos) - pos).c_str());
        f->params.push_back(P_BLOB);
        f->blob_bytes.back() = bytes;
      } else if (ty == ".u64" || ty == ".s64" || ty == ".b64")
        f->params.push_back(P_INT8);
      else if (ty == ".u32" || ty == ".s32" || ty == ".b32")
        f->params.push_back(P_INT4);
      else if (ty == ".f32")
        f->params.push_back(P_F32);
      else if (ty == ".f64")
        f->params.push_back(P_F64);
      else
        fatal("%s: parameter type %s is not emulated", name.c_str(), ty.c_str());
    }
    if (f->params.size() > size_t(kMaxParams)) fatal("%s: too many parameters", name.c_str());
    f->host = dlsym(self, name.c_str());
    if (!f->host) fatal("kernel %s is in the PTX but was not compiled into the emulator", name.c_str());
    m.functions[name] = f;
    p = close;
  }
  return true;
}

void* self_handle() {
  static void* h = [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&self_handle), &info)) fatal("dladdr failed");
    void* h = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!h) fatal("cannot reopen %s", info.dli_fname);
    return h;
  }();
  return h;
}

char g_ctx, g_stream, g_pool;

// ---- stream capture ----------------------------------------------------------------------------
// The legacy default stream (null, or the one cuStreamCreate never returns) is not a Stream.
Stream* as_stream(void* s) { return s && s != &g_stream ? static_cast<Stream*>(s) : nullptr; }

// Whether `what`, queued on stream `s` (null: a synchronous call of this thread), must be
// refused because of a capture. It is when `s` captures (only launches are recorded), or when
// this thread captures and the call is not on a stream (the thread-local mode's rule). The
// capture is invalidated, as the driver does, and says why when it ends. Stricter than the
// driver, which records memsets, device copies and stream-ordered allocations as graph nodes:
// a recorded decode step has none of those, so one showing up is a bug.
bool capture_refuses(void* s, const char* what) {
  Stream* st = as_stream(s);
  Stream* victim = st && st->graph ? st : !st ? t_capturing : nullptr;
  if (!victim) return false;
  if (!victim->invalidated) {
    victim->invalidated = true;
    victim->why = what;
  }
  return true;
}


}  // namespace

// ---- runtime used by emu.h ------------------------------------------------------------------
extern "C" {
EmuThread* emu_current() { return &emu().cur->t; }
const dim3* emu_block_idx() { return &emu().block_idx; }
uint64_t emu_block_serial() { return emu().block_serial; }
const dim3* emu_block_dim() { return &emu().block_dim; }
const dim3* emu_grid_dim() { return &emu().grid_dim; }
void emu_syncthreads() {
  Emu& e = emu();
  e.cur->state = AT_BLOCK_BARRIER;
  emu_switch(&e.cur->sp, e.sched_sp);
}
void emu_syncwarp(unsigned mask) {
  Emu& e = emu();
  e.cur->state = AT_WARP_BARRIER;
  e.cur->warp_mask = mask;
  emu_switch(&e.cur->sp, e.sched_sp);
}
uint64_t* emu_warp_slots() {
  Emu& e = emu();
  return e.warp_slots.data() + size_t(e.cur->t.linear / 32) * 32 * 16;
}
void emu_mbarrier_block(size_t off, unsigned parity) {
  Emu& e = emu();
  e.cur->state = AT_MBARRIER;
  e.cur->bar_off = off;
  e.cur->bar_parity = parity;
  emu_switch(&e.cur->sp, e.sched_sp);
}
void emu_yield() {
  Emu& e = emu();
  emu_switch(&e.cur->sp, e.sched_sp);
}
// Called while a launch runs, so under e.lock already (check_range takes it).
bool emu_device_range(const void* p, size_t n) {
  const Emu& e = emu();
  const auto q = reinterpret_cast<CUdeviceptr>(p);
  auto it = e.allocs.upper_bound(q);
  if (it == e.allocs.begin()) return false;
  --it;
  return q + n <= it->first + it->second;
}
void* emu_dynamic_smem() { return emu().dyn_smem.data(); }
size_t emu_dynamic_smem_bytes() { return emu().dyn_smem.size(); }
void emu_trap(const char* what) {
  Emu& e = emu();
  fatal("%s: %s (%s)", e.launch ? e.launch->f->name.c_str() : "?", what,
        e.cur ? describe_thread(*e.cur).c_str() : "outside a kernel");
}

// ---- driver API ------------------------------------------------------------------------------
CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int* v) {
  *v = 13000;
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetCount(int* n) {
  *n = 1;
  return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
  if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
  *d = 0;
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
  snprintf(name, size_t(len), "repshield CUDA emulator (CPU, %d SMs)", env_int("REPSHIELD_EMU_SMS", 132));
  return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
  *bytes = size_t(16) << 30;
  return CUDA_SUCCESS;
}
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
  *total = size_t(16) << 30;
  *free_b = *total - std::min(*total, emu().allocated);
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
  switch (attr) {
    case 1: *v = 1024; break;                                  // max threads per block
    case 8: *v = 48 * 1024; break;                             // shared memory per block
    case 10: *v = 32; break;                                   // warp size
    case 12: *v = 65536; break;                                // registers per block
    case 13: *v = 1980000; break;                              // clock kHz
    case 16: *v = env_int("REPSHIELD_EMU_SMS", 132); break;    // SMs
    case 36: *v = 2619000; break;                              // memory clock kHz
    case 37: *v = 5120; break;                                 // bus width
    case 38: *v = 50 * 1024 * 1024; break;                     // L2
    case 41: *v = 1; break;                                    // unified addressing
    case 75: *v = 9; break;                                    // compute capability
    case 76: *v = 0; break;
    case 81: *v = 228 * 1024; break;                           // shared memory per SM
    case 97: *v = 227 * 1024; break;                           // opt-in shared memory per block
    case 115: *v = 0; break;                                   // memory pools: use cuMemAlloc
    default: *v = 0; break;
  }
  return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice) {
  *ctx = &g_ctx;
  return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(void*) { return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(void** ctx) {
  *ctx = &g_ctx;
  return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() {
  if (capture_refuses(nullptr, "a context synchronisation")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  return CUDA_SUCCESS;
}
CUresult cuStreamCreate(void** s, unsigned) {
  *s = new Stream;
  return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(void** s, unsigned, int) {
  *s = new Stream;
  return CUDA_SUCCESS;
}
CUresult cuStreamDestroy_v2(void* s) {
  if (s && s != &g_stream) delete static_cast<Stream*>(s);
  return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(void* s) {
  if (capture_refuses(s, "stream synchronisation")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  return CUDA_SUCCESS;
}
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return CUDA_SUCCESS; }
CUresult cuStreamIsCapturing(void* s, int* status) {
  Stream* st = as_stream(s);
  *status = !st || !st->graph ? 0 : st->invalidated ? 2 : 1;  // none, active, invalidated
  return CUDA_SUCCESS;
}
CUresult cuStreamBeginCapture_v2(void* s, int) {
  Stream* st = as_stream(s);
  if (!st) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;  // the legacy default stream
  if (st->graph || t_capturing) return CUDA_ERROR_INVALID_VALUE;
  st->graph = new Graph;
  st->invalidated = false;
  st->why.clear();
  t_capturing = st;
  return CUDA_SUCCESS;
}
CUresult cuStreamEndCapture(void* s, void** graph) {
  Stream* st = as_stream(s);
  if (!st || !st->graph) return CUDA_ERROR_INVALID_VALUE;
  Graph* g = st->graph;
  st->graph = nullptr;
  t_capturing = nullptr;
  if (st->invalidated) {
    fprintf(stderr, "cuda-emu: the capture was invalidated by %s\n", st->why.c_str());
    delete g;
    *graph = nullptr;
    return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
  }
  *graph = g;
  return CUDA_SUCCESS;
}
CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
  if (!graph) return CUDA_ERROR_INVALID_VALUE;
  *exec = new Graph(*static_cast<Graph*>(graph));
  return CUDA_SUCCESS;
}
CUresult cuGraphUpload(void* exec, void*) { return exec ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE; }
CUresult cuGraphExecDestroy(void* exec) {
  delete static_cast<Graph*>(exec);
  return CUDA_SUCCESS;
}
CUresult cuGraphDestroy(void* graph) {
  delete static_cast<Graph*>(graph);
  return CUDA_SUCCESS;
}
CUresult cuEventCreate(void** ev, unsigned) {
  *ev = new double(0);
  return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(void* ev) {
  delete static_cast<double*>(ev);
  return CUDA_SUCCESS;
}
CUresult cuEventRecord(void* ev, void* s) {
  // The driver records an event node; nothing the backend captures records events.
  if (capture_refuses(s, "an event record")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  *static_cast<double*>(ev) = double(ts.tv_sec) * 1e3 + double(ts.tv_nsec) * 1e-6;
  return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(void*) { return CUDA_SUCCESS; }
CUresult cuEventQuery(void*) { return CUDA_SUCCESS; }
CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
  *ms = float(*static_cast<double*>(b) - *static_cast<double*>(a));
  return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

static CUresult mem_alloc(CUdeviceptr* p, size_t bytes) {
  Emu& e = emu();
  std::lock_guard<std::mutex> g(e.lock);
  const size_t n = std::max<size_t>(bytes, 1);
  auto* m = static_cast<unsigned char*>(aligned_alloc(256, ((n + 255) & ~size_t(255)) + 2 * kRedzone));
  if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
  memset(m, kCanary, kRedzone);
  // Fresh device memory is garbage, not zeros: all-ones bytes read as NaN in bf16 and f32.
  memset(m + kRedzone, 0xff, n);
  memset(m + kRedzone + n, kCanary, kRedzone);
  *p = reinterpret_cast<CUdeviceptr>(m + kRedzone);
  e.allocs[*p] = n;
  e.allocated += n;
  return CUDA_SUCCESS;
}
static CUresult mem_free(CUdeviceptr p) {
  Emu& e = emu();
  std::lock_guard<std::mutex> g(e.lock);
  auto it = e.allocs.find(p);
  if (it == e.allocs.end()) return CUDA_ERROR_INVALID_VALUE;
  e.allocated -= it->second;
  e.allocs.erase(it);
  free(reinterpret_cast<unsigned char*>(p) - kRedzone);
  return CUDA_SUCCESS;
}
// The allocation holding [p, p + n), or fatal: a copy out of bounds is a host-side bug.
void check_range(CUdeviceptr p, size_t n, const char* what) {
  Emu& e = emu();
  std::lock_guard<std::mutex> g(e.lock);
  auto it = e.allocs.upper_bound(p);
  if (it == e.allocs.begin()) fatal("%s: address %#llx is not device memory", what, p);
  --it;
  if (p + n > it->first + it->second)
    fatal("%s of %zu bytes at offset %llu overruns a %zu-byte buffer", what, n, p - it->first, it->second);
}

static CUresult copy_htod(CUdeviceptr dst, const void* src, size_t n) {
  check_range(dst, n, "host-to-device copy");
  memcpy(reinterpret_cast<void*>(dst), src, n);
  return CUDA_SUCCESS;
}
static CUresult copy_dtoh(void* dst, CUdeviceptr src, size_t n) {
  check_range(src, n, "device-to-host copy");
  memcpy(dst, reinterpret_cast<const void*>(src), n);
  return CUDA_SUCCESS;
}
static CUresult copy_dtod(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  check_range(src, n, "device-to-device copy (source)");
  check_range(dst, n, "device-to-device copy (destination)");
  memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
  return CUDA_SUCCESS;
}
static CUresult set_d8(CUdeviceptr dst, unsigned char v, size_t n) {
  check_range(dst, n, "memset");
  memset(reinterpret_cast<void*>(dst), v, n);
  return CUDA_SUCCESS;
}
static CUresult set_d32(CUdeviceptr dst, unsigned v, size_t n) {
  check_range(dst, 4 * n, "memset");
  for (size_t i = 0; i < n; i++) reinterpret_cast<unsigned*>(dst)[i] = v;
  return CUDA_SUCCESS;
}

// The memory API: each call is refused while a capture forbids it (capture_refuses).
#define REFUSE(stream, what) \
  if (capture_refuses(stream, what)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
  REFUSE(nullptr, "an allocation");
  return mem_alloc(p, bytes);
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* s) {
  REFUSE(s, "a stream-ordered allocation");
  return mem_alloc(p, bytes);
}
CUresult cuMemFree_v2(CUdeviceptr p) {
  REFUSE(nullptr, "a free");
  return mem_free(p);
}
CUresult cuMemFreeAsync(CUdeviceptr p, void* s) {
  REFUSE(s, "a stream-ordered free");
  return mem_free(p);
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
  REFUSE(nullptr, "a host-to-device copy");
  return copy_htod(dst, src, n);
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* s) {
  REFUSE(s, "a host-to-device copy");
  return copy_htod(dst, src, n);
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
  REFUSE(nullptr, "a device-to-host copy");
  return copy_dtoh(dst, src, n);
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* s) {
  REFUSE(s, "a device-to-host copy");
  return copy_dtoh(dst, src, n);
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  REFUSE(nullptr, "a device-to-device copy");
  return copy_dtod(dst, src, n);
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* s) {
  REFUSE(s, "a device-to-device copy");
  return copy_dtod(dst, src, n);
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
  REFUSE(nullptr, "a memset");
  return set_d8(dst, v, n);
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* s) {
  REFUSE(s, "a memset");
  return set_d8(dst, v, n);
}
CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) {
  REFUSE(nullptr, "a memset");
  return set_d32(dst, v, n);
}
CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void* s) {
  REFUSE(s, "a memset");
  return set_d32(dst, v, n);
}
CUresult cuDeviceGetDefaultMemPool(void** pool, CUdevice) {
  *pool = &g_pool;
  return CUDA_SUCCESS;
}
CUresult cuMemPoolSetAttribute(void*, int, void*) { return CUDA_SUCCESS; }
CUresult cuMemPoolGetAttribute(void*, int, void*) { return CUDA_ERROR_NOT_SUPPORTED; }
CUresult cuMemPoolTrimTo(void*, size_t) { return CUDA_SUCCESS; }

CUresult cuModuleLoadData(void** module, const void* image) {
  // REPSHIELD_EMU_REJECT_TARGET=sm_90a: refuse PTX for that target, as a driver too old for it
  // would (to check that the backend carries on without the module).
  if (const char* t = getenv("REPSHIELD_EMU_REJECT_TARGET")) {
    if (*t && strstr(static_cast<const char*>(image), (std::string(".target ") + t + "\n").c_str()))
      return CUDA_ERROR_INVALID_PTX;
  }
  auto* m = new Module;
  if (!parse_ptx(static_cast<const char*>(image), *m, self_handle())) {
    delete m;
    return CUDA_ERROR_INVALID_IMAGE;
  }
  *module = m;
  return CUDA_SUCCESS;
}
CUresult cuModuleUnload(void*) { return CUDA_SUCCESS; }  // functions stay valid: nothing frees them
CUresult cuModuleGetFunction(void** f, void* module, const char* name) {
  auto& fs = static_cast<Module*>(module)->functions;
  auto it = fs.find(name);
  if (it == fs.end()) return CUDA_ERROR_NOT_FOUND;
  *f = it->second;
  return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(void* f, int attr, int value) {
  if (attr == 8) {  // max dynamic shared memory
    if (value > 227 * 1024) return CUDA_ERROR_INVALID_VALUE;
    static_cast<Function*>(f)->max_dynamic_smem = value;
  }
  return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int* v, int attr, void* f) {
  *v = attr == 8 ? static_cast<Function*>(f)->max_dynamic_smem : 0;
  return CUDA_SUCCESS;
}
CUresult cuFuncSetCacheConfig(void*, int) { return CUDA_SUCCESS; }

// cuTensorMapEncodeTiled, validated as cuda.h documents it (a refusal prints why); the map is an EmuTensorMap (emu.h)
// that the emulated cp.async.bulk.tensor reads. Rank 2, element strides of 1 and no interleave are emulated; other
// valid requests return CUDA_ERROR_NOT_SUPPORTED. Swizzles other than NONE and 128B encode, and trap when copied.
static CUresult tensor_map_refuse(CUresult r, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
static CUresult tensor_map_refuse(CUresult r, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "cuda-emu: cuTensorMapEncodeTiled: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  return r;
}
CUresult cuTensorMapEncodeTiled(void* tensorMap, int dataType, unsigned rank, void* globalAddress,
                                const unsigned long long* globalDim, const unsigned long long* globalStrides,
                                const unsigned* boxDim, const unsigned* elementStrides, int interleave, int swizzle,
                                int l2Promotion, int oobFill) {
  const CUresult bad = CUDA_ERROR_INVALID_VALUE, unsupported = CUDA_ERROR_NOT_SUPPORTED;
  if (!tensorMap || reinterpret_cast<uintptr_t>(tensorMap) % 64)
    return tensor_map_refuse(bad, "the tensor map is not 64-byte aligned");
  static const unsigned elem_bytes[] = {1, 2, 4, 4, 8, 8, 2, 4, 8, 2, 4, 4, 4};  // UINT8 .. TFLOAT32_FTZ
  if (dataType < 0 || dataType > 15) return tensor_map_refuse(bad, "data type %d", dataType);
  if (dataType > 12) return tensor_map_refuse(unsupported, "packed data type %d is not emulated", dataType);
  if (rank == 0 || rank > 5) return tensor_map_refuse(bad, "rank %u (1..5)", rank);
  if (interleave < 0 || interleave > 2) return tensor_map_refuse(bad, "interleave %d", interleave);
  if (swizzle < 0 || swizzle > 6) return tensor_map_refuse(bad, "swizzle %d", swizzle);
  if (l2Promotion < 0 || l2Promotion > 3) return tensor_map_refuse(bad, "L2 promotion %d", l2Promotion);
  if (oobFill < 0 || oobFill > 1) return tensor_map_refuse(bad, "OOB fill %d", oobFill);
  if (oobFill == 1 && dataType < 6) return tensor_map_refuse(bad, "NaN OOB fill with an integer data type");
  if (interleave != 0 && rank < 3) return tensor_map_refuse(bad, "interleave with rank %u (3..5)", rank);
  if (interleave == 2 && swizzle != 1) return tensor_map_refuse(bad, "32-byte interleave without the 32-byte swizzle");
  if (!globalAddress || reinterpret_cast<uintptr_t>(globalAddress) % (interleave == 2 ? 32 : 16))
    return tensor_map_refuse(bad, "global address %p is not %d-byte aligned", globalAddress, interleave == 2 ? 32 : 16);
  if (!globalDim || (rank > 1 && !globalStrides) || !boxDim || !elementStrides)
    return tensor_map_refuse(bad, "a null array");
  const unsigned esize = elem_bytes[dataType];
  for (unsigned i = 0; i < rank; i++) {
    if (globalDim[i] == 0 || globalDim[i] > (1ull << 32))
      return tensor_map_refuse(bad, "globalDim[%u] = %llu (1..2^32)", i, globalDim[i]);
    if (boxDim[i] == 0 || boxDim[i] > 256) return tensor_map_refuse(bad, "boxDim[%u] = %u (1..256)", i, boxDim[i]);
    if (elementStrides[i] == 0 || elementStrides[i] > 8)
      return tensor_map_refuse(bad, "elementStrides[%u] = %u (1..8)", i, elementStrides[i]);
  }
  for (unsigned i = 0; i + 1 < rank; i++) {
    if (globalStrides[i] % (interleave == 2 ? 32 : 16) || globalStrides[i] >= (1ull << 40))
      return tensor_map_refuse(bad, "globalStrides[%u] = %llu (a multiple of %d below 2^40)", i, globalStrides[i],
                               interleave == 2 ? 32 : 16);
    // cuda.h: globalStrides[0] = globalDim[0] * elementSize + padding[0], and each stride includes the one before.
    const unsigned long long below = i == 0 ? globalDim[0] * esize : globalStrides[i - 1] * globalDim[i];
    if (globalStrides[i] < below)
      return tensor_map_refuse(bad, "globalStrides[%u] = %llu is less than the %llu bytes of the dimensions below", i,
                               globalStrides[i], below);
  }
  const unsigned inner = boxDim[0] * esize;
  if (interleave == 0) {
    if (inner % 16) return tensor_map_refuse(bad, "the box's inner dimension is %u bytes, not a multiple of 16", inner);
    const unsigned span = swizzle == 0 ? 0 : swizzle == 1 ? 32 : swizzle == 2 ? 64 : 128;
    if (span && inner > span)
      return tensor_map_refuse(bad, "the box's inner dimension is %u bytes, above the %u-byte swizzle span", inner,
                               span);
  }
  if (rank != 2) return tensor_map_refuse(unsupported, "rank %u is not emulated (2 is)", rank);
  if (interleave != 0) return tensor_map_refuse(unsupported, "interleaved layouts are not emulated");
  if (elementStrides[1] != 1) return tensor_map_refuse(unsupported, "element strides other than 1 are not emulated");
  EmuTensorMap m{};
  m.magic = kEmuTensorMapMagic;
  m.dtype = unsigned(dataType);
  m.elem_bytes = esize;
  m.rank = rank;
  m.interleave = unsigned(interleave);
  m.swizzle = unsigned(swizzle);
  m.oob_fill = unsigned(oobFill);
  m.address = reinterpret_cast<uintptr_t>(globalAddress);
  m.dim[0] = globalDim[0];
  m.dim[1] = globalDim[1];
  m.stride = globalStrides[0];
  m.box[0] = boxDim[0];
  m.box[1] = boxDim[1];
  memset(tensorMap, 0, 128);
  memcpy(tensorMap, &m, sizeof m);
  return CUDA_SUCCESS;
}

// Runs one launch (validated by the caller) to completion.
static void run_launch(Function* f, const unsigned grid[3], const unsigned block[3], unsigned smem, void** params) {
  const unsigned bx = block[0], by = block[1], bz = block[2];
  const unsigned long long nthreads = (unsigned long long)bx * by * bz;
  Emu& e = emu();
  std::lock_guard<std::mutex> g(e.lock);
  Launch l{f, params};
  e.launch = &l;
  e.grid_dim = dim3{grid[0], grid[1], grid[2]};
  e.block_dim = dim3{bx, by, bz};
  if (e.fibers.size() < nthreads) e.fibers.resize(1024);
  e.warp_slots.assign(size_t((nthreads + 31) / 32) * 32 * 16, 0);
  for (unsigned i = 0; i < nthreads; i++) {
    Fiber& fb = e.fibers[i];
    fb.t.tid = dim3{i % bx, (i / bx) % by, i / (bx * by)};
    fb.t.linear = int(i);
  }
  for (unsigned z = 0; z < grid[2]; z++)
    for (unsigned y = 0; y < grid[1]; y++)
      for (unsigned x = 0; x < grid[0]; x++) {
        e.block_idx = dim3{x, y, z};
        // Dynamic shared memory starts as garbage on the GPU (NaN here).
        e.dyn_smem.assign(std::max<size_t>(smem, 16), 0xff);
        e.block_serial++;
        run_block(int(nthreads));
        size_t bar = 0;
        if (const size_t n = emu_tma_in_flight(&bar))
          fatal("%s: block (%u,%u,%u) ended with %zu TMA copies in flight, one on the mbarrier at dynamic shared "
                "memory offset %zu: no thread waited for them, or no arrive.expect_tx announced their bytes",
                f->name.c_str(), x, y, z, n, bar);
      }
  check_redzones(f->name.c_str());
  e.launch = nullptr;
}

CUresult cuLaunchKernel(void* func, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, void* stream, void** params, void** extra) {
  auto* f = static_cast<Function*>(func);
  if (extra) return CUDA_ERROR_NOT_SUPPORTED;
  const unsigned long long nthreads = (unsigned long long)bx * by * bz;
  if (nthreads == 0 || nthreads > 1024 || bz > 64 || gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535)
    return CUDA_ERROR_INVALID_VALUE;
  if (int(smem) > f->max_dynamic_smem) return CUDA_ERROR_INVALID_VALUE;
  if (!params && !f->params.empty()) return CUDA_ERROR_INVALID_VALUE;
  const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
  Stream* st = as_stream(stream);
  if (st && st->graph) {
    // Recorded with its argument values, as the driver does: a replay sees these values,
    // whatever the host variables hold by then.
    Node n{f, {gx, gy, gz}, {bx, by, bz}, smem, std::vector<uint64_t>(f->params.size(), 0), {}};
    n.blobs.resize(f->params.size());
    for (size_t i = 0; i < f->params.size(); i++) {
      const auto k = f->params[i];
      if (k == P_BLOB) {
        n.blobs[i].resize((f->blob_bytes[i] + 7) / 8);
        memcpy(n.blobs[i].data(), params[i], f->blob_bytes[i]);
      } else {
        memcpy(&n.values[i], params[i], (k == P_INT4 || k == P_F32) ? 4 : 8);
      }
    }
    st->graph->nodes.push_back(std::move(n));
    return CUDA_SUCCESS;
  }
  run_launch(f, grid, block, smem, params);
  return CUDA_SUCCESS;
}

CUresult cuGraphLaunch(void* exec, void* stream) {
  if (!exec) return CUDA_ERROR_INVALID_VALUE;
  if (capture_refuses(stream, "a graph launch")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  for (Node& n : static_cast<Graph*>(exec)->nodes) {
    std::vector<void*> ptrs(n.values.size());
    for (size_t i = 0; i < ptrs.size(); i++) ptrs[i] = n.f->params[i] == P_BLOB ? n.blobs[i].data() : &n.values[i];
    run_launch(n.f, n.grid, n.block, n.smem, ptrs.data());
  }
  return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult r, const char** s) {
  switch (r) {
    case CUDA_SUCCESS: *s = "no error"; break;
    case CUDA_ERROR_INVALID_VALUE: *s = "invalid argument"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *s = "out of memory"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *s = "operation not supported by the CUDA emulator"; break;
    case CUDA_ERROR_NOT_FOUND: *s = "named symbol not found"; break;
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: *s = "operation not permitted when stream is capturing"; break;
    case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: *s = "operation failed due to a previous error during capture"; break;
    default: *s = "unknown error"; break;
  }
  return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult r, const char** s) {
  switch (r) {
    case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
    case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: *s = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
    case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: *s = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
    default: *s = "CUDA_ERROR_UNKNOWN"; break;
  }
  return CUDA_SUCCESS;
}
}
