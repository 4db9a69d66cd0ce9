// The LoRA linear y = x W^T + b + s (d(x) A^T) B^T as one op with a C++ autograd kernel, for
// x [..., K] of any number of leading dimensions (the kernels see x as [M, K] rows).
//
// Forward and backward are the lora_linear_fwd / lora_linear_bwd ops reached through the
// dispatcher, so this file serves every device with those kernels (CPU, CUDA). It exists for
// speed: a Python autograd.Function costs a few hundred microseconds per layer call once the
// interpreter's caches are cold after a large GEMM, which is most of the adapter's overhead at
// small batch sizes. The math is LoRALinearFunction's (gslora/functional.py):
//   dB = s g^T xa,  dA = s (g B)^T d(x),  dx = g W + s d((g B) A),
//   dW = g^T x and db = sum_rows g only when the user unfroze the base layer.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace gslora {
namespace {

using OptTensor = c10::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& x, const at::Tensor& weight,
                                            const OptTensor& bias, const at::Tensor& lora_A,
                                            const at::Tensor& lora_B, double scaling,
                                            const OptTensor& mask, double keep_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gslora::lora_linear_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const OptTensor&,
                           const at::Tensor&, const at::Tensor&, double, const OptTensor&,
                           double)>();
  return op.call(x, weight, bias, lora_A, lora_B, scaling, mask, keep_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
    const OptTensor& mask, double keep_scale, bool compute_dx) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gslora::lora_linear_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                           const OptTensor&, double, bool)>();
  return op.call(grad_out, x, weight, lora_A, lora_B, xa, scaling, mask, keep_scale, compute_dx);
}

// x [..., K] as the [M, K] matrix the kernels take (a view when x is contiguous), and y's shape.
// Checks x first (the kernels check the other arguments, a weight that is not 2-D included):
// ValueError, as from the Python layer.
std::pair<at::Tensor, std::vector<int64_t>> as_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.is_floating_point(),
                    "gslora::lora_linear: x must be a floating-point tensor, got dtype ",
                    x.scalar_type());
  const int64_t K = weight.dim() == 2 ? weight.size(1) : -1;  // -1: left to the kernel's check
  TORCH_CHECK_VALUE(x.dim() >= 1 && (K < 0 || x.size(-1) == K),
                    "gslora::lora_linear: x must have shape [..., ", K, "] (in_features), got ",
                    x.sizes());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = weight.size(0);
  return {x.reshape({-1, x.size(-1)}).contiguous(), std::move(out_shape)};
}

// Below autograd (no_grad, inference, meta / fake tensors): the output only.
at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                       const OptTensor& mask, double keep_scale) {
  auto [x2d, out_shape] = as_rows(x, weight);
  return std::get<0>(call_fwd(x2d, weight, bias, lora_A, lora_B, scaling, mask, keep_scale))
      .view(out_shape);
}

class LoRALinear : public torch::autograd::Function<LoRALinear> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const OptTensor& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                            const OptTensor& mask, double keep_scale) {
    const bool has_bias = bias.has_value() && bias->defined();
    const bool has_mask = mask.has_value() && mask->defined();
    // Which gradients the backward must produce (inputs' flags, read before the guard).
    ctx->saved_data["need"] = std::vector<bool>{
        x.requires_grad(), weight.requires_grad(), has_bias && bias->requires_grad(),
        lora_A.requires_grad(), lora_B.requires_grad()};
    at::AutoDispatchBelowADInplaceOrView guard;
    // Reshaping here, below autograd, records no view nodes (a Python reshape before and after
    // the op would add two to every layer's backward).
    auto [x2d, out_shape] = as_rows(x, weight);
    auto [y, xa] = call_fwd(x2d, weight, bias, lora_A, lora_B, scaling, mask, keep_scale);
    ctx->save_for_backward({x2d, weight, lora_A, lora_B, xa, has_mask ? *mask : at::Tensor()});
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["keep_scale"] = keep_scale;
    ctx->saved_data["has_bias"] = has_bias;
    return y.view(out_shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3],
                     &xa = saved[4];
    const OptTensor mask = saved[5].defined() ? OptTensor(saved[5]) : OptTensor();
    const auto need = ctx->saved_data["need"].toBoolList();
    const bool need_x = need[0], need_w = need[1], need_b = need[2], need_a = need[3],
               need_bb = need[4];
    const at::Tensor g = grad_outputs[0].reshape({-1, weight.size(0)}).contiguous();
    at::Tensor dx, dW, db, dA, dB;
    if (need_x || need_a || need_bb) {
      std::tie(dx, dA, dB) =
          call_bwd(g, x, weight, lora_A, lora_B, xa, ctx->saved_data["scaling"].toDouble(), mask,
                   ctx->saved_data["keep_scale"].toDouble(), need_x);
      dx = need_x ? dx.view(ctx->saved_data["x_shape"].toIntVector()) : at::Tensor();
      if (!need_a) dA = at::Tensor();
      if (!need_bb) dB = at::Tensor();
    }
    if (need_w) dW = g.t().mm(x).to(weight.scalar_type());
    if (need_b && ctx->saved_data["has_bias"].toBool()) db = g.sum(0);
    // One entry per forward argument: x, weight, bias, lora_A, lora_B, scaling, mask, keep_scale.
    return {dx, dW, db, dA, dB, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                                const OptTensor& bias, const at::Tensor& lora_A,
                                const at::Tensor& lora_B, double scaling, const OptTensor& mask,
                                double keep_scale) {
  return LoRALinear::apply(x, weight, bias, lora_A, lora_B, scaling, mask, keep_scale);
}

}  // namespace
}  // namespace gslora

TORCH_LIBRARY_IMPL(gslora, CompositeExplicitAutograd, m) {
  m.impl("lora_linear", &gslora::lora_linear);
}

TORCH_LIBRARY_IMPL(gslora, Autograd, m) {
  m.impl("lora_linear", &gslora::lora_linear_autograd);
}
