// Device-agnostic math shared by the CPU (csrc/*.cpp) and CUDA (csrc/cuda/*.cu) kernels.
//
// Everything here is a plain inline function usable on the host and, under nvcc, on the device,
// so the CUDA kernels run exactly the arithmetic that the CPU tests exercise.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GSLORA_HD __host__ __device__ __forceinline__
#else
#define GSLORA_HD inline
#endif

namespace gslora {

// Accumulate type: double stays double, everything else (float, Half, BFloat16) sums in float.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Block soft-thresholding factor max(0, 1 - lam / norm) for a group with squared norm `sq`.
// A group at or under its threshold becomes exactly zero (factor 0, never 1 - lam/0 = -inf),
// and a zero group (sq == 0) yields 0, not NaN: the division only happens when norm > lam >= 0.
template <typename A>
GSLORA_HD A prox_factor(A norm, A lam) {
  return norm > lam ? A(1) - lam / norm : A(0);
}

// sqrt for the host and for nvcc device code, in the accumulate type.
GSLORA_HD float gsqrt(float v) {
#if defined(__CUDA_ARCH__)
  return ::sqrtf(v);
#else
  return __builtin_sqrtf(v);
#endif
}
GSLORA_HD double gsqrt(double v) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(v);
#else
  return __builtin_sqrt(v);
#endif
}

// Dropout applied to one element: x * mask * keep_scale, where a null mask means identity.
template <typename A>
GSLORA_HD A dropped(A x, const bool* mask, int64_t idx, A keep_scale) {
  return mask == nullptr ? x : (mask[idx] ? x * keep_scale : A(0));
}

// Ceiling division for chunk tables and launch grids.
GSLORA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace gslora
