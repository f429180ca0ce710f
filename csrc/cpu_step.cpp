// fastsel::ce_step_csrc on the CPU: the fused cross-entropy for every F.cross_entropy
// target (fastsel/backends/reference.py is the oracle): class indices [B] or [B, d1..dk], class probabilities of the
// logits' shape. One pass computes each element's loss, p_true and d(out)/d(logits); then
// each sample's observation (the mean over its active elements) is folded into the state
// (cpu_state.cpp) with duplicates merged as every backend does.
//
// 2-D logits run row by row (the classes are contiguous: vectorised over classes). K-dim
// logits [B, C, D] (D = d1 * ... * dk) run in blocks of positions of one sample: a class's
// logits for consecutive positions are contiguous, so every loop over the classes runs
// vectorised over the block's positions, and the block (C x P floats) stays in cache
// between the max, exp and gradient passes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "layout.h"
#include "ops.h"

namespace fastsel {
namespace {

// Hot loops are compiled twice (AVX2 and baseline) and picked at load time, where GCC can.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTSEL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTSEL_CLONES
#endif

// Independent accumulators, so the sums vectorise without -ffast-math (setup.py passes
// -fno-trapping-math -fno-math-errno, which let GCC vectorise the branch-free exp).
constexpr int kLanes = 16;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// exp(x) for x <= 0 (x - rowmax), branch-free so loops over it vectorise: Cody-Waite range
// reduction and a degree-7 polynomial (~1 ulp on [-ln2/2, ln2/2]). -inf and x < -87
// give 0 (the true value is below FLT_MIN); NaN propagates.
inline float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * 1.44269504088896341f + 12582912.0f;  // round to nearest integer
  const float nf = t - 12582912.0f;
  uint32_t tbits;  // t = 1.5 * 2**23 + n: its low mantissa bits hold n + 2**22 (no float->int UB for NaN)
  std::memcpy(&tbits, &t, sizeof tbits);
  const float r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const uint32_t sbits = (tbits - 0x4B400000u + 127u) << 23;  // 2**n as float bits
  float scale;
  std::memcpy(&scale, &sbits, sizeof scale);
  const float out = y * scale;
  return x < -87.0f ? 0.0f : out;
}

// ---- rows (2-D logits): vectorised over the classes -----------------------------------------------

FASTSEL_CLONES float row_max(const float* x, int64_t c) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#if defined(__GNUC__)
  typedef float v8 __attribute__((vector_size(32)));
  v8 acc = {m, m, m, m, m, m, m, m};
  for (; j + 8 <= c; j += 8) {
    v8 v;
    std::memcpy(&v, x + j, sizeof v);
    acc = acc < v ? v : acc;
  }
  for (int l = 0; l < 8; ++l) m = m < acc[l] ? acc[l] : m;
#endif
  for (; j < c; ++j) m = m < x[j] ? x[j] : m;
  return m;
}

// The kLanes partial sums added pairwise (a tree: vector adds, not a serial chain).
inline float fold_lanes(float* acc) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// e[j] = exp(x[j] - m); returns the sum (NaN if any x is NaN).
FASTSEL_CLONES float row_exp_sum(const float* __restrict x, int64_t c, float m, float* __restrict e) {
  for (int64_t j = 0; j < c; ++j) e[j] = exp_nonpos(x[j] - m);  // one vector loop, masked tail
  float acc[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= c; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += e[j + l];
  float s = 0.0f;
  for (; j < c; ++j) s += e[j];
  return s + fold_lanes(acc);
}

// sum(x - m) and, with w, sum(w * (x - m)): only label smoothing needs them (relative to the
// row's max, as log_softmax's x - m - log(s), so large logits lose no precision).
FASTSEL_CLONES void row_sums(const float* x, const float* w, int64_t c, float m, double* sx, double* swx) {
  float a[kLanes] = {0}, b[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= c; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float xm = x[j + l] - m;
      a[l] += xm;
      if (w) b[l] += w[j + l] * xm;
    }
  double s = 0.0, t = 0.0;
  for (; j < c; ++j) {
    const float xm = x[j] - m;
    s += xm;
    if (w) t += static_cast<double>(w[j]) * xm;
  }
  for (int l = 0; l < kLanes; ++l) {
    s += a[l];
    t += b[l];
  }
  *sx = s;
  *swx = t;
}

// g[j] = a * e[j] + b (+ cw * w[j]).
FASTSEL_CLONES void row_grad_hard(float* g, const float* e, const float* w, int64_t c, float a, float b, float cw) {
  if (w) {
    for (int64_t j = 0; j < c; ++j) g[j] = a * e[j] + b + cw * w[j];
  } else {
    for (int64_t j = 0; j < c; ++j) g[j] = a * e[j] + b;
  }
}

// Class-probability sums of one row, t' = ome * t + eps_c the smoothed target:
// out = {sum t', sum t' (x - m), sum t e, sum w t', sum w t' (x - m)} (the last two with w).
FASTSEL_CLONES void row_soft_sums(const float* __restrict x, const float* __restrict t, const float* __restrict e,
                                  const float* __restrict w, int64_t c, float m, float ome, float eps_c,
                                  double* out) {
  float a0[kLanes] = {0}, a1[kLanes] = {0}, a2[kLanes] = {0}, a3[kLanes] = {0}, a4[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= c; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float tp = ome * t[j + l] + eps_c, xm = x[j + l] - m;
      a0[l] += tp;
      a1[l] += tp * xm;
      a2[l] += t[j + l] * e[j + l];
      if (w) {
        a3[l] += w[j + l] * tp;
        a4[l] += w[j + l] * tp * xm;
      }
    }
  double s[5] = {0, 0, 0, 0, 0};
  for (; j < c; ++j) {
    const float tp = ome * t[j] + eps_c, xm = x[j] - m;
    s[0] += tp;
    s[1] += tp * xm;
    s[2] += t[j] * e[j];
    if (w) {
      s[3] += w[j] * tp;
      s[4] += w[j] * tp * xm;
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    s[0] += a0[l];
    s[1] += a1[l];
    s[2] += a2[l];
    s[3] += a3[l];
    s[4] += a4[l];
  }
  for (int k = 0; k < 5; ++k) out[k] = s[k];
}

// g[j] = a * e[j] - sc * w[j] * (ome * t[j] + eps_c).
FASTSEL_CLONES void row_grad_soft(float* __restrict g, const float* __restrict e, const float* __restrict t,
                                  const float* __restrict w, int64_t c, float a, float sc, float ome, float eps_c) {
  if (w) {
    for (int64_t j = 0; j < c; ++j) g[j] = a * e[j] - sc * w[j] * (ome * t[j] + eps_c);
  } else {
    for (int64_t j = 0; j < c; ++j) g[j] = a * e[j] - sc * (ome * t[j] + eps_c);
  }
}

// ---- blocks of positions (K-dim logits): vectorised over the positions ------------------------------
// Class j's logits of the block are x[j * xs + p], p < np (xs = D in the logits, or np in a
// converted copy); the scratch e holds exp(x - m) as e[j * np + p].

FASTSEL_CLONES void block_max(const float* __restrict x, int64_t xs, int64_t c, int64_t np, float* __restrict m) {
  for (int64_t p = 0; p < np; ++p) m[p] = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < c; ++j) {
    const float* xr = x + j * xs;
    for (int64_t p = 0; p < np; ++p) m[p] = m[p] < xr[p] ? xr[p] : m[p];
  }
}

// e = exp(x - m), s = its sum per position; with sums: also sum(x - m) and, with w, sum w (x - m).
FASTSEL_CLONES void block_exp_hard(const float* __restrict x, int64_t xs, int64_t c, int64_t np,
                                   const float* __restrict m, const float* __restrict w, bool sums,
                                   float* __restrict e, float* __restrict s, float* __restrict sxm,
                                   float* __restrict swxm) {
  for (int64_t p = 0; p < np; ++p) s[p] = 0.0f;
  if (sums)
    for (int64_t p = 0; p < np; ++p) sxm[p] = swxm[p] = 0.0f;
  for (int64_t j = 0; j < c; ++j) {
    const float* xr = x + j * xs;
    float* er = e + j * np;
    for (int64_t p = 0; p < np; ++p) {
      const float v = exp_nonpos(xr[p] - m[p]);
      er[p] = v;
      s[p] += v;
    }
    if (sums) {
      const float wj = w ? w[j] : 0.0f;
      for (int64_t p = 0; p < np; ++p) {
        const float xm = xr[p] - m[p];
        sxm[p] += xm;
        swxm[p] += wj * xm;
      }
    }
  }
}

// As row_soft_sums, per position: a[k * np + p] for the k-th sum (a holds 5 * np).
FASTSEL_CLONES void block_exp_soft(const float* __restrict x, int64_t xs, const float* __restrict t, int64_t ts,
                                   int64_t c, int64_t np, const float* __restrict m, const float* __restrict w,
                                   float ome, float eps_c, float* __restrict e, float* __restrict s,
                                   float* __restrict a) {
  float* st = a;
  float* stx = a + np;
  float* ste = a + 2 * np;
  float* swt = a + 3 * np;
  float* swtx = a + 4 * np;
  for (int64_t p = 0; p < np; ++p) s[p] = st[p] = stx[p] = ste[p] = swt[p] = swtx[p] = 0.0f;
  for (int64_t j = 0; j < c; ++j) {
    const float* xr = x + j * xs;
    const float* tr = t + j * ts;
    float* er = e + j * np;
    const float wj = w ? w[j] : 1.0f;
    for (int64_t p = 0; p < np; ++p) {
      const float xm = xr[p] - m[p];
      const float v = exp_nonpos(xm);
      const float tp = ome * tr[p] + eps_c;
      er[p] = v;
      s[p] += v;
      st[p] += tp;
      stx[p] += tp * xm;
      ste[p] += tr[p] * v;
      swt[p] += wj * tp;
      swtx[p] += wj * tp * xm;
    }
  }
}

// g[j * gs + p] = A[p] * e[j * np + p] + B[p] * w[j] (w = 1 without class weights).
FASTSEL_CLONES void block_grad_hard(const float* __restrict e, int64_t c, int64_t np, const float* __restrict A,
                                    const float* __restrict B, const float* __restrict w, float* __restrict g,
                                    int64_t gs) {
  for (int64_t j = 0; j < c; ++j) {
    const float wj = w ? w[j] : 1.0f;
    const float* er = e + j * np;
    float* gr = g + j * gs;
    for (int64_t p = 0; p < np; ++p) gr[p] = A[p] * er[p] + B[p] * wj;
  }
}

// g[j * gs + p] = A[p] * e[j * np + p] - sc * w[j] * (ome * t[j * ts + p] + eps_c).
FASTSEL_CLONES void block_grad_soft(const float* __restrict e, const float* __restrict t, int64_t ts, int64_t c,
                                    int64_t np, const float* __restrict A, float sc, const float* __restrict w,
                                    float ome, float eps_c, float* __restrict g, int64_t gs) {
  for (int64_t j = 0; j < c; ++j) {
    const float scw = sc * (w ? w[j] : 1.0f);
    const float* er = e + j * np;
    const float* tr = t + j * ts;
    float* gr = g + j * gs;
    for (int64_t p = 0; p < np; ++p) gr[p] = A[p] * er[p] - scw * (ome * tr[p] + eps_c);
  }
}

// ---- conversions ------------------------------------------------------------------------------------

template <typename T>
inline void load_floats(const T* src, int64_t count, float* dst) {
  for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
inline void store_floats(const float* src, int64_t count, T* dst) {
  for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<T>(src[j]);
}

// count entries of a float32 / float16 / bfloat16 tensor's data from `offset`, as float.
void load_any(const at::Tensor& t, int64_t offset, int64_t count, float* dst) {
  switch (t.scalar_type()) {
    case at::kFloat: std::memcpy(dst, t.const_data_ptr<float>() + offset, count * sizeof(float)); break;
    case at::kHalf: load_floats(t.const_data_ptr<at::Half>() + offset, count, dst); break;
    case at::kBFloat16: load_floats(t.const_data_ptr<at::BFloat16>() + offset, count, dst); break;
    default: TORCH_CHECK(false, "fastsel: unexpected dtype ", t.scalar_type());
  }
}

// An int64 or int32 tensor read as int64, its data pointer taken once (not per element).
class IntReader {
 public:
  IntReader() = default;
  explicit IntReader(const at::Tensor& t)
      : is64_(t.scalar_type() == at::kLong),
        p64_(is64_ ? t.const_data_ptr<int64_t>() : nullptr),
        p32_(is64_ ? nullptr : t.const_data_ptr<int32_t>()) {}
  int64_t operator[](int64_t r) const { return is64_ ? p64_[r] : static_cast<int64_t>(p32_[r]); }

 private:
  bool is64_ = true;
  const int64_t* p64_ = nullptr;
  const int32_t* p32_ = nullptr;
};

// Asks for the cache lines of sample i in every state buffer. Between two steps of a
// training loop the data (images) evict the state, and the update would then wait on one
// miss after another; prefetched while the rows are computed, the misses overlap.
template <typename... T>
inline void prefetch_sample(int64_t i, const T*... buffers) {
#if defined(__GNUC__)
  (__builtin_prefetch(buffers + i, 1, 3), ...);
#endif
}

// ---- the per-call constants -------------------------------------------------------------------------

struct Params {
  int64_t c, d;
  const float* w;  // class weights or nullptr
  float wsum;      // sum of the class weights (C without)
  float eps, ome, eps_c;  // label smoothing, 1 - eps, eps / C
  float row_scale;        // 1 / denom for "mean", else 1
  int64_t ignore_index;
};

// One row's (2-D) or one sample's (K-dim) contribution.
struct RowOut {
  float loss = 0.0f;     // the state's loss (label smoothing, no class weight): mean over active elements
  float p_true = 0.0f;
  double out = 0.0;      // sum over elements of the returned loss (policy weight x weighted loss)
  int64_t active = 0;    // active elements
};

// A row whose logits hold a NaN or +inf, or are all -inf: NaN loss and gradient (the
// returned loss too, if the row is active), as F.cross_entropy and its backward give.
RowOut nonfinite_row(int64_t c, bool active, float* grad) {
  RowOut out;
  out.active = active;
  out.loss = out.p_true = kNaN;
  out.out = active ? kNaN : 0.0;
  if (grad)
    for (int64_t j = 0; j < c; ++j) grad[j] = kNaN;
  return out;
}

// One row of 2-D logits with a class-index target: loss terms and, with grad, the gradient
// of sc * weighted loss (sc = 0 for an inactive row, whose gradient is then 0, or NaN for a
// NaN/inf row, as log_softmax's backward gives).
RowOut hard_row(const float* x, int64_t y, const Params& k, float sc, float pw, bool active, float* e,
                float* grad) {
  const int64_t c = k.c;
  const float* w = k.w;
  const float m = row_max(x, c);
  const float s = std::isfinite(m) ? row_exp_sum(x, c, m, e) : kNaN;
  if (!std::isfinite(m) || std::isnan(s)) return nonfinite_row(c, active, grad);
  RowOut out;
  out.active = active;
  const float logs = std::log(s);
  const float w_y = w ? w[y] : 1.0f;
  const float nll = logs - (x[y] - m);
  float loss = nll, weighted = w ? w_y * nll : nll;
  if (k.eps != 0.0f) {
    double sxm = 0.0, swxm = 0.0;
    row_sums(x, w, c, m, &sxm, &swxm);
    const float mean_logp = static_cast<float>(sxm / static_cast<double>(c)) - logs;
    loss = k.ome * nll - k.eps * mean_logp;
    if (w) {
      const float wlogp = static_cast<float>(swxm) - logs * k.wsum;
      weighted = k.ome * weighted - k.eps * wlogp / static_cast<float>(c);
    } else {
      weighted = loss;
    }
  }
  out.loss = loss;
  out.p_true = std::exp(-nll);
  out.out = active ? static_cast<double>(pw * weighted) : 0.0;
  if (grad) {
    // d weighted / dx_j = K p_j - w_j t'_j, t' = ome onehot(y) + eps / C, K = sum w t'.
    const float kk = w ? k.ome * w_y + k.eps_c * k.wsum : 1.0f;
    const float a = sc * kk / s;
    const float b = w ? 0.0f : -sc * k.eps_c;
    const float cw = w ? -sc * k.eps_c : 0.0f;
    row_grad_hard(grad, e, w, c, a, b, cw);
    grad[y] += -sc * k.ome * w_y;
  }
  return out;
}

// One row of 2-D logits with class probabilities t.
RowOut soft_row(const float* x, const float* t, const Params& k, float sc, float pw, bool active, float* e,
                float* grad) {
  const int64_t c = k.c;
  const float* w = k.w;
  const float m = row_max(x, c);
  const float s = std::isfinite(m) ? row_exp_sum(x, c, m, e) : kNaN;
  if (!std::isfinite(m) || std::isnan(s)) return nonfinite_row(c, active, grad);
  RowOut out;
  out.active = active;
  double sums[5];
  row_soft_sums(x, t, e, w, c, m, k.ome, k.eps_c, sums);
  const float logs = std::log(s);
  const float st = static_cast<float>(sums[0]), stx = static_cast<float>(sums[1]);
  const float loss = -(stx - logs * st);
  const float weighted = w ? -(static_cast<float>(sums[4]) - logs * static_cast<float>(sums[3])) : loss;
  const float kk = w ? static_cast<float>(sums[3]) : st;
  out.loss = loss;
  out.p_true = static_cast<float>(sums[2]) / s;
  out.out = active ? static_cast<double>(pw * weighted) : 0.0;
  if (grad) row_grad_soft(grad, e, t, w, c, sc * kk / s, sc, k.ome, k.eps_c);
  return out;
}

// Scratch of one thread for blocks of up to P positions.
struct BlockScratch {
  std::vector<float> m, s, sxm, swxm, sums, A, B, e, x, t, g, out;
  std::vector<int64_t> y;
  BlockScratch(int64_t c, int64_t P, bool copy_x, bool copy_t, bool copy_g)
      : m(P), s(P), sxm(P), swxm(P), sums(5 * P), A(P), B(P), e(c * P), x(copy_x ? c * P : 0),
        t(copy_t ? c * P : 0), g(copy_g ? c * P : 0), y(P) {}
};

// One block of np positions of one sample: x (stride xs), t (soft, stride ts) or y (hard),
// g (stride gs) or nullptr; out_none: the per-element returned loss, or nullptr.
// Accumulates into r (in position order).
void block_step(const Params& k, const float* x, int64_t xs, const float* t, int64_t ts, int64_t np,
                bool sample_ok, float pw, float* g, int64_t gs, float* out_none, BlockScratch& b, RowOut& r,
                double& loss_sum, double& p_sum) {
  const int64_t c = k.c;
  const float* w = k.w;
  const float inv_c = 1.0f / static_cast<float>(c);
  float* m = b.m.data();
  float* s = b.s.data();
  block_max(x, xs, c, np, m);
  if (t == nullptr) {
    const bool smooth = k.eps != 0.0f;
    block_exp_hard(x, xs, c, np, m, w, smooth, b.e.data(), s, b.sxm.data(), b.swxm.data());
    for (int64_t p = 0; p < np; ++p) {
      const int64_t y = b.y[p];
      const bool act = sample_ok && y != k.ignore_index && y >= 0 && y < c;
      const int64_t ys = act ? y : 0;
      const float sc = act ? pw * k.row_scale : 0.0f;
      const float w_y = w ? w[ys] : 1.0f;
      b.y[p] = ys;
      float loss, weighted, pt;
      if (!std::isfinite(m[p]) || std::isnan(s[p])) {
        loss = weighted = pt = kNaN;
        b.A[p] = kNaN;
        b.B[p] = 0.0f;
      } else {
        const float logs = std::log(s[p]);
        const float nll = logs - (x[ys * xs + p] - m[p]);
        loss = nll;
        weighted = w ? w_y * nll : nll;
        if (smooth) {
          loss = k.ome * nll - k.eps * (b.sxm[p] * inv_c - logs);
          weighted = w ? k.ome * w_y * nll - k.eps * (b.swxm[p] - logs * k.wsum) * inv_c : loss;
        }
        pt = std::exp(-nll);
        const float kk = w ? k.ome * w_y + k.eps_c * k.wsum : 1.0f;
        b.A[p] = sc * kk / s[p];
        b.B[p] = -sc * k.eps_c;
      }
      b.sxm[p] = -sc * k.ome * w_y;  // the label's own term of the gradient (sxm is free now)
      const float o = act ? pw * weighted : 0.0f;
      if (out_none) out_none[p] = o;
      r.out += o;
      if (act) {
        loss_sum += loss;
        p_sum += pt;
        ++r.active;
      }
    }
    if (g) {
      block_grad_hard(b.e.data(), c, np, b.A.data(), b.B.data(), w, g, gs);
      for (int64_t p = 0; p < np; ++p) g[b.y[p] * gs + p] += b.sxm[p];
    }
  } else {
    float* a = b.sums.data();
    block_exp_soft(x, xs, t, ts, c, np, m, w, k.ome, k.eps_c, b.e.data(), s, a);
    const float sc = sample_ok ? pw * k.row_scale : 0.0f;
    for (int64_t p = 0; p < np; ++p) {
      float loss, weighted, pt;
      if (!std::isfinite(m[p]) || std::isnan(s[p])) {
        loss = weighted = pt = kNaN;
        b.A[p] = kNaN;
      } else {
        const float logs = std::log(s[p]);
        loss = -(a[np + p] - logs * a[p]);
        weighted = w ? -(a[4 * np + p] - logs * a[3 * np + p]) : loss;
        pt = a[2 * np + p] / s[p];
        b.A[p] = sc * (w ? a[3 * np + p] : a[p]) / s[p];
      }
      const float o = sample_ok ? pw * weighted : 0.0f;
      if (out_none) out_none[p] = o;
      r.out += o;
      if (sample_ok) {
        loss_sum += loss;
        p_sum += pt;
        ++r.active;
      }
    }
    if (g) block_grad_soft(b.e.data(), t, ts, c, np, b.A.data(), sc, w, k.ome, k.eps_c, g, gs);
  }
}

// Positions per block: the block's C x P floats (logits, exp, gradient) stay in L1/L2.
int64_t block_positions(int64_t c, int64_t d) {
  int64_t p = (int64_t(4096) / c) / 16 * 16;
  p = std::max<int64_t>(16, std::min<int64_t>(p, 1024));
  return std::min(p, d);
}

// Elements per parallel task: threads only for large inputs (waking a thread costs more
// than a small batch, and much more when the cores are shared).
constexpr int64_t kGrainElements = int64_t(1) << 17;

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_step_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& indices, at::Tensor& state_loss,
    at::Tensor& state_loss_var, at::Tensor& state_p_true, at::Tensor& state_seen, at::Tensor& state_last_epoch,
    const at::Tensor& state_weight, at::Tensor& stats, at::Tensor& errors, const std::optional<at::Tensor>& member,
    const std::optional<at::Tensor>& row_counts, const at::Tensor& epoch_t,
    const std::optional<at::Tensor>& class_weight, int64_t ignore_index, double label_smoothing, double ema,
    int64_t reduction, bool strict, bool update, bool need_grad) {
  const char* where = "fastsel::ce_step_csrc";
  const StepDims dims = check_ce_step_call(logits, target, indices, state_loss, state_loss_var, state_p_true,
                                           state_seen, state_last_epoch, state_weight, stats, errors, member,
                                           row_counts, epoch_t, class_weight, label_smoothing, ema, reduction);
  const int64_t epoch = host_epoch(epoch_t, logits.device(), where);
  const StateView st = state_view(state_loss, state_loss_var, state_p_true, state_seen, state_last_epoch,
                                  state_weight, stats, errors, logits.device(), where);
  const int64_t n = st.n, b = dims.b, c = dims.c, d = dims.d;
  const RowsView rv = rows_view(member, row_counts, epoch_t, n, logits.device(), where);  // the schema's `rows`
  const bool soft = dims.soft;
  const float* w = class_weight.has_value() ? class_weight->const_data_ptr<float>() : nullptr;

  // Phase 0: which rows count (room, membership), masks, range errors and the mean's
  // denominator, from the indices and labels alone (before any logit is read, so the
  // gradient is written already scaled). A row left out (a call without room, a stray row, a
  // bad index) targets the scratch slot n: no loss, gradient, denominator or observation.
  CpuRows admit(rv, b, epoch, strict, update);  // strict: raises for room here
  const bool over = admit.over();
  const IntReader idx_in(indices);
  std::vector<int64_t> idx(b);
  std::vector<float> pw(b);
  int64_t n_bad_index = 0, first_bad_index = 0, n_bad_label = 0, first_bad_label = 0;
  double denom = 0.0;
  for (int64_t r = 0; r < b; ++r) {
    const int64_t i = idx_in[r];
    const bool in_range = i >= 0 && i < n;
    if (!in_range && !over && n_bad_index++ == 0) first_bad_index = i;
    const bool ok = in_range && !over && !admit.stray(i);
    idx[r] = ok ? i : n;
    prefetch_sample(idx[r], st.weight, st.loss, st.loss_var, st.p_true, st.seen, st.last_epoch);
  }
  if (soft) {
    for (int64_t r = 0; r < b; ++r) denom += idx[r] < n ? static_cast<double>(d) : 0.0;
  } else {
    const auto scan = [&](const auto* lab) {
      // Per sample: its valid labels counted (or their weights summed, four partial sums
      // so the adds do not wait on each other); bad labels are rare, handled apart.
      for (int64_t r = 0; r < b; ++r) {
        const bool ok = idx[r] < n;
        const auto* yr = lab + r * d;
        int64_t valid = 0, bad = 0;
        double part[4] = {0.0, 0.0, 0.0, 0.0};
        for (int64_t q = 0; q < d; ++q) {
          const int64_t y = yr[q];
          const bool counted = y != ignore_index, range = y >= 0 && y < c;
          valid += counted && range;
          bad += counted && !range;
          if (w && counted && range) part[q & 3] += w[y];
        }
        if (bad && !over) {  // a call without room records no range error
          for (int64_t q = 0; q < d; ++q) {
            const int64_t y = yr[q];
            if (y != ignore_index && (y < 0 || y >= c) && n_bad_label++ == 0) first_bad_label = y;
          }
        }
        if (ok) denom += w ? (part[0] + part[1]) + (part[2] + part[3]) : static_cast<double>(valid);
      }
    };
    if (target.scalar_type() == at::kLong) {
      scan(target.const_data_ptr<int64_t>());
    } else {
      scan(target.const_data_ptr<int32_t>());
    }
  }
  admit.check();  // strict: the stray rows, before the range errors (nothing written yet)
  if (strict) {
    raise_range_errors(n_bad_index, first_bad_index, n_bad_label, first_bad_label, n, c);  // nothing written yet
  } else {
    record_range_errors(st, n_bad_index, first_bad_index, n_bad_label, first_bad_label);
  }
  admit.commit();
  for (int64_t r = 0; r < b; ++r) pw[r] = st.weight[idx[r]];

  Params k;
  k.c = c;
  k.d = d;
  k.w = w;
  k.eps = static_cast<float>(label_smoothing);
  k.ome = static_cast<float>(1.0 - label_smoothing);
  k.eps_c = k.eps / static_cast<float>(c);
  k.ignore_index = ignore_index;
  const float denom_f = static_cast<float>(denom);
  k.row_scale = reduction == layout::REDUCTION_MEAN ? 1.0f / denom_f : 1.0f;
  k.wsum = static_cast<float>(c);
  if (w) {
    double t = 0.0;
    for (int64_t j = 0; j < c; ++j) t += w[j];
    k.wsum = static_cast<float>(t);
  }

  // Phase 1: every element, in parallel. rows[r]: sample r's sums over its elements.
  std::vector<int64_t> out_sizes{b};
  for (int64_t q = 2; q < logits.dim(); ++q) out_sizes.push_back(logits.size(q));
  at::Tensor out_none =
      reduction == layout::REDUCTION_NONE ? cpu_empty(out_sizes, at::kFloat) : at::Tensor();
  float* onp = out_none.defined() ? out_none.data_ptr<float>() : nullptr;
  at::Tensor grad = cpu_empty(need_grad ? logits.sizes() : at::IntArrayRef{0}, logits.scalar_type());
  std::vector<RowOut> rows(b);
  const bool t32 = soft && target.scalar_type() == at::kFloat;
  const float* tp32 = t32 ? target.const_data_ptr<float>() : nullptr;

  const auto body = [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    constexpr bool f32 = std::is_same<scalar_t, float>::value;
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    scalar_t* gp = need_grad ? grad.data_ptr<scalar_t>() : nullptr;
    if (d == 1) {
      // 2-D (or K-dim with one position): rows, vectorised over the classes.
      const int64_t grain = std::max<int64_t>(1, kGrainElements / c);
      at::parallel_for(0, b, grain, [&](int64_t lo, int64_t hi) {
        std::vector<float> xbuf(f32 ? 0 : c), ebuf(c), tbuf(soft && !t32 ? c : 0), gbuf(!f32 && gp ? c : 0);
        const IntReader lab = soft ? IntReader() : IntReader(target);
        for (int64_t r = lo; r < hi; ++r) {
          const float* x;
          if constexpr (f32) {
            x = reinterpret_cast<const float*>(xp + r * c);
          } else {
            load_floats(xp + r * c, c, xbuf.data());
            x = xbuf.data();
          }
          float* g = nullptr;
          if (gp) g = f32 ? reinterpret_cast<float*>(gp + r * c) : gbuf.data();
          const bool ok = idx[r] < n;
          if (soft) {
            const float* t = t32 ? tp32 + r * c : tbuf.data();
            if (!t32) load_any(target, r * c, c, tbuf.data());
            const float sc = ok ? pw[r] * k.row_scale : 0.0f;
            rows[r] = soft_row(x, t, k, sc, pw[r], ok, ebuf.data(), g);
          } else {
            const int64_t y = lab[r];
            const bool act = ok && y != ignore_index && y >= 0 && y < c;
            const float sc = act ? pw[r] * k.row_scale : 0.0f;
            rows[r] = hard_row(x, act ? y : 0, k, sc, pw[r], act, ebuf.data(), g);
          }
          if (onp) onp[r] = static_cast<float>(rows[r].out);
          if constexpr (!f32) {
            if (gp) store_floats(gbuf.data(), c, gp + r * c);
          }
        }
      });
    } else {
      // K-dim: blocks of positions of one sample, vectorised over the positions.
      const int64_t P = block_positions(c, d);
      const int64_t nblk = (d + P - 1) / P;
      std::vector<double> loss_sums(b * nblk), p_sums(b * nblk);
      std::vector<RowOut> blocks(b * nblk);
      const int64_t grain = std::max<int64_t>(1, kGrainElements / (c * P));
      at::parallel_for(0, b * nblk, grain, [&](int64_t lo, int64_t hi) {
        BlockScratch sb(c, P, !f32, soft && !t32, !f32 && gp);
        const IntReader lab = soft ? IntReader() : IntReader(target);
        for (int64_t task = lo; task < hi; ++task) {
          const int64_t r = task / nblk, p0 = (task % nblk) * P, np = std::min(P, d - p0);
          const int64_t base = r * c * d + p0;
          const float* x = reinterpret_cast<const float*>(xp + base);
          int64_t xs = d;
          if constexpr (!f32) {
            for (int64_t j = 0; j < c; ++j) load_floats(xp + base + j * d, np, sb.x.data() + j * np);
            x = sb.x.data();
            xs = np;
          }
          const float* t = nullptr;
          int64_t ts = d;
          if (soft) {
            if (t32) {
              t = tp32 + base;
            } else {
              for (int64_t j = 0; j < c; ++j) load_any(target, base + j * d, np, sb.t.data() + j * np);
              t = sb.t.data();
              ts = np;
            }
          } else {
            for (int64_t p = 0; p < np; ++p) sb.y[p] = lab[r * d + p0 + p];
          }
          float* g = nullptr;
          int64_t gs = d;
          if (gp) {
            if (f32) {
              g = reinterpret_cast<float*>(gp + base);
            } else {
              g = sb.g.data();
              gs = np;
            }
          }
          RowOut& ro = blocks[task];
          block_step(k, x, xs, t, ts, np, idx[r] < n, pw[r], g, gs, onp ? onp + r * d + p0 : nullptr, sb, ro,
                     loss_sums[task], p_sums[task]);
          if constexpr (!f32) {
            if (gp)
              for (int64_t j = 0; j < c; ++j) store_floats(sb.g.data() + j * np, np, gp + base + j * d);
          }
        }
      });
      // Each sample's sums, over its blocks in order (the same for every thread count).
      for (int64_t r = 0; r < b; ++r) {
        double out = 0.0, ls = 0.0, ps = 0.0;
        int64_t cnt = 0;
        for (int64_t q = r * nblk; q < (r + 1) * nblk; ++q) {
          out += blocks[q].out;
          ls += loss_sums[q];
          ps += p_sums[q];
          cnt += blocks[q].active;
        }
        RowOut& ro = rows[r];
        ro.out = out;
        ro.active = cnt;
        ro.loss = cnt ? static_cast<float>(ls / static_cast<double>(cnt)) : 0.0f;
        ro.p_true = cnt ? static_cast<float>(ps / static_cast<double>(cnt)) : 0.0f;
      }
    }
  };
  switch (logits.scalar_type()) {  // checked: float32, float16 or bfloat16
    case at::kFloat: body(float{}); break;
    case at::kHalf: body(at::Half{}); break;
    default: body(at::BFloat16{}); break;
  }

  // Phase 2: the reduction, in row order.
  at::Tensor out = out_none;
  if (reduction != layout::REDUCTION_NONE) {
    double total = 0.0;
    for (int64_t r = 0; r < b; ++r) total += rows[r].out;
    const float t = static_cast<float>(total);
    out = cpu_scalar(reduction == layout::REDUCTION_MEAN ? t / denom_f : t);
  }

  // Phase 3: each sample's observation into the state.
  if (update) {
    std::vector<RowObs> obs;
    obs.reserve(b);
    int64_t nonfinite = 0;
    for (int64_t r = 0; r < b; ++r) {
      const RowOut& ro = rows[r];
      if (ro.active == 0) continue;
      if (std::isfinite(ro.loss) && std::isfinite(ro.p_true)) {
        obs.push_back({idx[r], ro.loss, ro.p_true});
      } else {
        ++nonfinite;
      }
    }
    fold_observations(st, obs, nonfinite, epoch, ema);
  }
  return {out, grad, cpu_scalar(1.0f)};
}

}  // namespace fastsel
