// Declarations of the CPU ops of fastsel._C (defined in cpu_step.cpp and cpu_select.cpp).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace fastsel {

// Metadata checks shared by the CPU and CUDA steps (dtype, shape, contiguity, device).
void check_step_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& indices,
                       const c10::optional<at::Tensor>& class_weight, const char* where, bool want_cpu);

// The fused step. Returns (loss, grad, strict_errors): in strict mode with a bad index or
// label, nothing is written and only strict_errors (counts and one value each, as
// state.errors) is defined; otherwise grad is d(loss)/d(logits) for a grad_output of 1
// (per row for reduction "none"), undefined unless need_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_step(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& indices,
    const at::Tensor& loss_buf, const at::Tensor& var_buf, const at::Tensor& p_buf,
    const at::Tensor& seen_buf, const at::Tensor& last_buf, const at::Tensor& weight_buf,
    const at::Tensor& stats, const at::Tensor& errors, const c10::optional<at::Tensor>& class_weight,
    int64_t n, int64_t ignore_index, double label_smoothing, double ema, int64_t reduction,
    bool strict, int64_t epoch, bool need_grad);

// Stable ascending sort of (key, val) pairs by key (LSD radix, 11-bit digits; equal keys
// keep their input order). Defined in cpu_select.cpp.
void radix_sort_pairs(std::vector<uint32_t>& key, std::vector<uint32_t>& val);

at::Tensor cpu_select(const at::Tensor& keys, int64_t k);
at::Tensor cpu_uniform(const at::Tensor& idx, int64_t key, int64_t stream);
at::Tensor cpu_shuffle(const at::Tensor& chosen, int64_t key);

// Sets the number of ATen intra-op threads for ops the calling thread launches (OpenMP
// backend; other threads keep theirs) and returns the previous number. Defined in
// cpu_threads.cpp.
int64_t set_local_num_threads(int64_t n);

}  // namespace fastsel
