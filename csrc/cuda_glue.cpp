// The CUDA kernels of torch.ops.fastsel.*_csrc (ce_step, select, uniform, shuffle),
// registered for the CUDA dispatch key. Each op checks its arguments (checks.cpp), makes
// the inputs' device current, takes that device's current stream, allocates its outputs
// and workspace through ATen (the caching allocator) and calls a launcher of
// step_kernels.cu / select_kernels.cu. Compiled only in a CUDA build (setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "cuda_launch.h"
#include "layout.h"
#include "ops.h"

namespace fastsel {
namespace {

void check_ok(const char* err, const char* where) {
  TORCH_CHECK(err == nullptr, where, ": CUDA error: ", err ? err : "");
}

int logits_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::kF32;
    case at::kHalf: return cuda::kF16;
    case at::kBFloat16: return cuda::kBF16;
    default: TORCH_CHECK(false, "fastsel: logits must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void* current_stream(const at::Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_step_cuda(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& indices, at::Tensor& state_loss,
    at::Tensor& state_loss_var, at::Tensor& state_p_true, at::Tensor& state_seen, at::Tensor& state_last_epoch,
    const at::Tensor& state_weight, at::Tensor& stats, at::Tensor& errors,
    const std::optional<at::Tensor>& class_weight, int64_t ignore_index, double label_smoothing, double ema,
    int64_t reduction, bool strict, int64_t epoch, bool update, bool need_grad) {
  const char* where = "fastsel::ce_step_csrc (CUDA)";
  const StepDims dims = check_step_args(logits, target, indices, class_weight, label_smoothing, ema, reduction,
                                        epoch, c10::DeviceType::CUDA, where);
  TORCH_CHECK(!dims.soft && logits.dim() == 2, where,
              ": the CUDA kernel takes class-index targets with 2-D logits [batch, classes]; got logits of shape ",
              logits.sizes(), " and a ", dims.soft ? "class-probability" : "class-index", " target of shape ",
              target.sizes(), ". Use fastsel's backends (they run the other target forms on "
              "torch.ops.fastsel.ce_step_reference) or call ce_step_reference");
  const StateView st = state_view(state_loss, state_loss_var, state_p_true, state_seen, state_last_epoch,
                                  state_weight, stats, errors, logits.device(), where);
  const int64_t n = st.n, b = dims.b, c = dims.c;
  TORCH_CHECK(n < (int64_t(1) << 32), where, ": the CUDA step takes at most 2**32 - 1 samples, got N = ", n);
  TORCH_CHECK(b < (int64_t(1) << 31), where, ": the CUDA step takes at most 2**31 - 1 rows, got ", b);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Device dev = logits.device();

  auto f32 = at::TensorOptions().device(dev).dtype(at::kFloat);
  at::Tensor per_row = at::empty({b}, f32);
  at::Tensor out = at::empty({}, f32);
  at::Tensor grad_scale = at::empty({}, f32);
  at::Tensor denom = at::empty({}, f32);
  at::Tensor strict_errors = at::empty({layout::ERR_SIZE}, f32.dtype(at::kLong));  // the kernel writes every slot
  at::Tensor grad = need_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  at::Tensor rows = at::empty({cuda::step_rows_bytes(b)}, f32.dtype(at::kByte));
  at::Tensor keys = at::empty({cuda::step_sort_len(b)}, f32.dtype(at::kLong));

  cuda::StepArgs a{};
  a.logits = logits.data_ptr();
  a.logits_type = logits_type(logits);
  a.labels = target.data_ptr();
  a.labels64 = target.scalar_type() == at::kLong;
  a.indices = indices.data_ptr();
  a.indices64 = indices.scalar_type() == at::kLong;
  a.class_weight = class_weight.has_value() ? class_weight->data_ptr<float>() : nullptr;
  a.b = b, a.c = c, a.n = n, a.ignore_index = ignore_index;
  a.eps = static_cast<float>(label_smoothing);
  a.one_minus_eps = static_cast<float>(1.0 - label_smoothing);
  a.ema = static_cast<float>(ema);
  a.one_minus_ema = static_cast<float>(1.0 - ema);
  a.reduction = static_cast<int>(reduction);
  a.strict = strict;
  a.update = update;
  a.epoch = static_cast<int32_t>(epoch);
  a.loss = st.loss;
  a.loss_var = st.loss_var;
  a.p_true = st.p_true;
  a.seen = st.seen;
  a.last_epoch = st.last_epoch;
  a.weight = st.weight;
  a.stats = st.stats;
  a.errors = st.errors;
  a.grad = need_grad ? grad.data_ptr() : nullptr;
  a.per_row = per_row.data_ptr<float>();
  a.out = out.data_ptr<float>();
  a.grad_scale = grad_scale.data_ptr<float>();
  a.strict_errors = strict_errors.data_ptr<int64_t>();
  a.denom = denom.data_ptr<float>();
  a.rows = rows.data_ptr();
  a.sort_keys = reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>());
  check_ok(cuda::launch_step(a, current_stream(logits)), where);
  if (strict) {
    // Strict mode checks at once: one sync, as the reference's. The kernel wrote nothing.
    const at::Tensor e = strict_errors.cpu();
    const int64_t* ev = e.const_data_ptr<int64_t>();
    raise_range_errors(ev[layout::ERR_INDEX_COUNT], ev[layout::ERR_INDEX_VALUE], ev[layout::ERR_LABEL_COUNT],
                       ev[layout::ERR_LABEL_VALUE], n, c);
  }
  return {reduction == layout::REDUCTION_NONE ? per_row : out, grad, grad_scale};
}

at::Tensor select_cuda(const at::Tensor& keys, int64_t k) {
  const char* where = "fastsel::select_csrc (CUDA)";
  TORCH_CHECK(keys.is_cuda(), where, ": keys must be on a CUDA device, got ", keys.device());
  TORCH_CHECK(keys.scalar_type() == at::kFloat && keys.dim() == 1 && keys.is_contiguous(), where,
              ": keys must be a contiguous 1-D float32 tensor, got ", keys.scalar_type(), " ", keys.sizes());
  const int64_t n = keys.size(0);
  TORCH_CHECK(n < (int64_t(1) << 32), where, ": at most 2**32 - 1 keys, got ", n);
  TORCH_CHECK(k >= 0 && k <= n, where, ": k must be in [0, ", n, "] (the number of keys), got ", k);
  const c10::cuda::CUDAGuard guard(keys.device());
  auto opt = keys.options();
  at::Tensor out = at::empty({k}, opt.dtype(at::kLong));
  if (k == 0) return out;
  at::Tensor work = at::empty({cuda::select_work_bytes(n, k)}, opt.dtype(at::kByte));
  check_ok(cuda::launch_select(keys.data_ptr<float>(), n, k, out.data_ptr<int64_t>(), work.data_ptr(),
                               current_stream(keys)),
           where);
  return out;
}

void check_index_vector(const at::Tensor& t, const char* where, const char* name) {
  TORCH_CHECK(t.is_cuda(), where, ": ", name, " must be on a CUDA device, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, where, ": ", name,
              " must be int64 or int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), where, ": ", name, " must be a contiguous 1-D tensor, got shape ",
              t.sizes());
}

at::Tensor uniform_cuda(const at::Tensor& idx, int64_t key, int64_t stream_id) {
  const char* where = "fastsel::uniform_csrc (CUDA)";
  check_index_vector(idx, where, "idx");
  const c10::cuda::CUDAGuard guard(idx.device());
  at::Tensor out = at::empty({idx.size(0)}, idx.options().dtype(at::kFloat));
  check_ok(cuda::launch_uniform(idx.data_ptr(), idx.scalar_type() == at::kLong, idx.size(0), key, stream_id,
                                out.data_ptr<float>(), current_stream(idx)),
           where);
  return out;
}

at::Tensor shuffle_cuda(const at::Tensor& chosen, int64_t key) {
  const char* where = "fastsel::shuffle_csrc (CUDA)";
  check_index_vector(chosen, where, "chosen");
  const int64_t m = chosen.size(0);
  TORCH_CHECK(m < (int64_t(1) << 32), where, ": at most 2**32 - 1 entries, got ", m);
  const c10::cuda::CUDAGuard guard(chosen.device());
  at::Tensor out = at::empty_like(chosen);
  if (m == 0) return out;
  at::Tensor work = at::empty({cuda::shuffle_work_bytes(m)}, chosen.options().dtype(at::kByte));
  check_ok(cuda::launch_shuffle(chosen.data_ptr(), chosen.scalar_type() == at::kLong, m, key, out.data_ptr(),
                                work.data_ptr(), current_stream(chosen)),
           where);
  return out;
}

}  // namespace
}  // namespace fastsel

TORCH_LIBRARY_IMPL(fastsel, CUDA, m) {
  m.impl("ce_step_csrc", TORCH_FN(fastsel::ce_step_cuda));
  m.impl("select_csrc", TORCH_FN(fastsel::select_cuda));
  m.impl("uniform_csrc", TORCH_FN(fastsel::uniform_cuda));
  m.impl("shuffle_csrc", TORCH_FN(fastsel::shuffle_cuda));
}
