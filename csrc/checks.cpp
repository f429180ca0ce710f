// Argument checks of the ops, shared by the CPU and CUDA kernels: metadata only (shapes,
// dtypes, devices), so they cost no device sync; each message names the argument, its value
// and the fix. The state's tensors are checked in full once (check_state), not per call.
// Also the errors strict mode raises from inside the ops: the range errors (IndexError) and
// the refused rows (ValueError: no room, stray rows), in the Python side's words.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <string>

#include "layout.h"
#include "ops.h"

namespace fastsel {
namespace {

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

bool is_logits_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }
bool is_index_dtype(at::ScalarType t) { return t == at::kLong || t == at::kInt; }

void check_common(double ema, int64_t reduction, int64_t epoch, const char* where) {
  TORCH_CHECK(reduction == layout::REDUCTION_MEAN || reduction == layout::REDUCTION_SUM ||
                  reduction == layout::REDUCTION_NONE,
              where, ": reduction must be ", layout::REDUCTION_MEAN, " (mean), ", layout::REDUCTION_SUM,
              " (sum) or ", layout::REDUCTION_NONE, " (none), the index in fastsel.layout.REDUCTIONS, got ",
              reduction);
  TORCH_CHECK(ema > 0.0 && ema <= 1.0, where, ": ema must be in (0, 1], got ", ema);
  TORCH_CHECK(epoch >= std::numeric_limits<int32_t>::min() && epoch <= std::numeric_limits<int32_t>::max(),
              where, ": epoch must fit in int32 (the state's last_epoch), got ", epoch);
}

void check_indices(const at::Tensor& indices, int64_t b, const at::Device& dev, const char* rows_of,
                   const char* where) {
  TORCH_CHECK(indices.dim() == 1, where, ": indices must be 1-D [batch] (one sample index per row), got shape ",
              indices.sizes());
  TORCH_CHECK(is_index_dtype(indices.scalar_type()), where, ": indices must be int64 or int32, got ",
              dtype_name(indices.scalar_type()));
  TORCH_CHECK(indices.size(0) == b, where, ": indices has ", indices.size(0), " entries but ", rows_of, " has ", b,
              " rows: one sample index per row");
  TORCH_CHECK(indices.device() == dev, where, ": indices is on ", indices.device(), " but ", rows_of, " is on ",
              dev, ": move it with .to(", rows_of, ".device)");
  TORCH_CHECK(indices.is_contiguous(), where, ": indices must be contiguous (call .contiguous()), got strides ",
              indices.strides());
}

const char* kBuffers[] = {"loss", "loss_var", "p_true", "seen", "last_epoch", "weight"};
const at::ScalarType kBufferTypes[] = {at::kFloat, at::kFloat, at::kFloat, at::kInt, at::kInt, at::kFloat};

}  // namespace

StepDims check_step_args(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& indices,
                         const std::optional<at::Tensor>& class_weight, double label_smoothing, double ema,
                         int64_t reduction, int64_t epoch, c10::DeviceType device_type, const char* where) {
  TORCH_CHECK(logits.dim() >= 2, where, ": logits must be [batch, classes] or [batch, classes, d1, ..., dk], got shape ",
              logits.sizes());
  TORCH_CHECK(is_logits_dtype(logits.scalar_type()), where, ": logits must be float32, float16 or bfloat16, got ",
              dtype_name(logits.scalar_type()), " (cast with .float())");
  TORCH_CHECK(logits.size(1) >= 1, where, ": logits must have at least one class (dim 1), got shape ",
              logits.sizes());
  TORCH_CHECK(logits.device().type() == device_type, where, ": logits must be on a ", c10::DeviceTypeName(device_type),
              " device here, got ", logits.device());
  TORCH_CHECK(logits.is_contiguous(), where, ": logits must be contiguous (call .contiguous()), got strides ",
              logits.strides());
  const at::Device dev = logits.device();
  StepDims dims{logits.size(0), logits.size(1), 1, false};
  for (int64_t k = 2; k < logits.dim(); ++k) dims.d *= logits.size(k);

  const at::ScalarType tt = target.scalar_type();
  if (at::isFloatingType(tt)) {
    dims.soft = true;
    TORCH_CHECK(is_logits_dtype(tt), where, ": target (class probabilities) must be float32, float16 or bfloat16, got ",
                dtype_name(tt), " (cast with .float())");
    TORCH_CHECK(target.sizes() == logits.sizes(), where,
                ": target (class probabilities) must have the logits' shape ", logits.sizes(), ", got ",
                target.sizes());
  } else {
    TORCH_CHECK(is_index_dtype(tt), where,
                ": target must be int64 or int32 class indices, or float32, float16 or bfloat16 class "
                "probabilities, got ",
                dtype_name(tt));
    bool same = target.dim() == logits.dim() - 1 && target.size(0) == logits.size(0);
    for (int64_t k = 2; same && k < logits.dim(); ++k) same = target.size(k - 1) == logits.size(k);
    if (!same) {
      std::vector<int64_t> want{logits.size(0)};
      for (int64_t k = 2; k < logits.dim(); ++k) want.push_back(logits.size(k));
      TORCH_CHECK(false, where, ": target (class indices) must have shape ", at::IntArrayRef(want),
                  " (the logits' shape ", logits.sizes(), " without the class dim), got ", target.sizes());
    }
  }
  TORCH_CHECK(target.device() == dev, where, ": target is on ", target.device(), " but logits is on ", dev,
              ": move it with .to(logits.device)");
  TORCH_CHECK(target.is_contiguous(), where, ": target must be contiguous (call .contiguous()), got strides ",
              target.strides());
  check_indices(indices, dims.b, dev, "logits", where);
  if (class_weight.has_value()) {
    const at::Tensor& w = *class_weight;
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == dims.c && w.is_contiguous() &&
                    w.device() == dev,
                where, ": class_weight must be a contiguous float32 vector of ", dims.c, " entries (one per class) on ",
                dev, ", got ", dtype_name(w.scalar_type()), " of shape ", w.sizes(), " on ", w.device());
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, where, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  check_common(ema, reduction, epoch, where);
  return dims;
}

int64_t check_observe_args(const at::Tensor& losses, const std::optional<at::Tensor>& probs,
                           const at::Tensor& indices, double ema, int64_t reduction, int64_t epoch,
                           c10::DeviceType device_type, const char* where) {
  TORCH_CHECK(losses.dim() == 1, where, ": losses must be 1-D [batch] (one loss per sample, reduction='none'), got shape ",
              losses.sizes());
  TORCH_CHECK(at::isFloatingType(losses.scalar_type()), where, ": losses must be a floating tensor, got ",
              dtype_name(losses.scalar_type()));
  TORCH_CHECK(losses.device().type() == device_type, where, ": losses must be on a ",
              c10::DeviceTypeName(device_type), " device here, got ", losses.device());
  TORCH_CHECK(losses.is_contiguous(), where, ": losses must be contiguous (call .contiguous())");
  const int64_t b = losses.size(0);
  if (probs.has_value()) {
    const at::Tensor& p = *probs;
    TORCH_CHECK(p.dim() == 1 && p.size(0) == b, where, ": probs must be 1-D with one entry per loss (", b,
                "), got shape ", p.sizes());
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), where, ": probs must be a floating tensor, got ",
                dtype_name(p.scalar_type()));
    TORCH_CHECK(p.device() == losses.device(), where, ": probs is on ", p.device(), " but losses is on ",
                losses.device(), ": move it with .to(losses.device)");
    TORCH_CHECK(p.is_contiguous(), where, ": probs must be contiguous (call .contiguous())");
  }
  check_indices(indices, b, losses.device(), "losses", where);
  check_common(ema, reduction, epoch, where);
  return b;
}

void check_state(const at::Tensor& loss, const at::Tensor& loss_var, const at::Tensor& p_true,
                 const at::Tensor& seen, const at::Tensor& last_epoch, const at::Tensor& weight,
                 const at::Tensor& stats, const at::Tensor& errors) {
  const char* where = "fastsel state";
  const at::Tensor* bufs[] = {&loss, &loss_var, &p_true, &seen, &last_epoch, &weight};
  TORCH_CHECK(loss.defined() && loss.dim() == 1, where,
              ": buffer 'loss' must be 1-D with N + 1 entries (N samples and a scratch slot), got shape ",
              loss.defined() ? loss.sizes() : at::IntArrayRef{}, "; build the state with fastsel.state.SampleState");
  const int64_t size = loss.size(0);
  TORCH_CHECK(size >= 2, where, ": buffer 'loss' must have N + 1 >= 2 entries (N >= 1 samples and a scratch slot), got ",
              size);
  const at::Device dev = loss.device();
  for (int i = 0; i < 6; ++i) {
    const at::Tensor& t = *bufs[i];
    const char* name = kBuffers[i];
    TORCH_CHECK(t.defined(), where, ": buffer '", name, "' is undefined");
    TORCH_CHECK(t.scalar_type() == kBufferTypes[i], where, ": buffer '", name, "' must be ",
                dtype_name(kBufferTypes[i]), ", got ", dtype_name(t.scalar_type()));
    TORCH_CHECK(t.dim() == 1 && t.size(0) == size, where, ": buffer '", name, "' must be 1-D with ", size,
                " entries (as 'loss': N + 1), got shape ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), where, ": buffer '", name, "' must be contiguous, got stride ", t.strides(),
                "; pass the state's own buffers (SampleState.buffers()), not views");
    TORCH_CHECK(t.device() == dev, where, ": buffer '", name, "' is on ", t.device(), " but 'loss' is on ", dev,
                "; move the whole state with SampleState.to(device)");
  }
  const at::Tensor* vecs[] = {&stats, &errors};
  const char* vec_names[] = {"stats", "errors"};
  const at::ScalarType vec_types[] = {at::kDouble, at::kLong};
  const int64_t vec_sizes[] = {layout::STAT_SIZE, layout::ERR_SIZE};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *vecs[i];
    const char* name = vec_names[i];
    TORCH_CHECK(t.defined(), where, ": '", name, "' is undefined");
    TORCH_CHECK(t.scalar_type() == vec_types[i] && t.dim() == 1 && t.size(0) == vec_sizes[i] && t.is_contiguous(),
                where, ": '", name, "' must be a contiguous ", dtype_name(vec_types[i]), " vector of ", vec_sizes[i],
                " entries (fastsel/layout.py), got ", dtype_name(t.scalar_type()), " of shape ", t.sizes());
    TORCH_CHECK(t.device() == dev, where, ": '", name, "' is on ", t.device(), " but 'loss' is on ", dev,
                "; move the whole state with SampleState.to(device)");
  }
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
  if (!ok) {
    check_state(loss, loss_var, p_true, seen, last_epoch, weight, stats, errors);  // raises for a malformed state
    TORCH_CHECK(false, where, ": the state is on ", loss.device(), " but the inputs are on ", device,
                "; move the state with SampleState.to(", device, ")");
  }
  return StateView{loss.data_ptr<float>(),      loss_var.data_ptr<float>(),       p_true.data_ptr<float>(),
                   seen.data_ptr<int32_t>(),     last_epoch.data_ptr<int32_t>(),   weight.data_ptr<float>(),
                   stats.data_ptr<double>(),     errors.data_ptr<int64_t>(),       size - 1};
}

namespace {
void check_epoch_tensor(const at::Tensor& epoch, const at::Device& device, const char* where) {
  TORCH_CHECK(epoch.defined() && epoch.scalar_type() == at::kLong && epoch.dim() == 0, where,
              ": epoch must be a 0-d int64 tensor (fastsel.rows.EpochRows.epoch, or torch.tensor(epoch)), got ",
              epoch.defined() ? dtype_name(epoch.scalar_type()) : "undefined", " of shape ",
              epoch.defined() ? epoch.sizes() : at::IntArrayRef{});
  TORCH_CHECK(epoch.device() == device, where, ": epoch is on ", epoch.device(), " but the inputs are on ", device,
              ": create it there (torch.tensor(epoch, device=...)) or move it with .to(", device, ")");
}
}  // namespace

RowsView rows_view(const std::optional<at::Tensor>& member, const std::optional<at::Tensor>& rows,
                   const at::Tensor& epoch, int64_t n, const at::Device& device, const char* where) {
  TORCH_CHECK(member.has_value() == rows.has_value(), where,
              ": member and rows are given together (the epoch's rows: fastsel.rows.EpochRows.args()) or both "
              "None (every row counts); got member ",
              member.has_value() ? "given" : "None", " and rows ", rows.has_value() ? "given" : "None");
  check_epoch_tensor(epoch, device, where);
  if (!member.has_value()) return RowsView{nullptr, nullptr};
  const at::Tensor& m = *member;
  const at::Tensor& r = *rows;
  TORCH_CHECK(m.scalar_type() == at::kByte && m.dim() == 1 && m.size(0) == n + 1 && m.is_contiguous(), where,
              ": member must be a contiguous uint8 vector of N + 1 = ", n + 1,
              " entries (the epoch's selection as a mask, as long as the state's buffers), got ",
              dtype_name(m.scalar_type()), " of shape ", m.sizes(), "; build it with fastsel.rows.EpochRows(N)");
  TORCH_CHECK(r.scalar_type() == at::kLong && r.dim() == 1 && r.size(0) == layout::ROW_SIZE && r.is_contiguous(),
              where, ": rows must be a contiguous int64 vector of ", layout::ROW_SIZE,
              " entries (the slots ROW_* of fastsel/layout.py), got ", dtype_name(r.scalar_type()), " of shape ",
              r.sizes(), "; build it with fastsel.rows.EpochRows(N)");
  TORCH_CHECK(m.device() == device && r.device() == device, where, ": member is on ", m.device(), " and rows on ",
              r.device(), " but the inputs and the state are on ", device, "; move them with EpochRows.to(", device,
              ")");
  return RowsView{m.const_data_ptr<uint8_t>(), r.data_ptr<int64_t>()};
}

int64_t host_epoch(const at::Tensor& epoch, const at::Device& device, const char* where) {
  check_epoch_tensor(epoch, device, where);
  TORCH_INTERNAL_ASSERT(device.is_cpu(), where, ": host_epoch reads a CPU tensor");
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
