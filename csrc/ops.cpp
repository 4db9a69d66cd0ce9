// Schemas of the torch.ops.gslora ops.
//
// The CPU kernels register in lora_linear_cpu.cpp and group_ops_cpu.cpp, the CUDA kernels in
// cuda/gslora_cuda.cu, the device-agnostic autograd ops in lora_linear_autograd.cpp and
// group_autograd.cpp, the fake (meta) kernels for torch.compile in gslora/_fake.py, and the Python
// module with direct entry points to some of the ops in python_module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(gslora, m) {
  // y = x W^T + b + s (d(x) A^T) B^T and xa = d(x) A^T, d(x) = x * mask * keep_scale.
  m.def(
      "lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scaling, Tensor? mask, float keep_scale) -> (Tensor, Tensor)");
  // (dx, dA, dB); dx is an empty tensor when compute_dx is false.
  m.def(
      "lora_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor xa, float scaling, Tensor? mask, float keep_scale, bool compute_dx) "
      "-> (Tensor, Tensor, Tensor)");
  // y [..., N] for x [..., K], with its own (C++) autograd over the two ops above; see
  // lora_linear_autograd.cpp.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scaling, Tensor? mask, float keep_scale) -> Tensor");
  // The LoRA dropout's keep mask, bool [M, K] for x [..., K] (M = x.numel() / K): Philox4x32-10
  // words keyed by seed (an int64 scalar tensor) against p (dropout_cpu.cpp; its specification
  // is gslora.reference.dropout_keep_mask).
  m.def("dropout_mask(Tensor x, float p, Tensor seed) -> Tensor");
  m.def("group_sq_norms(Tensor[] tensors, int[] group_ids, int num_groups) -> Tensor");
  m.def("group_scale(Tensor[] tensors, int[] group_ids, Tensor coeffs) -> Tensor[]");
  m.def(
      "group_prox_(Tensor(a!)[] tensors, int[] group_ids, int num_groups, Tensor thresholds) "
      "-> Tensor");
  // torch.optim.AdamW's step on every param (state_steps: its per-param step counts, all equal,
  // incremented here), then group_prox_ with thresholds[g] (divided by d_g = sqrt(mean v_hat
  // over the group) + eps when adam_metric), one pass per group.
  // Returns (norms after the AdamW update, thresholds used), both [num_groups].
  m.def(
      "adamw_prox_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] state_steps, int[] group_ids, int num_groups, "
      "Tensor thresholds, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool adam_metric) -> (Tensor, Tensor)");
  // sum_g weights[g] * ||group g||_2 (weights None: all 1) with its own (C++) autograd; see
  // group_autograd.cpp.
  m.def(
      "group_lasso_penalty(Tensor[] tensors, int[] group_ids, int num_groups, Tensor? weights) "
      "-> Tensor");
  // The penalty's value and alpha times its gradient added to every tensor's .grad (created where
  // missing) in one pass, outside autograd (like an optimizer step); returns the penalty. It
  // works on .grad, which exists above autograd only: it has an AutogradCPU kernel and nothing
  // below (group_ops_cpu.cpp).
  m.def(
      "add_group_lasso_grad_(Tensor[] tensors, int[] group_ids, int num_groups, Tensor? weights, "
      "float alpha) -> Tensor");
}
