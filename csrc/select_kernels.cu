// The selection pass on the GPU: a radix select finds the k-th largest key (four 8-bit
// passes over the keys' order-preserving uint32 form, then, only when the threshold key has
// more ties than places left, four over the sample index to resolve them by lower index);
// the k winners, packed as (key, index) in 64 bits, are compacted and sorted by cub's radix
// sort, so the result is exactly ReferenceBackend.select's. Also the counter-based uniforms
// and the shuffle. CUDA runtime and the toolkit's header-only cub.
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>

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
  uint32_t all_ties;        // every key equal to the threshold wins: no index passes needed
};

unsigned grid_for(int64_t n) {
  const int64_t want = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(want < 1 ? 1 : (want > 4096 ? 4096 : want));
}

__global__ void init_kernel(SelectState* st, uint32_t k, unsigned* hist) {
  if (threadIdx.x == 0) {
    st->prefix = st->mask = st->iprefix = st->imask = 0;
    st->krem = k;
    st->count = st->all_ties = 0;
  }
  for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0;
}

__global__ void desc_keys_kernel(const float* keys, int64_t n, uint32_t* u) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    u[i] = descending_key(keys[i]);
}

// Histogram of one 8-bit digit of the candidates still open. by_index: the candidates are
// the keys equal to the threshold and the digit is taken from their index. Lanes of a warp
// that hit the same bin add once (skewed keys would otherwise serialise on one counter).
__global__ void hist_kernel(const uint32_t* u, int64_t n, const SelectState* st, int shift, bool by_index,
                            unsigned* hist) {
  __shared__ unsigned h[256];
  if (by_index && st->all_ties) return;
  for (int d = threadIdx.x; d < 256; d += blockDim.x) h[d] = 0;
  __syncthreads();
  const uint32_t prefix = st->prefix, mask = st->mask, ip = st->iprefix, im = st->imask;
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // The loop bound is the same for all lanes of a warp (blockDim.x is a multiple of 32).
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31); base < n;
       base += stride) {
    const int64_t i = base + lane;
    uint32_t bin = 256u;  // not a candidate
    if (i < n) {
      const uint32_t v = u[i];
      if (!by_index) {
        if ((v & mask) == prefix) bin = (v >> shift) & 255u;
      } else {
        const uint32_t ix = static_cast<uint32_t>(i);
        if (v == prefix && (ix & im) == ip) bin = (ix >> shift) & 255u;
      }
    }
    const unsigned peers = __match_any_sync(0xffffffffu, bin);
    if (bin < 256u && lane == __ffs(peers) - 1) atomicAdd(&h[bin], static_cast<unsigned>(__popc(peers)));
  }
  __syncthreads();
  for (int d = threadIdx.x; d < 256; d += blockDim.x)
    if (h[d]) atomicAdd(&hist[d], h[d]);
}

// Picks the digit bin holding the krem-th candidate and clears the histogram. After the
// last key digit, the chosen bin counts the keys equal to the threshold: if all of them
// fit, every tie wins and the index passes are skipped.
__global__ void pick_kernel(SelectState* st, int shift, bool by_index, unsigned* hist) {
  if (threadIdx.x == 0 && !(by_index && st->all_ties)) {
    uint32_t cum = 0, d = 0;
    for (; d < 255; ++d) {
      if (cum + hist[d] >= st->krem) break;
      cum += hist[d];
    }
    st->krem -= cum;
    if (!by_index) {
      st->prefix |= d << shift;
      st->mask |= 255u << shift;
      if (shift == 0 && hist[d] == st->krem) {
        st->all_ties = 1;
        st->iprefix = 0xffffffffu;
      }
    } else {
      st->iprefix |= d << shift;
      st->imask |= 255u << shift;
    }
  }
  __syncthreads();
  for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0;
}

// The winners: keys below the threshold, and those equal to it up to the threshold index,
// in any order (they are sorted next). Each block takes kCompactItems keys per thread at a
// time and reserves its slots with one atomic: one counter for all would serialise.
constexpr int kCompactItems = 4;

__global__ void compact_kernel(const uint32_t* u, int64_t n, SelectState* st, uint64_t* out) {
  __shared__ uint32_t warp_offset[kThreads / 32];
  __shared__ uint32_t block_offset;
  const uint32_t thr = st->prefix, ithr = st->iprefix;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tile = static_cast<int64_t>(blockDim.x) * kCompactItems;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * tile; base < n; base += gridDim.x * tile) {
    uint32_t v[kCompactItems];
    uint32_t mine = 0;
#pragma unroll
    for (int j = 0; j < kCompactItems; ++j) {
      const int64_t i = base + j * blockDim.x + threadIdx.x;
      v[j] = i < n ? u[i] : 0xffffffffu;
      const bool win = i < n && (v[j] < thr || (v[j] == thr && static_cast<uint32_t>(i) <= ithr));
      mine |= static_cast<uint32_t>(win) << j;
    }
    uint32_t before = __popc(mine);  // inclusive scan over the warp, then made exclusive
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t t = __shfl_up_sync(0xffffffffu, before, o);
      if (lane >= o) before += t;
    }
    if (lane == 31) warp_offset[warp] = before;
    before -= __popc(mine);
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t total = 0;
      for (int w = 0; w < kThreads / 32; ++w) {
        const uint32_t c = warp_offset[w];
        warp_offset[w] = total;
        total += c;
      }
      block_offset = total ? atomicAdd(&st->count, total) : 0u;
    }
    __syncthreads();
    uint32_t pos = block_offset + warp_offset[warp] + before;
#pragma unroll
    for (int j = 0; j < kCompactItems; ++j)
      if (mine >> j & 1u) {
        const int64_t i = base + j * blockDim.x + threadIdx.x;
        out[pos++] = (static_cast<uint64_t>(v[j]) << 32) | static_cast<uint64_t>(i);
      }
    __syncthreads();  // warp_offset and block_offset are rewritten by the next tile
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

// Temporary storage cub's radix sort of m 64-bit keys needs.
int64_t sort_temp_bytes(int64_t m) {
  size_t bytes = 0;
  cub::DoubleBuffer<uint64_t> none(nullptr, nullptr);
  cub::DeviceRadixSort::SortKeys(nullptr, bytes, none, m, 0, 64);
  return static_cast<int64_t>(bytes);
}

// cub's radix sort of m unique 64-bit keys, ascending, with sort_temp_bytes(m) of `temp`;
// *sorted is the buffer (keys or alt) that holds the result. nullptr on success.
const char* sort_keys(void* temp, uint64_t* keys, uint64_t* alt, int64_t m, cudaStream_t stream,
                      uint64_t** sorted) {
  size_t bytes = static_cast<size_t>(sort_temp_bytes(m));
  cub::DoubleBuffer<uint64_t> buf(keys, alt);
  const cudaError_t e = cub::DeviceRadixSort::SortKeys(temp, bytes, buf, m, 0, 64, stream);
  *sorted = buf.Current();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

int64_t select_work_bytes(int64_t n, int64_t k) {
  const int64_t m = k > 0 ? k : 1;
  return align256(n * 4) + 2 * align256(m * 8) + align256(256 * 4) + align256(sizeof(SelectState)) +
         align256(sort_temp_bytes(m));
}

const char* launch_select(const float* keys, int64_t n, int64_t k, int64_t* out, void* work, void* stream_ptr) {
  if (k <= 0 || n <= 0) return nullptr;
  if (n >= (int64_t(1) << 32) || k > n) return "fastsel: select needs k <= n < 2**32";
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  char* w = static_cast<char*>(work);
  uint32_t* u = reinterpret_cast<uint32_t*>(w);
  w += align256(n * 4);
  uint64_t* packed = reinterpret_cast<uint64_t*>(w);
  w += align256(k * 8);
  uint64_t* alt = reinterpret_cast<uint64_t*>(w);
  w += align256(k * 8);
  unsigned* hist = reinterpret_cast<unsigned*>(w);
  w += align256(256 * 4);
  SelectState* st = reinterpret_cast<SelectState*>(w);
  w += align256(sizeof(SelectState));
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
  compact_kernel<<<grid_for((n + kCompactItems - 1) / kCompactItems), kThreads, 0, stream>>>(u, n, st, packed);
  uint64_t* sorted = packed;
  if (const char* err = sort_keys(w, packed, alt, k, stream, &sorted)) return err;
  low_bits_kernel<<<grid_for(k), kThreads, 0, stream>>>(sorted, k, out);
  return last_error();
}

const char* launch_uniform(const void* idx, bool idx64, int64_t n, int64_t key, int64_t stream_id, float* out,
                           void* stream_ptr) {
  if (n <= 0) return nullptr;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const uint32_t base = stream_base(key, stream_id);
  if (idx64)
    uniform_kernel<int64_t><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const int64_t*>(idx), n, base, out);
  else
    uniform_kernel<int32_t><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const int32_t*>(idx), n, base, out);
  return last_error();
}

int64_t shuffle_work_bytes(int64_t m) {
  const int64_t c = m > 0 ? m : 1;
  return 2 * align256(c * 8) + align256(sort_temp_bytes(c));
}

const char* launch_shuffle(const void* chosen, bool chosen64, int64_t m, int64_t key, void* out, void* work,
                           void* stream_ptr) {
  if (m <= 0) return nullptr;
  if (m >= (int64_t(1) << 32)) return "fastsel: shuffle needs fewer than 2**32 entries";
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const uint32_t base = stream_base(key, kStreamShuffle);
  uint64_t* keys = static_cast<uint64_t*>(work);
  uint64_t* alt = reinterpret_cast<uint64_t*>(static_cast<char*>(work) + align256(m * 8));
  void* temp = static_cast<char*>(work) + 2 * align256(m * 8);
  if (chosen64)
    shuffle_keys_kernel<int64_t><<<grid_for(m), kThreads, 0, stream>>>(static_cast<const int64_t*>(chosen), m, base, keys);
  else
    shuffle_keys_kernel<int32_t><<<grid_for(m), kThreads, 0, stream>>>(static_cast<const int32_t*>(chosen), m, base, keys);
  uint64_t* sorted = keys;
  if (const char* err = sort_keys(temp, keys, alt, m, stream, &sorted)) return err;
  if (chosen64)
    gather_kernel<int64_t><<<grid_for(m), kThreads, 0, stream>>>(static_cast<const int64_t*>(chosen), sorted, m,
                                                                 static_cast<int64_t*>(out));
  else
    gather_kernel<int32_t><<<grid_for(m), kThreads, 0, stream>>>(static_cast<const int32_t*>(chosen), sorted, m,
                                                                 static_cast<int32_t*>(out));
  return last_error();
}

}  // namespace cuda
}  // namespace fastsel
