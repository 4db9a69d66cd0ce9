// Autograd of the group ops, device-agnostic (the kernels are reached through the dispatcher).
//
// * group_lasso_penalty: P = sum_g w_g ||theta_g||_2 as one op with a C++ autograd kernel. Forward
//   and backward are each one fused group op (group_sq_norms, group_scale). Doing the autograd in
//   C++ rather than in a Python autograd.Function matters for a model's 24-48 LoRA tensors: the
//   Python version spends most of its time on per-tensor bookkeeping, not on the two passes.
//     dP/dtheta_i = grad * w_g * theta_i / ||theta_g||  for theta_i in group g,
//     and 0 when ||theta_g|| = 0 (the minimal-norm sub-gradient, never NaN).
// * group_sq_norms, group_scale: not differentiable; their Autograd kernels run the op below
//   autograd, so callers need no Python no_grad() around them.
// * group_prox_: an optimizer-style in-place update (like torch.optim's steps, outside the graph)
//   that bumps every tensor's version counter, so autograd still notices that saved tensors
//   changed. adamw_prox_ (the optimizer step fused with it) likewise, for params and the two
//   state lists.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "checks.h"

namespace gslora {
namespace {

at::Tensor call_group_sq_norms(at::TensorList tensors, at::IntArrayRef group_ids,
                               int64_t num_groups) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gslora::group_sq_norms", "")
                       .typed<at::Tensor(at::TensorList, at::IntArrayRef, int64_t)>();
  return op.call(tensors, group_ids, num_groups);
}

std::vector<at::Tensor> call_group_scale(at::TensorList tensors, at::IntArrayRef group_ids,
                                         const at::Tensor& coeffs) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("gslora::group_scale", "")
          .typed<std::vector<at::Tensor>(at::TensorList, at::IntArrayRef, const at::Tensor&)>();
  return op.call(tensors, group_ids, coeffs);
}

// The [G] vectors are a few dozen numbers. On the CPU a scalar loop over them replaces the ATen
// expressions (each op a dispatch and an allocation, several µs apiece: the backward's five took
// longer than its fused pass over the face layout). Not for fake or functional tensors (tracing
// under torch.compile), which have no data to loop over.
bool plain_cpu(const at::Tensor& t) { return t.is_cpu() && !at::isTensorSubclassLike(t); }

// Norms [G] and the penalty (a 0-d tensor) in the accumulate dtype of the tensors. No weights
// means w_g = 1 (the paper's penalty) without a [G] tensor of ones to build per call.
std::pair<at::Tensor, at::Tensor> penalty_and_norms(at::TensorList tensors,
                                                    at::IntArrayRef group_ids, int64_t num_groups,
                                                    const std::optional<at::Tensor>& weights) {
  // group_sq_norms validates the tensors and ids (it runs first so that tensors[0] exists);
  // only the weights are checked here.
  at::Tensor norms = call_group_sq_norms(tensors, group_ids, num_groups);
  const bool weighted = weights.has_value();
  if (weighted) {
    const char* op = "gslora::group_lasso_penalty";
    check_group_vector(op, "weights", *weights, num_groups, norms.device());
    TORCH_CHECK(weights->scalar_type() == norms.scalar_type(), op,
                ": weights must have the accumulate dtype ", norms.scalar_type(),
                " of the tensors, got ", weights->scalar_type());
  }
  if (!(plain_cpu(norms) && (!weighted || plain_cpu(*weights)))) {
    norms.sqrt_();
    return {norms, weighted ? at::dot(norms, *weights) : norms.sum()};
  }
  at::Tensor penalty = at::empty({}, norms.options());
  const at::Tensor w = weighted ? weights->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(norms.scalar_type(), "group_lasso_penalty_cpu", [&] {
    scalar_t* n = norms.data_ptr<scalar_t>();
    const scalar_t* wp = weighted ? w.const_data_ptr<scalar_t>() : nullptr;
    scalar_t sum = 0;
    for (int64_t g = 0; g < num_groups; ++g) {
      n[g] = std::sqrt(n[g]);
      sum += (wp != nullptr ? wp[g] : scalar_t(1)) * n[g];
    }
    *penalty.data_ptr<scalar_t>() = sum;
  });
  return {norms, penalty};
}

// c_g = grad * w_g / ||theta_g||, and 0 for zero groups (the minimal-norm sub-gradient).
at::Tensor penalty_coeffs(const at::Tensor& grad, const std::optional<at::Tensor>& weights,
                          const at::Tensor& norms) {
  const bool weighted = weights.has_value();
  if (!(plain_cpu(grad) && plain_cpu(norms) && (!weighted || plain_cpu(*weights)))) {
    // where() drops the 0/0 of zero groups.
    const at::Tensor g = grad.to(norms.scalar_type());
    return at::where(norms > 0, (weighted ? g * *weights : g) / norms, 0);
  }
  at::Tensor coeffs = at::empty_like(norms);
  const at::Tensor w = weighted ? weights->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(norms.scalar_type(), "group_lasso_penalty_backward_cpu", [&] {
    const auto gr = static_cast<scalar_t>(grad.item<double>());  // grad.to(): the same rounding
    const scalar_t* n = norms.const_data_ptr<scalar_t>();
    const scalar_t* wp = weighted ? w.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* c = coeffs.data_ptr<scalar_t>();
    for (int64_t g = 0; g < norms.numel(); ++g)
      c[g] = n[g] > 0 ? (wp != nullptr ? gr * wp[g] : gr) / n[g] : 0;
  });
  return coeffs;
}

// Below autograd (and for the meta / fake tensors of torch.compile): the value only.
at::Tensor group_lasso_penalty(at::TensorList tensors, at::IntArrayRef group_ids,
                               int64_t num_groups, const std::optional<at::Tensor>& weights) {
  return penalty_and_norms(tensors, group_ids, num_groups, weights).second;
}

class GroupLassoPenalty : public torch::autograd::Function<GroupLassoPenalty> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList tensors,
                            at::IntArrayRef group_ids, int64_t num_groups,
                            const std::optional<at::Tensor>& weights) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [norms, penalty] = penalty_and_norms(tensors, group_ids, num_groups, weights);
    std::vector<at::Tensor> saved(tensors.begin(), tensors.end());
    saved.push_back(norms);
    if (weights.has_value()) saved.push_back(*weights);
    ctx->save_for_backward(saved);
    ctx->saved_data["group_ids"] = group_ids.vec();
    ctx->saved_data["weighted"] = weights.has_value();
    return penalty;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    std::optional<at::Tensor> weights;
    if (ctx->saved_data["weighted"].toBool()) {
      weights = saved.back();
      saved.pop_back();
    }
    const at::Tensor norms = saved.back();
    saved.pop_back();
    const std::vector<int64_t> group_ids = ctx->saved_data["group_ids"].toIntVector();
    const at::Tensor coeffs = penalty_coeffs(grad_outputs[0], weights, norms);
    torch::autograd::variable_list grads = call_group_scale(saved, group_ids, coeffs);
    // One entry per forward argument (the list flattened): group_ids, num_groups and weights
    // get none.
    grads.resize(grads.size() + 3);
    return grads;
  }
};

at::Tensor group_lasso_penalty_autograd(at::TensorList tensors, at::IntArrayRef group_ids,
                                        int64_t num_groups,
                                        const std::optional<at::Tensor>& weights) {
  return GroupLassoPenalty::apply(tensors, group_ids, num_groups, weights);
}

at::Tensor group_sq_norms_autograd(at::TensorList tensors, at::IntArrayRef group_ids,
                                   int64_t num_groups) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_group_sq_norms(tensors, group_ids, num_groups);
}

std::vector<at::Tensor> group_scale_autograd(at::TensorList tensors, at::IntArrayRef group_ids,
                                             const at::Tensor& coeffs) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_group_scale(tensors, group_ids, coeffs);
}

at::Tensor group_prox_autograd(at::TensorList tensors, at::IntArrayRef group_ids,
                               int64_t num_groups, const at::Tensor& thresholds) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gslora::group_prox_", "")
                       .typed<at::Tensor(at::TensorList, at::IntArrayRef, int64_t,
                                         const at::Tensor&)>();
  at::Tensor norms;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    norms = op.call(tensors, group_ids, num_groups, thresholds);
  }
  for (const at::Tensor& t : tensors) torch::autograd::impl::bump_version(t);
  return norms;
}

std::tuple<at::Tensor, at::Tensor> adamw_prox_autograd(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList state_steps, at::IntArrayRef group_ids,
    int64_t num_groups, const at::Tensor& thresholds, double lr, double beta1, double beta2,
    double eps, double weight_decay, bool adam_metric) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gslora::adamw_prox_", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                           at::TensorList, at::IntArrayRef, int64_t, const at::Tensor&, double,
                           double, double, double, double, bool)>();
  std::tuple<at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = op.call(params, grads, exp_avgs, exp_avg_sqs, state_steps, group_ids, num_groups,
                  thresholds, lr, beta1, beta2, eps, weight_decay, adam_metric);
  }
  for (at::TensorList list : {params, exp_avgs, exp_avg_sqs, state_steps})
    for (const at::Tensor& t : list) torch::autograd::impl::bump_version(t);
  return out;
}

}  // namespace
}  // namespace gslora

TORCH_LIBRARY_IMPL(gslora, CompositeExplicitAutograd, m) {
  m.impl("group_lasso_penalty", &gslora::group_lasso_penalty);
}

TORCH_LIBRARY_IMPL(gslora, Autograd, m) {
  m.impl("group_lasso_penalty", &gslora::group_lasso_penalty_autograd);
  m.impl("group_sq_norms", &gslora::group_sq_norms_autograd);
  m.impl("group_scale", &gslora::group_scale_autograd);
  m.impl("group_prox_", &gslora::group_prox_autograd);
  m.impl("adamw_prox_", &gslora::adamw_prox_autograd);
}
