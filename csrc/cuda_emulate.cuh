// A CPU emulation of the part of CUDA that step_kernels.cu and select_kernels.cu use, for
// tests on machines without a GPU (tests/test_gpu_fastpath.py compiles the two files with g++
// against it, the `kernel<<<...>>>(...)` launches rewritten as emu::launch calls, and checks
// them against the reference ops). Never part of the extension.
//
// Each thread of a block is a fiber (ucontext) of one OS thread. Fibers switch only at
// __syncthreads and at the warp-synchronous intrinsics (shuffles, ballot, match), which are
// barriers of the block / of the warp; between barriers the runnable fibers run in a random
// order, and the blocks of a grid run one after another in a random order. A barrier that some
// thread of the block (or warp) never reaches is reported as a deadlock: the kernels must call
// __syncthreads with the whole block and the warp intrinsics with whole warps (full masks). What
// it cannot show: races inside a phase between barriers, concurrency between blocks (blocks
// do not overlap), memory-model fences, and the GPU's exact float rounding (expf, logf).
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define FASTSEL_CUDA_EMULATION 1

using std::isfinite;

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

namespace emu {

struct Thread {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  int warp = 0, lane = 0;
  bool done = false, waiting = false;
};

struct Barrier {
  int arrived = 0, expected = 0;
  std::vector<int> waiters;
};

inline dim3 g_block_idx, g_block_dim, g_grid_dim;
inline std::vector<Thread> g_threads;
inline Thread* g_cur = nullptr;
inline ucontext_t g_sched;
inline Barrier g_block_bar;
inline std::vector<Barrier> g_warp_bar;
inline std::vector<uint64_t> g_xchg;
inline std::function<void()> g_body;
inline std::mt19937 g_rng(12345);
inline int g_sms = 4;
inline std::string g_error;

inline void release(Barrier& b) {
  for (const int w : b.waiters) g_threads[w].waiting = false;
  b.waiters.clear();
  b.arrived = 0;
}

// The current thread arrives at b; it goes on once every live participant has.
inline void wait(Barrier& b) {
  Thread* t = g_cur;
  if (++b.arrived >= b.expected) {
    release(b);
    return;
  }
  t->waiting = true;
  b.waiters.push_back(static_cast<int>(t - g_threads.data()));
  swapcontext(&t->ctx, &g_sched);
}

// A finished thread no longer counts at its block's and warp's barriers.
inline void leave(Barrier& b) {
  --b.expected;
  if (b.arrived > 0 && b.arrived >= b.expected) release(b);
}

inline void trampoline() {
  g_body();
  Thread* t = g_cur;
  t->done = true;
  leave(g_block_bar);
  leave(g_warp_bar[t->warp]);
}  // returns to uc_link: the scheduler

inline void run_block(unsigned int block, unsigned int threads) {
  g_block_idx.x = block;
  const int warps = static_cast<int>((threads + 31) / 32);
  if (g_threads.size() < threads) g_threads.resize(threads);
  g_warp_bar.assign(warps, Barrier{});
  g_xchg.assign(threads, 0);
  g_block_bar = Barrier{};
  g_block_bar.expected = static_cast<int>(threads);
  for (unsigned int i = 0; i < threads; ++i) {
    Thread& t = g_threads[i];
    if (t.stack.empty()) t.stack.resize(256 * 1024);
    t.tid.x = i;
    t.warp = static_cast<int>(i / 32);
    t.lane = static_cast<int>(i % 32);
    t.done = t.waiting = false;
    ++g_warp_bar[t.warp].expected;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.data();
    t.ctx.uc_stack.ss_size = t.stack.size();
    t.ctx.uc_link = &g_sched;
    makecontext(&t.ctx, trampoline, 0);
  }
  std::vector<unsigned int> order(threads);
  std::iota(order.begin(), order.end(), 0u);
  for (;;) {
    std::shuffle(order.begin(), order.end(), g_rng);
    bool ran = false, all_done = true;
    for (const unsigned int i : order) {
      Thread& t = g_threads[i];
      if (t.done) continue;
      all_done = false;
      if (t.waiting) continue;
      ran = true;
      g_cur = &t;
      swapcontext(&g_sched, &t.ctx);
    }
    if (all_done) return;
    if (!ran) {
      g_error = "deadlock in block " + std::to_string(block) +
                ": a __syncthreads or warp-synchronous call was not reached by every thread";
      return;
    }
  }
}

struct Cfg {
  unsigned int grid;
  unsigned int block;
  size_t smem;
  cudaStream_t stream;
};

template <typename K, typename... A>
void launch(Cfg cfg, K kernel, A... args) {
  if (!g_error.empty()) return;
  g_grid_dim.x = cfg.grid;
  g_block_dim.x = cfg.block;
  g_body = [=]() { kernel(args...); };
  std::vector<unsigned int> blocks(cfg.grid);
  std::iota(blocks.begin(), blocks.end(), 0u);
  std::shuffle(blocks.begin(), blocks.end(), g_rng);
  for (const unsigned int b : blocks) {
    run_block(b, cfg.block);
    if (!g_error.empty()) return;
  }
}

template <typename V, typename F>
V exchange(V v, F source_lane) {
  Thread* t = g_cur;
  uint64_t bits = 0;
  static_assert(sizeof(V) <= sizeof(bits), "exchange: value too wide");
  std::memcpy(&bits, &v, sizeof v);
  g_xchg[t->tid.x] = bits;
  wait(g_warp_bar[t->warp]);
  V r = v;
  const int src = source_lane(t->lane);
  if (src >= 0 && src < 32) std::memcpy(&r, &g_xchg[t->warp * 32 + src], sizeof r);
  wait(g_warp_bar[t->warp]);
  return r;
}

template <typename V>
unsigned int lanes_where(V v, bool (*pred)(V, V)) {
  Thread* t = g_cur;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  g_xchg[t->tid.x] = bits;
  wait(g_warp_bar[t->warp]);
  unsigned int m = 0;
  for (int l = 0; l < 32; ++l) {
    V o;
    std::memcpy(&o, &g_xchg[t->warp * 32 + l], sizeof o);
    if (pred(v, o)) m |= 1u << l;
  }
  wait(g_warp_bar[t->warp]);
  return m;
}

}  // namespace emu

#define threadIdx (emu::g_cur->tid)
#define blockIdx (emu::g_block_idx)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)

inline void __syncthreads() { emu::wait(emu::g_block_bar); }
inline void __threadfence() {}

template <typename V>
V __shfl_xor_sync(unsigned int, V v, int mask, int = 32) {
  return emu::exchange(v, [=](int lane) { return lane ^ mask; });
}
template <typename V>
V __shfl_up_sync(unsigned int, V v, unsigned int d, int = 32) {
  return emu::exchange(v, [=](int lane) { return lane >= static_cast<int>(d) ? lane - static_cast<int>(d) : lane; });
}
template <typename V>
V __shfl_down_sync(unsigned int, V v, unsigned int d, int = 32) {
  return emu::exchange(v, [=](int lane) { return lane + static_cast<int>(d) < 32 ? lane + static_cast<int>(d) : lane; });
}
inline unsigned int __ballot_sync(unsigned int, int pred) {
  return emu::lanes_where<int>(pred != 0, [](int, int o) { return o != 0; });
}
inline unsigned int __match_any_sync(unsigned int, unsigned int v) {
  return emu::lanes_where<unsigned int>(v, [](unsigned int a, unsigned int b) { return a == b; });
}

inline int __ffs(unsigned int x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }

// Atomics: fibers switch only at barriers, so a read-modify-write is atomic as it is.
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
  const unsigned int o = *p;
  *p = o + v;
  return o;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long o = *p;
  *p = o + v;
  return o;
}
inline double atomicAdd(double* p, double v) {
  const double o = *p;
  *p = o + v;
  return o;
}
inline unsigned int atomicCAS(unsigned int* p, unsigned int cmp, unsigned int v) {
  const unsigned int o = *p;
  if (o == cmp) *p = v;
  return o;
}
inline unsigned int atomicMax(unsigned int* p, unsigned int v) {
  const unsigned int o = *p;
  if (v > o) *p = v;
  return o;
}
template <typename V>
V __ldcg(const V* p) {
  return *p;
}

inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int x;
  std::memcpy(&x, &f, sizeof x);
  return x;
}
inline float __double2float_rn(double x) { return static_cast<float>(x); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }

// float16 / bfloat16 storage types with round-to-nearest-even conversions.
struct __half {
  _Float16 v;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t x = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};  // NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(x >> 16)};
}

// The runtime calls the launchers make.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, v, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = emu::g_sms;
  return cudaSuccess;
}

// cub's stable radix sort of (key, value) pairs, by the key bits [begin_bit, end_bit).
namespace cub {
struct DeviceRadixSort {
  template <typename K, typename V, typename N>
  static cudaError_t SortPairs(void* temp, size_t& bytes, const K* keys_in, K* keys_out, const V* values_in,
                               V* values_out, N n, int begin_bit = 0, int end_bit = sizeof(K) * 8,
                               cudaStream_t = nullptr) {
    if (temp == nullptr) {
      bytes = 16;
      return cudaSuccess;
    }
    const uint64_t width = static_cast<uint64_t>(end_bit - begin_bit);
    const uint64_t mask = (width >= 64 ? ~0ull : ((1ull << width) - 1)) << begin_bit;
    std::vector<int64_t> perm(static_cast<size_t>(n));
    std::iota(perm.begin(), perm.end(), int64_t(0));
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
      return (static_cast<uint64_t>(keys_in[a]) & mask) < (static_cast<uint64_t>(keys_in[b]) & mask);
    });
    std::vector<K> k(static_cast<size_t>(n));
    std::vector<V> v(static_cast<size_t>(n));
    for (size_t j = 0; j < k.size(); ++j) {
      k[j] = keys_in[perm[j]];
      v[j] = values_in[perm[j]];
    }
    std::copy(k.begin(), k.end(), keys_out);
    std::copy(v.begin(), v.end(), values_out);
    return cudaSuccess;
  }
};
}  // namespace cub
