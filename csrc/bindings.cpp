// fastsel._C: the CPU kernels of the op family torch.ops.fastsel.*_csrc (the schemas are
// defined once, in Python, by fastsel/ops.py; here only their CPU implementations are
// registered, so the order in which fastsel.ops and fastsel._C load does not matter), and a
// few Python functions. The CUDA kernels register themselves in cuda_glue.cpp (CUDA build),
// the autograd kernels of ce_step_csrc and observe_csrc in autograd.cpp.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(fastsel, CPU, m) {
  m.impl("ce_step_csrc", TORCH_FN(fastsel::ce_step_cpu));
  m.impl("observe_csrc", TORCH_FN(fastsel::observe_cpu));
  m.impl("select_csrc", TORCH_FN(fastsel::cpu_select));
  m.impl("uniform_csrc", TORCH_FN(fastsel::cpu_uniform));
  m.impl("shuffle_csrc", TORCH_FN(fastsel::cpu_shuffle));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastsel's C++ (and, where built, CUDA) kernels of torch.ops.fastsel.*_csrc";
  m.def(
      "check_state",
      [](const at::Tensor& loss, const at::Tensor& loss_var, const at::Tensor& p_true, const at::Tensor& seen,
         const at::Tensor& last_epoch, const at::Tensor& weight, const at::Tensor& stats, const at::Tensor& errors,
         const std::optional<at::Tensor>& member, const std::optional<at::Tensor>& rows,
         const std::optional<at::Tensor>& epoch) {
        fastsel::check_state(loss, loss_var, p_true, seen, last_epoch, weight, stats, errors);
        if (epoch.has_value())
          fastsel::rows_view(member, rows, *epoch, loss.size(0) - 1, loss.device(), "state_loss");
      },
      "checks a state's tensors once (dtype, shape N + 1, contiguity, one device) and, given with them "
      "(fastsel.backends.base.state_args), the epoch's member, rows and epoch; raises naming the tensor, its "
      "value and the fix",
      py::arg("loss"), py::arg("loss_var"), py::arg("p_true"), py::arg("seen"), py::arg("last_epoch"),
      py::arg("weight"), py::arg("stats"), py::arg("errors"), py::arg("member") = py::none(),
      py::arg("rows") = py::none(), py::arg("epoch") = py::none());
  m.def("set_local_num_threads", &fastsel::set_local_num_threads,
        "ATen intra-op threads for the calling thread only; returns the previous number", py::arg("n"));
#ifdef FASTSEL_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
