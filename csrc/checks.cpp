// Argument validation for the gslora ops (see checks.h).
#include "checks.h"

#include <ATen/ATen.h>

#include <cmath>
#include <sstream>

namespace gslora {
namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": ", name, " must be float32, float64, bfloat16 or float16, got ", st);
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_float(op, name, t);
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type(), " (all tensors of one call share x's dtype)");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

void check_shape2(const char* op, const char* name, const at::Tensor& t, int64_t d0, int64_t d1,
                  const char* expected) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == d0 && t.size(1) == d1, op, ": ", name,
              " must have shape ", expected, " = [", d0, ", ", d1, "], got ", shape_str(t));
}

void check_common(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                  const c10::optional<at::Tensor>& mask, double keep_scale) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", shape_str(x));
  const int64_t M = x.size(0), K = x.size(1);
  check_like(op, "weight", weight, x);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, op, ": weight must have shape [N, K=", K,
              "] (K = x.size(1)), got ", shape_str(weight));
  const int64_t N = weight.size(0);
  check_like(op, "lora_A", lora_A, x);
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == K && lora_A.size(0) >= 1, op,
              ": lora_A must have shape [r, K=", K, "] with r >= 1, got ", shape_str(lora_A));
  const int64_t r = lora_A.size(0);
  check_like(op, "lora_B", lora_B, x);
  check_shape2(op, "lora_B", lora_B, N, r, "[N, r]");
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be a bool keep-mask, got dtype ",
                mask->scalar_type());
    TORCH_CHECK(mask->device() == x.device(), op, ": mask is on ", mask->device(),
                " but x is on ", x.device());
    check_shape2(op, "mask", *mask, M, K, "[M, K] (x's shape)");
  }
  TORCH_CHECK(std::isfinite(keep_scale), op, ": keep_scale must be finite, got ", keep_scale);
}

}  // namespace

at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_lora_fwd_args(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                         const at::Tensor& lora_B, const c10::optional<at::Tensor>& mask,
                         double keep_scale) {
  const char* op = "gslora::lora_linear_fwd";
  check_common(op, x, weight, lora_A, lora_B, mask, keep_scale);
  if (bias.has_value() && bias->defined()) {
    check_like(op, "bias", *bias, x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must have shape [N=", weight.size(0), "], got ", shape_str(*bias));
  }
}

void check_lora_bwd_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
                         const c10::optional<at::Tensor>& mask, double keep_scale) {
  const char* op = "gslora::lora_linear_bwd";
  check_common(op, x, weight, lora_A, lora_B, mask, keep_scale);
  check_like(op, "grad_out", grad_out, x);
  check_shape2(op, "grad_out", grad_out, x.size(0), weight.size(0), "[M, N]");
  check_like(op, "xa", xa, x);
  check_shape2(op, "xa", xa, x.size(0), lora_A.size(0), "[M, r]");
}

void check_group_args(const char* op, at::TensorList tensors, at::IntArrayRef group_ids,
                      int64_t num_groups) {
  TORCH_CHECK(!tensors.empty(), op, ": tensors must not be empty");
  TORCH_CHECK(num_groups >= 1, op, ": num_groups must be >= 1, got ", num_groups);
  TORCH_CHECK(group_ids.size() == tensors.size(), op, ": group_ids has ", group_ids.size(),
              " entries for ", tensors.size(), " tensors (one group id per tensor)");
  const at::Tensor& t0 = tensors[0];
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), op, ": tensors[", i, "] is undefined");
    const auto st = t.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
                ": tensors[", i, "] must be float32, float64, bfloat16 or float16, got ", st);
    TORCH_CHECK(st == t0.scalar_type(), op, ": tensors[", i, "] has dtype ", st,
                " but tensors[0] has dtype ", t0.scalar_type(), " (one dtype per call)");
    TORCH_CHECK(t.device() == t0.device(), op, ": tensors[", i, "] is on ", t.device(),
                " but tensors[0] is on ", t0.device(), " (one device per call)");
    TORCH_CHECK(group_ids[i] >= 0 && group_ids[i] < num_groups, op, ": group_ids[", i, "] = ",
                group_ids[i], " must lie in [0, num_groups=", num_groups, ")");
  }
}

void check_group_vector(const char* op, const char* name, const at::Tensor& v, int64_t num_groups,
                        const at::Device& device) {
  TORCH_CHECK(v.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(v.is_floating_point(), op, ": ", name, " must be floating point, got ",
              v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == num_groups, op, ": ", name,
              " must have shape [num_groups=", num_groups, "], got ", shape_str(v));
  TORCH_CHECK(v.device() == device, op, ": ", name, " is on ", v.device(),
              " but the tensors are on ", device);
}

}  // namespace gslora
