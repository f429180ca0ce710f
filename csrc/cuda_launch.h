// The launchers of the CUDA kernels (step_kernels.cu, select_kernels.cu): plain C++ types,
// raw device pointers and the stream as void* (a cudaStream_t), so the kernels' files need
// no torch header. The caller (cuda_glue.cpp) makes the inputs' device current first. Each
// launcher returns nullptr or the CUDA error message.
#pragma once
#include <cstdint>

namespace fastsel {
namespace cuda {

enum LogitsType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct StepArgs {
  // inputs
  const void* logits;      // [b, c], LogitsType
  int logits_type;
  const void* labels;      // [b], int64 or int32
  bool labels64;
  const void* indices;     // [b], int64 or int32
  bool indices64;
  const float* class_weight;  // [c] or nullptr
  int64_t b, c, n;
  int64_t ignore_index;
  float eps, one_minus_eps, ema, one_minus_ema;
  int reduction;           // fastsel::layout::REDUCTION_*
  bool strict;
  bool update;             // false: no state, stats or row-counter write (errors are still recorded)
  // which rows count (fastsel/ops.py "Which rows count"; read only with update): both nullptr,
  // or both given
  const uint8_t* member;   // [n + 1]: 0 = a sample the epoch did not select (a stray row)
  int64_t* row_counts;     // [layout::ROW_SIZE]: the epoch's row counters (ROW_*)
  const int64_t* epoch;    // 0-d, on the device: last_epoch's value, ROW_OVER_EPOCH's (a captured
                           // graph reads the epoch in progress at each replay)
  // per-sample state, n + 1 entries each
  float* loss;
  float* loss_var;
  float* p_true;
  int32_t* seen;
  int32_t* last_epoch;
  const float* weight;
  double* stats;           // [layout::STAT_SIZE]
  int64_t* errors;         // [layout::ERR_SIZE]
  // outputs
  void* grad;              // [b, c] in the logits' type, or nullptr: d(sum of per_row)/d(logits), unscaled
  float* per_row;          // [b] or nullptr: the reduction "none" output
  float* out;              // [1] or nullptr: the scalar of "mean" / "sum"
  float* grad_scale;       // [1]: what backward multiplies grad by: 1 / divisor for "mean", else 1
  int64_t* strict_errors;  // [kStrictSize] or nullptr (needed in strict mode): what the host raises (below)
};

// strict_errors (strict mode's one device-to-host copy): the error counters' slots
// (layout::ERR_*: counts and first values of the range errors), then the room and membership
// checks' figures. The host raises, in this order: the room error (S_OVER != 0), the stray
// rows (S_STRAY_COUNT != 0), the range errors; with any of them the step wrote nothing.
enum StrictSlot : int {
  S_OVER = 4,         // 1: the call was refused for room (no epoch, or past the shard)
  S_TRAINED = 5,      // rows[ROW_TRAINED] as the step read it
  S_SHARD = 6,        // rows[ROW_SHARD]
  S_STRAY_COUNT = 7,  // stray rows (in range, member[index] == 0)
  S_STRAY_FIRST = 8,  // the first one's sample, in row order
  S_EPOCH = 9,        // *epoch
  kStrictSize = 10
};

// The step's scratch. `ctl`, `slot` and `group` must hold zeros when a step starts; the step
// leaves them zero again (its last blocks and the owner rows reset what they used), so the
// caller zero-fills them once, when it allocates them. `rows` needs no initial value.
struct StepWork {
  void* ctl;        // step_ctl_bytes()
  uint32_t* slot;   // >= n entries: per sample, 0 or 1 + the row that owns it in this step
  void* group;      // step_group_bytes(b): per owner row, the sums of its sample's other rows
  void* rows;       // step_rows_bytes(b): per row, what the merge launch needs
};

int64_t step_ctl_bytes();
int64_t step_group_bytes(int64_t b);
int64_t step_rows_bytes(int64_t b);

// Two launches (one with update=false): rows, then merge + update.
const char* launch_step(const StepArgs& a, const StepWork& w, void* stream);

// The ce_step backward in one launch (step_kernels.cu): out[i] = grad[i] * (g * *scale) in
// float32, stored in grad's type, bit for bit fastsel/ops.py's _ce_step_backward formula. g is
// g_out[0] (mean, sum), or with per_row (reduction "none") the grad_output of entry i's row and
// position: grad is [b, c, d1..dk] contiguous (d = d1 * ... * dk, 1 for 2-D), entry
// i = (row * c + class) * d + pos, and g = g_out[row * g_row + pos * g_pos] (strides in
// elements, any: 0 for an expanded grad_output). g_out and scale are read on the device.
struct ScaleGradArgs {
  const void* grad;     // numel entries, LogitsType
  void* out;            // numel entries, grad's type
  int type;             // LogitsType
  int64_t numel;
  const float* g_out;   // 0-d, or per row as above
  const float* scale;   // 0-d
  bool per_row;
  int64_t c, d;         // per_row: classes, positions per row
  int64_t g_row, g_pos; // per_row: g_out's strides
};
const char* launch_scale_grad(const ScaleGradArgs& a, void* stream);

// Indices (int64) of the k largest float keys in rank order (+inf > finite > -inf > NaN, ties
// by lower index), 0 < k <= n < 2**32. Workspace: select_work_bytes(n, k), any content.
int64_t select_work_bytes(int64_t n, int64_t k);
const char* launch_select(const float* keys, int64_t n, int64_t k, int64_t* out, void* work, void* stream);

// fastsel.rng.uniform, bit-exact.
const char* launch_uniform(const void* idx, bool idx64, int64_t n, int64_t key, int64_t stream_id,
                           float* out, void* stream);

// ReferenceBackend.shuffle: chosen reordered by its STREAM_SHUFFLE uniforms (a stable sort, so
// equal uniforms keep chosen's order). Workspace: shuffle_work_bytes(m, chosen64), any content.
int64_t shuffle_work_bytes(int64_t m, bool chosen64);
const char* launch_shuffle(const void* chosen, bool chosen64, int64_t m, int64_t key, void* out,
                           void* work, void* stream);

}  // namespace cuda
}  // namespace fastsel
