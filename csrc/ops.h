// Declarations shared by the C++ and CUDA kernels of fastsel._C: the ops of fastsel/ops.py's
// schemas (registered with TORCH_LIBRARY_IMPL in bindings.cpp and cuda_glue.cpp, their
// autograd in autograd.cpp), their argument checks and strict-mode errors, the state's
// buffers and the epoch's rows as raw pointers, which rows count on the CPU, and the
// per-sample state update.
#pragma once
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "layout.h"

namespace fastsel {

// ---- the ops (C++ signatures of fastsel.ops.SCHEMAS) -------------------------------------------
// The dispatcher compares the C++ signatures of an op's kernels (a mismatch fails when the
// extension loads), so the CUDA kernels (cuda_glue.cpp) and the autograd kernels
// (autograd.cpp) take exactly these types: the state buffers written as `at::Tensor&`,
// `member`, `rows` and `class_weight` as `const std::optional<at::Tensor>&`, `epoch` (a 0-d
// int64 tensor) as `const at::Tensor&`.

// fastsel::ce_step_csrc on the CPU: every F.cross_entropy target (class indices [B] or
// [B, d1..dk], class probabilities of the logits' shape). Returns (out, grad, grad_scale):
// grad is d(out)/d(logits), already scaled by the reduction, so grad_scale holds 1; grad is
// empty ([0]) unless need_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_step_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& indices, at::Tensor& state_loss,
    at::Tensor& state_loss_var, at::Tensor& state_p_true, at::Tensor& state_seen, at::Tensor& state_last_epoch,
    const at::Tensor& state_weight, at::Tensor& stats, at::Tensor& errors, const std::optional<at::Tensor>& member,
    const std::optional<at::Tensor>& rows, const at::Tensor& epoch, const std::optional<at::Tensor>& class_weight,
    int64_t ignore_index, double label_smoothing, double ema, int64_t reduction, bool strict, bool update,
    bool need_grad);
using CeStepFn = decltype(ce_step_cpu);

// fastsel::observe_csrc on the CPU: per-sample losses of any loss into the state. Returns
// (out, row_scale): the policy-weighted reduction and d(out)/d(losses) per row.
std::tuple<at::Tensor, at::Tensor> observe_cpu(
    const at::Tensor& losses, const std::optional<at::Tensor>& probs, const at::Tensor& indices,
    at::Tensor& state_loss, at::Tensor& state_loss_var, at::Tensor& state_p_true, at::Tensor& state_seen,
    at::Tensor& state_last_epoch, const at::Tensor& state_weight, at::Tensor& stats, at::Tensor& errors,
    const std::optional<at::Tensor>& member, const std::optional<at::Tensor>& rows, const at::Tensor& epoch,
    double ema, int64_t reduction, bool strict, bool update);
using ObserveFn = decltype(observe_cpu);

// ce_step's backward on CUDA in one launch, grad * (g_out * scale) (per row with per_row), or
// an undefined tensor where that kernel does not take these tensors (autograd.cpp then runs the
// generic formula). Null unless the CUDA part is built: cuda_glue.cpp sets it when the
// extension loads; defined in autograd.cpp, so the CPU build needs no CUDA symbol.
using ScaleGradFn = at::Tensor (*)(const at::Tensor& grad, const at::Tensor& g_out, const at::Tensor& scale,
                                   bool per_row);
ScaleGradFn& cuda_scale_grad();

// fastsel::select_csrc, uniform_csrc, shuffle_csrc on the CPU (cpu_select.cpp).
at::Tensor cpu_select(const at::Tensor& keys, int64_t k);
at::Tensor cpu_uniform(const at::Tensor& idx, int64_t key, int64_t stream);
at::Tensor cpu_shuffle(const at::Tensor& chosen, int64_t key);

// A new CPU tensor without a trip through the dispatcher (as at::empty would take): the
// CPU kernels allocate their outputs with it, so a small call pays no dispatch for them.
inline at::Tensor cpu_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, std::nullopt);
}

// A CPU float32 0-d tensor holding v (at::scalar_tensor without the dispatch).
inline at::Tensor cpu_scalar(float v) {
  at::Tensor t = cpu_empty({}, at::kFloat);
  *t.data_ptr<float>() = v;
  return t;
}

// ---- argument checks (checks.cpp) ---------------------------------------------------------------

// The step's shapes: batch, classes, positions per sample (d1 * ... * dk, 1 for 2-D logits),
// whether the target holds class probabilities, and the state's N.
struct StepDims {
  int64_t b, c, d;
  bool soft;
  int64_t n;
};

// Every metadata fault of a direct call (fastsel/validation/faults.py, via faults.h: the
// reference and triton ops raise the same exception with the same message, checking in the
// same order): the inputs, the settings, the state's tensors, member, rows and the 0-d epoch,
// all on the inputs' device. No value is read, but a CPU epoch's (it must fit last_epoch's
// int32), so no device sync.
StepDims check_ce_step_call(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& indices,
                            const at::Tensor& state_loss, const at::Tensor& state_loss_var,
                            const at::Tensor& state_p_true, const at::Tensor& state_seen,
                            const at::Tensor& state_last_epoch, const at::Tensor& state_weight,
                            const at::Tensor& stats, const at::Tensor& errors,
                            const std::optional<at::Tensor>& member, const std::optional<at::Tensor>& rows,
                            const at::Tensor& epoch, const std::optional<at::Tensor>& class_weight,
                            double label_smoothing, double ema, int64_t reduction);

// The same for observe; returns the batch size.
int64_t check_observe_call(const at::Tensor& losses, const std::optional<at::Tensor>& probs,
                           const at::Tensor& indices, const at::Tensor& state_loss,
                           const at::Tensor& state_loss_var, const at::Tensor& state_p_true,
                           const at::Tensor& state_seen, const at::Tensor& state_last_epoch,
                           const at::Tensor& state_weight, const at::Tensor& stats, const at::Tensor& errors,
                           const std::optional<at::Tensor>& member, const std::optional<at::Tensor>& rows,
                           const at::Tensor& epoch, double ema, int64_t reduction);

// The full check of a state's tensors (dtype, shape, contiguity, one device), with messages
// that name the buffer, its value and the fix. fastsel calls it (as fastsel._C.check_state)
// once when a state is bound to a backend or moved, not on every step.
void check_state(const at::Tensor& loss, const at::Tensor& loss_var, const at::Tensor& p_true,
                 const at::Tensor& seen, const at::Tensor& last_epoch, const at::Tensor& weight,
                 const at::Tensor& stats, const at::Tensor& errors);

// The state's buffers as raw pointers; n = the buffers' length - 1 (the scratch slot).
struct StateView {
  float* loss;
  float* loss_var;
  float* p_true;
  int32_t* seen;
  int32_t* last_epoch;
  const float* weight;
  double* stats;
  int64_t* errors;
  int64_t n;
};

// The view an op works on, after its call check: a guard of a few field comparisons so that
// a state that does not fit can never be written out of bounds.
StateView state_view(const at::Tensor& loss, const at::Tensor& loss_var, const at::Tensor& p_true,
                     const at::Tensor& seen, const at::Tensor& last_epoch, const at::Tensor& weight,
                     const at::Tensor& stats, const at::Tensor& errors, const at::Device& device,
                     const char* where);

// The epoch's rows an op takes (fastsel/ops.py "Which rows count"): the selection mask
// `member` (uint8 [n + 1]) and the counters `rows` (int64 [layout::ROW_SIZE], slots ROW_*),
// both null when the op was given None for both (every row counts, nothing is counted).
struct RowsView {
  const uint8_t* member;
  int64_t* rows;
};

// Checks `member`, `rows` and `epoch` as the call checks do (member and rows given together,
// each contiguous, of its dtype and size, and epoch a 0-d int64 tensor, all on `device`, whose
// tensor `of` names in the messages); returns their data pointers.
RowsView rows_view(const std::optional<at::Tensor>& member, const std::optional<at::Tensor>& rows,
                   const at::Tensor& epoch, int64_t n, const at::Device& device, const char* of);

// The value of a CPU op's epoch, read on the host once the call check has passed.
int64_t host_epoch(const at::Tensor& epoch, const at::Device& device, const char* where);

// Strict mode's ValueErrors of "Which rows count", in fastsel/rows.py's words (a test
// compares them with the reference ops'): no room for b more rows (shard < 0: no epoch in
// progress; else trained + b would pass the shard) = rows.room_message(b, epoch, trained,
// shard); `count` rows whose sample the epoch did not select, `first` the first one's sample
// in row order = rows.stray_message(count, epoch, first).
void raise_room(int64_t b, int64_t epoch, int64_t trained, int64_t shard);
void raise_stray(int64_t count, int64_t epoch, int64_t first);

// Strict mode: raises IndexError with fastsel.checks.raise_for_errors's message when a
// count is non-zero (indices first). num_classes < 0: observe, which takes no labels.
void raise_range_errors(int64_t bad_index_count, int64_t bad_index_value, int64_t bad_label_count,
                        int64_t bad_label_value, int64_t n, int64_t num_classes);

// Non-strict mode: adds the counts to state.errors and keeps the first offending values.
void record_range_errors(const StateView& s, int64_t bad_index_count, int64_t bad_index_value,
                         int64_t bad_label_count, int64_t bad_label_value);

// ---- which rows count, on the CPU (cpu_state.cpp) -------------------------------------------------

// One call's rows on the CPU, from host values (reference.py's admit_rows and commit_rows):
// the constructor does the room check (strict: raise_room, before anything is written); per
// row in [0, n) of a call with room, stray(i) says whether the epoch did not select sample i
// (and counts it); check() raises strict mode's stray error; commit() counts the call in
// `rows` once every check has passed (so after the range errors). Inert (every row counts,
// nothing is checked or counted) without rows or with update=false.
class CpuRows {
 public:
  CpuRows(const RowsView& v, int64_t b, int64_t epoch, bool strict, bool update);
  // The whole call is refused for room: every row left out, its range errors not recorded.
  bool over() const { return over_; }
  bool stray(int64_t i) {
    if (member_ == nullptr || member_[i] != 0) return false;
    if (n_stray_++ == 0) first_stray_ = i;
    return true;
  }
  void check() const;
  void commit() const;

 private:
  const uint8_t* member_ = nullptr;  // null: no membership check (inert, or over)
  int64_t* rows_ = nullptr;          // null: inert
  int64_t b_, epoch_;
  bool strict_, over_ = false;
  int64_t n_stray_ = 0, first_stray_ = 0;
};

// ---- the per-sample state update (cpu_state.cpp) ------------------------------------------------

// One batch row's observation of its sample: idx in [0, n), finite loss and p.
struct RowObs {
  int64_t idx;
  float loss;
  float p;
};

// Folds a batch's observations (in row order) into the state, as every backend does: the
// rows of one sample are one observation of their mean loss and mean p (float64 sums in row
// order), seen += rows, p_true a running mean weighted by that count, loss EMA and EW
// variance, last_epoch = epoch; stats gets the epoch sums and `nonfinite` (active rows whose
// observation was NaN/inf and so left out).
void fold_observations(const StateView& s, std::vector<RowObs>& obs, int64_t nonfinite, int64_t epoch,
                       double ema);

// Stable ascending sort of (key, val) pairs by key (LSD radix, 11-bit digits; equal keys
// keep their input order). Defined in cpu_select.cpp.
void radix_sort_pairs(std::vector<uint32_t>& key, std::vector<uint32_t>& val);

// Sets the number of ATen intra-op threads for ops the calling thread launches (OpenMP
// backend; other threads keep theirs) and returns the previous number. Defined in
// cpu_threads.cpp.
int64_t set_local_num_threads(int64_t n);

}  // namespace fastsel
