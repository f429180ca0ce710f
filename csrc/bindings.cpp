// Python bindings of fastsel._C (the GIL is released while an op runs). The CUDA ops are registered only in a CUDA build
// (FASTSEL_WITH_CUDA, set by setup.py), whose glue lives in cuda_glue.cpp.
#include <torch/extension.h>

#include "ops.h"

#ifdef FASTSEL_WITH_CUDA
#include "cuda_ops.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastsel's fused per-sample loss step and selection pass (CPU, and CUDA where built)";
  m.def("step", &fastsel::cpu_step, "fused cross-entropy + gradient + per-sample state update (CPU)",
        py::arg("logits"), py::arg("labels"), py::arg("indices"), py::arg("loss"), py::arg("loss_var"),
        py::arg("p_true"), py::arg("seen"), py::arg("last_epoch"), py::arg("weight"), py::arg("stats"),
        py::arg("errors"), py::arg("class_weight"), py::arg("n"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("ema"), py::arg("reduction"), py::arg("strict"),
        py::arg("epoch"), py::arg("need_grad"), py::call_guard<py::gil_scoped_release>());
  m.def("select", &fastsel::cpu_select, "indices of the k largest keys, ties by lower index (CPU)",
        py::arg("keys"), py::arg("k"), py::call_guard<py::gil_scoped_release>());
  m.def("uniform", &fastsel::cpu_uniform, "fastsel.rng.uniform, bit-exact (CPU)", py::arg("idx"),
        py::arg("key"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("shuffle", &fastsel::cpu_shuffle, "ReferenceBackend.shuffle, exact (CPU)", py::arg("chosen"),
        py::arg("key"), py::call_guard<py::gil_scoped_release>());
  m.def("set_local_num_threads", &fastsel::set_local_num_threads,
        "ATen intra-op threads for the calling thread only; returns the previous number", py::arg("n"));
#ifdef FASTSEL_WITH_CUDA
  m.attr("with_cuda") = true;
  fastsel::register_cuda_ops(m);
#else
  m.attr("with_cuda") = false;
#endif
}
