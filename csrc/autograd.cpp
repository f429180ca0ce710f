// The autograd of fastsel::ce_step_csrc and fastsel::observe_csrc, on every device their
// kernels run on (CPU here, CUDA in cuda_glue.cpp): kernels at the Autograd key, each a
// torch::autograd::Function, so that a loss call and its backward run no Python (the
// reference and Triton ops keep fastsel/ops.py's Python registration, PYTHON_AUTOGRAD).
//
// The formulas are fastsel/ops.py's _ce_step_backward and _observe_backward, operation for
// operation (a test compares them bit for bit; on CUDA, ce_step's is one kernel of the same
// roundings, cuda_scale_grad). The forward redispatches below autograd to
// the op's kernel (or, while traced, to functionalization and the fake kernel); grad and
// grad_scale (ce_step) and row_scale (observe) are outputs without a gradient. A call whose
// first input does not require grad, or with grad mode off, goes straight through.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <tuple>

#include "layout.h"
#include "ops.h"

namespace fastsel {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Whether t is a float32 0-d tensor in host memory holding 1 and needing no gradient, read now
// (a plain eager backward: no tensor subclass, functional or traced stand-in, no dispatch
// mode), as ops.py's _eager_ones. Its data is read directly, not with .item(), so that the usual
// loss.backward() dispatches no aten op of its own.
bool host_one(const at::Tensor& t) {
  // The keys of a plain CPU tensor; any other (Python, Functionalize, a functorch wrapper,
  // a lazy negation) makes its stored data a stand-in, and the formula then runs as is.
  constexpr c10::DispatchKeySet plain_cpu({c10::DispatchKey::CPU, c10::DispatchKey::AutogradCPU,
                                           c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutocastCPU});
  return t.defined() && t.dim() == 0 && t.scalar_type() == at::kFloat && t.device().is_cpu() &&
         !t.requires_grad() && (t.key_set() | plain_cpu) == plain_cpu && t.has_storage() &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0 && *t.const_data_ptr<float>() == 1.0f;
}

// Whether t is a plain eager CUDA tensor (no tensor subclass, functional or traced stand-in,
// lazy negation, functorch wrapper; no dispatch mode active): its memory holds its values, so
// a kernel may read and write it directly.
bool plain_cuda(const at::Tensor& t) {
  constexpr c10::DispatchKeySet plain({c10::DispatchKey::CUDA, c10::DispatchKey::AutogradCUDA,
                                       c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutocastCUDA});
  return t.defined() && t.is_cuda() && (t.key_set() | plain) == plain && t.has_storage() &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0;
}

// ---- ce_step ------------------------------------------------------------------------------------

// The op's kernel below autograd on the call's other arguments: how each Function's forward,
// and a call that needs no graph, reaches it.
using CeStepBelow = std::function<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&)>;

struct CeStepFunction : public torch::autograd::Function<CeStepFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const CeStepBelow* below,
                               int64_t reduction) {
    ctx->set_materialize_grads(false);
    auto [out, grad, scale] = (*below)(logits);
    ctx->saved_data["per_row"] = reduction == layout::REDUCTION_NONE;
    ctx->save_for_backward({grad, scale});
    ctx->mark_non_differentiable({grad, scale});
    return {out, grad, scale};
  }

  // d(out)/d(logits) = grad * (g_out * grad_scale), per row for "none"; the usual
  // loss.backward() (g_out and grad_scale both a host 1) returns grad itself: no copy. On
  // CUDA (g_out and grad_scale device tensors) one launch, cuda_scale_grad's kernel, bit for
  // bit the formula, where every tensor is a plain eager one and no graph of the backward is
  // built (create_graph with a g_out that requires grad); the formula otherwise.
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const at::Tensor& g_out = g[0];
    if (!g_out.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad = saved[0];
    const at::Tensor& scale = saved[1];
    const bool per_row = ctx->saved_data["per_row"].toBool();
    if (!per_row && host_one(g_out) && host_one(scale)) return {grad, at::Tensor(), at::Tensor()};
    if (grad.is_cuda()) {
      const ScaleGradFn fused = cuda_scale_grad();
      if (fused != nullptr && plain_cuda(grad) && plain_cuda(g_out) && plain_cuda(scale) &&
          !(at::GradMode::is_enabled() && g_out.requires_grad())) {
        at::Tensor gi = fused(grad, g_out, scale, per_row);
        if (gi.defined()) return {gi, at::Tensor(), at::Tensor()};
      }
    }
    at::Tensor s = g_out.to(at::kFloat) * scale;
    if (per_row) s = s.unsqueeze(1);
    at::Tensor gi = grad.scalar_type() == at::kFloat ? grad * s : (grad.to(at::kFloat) * s).to(grad.scalar_type());
    return {gi, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_step_autograd(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& indices, at::Tensor& state_loss,
    at::Tensor& state_loss_var, at::Tensor& state_p_true, at::Tensor& state_seen, at::Tensor& state_last_epoch,
    const at::Tensor& state_weight, at::Tensor& stats, at::Tensor& errors, const std::optional<at::Tensor>& member,
    const std::optional<at::Tensor>& rows, const at::Tensor& epoch, const std::optional<at::Tensor>& class_weight,
    int64_t ignore_index, double label_smoothing, double ema, int64_t reduction, bool strict, bool update,
    bool need_grad) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastsel::ce_step_csrc", "").typed<CeStepFn>();
  const CeStepBelow below = [&](const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, target, indices, state_loss, state_loss_var, state_p_true, state_seen, state_last_epoch,
                   state_weight, stats, errors, member, rows, epoch, class_weight, ignore_index, label_smoothing,
                   ema, reduction, strict, update, need_grad);
  };
  if (!(at::GradMode::is_enabled() && logits.requires_grad())) return below(logits);
  const variable_list r = CeStepFunction::apply(logits, &below, reduction);
  return {r[0], r[1], r[2]};
}

// ---- observe ------------------------------------------------------------------------------------

using ObserveBelow = std::function<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>;

struct ObserveFunction : public torch::autograd::Function<ObserveFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& losses, const ObserveBelow* below) {
    ctx->set_materialize_grads(false);
    auto [out, row_scale] = (*below)(losses);
    ctx->saved_data["dtype"] = losses.scalar_type();
    ctx->save_for_backward({row_scale});
    ctx->mark_non_differentiable({row_scale});
    return {out, row_scale};
  }

  // d(out)/d(losses) = g_out * row_scale in float32, in the losses' dtype (a cast only where
  // the dtype differs: float32 losses take one op).
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const at::Tensor& g_out = g[0];
    if (!g_out.defined()) return {at::Tensor(), at::Tensor()};
    const at::Tensor row_scale = ctx->get_saved_variables()[0];
    const at::ScalarType dtype = ctx->saved_data["dtype"].toScalarType();
    const at::Tensor gi = (g_out.scalar_type() == at::kFloat ? g_out : g_out.to(at::kFloat)) * row_scale;
    return {gi.scalar_type() == dtype ? gi : gi.to(dtype), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> observe_autograd(
    const at::Tensor& losses, const std::optional<at::Tensor>& probs, const at::Tensor& indices,
    at::Tensor& state_loss, at::Tensor& state_loss_var, at::Tensor& state_p_true, at::Tensor& state_seen,
    at::Tensor& state_last_epoch, const at::Tensor& state_weight, at::Tensor& stats, at::Tensor& errors,
    const std::optional<at::Tensor>& member, const std::optional<at::Tensor>& rows, const at::Tensor& epoch,
    double ema, int64_t reduction, bool strict, bool update) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastsel::observe_csrc", "").typed<ObserveFn>();
  const ObserveBelow below = [&](const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, probs, indices, state_loss, state_loss_var, state_p_true, state_seen, state_last_epoch,
                   state_weight, stats, errors, member, rows, epoch, ema, reduction, strict, update);
  };
  if (!(at::GradMode::is_enabled() && losses.requires_grad())) return below(losses);
  const variable_list r = ObserveFunction::apply(losses, &below);
  return {r[0], r[1]};
}

}  // namespace

ScaleGradFn& cuda_scale_grad() {
  static ScaleGradFn fn = nullptr;
  return fn;
}

}  // namespace fastsel

TORCH_LIBRARY_IMPL(fastsel, Autograd, m) {
  m.impl("ce_step_csrc", TORCH_FN(fastsel::ce_step_autograd));
  m.impl("observe_csrc", TORCH_FN(fastsel::observe_autograd));
}
