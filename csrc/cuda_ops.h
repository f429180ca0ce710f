// The CUDA ops of fastsel._C, registered by bindings.cpp in a CUDA build only.
#pragma once
#include <torch/extension.h>

namespace fastsel {

// Adds cuda_step, cuda_scale_grad, cuda_select, cuda_uniform and cuda_shuffle to the module.
void register_cuda_ops(pybind11::module& m);

}  // namespace fastsel
