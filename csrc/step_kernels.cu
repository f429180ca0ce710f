// The fused step on the GPU in two launches (one with update=false), with no single-block
// stage and no sort:
//
// 1. rows_kernel: each row of logits is read once (kept in registers up to C = 1024; wider
//    rows are streamed) by a group of TPR lanes (TPR = 4..32 by C): cross-entropy, p_true,
//    the gradient w.r.t. the logits (unscaled: "mean" divides by grad_scale = 1 / divisor,
//    which backward applies), per-block partial sums of the loss and the divisor, range-error
//    counters (integer atomics). With update and the epoch's rows given (member, row_counts),
//    the room and membership checks of fastsel/ops.py ("Which rows count") are made here too:
//    every thread reads row_counts[ROW_TRAINED] / [ROW_SHARD] (the same values in every block:
//    only launch 2 writes them), a call without room leaves all its rows out (and its range
//    errors unrecorded), a row whose in-range sample has member[index] == 0 is stray and left
//    out (counted, the first one by atomicMax(~row): the lowest row); a row left out adds
//    nothing to the loss, the divisor, the gradient or the state ("mean" with no row active:
//    grad_scale 0, a zero gradient). With update, each observed row (active, finite loss and
//    p_true) claims its sample with one atomicCAS on a per-sample int32 `slot` (0 = free):
//    the first row to arrive owns the sample; every other row of that sample adds its loss,
//    p_true and 1 into its owner's `group` entry (float64 and integer atomics). Rows of one
//    sample inside one warp are combined first (in row order), so a batch whose rows all
//    carry one index costs one atomic per warp, not per row. The last block (an atomic
//    ticket) sums the per-block partials in block order and writes the output, grad_scale,
//    the error counters or strict mode's figures (StrictSlot), and resets its counters (those
//    launch 2 still needs, the room and stray results, it leaves to launch 2).
// 2. merge_kernel (update only): one thread per row; each owner folds its sample's one
//    observation (the float64 sum of its rows over their count: own value + group sums) into
//    the state (last_epoch = *epoch, read from device memory), and clears its slot and group
//    entry; the last block adds the epoch sums and writes the row counters (ROW_*: a refused
//    call's, or the stray rows and an admitted call's B and 1). Strict mode with a bad row, a
//    stray row or no room (found by launch 1): the owners only clear, nothing is written.
//
// Work is O(B * C) in launch 1 and O(B) in launch 2 whatever the duplicates. Every partial
// sum has a fixed order; a sample's rows are summed by float64 atomics, which is exact (and
// so order-free) for a few float32 values, as the reference's index_add_ (for 2 rows it is
// bit-identical to any order). The state fold is the reference's float64 arithmetic (no
// fused multiply-add), each result stored saturated (fastsel/state.py, finite in, finite state).
//
// Backward: scale_grad_kernel, one launch (autograd.cpp through cuda_glue.cpp), at the end.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_launch.h"
#include "layout.h"

namespace fastsel {
namespace cuda {
namespace {

using namespace fastsel::layout;
constexpr int kThreads = 256;      // threads per block of both launches
#ifndef FASTSEL_STEP_MAX_BLOCKS    // (tests/test_gpu_fastpath.py's CPU emulation sets 3, to run the grid-stride loops)
#define FASTSEL_STEP_MAX_BLOCKS 2048
#endif
constexpr int kMaxBlocks = FASTSEL_STEP_MAX_BLOCKS;  // grid cap of both launches (grid-stride beyond): bounds the partials
constexpr uint32_t kFull = 0xffffffffu;
constexpr uint32_t kNone = 0xffffffffu;  // no sample (indices are < n <= 2**32 - 1, so never this)
constexpr uint32_t I_BAD_INDEX = 1, I_BAD_LABEL = 2, I_NONFINITE = 4, I_STRAY = 8, I_ACTIVE = 16;
static_assert(ERR_SIZE == S_OVER, "strict_errors: the ERR_* slots come first (cuda_launch.h)");

// What launch 2 needs of a row: its observation and, for an owner, its sample.
struct RowInfo {
  float loss;
  float p;
  uint32_t sample;  // the sample this row owns, or kNone
  uint32_t unused;
};

// Per owner row: the sums of the other rows of its sample (zero between steps).
struct Group {
  double sl;
  double sp;
  unsigned int cnt;
  unsigned int unused;
};

// Counters (zero between steps) and per-block partials (written before they are read).
// Launch 1's last block resets its own counters; refuse, over, first_stray and n_stray carry
// launch 1's results to launch 2 (update only), whose last block resets them.
struct Ctl {
  unsigned int ticket_rows, ticket_merge;
  unsigned int refuse;                            // strict mode refused the batch: launch 2 only clears
  unsigned int first_bad_index, first_bad_label;  // 0, or ~row of the first bad row (atomicMax)
  unsigned int first_stray;                       // 0, or ~row of the first stray row
  unsigned int over;                              // 1: the call had no room (all rows left out)
  unsigned int unused;
  unsigned long long n_bad_index, n_bad_label, n_nonfinite, n_stray, n_active;
  double part_out[kMaxBlocks];
  double part_den[kMaxBlocks];
  double part_loss[kMaxBlocks];
  unsigned long long part_count[kMaxBlocks];
};

__device__ __forceinline__ float ld(const float* p, int64_t j) { return p[j]; }
__device__ __forceinline__ float ld(const __half* p, int64_t j) { return __half2float(p[j]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t j) { return __bfloat162float(p[j]); }
__device__ __forceinline__ void st(float* p, int64_t j, float v) { p[j] = v; }
__device__ __forceinline__ void st(__half* p, int64_t j, float v) { p[j] = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t j, float v) { p[j] = __float2bfloat16_rn(v); }

// Reductions over the W lanes of one row (W divides 32; xor partners stay inside the aligned
// group of W lanes). Every lane of the warp must call them; every lane of a group gets the
// same bits (each step adds the same two values, a + b == b + a).
template <int W>
__device__ __forceinline__ float seg_max(float v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
template <int W>
__device__ __forceinline__ float seg_sum(float v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
template <int W>
__device__ __forceinline__ int seg_or(int v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v |= __shfl_xor_sync(kFull, v, o);
  return v;
}

// x as float, a finite value beyond float's range clamped to +-FLT_MAX (fastsel.layout.STATE_MAX)
// instead of rounding to inf; NaN and +-inf stay as they are (fastsel/state.py).
__device__ __forceinline__ float saturate(double x) {
  const double big = FLT_MAX;
  return __double2float_rn(isfinite(x) ? fmin(fmax(x, -big), big) : x);
}

__device__ __forceinline__ int64_t load_int(const void* p, bool is64, int64_t r) {
  return is64 ? static_cast<const int64_t*>(p)[r] : static_cast<int64_t>(static_cast<const int32_t*>(p)[r]);
}

// The room check (fastsel/ops.py, "Which rows count" 1): counted only with update and the
// epoch's rows given; over: no epoch in progress (shard < 0) or no room for the call's b rows.
// Every block reads the same values: only launch 2's last block writes row_counts.
struct Room {
  bool counted, over;
  int64_t trained, shard;
};
__device__ __forceinline__ Room read_room(const StepArgs& a) {
  Room r{a.update && a.row_counts != nullptr, false, 0, 0};
  if (r.counted) {
    r.trained = a.row_counts[ROW_TRAINED];
    r.shard = a.row_counts[ROW_SHARD];
    r.over = r.shard < 0 || r.trained + a.b > r.shard;
  }
  return r;
}

// Launch 1's last block: the totals, in block order, and the counters (then reset).
__device__ void finish_rows(const StepArgs& a, Ctl* ctl, double* s_red) {
  const int tid = threadIdx.x;
  double tot = 0.0, den = 0.0;
  for (int q = tid; q < static_cast<int>(gridDim.x); q += blockDim.x) {
    tot += __ldcg(&ctl->part_out[q]);
    den += __ldcg(&ctl->part_den[q]);
  }
  tot = block_sum(tot, s_red);
  den = block_sum(den, s_red);
  if (tid != 0) return;
  const unsigned long long nbi = __ldcg(&ctl->n_bad_index), nbl = __ldcg(&ctl->n_bad_label);
  const unsigned long long nnf = __ldcg(&ctl->n_nonfinite), nst = __ldcg(&ctl->n_stray);
  const unsigned long long nact = __ldcg(&ctl->n_active);
  const unsigned int fbi = __ldcg(&ctl->first_bad_index), fbl = __ldcg(&ctl->first_bad_label);
  const int64_t vi = nbi ? load_int(a.indices, a.indices64, static_cast<int64_t>(~fbi)) : 0;
  const int64_t vl = nbl ? load_int(a.labels, a.labels64, static_cast<int64_t>(~fbl)) : 0;
  const Room room = read_room(a);
  const bool refuse = a.strict && (room.over || nst > 0 || (nbi + nbl) > 0);
  if (a.strict_errors != nullptr) {
    const bool s = a.strict;
    int64_t* se = a.strict_errors;
    se[ERR_INDEX_COUNT] = s ? static_cast<int64_t>(nbi) : 0;
    se[ERR_INDEX_VALUE] = s ? vi : 0;
    se[ERR_LABEL_COUNT] = s ? static_cast<int64_t>(nbl) : 0;
    se[ERR_LABEL_VALUE] = s ? vl : 0;
    se[S_OVER] = (s && room.over) ? 1 : 0;
    se[S_TRAINED] = s ? room.trained : 0;
    se[S_SHARD] = s ? room.shard : 0;
    se[S_STRAY_COUNT] = s ? static_cast<int64_t>(nst) : 0;
    const unsigned int fst = __ldcg(&ctl->first_stray);
    se[S_STRAY_FIRST] = (s && nst) ? load_int(a.indices, a.indices64, static_cast<int64_t>(~fst)) : 0;
    se[S_EPOCH] = s ? *a.epoch : 0;
  }
  if (!a.strict) {
    if (a.errors[ERR_INDEX_COUNT] == 0 && nbi > 0) a.errors[ERR_INDEX_VALUE] = vi;
    a.errors[ERR_INDEX_COUNT] += static_cast<int64_t>(nbi);
    if (a.errors[ERR_LABEL_COUNT] == 0 && nbl > 0) a.errors[ERR_LABEL_VALUE] = vl;
    a.errors[ERR_LABEL_COUNT] += static_cast<int64_t>(nbl);
  }
  const float df = static_cast<float>(den), tf = static_cast<float>(tot);
  const bool mean = a.reduction == REDUCTION_MEAN;
  if (a.out != nullptr) a.out[0] = mean ? tf / df : tf;
  // No active row: backward's factor is 0, not 1 / 0 (the reference's all-masked mean has a
  // zero gradient; with rows active and a zero divisor, inf, as the reference's).
  a.grad_scale[0] = mean ? (nact ? 1.0f / df : 0.0f) : 1.0f;
  if (!refuse && a.update) a.stats[STAT_NONFINITE] += static_cast<double>(nnf);
  ctl->refuse = (refuse && a.update) ? 1u : 0u;
  ctl->over = (room.over && a.update) ? 1u : 0u;
  ctl->n_bad_index = 0;
  ctl->n_bad_label = 0;
  ctl->n_nonfinite = 0;
  ctl->n_active = 0;
  ctl->first_bad_index = 0;
  ctl->first_bad_label = 0;
  if (!a.update) {  // no launch 2 (nothing is counted without update: these are 0 already)
    ctl->n_stray = 0;
    ctl->first_stray = 0;
  }
  ctl->ticket_rows = 0;
}

// Launch 1. TPR lanes per row, R = kThreads / TPR rows per tile; NV > 0: each lane keeps its
// NV logits (columns l, l + TPR, ...) in registers (C <= NV * TPR); NV == 0: the row is
// streamed three times (C > 1024).
template <typename T, int TPR, int NV>
__global__ void __launch_bounds__(kThreads, NV >= 32 ? 1 : 2) rows_kernel(StepArgs a, StepWork w) {
  constexpr int R = kThreads / TPR;
  constexpr int kElect = (R + 31) / 32 * 32;  // whole warps covering one thread per row of the tile
  __shared__ float s_loss[R], s_p[R], s_out[R], s_den[R];
  __shared__ uint32_t s_key[R], s_info[R];
  __shared__ double s_red[32];
  __shared__ float s_wsum;
  __shared__ bool s_last;
  Ctl* ctl = static_cast<Ctl*>(w.ctl);
  const int tid = threadIdx.x, g = tid / TPR, l = tid % TPR;
  const int64_t b = a.b, c = a.c, n = a.n;
  const float* cw = a.class_weight;
  const bool smooth = a.eps != 0.0f;
  const float nan_f = __int_as_float(0x7fc00000);
  const int ci = NV > 0 ? static_cast<int>(c) : 0;  // with NV > 0, c <= NV * TPR <= 1024
  const Room room = read_room(a);                   // the same in every thread of the grid

  // The class weights' sum (the same bits in every block: the same fixed-order reduction).
  float wsum = 0.0f;
  if (cw != nullptr) {
    double t = 0.0;
    for (int64_t j = tid; j < c; j += kThreads) t += static_cast<double>(cw[j]);
    t = block_sum(t, s_red);
    if (tid == 0) s_wsum = static_cast<float>(t);
    __syncthreads();
    wsum = s_wsum;
  }

  double part_out = 0.0, part_den = 0.0;  // thread 0: this block's rows, in order
  unsigned long long nbi = 0, nbl = 0, nnf = 0, nst = 0, nact = 0;
  int64_t fbi = -1, fbl = -1, fst = -1;
  const int64_t tiles = (b + R - 1) / R;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // the same trip count for the whole block
    const int64_t r = tile * R + g;
    const bool in = r < b;
    int64_t y = 0, i = 0;
    if (in) {
      y = load_int(a.labels, a.labels64, r);
      i = load_int(a.indices, a.indices64, r);
    }
    // Left out: every row of a call without room (its range errors unrecorded), and a stray
    // row (in range, not in the epoch's selection; its label is still checked).
    const bool in_range = in && i >= 0 && i < n;
    const bool stray = room.counted && !room.over && in_range && a.member[i] == 0;
    const bool bad_index = in && !in_range && !room.over;
    const bool not_ignored = in && y != a.ignore_index;
    const bool label_out = not_ignored && (y < 0 || y >= c);
    const bool bad_label = label_out && !room.over;
    const bool active = not_ignored && !label_out && in_range && !room.over && !stray;
    const int64_t ys = active ? y : 0, is = active ? i : n;
    const T* x = static_cast<const T*>(a.logits) + (in ? r : 0) * c;

    // The row's max (NaN tracked apart: fmaxf skips it).
    float v[NV > 0 ? NV : 1];
    float m = -INFINITY;
    int has_nan = 0;
    if constexpr (NV > 0) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int j = l + k * TPR;
        v[k] = (in && j < ci) ? ld(x, j) : -INFINITY;
        has_nan |= v[k] != v[k];
        m = fmaxf(m, v[k]);
      }
    } else {
      if (in) {
        for (int64_t j = l; j < c; j += TPR) {
          const float xv = ld(x, j);
          has_nan |= xv != xv;
          m = fmaxf(m, xv);
        }
      }
    }
    m = seg_max<TPR>(m);
    has_nan = seg_or<TPR>(has_nan);
    const bool bad_row = has_nan != 0 || !isfinite(m);  // a NaN or +inf, or only -inf (and rows past b)

    // Sums relative to the row's max (log_softmax's x - m - log(s): large logits lose no
    // precision); NV > 0 keeps e = exp(x - m) in place of the logit.
    float s = 0.0f, sx = 0.0f, swx = 0.0f;
    if (!bad_row) {
      if constexpr (NV > 0) {
#pragma unroll
        for (int k = 0; k < NV; ++k) {
          const int j = l + k * TPR;
          if (j < ci) {
            const float xm = v[k] - m;
            if (smooth) {
              sx += xm;
              if (cw != nullptr) swx += cw[j] * xm;
            }
            const float e = expf(xm);
            s += e;
            v[k] = e;
          }
        }
      } else {
        for (int64_t j = l; j < c; j += TPR) {
          const float xm = ld(x, j) - m;
          if (smooth) {
            sx += xm;
            if (cw != nullptr) swx += cw[j] * xm;
          }
          s += expf(xm);
        }
      }
    }
    s = seg_sum<TPR>(s);
    if (smooth) {
      sx = seg_sum<TPR>(sx);
      swx = seg_sum<TPR>(swx);
    }

    const float pw = in ? a.weight[is] : 0.0f;  // the policy weight (the scratch slot's for an inactive row)
    const float w_y = cw != nullptr ? cw[ys] : 1.0f;
    float loss = nan_f, weighted = nan_f, p_true = nan_f;
    if (!bad_row) {
      const float logs = logf(s);
      const float nll = logs - (ld(x, ys) - m);
      loss = nll;
      weighted = cw != nullptr ? w_y * nll : nll;
      if (smooth) {
        loss = a.one_minus_eps * nll - a.eps * (sx / static_cast<float>(c) - logs);
        weighted = cw != nullptr ? a.one_minus_eps * weighted - a.eps * (swx - logs * wsum) / static_cast<float>(c)
                                 : loss;
      }
      p_true = expf(-nll);
    }
    // d(pw * weighted)/dx_j = A e_j + b0 + cwf w_j, and - sc (1 - eps) w_y at the label
    // (K = sum_j w_j t'_j, t' = (1 - eps) onehot(y) + eps / C): the CPU kernel's formula.
    if (a.grad != nullptr && in) {
      T* gp = static_cast<T*>(a.grad) + r * c;
      const float sc = active ? pw : 0.0f;
      const float eps_c = a.eps / static_cast<float>(c);
      const float kk = cw != nullptr ? a.one_minus_eps * w_y + eps_c * wsum : 1.0f;
      const float A = bad_row ? nan_f : sc * kk / s;
      const float b0 = cw != nullptr ? 0.0f : -sc * eps_c;
      const float cwf = cw != nullptr ? -sc * eps_c : 0.0f;
      const float fix = -sc * a.one_minus_eps * w_y;
      if constexpr (NV > 0) {
#pragma unroll
        for (int k = 0; k < NV; ++k) {
          const int j = l + k * TPR;
          if (j < ci) {
            float gv = nan_f;
            if (!bad_row) {
              gv = A * v[k] + b0 + (cw != nullptr ? cwf * cw[j] : 0.0f);
              if (j == ys) gv += fix;
            }
            st(gp, j, gv);
          }
        }
      } else {
        for (int64_t j = l; j < c; j += TPR) {
          float gv = nan_f;
          if (!bad_row) {
            gv = A * expf(ld(x, j) - m) + b0 + (cw != nullptr ? cwf * cw[j] : 0.0f);
            if (j == ys) gv += fix;
          }
          st(gp, j, gv);
        }
      }
    }
    if (l == 0) {
      const bool finite = isfinite(loss) && isfinite(p_true);
      s_loss[g] = loss;
      s_p[g] = p_true;
      s_out[g] = active ? pw * weighted : 0.0f;
      s_den[g] = active ? w_y : 0.0f;
      s_key[g] = (active && finite) ? static_cast<uint32_t>(i) : kNone;
      s_info[g] = (bad_index ? I_BAD_INDEX : 0u) | (bad_label ? I_BAD_LABEL : 0u) |
                  ((active && !finite) ? I_NONFINITE : 0u) | (stray ? I_STRAY : 0u) | (active ? I_ACTIVE : 0u);
    }
    __syncthreads();

    // One thread per row of the tile: the "none" output and, with update, the sample's owner.
    if (tid < kElect) {
      const int q = tid;
      const bool qv = q < R;
      const int64_t rq = tile * R + q;
      const bool inq = qv && rq < b;
      if (inq && a.per_row != nullptr) a.per_row[rq] = s_out[q];
      if (a.update) {
        const uint32_t key = qv ? s_key[q] : kNone;
        const unsigned int peers = __match_any_sync(kFull, key);  // the rows of this warp with the same sample
        uint32_t owned = kNone;
        if (key != kNone && (tid & 31) == __ffs(peers) - 1) {
          // The first of them claims the sample; if another row already did, all of them
          // are that row's duplicates. Their sums, in row order, go to the owner in one go.
          const uint32_t prev = atomicCAS(&w.slot[key], 0u, static_cast<uint32_t>(rq) + 1u);
          const bool owner = prev == 0u;
          const uint32_t owner_row = owner ? static_cast<uint32_t>(rq) : prev - 1u;
          double sl = 0.0, sp = 0.0;
          unsigned int cnt = 0;
          for (unsigned int rest = owner ? (peers & (peers - 1u)) : peers; rest != 0u; rest &= rest - 1u) {
            const int qq = (tid & ~31) + (__ffs(rest) - 1);
            sl += static_cast<double>(s_loss[qq]);
            sp += static_cast<double>(s_p[qq]);
            ++cnt;
          }
          if (cnt != 0u) {
            Group* gr = static_cast<Group*>(w.group) + owner_row;
            atomicAdd(&gr->cnt, cnt);
            atomicAdd(&gr->sl, sl);
            atomicAdd(&gr->sp, sp);
          }
          if (owner) owned = key;
        }
        if (inq) static_cast<RowInfo*>(w.rows)[rq] = RowInfo{s_loss[q], s_p[q], owned, 0u};
      }
    }
    if (tid == 0) {
      for (int q = 0; q < R; ++q) {
        part_out += static_cast<double>(s_out[q]);
        part_den += static_cast<double>(s_den[q]);
        const uint32_t f = s_info[q];
        if (f & I_BAD_INDEX) {
          ++nbi;
          if (fbi < 0) fbi = tile * R + q;
        }
        if (f & I_BAD_LABEL) {
          ++nbl;
          if (fbl < 0) fbl = tile * R + q;
        }
        if (f & I_NONFINITE) ++nnf;
        if (f & I_STRAY) {
          ++nst;
          if (fst < 0) fst = tile * R + q;
        }
        if (f & I_ACTIVE) ++nact;
      }
    }
    __syncthreads();  // the tile's shared arrays are rewritten by the next tile
  }

  if (tid == 0) {
    ctl->part_out[blockIdx.x] = part_out;
    ctl->part_den[blockIdx.x] = part_den;
    if (nbi) {
      atomicAdd(&ctl->n_bad_index, nbi);
      atomicMax(&ctl->first_bad_index, ~static_cast<unsigned int>(fbi));
    }
    if (nbl) {
      atomicAdd(&ctl->n_bad_label, nbl);
      atomicMax(&ctl->first_bad_label, ~static_cast<unsigned int>(fbl));
    }
    if (nnf) atomicAdd(&ctl->n_nonfinite, nnf);
    if (nst) {
      atomicAdd(&ctl->n_stray, nst);
      atomicMax(&ctl->first_stray, ~static_cast<unsigned int>(fst));
    }
    if (nact) atomicAdd(&ctl->n_active, nact);
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(&ctl->ticket_rows, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  finish_rows(a, ctl, s_red);
}

// Launch 2's last block, an update call with the epoch's rows given and not refused: the row
// counters (fastsel/ops.py, "Which rows count"; reference.commit_rows).
__device__ void count_rows(const StepArgs& a, const Ctl* ctl) {
  int64_t* rc = a.row_counts;
  const int64_t b = a.b;
  if (ctl->over != 0u) {  // a call without room: recorded, nothing else counts
    if (rc[ROW_OVER_COUNT] == 0 && b > 0) {
      rc[ROW_OVER_VALUE] = rc[ROW_SHARD] < 0 ? -1 : rc[ROW_TRAINED] + b;
      rc[ROW_OVER_EPOCH] = *a.epoch;
    }
    rc[ROW_OVER_COUNT] += b;
    return;
  }
  const unsigned long long nst = ctl->n_stray;
  if (nst != 0) {
    if (rc[ROW_STRAY_COUNT] == 0)
      rc[ROW_STRAY_VALUE] = load_int(a.indices, a.indices64, static_cast<int64_t>(~ctl->first_stray));
    rc[ROW_STRAY_COUNT] += static_cast<int64_t>(nst);
  }
  rc[ROW_TRAINED] += b;
  rc[ROW_CALLS] += 1;
}

// Launch 2 (update only): each owner folds its sample's observation into the state.
__global__ void __launch_bounds__(kThreads) merge_kernel(StepArgs a, StepWork w) {
  __shared__ double s_red[32];
  __shared__ unsigned long long s_redi[32];
  __shared__ bool s_last;
  Ctl* ctl = static_cast<Ctl*>(w.ctl);
  const RowInfo* rows = static_cast<const RowInfo*>(w.rows);
  Group* groups = static_cast<Group*>(w.group);
  const int tid = threadIdx.x;
  const bool refuse = ctl->refuse != 0u;
  const double ema = a.ema, om = a.one_minus_ema;
  const int32_t epoch = static_cast<int32_t>(*a.epoch);  // last_epoch's type (as the reference's cast)
  double ep_loss = 0.0;
  unsigned long long ep_count = 0;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + tid; r < a.b;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    const RowInfo ri = rows[r];
    if (ri.sample == kNone) continue;
    const int64_t t = ri.sample;
    Group* gr = groups + r;
    const unsigned int extra = gr->cnt;
    double sl = static_cast<double>(ri.loss), sp = static_cast<double>(ri.p);
    if (extra != 0u) {
      sl += gr->sl;
      sp += gr->sp;
      gr->sl = 0.0;
      gr->sp = 0.0;
      gr->cnt = 0u;
    }
    w.slot[t] = 0u;
    if (refuse) continue;
    // The observation (mean loss and p_true) in float32, then the fold in float64 (no fused
    // multiply-add: the reference's roundings), each result stored saturated.
    const int64_t cnt = 1 + static_cast<int64_t>(extra);
    const float obs_l = static_cast<float>(sl / static_cast<double>(cnt));
    const float obs_p = static_cast<float>(sp / static_cast<double>(cnt));
    const double m_old = a.loss[t], v_old = a.loss_var[t], p_old = a.p_true[t];
    const int32_t s_old = a.seen[t];
    if (s_old == 0) {
      a.loss[t] = obs_l;
      a.loss_var[t] = 0.0f;
    } else {
      const double delta = __dsub_rn(static_cast<double>(obs_l), m_old);
      const double ad = __dmul_rn(ema, delta);
      a.loss[t] = saturate(__dadd_rn(m_old, ad));
      a.loss_var[t] = saturate(__dmul_rn(om, __dadd_rn(v_old, __dmul_rn(ad, delta))));
    }
    const int32_t s_new = s_old + static_cast<int32_t>(cnt);
    const double sd_new = static_cast<double>(s_new);
    const double frac = __ddiv_rn(static_cast<double>(cnt), sd_new > 1.0 ? sd_new : 1.0);
    a.p_true[t] = saturate(__dadd_rn(p_old, __dmul_rn(__dsub_rn(static_cast<double>(obs_p), p_old), frac)));
    a.seen[t] = s_new;
    a.last_epoch[t] = epoch;
    ep_loss += sl;
    ep_count += static_cast<unsigned long long>(cnt);
  }
  ep_loss = block_sum(ep_loss, s_red);
  ep_count = block_sum(ep_count, s_redi);
  if (tid == 0) {
    ctl->part_loss[blockIdx.x] = ep_loss;
    ctl->part_count[blockIdx.x] = ep_count;
    __threadfence();
    s_last = atomicAdd(&ctl->ticket_merge, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  double tl = 0.0;
  unsigned long long tc = 0;
  for (int q = tid; q < static_cast<int>(gridDim.x); q += kThreads) {
    tl += __ldcg(&ctl->part_loss[q]);
    tc += __ldcg(&ctl->part_count[q]);
  }
  tl = block_sum(tl, s_red);
  tc = block_sum(tc, s_redi);
  if (tid == 0) {
    if (!refuse) {
      a.stats[STAT_EPOCH_LOSS] += tl;
      a.stats[STAT_EPOCH_COUNT] += static_cast<double>(tc);
      if (a.row_counts != nullptr) count_rows(a, ctl);
    }
    ctl->refuse = 0u;
    ctl->over = 0u;
    ctl->n_stray = 0;
    ctl->first_stray = 0u;
    ctl->ticket_merge = 0u;
  }
}

unsigned grid_for(int64_t units) {
  return static_cast<unsigned>(units < 1 ? 1 : (units > kMaxBlocks ? kMaxBlocks : units));
}

template <typename T, int TPR, int NV>
void launch_rows_cfg(const StepArgs& a, const StepWork& w, cudaStream_t stream) {
  constexpr int R = kThreads / TPR;
  rows_kernel<T, TPR, NV><<<grid_for((a.b + R - 1) / R), kThreads, 0, stream>>>(a, w);
}

// Lanes per row and logits kept per lane, by the number of classes.
template <typename T>
void launch_rows(const StepArgs& a, const StepWork& w, cudaStream_t stream) {
  const int64_t c = a.c;
  if (c <= 4) launch_rows_cfg<T, 4, 1>(a, w, stream);
  else if (c <= 8) launch_rows_cfg<T, 8, 1>(a, w, stream);
  else if (c <= 16) launch_rows_cfg<T, 16, 1>(a, w, stream);
  else if (c <= 32) launch_rows_cfg<T, 32, 1>(a, w, stream);
  else if (c <= 64) launch_rows_cfg<T, 32, 2>(a, w, stream);
  else if (c <= 128) launch_rows_cfg<T, 32, 4>(a, w, stream);
  else if (c <= 256) launch_rows_cfg<T, 32, 8>(a, w, stream);
  else if (c <= 512) launch_rows_cfg<T, 32, 16>(a, w, stream);
  else if (c <= 1024) launch_rows_cfg<T, 32, 32>(a, w, stream);
  else launch_rows_cfg<T, 32, 0>(a, w, stream);
}

// The ce_step backward in one launch: out[i] = grad[i] * (g * scale), g = g_out[0] (mean /
// sum) or g_out[row, position] (none), with fastsel/ops.py's roundings (s = g * scale in
// float32, then grad * s in float32, stored in grad's type round-to-nearest-even: two
// multiplications and no addition, so nothing to contract). Grid-stride over the entries in
// memory order; per row, each thread keeps (row, entry in row, position) of its index and
// advances them by the grid's stride, so only its first index is divided.
template <typename T>
__global__ void __launch_bounds__(kThreads) scale_grad_kernel(ScaleGradArgs a) {
  const T* grad = static_cast<const T*>(a.grad);
  T* out = static_cast<T*>(a.out);
  const float sc = *a.scale;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (!a.per_row) {
    const float s = __fmul_rn(*a.g_out, sc);
    for (; i < a.numel; i += stride) st(out, i, __fmul_rn(ld(grad, i), s));
    return;
  }
  const int64_t cd = a.c * a.d;  // entries per row (> 0: numel > 0)
  int64_t r = i / cd, rem = i % cd, p = rem % a.d;
  const int64_t step_r = stride / cd, step_rem = stride % cd, step_p = stride % a.d;
  for (; i < a.numel; i += stride) {
    const float s = __fmul_rn(a.g_out[r * a.g_row + p * a.g_pos], sc);
    st(out, i, __fmul_rn(ld(grad, i), s));
    r += step_r;
    rem += step_rem;
    if (rem >= cd) {
      rem -= cd;
      ++r;
    }
    p += step_p;
    if (p >= a.d) p -= a.d;
  }
}

}  // namespace

const char* launch_scale_grad(const ScaleGradArgs& a, void* stream_ptr) {
  if (a.numel <= 0) return nullptr;
  if (a.per_row && (a.c <= 0 || a.d <= 0)) return "fastsel: scale_grad: empty rows with entries";
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const unsigned grid = grid_for((a.numel + kThreads - 1) / kThreads);
  switch (a.type) {
    case kF32: scale_grad_kernel<float><<<grid, kThreads, 0, stream>>>(a); break;
    case kF16: scale_grad_kernel<__half><<<grid, kThreads, 0, stream>>>(a); break;
    case kBF16: scale_grad_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(a); break;
    default: return "fastsel: scale_grad: unsupported gradient type";
  }
  return last_error();
}

int64_t step_ctl_bytes() { return align256(static_cast<int64_t>(sizeof(Ctl))); }
int64_t step_group_bytes(int64_t b) { return align256((b > 0 ? b : 1) * static_cast<int64_t>(sizeof(Group))); }
int64_t step_rows_bytes(int64_t b) { return align256((b > 0 ? b : 1) * static_cast<int64_t>(sizeof(RowInfo))); }

const char* launch_step(const StepArgs& a, const StepWork& w, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (a.logits_type) {
    case kF32: launch_rows<float>(a, w, stream); break;
    case kF16: launch_rows<__half>(a, w, stream); break;
    case kBF16: launch_rows<__nv_bfloat16>(a, w, stream); break;
    default: return "fastsel: unsupported logits type";
  }
  if (a.update) merge_kernel<<<grid_for((a.b + kThreads - 1) / kThreads), kThreads, 0, stream>>>(a, w);
  return last_error();
}

}  // namespace cuda
}  // namespace fastsel
