// Argument validation shared by the CPU and CUDA implementations of the gslora ops.
//
// Every check is a TORCH_CHECK whose message names the op, the argument and what was expected,
// so a bad call fails with a readable error instead of a crash or a silent wrong answer.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <vector>

namespace gslora {

// Validates lora_linear_fwd's inputs: x [M, K], weight [N, K], bias [N]?, lora_A [r, K],
// lora_B [N, r], mask bool [M, K]?; one floating dtype and one device for all of them.
void check_lora_fwd_args(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                         const at::Tensor& lora_B, const c10::optional<at::Tensor>& mask,
                         double keep_scale);

// Validates lora_linear_bwd's inputs: as the forward, plus grad_out [M, N] and xa [M, r].
void check_lora_bwd_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
                         const c10::optional<at::Tensor>& mask, double keep_scale);

// Validates a group-op call: a non-empty tensor list of one floating dtype and one device,
// one group id in [0, num_groups) per tensor. `op` names the op in messages.
void check_group_args(const char* op, at::TensorList tensors, at::IntArrayRef group_ids,
                      int64_t num_groups);

// Validates a per-group vector (coeffs, thresholds): 1-D [num_groups], floating, on `device`.
void check_group_vector(const char* op, const char* name, const at::Tensor& v, int64_t num_groups,
                        const at::Device& device);

// The accumulate dtype of `dtype`: float64 stays float64, everything else is float32.
at::ScalarType accumulate_type(at::ScalarType dtype);

}  // namespace gslora
