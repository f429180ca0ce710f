// The fused step on the CPU: per-row cross-entropy, p_true and d(loss)/d(logits) in one
// pass over each row, then the per-sample state update with duplicates merged as
// fastsel/backends/reference.py does. Every input is checked here before anything is
// written, so a bad call raises a clear error and never writes out of bounds.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "ops.h"

namespace fastsel {
namespace {

// Slots of state.stats and state.errors (fastsel/state.py).
constexpr int STAT_NONFINITE = 0, STAT_EPOCH_LOSS = 1, STAT_EPOCH_COUNT = 2;
constexpr int ERR_INDEX_COUNT = 0, ERR_INDEX_VALUE = 1, ERR_LABEL_COUNT = 2, ERR_LABEL_VALUE = 3;

// Hot loops are compiled twice (AVX2 and baseline) and picked at load time, where GCC can.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTSEL_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTSEL_CLONES
#endif

// Independent accumulators, so the sums vectorise without -ffast-math (setup.py passes
// -fno-trapping-math -fno-math-errno, which let GCC vectorise the branch-free exp).
constexpr int kLanes = 16;

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

// e[j] = exp(x[j] - m); returns the sum (NaN if any x is NaN).
FASTSEL_CLONES float row_exp_sum(const float* __restrict x, int64_t c, float m, float* __restrict e) {
  for (int64_t j = 0; j < c; ++j) e[j] = exp_nonpos(x[j] - m);
  float acc[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= c; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += e[j + l];
  float s = 0.0f;
  for (; j < c; ++j) s += e[j];
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// sum(x) and, with w, sum(w * x): only label smoothing needs them.
FASTSEL_CLONES void row_sums(const float* x, const float* w, int64_t c, double* sx, double* swx) {
  float a[kLanes] = {0}, b[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= c; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      a[l] += x[j + l];
      if (w) b[l] += w[j + l] * x[j + l];
    }
  double s = 0.0, t = 0.0;
  for (; j < c; ++j) {
    s += x[j];
    if (w) t += static_cast<double>(w[j]) * x[j];
  }
  for (int l = 0; l < kLanes; ++l) {
    s += a[l];
    t += b[l];
  }
  *sx = s;
  *swx = t;
}

// g[j] = a * e[j] + b (+ cw * w[j]).
FASTSEL_CLONES void row_grad_f32(float* g, const float* e, const float* w, int64_t c, float a,
                                 float b, float cw) {
  if (w) {
    for (int64_t j = 0; j < c; ++j) g[j] = a * e[j] + b + cw * w[j];
  } else {
    for (int64_t j = 0; j < c; ++j) g[j] = a * e[j] + b;
  }
}

template <typename T>
inline void load_row(const T* src, int64_t c, float* dst) {
  for (int64_t j = 0; j < c; ++j) dst[j] = static_cast<float>(src[j]);
}

struct RowOut {
  float loss;      // the state's loss (label smoothing, no class weight)
  float per_row;   // policy weight x weighted loss (0 for inactive rows)
  float p_true;
  bool finite;
};

// One row: loss terms and, if grad != nullptr, the gradient of sc * weighted loss.
// sc is 0 for inactive rows (whose gradient is then 0, or NaN for a NaN/inf row, as
// log_softmax's backward gives).
template <typename T>
RowOut fused_row(const T* x_in, int64_t c, int64_t y, const float* w, float wsum, float eps,
                 float one_minus_eps, float sc, float policy_w, bool active, float* xbuf, float* ebuf, T* grad) {
  const float* x;
  if constexpr (std::is_same<T, float>::value) {
    x = x_in;
  } else {
    load_row(x_in, c, xbuf);
    x = xbuf;
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float m = row_max(x, c);
  float s = std::isfinite(m) ? row_exp_sum(x, c, m, ebuf) : nan;
  RowOut out{nan, active ? nan : 0.0f, nan, false};
  if (!std::isfinite(m) || std::isnan(s)) {  // NaN anywhere, or a +inf / all -inf row
    if (grad)
      for (int64_t j = 0; j < c; ++j) grad[j] = static_cast<T>(nan);
    return out;
  }
  const float lse = m + std::log(s);
  const float w_y = w ? w[y] : 1.0f;
  const float nll = lse - x[y];
  float loss = nll, weighted = w ? w_y * nll : nll;
  if (eps != 0.0f) {
    double sx = 0.0, swx = 0.0;
    row_sums(x, w, c, &sx, &swx);
    const float mean_logp = static_cast<float>(sx / static_cast<double>(c)) - lse;
    loss = one_minus_eps * nll - eps * mean_logp;
    if (w) {
      const float wlogp = static_cast<float>(swx) - lse * wsum;
      weighted = one_minus_eps * weighted - eps * wlogp / static_cast<float>(c);
    } else {
      weighted = loss;
    }
  }
  out.loss = loss;
  out.per_row = active ? policy_w * weighted : 0.0f;
  out.p_true = std::exp(-nll);
  out.finite = std::isfinite(loss);
  if (grad) {
    // d weighted / dx_j = k p_j + b + cw w_j - (1 - eps) w_y [j == y], scaled by sc.
    const float inv_c = 1.0f / static_cast<float>(c);
    const float k = w ? one_minus_eps * w_y + eps * wsum * inv_c : 1.0f;
    const float a = sc * k / s;
    const float b = w ? 0.0f : -sc * eps * inv_c;
    const float cw = w ? -sc * eps * inv_c : 0.0f;
    const float gy_fix = -sc * one_minus_eps * w_y;
    if constexpr (std::is_same<T, float>::value) {
      row_grad_f32(grad, ebuf, w, c, a, b, cw);
      grad[y] += gy_fix;
    } else {
      float* g = xbuf;  // the converted row is no longer needed
      row_grad_f32(g, ebuf, w, c, a, b, cw);
      g[y] += gy_fix;
      for (int64_t j = 0; j < c; ++j) grad[j] = static_cast<T>(g[j]);
    }
  }
  return out;
}

void check_buffer(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t size) {
  TORCH_CHECK(t.device().is_cpu(), "fastsel._C.step: state buffer '", name,
              "' must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fastsel._C.step: state buffer '", name, "' must be ",
              dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, "fastsel._C.step: state buffer '", name,
              "' must be 1-D with ", size, " entries (n + 1), got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fastsel._C.step: state buffer '", name, "' must be contiguous");
}

// An int64 or int32 vector read as int64, its data pointer taken once (not per element).
class IntVector {
 public:
  explicit IntVector(const at::Tensor& t)
      : is64_(t.scalar_type() == at::kLong),
        p64_(is64_ ? t.data_ptr<int64_t>() : nullptr),
        p32_(is64_ ? nullptr : t.data_ptr<int32_t>()) {}
  int64_t operator[](int64_t r) const { return is64_ ? p64_[r] : static_cast<int64_t>(p32_[r]); }

 private:
  bool is64_;
  const int64_t* p64_;
  const int32_t* p32_;
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

struct Obs {
  int64_t idx;
  int64_t row;
};

}  // namespace

void check_step_inputs(const at::Tensor& logits, const at::Tensor& labels,
                       const at::Tensor& indices, const c10::optional<at::Tensor>& class_weight,
                       const char* where, bool want_cpu) {
  TORCH_CHECK(logits.dim() == 2, where, ": logits must be 2-D [batch, classes], got shape ",
              logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, where,
              ": logits must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(logits.size(1) >= 1, where, ": logits must have at least one class, got shape ",
              logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), where, ": logits must be contiguous (call .contiguous())");
  if (want_cpu) {
    TORCH_CHECK(logits.device().is_cpu(), where, ": logits must be on the CPU, got ",
                logits.device());
  } else {
    TORCH_CHECK(logits.device().is_cuda(), where, ": logits must be on a CUDA device, got ",
                logits.device());
  }
  const int64_t b = logits.size(0);
  for (auto* p : {&labels, &indices}) {
    const char* name = p == &labels ? "labels" : "indices";
    const at::Tensor& t = *p;
    TORCH_CHECK(t.dim() == 1, where, ": ", name, " must be 1-D [batch], got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, where, ": ", name,
                " must be int64 or int32, got ", t.scalar_type());
    TORCH_CHECK(t.size(0) == b, where, ": ", name, " has ", t.size(0),
                " entries but logits has ", b, " rows: lengths must match");
    TORCH_CHECK(t.device() == logits.device(), where, ": ", name, " is on ", t.device(),
                " but logits is on ", logits.device());
    TORCH_CHECK(t.is_contiguous(), where, ": ", name, " must be contiguous");
  }
  if (class_weight.has_value()) {
    const at::Tensor& w = *class_weight;
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == logits.size(1) &&
                    w.is_contiguous() && w.device() == logits.device(),
                where, ": class_weight must be a contiguous float32 vector of ", logits.size(1),
                " entries on ", logits.device(), ", got ", w.scalar_type(), " ", w.sizes(),
                " on ", w.device());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_step(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& indices,
    const at::Tensor& loss_buf, const at::Tensor& var_buf, const at::Tensor& p_buf,
    const at::Tensor& seen_buf, const at::Tensor& last_buf, const at::Tensor& weight_buf,
    const at::Tensor& stats, const at::Tensor& errors, const c10::optional<at::Tensor>& class_weight,
    int64_t n, int64_t ignore_index, double label_smoothing, double ema, int64_t reduction,
    bool strict, int64_t epoch, bool need_grad) {
  const char* where = "fastsel._C.step";
  check_step_inputs(logits, labels, indices, class_weight, where, /*want_cpu=*/true);
  TORCH_CHECK(n >= 1, where, ": n must be >= 1, got ", n);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, where, ": reduction code must be 0 (mean), 1 (sum) or 2 (none), got ", reduction);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, where,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(ema > 0.0 && ema <= 1.0, where, ": ema must be in (0, 1], got ", ema);
  TORCH_CHECK(epoch >= std::numeric_limits<int32_t>::min() && epoch <= std::numeric_limits<int32_t>::max(),
              where, ": epoch must fit in int32, got ", epoch);
  check_buffer(loss_buf, "loss", at::kFloat, n + 1);
  check_buffer(var_buf, "loss_var", at::kFloat, n + 1);
  check_buffer(p_buf, "p_true", at::kFloat, n + 1);
  check_buffer(seen_buf, "seen", at::kInt, n + 1);
  check_buffer(last_buf, "last_epoch", at::kInt, n + 1);
  check_buffer(weight_buf, "weight", at::kFloat, n + 1);
  check_buffer(stats, "stats", at::kDouble, 3);
  check_buffer(errors, "errors", at::kLong, 4);

  const int64_t b = logits.size(0), c = logits.size(1);
  const IntVector labels_in(labels), indices_in(indices);
  const float* w = class_weight.has_value() ? class_weight->data_ptr<float>() : nullptr;
  float* lb = loss_buf.data_ptr<float>();
  float* vb = var_buf.data_ptr<float>();
  float* pb = p_buf.data_ptr<float>();
  int32_t* sb = seen_buf.data_ptr<int32_t>();
  int32_t* eb = last_buf.data_ptr<int32_t>();
  const float* pw = weight_buf.data_ptr<float>();

  // Phase 0: row masks, error counts and the mean's denominator (labels only: known before
  // any logit is read, so the gradient is written already scaled).
  std::vector<uint8_t> active(b);
  std::vector<int64_t> lab(b), idx(b);
  int64_t n_bad_index = 0, n_bad_label = 0, first_bad_index = 0, first_bad_label = 0;
  double denom = 0.0;
  for (int64_t r = 0; r < b; ++r) {
    const int64_t y = labels_in[r];
    const int64_t i = indices_in[r];
    const bool bad_index = i < 0 || i >= n;
    const bool not_ignored = y != ignore_index;
    const bool bad_label = not_ignored && (y < 0 || y >= c);
    if (bad_index && n_bad_index++ == 0) first_bad_index = i;
    if (bad_label && n_bad_label++ == 0) first_bad_label = y;
    const bool act = not_ignored && !bad_label && !bad_index;
    active[r] = act;
    lab[r] = act ? y : 0;
    idx[r] = act ? i : n;
    prefetch_sample(idx[r], pw, lb, vb, pb, sb, eb);
    if (act) denom += w ? static_cast<double>(w[y]) : 1.0;
  }
  if (strict && (n_bad_index || n_bad_label)) {
    // Nothing was written; the caller raises the same error as fastsel.checks.raise_for_errors.
    at::Tensor errs = at::empty({4}, at::kLong);
    auto* e = errs.data_ptr<int64_t>();
    e[0] = n_bad_index, e[1] = first_bad_index, e[2] = n_bad_label, e[3] = first_bad_label;
    return {at::Tensor(), at::Tensor(), errs};
  }
  if (!strict) {
    auto* e = errors.data_ptr<int64_t>();
    if (e[ERR_INDEX_COUNT] == 0 && n_bad_index > 0) e[ERR_INDEX_VALUE] = first_bad_index;
    e[ERR_INDEX_COUNT] += n_bad_index;
    if (e[ERR_LABEL_COUNT] == 0 && n_bad_label > 0) e[ERR_LABEL_VALUE] = first_bad_label;
    e[ERR_LABEL_COUNT] += n_bad_label;
  }

  const float denom_f = static_cast<float>(denom);
  const float row_scale = reduction == 0 ? 1.0f / denom_f : 1.0f;
  const float eps = static_cast<float>(label_smoothing);
  const float one_minus_eps = static_cast<float>(1.0 - label_smoothing);
  float wsum = 0.0f;
  if (w) {
    double t = 0.0;
    for (int64_t j = 0; j < c; ++j) t += w[j];
    wsum = static_cast<float>(t);
  }

  // Phase 1: every row, in parallel.
  std::vector<RowOut> rows(b);
  at::Tensor grad = need_grad ? at::empty_like(logits) : at::Tensor();
  // Rows per task: threads only for large batches (waking a thread costs more than a small
  // batch, and much more when the cores are shared).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fastsel_step", [&] {
    const scalar_t* xp = logits.data_ptr<scalar_t>();
    scalar_t* gp = need_grad ? grad.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, b, grain, [&](int64_t lo, int64_t hi) {
      std::vector<float> xbuf(std::is_same<scalar_t, float>::value ? 0 : c), ebuf(c);
      for (int64_t r = lo; r < hi; ++r) {
        const bool act = active[r];
        const float policy_w = pw[idx[r]];
        const float sc = act ? policy_w * row_scale : 0.0f;
        rows[r] = fused_row<scalar_t>(xp + r * c, c, lab[r], w, wsum, eps, one_minus_eps, sc, policy_w, act,
                                      xbuf.data(), ebuf.data(), gp ? gp + r * c : nullptr);
      }
    });
  });

  // Phase 2: the reduction, in row order.
  at::Tensor out;
  if (reduction == 2) {
    out = at::empty({b}, at::kFloat);
    float* o = out.data_ptr<float>();
    for (int64_t r = 0; r < b; ++r) o[r] = rows[r].per_row;
  } else {
    double total = 0.0;
    for (int64_t r = 0; r < b; ++r) total += rows[r].per_row;
    float t = static_cast<float>(total);
    out = at::scalar_tensor(reduction == 0 ? t / denom_f : t, at::kFloat);
  }

  // Phase 3: the state update. Rows of one sample are one observation of their mean loss
  // and mean p_true, summed in float64 in row order (as the reference's stable sort does).
  std::vector<Obs> obs;
  obs.reserve(b);
  int64_t nonfinite = 0;
  for (int64_t r = 0; r < b; ++r) {
    if (!active[r]) continue;
    if (rows[r].finite)
      obs.push_back({idx[r], r});
    else
      ++nonfinite;
  }
  if (n <= static_cast<int64_t>(UINT32_MAX) && b <= static_cast<int64_t>(UINT32_MAX)) {
    // Rows were gathered in row order, so a stable sort by sample index is enough.
    std::vector<uint32_t> key(obs.size()), val(obs.size());
    for (size_t q = 0; q < obs.size(); ++q) {
      key[q] = static_cast<uint32_t>(obs[q].idx);
      val[q] = static_cast<uint32_t>(obs[q].row);
    }
    radix_sort_pairs(key, val);
    for (size_t q = 0; q < obs.size(); ++q) obs[q] = {static_cast<int64_t>(key[q]), static_cast<int64_t>(val[q])};
  } else {
    std::sort(obs.begin(), obs.end(), [](const Obs& a, const Obs& o) {
      return a.idx != o.idx ? a.idx < o.idx : a.row < o.row;
    });
  }
  const float a = static_cast<float>(ema);
  const float one_minus_a = static_cast<float>(1.0 - ema);
  double epoch_loss = 0.0;
  int64_t epoch_count = 0;
  for (size_t g = 0; g < obs.size();) {
    const int64_t t = obs[g].idx;
    double sum_l = 0.0, sum_p = 0.0;
    int64_t cnt = 0;
    for (; g < obs.size() && obs[g].idx == t; ++g, ++cnt) {
      sum_l += static_cast<double>(rows[obs[g].row].loss);
      sum_p += static_cast<double>(rows[obs[g].row].p_true);
    }
    const float obs_l = static_cast<float>(sum_l / static_cast<double>(cnt));
    const float obs_p = static_cast<float>(sum_p / static_cast<double>(cnt));
    const float m_old = lb[t], v_old = vb[t], p_old = pb[t];
    const int32_t s_old = sb[t];
    const float delta = obs_l - m_old;
    if (s_old == 0) {
      lb[t] = obs_l;
      vb[t] = 0.0f;
    } else {
      const float ad = a * delta;
      lb[t] = m_old + ad;
      vb[t] = one_minus_a * (v_old + ad * delta);
    }
    const int32_t s_new = s_old + static_cast<int32_t>(cnt);
    const float frac = static_cast<float>(static_cast<double>(cnt) /
                                          std::max(static_cast<double>(s_new), 1.0));
    pb[t] = p_old + (obs_p - p_old) * frac;
    sb[t] = s_new;
    eb[t] = static_cast<int32_t>(epoch);
    epoch_loss += sum_l;
    epoch_count += cnt;
  }
  double* st = stats.data_ptr<double>();
  st[STAT_NONFINITE] += static_cast<double>(nonfinite);
  st[STAT_EPOCH_LOSS] += epoch_loss;
  st[STAT_EPOCH_COUNT] += static_cast<double>(epoch_count);
  return {out, grad, at::Tensor()};
}

}  // namespace fastsel
