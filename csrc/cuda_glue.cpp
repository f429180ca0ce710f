// Torch glue of the CUDA ops: checks every input (device, dtype, contiguity, shape),
// allocates outputs and workspace through ATen (so the caching allocator serves them),
// and calls the launchers of step_kernels.cu / select_kernels.cu. It includes no CUDA
// header: the stream comes from Python as torch.cuda.current_stream().cuda_stream.
// Compiled only in a CUDA build (setup.py), as it needs the launchers to link.
#include <torch/extension.h>

#include <tuple>

#include "cuda_launch.h"
#include "cuda_ops.h"
#include "ops.h"

namespace fastsel {
namespace {

void check_ok(const char* err, const char* where) {
  TORCH_CHECK(err == nullptr, where, ": CUDA error: ", err ? err : "");
}

void check_state(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t size,
                 const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, "fastsel._C.cuda_step: state buffer '", name, "' is on ", t.device(),
              " but logits is on ", dev);
  TORCH_CHECK(t.scalar_type() == dtype, "fastsel._C.cuda_step: state buffer '", name, "' must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size && t.is_contiguous(), "fastsel._C.cuda_step: state buffer '",
              name, "' must be contiguous and 1-D with ", size, " entries, got shape ", t.sizes());
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

void* as_stream(int64_t s) { return reinterpret_cast<void*>(static_cast<intptr_t>(s)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_step(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& indices, const at::Tensor& loss,
    const at::Tensor& loss_var, const at::Tensor& p_true, const at::Tensor& seen, const at::Tensor& last_epoch,
    const at::Tensor& weight, const at::Tensor& stats, const at::Tensor& errors,
    const c10::optional<at::Tensor>& class_weight, int64_t n, int64_t ignore_index, double label_smoothing,
    double ema, int64_t reduction, bool strict, int64_t epoch, bool need_grad, int64_t stream) {
  const char* where = "fastsel._C.cuda_step";
  check_step_inputs(logits, labels, indices, class_weight, where, /*want_cpu=*/false);
  TORCH_CHECK(n >= 1 && n < (int64_t(1) << 32), where, ": n must be in [1, 2**32), got ", n);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, where, ": reduction code must be 0, 1 or 2, got ", reduction);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, where, ": label_smoothing must be in [0, 1]");
  TORCH_CHECK(ema > 0.0 && ema <= 1.0, where, ": ema must be in (0, 1], got ", ema);
  TORCH_CHECK(epoch >= INT32_MIN && epoch <= INT32_MAX, where, ": epoch must fit in int32, got ", epoch);
  const int64_t b = logits.size(0), c = logits.size(1);
  TORCH_CHECK(b < (int64_t(1) << 31), where, ": at most 2**31 - 1 rows, got ", b);
  const at::Device dev = logits.device();
  check_state(loss, "loss", at::kFloat, n + 1, dev);
  check_state(loss_var, "loss_var", at::kFloat, n + 1, dev);
  check_state(p_true, "p_true", at::kFloat, n + 1, dev);
  check_state(seen, "seen", at::kInt, n + 1, dev);
  check_state(last_epoch, "last_epoch", at::kInt, n + 1, dev);
  check_state(weight, "weight", at::kFloat, n + 1, dev);
  check_state(stats, "stats", at::kDouble, 3, dev);
  check_state(errors, "errors", at::kLong, 4, dev);

  auto f32 = at::TensorOptions().device(dev).dtype(at::kFloat);
  at::Tensor per_row = at::empty({b}, f32);
  at::Tensor out = at::empty({}, f32);
  at::Tensor denom = at::empty({}, f32);
  at::Tensor strict_errors = at::zeros({4}, f32.dtype(at::kLong));
  at::Tensor grad = need_grad ? at::empty_like(logits) : at::Tensor();
  at::Tensor rows = at::empty({cuda::step_rows_bytes(b)}, f32.dtype(at::kByte));
  at::Tensor keys = at::empty({cuda::step_sort_len(b)}, f32.dtype(at::kLong));

  cuda::StepArgs a{};
  a.logits = logits.data_ptr();
  a.logits_type = logits_type(logits);
  a.labels = labels.data_ptr();
  a.labels64 = labels.scalar_type() == at::kLong;
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
  a.epoch = static_cast<int32_t>(epoch);
  a.loss = loss.data_ptr<float>();
  a.loss_var = loss_var.data_ptr<float>();
  a.p_true = p_true.data_ptr<float>();
  a.seen = seen.data_ptr<int32_t>();
  a.last_epoch = last_epoch.data_ptr<int32_t>();
  a.weight = weight.data_ptr<float>();
  a.stats = stats.data_ptr<double>();
  a.errors = errors.data_ptr<int64_t>();
  a.grad = need_grad ? grad.data_ptr() : nullptr;
  a.per_row = per_row.data_ptr<float>();
  a.out = out.data_ptr<float>();
  a.denom = denom.data_ptr<float>();
  a.strict_errors = strict_errors.data_ptr<int64_t>();
  a.rows = rows.data_ptr();
  a.sort_keys = reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>());
  check_ok(cuda::launch_step(a, dev.index(), as_stream(stream)), where);
  return {reduction == 2 ? per_row : out, grad, strict_errors, denom};
}

at::Tensor cuda_scale_grad(const at::Tensor& saved, const at::Tensor& g, bool per_row,
                           const c10::optional<at::Tensor>& denom, int64_t stream) {
  const char* where = "fastsel._C.cuda_scale_grad";
  TORCH_CHECK(saved.is_cuda() && saved.dim() == 2 && saved.is_contiguous(), where,
              ": saved gradient must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(g.device() == saved.device() && g.scalar_type() == at::kFloat && g.is_contiguous(), where,
              ": grad_output must be a contiguous float32 tensor on ", saved.device());
  TORCH_CHECK(per_row ? (g.dim() == 1 && g.size(0) == saved.size(0)) : g.numel() == 1, where,
              ": grad_output has shape ", g.sizes(), ", expected ", per_row ? "[batch]" : "a scalar");
  if (denom.has_value())
    TORCH_CHECK(denom->device() == saved.device() && denom->scalar_type() == at::kFloat && denom->numel() == 1,
                where, ": denom must be one float32 on ", saved.device());
  at::Tensor out = at::empty_like(saved);
  check_ok(cuda::launch_scale_grad(saved.data_ptr(), logits_type(saved), saved.size(0), saved.size(1),
                                   g.data_ptr<float>(), per_row,
                                   denom.has_value() ? denom->data_ptr<float>() : nullptr, out.data_ptr(),
                                   saved.device().index(), as_stream(stream)),
           where);
  return out;
}

at::Tensor cuda_select(const at::Tensor& keys, int64_t k, int64_t stream) {
  const char* where = "fastsel._C.cuda_select";
  TORCH_CHECK(keys.is_cuda(), where, ": keys must be on a CUDA device, got ", keys.device());
  TORCH_CHECK(keys.scalar_type() == at::kFloat && keys.dim() == 1 && keys.is_contiguous(), where,
              ": keys must be a contiguous 1-D float32 tensor, got ", keys.scalar_type(), " ", keys.sizes());
  const int64_t n = keys.size(0);
  TORCH_CHECK(n < (int64_t(1) << 32), where, ": at most 2**32 - 1 keys, got ", n);
  TORCH_CHECK(k >= 0 && k <= n, where, ": k must be in [0, ", n, "], got ", k);
  auto opt = keys.options();
  at::Tensor out = at::empty({k}, opt.dtype(at::kLong));
  if (k == 0) return out;
  at::Tensor work = at::empty({cuda::select_work_bytes(n, k)}, opt.dtype(at::kByte));
  check_ok(cuda::launch_select(keys.data_ptr<float>(), n, k, out.data_ptr<int64_t>(), work.data_ptr(),
                               keys.device().index(), as_stream(stream)),
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

at::Tensor cuda_uniform(const at::Tensor& idx, int64_t key, int64_t stream_id, int64_t stream) {
  const char* where = "fastsel._C.cuda_uniform";
  check_index_vector(idx, where, "idx");
  at::Tensor out = at::empty({idx.size(0)}, idx.options().dtype(at::kFloat));
  check_ok(cuda::launch_uniform(idx.data_ptr(), idx.scalar_type() == at::kLong, idx.size(0), key, stream_id,
                                out.data_ptr<float>(), idx.device().index(), as_stream(stream)),
           where);
  return out;
}

at::Tensor cuda_shuffle(const at::Tensor& chosen, int64_t key, int64_t stream) {
  const char* where = "fastsel._C.cuda_shuffle";
  check_index_vector(chosen, where, "chosen");
  const int64_t m = chosen.size(0);
  TORCH_CHECK(m < (int64_t(1) << 32), where, ": at most 2**32 - 1 entries, got ", m);
  at::Tensor out = at::empty_like(chosen);
  if (m == 0) return out;
  at::Tensor work = at::empty({cuda::shuffle_work_bytes(m)}, chosen.options().dtype(at::kByte));
  check_ok(cuda::launch_shuffle(chosen.data_ptr(), chosen.scalar_type() == at::kLong, m, key, out.data_ptr(),
                                work.data_ptr(), chosen.device().index(), as_stream(stream)),
           where);
  return out;
}

}  // namespace

void register_cuda_ops(pybind11::module& m) {
  m.def("cuda_step", &cuda_step, "fused cross-entropy + gradient + per-sample state update (CUDA)",
        py::call_guard<py::gil_scoped_release>());
  m.def("cuda_scale_grad", &cuda_scale_grad, "saved gradient x grad_output / denom (CUDA)",
        py::call_guard<py::gil_scoped_release>());
  m.def("cuda_select", &cuda_select, "indices of the k largest keys, ties by lower index (CUDA)",
        py::call_guard<py::gil_scoped_release>());
  m.def("cuda_uniform", &cuda_uniform, "fastsel.rng.uniform, bit-exact (CUDA)",
        py::call_guard<py::gil_scoped_release>());
  m.def("cuda_shuffle", &cuda_shuffle, "ReferenceBackend.shuffle, exact (CUDA)",
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace fastsel
