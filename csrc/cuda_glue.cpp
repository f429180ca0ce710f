// The CUDA kernels of torch.ops.fastsel.*_csrc (ce_step, select, uniform, shuffle),
// registered for the CUDA dispatch key. Each op checks its arguments' metadata (checks.cpp;
// the state's tensors are checked in full once, by fastsel._C.check_state, not per call),
// makes the inputs' device current, takes that device's current stream, allocates its outputs
// through ATen (the caching allocator) and calls a launcher of step_kernels.cu /
// select_kernels.cu. No Python runs per call and, except strict mode's checks, nothing
// waits for the device. Compiled only in a CUDA build (setup.py).
//
// Which rows count (fastsel/ops.py): the step's two launches themselves read the epoch's row
// counters (`rows`), the selection mask (`member`) and the epoch (a 0-d tensor) from device
// memory, leave out a call without room and the stray rows, and count them in `rows`; no
// extra launch and no host read. Strict mode reads one small block back (one sync, the same
// one as its range check) and raises, in this order, the room error, the stray rows, the
// range errors; the kernels then wrote nothing.
//
// The step's scratch (a per-sample int32 slot array, per-row group sums, counters) is cached
// per device and allocated zeroed once. Invariant: `ctl`, `slot` and `group` hold zeros
// between steps (every step leaves them as it found them: launch 1's last block resets its
// counters, launch 2's last block the ones it was handed, each owner row its slot and group
// entry; with update=False nothing but launch 1's own counters is used), so a step launches
// no fill; `rows` (per-row records) is written before it is read and needs no value. Only a
// failed launch breaks the invariant: the scratch is then marked dirty and zeroed (eagerly)
// before the next step. A step with strict=False allocates nothing but its outputs and syncs
// nothing, so it can be captured in a CUDA graph once an eager call (the warm-up
// torch.cuda.graphs asks for) has sized the scratch; a replay reads the epoch, the mask and
// the counters in place, so one graph serves every epoch (EpochRows changes them in place).
// Buffers outgrown by a larger batch or N are kept alive (a captured graph may still point at
// them). Eager steps on another stream than the previous one first wait for that stream (an
// event), so two streams never share the scratch at once; a graph replay is ordered only on
// its own stream, as any graph.
#include <ATen/ATen.h>
#include <ATen/TensorUtils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

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

// ---- the step's cached scratch ------------------------------------------------------------------

struct StepScratch {
  at::Tensor ctl, slot, group, rows;        // bytes; ctl, slot and group zero between steps
  std::vector<at::Tensor> retired;          // outgrown buffers, kept for graphs captured with them
  bool dirty = false;                       // a launch failed: zero it again before the next step
  std::optional<c10::cuda::CUDAStream> last;  // the stream of the last eager step
  cudaEvent_t done = nullptr;               // recorded on `last` when another stream takes over
};

std::mutex g_scratch_mutex;
std::map<int, StepScratch> g_scratch;  // by device index; map nodes never move

// buf with at least `bytes` bytes (zero-filled when new, if `zeroed`); `grow` sizes a new
// buffer at twice the old one, so a slowly growing batch reallocates rarely.
void fit(at::Tensor& buf, int64_t bytes, bool zeroed, bool grow, const at::Device& dev,
         std::vector<at::Tensor>& retired) {
  if (buf.defined() && buf.numel() >= bytes) return;
  int64_t size = bytes;
  if (buf.defined()) {
    if (grow) size = std::max(bytes, 2 * buf.numel());
    retired.push_back(buf);
  }
  const auto opt = at::TensorOptions().device(dev).dtype(at::kByte);
  buf = zeroed ? at::zeros({size}, opt) : at::empty({size}, opt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_step_cuda(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& indices, at::Tensor& state_loss,
    at::Tensor& state_loss_var, at::Tensor& state_p_true, at::Tensor& state_seen, at::Tensor& state_last_epoch,
    const at::Tensor& state_weight, at::Tensor& stats, at::Tensor& errors, const std::optional<at::Tensor>& member,
    const std::optional<at::Tensor>& rows, const at::Tensor& epoch, const std::optional<at::Tensor>& class_weight,
    int64_t ignore_index, double label_smoothing, double ema, int64_t reduction, bool strict, bool update,
    bool need_grad) {
  const char* where = "fastsel::ce_step_csrc (CUDA)";
  const StepDims dims = check_ce_step_call(logits, target, indices, state_loss, state_loss_var, state_p_true,
                                           state_seen, state_last_epoch, state_weight, stats, errors, member, rows,
                                           epoch, class_weight, label_smoothing, ema, reduction);
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
  const at::Device dev = logits.device();
  const RowsView rv = rows_view(member, rows, epoch, n, dev, where);  // metadata only: no sync
  const c10::cuda::CUDAGuard guard(dev);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(dev.index());

  auto f32 = at::TensorOptions().device(dev).dtype(at::kFloat);
  const bool none = reduction == layout::REDUCTION_NONE;
  at::Tensor out = none ? at::empty({b}, f32) : at::empty({}, f32);
  at::Tensor grad_scale = at::empty({}, f32);
  at::Tensor grad = need_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  at::Tensor strict_errors;  // the kernel writes every slot
  if (strict) strict_errors = at::empty({cuda::kStrictSize}, f32.dtype(at::kLong));

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
  a.member = rv.member;
  a.row_counts = rv.rows;
  a.epoch = epoch.const_data_ptr<int64_t>();
  a.loss = st.loss;
  a.loss_var = st.loss_var;
  a.p_true = st.p_true;
  a.seen = st.seen;
  a.last_epoch = st.last_epoch;
  a.weight = st.weight;
  a.stats = st.stats;
  a.errors = st.errors;
  a.grad = need_grad ? grad.data_ptr() : nullptr;
  a.per_row = none ? out.data_ptr<float>() : nullptr;
  a.out = none ? nullptr : out.data_ptr<float>();
  a.grad_scale = grad_scale.data_ptr<float>();
  a.strict_errors = strict ? strict_errors.data_ptr<int64_t>() : nullptr;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  TORCH_CHECK(cudaStreamIsCapturing(stream.stream(), &capture) == cudaSuccess, where, ": cudaStreamIsCapturing failed");
  {
    const std::lock_guard<std::mutex> lock(g_scratch_mutex);
    StepScratch& s = g_scratch[static_cast<int>(dev.index())];
    const int64_t slot_bytes = 4 * std::max<int64_t>(n, 1);
    if (capture != cudaStreamCaptureStatusNone) {
      // Inside a capture nothing may be allocated or zeroed eagerly: the warm-up did it.
      TORCH_CHECK(s.ctl.defined() && !s.dirty && s.slot.numel() >= slot_bytes &&
                      s.group.numel() >= cuda::step_group_bytes(b) && s.rows.numel() >= cuda::step_rows_bytes(b),
                  where, ": a CUDA graph capture of the step needs its scratch ready: run the step eagerly once "
                  "on this device (the warm-up torch.cuda.graphs asks for) with at least ", b,
                  " rows and a state of at least ", n, " samples, then capture it");
    } else {
      if (s.last.has_value() && *s.last != stream) {  // the previous stream may still be using it
        if (s.done == nullptr)
          TORCH_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming) == cudaSuccess, where,
                      ": cudaEventCreate failed");
        TORCH_CHECK(cudaEventRecord(s.done, s.last->stream()) == cudaSuccess &&
                        cudaStreamWaitEvent(stream.stream(), s.done, 0) == cudaSuccess,
                    where, ": could not order the step after the previous stream's");
      }
      s.last = stream;
      fit(s.ctl, cuda::step_ctl_bytes(), true, false, dev, s.retired);
      fit(s.slot, slot_bytes, true, false, dev, s.retired);
      fit(s.group, cuda::step_group_bytes(b), true, true, dev, s.retired);
      fit(s.rows, cuda::step_rows_bytes(b), false, true, dev, s.retired);
      if (s.dirty) {
        s.ctl.zero_();
        s.slot.zero_();
        s.group.zero_();
        s.dirty = false;
      }
    }
    cuda::StepWork w{s.ctl.data_ptr(), static_cast<uint32_t*>(s.slot.data_ptr()), s.group.data_ptr(),
                     s.rows.data_ptr()};
    const char* err = cuda::launch_step(a, w, static_cast<void*>(stream.stream()));
    if (err != nullptr) s.dirty = true;
    check_ok(err, where);
  }
  if (strict) {
    // Strict mode checks at once: one sync, as the reference's; with an error the kernels
    // wrote nothing. The reference's order: room, stray rows, ranges.
    const at::Tensor e = strict_errors.cpu();
    const int64_t* ev = e.const_data_ptr<int64_t>();
    if (ev[cuda::S_OVER] != 0) raise_room(b, ev[cuda::S_EPOCH], ev[cuda::S_TRAINED], ev[cuda::S_SHARD]);
    if (ev[cuda::S_STRAY_COUNT] != 0) raise_stray(ev[cuda::S_STRAY_COUNT], ev[cuda::S_EPOCH], ev[cuda::S_STRAY_FIRST]);
    raise_range_errors(ev[layout::ERR_INDEX_COUNT], ev[layout::ERR_INDEX_VALUE], ev[layout::ERR_LABEL_COUNT],
                       ev[layout::ERR_LABEL_VALUE], n, c);
  }
  return {out, grad, grad_scale};
}

// The dispatcher compares the kernels' C++ signatures (ops.h).
static_assert(std::is_same_v<decltype(ce_step_cuda), CeStepFn>, "ce_step_cuda must take ce_step_cpu's types");

// ce_step's backward on CUDA in one launch (ops.h, ScaleGradFn; autograd.cpp calls it for
// plain eager tensors): grad * (g_out * scale), g_out and scale read on the device (no sync).
// Undefined where the kernel does not take the tensors (autograd.cpp then runs the formula,
// which raises or broadcasts as it would): grad a contiguous float32 / float16 / bfloat16 CUDA
// tensor, g_out float32 on its device, 0-d (per_row: the shape of grad without its class dim,
// whose positions are one stride apart: contiguous or expanded), scale a 0-d float32 there.
at::Tensor scale_grad_cuda(const at::Tensor& grad, const at::Tensor& g_out, const at::Tensor& scale,
                           bool per_row) {
  const at::Device dev = grad.device();
  if (!grad.is_cuda() || !grad.is_contiguous() || g_out.device() != dev || scale.device() != dev ||
      g_out.scalar_type() != at::kFloat || scale.scalar_type() != at::kFloat || scale.dim() != 0)
    return {};
  int type;
  switch (grad.scalar_type()) {
    case at::kFloat: type = cuda::kF32; break;
    case at::kHalf: type = cuda::kF16; break;
    case at::kBFloat16: type = cuda::kBF16; break;
    default: return {};
  }
  cuda::ScaleGradArgs a{};
  a.type = type;
  a.numel = grad.numel();
  a.per_row = per_row;
  a.c = a.d = 1;
  if (per_row) {
    if (grad.dim() < 2) return {};
    // g_out is [b, d1..dk]: grad's shape without dim 1.
    std::vector<int64_t> rows(grad.sizes().begin(), grad.sizes().end());
    rows.erase(rows.begin() + 1);
    if (g_out.sizes() != at::IntArrayRef(rows)) return {};
    const int64_t b = rows[0];
    int64_t d = 1;
    for (size_t j = 1; j < rows.size(); ++j) d *= rows[j];
    const std::vector<int64_t> flat{b, d};
    const auto strides = at::detail::computeStride(g_out.sizes(), g_out.strides(), at::IntArrayRef(flat));
    if (!strides.has_value()) return {};  // positions not one stride apart (the formula handles it)
    a.c = grad.size(1);
    a.d = d;
    a.g_row = (*strides)[0];
    a.g_pos = (*strides)[1];
  } else if (g_out.dim() != 0) {
    return {};
  }
  at::Tensor out = at::empty_like(grad);
  if (a.numel == 0) return out;
  const c10::cuda::CUDAGuard guard(dev);
  a.grad = grad.const_data_ptr();
  a.out = out.data_ptr();
  a.g_out = g_out.const_data_ptr<float>();
  a.scale = scale.const_data_ptr<float>();
  check_ok(cuda::launch_scale_grad(a, current_stream(grad)), "fastsel::ce_step_csrc backward (CUDA)");
  return out;
}

// Set when the extension loads (a CUDA build); autograd.cpp holds the pointer.
const bool g_scale_grad_set = (cuda_scale_grad() = &scale_grad_cuda, true);

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
  const bool c64 = chosen.scalar_type() == at::kLong;
  at::Tensor work = at::empty({cuda::shuffle_work_bytes(m, c64)}, chosen.options().dtype(at::kByte));
  check_ok(cuda::launch_shuffle(chosen.data_ptr(), c64, m, key, out.data_ptr(),
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
