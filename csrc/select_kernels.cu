// The selection pass on the GPU: the k largest keys in rank order (ReferenceBackend.select:
// +inf > finite > -inf > NaN, -0.0 == +0.0, ties by lower index), the counter-based uniforms
// and the shuffle. CUDA runtime and the toolkit's header-only cub.
//
// select: each key's order-preserving uint32 form u (descending_key: ascending u is rank
// order) is computed on the fly, never stored. The k-th smallest u, T, is found by three
// radix-histogram passes over its 11 + 11 + 10 bits; the last block of each pass (an atomic
// ticket) scans the histogram and picks the bucket, in the same launch:
//   hist0_kernel  keys: histogram of bits 31..21                       -> bucket b0, rank k0 in it
//   hist1_kernel  keys: bits 20..10 of the keys in b0; those keys are
//                 also written to a candidate buffer (u, index)         -> b1, k1
//   hist2_kernel  candidates: bits 9..0 of those in (b0, b1)            -> T, and `take`: how
//                 many keys equal to T win (the first ones in index order, ties to the lower index)
// The winners are then written in index order, with no extra pass over the index:
//   count_kernel  one block per chunk of 4096 keys: its keys below T and equal to T; the last
//                 block scans the chunks' counts: chunk c's first output position is
//                 (keys < T in chunks before c) + min(keys == T in chunks before c, take)
//   write_kernel  the same chunks: inside a chunk the keys are taken in index order, 256 at a
//                 time (ballots, warp counts in shared memory), so a key's position is its
//                 chunk's base + keys < T before it in the chunk + min(keys == T before it, quota)
// and cub's (stable) radix sort of the k winners by u puts them in rank order: equal keys keep
// index order, so ties go to the lower index. 5 launches + a memset + cub's sort of k
// (uint32 key, int64 index) pairs.
//
// shuffle: the uniforms' float bits (positive floats order as their bits) sorted by cub's
// stable radix sort with the entries as values: equal uniforms keep chosen's order, exactly
// torch.sort(u, stable=True) of ReferenceBackend.shuffle.
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>

#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_launch.h"
#include "hash.h"

namespace fastsel {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr uint32_t kFull = 0xffffffffu;
constexpr int kBins0 = 2048, kBins1 = 2048, kBins2 = 1024;  // bits 31..21, 20..10, 9..0
constexpr int kShift0 = 21, kShift1 = 10;
constexpr int kHistItems = 8;                                 // keys per thread per round of hist1_kernel
constexpr int kChunkItems = 16;                               // keys per thread of a chunk
constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kChunkItems;

struct SelCtl {  // zeroed (cudaMemsetAsync) before each selection
  unsigned int hist0[kBins0], hist1[kBins1], hist2[kBins2];
  unsigned int ticket[4];
  unsigned int b0, k0, b1, k1, b2, k2;  // bucket of each pass and the rank still to take inside it
  unsigned int ncand;                   // candidates written by hist1_kernel
};

__device__ __forceinline__ unsigned int threshold(const SelCtl* st) {
  return (st->b0 << kShift0) | (st->b1 << kShift1) | st->b2;
}

// One entry into a shared histogram; the lanes of a warp with the same bin add once (skewed
// keys, e.g. all equal, would otherwise serialise on one counter). `none`: no entry.
__device__ __forceinline__ void add_binned(unsigned int* h, unsigned int bin, unsigned int none) {
  const unsigned int peers = __match_any_sync(kFull, bin);
  if (bin != none && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&h[bin], __popc(peers));
}

// Adds the block's histogram into the global one and takes a ticket: true (in every thread)
// in the block that finishes last, which then sees every block's additions.
template <int NB>
__device__ bool flush_and_ticket(const unsigned int* h, unsigned int* global, unsigned int* ticket, bool* s_last) {
  __syncthreads();
  for (int d = threadIdx.x; d < NB; d += kThreads)
    if (h[d]) atomicAdd(&global[d], h[d]);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *s_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  const bool last = *s_last;
  if (last) __threadfence();
  return last;
}

// The bin of hist[0..NB) holding its krem-th entry (1-based, ascending bins): *bin and the
// rank inside it, written by the one thread that finds it. Block-wide (kThreads threads).
template <int NB>
__device__ void pick_bin(const unsigned int* hist, unsigned int krem, unsigned int* bin, unsigned int* rank,
                         unsigned int* s_scan) {
  constexpr int kPer = NB / kThreads;
  const int first = threadIdx.x * kPer;
  unsigned int h[kPer];
  unsigned int mine = 0;
#pragma unroll
  for (int d = 0; d < kPer; ++d) {
    h[d] = __ldcg(hist + first + d);
    mine += h[d];
  }
  unsigned int total;
  unsigned int cum = block_exclusive_sum(mine, s_scan, &total);
#pragma unroll
  for (int d = 0; d < kPer; ++d) {
    if (cum < krem && krem <= cum + h[d]) {
      *bin = static_cast<unsigned int>(first + d);
      *rank = krem - cum;
    }
    cum += h[d];
  }
}

__global__ void __launch_bounds__(kThreads) hist0_kernel(const float* keys, int64_t n, SelCtl* st, unsigned int k) {
  __shared__ unsigned int h[kBins0];
  __shared__ unsigned int s_scan[32];
  __shared__ bool s_last;
  for (int d = threadIdx.x; d < kBins0; d += kThreads) h[d] = 0;
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads; base < n; base += stride) {  // block-uniform
    const int64_t i = base + threadIdx.x;
    add_binned(h, i < n ? descending_key(keys[i]) >> kShift0 : kBins0, kBins0);
  }
  if (flush_and_ticket<kBins0>(h, st->hist0, &st->ticket[0], &s_last))
    pick_bin<kBins0>(st->hist0, k, &st->b0, &st->k0, s_scan);
}

__global__ void __launch_bounds__(kThreads) hist1_kernel(const float* keys, int64_t n, SelCtl* st,
                                                         unsigned int* cand_u, unsigned int* cand_i) {
  __shared__ unsigned int h[kBins1];
  __shared__ unsigned int s_scan[32];
  __shared__ unsigned int s_base;
  __shared__ bool s_last;
  for (int d = threadIdx.x; d < kBins1; d += kThreads) h[d] = 0;
  __syncthreads();
  const unsigned int b0 = st->b0;
  constexpr int64_t kRound = static_cast<int64_t>(kThreads) * kHistItems;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kRound; base < n;
       base += static_cast<int64_t>(gridDim.x) * kRound) {  // block-uniform
    unsigned int u[kHistItems];
    unsigned int mine = 0;
#pragma unroll
    for (int j = 0; j < kHistItems; ++j) {
      const int64_t i = base + j * kThreads + threadIdx.x;
      u[j] = i < n ? descending_key(keys[i]) : 0xffffffffu;
      const bool in = i < n && (u[j] >> kShift0) == b0;
      add_binned(h, in ? (u[j] >> kShift1) & (kBins1 - 1) : kBins1, kBins1);
      mine |= static_cast<unsigned int>(in) << j;
    }
    // The candidates, in any order (hist2_kernel only counts them): one atomic per round.
    unsigned int total;
    const unsigned int off = block_exclusive_sum(__popc(mine), s_scan, &total);
    if (threadIdx.x == 0) s_base = total ? atomicAdd(&st->ncand, total) : 0u;
    __syncthreads();
    unsigned int pos = s_base + off;  // s_base is rewritten only after the next round's scan (two barriers)
#pragma unroll
    for (int j = 0; j < kHistItems; ++j) {
      if ((mine >> j) & 1u) {
        cand_u[pos] = u[j];
        cand_i[pos] = static_cast<unsigned int>(base + j * kThreads + threadIdx.x);
        ++pos;
      }
    }
  }
  if (flush_and_ticket<kBins1>(h, st->hist1, &st->ticket[1], &s_last))
    pick_bin<kBins1>(st->hist1, st->k0, &st->b1, &st->k1, s_scan);
}

__global__ void __launch_bounds__(kThreads) hist2_kernel(SelCtl* st, const unsigned int* cand_u) {
  __shared__ unsigned int h[kBins2];
  __shared__ unsigned int s_scan[32];
  __shared__ bool s_last;
  for (int d = threadIdx.x; d < kBins2; d += kThreads) h[d] = 0;
  __syncthreads();
  const unsigned int prefix = (st->b0 << (kShift0 - kShift1)) | st->b1;  // u >> 10 of the candidates left
  const int64_t m = st->ncand;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads; base < m;
       base += static_cast<int64_t>(gridDim.x) * kThreads) {  // block-uniform
    const int64_t i = base + threadIdx.x;
    unsigned int bin = kBins2;
    if (i < m) {
      const unsigned int u = cand_u[i];
      if ((u >> kShift1) == prefix) bin = u & (kBins2 - 1);
    }
    add_binned(h, bin, kBins2);
  }
  if (flush_and_ticket<kBins2>(h, st->hist2, &st->ticket[2], &s_last))
    pick_bin<kBins2>(st->hist2, st->k1, &st->b2, &st->k2, s_scan);
}

// Per chunk: keys below T and equal to T; the last block turns the counts into each chunk's
// output base (in chunk_lt) and the keys equal to T before it (in chunk_eq).
__global__ void __launch_bounds__(kThreads) count_kernel(const float* keys, int64_t n, SelCtl* st,
                                                         unsigned int* chunk_lt, unsigned int* chunk_eq,
                                                         int64_t nchunks) {
  __shared__ unsigned int s_a[32], s_b[32];
  __shared__ bool s_last;
  const unsigned int thr = threshold(st), take = st->k2;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kChunk;
  unsigned int lt = 0, eq = 0;
#pragma unroll 4
  for (int j = 0; j < kChunkItems; ++j) {
    const int64_t i = start + j * kThreads + threadIdx.x;
    if (i < n) {
      const unsigned int u = descending_key(keys[i]);
      lt += u < thr;
      eq += u == thr;
    }
  }
  lt = block_sum(lt, s_a);
  eq = block_sum(eq, s_b);
  if (threadIdx.x == 0) {
    chunk_lt[blockIdx.x] = lt;
    chunk_eq[blockIdx.x] = eq;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(&st->ticket[3], 1u) == gridDim.x - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  unsigned int carry_lt = 0, carry_eq = 0;
  for (int64_t s0 = 0; s0 < nchunks; s0 += kThreads) {  // block-uniform
    const int64_t q = s0 + threadIdx.x;
    const unsigned int a = q < nchunks ? __ldcg(chunk_lt + q) : 0u;
    const unsigned int e = q < nchunks ? __ldcg(chunk_eq + q) : 0u;
    unsigned int ta, te;
    const unsigned int xa = block_exclusive_sum(a, s_a, &ta);
    const unsigned int xe = block_exclusive_sum(e, s_b, &te);
    if (q < nchunks) {
      const unsigned int eq_before = carry_eq + xe;
      chunk_eq[q] = eq_before;
      chunk_lt[q] = carry_lt + xa + (eq_before < take ? eq_before : take);
    }
    carry_lt += ta;
    carry_eq += te;
  }
}

// The winners of each chunk at their places, in index order: (u, index) pairs.
__global__ void __launch_bounds__(kThreads) write_kernel(const float* keys, int64_t n, const SelCtl* st,
                                                         const unsigned int* chunk_base,
                                                         const unsigned int* chunk_eq_before,
                                                         unsigned int* win_u, int64_t* win_i) {
  __shared__ unsigned int s_lt[2][kThreads / 32], s_eq[2][kThreads / 32];
  const unsigned int thr = threshold(st), take = st->k2;
  const unsigned int base_out = chunk_base[blockIdx.x], eq_before_chunk = chunk_eq_before[blockIdx.x];
  const unsigned int quota = take > eq_before_chunk ? take - eq_before_chunk : 0u;  // keys == T this chunk takes
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned int below = (1u << lane) - 1u;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kChunk;
  unsigned int run_lt = 0, run_eq = 0;  // in the chunk's earlier rounds
  for (int j = 0; j < kChunkItems; ++j) {
    const int64_t i = start + j * kThreads + threadIdx.x;  // rounds, then threads: index order
    const unsigned int u = i < n ? descending_key(keys[i]) : 0xffffffffu;
    const bool lt = i < n && u < thr, eq = i < n && u == thr;
    const unsigned int bl = __ballot_sync(kFull, lt), be = __ballot_sync(kFull, eq);
    const int buf = j & 1;  // double-buffered: round j + 2 writes after every thread passed round j + 1's barrier
    if (lane == 0) {
      s_lt[buf][warp] = __popc(bl);
      s_eq[buf][warp] = __popc(be);
    }
    __syncthreads();
    unsigned int off_lt = 0, off_eq = 0, tot_lt = 0, tot_eq = 0;
#pragma unroll
    for (int q = 0; q < kThreads / 32; ++q) {
      const unsigned int a = s_lt[buf][q], e = s_eq[buf][q];
      off_lt += q < warp ? a : 0u;
      off_eq += q < warp ? e : 0u;
      tot_lt += a;
      tot_eq += e;
    }
    const unsigned int lt_before = run_lt + off_lt + __popc(bl & below);
    const unsigned int eq_before = run_eq + off_eq + __popc(be & below);
    if (lt || (eq && eq_before < quota)) {
      const unsigned int pos = base_out + lt_before + (eq_before < quota ? eq_before : quota);
      win_u[pos] = u;
      win_i[pos] = i;
    }
    run_lt += tot_lt;
    run_eq += tot_eq;
  }
}

template <typename I>
__global__ void uniform_kernel(const I* idx, int64_t n, uint32_t base, float* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t h = hash_index(static_cast<int64_t>(idx[i]), base);
    out[i] = __fmul_rn(__fadd_rn(static_cast<float>(h >> 8), 0.5f), 1.0f / 16777216.0f);
  }
}

// The STREAM_SHUFFLE uniform of each entry, as its float bits (positive: ordered as the floats).
template <typename I>
__global__ void shuffle_keys_kernel(const I* chosen, int64_t m, uint32_t base, uint32_t* keys) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < m;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t h = hash_index(static_cast<int64_t>(chosen[i]), base);
    keys[i] = __float_as_uint(__fmul_rn(__fadd_rn(static_cast<float>(h >> 8), 0.5f), 1.0f / 16777216.0f));
  }
}

unsigned grid_for(int64_t n) {
  const int64_t want = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(want < 1 ? 1 : (want > 4096 ? 4096 : want));
}

// Blocks of the grid-stride histogram passes: two per SM (each flushes its histogram with
// global atomics, so more blocks would cost more than they save).
unsigned hist_grid(int64_t units) {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      sms <= 0)
    sms = 132;
  const int64_t cap = 2 * static_cast<int64_t>(sms);
  return static_cast<unsigned>(units < 1 ? 1 : (units > cap ? cap : units));
}

// cub's stable radix sort of m (uint32 key, V value) pairs: the temporary storage it needs.
template <typename V>
int64_t sort_pairs_temp(int64_t m) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
                                  static_cast<const V*>(nullptr), static_cast<V*>(nullptr), m, 0, 32);
  return static_cast<int64_t>(bytes);
}

template <typename V>
const char* sort_pairs(void* temp, const uint32_t* keys_in, uint32_t* keys_out, const V* vals_in, V* vals_out,
                       int64_t m, cudaStream_t stream) {
  size_t bytes = static_cast<size_t>(sort_pairs_temp<V>(m));
  const cudaError_t e =
      cub::DeviceRadixSort::SortPairs(temp, bytes, keys_in, keys_out, vals_in, vals_out, m, 0, 32, stream);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// The select workspace, carved in this order.
struct SelectLayout {
  int64_t ctl, cand_u, cand_i, chunk_lt, chunk_eq, win_u, win_i, sorted_u, temp, total;
  SelectLayout(int64_t n, int64_t k) {
    const int64_t nchunks = (n + kChunk - 1) / kChunk;
    int64_t o = 0;
    ctl = o;
    o += align256(static_cast<int64_t>(sizeof(SelCtl)));
    cand_u = o;
    o += align256(4 * n);
    cand_i = o;
    o += align256(4 * n);
    chunk_lt = o;
    o += align256(4 * nchunks);
    chunk_eq = o;
    o += align256(4 * nchunks);
    win_u = o;
    o += align256(4 * k);
    win_i = o;
    o += align256(8 * k);
    sorted_u = o;
    o += align256(4 * k);
    temp = o;
    o += align256(sort_pairs_temp<int64_t>(k));
    total = o;
  }
};

}  // namespace

int64_t select_work_bytes(int64_t n, int64_t k) { return SelectLayout(n > 0 ? n : 1, k > 0 ? k : 1).total; }

const char* launch_select(const float* keys, int64_t n, int64_t k, int64_t* out, void* work, void* stream_ptr) {
  if (k <= 0 || n <= 0) return nullptr;
  if (n >= (int64_t(1) << 32) || k > n) return "fastsel: select needs 0 < k <= n < 2**32";
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const SelectLayout lay(n, k);
  char* w = static_cast<char*>(work);
  SelCtl* st = reinterpret_cast<SelCtl*>(w + lay.ctl);
  unsigned int* cand_u = reinterpret_cast<unsigned int*>(w + lay.cand_u);
  unsigned int* cand_i = reinterpret_cast<unsigned int*>(w + lay.cand_i);
  unsigned int* chunk_lt = reinterpret_cast<unsigned int*>(w + lay.chunk_lt);
  unsigned int* chunk_eq = reinterpret_cast<unsigned int*>(w + lay.chunk_eq);
  uint32_t* win_u = reinterpret_cast<uint32_t*>(w + lay.win_u);
  int64_t* win_i = reinterpret_cast<int64_t*>(w + lay.win_i);
  uint32_t* sorted_u = reinterpret_cast<uint32_t*>(w + lay.sorted_u);
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const unsigned grid = hist_grid((n + kThreads * kHistItems - 1) / (kThreads * kHistItems));
  const cudaError_t zeroed = cudaMemsetAsync(st, 0, sizeof(SelCtl), stream);
  if (zeroed != cudaSuccess) {
    cudaGetLastError();  // clear it: the message is returned here
    return cudaGetErrorString(zeroed);
  }
  hist0_kernel<<<grid, kThreads, 0, stream>>>(keys, n, st, static_cast<unsigned int>(k));
  hist1_kernel<<<grid, kThreads, 0, stream>>>(keys, n, st, cand_u, cand_i);
  hist2_kernel<<<grid, kThreads, 0, stream>>>(st, cand_u);
  count_kernel<<<static_cast<unsigned>(nchunks), kThreads, 0, stream>>>(keys, n, st, chunk_lt, chunk_eq, nchunks);
  write_kernel<<<static_cast<unsigned>(nchunks), kThreads, 0, stream>>>(keys, n, st, chunk_lt, chunk_eq, win_u, win_i);
  if (const char* err = last_error()) return err;
  if (const char* err = sort_pairs<int64_t>(w + lay.temp, win_u, sorted_u, win_i, out, k, stream)) return err;
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

int64_t shuffle_work_bytes(int64_t m, bool chosen64) {
  const int64_t c = m > 0 ? m : 1;
  return 2 * align256(c * 4) + align256(chosen64 ? sort_pairs_temp<int64_t>(c) : sort_pairs_temp<int32_t>(c));
}

const char* launch_shuffle(const void* chosen, bool chosen64, int64_t m, int64_t key, void* out, void* work,
                           void* stream_ptr) {
  if (m <= 0) return nullptr;
  if (m >= (int64_t(1) << 32)) return "fastsel: shuffle needs fewer than 2**32 entries";
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const uint32_t base = stream_base(key, kStreamShuffle);
  uint32_t* keys = static_cast<uint32_t*>(work);
  uint32_t* sorted = reinterpret_cast<uint32_t*>(static_cast<char*>(work) + align256(m * 4));
  void* temp = static_cast<char*>(work) + 2 * align256(m * 4);
  const char* err;
  if (chosen64) {
    const int64_t* c = static_cast<const int64_t*>(chosen);
    shuffle_keys_kernel<int64_t><<<grid_for(m), kThreads, 0, stream>>>(c, m, base, keys);
    err = sort_pairs<int64_t>(temp, keys, sorted, c, static_cast<int64_t*>(out), m, stream);
  } else {
    const int32_t* c = static_cast<const int32_t*>(chosen);
    shuffle_keys_kernel<int32_t><<<grid_for(m), kThreads, 0, stream>>>(c, m, base, keys);
    err = sort_pairs<int32_t>(temp, keys, sorted, c, static_cast<int32_t*>(out), m, stream);
  }
  return err ? err : last_error();
}

}  // namespace cuda
}  // namespace fastsel
