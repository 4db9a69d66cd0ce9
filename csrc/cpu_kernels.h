// Which CPU kernels the LoRA linear runs for its rank-r products (fp32, bf16, fp16, with or
// without a dropout mask): "avx512", "avx2" (explicit SIMD kernels, lora_simd_kernels.inc) or
// "blas" (ATen's BLAS for unmasked fp32, the generic row kernels for 16-bit or masked inputs: the
// path of CPUs and compilers without the SIMD kernels). The best the CPU supports by default, at
// most the level named by GSLORA_CPU_KERNELS when set. Every level gives the same results up to
// rounding; avx2 and avx512 give the same bits.
#pragma once

#include <string>
#include <vector>

namespace gslora {

// The kernels in use.
std::string cpu_kernels();
// The same as a number: 0 blas, 1 avx2, 2 avx512 (for other CPU ops with SIMD versions).
int cpu_kernel_level();
// Selects the kernels (one of cpu_kernels_supported()) for every later call in the process;
// returns the previous choice.
std::string set_cpu_kernels(const std::string& name);
// What this build and CPU can run, best first (always ending with "blas").
std::vector<std::string> cpu_kernels_supported();

}  // namespace gslora
