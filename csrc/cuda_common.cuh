// Shared device helpers of the CUDA kernels: error strings, block-wide deterministic
// reductions and scans. CUDA runtime only. (The glue, cuda_glue.cpp, makes the inputs' device current
// before it calls a launcher.)
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastsel {
namespace cuda {

inline const char* last_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

inline int64_t align256(int64_t v) { return (v + 255) / 256 * 256; }

// Sum over the block in a fixed order (so the result is the same on every run).
// Every thread of the block must call it; the result is valid in thread 0.
template <typename V>
__device__ V block_sum(V v, V* shared /* [32] */) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  V t = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < (blockDim.x + 31) / 32; ++w) t += shared[w];
  return t;
}

// Minimum over the block; valid in thread 0.
__device__ inline int64_t block_min(int64_t v, int64_t* shared /* [32] */) {
  for (int o = 16; o > 0; o >>= 1) {
    const int64_t u = __shfl_down_sync(0xffffffffu, v, o);
    v = u < v ? u : v;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  int64_t t = v;
  if (threadIdx.x == 0)
    for (int w = 0; w < (blockDim.x + 31) / 32; ++w) t = shared[w] < t ? shared[w] : t;
  return t;
}

// Exclusive prefix sum over the block in thread order (blockDim.x a multiple of 32, at most
// 1024); *total gets the block's sum. Valid in every thread; every thread must call it.
// It starts with a barrier, so `shared` may be reused by consecutive calls.
__device__ inline uint32_t block_exclusive_sum(uint32_t v, uint32_t* shared /* [32] */, uint32_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  uint32_t inc = v;
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t t = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += t;
  }
  __syncthreads();
  if (lane == 31) shared[warp] = inc;
  __syncthreads();
  uint32_t before = 0, all = 0;
  for (int w = 0; w < warps; ++w) {
    const uint32_t s = shared[w];
    before += w < warp ? s : 0u;
    all += s;
  }
  *total = all;
  return before + inc - v;
}

}  // namespace cuda
}  // namespace fastsel
