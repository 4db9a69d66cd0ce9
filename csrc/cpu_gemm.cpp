// The frozen product of the fp32 CPU forward, y = x W^T + b: oneDNN or BLAS.
//
// PyTorch computes an fp32 nn.Linear on the CPU with BLAS (MKL's sgemm in the x86 wheels). It
// also ships oneDNN, whose inner product it uses for linears only from inductor's CPU backend,
// through the op mkldnn::_linear_pointwise. On the AMD EPYC that benchmarks/ ran on, that inner
// product ran the ViT FFN shapes faster than MKL (benchmarks/bench_lora_linear.py compares
// gslora with either: providers gslora and gslora-blas), so by default ("auto") the fp32
// forward of lora_linear_cpu.cpp calls it, without any copy of the weight. The backward's
// dx = g W stays with BLAS: the inner product wants W^T [K, N] contiguous, i.e. a copy of the
// frozen weight per call or kept beside it, and was not faster with either (ad hoc).
#include "cpu_gemm.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <stdexcept>

namespace gslora {
namespace {

enum Setting : int { kAuto = 0, kOneDnn = 1, kBlas = 2 };
constexpr const char* kNames[] = {"auto", "onednn", "blas"};

using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, c10::string_view,
                                   c10::List<std::optional<at::Scalar>>,
                                   std::optional<c10::string_view>);

// The op, or why PyTorch offers none here; looked up once.
struct OneDnnOp {
  std::optional<c10::TypedOperatorHandle<LinearPointwise>> op;
  std::string missing;
};

const OneDnnOp& onednn_op() {
  static const OneDnnOp found = [] {
    OneDnnOp r;
#if !defined(__x86_64__)
    r.missing = "oneDNN is used on x86-64 only";
#else
    if (!at::hasMKLDNN()) {
      r.missing = "this PyTorch is built without oneDNN";
      return r;
    }
    const auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value() || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
      r.missing = "this PyTorch has no CPU kernel of mkldnn::_linear_pointwise";
      return r;
    }
    try {  // typed() checks the C++ signature against the op's schema
      r.op = handle->typed<LinearPointwise>();
    } catch (const c10::Error& e) {
      r.missing = std::string("mkldnn::_linear_pointwise has an unexpected signature: ") + e.what_without_backtrace();
    }
#endif
    return r;
  }();
  return found;
}

int parse(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kNames[i]) return i;
  throw std::invalid_argument("the CPU GEMM must be auto, onednn or blas, got '" + name + "'");
}

std::atomic<int> setting{-1};  // -1: not read from the environment yet
std::once_flag from_env;

int current() {
  std::call_once(from_env, [] {
    const char* env = std::getenv("GSLORA_CPU_GEMM");
    const std::string name = env != nullptr && *env != '\0' ? env : "auto";
    int parsed = kAuto;
    try {
      parsed = parse(name);
    } catch (const std::invalid_argument&) {
      TORCH_CHECK(false, "GSLORA_CPU_GEMM must be auto, onednn or blas, got '", name, "'");
    }
    int expected = -1;  // a set_cpu_gemm before the first use wins over the environment
    setting.compare_exchange_strong(expected, parsed);
  });
  return setting.load(std::memory_order_relaxed);
}

}  // namespace

std::string set_cpu_gemm(const std::string& name) {
  const int want = parse(name);
  if (want == kOneDnn && onednn_op().op == std::nullopt)
    throw std::invalid_argument("the CPU GEMM cannot be onednn: " + onednn_op().missing);
  const int previous = current();
  setting.store(want);
  return kNames[previous];
}

std::string cpu_gemm_status() {
  const std::string name = kNames[current()];
  if (use_onednn_linear()) return name + ": oneDNN";
  if (current() == kBlas) return name + ": BLAS";
  if (onednn_op().op == std::nullopt) return name + ": BLAS (" + onednn_op().missing + ")";
  return name + ": BLAS (torch.backends.mkldnn is disabled)";
}

bool use_onednn_linear() {
  return current() != kBlas && onednn_op().op.has_value() &&
         at::globalContext().userEnabledMkldnn();
}

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return onednn_op().op->call(x, w, b.defined() ? std::optional<at::Tensor>(b) : std::nullopt,
                              "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

}  // namespace gslora
