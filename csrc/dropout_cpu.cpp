// The LoRA dropout's keep mask on the CPU: keep[e] = (u32 word e of Philox4x32-10 under the key
// `seed`) >= ceil(p 2^32), e the element's index in the row-major [rows, cols] mask.
//
// torch.rand(rows, cols) >= p, which gslora used before, draws its floats one at a time from a
// Mersenne twister on one thread. Philox is counter-based: every element's word is a pure
// function of (seed, its index), so the mask is computed in SIMD lanes on every thread and is the
// same for any thread count and kernel level. gslora.reference.dropout_keep_mask computes the
// same bits with torch integer ops (the specification; the path without gslora._C).
//
// Layout: counters c = 0, 1, ... in blocks of kLanes; counter c is {c mod 2^32, c div 2^32, 0, 0}
// and the block b of counters [b L, b L + L) gives the elements [4 b L, 4 b L + 4 L): word j of
// lane l is element 4 b L + j L + l (so each word's L lanes are stored as one contiguous run).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "always_inline.h"
#include "cpu_kernels.h"

namespace gslora {
namespace {

constexpr int kLanes = 16;  // counters per block (one AVX-512 register of 32-bit words)
constexpr int64_t kBlockElems = 4 * kLanes;
constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;    // Philox4x32 multipliers
constexpr uint32_t kBump0 = 0x9E3779B9u, kBump1 = 0xBB67AE85u;  // Weyl key increments
constexpr int kRounds = 10;

// Stores word j of lane l (kept or not) at out[j L + l] for the first n <= 4 L elements.
GSLORA_INLINE void store_block(const uint32_t (&w)[4][kLanes], uint32_t thr, bool* out,
                               int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e] = w[e / kLanes][e % kLanes] >= thr;
}

// Philox4x32-10 of the counters [c, c + L): w[j][l] = word j of counter c + l. Plain C++ (the
// specification of the SIMD versions in dropout_simd.inc and the path without them).
void philox_block_scalar(uint64_t c, uint64_t seed, uint32_t (&w)[4][kLanes]) {
  for (int l = 0; l < kLanes; ++l) {
    const uint64_t cl = c + l;
    uint32_t x0 = static_cast<uint32_t>(cl), x1 = static_cast<uint32_t>(cl >> 32), x2 = 0, x3 = 0;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kRounds; ++round) {
      const uint64_t p0 = uint64_t{kMul0} * x0, p1 = uint64_t{kMul1} * x2;
      const uint32_t y0 = static_cast<uint32_t>(p1 >> 32) ^ x1 ^ k0;
      const uint32_t y2 = static_cast<uint32_t>(p0 >> 32) ^ x3 ^ k1;
      x1 = static_cast<uint32_t>(p1);
      x3 = static_cast<uint32_t>(p0);
      x0 = y0;
      x2 = y2;
      k0 += kBump0;
      k1 += kBump1;
    }
    w[0][l] = x0;
    w[1][l] = x1;
    w[2][l] = x2;
    w[3][l] = x3;
  }
}

void mask_blocks_scalar(uint64_t seed, uint32_t thr, bool* out, int64_t n, int64_t b0,
                        int64_t b1) {
  uint32_t w[4][kLanes];
  for (int64_t b = b0; b < b1; ++b) {
    philox_block_scalar(static_cast<uint64_t>(b) * kLanes, seed, w);
    store_block(w, thr, out + b * kBlockElems, std::min(kBlockElems, n - b * kBlockElems));
  }
}

// The SIMD versions: dropout_simd.inc compiled for AVX2 and for AVX-512, each in its own
// namespace, as lora_linear_cpu.cpp compiles lora_simd_kernels.inc (simd_levels.inc). GCC only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GSLORA_HAVE_SIMD_MASK 1
#define GSLORA_SIMD_FILE "dropout_simd.inc"
#include "simd_levels.inc"
#undef GSLORA_SIMD_FILE
#endif

// keep [rows, cols] (bool) for x [..., cols], rows the product of x's leading sizes (only x's
// shape is read).
at::Tensor dropout_mask_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "gslora::dropout_mask: x must have at least one dimension");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "gslora::dropout_mask: p must lie in [0, 1), got ", p);
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.is_cpu(),
                    "gslora::dropout_mask: seed must be one int64 on the CPU, got ",
                    seed.scalar_type(), " of shape ", seed.sizes());
  const int64_t cols = x.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  at::Tensor mask = at::empty({rows, cols}, x.options().dtype(at::kBool));
  const int64_t n = mask.numel();
  if (n == 0) return mask;
  // keep iff word >= p 2^32 (a word is uniform on [0, 2^32)): P(keep) = 1 - p up to 2^-32.
  const double thr_exact = std::ceil(std::ldexp(p, 32));
  const uint32_t thr = static_cast<uint32_t>(std::min(thr_exact, 4294967295.0));
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  const int64_t blocks = (n + kBlockElems - 1) / kBlockElems;
  bool* out = mask.data_ptr<bool>();
  // The SIMD versions take counters below 2^32: masks of fewer than 2^34 elements.
  const int level = blocks * kLanes < (int64_t{1} << 32) ? cpu_kernel_level() : 0;
  at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) {
#ifdef GSLORA_HAVE_SIMD_MASK
    if (level >= 2) return avx512::mask_blocks(key, thr, out, n, b0, b1);
    if (level == 1) return avx2::mask_blocks(key, thr, out, n, b0, b1);
#endif
    mask_blocks_scalar(key, thr, out, n, b0, b1);
  });
  return mask;
}

}  // namespace
}  // namespace gslora

TORCH_LIBRARY_IMPL(gslora, CPU, m) {
  m.impl("dropout_mask", &gslora::dropout_mask_cpu);
}
