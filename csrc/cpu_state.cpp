// The per-sample state update on the CPU (one definition, used by the fused step and by
// observe), which rows of a call count (CpuRows, also both ops') and fastsel::observe_csrc:
// per-sample losses of any loss into the state.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "layout.h"
#include "ops.h"

namespace fastsel {

namespace {

constexpr float kStateMax = std::numeric_limits<float>::max();  // fastsel.layout.STATE_MAX

// x as float, a finite value beyond float's range clamped to +-kStateMax instead of
// rounding to inf; NaN and +-inf stay as they are (fastsel/state.py: finite in, finite state).
inline float saturate(double x) {
  const double big = static_cast<double>(kStateMax);
  return static_cast<float>(std::isfinite(x) ? std::clamp(x, -big, big) : x);
}

}  // namespace

void fold_observations(const StateView& s, std::vector<RowObs>& obs, int64_t nonfinite, int64_t epoch,
                       double ema) {
  // Group the rows by sample, each group's sums in row order (the reference's stable sort
  // keeps that order too), without a sort: slot[i] is sample i's group while the batch is
  // folded, -1 otherwise (one array per thread, as long as the largest N it has folded).
  thread_local std::vector<int32_t> slot;
  if (static_cast<int64_t>(slot.size()) < s.n) slot.assign(static_cast<size_t>(s.n), -1);
  struct Group {
    int64_t idx;
    double sum_l, sum_p;
    int64_t cnt;
  };
  std::vector<Group> groups;
  groups.reserve(obs.size());
  for (const RowObs& o : obs) {
    int32_t& g = slot[static_cast<size_t>(o.idx)];
    if (g < 0) {
      g = static_cast<int32_t>(groups.size());
      groups.push_back({o.idx, 0.0, 0.0, 0});
    }
    Group& gr = groups[static_cast<size_t>(g)];
    gr.sum_l += static_cast<double>(o.loss);
    gr.sum_p += static_cast<double>(o.p);
    ++gr.cnt;
  }
  // The fold in float64 from the float32 state, with float32(ema) and float32(1 - ema),
  // each result stored saturated (the same operations, in this order, on every backend).
  const double a = static_cast<double>(static_cast<float>(ema));
  const double one_minus_a = static_cast<double>(static_cast<float>(1.0 - ema));
  double epoch_loss = 0.0;
  int64_t epoch_count = 0;
  for (const Group& gr : groups) {
    const int64_t t = gr.idx;
    const double sum_l = gr.sum_l, sum_p = gr.sum_p;
    const int64_t cnt = gr.cnt;
    slot[static_cast<size_t>(t)] = -1;
    const float obs_l = static_cast<float>(sum_l / static_cast<double>(cnt));
    const float obs_p = static_cast<float>(sum_p / static_cast<double>(cnt));
    const double m_old = s.loss[t], v_old = s.loss_var[t], p_old = s.p_true[t];
    const int32_t s_old = s.seen[t];
    if (s_old == 0) {
      s.loss[t] = obs_l;
      s.loss_var[t] = 0.0f;
    } else {
      const double delta = static_cast<double>(obs_l) - m_old;
      const double ad = a * delta;
      s.loss[t] = saturate(m_old + ad);
      s.loss_var[t] = saturate(one_minus_a * (v_old + ad * delta));
    }
    const int32_t s_new = s_old + static_cast<int32_t>(cnt);
    const double frac = static_cast<double>(cnt) / std::max(static_cast<double>(s_new), 1.0);
    s.p_true[t] = saturate(p_old + (static_cast<double>(obs_p) - p_old) * frac);
    s.seen[t] = s_new;
    s.last_epoch[t] = static_cast<int32_t>(epoch);
    epoch_loss += sum_l;
    epoch_count += cnt;
  }
  s.stats[layout::STAT_NONFINITE] += static_cast<double>(nonfinite);
  s.stats[layout::STAT_EPOCH_LOSS] += epoch_loss;
  s.stats[layout::STAT_EPOCH_COUNT] += static_cast<double>(epoch_count);
}

CpuRows::CpuRows(const RowsView& v, int64_t b, int64_t epoch, bool strict, bool update)
    : b_(b), epoch_(epoch), strict_(strict) {
  if (!update || v.rows == nullptr) return;
  rows_ = v.rows;
  const int64_t trained = rows_[layout::ROW_TRAINED], shard = rows_[layout::ROW_SHARD];
  over_ = shard < 0 || trained + b > shard;
  if (over_ && strict) raise_room(b, epoch, trained, shard);
  if (!over_) member_ = v.member;
}

void CpuRows::check() const {
  if (strict_ && n_stray_ > 0) raise_stray(n_stray_, epoch_, first_stray_);
}

void CpuRows::commit() const {
  if (rows_ == nullptr) return;
  int64_t* c = rows_;
  if (over_) {
    if (c[layout::ROW_OVER_COUNT] == 0 && b_ > 0) {
      const int64_t shard = c[layout::ROW_SHARD];
      c[layout::ROW_OVER_VALUE] = shard < 0 ? -1 : c[layout::ROW_TRAINED] + b_;
      c[layout::ROW_OVER_EPOCH] = epoch_;
    }
    c[layout::ROW_OVER_COUNT] += b_;
    return;
  }
  if (c[layout::ROW_STRAY_COUNT] == 0 && n_stray_ > 0) c[layout::ROW_STRAY_VALUE] = first_stray_;
  c[layout::ROW_STRAY_COUNT] += n_stray_;
  c[layout::ROW_TRAINED] += b_;
  c[layout::ROW_CALLS] += 1;
}

namespace {

// A floating vector (any dtype) as float32; with sat, a finite float64 value beyond
// float32's range saturates (an observation), else it rounds to inf (the returned loss).
std::vector<float> as_float(const at::Tensor& t, bool sat) {
  std::vector<float> out(t.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "fastsel_as_float", [&] {
    const scalar_t* p = t.data_ptr<scalar_t>();
    if (sat && std::is_same<scalar_t, double>::value) {
      for (size_t i = 0; i < out.size(); ++i) out[i] = saturate(static_cast<double>(p[i]));
    } else {
      for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(p[i]);
    }
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> observe_cpu(
    const at::Tensor& losses, const std::optional<at::Tensor>& probs, const at::Tensor& indices,
    at::Tensor& state_loss, at::Tensor& state_loss_var, at::Tensor& state_p_true, at::Tensor& state_seen,
    at::Tensor& state_last_epoch, const at::Tensor& state_weight, at::Tensor& stats, at::Tensor& errors,
    const std::optional<at::Tensor>& member, const std::optional<at::Tensor>& rows, const at::Tensor& epoch_t,
    double ema, int64_t reduction, bool strict, bool update) {
  const char* where = "fastsel::observe_csrc";
  const int64_t b = check_observe_call(losses, probs, indices, state_loss, state_loss_var, state_p_true, state_seen,
                                       state_last_epoch, state_weight, stats, errors, member, rows, epoch_t, ema,
                                       reduction);
  const int64_t epoch = host_epoch(epoch_t, losses.device(), where);
  const StateView s = state_view(state_loss, state_loss_var, state_p_true, state_seen, state_last_epoch,
                                 state_weight, stats, errors, losses.device(), where);
  const int64_t n = s.n;
  const RowsView rv = rows_view(member, rows, epoch_t, n, losses.device(), where);
  const bool i64 = indices.scalar_type() == at::kLong;
  const int64_t* i64p = i64 ? indices.data_ptr<int64_t>() : nullptr;
  const int32_t* i32p = i64 ? nullptr : indices.data_ptr<int32_t>();

  // Which rows count (room, membership), masks and range errors, before anything is written.
  CpuRows admit(rv, b, epoch, strict, update);  // strict: raises for room here
  const bool over = admit.over();
  std::vector<int64_t> idx(b);
  int64_t bad = 0, first_bad = 0, n_active = 0;
  for (int64_t r = 0; r < b; ++r) {
    const int64_t i = i64 ? i64p[r] : static_cast<int64_t>(i32p[r]);
    const bool in_range = i >= 0 && i < n;
    if (!in_range && !over && bad++ == 0) first_bad = i;
    const bool ok = in_range && !over && !admit.stray(i);
    n_active += ok;
    idx[r] = ok ? i : n;
  }
  admit.check();  // strict: the stray rows, before the range errors
  if (strict) {
    raise_range_errors(bad, first_bad, 0, 0, n, -1);
  } else {
    record_range_errors(s, bad, first_bad, 0, 0);
  }
  admit.commit();

  const std::vector<float> l = as_float(losses, false);
  // row_scale = policy weight (/ active rows for "mean"); masked rows count 0, even a NaN loss.
  const bool mean = reduction == layout::REDUCTION_MEAN;
  const float div = static_cast<float>(std::max<int64_t>(n_active, 1));
  at::Tensor row_scale = cpu_empty({b}, at::kFloat);
  float* rs = row_scale.data_ptr<float>();
  for (int64_t r = 0; r < b; ++r) rs[r] = idx[r] < n ? (mean ? s.weight[idx[r]] / div : s.weight[idx[r]]) : 0.0f;
  at::Tensor out;
  if (reduction == layout::REDUCTION_NONE) {
    out = cpu_empty({b}, at::kFloat);
    float* o = out.data_ptr<float>();
    for (int64_t r = 0; r < b; ++r) o[r] = idx[r] < n ? rs[r] * l[r] : 0.0f;
  } else {
    double total = 0.0;
    for (int64_t r = 0; r < b; ++r) total += idx[r] < n ? static_cast<double>(rs[r] * l[r]) : 0.0;
    out = cpu_scalar(static_cast<float>(total));
  }

  if (update) {
    // The observation saturates where float32 cannot hold a finite value: a float64 loss or
    // p_true beyond its range, exp(-loss) of a loss below -88.7.
    const bool f64 = losses.scalar_type() == at::kDouble;
    const std::vector<float> l_sat = f64 ? as_float(losses, true) : std::vector<float>();
    const std::vector<float>& lo = f64 ? l_sat : l;
    std::vector<float> p;
    if (probs.has_value()) p = as_float(*probs, true);
    std::vector<RowObs> obs;
    obs.reserve(b);
    int64_t nonfinite = 0;
    for (int64_t r = 0; r < b; ++r) {
      if (idx[r] >= n) continue;
      const float pr = probs.has_value() ? p[r] : std::min(std::exp(-lo[r]), kStateMax);  // NaN stays NaN
      if (std::isfinite(lo[r]) && std::isfinite(pr)) {
        obs.push_back({idx[r], lo[r], pr});
      } else {
        ++nonfinite;
      }
    }
    fold_observations(s, obs, nonfinite, epoch, ema);
  }
  return {out, row_scale};
}

}  // namespace fastsel
