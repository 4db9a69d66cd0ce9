// The Python module gslora._C: loading it runs the op registrations of the other translation
// units (torch.ops.gslora.*), and it holds direct Python entry points to the group ops and to
// the LoRA linear with its autograd.
//
// Why direct entry points: a call through torch.ops converts every argument to an IValue and
// back (~8 µs per call plus ~0.15 µs per tensor here, measured), as much as the fused prox of a
// whole ViT takes. These functions take the same arguments, convert them with pybind11's casters
// (~0.06 µs per tensor) and call the op through the dispatcher, so autograd, version counters,
// the device kernels and Python dispatch modes work as through torch.ops. torch.compile traces
// torch.ops in their place (gslora/_polyfills.py).
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"

namespace {

namespace py = pybind11;

// The owning type pybind11 converts a Python argument to for each of the ops' C++ argument types
// (the ops take views: at::TensorList, at::IntArrayRef).
template <typename T>
struct PyArg {
  using type = T;
};
template <>
struct PyArg<at::TensorList> {
  using type = std::vector<at::Tensor>;
};
template <>
struct PyArg<at::IntArrayRef> {
  using type = std::vector<int64_t>;
};

template <typename Sig>
struct Entry;

// A Python function that calls the op `name` through the dispatcher with the GIL released.
template <typename Ret, typename... Args>
struct Entry<Ret(Args...)> {
  static auto make(const char* name) {
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Ret(Args...)>();
    return [op](typename PyArg<std::decay_t<Args>>::type... args) -> Ret {
      py::gil_scoped_release no_gil;
      return op.call(args...);
    };
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gslora's compiled ops (torch.ops.gslora.*) and direct entry points to some of them";
  using at::Tensor;
  using at::TensorList;
  using at::IntArrayRef;
  using OptTensor = const std::optional<Tensor>&;
  // Called once per adapted layer per forward: 8 arguments converted per call.
  m.def("lora_linear",
        Entry<Tensor(const Tensor&, const Tensor&, OptTensor, const Tensor&, const Tensor&, double,
                     OptTensor, double)>::make("gslora::lora_linear"),
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_A"), py::arg("lora_B"),
        py::arg("scaling"), py::arg("mask") = py::none(), py::arg("keep_scale") = 1.0);
  // Settings, in a submodule of their own (the module's own functions are the ops' entry points).
  auto settings = m.def_submodule("settings", "settings of the compiled kernels");
  settings.def("cpu_kernels", &gslora::cpu_kernels,
               "The LoRA linear's fp32 CPU kernels in use: 'avx512', 'avx2' or 'blas'.");
  settings.def("set_cpu_kernels", &gslora::set_cpu_kernels, py::arg("name"),
               "Selects the LoRA linear's fp32 CPU kernels (one of cpu_kernels_supported()); "
               "returns the previous choice.");
  settings.def("cpu_kernels_supported", &gslora::cpu_kernels_supported,
               "The LoRA linear's fp32 CPU kernels this build and CPU can run, best first.");
  m.def("group_sq_norms",
        Entry<Tensor(TensorList, IntArrayRef, int64_t)>::make("gslora::group_sq_norms"),
        py::arg("tensors"), py::arg("group_ids"), py::arg("num_groups"));
  m.def("group_scale",
        Entry<std::vector<Tensor>(TensorList, IntArrayRef, const Tensor&)>::make(
            "gslora::group_scale"),
        py::arg("tensors"), py::arg("group_ids"), py::arg("coeffs"));
  m.def("group_prox_",
        Entry<Tensor(TensorList, IntArrayRef, int64_t, const Tensor&)>::make("gslora::group_prox_"),
        py::arg("tensors"), py::arg("group_ids"), py::arg("num_groups"), py::arg("thresholds"));
  m.def("group_lasso_penalty",
        Entry<Tensor(TensorList, IntArrayRef, int64_t, OptTensor)>::make(
            "gslora::group_lasso_penalty"),
        py::arg("tensors"), py::arg("group_ids"), py::arg("num_groups"), py::arg("weights"));
  m.def("add_group_lasso_grad_",
        Entry<Tensor(TensorList, IntArrayRef, int64_t, OptTensor, double)>::make(
            "gslora::add_group_lasso_grad_"),
        py::arg("tensors"), py::arg("group_ids"), py::arg("num_groups"), py::arg("weights"),
        py::arg("alpha"));
  m.def("adamw_prox_",
        Entry<std::tuple<Tensor, Tensor>(TensorList, TensorList, TensorList, TensorList,
                                         TensorList, IntArrayRef, int64_t, const Tensor&, double,
                                         double, double, double, double, bool)>::
            make("gslora::adamw_prox_"),
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("state_steps"), py::arg("group_ids"), py::arg("num_groups"),
        py::arg("thresholds"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("adam_metric"));
}
