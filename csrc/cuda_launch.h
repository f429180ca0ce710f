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
  bool update;             // false: no state or stats write (errors are still recorded)
  int32_t epoch;
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
  void* grad;              // [b, c] in the logits' type, or nullptr: d(per_row)/d(logits)
  float* per_row;          // [b]: the reduction "none" output
  float* out;              // [1]: the scalar for "mean" / "sum"
  float* grad_scale;       // [1]: what backward multiplies grad by: 1 / denom for "mean", else 1
  int64_t* strict_errors;  // [layout::ERR_SIZE]: in strict mode, counts and first values; state untouched if any
  // workspace
  float* denom;            // [1]: sum of class weights of active rows (the mean's divisor)
  void* rows;              // step_rows_bytes(b)
  uint64_t* sort_keys;     // step_sort_len(b) entries
};

int64_t step_rows_bytes(int64_t b);
int64_t step_sort_len(int64_t b);

const char* launch_step(const StepArgs& a, void* stream);

// Indices (int64) of the k largest float keys, ties by lower index, NaN as -inf.
// Workspace: select_work_bytes(n, k).
int64_t select_work_bytes(int64_t n, int64_t k);
const char* launch_select(const float* keys, int64_t n, int64_t k, int64_t* out, void* work, void* stream);

// fastsel.rng.uniform, bit-exact.
const char* launch_uniform(const void* idx, bool idx64, int64_t n, int64_t key, int64_t stream_id,
                           float* out, void* stream);

// ReferenceBackend.shuffle: chosen reordered by its STREAM_SHUFFLE uniforms.
// Workspace: shuffle_work_bytes(m).
int64_t shuffle_work_bytes(int64_t m);
const char* launch_shuffle(const void* chosen, bool chosen64, int64_t m, int64_t key, void* out,
                           void* work, void* stream);

}  // namespace cuda
}  // namespace fastsel
