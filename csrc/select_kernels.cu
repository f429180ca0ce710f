// The selection pass on the GPU: a radix select finds the k-th largest key (four 8-bit
// passes over the keys' order-preserving uint32 form, then four over the sample index to
// resolve ties by lower index); the k winners, packed as (key, index) in 64 bits, are
// compacted and sorted, so the result is exactly ReferenceBackend.select's. Also the
// counter-based uniforms and the shuffle. CUDA runtime only.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "cuda_common.cuh"
#include "cuda_launch.h"
#include "hash.h"

namespace fastsel {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct SelectState {
  uint32_t prefix, mask;    // key bits fixed so far
  uint32_t iprefix, imask;  // index bits fixed so far (among keys equal to the threshold)
  uint32_t krem;            // how many to take among the candidates still open
  uint32_t count;           // compaction cursor
};

unsigned grid_for(int64_t n) {
  const int64_t want = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(want < 1 ? 1 : (want > 4096 ? 4096 : want));
}

__global__ void init_kernel(SelectState* st, uint32_t k, unsigned* hist) {
  if (threadIdx.x == 0) {
    st->prefix = st->mask = st->iprefix = st->imask = 0;
    st->krem = k;
    st->count = 0;
  }
  for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0;
}

__global__ void desc_keys_kernel(const float* keys, int64_t n, uint32_t* u) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    u[i] = descending_key(keys[i]);
}

// Histogram of one 8-bit digit of the candidates still open. by_index: the candidates are
// the keys equal to the threshold and the digit is taken from their index.
__global__ void hist_kernel(const uint32_t* u, int64_t n, const SelectState* st, int shift, bool by_index,
                            unsigned* hist) {
  __shared__ unsigned h[256];
  for (int d = threadIdx.x; d < 256; d += blockDim.x) h[d] = 0;
  __syncthreads();
  const uint32_t prefix = st->prefix, mask = st->mask, ip = st->iprefix, im = st->imask;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t v = u[i];
    if (!by_index) {
      if ((v & mask) == prefix) atomicAdd(&h[(v >> shift) & 255u], 1u);
    } else {
      const uint32_t ix = static_cast<uint32_t>(i);
      if (v == prefix && (ix & im) == ip) atomicAdd(&h[(ix >> shift) & 255u], 1u);
    }
  }
  __syncthreads();
  for (int d = threadIdx.x; d < 256; d += blockDim.x)
    if (h[d]) atomicAdd(&hist[d], h[d]);
}

// Picks the digit bin holding the krem-th candidate and clears the histogram.
__global__ void pick_kernel(SelectState* st, int shift, bool by_index, unsigned* hist) {
  if (threadIdx.x == 0) {
    uint32_t cum = 0, d = 0;
    for (; d < 255; ++d) {
      if (cum + hist[d] >= st->krem) break;
      cum += hist[d];
    }
    st->krem -= cum;
    if (!by_index) {
      st->prefix |= d << shift;
      st->mask |= 255u << shift;
    } else {
      st->iprefix |= d << shift;
      st->imask |= 255u << shift;
    }
  }
  __syncthreads();
  for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0;
}

// The winners: keys below the threshold, and those equal to it up to the threshold index.
__global__ void compact_kernel(const uint32_t* u, int64_t n, SelectState* st, uint64_t* out) {
  const uint32_t thr = st->prefix, ithr = st->iprefix;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t v = u[i];
    if (v < thr || (v == thr && static_cast<uint32_t>(i) <= ithr)) {
      const uint32_t pos = atomicAdd(&st->count, 1u);
      out[pos] = (static_cast<uint64_t>(v) << 32) | static_cast<uint64_t>(i);
    }
  }
}

__global__ void fill_kernel(uint64_t* keys, int64_t from, int64_t to) {
  for (int64_t i = from + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < to;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    keys[i] = ~0ull;
}

__global__ void bitonic_step_kernel(uint64_t* keys, int64_t p, int64_t j, int64_t k) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < p;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = q ^ j;
    if (o > q) {
      const uint64_t a = keys[q], b = keys[o];
      const bool up = (q & k) == 0;
      if ((a > b) == up) {
        keys[q] = b;
        keys[o] = a;
      }
    }
  }
}

__global__ void low_bits_kernel(const uint64_t* keys, int64_t k, int64_t* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<int64_t>(keys[i] & 0xffffffffull);
}

template <typename I>
__global__ void uniform_kernel(const I* idx, int64_t n, uint32_t base, float* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t h = hash_index(static_cast<int64_t>(idx[i]), base);
    out[i] = __fmul_rn(__fadd_rn(static_cast<float>(h >> 8), 0.5f), 1.0f / 16777216.0f);
  }
}

template <typename I>
__global__ void shuffle_keys_kernel(const I* chosen, int64_t m, uint32_t base, uint64_t* keys) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < m;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t h = hash_index(static_cast<int64_t>(chosen[i]), base);
    const float u = __fmul_rn(__fadd_rn(static_cast<float>(h >> 8), 0.5f), 1.0f / 16777216.0f);
    keys[i] = (static_cast<uint64_t>(__float_as_uint(u)) << 32) | static_cast<uint64_t>(i);
  }
}

template <typename I>
__global__ void gather_kernel(const I* chosen, const uint64_t* keys, int64_t m, I* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < m;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = chosen[keys[i] & 0xffffffffull];
}

}  // namespace

void bitonic_sort(uint64_t* keys, int64_t p, cudaStream_t stream) {
  const unsigned grid = grid_for(p / 2 > 0 ? p / 2 : 1);
  for (int64_t k = 2; k <= p; k <<= 1)
    for (int64_t j = k >> 1; j > 0; j >>= 1) bitonic_step_kernel<<<grid, kThreads, 0, stream>>>(keys, p, j, k);
}

int64_t select_work_bytes(int64_t n, int64_t k) {
  return align256(n * 4) + align256(next_pow2(k > 0 ? k : 1) * 8) + align256(256 * 4) +
         align256(sizeof(SelectState));
}

const char* launch_select(const float* keys, int64_t n, int64_t k, int64_t* out, void* work, int device,
                          void* stream_ptr) {
  if (k <= 0 || n <= 0) return nullptr;
  if (n >= (int64_t(1) << 32) || k > n) return "fastsel: select needs k <= n < 2**32";
  DeviceGuard guard(device);
  if (!guard.ok) return "fastsel: cannot make the keys' CUDA device current";
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  char* w = static_cast<char*>(work);
  uint32_t* u = reinterpret_cast<uint32_t*>(w);
  w += align256(n * 4);
  const int64_t p = next_pow2(k);
  uint64_t* packed = reinterpret_cast<uint64_t*>(w);
  w += align256(p * 8);
  unsigned* hist = reinterpret_cast<unsigned*>(w);
  w += align256(256 * 4);
  SelectState* st = reinterpret_cast<SelectState*>(w);
  const unsigned grid = grid_for(n);
  init_kernel<<<1, 256, 0, stream>>>(st, static_cast<uint32_t>(k), hist);
  desc_keys_kernel<<<grid, kThreads, 0, stream>>>(keys, n, u);
  for (int shift = 24; shift >= 0; shift -= 8) {  // the k-th smallest key, 8 bits at a time
    hist_kernel<<<grid, kThreads, 0, stream>>>(u, n, st, shift, false, hist);
    pick_kernel<<<1, 256, 0, stream>>>(st, shift, false, hist);
  }
  for (int shift = 24; shift >= 0; shift -= 8) {  // among its ties, the krem-th lowest index
    hist_kernel<<<grid, kThreads, 0, stream>>>(u, n, st, shift, true, hist);
    pick_kernel<<<1, 256, 0, stream>>>(st, shift, true, hist);
  }
  compact_kernel<<<grid, kThreads, 0, stream>>>(u, n, st, packed);
  if (p > k) fill_kernel<<<grid_for(p - k), kThreads, 0, stream>>>(packed, k, p);
  bitonic_sort(packed, p, stream);
  low_bits_kernel<<<grid_for(k), kThreads, 0, stream>>>(packed, k, out);
  return last_error();
}

const char* launch_uniform(const void* idx, bool idx64, int64_t n, int64_t key, int64_t stream_id, float* out,
                           int device, void* stream_ptr) {
  if (n <= 0) return nullptr;
  DeviceGuard guard(device);
  if (!guard.ok) return "fastsel: cannot make the indices' CUDA device current";
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const uint32_t base = stream_base(key, stream_id);
  if (idx64)
    uniform_kernel<int64_t><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const int64_t*>(idx), n, base, out);
  else
    uniform_kernel<int32_t><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const int32_t*>(idx), n, base, out);
  return last_error();
}

int64_t shuffle_work_bytes(int64_t m) { return align256(next_pow2(m > 0 ? m : 1) * 8); }

const char* launch_shuffle(const void* chosen, bool chosen64, int64_t m, int64_t key, void* out, void* work,
                           int device, void* stream_ptr) {
  if (m <= 0) return nullptr;
  if (m >= (int64_t(1) << 32)) return "fastsel: shuffle needs fewer than 2**32 entries";
  DeviceGuard guard(device);
  if (!guard.ok) return "fastsel: cannot make the indices' CUDA device current";
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const uint32_t base = stream_base(key, kStreamShuffle);
  const int64_t p = next_pow2(m);
  uint64_t* keys = static_cast<uint64_t*>(work);
  if (chosen64)
    shuffle_keys_kernel<int64_t><<<grid_for(m), kThreads, 0, stream>>>(static_cast<const int64_t*>(chosen), m, base, keys);
  else
    shuffle_keys_kernel<int32_t><<<grid_for(m), kThreads, 0, stream>>>(static_cast<const int32_t*>(chosen), m, base, keys);
  if (p > m) fill_kernel<<<grid_for(p - m), kThreads, 0, stream>>>(keys, m, p);
  bitonic_sort(keys, p, stream);
  if (chosen64)
    gather_kernel<int64_t><<<grid_for(m), kThreads, 0, stream>>>(static_cast<const int64_t*>(chosen), keys, m,
                                                                 static_cast<int64_t*>(out));
  else
    gather_kernel<int32_t><<<grid_for(m), kThreads, 0, stream>>>(static_cast<const int32_t*>(chosen), keys, m,
                                                                 static_cast<int32_t*>(out));
  return last_error();
}

}  // namespace cuda
}  // namespace fastsel
