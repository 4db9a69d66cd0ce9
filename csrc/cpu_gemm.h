// The frozen product of the fp32 CPU forward, y = x W^T + b: oneDNN or BLAS (see cpu_gemm.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace gslora {

// Sets which library computes it: "auto" (oneDNN where PyTorch has it and
// torch.backends.mkldnn is enabled, else BLAS), "onednn" (as auto, but refused where PyTorch
// has no oneDNN) or "blas". Returns the previous setting. Throws std::invalid_argument for other
// names or an impossible "onednn". The initial setting comes from $GSLORA_CPU_GEMM (else auto).
std::string set_cpu_gemm(const std::string& name);

// "<setting>: oneDNN" or "<setting>: BLAS (<why not oneDNN>)".
std::string cpu_gemm_status();

// True when the fp32 forward's frozen product goes to onednn_linear now.
bool use_onednn_linear();

// x w^T + b (b undefined: no bias) through oneDNN's inner product; x [M, K] and w [N, K]
// contiguous fp32, b [N].
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

}  // namespace gslora
