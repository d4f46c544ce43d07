// Runs CUDA kernel source on a CPU, for machines without a GPU: every thread of a block is a fiber
// (ucontext) on one OS thread, and a warp-wide operation (shuffle, vote, mma.sync, movmatrix,
// ldmatrix) or __syncthreads parks its thread until every thread it waits for has arrived; then each
// reads the others' values.
// Blocks run one after another, so a kernel's __shared__ arrays are plain statics.
//
// What it checks beyond the results: every __ldg, cp.async source and L2 prefetch address against the
// buffers the caller registers (reads past an allocation are silent on a GPU), ldmatrix rows against
// the block's dynamic shared memory (which starts as garbage, as on a GPU), and warp operations that
// not all lanes reach (a deadlock here, undefined behaviour there). cp.async copies land only when a
// cp.async.wait_group retires their group, so data read before its wait is stale. It does not model
// timing, the memory model beyond that, or the rounding inside an mma (accumulated in double,
// rounded once per call).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace at {
using c10::BFloat16;
using c10::Half;
}  // namespace at

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define ENGRAM_DYNAMIC_SHARED(name) unsigned char* name = engram::host_warps::block->shared.data()

struct HostDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline HostDim3 threadIdx, blockIdx, blockDim, gridDim;

struct uint2 {
  uint32_t x, y;
};
struct uint4 {
  uint32_t x, y, z, w;
};
struct float4 {
  float x, y, z, w;
};
inline uint2 make_uint2(uint32_t x, uint32_t y) { return {x, y}; }
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
inline float __expf(float x) { return std::exp(x); }

// ---- 16-bit floats (c10's, which round to nearest even as CUDA's _rn conversions do) ---------------
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __ushort_as_half(unsigned short bits) { return __half(bits, __half::from_bits()); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__half(lo), __half(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__nv_bfloat16(lo), __nv_bfloat16(hi)}; }

namespace engram {
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

namespace host_warps {

// Buffers a kernel may read, and the first error seen (empty: none).
struct Checks {
  std::vector<std::pair<const char*, const char*>> readable;
  std::string error;
};
inline Checks checks;

// A buffer as a C caller (a test, through ctypes) passes it.
struct Buffer {
  const void* data;
  int64_t bytes;
};

// Forgets the last run's error and registers the buffers the next run may read.
inline void start_checks(const Buffer* readable, int n) {
  checks = {};
  for (int i = 0; i < n; ++i) {
    const char* begin = static_cast<const char*>(readable[i].data);
    checks.readable.emplace_back(begin, begin + readable[i].bytes);
  }
}

// The first error of the last run for a C caller (null: none), valid until the next run.
inline const char* run_error() { return checks.error.empty() ? nullptr : checks.error.c_str(); }

inline void fail(const std::string& message) {
  if (checks.error.empty()) checks.error = message;
}

inline bool readable(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (const auto& [begin, end] : checks.readable)
    if (c >= begin && c + bytes <= end) return true;
  return false;
}

// One block's threads and where each waits. A warp operation or barrier numbers its arrivals per
// thread; a thread waiting on arrival n may go on once every thread it waits for has arrived n times.
// Values are exchanged in two alternating slots: no lane can be two warp operations ahead of another.
struct Block {
  static constexpr int kSlotWords = 8;
  enum Wait { kNone, kWarpOp, kBarrier, kDone };
  struct Copy {
    void* to;
    const void* from;
    int bytes, read;  // `read` of `bytes` come from `from`, the rest are zeros
  };
  struct Thread {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    Wait wait = kNone;
    int64_t warp_ops = 0, barriers = 0;
    uint32_t slot[2][kSlotWords];
    std::vector<Copy> open;                // cp.async copies not yet committed
    std::deque<std::vector<Copy>> groups;  // committed groups, oldest first
  };
  std::vector<Thread> threads;
  std::vector<unsigned char> shared;  // dynamic shared memory
  ucontext_t scheduler;
  int current = 0;
  std::function<void()> body;

  bool may_go_on(int i) const {
    const Thread& self = threads[i];
    if (self.wait == kDone) return false;
    if (self.wait == kNone) return true;
    const bool warp = self.wait == kWarpOp;
    const int first = warp ? i / kWarp * kWarp : 0;
    const int end = warp ? std::min<int>(first + kWarp, static_cast<int>(threads.size())) : threads.size();
    for (int j = first; j < end; ++j) {
      const Thread& other = threads[j];
      if (warp ? other.warp_ops < self.warp_ops : other.barriers < self.barriers) return false;
    }
    return true;
  }
};
inline Block* block = nullptr;

// Whether [p, p + bytes) lies in the block's dynamic shared memory, starting 16-byte aligned (what
// ldmatrix rows and cp.async destinations need).
inline bool in_shared(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  const auto& shared = block->shared;
  return c >= shared.data() && c + bytes <= shared.data() + shared.size() && (c - shared.data()) % 16 == 0;
}

inline void thread_main() {
  block->body();
  block->threads[block->current].wait = Block::kDone;
}

inline void park(Block::Wait wait) {
  Block::Thread& self = block->threads[block->current];
  self.wait = wait;
  swapcontext(&self.context, &block->scheduler);
  self.wait = Block::kNone;
}

// Runs body once per thread of a block of `threads` threads with `shared_bytes` of dynamic shared
// memory (blockIdx is the caller's to set).
inline void run_block(int threads, std::function<void()> body, size_t shared_bytes = 0) {
  constexpr size_t kStack = 256 * 1024;
  Block b;
  b.threads.resize(threads);
  b.shared.assign(shared_bytes, 0xcd);
  b.body = std::move(body);
  block = &b;
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  for (auto& t : b.threads) {
    t.stack.reset(new char[kStack]);
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = t.stack.get();
    t.context.uc_stack.ss_size = kStack;
    t.context.uc_link = &b.scheduler;
    makecontext(&t.context, thread_main, 0);
  }
  for (;;) {
    bool ran = false, all_done = true;
    for (int i = 0; i < threads; ++i) {
      all_done &= b.threads[i].wait == Block::kDone;
      if (!b.may_go_on(i)) continue;
      b.current = i;
      threadIdx = {static_cast<unsigned>(i), 0, 0};
      swapcontext(&b.scheduler, &b.threads[i].context);
      ran = true;
    }
    if (all_done) break;
    if (!ran) {
      fail("a warp operation or __syncthreads that not every thread reaches (deadlock)");
      break;  // the parked fibers are dropped with their stacks
    }
  }
  block = nullptr;
}

// Runs body as every block of a (grid_x, grid_y) grid, one after another, until one fails a check.
inline void run_grid(int64_t grid_x, int64_t grid_y, int threads, size_t shared_bytes,
                     const std::function<void()>& body) {
  for (int64_t x = 0; x < grid_x; ++x)
    for (int64_t y = 0; y < grid_y; ++y) {
      blockIdx = {static_cast<unsigned>(x), static_cast<unsigned>(y), 0};
      run_block(threads, body, shared_bytes);
      if (!checks.error.empty()) return;
    }
}

// Deposits `words` 32-bit words, waits for the warp, and returns the warp's slots of this operation.
template <int WORDS>
inline const Block::Thread* warp_exchange(const uint32_t (&words)[WORDS], int& parity) {
  static_assert(WORDS <= Block::kSlotWords, "too many words for one warp operation");
  Block::Thread& self = block->threads[block->current];
  parity = static_cast<int>(++self.warp_ops & 1);
  std::memcpy(self.slot[parity], words, sizeof(words));
  park(Block::kWarpOp);
  return &block->threads[block->current / kWarp * kWarp];
}

template <typename T>
inline T shuffle(T value, int source_lane) {
  static_assert(sizeof(T) <= 4, "32-bit shuffles only");
  uint32_t word[1] = {0};
  std::memcpy(word, &value, sizeof(T));
  int parity;
  const Block::Thread* warp = warp_exchange(word, parity);
  T out;
  std::memcpy(&out, warp[source_lane % kWarp].slot[parity], sizeof(T));
  return out;
}

inline float bits_to_float(uint32_t half_bits, bool bf16) {
  if (bf16) {
    const uint32_t f = half_bits << 16;
    float out;
    std::memcpy(&out, &f, sizeof(out));
    return out;
  }
  return static_cast<float>(__ushort_as_half(static_cast<unsigned short>(half_bits)));
}

// Element (row, k) of the A fragments of lane (row % 8, k % 8 / 2) and (k, n) of B's, per PTX's
// m16n8k16 layouts for 16-bit operands.
inline float a_element(const Block::Thread* warp, int parity, int row, int k, bool bf16) {
  const uint32_t reg = warp[row % 8 * 4 + k % 8 / 2].slot[parity][(row >= 8) + 2 * (k >= 8)];
  return bits_to_float(k % 2 ? reg >> 16 : reg & 0xffff, bf16);
}
inline float b_element(const Block::Thread* warp, int parity, int k, int n, bool bf16) {
  const uint32_t reg = warp[n * 4 + k % 8 / 2].slot[parity][4 + (k >= 8)];
  return bits_to_float(k % 2 ? reg >> 16 : reg & 0xffff, bf16);
}

}  // namespace host_warps

namespace ptx {

template <bool BF16>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t words[6] = {a[0], a[1], a[2], a[3], b0, b1};
  int parity;
  const auto* warp = host_warps::warp_exchange(words, parity);
  const int lane = host_warps::block->current % kWarp, g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {  // C fragment: rows g, g + 8 x columns 2t, 2t + 1
    const int row = g + 8 * (e / 2), n = 2 * t + e % 2;
    double sum = d[e];
    for (int k = 0; k < 16; ++k)
      sum += static_cast<double>(host_warps::a_element(warp, parity, row, k, BF16)) *
             host_warps::b_element(warp, parity, k, n, BF16);
    d[e] = static_cast<float>(sum);
  }
}

inline float ex2(float x) {
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  const uint64_t bytes = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t d = 0;
  for (int k = 0; k < 4; ++k) {
    const uint32_t s = (selector >> (4 * k)) & 0xf;
    uint32_t byte = (bytes >> (8 * (s & 7))) & 0xff;
    if (s & 8) byte = byte & 0x80 ? 0xff : 0;  // sign replication
    d |= byte << (8 * k);
  }
  return d;
}

inline uint32_t movmatrix_trans(uint32_t x) {
  const uint32_t word[1] = {x};
  int parity;
  const auto* warp = host_warps::warp_exchange(word, parity);
  const auto element = [&](int row, int column) {  // of the source matrix
    const uint32_t reg = warp[row * 4 + column / 2].slot[parity][0];
    return column % 2 ? reg >> 16 : reg & 0xffff;
  };
  const int lane = host_warps::block->current % kWarp, row = lane / 4, column = 2 * (lane % 4);
  return element(column, row) | element(column + 1, row) << 16;
}

inline void prefetch_l2(const void* p) {
  if (!host_warps::readable(p, 1)) host_warps::fail("L2 prefetch outside every buffer");
}

template <bool TRANS>
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  if (!host_warps::in_shared(row, 16)) host_warps::fail("ldmatrix row outside shared memory or not 16-byte aligned");
  uint32_t words[2];
  std::memcpy(words, &row, sizeof(row));
  int parity;
  const auto* warp = host_warps::warp_exchange(words, parity);
  const auto row_of = [&](int lane) {  // lane's row address, or null if it failed the check
    const unsigned char* q;
    std::memcpy(&q, warp[lane].slot[parity], sizeof(q));
    return host_warps::in_shared(q, 16) ? q : nullptr;
  };
  const auto element = [&](int lane, int column) -> uint32_t {
    const unsigned char* q = row_of(lane);
    uint16_t e = 0;
    if (q) std::memcpy(&e, q + 2 * column, 2);
    return e;
  };
  const int lane = host_warps::block->current % kWarp;
  for (int i = 0; i < 4; ++i) {  // matrix i: rows from lanes 8i .. 8i + 7
    const int base = 8 * i;
    if (TRANS)  // rows 2 (lane % 4), + 1 of the stored matrix, column lane / 4
      r[i] = element(base + 2 * (lane % 4), lane / 4) | element(base + 2 * (lane % 4) + 1, lane / 4) << 16;
    else  // row lane / 4, columns 2 (lane % 4), + 1
      r[i] = element(base + lane / 4, 2 * (lane % 4)) | element(base + lane / 4, 2 * (lane % 4) + 1) << 16;
  }
}

inline void cp_async_16(void* shared, const void* global, int bytes) {
  if (!host_warps::in_shared(shared, 16)) {
    host_warps::fail("cp.async destination outside shared memory or not 16-byte aligned");
    return;
  }
  if (bytes > 0 && !host_warps::readable(global, bytes)) host_warps::fail("cp.async outside every buffer");
  host_warps::block->threads[host_warps::block->current].open.push_back({shared, global, 16, bytes});
}

inline void cp_async_commit() {
  auto& self = host_warps::block->threads[host_warps::block->current];
  self.groups.push_back(std::move(self.open));
  self.open.clear();
}

// Lands the copies of every committed group but the newest N.
template <int N>
inline void cp_async_wait() {
  auto& self = host_warps::block->threads[host_warps::block->current];
  while (static_cast<int>(self.groups.size()) > N) {
    for (const auto& copy : self.groups.front()) {
      std::memset(copy.to, 0, copy.bytes);
      if (copy.read > 0 && host_warps::readable(copy.from, copy.read)) std::memcpy(copy.to, copy.from, copy.read);
    }
    self.groups.pop_front();
  }
}

// Blocks and grids run one after another here: a dependent grid starts after its primary anyway.
inline void launch_dependents() {}
inline void wait_for_primary() {}

}  // namespace ptx
}  // namespace engram

template <typename T>
inline T __ldg(const T* p) {
  if (!engram::host_warps::readable(p, sizeof(T))) {
    engram::host_warps::fail("__ldg outside every buffer");
    return T{};
  }
  return *p;
}

// An L2 read on a GPU (the last block of a split-K merge reads the others' partials with it).
template <typename T>
inline T __ldcg(const T* p) {
  return __ldg(p);
}
// Blocks run one after another: every write is visible and every add atomic.
inline void __threadfence() {}
inline int atomicAdd(int* p, int value) {
  const int old = *p;
  *p += value;
  return old;
}

template <typename T>
inline T __shfl_sync(unsigned, T value, int lane) {
  return engram::host_warps::shuffle(value, lane);
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T value, int mask) {
  return engram::host_warps::shuffle(value, static_cast<int>(engram::host_warps::block->current % engram::kWarp) ^ mask);
}
inline int __any_sync(unsigned, bool predicate) {
  const uint32_t word[1] = {predicate};
  int parity;
  const auto* warp = engram::host_warps::warp_exchange(word, parity);
  for (int lane = 0; lane < engram::kWarp; ++lane)
    if (warp[lane].slot[parity][0]) return 1;
  return 0;
}
inline void __syncwarp(unsigned = 0xffffffffu) {
  const uint32_t word[1] = {0};
  int parity;
  engram::host_warps::warp_exchange(word, parity);
}
inline void __syncthreads() {
  auto& self = engram::host_warps::block->threads[engram::host_warps::block->current];
  ++self.barriers;
  engram::host_warps::park(engram::host_warps::Block::kBarrier);
}
