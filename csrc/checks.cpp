// Argument checks of the ops, shared by the CPU and CUDA kernels: metadata only (shapes,
// dtypes, devices, contiguity), so they cost no device sync. Every fault and its message
// come from the one table, fastsel/validation/faults.py (csrc/faults.h, generated): the
// same exception type (TypeError/ValueError) with the same words as the reference and
// triton ops, whose checks (fastsel.validation.tensors) run in this order. Also the errors
// strict mode raises from inside the ops: the range errors (IndexError) and the refused rows
// (ValueError: no room, stray rows), in the Python side's words.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>

#include "faults.h"
#include "layout.h"
#include "ops.h"

namespace fastsel {
namespace {

// ---- values as Python prints them --------------------------------------------------------------

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {  // e.g. Float8_e4m3fn, UInt16: torch.float8_e4m3fn, torch.uint16
      std::string s = c10::toString(t);
      for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      return "torch." + s;
    }
  }
}

// A tuple: (3, 4), (5,), ().
std::string py_tuple(at::IntArrayRef v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + (v.size() == 1 ? ",)" : ")");
}

// repr(float(v)): the shortest digits that read back as v, fixed notation for decimal
// exponents in [-4, 16), else d.ddde+XX.
std::string py_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[40];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*e", prec - 1, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s(buf);
  const bool neg = s[0] == '-';
  if (neg) s.erase(0, 1);
  const size_t e = s.find('e');
  const int exp = std::atoi(s.c_str() + e + 1);
  std::string digits;
  for (size_t i = 0; i < e; ++i)
    if (s[i] != '.') digits += s[i];
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exp >= -4 && exp < 16) {
    if (exp >= 0) {
      const size_t whole = static_cast<size_t>(exp) + 1;
      if (digits.size() < whole) digits.append(whole - digits.size(), '0');
      out = digits.substr(0, whole) + "." + (digits.size() > whole ? digits.substr(whole) : "0");
    } else {
      out = "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
    }
  } else {
    char ex[8];
    std::snprintf(ex, sizeof ex, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "") + ex;
  }
  return neg ? "-" + out : out;
}

// ---- raising a fault ---------------------------------------------------------------------------

using Values = std::initializer_list<std::pair<const char*, std::string>>;

// The template with each {field} replaced by its value's text.
std::string fill(const char* text, Values values) {
  std::string out;
  for (const char* p = text; *p;) {
    if (*p != '{') {
      out += *p++;
      continue;
    }
    const char* end = p + 1;
    while (*end && *end != '}') ++end;
    const std::string field(p + 1, end);
    bool found = false;
    for (const auto& kv : values) {
      if (field == kv.first) {
        out += kv.second;
        found = true;
        break;
      }
    }
    TORCH_INTERNAL_ASSERT(found && *end == '}', "fault template field {", field, "} has no value: ", text);
    p = end + 1;
  }
  return out;
}

[[noreturn]] void raise(const faults::Fault& f, Values values) {
  const std::string msg = fill(f.text, values);
  if (f.kind == faults::Kind::Type) C10_THROW_ERROR(TypeError, msg);
  C10_THROW_ERROR(ValueError, msg);
}

bool is_logits_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }
bool is_index_dtype(at::ScalarType t) { return t == at::kLong || t == at::kInt; }
bool is_vector(const at::Tensor& t, int64_t size) { return t.dim() == 1 && t.size(0) == size; }

void check_contiguous(const faults::Fault& f, const char* name, const at::Tensor& t) {
  if (!t.is_contiguous())
    raise(f, {{"name", name}, {"strides", py_tuple(t.strides())}, {"shape", py_tuple(t.sizes())}});
}

// The checks, in fastsel.validation.tensors' order.

void check_target(const at::Tensor& target, const at::Tensor& logits) {
  const at::ScalarType tt = target.scalar_type();
  if (at::isFloatingType(tt)) {
    if (!is_logits_dtype(tt)) raise(faults::TARGET_DTYPE, {{"dtype", py_dtype(tt)}});
    if (target.sizes() != logits.sizes())
      raise(faults::TARGET_PROBS_SHAPE,
            {{"dtype", py_dtype(tt)}, {"want", py_tuple(logits.sizes())}, {"shape", py_tuple(target.sizes())}});
  } else {
    if (!is_index_dtype(tt)) raise(faults::TARGET_DTYPE, {{"dtype", py_dtype(tt)}});
    bool same = target.dim() == logits.dim() - 1 && target.size(0) == logits.size(0);
    for (int64_t k = 2; same && k < logits.dim(); ++k) same = target.size(k - 1) == logits.size(k);
    if (!same) {
      std::vector<int64_t> want{logits.size(0)};
      for (int64_t k = 2; k < logits.dim(); ++k) want.push_back(logits.size(k));
      raise(faults::TARGET_INDICES_SHAPE, {{"want", py_tuple(want)},
                                           {"logits", py_tuple(logits.sizes())},
                                           {"shape", py_tuple(target.sizes())}});
    }
  }
  if (target.device() != logits.device())
    raise(faults::TARGET_DEVICE, {{"device", target.device().str()}, {"want", logits.device().str()}});
  check_contiguous(faults::TARGET_CONTIGUOUS, "target", target);
}

void check_probs(const at::Tensor& p, const at::Tensor& losses) {
  if (!at::isFloatingType(p.scalar_type()))
    raise(faults::PROBS_DTYPE, {{"name", "probs"}, {"dtype", py_dtype(p.scalar_type())}});
  if (!is_vector(p, losses.size(0)))
    raise(faults::PROBS_SHAPE,
          {{"name", "probs"}, {"want", py_tuple(losses.sizes())}, {"shape", py_tuple(p.sizes())}});
  if (p.device() != losses.device())
    raise(faults::PROBS_DEVICE,
          {{"name", "probs"}, {"device", p.device().str()}, {"want", losses.device().str()}});
  check_contiguous(faults::PROBS_CONTIGUOUS, "probs", p);
}

void check_indices(const at::Tensor& indices, int64_t b, const at::Device& dev, const char* of) {
  if (indices.dim() != 1) raise(faults::INDICES_DIM, {{"shape", py_tuple(indices.sizes())}});
  if (!is_index_dtype(indices.scalar_type()))
    raise(faults::INDICES_DTYPE, {{"dtype", py_dtype(indices.scalar_type())}});
  if (indices.size(0) != b)
    raise(faults::INDICES_LENGTH,
          {{"length", std::to_string(indices.size(0))}, {"of", of}, {"batch", std::to_string(b)}});
  if (indices.device() != dev)
    raise(faults::INDICES_DEVICE, {{"device", indices.device().str()}, {"of", of}, {"want", dev.str()}});
  check_contiguous(faults::INDICES_CONTIGUOUS, "indices", indices);
}

void check_class_weight(const at::Tensor& w, int64_t c, const at::Device& dev) {
  if (w.scalar_type() != at::kFloat) raise(faults::CLASS_WEIGHT_DTYPE, {{"dtype", py_dtype(w.scalar_type())}});
  if (!is_vector(w, c))
    raise(faults::CLASS_WEIGHT_SHAPE, {{"want", py_tuple({c})}, {"shape", py_tuple(w.sizes())}});
  if (w.device() != dev)
    raise(faults::CLASS_WEIGHT_DEVICE, {{"device", w.device().str()}, {"want", dev.str()}});
  check_contiguous(faults::CLASS_WEIGHT_CONTIGUOUS, "class_weight", w);
}

// label_smoothing < 0: observe, which takes none.
void check_settings(double label_smoothing, bool has_smoothing, double ema, int64_t reduction) {
  if (has_smoothing && !(label_smoothing >= 0.0 && label_smoothing <= 1.0))
    raise(faults::LABEL_SMOOTHING_RANGE, {{"value", py_float(label_smoothing)}});
  if (!(ema > 0.0 && ema <= 1.0)) raise(faults::EMA_RANGE, {{"value", py_float(ema)}});
  if (reduction < layout::REDUCTION_MEAN || reduction > layout::REDUCTION_NONE)
    raise(faults::REDUCTION_RANGE, {{"value", std::to_string(reduction)}});
}

constexpr const char* kStateNames[] = {"state_loss", "state_loss_var", "state_p_true", "state_seen",
                                       "state_last_epoch", "state_weight", "stats", "errors"};
constexpr at::ScalarType kStateTypes[] = {at::kFloat, at::kFloat, at::kFloat, at::kInt,
                                          at::kInt,   at::kFloat, at::kDouble, at::kLong};
using StateRefs = std::array<const at::Tensor*, 8>;

// The state's N; `of` names the tensor whose device the state must be on.
int64_t check_state_tensors(const StateRefs& s, const at::Device& dev, const char* of) {
  const at::Tensor& first = *s[0];
  if (first.dim() != 1 || first.size(0) < 2) raise(faults::STATE_SIZE, {{"shape", py_tuple(first.sizes())}});
  const int64_t size = first.size(0);
  const int64_t vec_sizes[] = {layout::STAT_SIZE, layout::ERR_SIZE};
  for (int i = 0; i < 8; ++i) {
    const at::Tensor& t = *s[i];
    const char* name = kStateNames[i];
    if (t.scalar_type() != kStateTypes[i])
      raise(faults::STATE_DTYPE,
            {{"name", name}, {"want", py_dtype(kStateTypes[i])}, {"dtype", py_dtype(t.scalar_type())}});
    if (i < 6 && !is_vector(t, size))
      raise(faults::STATE_LENGTH, {{"name", name}, {"length", std::to_string(size)}, {"shape", py_tuple(t.sizes())}});
    if (i >= 6 && !is_vector(t, vec_sizes[i - 6]))
      raise(faults::STATE_VECTOR_LENGTH,
            {{"name", name}, {"length", std::to_string(vec_sizes[i - 6])}, {"shape", py_tuple(t.sizes())}});
    if (t.device() != dev)
      raise(faults::STATE_DEVICE, {{"name", name}, {"device", t.device().str()}, {"of", of}, {"want", dev.str()}});
    if (!t.is_contiguous()) raise(faults::STATE_CONTIGUOUS, {{"name", name}, {"strides", py_tuple(t.strides())}});
  }
  return size - 1;
}

void check_rows_tensors(const std::optional<at::Tensor>& member, const std::optional<at::Tensor>& rows,
                        const at::Tensor& epoch, int64_t n, const at::Device& dev, const char* of) {
  if (member.has_value() != rows.has_value())
    raise(faults::ROWS_TOGETHER,
          {{"member", member.has_value() ? "given" : "None"}, {"rows", rows.has_value() ? "given" : "None"}});
  if (member.has_value()) {
    const struct {
      const char* name;
      const at::Tensor& t;
      at::ScalarType dtype;
      int64_t length;
      const faults::Fault& dtype_fault;
      const faults::Fault& length_fault;
    } row_args[] = {{"member", *member, at::kByte, n + 1, faults::MEMBER_DTYPE, faults::MEMBER_LENGTH},
                    {"rows", *rows, at::kLong, layout::ROW_SIZE, faults::ROWS_DTYPE, faults::ROWS_LENGTH}};
    for (const auto& a : row_args) {
      if (a.t.scalar_type() != a.dtype) raise(a.dtype_fault, {{"dtype", py_dtype(a.t.scalar_type())}});
      if (!is_vector(a.t, a.length))
        raise(a.length_fault, {{"length", std::to_string(a.length)}, {"shape", py_tuple(a.t.sizes())}});
      if (a.t.device() != dev)
        raise(faults::ROWS_DEVICE, {{"name", a.name}, {"device", a.t.device().str()}, {"of", of}, {"want", dev.str()}});
      if (!a.t.is_contiguous()) raise(faults::ROWS_CONTIGUOUS, {{"name", a.name}, {"strides", py_tuple(a.t.strides())}});
    }
  }
  if (epoch.scalar_type() != at::kLong) raise(faults::EPOCH_DTYPE, {{"dtype", py_dtype(epoch.scalar_type())}});
  if (epoch.dim() != 0) raise(faults::EPOCH_SHAPE, {{"shape", py_tuple(epoch.sizes())}});
  if (epoch.device() != dev)
    raise(faults::EPOCH_DEVICE, {{"device", epoch.device().str()}, {"of", of}, {"want", dev.str()}});
  if (epoch.device().is_cpu()) {  // read only where it lives on the host: no sync
    const int64_t v = *epoch.const_data_ptr<int64_t>();
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
      raise(faults::EPOCH_RANGE, {{"value", std::to_string(v)}});
  }
}

}  // namespace

StepDims check_ce_step_call(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& indices,
                            const at::Tensor& state_loss, const at::Tensor& state_loss_var,
                            const at::Tensor& state_p_true, const at::Tensor& state_seen,
                            const at::Tensor& state_last_epoch, const at::Tensor& state_weight,
                            const at::Tensor& stats, const at::Tensor& errors,
                            const std::optional<at::Tensor>& member, const std::optional<at::Tensor>& rows,
                            const at::Tensor& epoch, const std::optional<at::Tensor>& class_weight,
                            double label_smoothing, double ema, int64_t reduction) {
  if (logits.dim() < 2) raise(faults::LOGITS_DIM, {{"shape", py_tuple(logits.sizes())}});
  if (!is_logits_dtype(logits.scalar_type())) raise(faults::LOGITS_DTYPE, {{"dtype", py_dtype(logits.scalar_type())}});
  if (logits.size(1) < 1) raise(faults::LOGITS_CLASSES, {{"shape", py_tuple(logits.sizes())}});
  check_contiguous(faults::LOGITS_CONTIGUOUS, "logits", logits);
  const at::Device dev = logits.device();
  StepDims dims{logits.size(0), logits.size(1), 1, at::isFloatingType(target.scalar_type()), 0};
  for (int64_t k = 2; k < logits.dim(); ++k) dims.d *= logits.size(k);
  check_target(target, logits);
  check_indices(indices, dims.b, dev, "logits");
  if (class_weight.has_value()) check_class_weight(*class_weight, dims.c, dev);
  check_settings(label_smoothing, true, ema, reduction);
  dims.n = check_state_tensors({&state_loss, &state_loss_var, &state_p_true, &state_seen, &state_last_epoch,
                                &state_weight, &stats, &errors},
                               dev, "logits");
  check_rows_tensors(member, rows, epoch, dims.n, dev, "logits");
  return dims;
}

int64_t check_observe_call(const at::Tensor& losses, const std::optional<at::Tensor>& probs,
                           const at::Tensor& indices, const at::Tensor& state_loss,
                           const at::Tensor& state_loss_var, const at::Tensor& state_p_true,
                           const at::Tensor& state_seen, const at::Tensor& state_last_epoch,
                           const at::Tensor& state_weight, const at::Tensor& stats, const at::Tensor& errors,
                           const std::optional<at::Tensor>& member, const std::optional<at::Tensor>& rows,
                           const at::Tensor& epoch, double ema, int64_t reduction) {
  if (losses.dim() != 1) raise(faults::LOSSES_DIM, {{"shape", py_tuple(losses.sizes())}});
  if (!at::isFloatingType(losses.scalar_type()))
    raise(faults::LOSSES_DTYPE, {{"dtype", py_dtype(losses.scalar_type())}});
  check_contiguous(faults::LOSSES_CONTIGUOUS, "losses", losses);
  const at::Device dev = losses.device();
  const int64_t b = losses.size(0);
  if (probs.has_value()) check_probs(*probs, losses);
  check_indices(indices, b, dev, "losses");
  check_settings(0.0, false, ema, reduction);
  const int64_t n = check_state_tensors({&state_loss, &state_loss_var, &state_p_true, &state_seen, &state_last_epoch,
                                         &state_weight, &stats, &errors},
                                        dev, "losses");
  check_rows_tensors(member, rows, epoch, n, dev, "losses");
  return b;
}

void check_state(const at::Tensor& loss, const at::Tensor& loss_var, const at::Tensor& p_true,
                 const at::Tensor& seen, const at::Tensor& last_epoch, const at::Tensor& weight,
                 const at::Tensor& stats, const at::Tensor& errors) {
  check_state_tensors({&loss, &loss_var, &p_true, &seen, &last_epoch, &weight, &stats, &errors}, loss.device(),
                      "state_loss");
}

namespace {
inline bool fits(const at::Tensor& t, at::ScalarType dtype, int64_t size, const at::Device& dev) {
  return t.defined() && t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == size && t.stride(0) == 1 &&
         t.device() == dev;
}
}  // namespace

StateView state_view(const at::Tensor& loss, const at::Tensor& loss_var, const at::Tensor& p_true,
                     const at::Tensor& seen, const at::Tensor& last_epoch, const at::Tensor& weight,
                     const at::Tensor& stats, const at::Tensor& errors, const at::Device& device,
                     const char* where) {
  const int64_t size = loss.defined() && loss.dim() == 1 ? loss.size(0) : -1;
  const bool ok = size >= 2 && fits(loss, at::kFloat, size, device) && fits(loss_var, at::kFloat, size, device) &&
                  fits(p_true, at::kFloat, size, device) && fits(seen, at::kInt, size, device) &&
                  fits(last_epoch, at::kInt, size, device) && fits(weight, at::kFloat, size, device) &&
                  fits(stats, at::kDouble, layout::STAT_SIZE, device) && fits(errors, at::kLong, layout::ERR_SIZE, device);
  if (!ok) {  // the call checks raised first; a guard, so nothing is written out of bounds
    check_state_tensors({&loss, &loss_var, &p_true, &seen, &last_epoch, &weight, &stats, &errors}, device, where);
    TORCH_INTERNAL_ASSERT(false, where, ": the state does not fit the kernels");
  }
  return StateView{loss.data_ptr<float>(),      loss_var.data_ptr<float>(),       p_true.data_ptr<float>(),
                   seen.data_ptr<int32_t>(),     last_epoch.data_ptr<int32_t>(),   weight.data_ptr<float>(),
                   stats.data_ptr<double>(),     errors.data_ptr<int64_t>(),       size - 1};
}

RowsView rows_view(const std::optional<at::Tensor>& member, const std::optional<at::Tensor>& rows,
                   const at::Tensor& epoch, int64_t n, const at::Device& device, const char* of) {
  check_rows_tensors(member, rows, epoch, n, device, of);
  if (!member.has_value()) return RowsView{nullptr, nullptr};
  return RowsView{member->const_data_ptr<uint8_t>(), rows->data_ptr<int64_t>()};
}

int64_t host_epoch(const at::Tensor& epoch, const at::Device& device, const char* where) {
  TORCH_INTERNAL_ASSERT(device.is_cpu() && epoch.device() == device && epoch.scalar_type() == at::kLong &&
                            epoch.dim() == 0,
                        where, ": host_epoch reads a checked CPU epoch");
  return *epoch.const_data_ptr<int64_t>();
}

namespace {
// fastsel/rows.py's FIX: the way out of either refusal.
constexpr const char* kRowsFix =
    "pass update=False for a forward whose rows must not count (a sanity check, an evaluation)";
}  // namespace

void raise_room(int64_t b, int64_t epoch, int64_t trained, int64_t shard) {
  if (shard < 0) {
    TORCH_CHECK_VALUE(false, "indices: no epoch is in progress (epoch ", epoch, " has not been iterated), so these ",
                      b, " rows cannot count towards it: iterate the sampler or its DataLoader first (is this "
                      "Sampler the DataLoader's sampler? a torch DistributedSampler in its place draws no fastsel "
                      "epoch: fastsel shards itself), or ", kRowsFix);
  }
  TORCH_CHECK_VALUE(false, "indices: ", b, " more rows would take epoch ", epoch, " to ", trained + b,
                    " of this rank's ", shard, ": its rows have all been trained; ", kRowsFix,
                    ", or iterate the sampler again to start the next epoch");
}

void raise_stray(int64_t count, int64_t epoch, int64_t first) {
  TORCH_CHECK_VALUE(false, "indices: ", count, " row(s) are samples epoch ", epoch, " did not select, e.g. ", first,
                    " (an evaluation pass? labels passed as indices?); ", kRowsFix);
}

void raise_range_errors(int64_t bad_index_count, int64_t bad_index_value, int64_t bad_label_count,
                        int64_t bad_label_value, int64_t n, int64_t num_classes) {
  TORCH_CHECK_INDEX(bad_index_count == 0, "indices: ", bad_index_count, " sample index(es) outside [0, ", n,
                    "), e.g. ", bad_index_value, "; those rows were left out of the per-sample state");
  if (bad_label_count == 0) return;
  if (num_classes >= 0) {
    TORCH_CHECK_INDEX(false, "labels: ", bad_label_count, " label(s) outside [0, ", num_classes,
                      ") and not ignore_index, e.g. ", bad_label_value,
                      "; those rows were left out of the per-sample state; if ", bad_label_value,
                      " marks elements to ignore, pass fastsel.Sampler(..., ignore_index=", bad_label_value, ")");
  }
  TORCH_CHECK_INDEX(false, "labels: ", bad_label_count, " label(s) outside [0, C) and not ignore_index, e.g. ",
                    bad_label_value, "; those rows were left out of the per-sample state; if ", bad_label_value,
                    " marks elements to ignore, pass fastsel.Sampler(..., ignore_index=", bad_label_value, ")");
}

void record_range_errors(const StateView& s, int64_t bad_index_count, int64_t bad_index_value,
                         int64_t bad_label_count, int64_t bad_label_value) {
  int64_t* e = s.errors;
  if (e[layout::ERR_INDEX_COUNT] == 0 && bad_index_count > 0) e[layout::ERR_INDEX_VALUE] = bad_index_value;
  e[layout::ERR_INDEX_COUNT] += bad_index_count;
  if (e[layout::ERR_LABEL_COUNT] == 0 && bad_label_count > 0) e[layout::ERR_LABEL_VALUE] = bad_label_value;
  e[layout::ERR_LABEL_COUNT] += bad_label_count;
}

}  // namespace fastsel
