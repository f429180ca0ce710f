// The fused step on the GPU: one warp per row computes cross-entropy, p_true and the
// gradient w.r.t. the logits (fp32 accumulation for every logits type); then one block
// checks the rows, reduces the loss, sorts the observed (sample, row) pairs and folds
// each sample's duplicates into the state in row order, as the reference does. Every
// reduction has a fixed order, so results do not depend on scheduling.
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
constexpr uint32_t F_ACTIVE = 1, F_FINITE = 2, F_BAD_INDEX = 4, F_BAD_LABEL = 8;
constexpr int kRowWarps = 8;       // rows per block of the row kernel
constexpr int kFinalThreads = 1024;

struct RowInfo {
  float loss;      // the state's loss
  float p_true;
  float w_y;       // class weight of the label (1 without class weights), 0 if inactive
  uint32_t flags;
  int64_t idx;     // sample index (n for inactive rows)
};

__device__ __forceinline__ float ld(const float* p, int64_t j) { return p[j]; }
__device__ __forceinline__ float ld(const __half* p, int64_t j) { return __half2float(p[j]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t j) { return __bfloat162float(p[j]); }
__device__ __forceinline__ void st(float* p, int64_t j, float v) { p[j] = v; }
__device__ __forceinline__ void st(__half* p, int64_t j, float v) { p[j] = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t j, float v) { p[j] = __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
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

template <typename T>
__global__ void row_kernel(StepArgs a, RowInfo* rows) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (r >= a.b) return;  // whole warps leave together
  const int64_t y = load_int(a.labels, a.labels64, r);
  const int64_t i = load_int(a.indices, a.indices64, r);
  const bool bad_index = i < 0 || i >= a.n;
  const bool not_ignored = y != a.ignore_index;
  const bool bad_label = not_ignored && (y < 0 || y >= a.c);
  const bool active = not_ignored && !bad_label && !bad_index;
  const int64_t ys = active ? y : 0, is = active ? i : a.n;
  const int64_t c = a.c;
  const T* x = static_cast<const T*>(a.logits) + r * c;
  const float* w = a.class_weight;

  float m = -INFINITY;
  bool has_nan = false;
  for (int64_t j = lane; j < c; j += 32) {
    const float v = ld(x, j);
    has_nan |= v != v;
    m = fmaxf(m, v);
  }
  m = warp_max(m);
  const bool bad_row = __any_sync(0xffffffffu, has_nan) || !isfinite(m);
  // Every sum is relative to the row's max (log_softmax's x - m - log(s)), so large logits
  // lose no precision: with logits of 1e4, m + log(s) would round to 1e4's ulp (~1e-3).
  float s = 0.f, sx = 0.f, swx = 0.f, wsum = 0.f;
  if (!bad_row) {
    for (int64_t j = lane; j < c; j += 32) {
      const float xm = ld(x, j) - m;
      s += expf(xm);
      sx += xm;
      if (w) {
        swx += w[j] * xm;
        wsum += w[j];
      }
    }
  }
  s = warp_sum(s);
  sx = warp_sum(sx);
  swx = warp_sum(swx);
  wsum = warp_sum(wsum);

  const float nanf_ = __int_as_float(0x7fc00000);
  const float policy_w = a.weight[is];
  const float eps = a.eps, ome = a.one_minus_eps;
  const float w_y = w ? w[ys] : 1.0f;
  float loss = nanf_, weighted = nanf_, p_true = nanf_, logs = nanf_;
  if (!bad_row) {
    logs = logf(s);
    const float nll = logs - (ld(x, ys) - m);
    loss = nll;
    weighted = w ? w_y * nll : nll;
    if (eps != 0.0f) {
      loss = ome * nll - eps * (sx / static_cast<float>(c) - logs);
      weighted = w ? ome * weighted - eps * (swx - logs * wsum) / static_cast<float>(c) : loss;
    }
    p_true = expf(-nll);
  }
  if (a.grad) {
    T* g = static_cast<T*>(a.grad) + r * c;
    const float sc = active ? policy_w : 0.0f;
    const float inv_c = 1.0f / static_cast<float>(c);
    const float k = w ? ome * w_y + eps * wsum * inv_c : 1.0f;
    const float b0 = w ? 0.0f : -sc * eps * inv_c;
    const float cw = w ? -sc * eps * inv_c : 0.0f;
    const float fix = -sc * ome * w_y;
    for (int64_t j = lane; j < c; j += 32) {
      float gv;
      if (bad_row) {
        gv = nanf_;
      } else {
        gv = sc * k * expf((ld(x, j) - m) - logs) + b0 + (w ? cw * w[j] : 0.0f);
        if (j == ys) gv += fix;
      }
      st(g, j, gv);
    }
  }
  if (lane == 0) {
    RowInfo ri;
    ri.loss = loss;
    ri.p_true = p_true;
    ri.w_y = active ? w_y : 0.0f;
    ri.flags = (active ? F_ACTIVE : 0u) | (isfinite(loss) ? F_FINITE : 0u) |
               (bad_index ? F_BAD_INDEX : 0u) | (bad_label ? F_BAD_LABEL : 0u);
    ri.idx = is;
    rows[r] = ri;
    a.per_row[r] = active ? policy_w * weighted : 0.0f;
  }
}

__global__ void __launch_bounds__(kFinalThreads) finalize_kernel(StepArgs a, const RowInfo* rows, int64_t p) {
  __shared__ double sd[32];
  __shared__ int64_t si[32];
  __shared__ bool refuse;
  const int64_t b = a.b;
  const int tid = threadIdx.x;
  // 1. counts, first bad rows, the mean's divisor and the loss sum, in a fixed order.
  int64_t n_bad_i = 0, n_bad_l = 0, n_nonfinite = 0, first_i = INT64_MAX, first_l = INT64_MAX;
  double denom = 0.0, total = 0.0;
  for (int64_t r = tid; r < b; r += blockDim.x) {
    const uint32_t f = rows[r].flags;
    if (f & F_BAD_INDEX) {
      ++n_bad_i;
      first_i = r < first_i ? r : first_i;
    }
    if (f & F_BAD_LABEL) {
      ++n_bad_l;
      first_l = r < first_l ? r : first_l;
    }
    if ((f & F_ACTIVE) && !(f & F_FINITE)) ++n_nonfinite;
    denom += rows[r].w_y;
    total += a.per_row[r];
  }
  n_bad_i = block_sum(n_bad_i, si);
  n_bad_l = block_sum(n_bad_l, si);
  n_nonfinite = block_sum(n_nonfinite, si);
  first_i = block_min(first_i, si);
  first_l = block_min(first_l, si);
  denom = block_sum(denom, sd);
  total = block_sum(total, sd);
  if (tid == 0) {
    const int64_t vi = n_bad_i ? load_int(a.indices, a.indices64, first_i) : 0;
    const int64_t vl = n_bad_l ? load_int(a.labels, a.labels64, first_l) : 0;
    refuse = a.strict && (n_bad_i + n_bad_l) > 0;
    a.strict_errors[ERR_INDEX_COUNT] = a.strict ? n_bad_i : 0;
    a.strict_errors[ERR_INDEX_VALUE] = a.strict ? vi : 0;
    a.strict_errors[ERR_LABEL_COUNT] = a.strict ? n_bad_l : 0;
    a.strict_errors[ERR_LABEL_VALUE] = a.strict ? vl : 0;
    if (!a.strict) {
      if (a.errors[ERR_INDEX_COUNT] == 0 && n_bad_i > 0) a.errors[ERR_INDEX_VALUE] = vi;
      a.errors[ERR_INDEX_COUNT] += n_bad_i;
      if (a.errors[ERR_LABEL_COUNT] == 0 && n_bad_l > 0) a.errors[ERR_LABEL_VALUE] = vl;
      a.errors[ERR_LABEL_COUNT] += n_bad_l;
    }
    const float df = static_cast<float>(denom), tf = static_cast<float>(total);
    const bool mean = a.reduction == REDUCTION_MEAN;
    a.denom[0] = df;
    a.out[0] = mean ? tf / df : tf;
    a.grad_scale[0] = mean ? 1.0f / df : 1.0f;
    if (!refuse && a.update) a.stats[STAT_NONFINITE] += static_cast<double>(n_nonfinite);
  }
  __syncthreads();
  if (refuse || !a.update) return;  // strict mode's refusal, or update=False: the state stays as it was

  // 2. (sample, row) keys of the observed rows, sorted: duplicates become runs in row order.
  uint64_t* keys = a.sort_keys;
  for (int64_t q = tid; q < p; q += blockDim.x) {
    uint64_t key = ~0ull;
    if (q < b && (rows[q].flags & F_ACTIVE) && (rows[q].flags & F_FINITE))
      key = (static_cast<uint64_t>(rows[q].idx) << 32) | static_cast<uint64_t>(q);
    keys[q] = key;
  }
  __syncthreads();
  for (int64_t k = 2; k <= p; k <<= 1) {
    for (int64_t j = k >> 1; j > 0; j >>= 1) {
      for (int64_t q = tid; q < p; q += blockDim.x) {
        const int64_t o = q ^ j;
        if (o > q) {
          const uint64_t u = keys[q], v = keys[o];
          const bool up = (q & k) == 0;
          if ((u > v) == up) {
            keys[q] = v;
            keys[o] = u;
          }
        }
      }
      __syncthreads();
    }
  }
  // 3. each run's first position updates its sample: mean loss and p_true in float64, then
  // the fold in float64 (no fused multiply-add: the reference's roundings), each result
  // stored saturated, so a finite observation never makes the state inf.
  double ep_loss = 0.0;
  int64_t ep_count = 0;
  const double ema = a.ema, om = a.one_minus_ema;
  for (int64_t q = tid; q < b; q += blockDim.x) {
    const uint64_t key = keys[q];
    if (key == ~0ull) continue;
    const uint64_t t = key >> 32;
    if (q > 0 && (keys[q - 1] >> 32) == t) continue;
    double sl = 0.0, sp = 0.0;
    int64_t cnt = 0;
    for (int64_t z = q; z < b && keys[z] != ~0ull && (keys[z] >> 32) == t; ++z, ++cnt) {
      const RowInfo& ri = rows[keys[z] & 0xffffffffull];
      sl += static_cast<double>(ri.loss);
      sp += static_cast<double>(ri.p_true);
    }
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
    a.last_epoch[t] = a.epoch;
    ep_loss += sl;
    ep_count += cnt;
  }
  ep_loss = block_sum(ep_loss, sd);
  ep_count = block_sum(ep_count, si);
  if (tid == 0) {
    a.stats[STAT_EPOCH_LOSS] += ep_loss;
    a.stats[STAT_EPOCH_COUNT] += static_cast<double>(ep_count);
  }
}

}  // namespace

int64_t step_rows_bytes(int64_t b) { return align256((b > 0 ? b : 1) * static_cast<int64_t>(sizeof(RowInfo))); }
int64_t step_sort_len(int64_t b) { return next_pow2(b); }

const char* launch_step(const StepArgs& a, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  RowInfo* rows = static_cast<RowInfo*>(a.rows);
  if (a.b > 0) {
    const unsigned blocks = static_cast<unsigned>((a.b + kRowWarps - 1) / kRowWarps);
    switch (a.logits_type) {
      case kF32: row_kernel<float><<<blocks, 32 * kRowWarps, 0, stream>>>(a, rows); break;
      case kF16: row_kernel<__half><<<blocks, 32 * kRowWarps, 0, stream>>>(a, rows); break;
      case kBF16: row_kernel<__nv_bfloat16><<<blocks, 32 * kRowWarps, 0, stream>>>(a, rows); break;
      default: return "fastsel: unsupported logits type";
    }
  }
  finalize_kernel<<<1, kFinalThreads, 0, stream>>>(a, rows, step_sort_len(a.b));
  return last_error();
}

}  // namespace cuda
}  // namespace fastsel
