// CPU kernels of the LoRA linear: y = x W^T + b + s (d(x) A^T) B^T and its backward.
//
// The training hot path (measured on an AMD EPYC with MKL, and on an Intel Xeon):
//   forward : xa = d(x) A^T; y = b + x W_eff^T with W_eff = W + s B A when M r > 64 K (fp32 and
//             fp64 without dropout; the SIMD kernels on a CPU with AVX-512 also need r > 32),
//             else y = b + xa (s B)^T (written once) and then y += x W^T
//             inside the big GEMM (beta = 1: y is read in its microkernel; fp32 with few rows
//             runs it in the team, each thread on its block of y's columns: team_gemm). For
//             fp32 and the 16-bit dtypes the rank-r products are explicit SIMD kernels
//             (Kernels::xa_rows, adapter_rows) in one parallel region (fwd_simd); for fp64, and
//             for fp32 with the "blas" kernels (cpu_kernels.h), BLAS ([xa | 1] [s B | b]^T for
//             the second).
//   backward: ONE fused pass over g gives s u = s g B and dB = s g^T xa (explicit SIMD: BLAS
//             reads g for these rank-r products at a few GB/s, and g^T xa as BLAS sees it costs
//             as much as the big GEMM); then one pass over the rows writes dx = d'((s u) A) and
//             sums dA = (s u)^T d(x) (SIMD: MKL took 3-5x the time of a write of dx / a read of
//             x for these), and dx += g W inside the big GEMM (beta = 1). All but the GEMM run
//             in one parallel region (bwd_simd). fp64 and the "blas" kernels: BLAS.
//   The SIMD kernels (lora_simd_kernels.inc) exist for AVX2 and for AVX-512: MKL's GEMM uses
//   AVX-512 where the CPU has it, twice the multiply-adds per instruction, and the rank-r passes
//   must keep pace with it. bf16 and fp16 take the same SIMD kernels: they widen x and g to
//   float as they read them and round y and dx as they write them (the adapter math is float),
//   and the big GEMMs run in the 16-bit dtype (oneDNN); no merge (a 16-bit W_eff would round
//   the adapter's small update away). A dropout mask (d: x * keep where the mask is set, else 0)
//   is applied as x's rows are widened for the x A^T and dA passes and on dx's store; no merge
//   (x W_eff^T would apply the adapter to the undropped x). The generic row-block kernels below,
//   which took 16-bit and masked calls before, cost 1.2-3.0x the frozen layer for 16-bit inputs
//   (benchmarks/results/lora-linear-16bit-xeon-20261130-before.jsonl); they remain for masked
//   fp64 calls and, at the "blas" level, for masked and 16-bit ones.
//
// Fused row-block kernels. The two big products (x W^T in the forward, g W in the backward) go to ATen's GEMM (MKL /
// oneDNN). Everything the adapter adds is memory traffic over skinny [M, r] products, so it runs
// in two fused row-block kernels that touch each big operand once and create no [M, N]
// temporary:
//
//   K1 "project":  out[m, :] = sum_l d(X)[m, l] P[l, :]       (P [L, r], out [M, r])
//                  D[l, :]  += sum_m X[m, l] V[m, :]          (optional, same pass over X)
//   K2 "update":   Y[m, l]  += alpha * d'(sum_j U[m, j] Pt[j, l])   (Pt [r, L], in place)
//                  D[j, l]  += dscale * sum_m U[m, j] d(X)[m, l]    (optional, same pass)
//
// Forward:  y = addmm(b, x, W^T);  xa = K1(x, A^T);  K2: y += s xa B^T.
// Backward: u = g B and dB = s g^T xa in ONE pass over g (K1);  dx = g W;
//           K2: dx += s d(u A) and dA = s u^T d(x) in ONE pass over (x, dx).
// Adapter math accumulates in float (double for double); the forward's y update uses the
// unrounded xa. Rows are processed 4 at a time so that each loaded row of P / Pt / D serves 4
// rows of X; the inner loops have compile-time width 8 so that they become AVX2 FMAs in the
// x86-64-v3 clone (target_clones picks it at load time where the CPU supports it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "always_inline.h"
#include "checks.h"
#include "cpu_kernels.h"
#include "gslora_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GSLORA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GSLORA_CLONES
#endif

namespace gslora {
namespace {

constexpr int VW = 8;      // vector width of the inner loops (one AVX2 register of floats)
constexpr int64_t RB = 4;  // rows per register block

// ---------------------------------------------------------------------------------------------
// K1: out[m, c:c+VW] = oscale * sum_l d(X)[m, l] P[l, c:c+VW] for every column chunk c of the
// padded rank RP (a multiple of VW), and D[l, :] += sum_m X[m, l] V[m, :] when HAS_D.
// The sum over l runs in blocks of kK1SumBlock terms added at the end, so that its rounding error
// grows like BLAS's, not linearly in L.
constexpr int64_t kK1SumBlock = 128;

template <typename T, typename A, int NR, bool HAS_MASK, bool HAS_D>
GSLORA_INLINE void k1_block(const T* X, int64_t L, const bool* mask, A keep, A oscale, const A* P,
                            int64_t RP, A* out, const A* V, A* D, int64_t m) {
  for (int64_t c = 0; c < RP; c += VW) {
    A acc[NR][VW];
    A v[NR][VW];
    for (int i = 0; i < NR; ++i)
      for (int j = 0; j < VW; ++j) {
        acc[i][j] = A(0);
        v[i][j] = HAS_D ? V[(m + i) * RP + c + j] : A(0);
      }
    for (int64_t l0 = 0; l0 < L; l0 += kK1SumBlock) {
      A part[NR][VW];
      for (int i = 0; i < NR; ++i)
        for (int j = 0; j < VW; ++j) part[i][j] = A(0);
      for (int64_t l = l0; l < std::min(L, l0 + kK1SumBlock); ++l) {
        const A* p = P + l * RP + c;
        A xr[NR], xd[NR];
        for (int i = 0; i < NR; ++i) {
          xr[i] = static_cast<A>(X[(m + i) * L + l]);
          xd[i] = HAS_MASK ? (mask[(m + i) * L + l] ? xr[i] * keep : A(0)) : xr[i];
        }
        for (int i = 0; i < NR; ++i)
          for (int j = 0; j < VW; ++j) part[i][j] += xd[i] * p[j];
        if (HAS_D) {
          A* d = D + l * RP + c;
          A dl[VW];
          for (int j = 0; j < VW; ++j) dl[j] = d[j];
          for (int i = 0; i < NR; ++i)
            for (int j = 0; j < VW; ++j) dl[j] += xr[i] * v[i][j];
          for (int j = 0; j < VW; ++j) d[j] = dl[j];
        }
      }
      for (int i = 0; i < NR; ++i)
        for (int j = 0; j < VW; ++j) acc[i][j] += part[i][j];
    }
    for (int i = 0; i < NR; ++i)
      for (int j = 0; j < VW; ++j) out[(m + i) * RP + c + j] = acc[i][j] * oscale;
  }
}

template <typename T, typename A, bool HAS_MASK, bool HAS_D>
GSLORA_INLINE void k1_rows_impl(const T* X, int64_t L, const bool* mask, A keep, A oscale,
                                const A* P, int64_t RP, A* out, const A* V, A* D, int64_t m0,
                                int64_t m1) {
  int64_t m = m0;
  for (; m + RB <= m1; m += RB)
    k1_block<T, A, RB, HAS_MASK, HAS_D>(X, L, mask, keep, oscale, P, RP, out, V, D, m);
  for (; m < m1; ++m) k1_block<T, A, 1, HAS_MASK, HAS_D>(X, L, mask, keep, oscale, P, RP, out, V, D, m);
}

// ---------------------------------------------------------------------------------------------
// K2 on the column chunk [l0, l0 + w) of NR rows starting at m. FULL chunks have w == VW known
// at compile time (vectorised); the tail chunk has w < VW.
template <typename T, typename A, int NR, bool FULL, bool HAS_MASK, bool HAS_Y, bool HAS_D>
GSLORA_INLINE void k2_chunk(T* Y, const T* X, int64_t L, const bool* mask, A keep, A alpha,
                            A dscale, const A* U, int64_t ldu, int64_t r, const A* Pt, A* D,
                            int64_t m, int64_t l0, int w_rt) {
  const int w = FULL ? VW : w_rt;
  A acc[NR][VW];
  A xd[NR][VW];
  A mf[NR][VW];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < VW; ++j) {
      acc[i][j] = A(0);
      const bool in = FULL || j < w;
      const int64_t idx = (m + i) * L + l0 + j;
      // Dropout factor of this element: keep_scale where kept, 0 where dropped, 1 without mask.
      mf[i][j] = HAS_MASK ? (in && mask[idx] ? keep : A(0)) : A(1);
      xd[i][j] = (HAS_D && in) ? static_cast<A>(X[idx]) * mf[i][j] * dscale : A(0);
    }
  for (int64_t jr = 0; jr < r; ++jr) {
    const A* pt = Pt + jr * L + l0;
    A pv[VW];
    for (int j = 0; j < VW; ++j) pv[j] = (FULL || j < w) ? pt[j] : A(0);
    A uv[NR];
    for (int i = 0; i < NR; ++i) uv[i] = U[(m + i) * ldu + jr];
    if (HAS_Y)
      for (int i = 0; i < NR; ++i)
        for (int j = 0; j < VW; ++j) acc[i][j] += uv[i] * pv[j];
    if (HAS_D) {
      A* d = D + jr * L + l0;
      A dl[VW];
      for (int j = 0; j < VW; ++j) dl[j] = (FULL || j < w) ? d[j] : A(0);
      for (int i = 0; i < NR; ++i)
        for (int j = 0; j < VW; ++j) dl[j] += uv[i] * xd[i][j];
      for (int j = 0; j < w; ++j) d[j] = dl[j];
    }
  }
  if (HAS_Y)
    for (int i = 0; i < NR; ++i)
      for (int j = 0; j < w; ++j) {
        T* y = Y + (m + i) * L + l0 + j;
        *y = static_cast<T>(static_cast<A>(*y) + alpha * mf[i][j] * acc[i][j]);
      }
}

template <typename T, typename A, int NR, bool HAS_MASK, bool HAS_Y, bool HAS_D>
GSLORA_INLINE void k2_block(T* Y, const T* X, int64_t L, const bool* mask, A keep, A alpha,
                            A dscale, const A* U, int64_t ldu, int64_t r, const A* Pt, A* D,
                            int64_t m) {
  int64_t l0 = 0;
  for (; l0 + VW <= L; l0 += VW)
    k2_chunk<T, A, NR, true, HAS_MASK, HAS_Y, HAS_D>(Y, X, L, mask, keep, alpha, dscale, U, ldu,
                                                      r, Pt, D, m, l0, VW);
  if (l0 < L)
    k2_chunk<T, A, NR, false, HAS_MASK, HAS_Y, HAS_D>(Y, X, L, mask, keep, alpha, dscale, U, ldu,
                                                       r, Pt, D, m, l0, static_cast<int>(L - l0));
}

template <typename T, typename A, bool HAS_MASK, bool HAS_Y, bool HAS_D>
GSLORA_INLINE void k2_rows_impl(T* Y, const T* X, int64_t L, const bool* mask, A keep, A alpha,
                                A dscale, const A* U, int64_t ldu, int64_t r, const A* Pt, A* D,
                                int64_t m0, int64_t m1) {
  int64_t m = m0;
  for (; m + RB <= m1; m += RB)
    k2_block<T, A, RB, HAS_MASK, HAS_Y, HAS_D>(Y, X, L, mask, keep, alpha, dscale, U, ldu, r, Pt,
                                               D, m);
  for (; m < m1; ++m)
    k2_block<T, A, 1, HAS_MASK, HAS_Y, HAS_D>(Y, X, L, mask, keep, alpha, dscale, U, ldu, r, Pt,
                                              D, m);
}

// Concrete, multi-versioned entry points (target_clones cannot apply to templates). The runtime
// flags select a template instantiation once per row range, outside the hot loops.
#define GSLORA_DEFINE_ROW_KERNELS(T, A, SUFFIX)                                                   \
  GSLORA_CLONES void k1_rows_##SUFFIX(const T* X, int64_t L, const bool* mask, A keep, A oscale,  \
                                      const A* P, int64_t RP, A* out, const A* V, A* D,           \
                                      int64_t m0, int64_t m1) {                                   \
    if (D != nullptr)                                                                             \
      k1_rows_impl<T, A, false, true>(X, L, mask, keep, oscale, P, RP, out, V, D, m0, m1);        \
    else if (mask != nullptr)                                                                     \
      k1_rows_impl<T, A, true, false>(X, L, mask, keep, oscale, P, RP, out, V, D, m0, m1);        \
    else                                                                                          \
      k1_rows_impl<T, A, false, false>(X, L, mask, keep, oscale, P, RP, out, V, D, m0, m1);       \
  }                                                                                               \
  GSLORA_CLONES void k2_rows_##SUFFIX(T* Y, const T* X, int64_t L, const bool* mask, A keep,      \
                                      A alpha, A dscale, const A* U, int64_t ldu, int64_t r,      \
                                      const A* Pt, A* D, int64_t m0, int64_t m1) {                \
    const bool hy = Y != nullptr, hd = D != nullptr, hm = mask != nullptr;                        \
    if (hy && !hd)                                                                                \
      k2_rows_impl<T, A, false, true, false>(Y, X, L, mask, keep, alpha, dscale, U, ldu, r, Pt,   \
                                             D, m0, m1);                                          \
    else if (hy && hd && hm)                                                                      \
      k2_rows_impl<T, A, true, true, true>(Y, X, L, mask, keep, alpha, dscale, U, ldu, r, Pt, D,  \
                                           m0, m1);                                               \
    else if (hy && hd)                                                                            \
      k2_rows_impl<T, A, false, true, true>(Y, X, L, mask, keep, alpha, dscale, U, ldu, r, Pt, D, \
                                            m0, m1);                                              \
    else if (hm)                                                                                  \
      k2_rows_impl<T, A, true, false, true>(Y, X, L, mask, keep, alpha, dscale, U, ldu, r, Pt, D, \
                                            m0, m1);                                              \
    else                                                                                          \
      k2_rows_impl<T, A, false, false, true>(Y, X, L, mask, keep, alpha, dscale, U, ldu, r, Pt,   \
                                             D, m0, m1);                                          \
  }

GSLORA_DEFINE_ROW_KERNELS(float, float, f32)
GSLORA_DEFINE_ROW_KERNELS(double, double, f64)
GSLORA_DEFINE_ROW_KERNELS(c10::BFloat16, float, bf16)
GSLORA_DEFINE_ROW_KERNELS(c10::Half, float, f16)
#undef GSLORA_DEFINE_ROW_KERNELS

template <typename T>
struct RowKernels;
#define GSLORA_ROW_KERNELS_OF(T, SUFFIX)                                \
  template <>                                                           \
  struct RowKernels<T> {                                                \
    static constexpr auto k1 = &k1_rows_##SUFFIX;                       \
    static constexpr auto k2 = &k2_rows_##SUFFIX;                       \
  };
GSLORA_ROW_KERNELS_OF(float, f32)
GSLORA_ROW_KERNELS_OF(double, f64)
GSLORA_ROW_KERNELS_OF(c10::BFloat16, bf16)
GSLORA_ROW_KERNELS_OF(c10::Half, f16)
#undef GSLORA_ROW_KERNELS_OF

// Rows per parallel task: enough work per task to amortise scheduling, a multiple of RB.
constexpr int64_t kRowGrain = 32;

// Runs fn(tid, m0, m1) over row blocks on ATen's intra-op threads; tid indexes per-thread
// partial accumulators.
template <typename F>
void parallel_rows(int64_t M, const F& fn) {
  at::parallel_for(0, M, kRowGrain, [&](int64_t m0, int64_t m1) { fn(at::get_thread_num(), m0, m1); });
}

// Threads of the team run_team starts for M rows: at most at::get_num_threads(), and one per
// kRowGrain rows.
int team_size(int64_t M) {
  return static_cast<int>(
      std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, M / kRowGrain)));
}

// The fp32 AVX2 paths run each pass in ONE OpenMP region instead of several parallel_for calls and
// ATen ops around them: each region, and each ATen call on the calling thread in between (the
// transposes, zeroing the partial sums, their reduction), cost tens of µs here against a rank-r
// pass of a few hundred at M = 256. body(tid, team) runs once on every thread of a team of up to
// at::get_num_threads() (one for fewer than two kRowGrain row blocks; one inside another parallel
// region) and may meet the team at `#pragma omp barrier`.
template <typename F>
void run_team(int64_t M, const F& body) {
  const int want = team_size(M);
#pragma omp parallel num_threads(want) if (want > 1)
  body(omp_get_thread_num(), omp_get_num_threads());
}

// Thread tid's part [lo, hi) of n items split over team threads, cut at multiples of `unit`.
inline std::pair<int64_t, int64_t> team_share(int64_t n, int tid, int team, int64_t unit = 1) {
  const int64_t units = gslora::ceil_div(n, unit);
  return {std::min(n, units * tid / team * unit), std::min(n, units * (tid + 1) / team * unit)};
}

// out[i, :cols] = scale * (the sum over t < team of parts[t * stride + i * ld + :cols]), added in
// thread order, for the rows [i0, i1): the per-thread partial sums of dB and dA reduced (plain
// loops: the default clone vectorises them; a few hundred KB at most).
template <typename T>
void sum_partials_row(const T* p, int64_t stride, int team, int64_t cols, T scale, T* o) {
  for (int64_t j = 0; j < cols; ++j) o[j] = p[j];
  for (int t = 1; t < team; ++t)
    for (int64_t j = 0; j < cols; ++j) o[j] += p[t * stride + j];
  if (scale != T(1))
    for (int64_t j = 0; j < cols; ++j) o[j] *= scale;
}

template <typename T>
void sum_partials(const T* parts, int64_t stride, int team, int64_t ld, int64_t cols, T scale,
                  T* out, int64_t i0, int64_t i1) {
  if (ld == cols) {  // rows back to back: one long row (rows of r floats are too short for SIMD)
    sum_partials_row(parts + i0 * ld, stride, team, (i1 - i0) * cols, scale, out + i0 * cols);
    return;
  }
  for (int64_t i = i0; i < i1; ++i)
    sum_partials_row(parts + i * ld, stride, team, cols, scale, out + i * cols);
}

// [rows, cols] -> [rows, RP] in the accumulate dtype, zero-padded: padded columns of P give
// padded columns of out that are exactly zero and never read back.
at::Tensor pad_cols(const at::Tensor& t, int64_t RP, at::ScalarType acc) {
  // r = 8, 16, ... needs no padding: no copy (a strided copy costs tens of µs per call).
  if (t.size(1) == RP && t.scalar_type() == acc && t.is_contiguous()) return t;
  at::Tensor out = at::zeros({t.size(0), RP}, t.options().dtype(acc));
  out.narrow(1, 0, t.size(1)).copy_(t);
  return out;
}

int64_t padded_rank(int64_t r) { return gslora::ceil_div(r, VW) * VW; }

const bool* mask_ptr(const c10::optional<at::Tensor>& mask, at::Tensor& holder) {
  if (!mask.has_value() || !mask->defined()) return nullptr;
  holder = mask->contiguous();
  return holder.data_ptr<bool>();
}

// ---------------------------------------------------------------------------------------------
// Kernels with explicit SIMD for fp32 (and 16-bit inputs widened to it) (the generic K1 above
// compiles to partly scalar code and measured ~12 cycles per element of g in the backward's
// project pass; these ~1-2 with AVX2): lora_simd_kernels.inc compiled twice, for AVX2 + FMA (+
// F16C) and for AVX-512, each in its own namespace (simd_levels.inc). GCC only (#pragma GCC
// target); other compilers take the BLAS path.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GSLORA_HAVE_SIMD_PATH 1
// 16-bit floats as the kernels see them: raw bits (c10's types have inline code that must not be
// compiled under the kernels' target pragmas).
struct Bf16Bits {
  uint16_t bits;
};
struct F16Bits {
  uint16_t bits;
};
// The kernels' storage format of a tensor element type.
template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<c10::BFloat16> {
  using type = Bf16Bits;
};
template <>
struct Storage<c10::Half> {
  using type = F16Bits;
};
static_assert(sizeof(c10::BFloat16) == 2 && sizeof(c10::Half) == 2);

template <typename T>
const typename Storage<T>::type* storage_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename Storage<T>::type*>(t.const_data_ptr<T>());
}
template <typename T>
typename Storage<T>::type* storage_ptr(at::Tensor& t) {
  return reinterpret_cast<typename Storage<T>::type*>(t.data_ptr<T>());
}

#define GSLORA_SIMD_FILE "lora_simd_kernels.inc"
#include "simd_levels.inc"
#undef GSLORA_SIMD_FILE
#endif

// Which kernels run (cpu_kernels.h): levels in kLevelNames' order, each needing the ones before
// it.
constexpr const char* kLevelNames[] = {"blas", "avx2", "avx512"};
constexpr int kLevels = 3;

int level_of(const std::string& name, const char* what) {
  for (int i = 0; i < kLevels; ++i)
    if (name == kLevelNames[i]) return i;
  TORCH_CHECK(false, what, ": unknown CPU kernels '", name, "' (one of blas, avx2, avx512)");
}

// The best level this build and CPU can run.
int best_level() {
#ifdef GSLORA_HAVE_SIMD_PATH
  static const int best = [] {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") ||
        !__builtin_cpu_supports("f16c"))
      return 0;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") ? 2 : 1;
  }();
  return best;
#else
  return 0;
#endif
}

// The level in use: the best one, capped by GSLORA_CPU_KERNELS when set (read at the first call).
std::atomic<int>& selected_level() {
  static std::atomic<int> level([] {
    const char* env = std::getenv("GSLORA_CPU_KERNELS");
    const int best = best_level();
    return env == nullptr || *env == '\0' ? best
                                          : std::min(best, level_of(env, "GSLORA_CPU_KERNELS"));
  }());
  return level;
}

// ---------------------------------------------------------------------------------------------
// fp32 / fp64 without dropout: BLAS for every product, the fused K1 pass only where BLAS is
// slow (u = s g B and dB = s g^T xa: MKL's skinny paths read g at a few GB/s, and g^T xa as
// written is as slow as the full GEMM). In the forward the merged weight W_eff = W + s B A
// (2 extra passes over [N, K] and an [N, K, r] product, not possible with a mask) replaces the
// rank-r adapter term over [M, N] (cost ~ M N r) when M r > kMergeWork K. Measured on an AMD
// EPYC, MKL, 2 threads, against the AVX2 adapter kernel: merging lost at M = 788-2048 for K = 384
// and 768 with r = 8 and 16 (by 2-4 % of the forward), won at M = 4096 with r = 16 (K = 384 and
// 768), and was even at M = 4096, r = 8. In the backward the unmerged order measured as fast as
// the merge at every M, so it is always used.
constexpr int64_t kMergeWork = 64;

bool merge_forward(int64_t M, int64_t K, int64_t r) { return M * r > kMergeWork * K; }

// out [N, r] = s * sum over threads of the partial sums part [T, N, RP] (columns r.. of the
// padding dropped): dB = s g^T xa from its partials (the path without AVX2 and fp64).
template <typename T>
at::Tensor reduce_thread_partials(const at::Tensor& part, int64_t r, double scaling) {
  const int64_t nthreads = part.size(0), N = part.size(1), RP = part.size(2);
  at::Tensor out = at::empty({N, r}, part.options());
  sum_partials<T>(part.const_data_ptr<T>(), N * RP, static_cast<int>(nthreads), RP, r,
                  static_cast<T>(scaling), out.data_ptr<T>(), 0, N);
  return out;
}

// W_eff = W + s B A  [N, K] (one GEMM with k = r, beta = 1): the merge without the SIMD kernels.
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& lora_A,
                         const at::Tensor& lora_B, double scaling) {
  return at::addmm(weight, lora_B, lora_A, /*beta=*/1, /*alpha=*/scaling);
}

// BLAS's single-precision GEMM (Fortran interface) as torch's CPU library exports it: MKL, linked
// into the x86-64 wheels. Weak, so that a torch without it still loads gslora._C; the forward
// then leaves its GEMM to ATen.
extern "C" __attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m,
                                            const int* n, const int* k, const float* alpha,
                                            const float* a, const int* lda, const float* b,
                                            const int* ldb, const float* beta, float* c,
                                            const int* ldc);

// For few rows the unmerged fp32 forward runs its GEMM y += x W^T inside its team: each thread,
// right after writing the adapter term (and the bias) into its block of y's columns, adds
// x W[n0:n1]^T to that block with a single-threaded GEMM (BLAS inside an OpenMP region runs on
// the calling thread) while the block is in its cache. Chosen with paired timings of the layer on
// the Xeon (MKL, 2 threads, K = 384 and 768): faster than MKL's threaded GEMM after the team up
// to M = 384 (most at M = 256), even or slower from M = 512; for fc2-shaped layers (N = K / 4)
// even or faster; for small products (K = N = 128-256 at M = 256) slower: the extra barrier and
// the threads' own BLAS calls cost more than they save below about 2^24 multiply-adds. Only with
// a full team (else threads would idle) and dimensions that fit BLAS's int.
constexpr int64_t kTeamGemmRows = 384;
constexpr int64_t kTeamGemmMinWork = int64_t{1} << 24;  // multiply-adds of x W^T
constexpr int64_t kTeamColumns = 32;  // column blocks: whole 2-vector blocks of the adapter kernel

bool team_gemm(int64_t M, int64_t N, int64_t K) {
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  const int team = team_size(M);
  return sgemm_ != nullptr && M <= kTeamGemmRows && team > 1 && team == at::get_num_threads() &&
         N <= kIntMax && K <= kIntMax && N * K >= gslora::ceil_div(kTeamGemmMinWork, M);
}

// y[:, n0:n1] += x W[n0:n1]^T for x [M, K], W [N, K], y [M, N] (row-major, fp32) on this thread.
void gemm_columns(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K,
                  int64_t n0, int64_t n1) {
  if (n1 <= n0) return;
  // Column-major, as BLAS sees it: y^T[n0:n1, :] += W[n0:n1, :] x^T.
  const int m = static_cast<int>(n1 - n0), n = static_cast<int>(M), k = static_cast<int>(K);
  const int ldc = static_cast<int>(N);
  const float one = 1.0f;
  sgemm_("T", "N", &m, &n, &k, &one, w + n0 * K, &k, x, &k, &one, y + n0, &ldc);
}

#ifdef GSLORA_HAVE_SIMD_PATH
// The SIMD forward's rule. Unmerged, its adapter kernel writes y = b + xa (s B)^T in place of the
// bias copy that the merged forward (like the frozen layer) makes before the GEMM, so the adapter
// term costs only what its r multiply-adds per element of y add to that write. With AVX-512's
// 16-lane FMAs they keep pace with the write up to r = 32: paired timings of the layer on an Intel
// Xeon (MKL, 2 threads, glibc keeping freed memory so that no call took page faults) had the
// unmerged forward faster than the merge at K = 384 (M = 2048-8192, r = 8, 16 and 32) and at
// K = 768 (M = 4096, r = 16 and 32), fwd+bwd too at M = 4096, and slower at K = 384 with r = 48
// and 64 (even at K = 768, r = 48). Where the CPU has AVX-512 the merge therefore waits for
// r > 32. The rule follows the CPU, not the selected kernels, so that the avx2 and avx512 kernels
// still give the same bits on one machine.
constexpr int64_t kMaxUnmergedRankAvx512 = 32;

bool merge_forward_simd(int64_t M, int64_t K, int64_t r) {
  return merge_forward(M, K, r) && (best_level() < 2 || r > kMaxUnmergedRankAvx512);
}

// Forward with the SIMD kernels Kern (avx2:: or avx512::Kernels) for T = float, bf16 or fp16, xa
// and (without a merge) the adapter term in one parallel region: each thread writes its part of
// A^T [K, RP] (zero-padded) and, without a merge, of s B^T [r, N]; after a barrier, for its rows,
// xa = x A^T and then y = b + xa (s B)^T written once by the adapter kernel (while the rows' xa
// is hot), or with a merge its share of W_eff = W + s B A by rows (one MKL call fewer: its k = r
// GEMM for W_eff ran after the region with its own threads and took longer than the team's pass,
// phase timings on an Intel Xeon). Then the big GEMM: y += x W^T (beta = 1), or y = b + x W_eff^T.
// (With team_gemm the team instead meets once more after xa, and each thread writes the adapter
// term into its block of y's columns for all rows and then adds x W^T to that block.) MKL runs
// both rank-r products far below the memory speed (x A^T at M = 4096 took it 0.6-1.7 ms here; the
// adapter term as slowly as the bias copy of a plain Linear times six at M = 788, N = 2048).
// The adapter math is float for every T (xa is rounded to T only for the backward, as the
// generic path does); a 16-bit W_eff would round the adapter's small update away, so 16-bit
// inputs never merge. With a dropout mask xa = d(x) A^T (x widened and masked row block by row
// block) and no merge (x W_eff^T would apply the adapter to the undropped x).
template <class Kern, typename T>
std::tuple<at::Tensor, at::Tensor> fwd_simd(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias,
                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                            double scaling, const bool* mask, double keep_scale,
                                            bool merge) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const int64_t RP = padded_rank(r);
  const bool wide16 = !std::is_same_v<T, float>;  // 16-bit x and y
  const bool widen = wide16 || mask != nullptr;   // the x A^T pass reads widened rows
  merge = merge && !wide16 && mask == nullptr;
  const at::Tensor b = (bias.has_value() && bias->defined())
                           ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor A32 = lora_A.to(at::kFloat).contiguous();
  const at::Tensor B32 = lora_B.to(at::kFloat).contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor At = at::empty({K, RP}, f32);
  at::Tensor sBt = merge ? at::Tensor() : at::empty({r, N}, f32);
  at::Tensor xa_p = at::empty({M, RP}, f32);
  at::Tensor y = merge ? at::Tensor() : at::empty({M, N}, x.options());
  at::Tensor w_eff = merge ? at::empty({N, K}, f32) : at::Tensor();
  at::Tensor wide = widen ? at::empty({at::get_num_threads() * Kern::widen_rows * K}, f32)
                          : at::Tensor();
  const auto* xp = storage_ptr<T>(x);
  const float *a = A32.const_data_ptr<float>(), *bsrc = B32.const_data_ptr<float>();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float *at_ = At.data_ptr<float>(), *bt = merge ? nullptr : sBt.data_ptr<float>();
  float* weffp = merge ? w_eff.data_ptr<float>() : nullptr;
  float* xap = xa_p.data_ptr<float>();
  auto* yp = merge ? nullptr : storage_ptr<T>(y);
  float* widep = widen ? wide.data_ptr<float>() : nullptr;
  const float s = static_cast<float>(scaling), keep = static_cast<float>(keep_scale);
  const bool gemm_in_team = !merge && std::is_same_v<T, float> && team_gemm(M, N, K);
  run_team(M, [&](int tid, int team) {
    const auto [k0, k1] = team_share(K, tid, team);
    Kern::transpose_scaled(a, K, 0, r, k0, k1, 1.0f, at_, RP);  // A^T
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t j = r; j < RP; ++j) at_[k * RP + j] = 0.0f;
    // The thread's block of columns: of s B^T here, and of y below when the GEMM is in the team.
    const auto [n0, n1] = team_share(N, tid, team, kTeamColumns);
    if (!merge) Kern::transpose_scaled(bsrc, r, n0, n1, 0, r, s, bt, N);  // s B^T
#pragma omp barrier
    const auto [m0, m1] = team_share(M, tid, team, RB);
    float* w = widen ? widep + tid * Kern::widen_rows * K : nullptr;
    Kern::xa_rows(xp, K, mask, keep, at_, RP, xap, w, m0, m1);
    if (merge) {
      const auto [n0, n1] = team_share(N, tid, team);
      Kern::merged_rows(weight.const_data_ptr<float>(), bsrc, r, a, s, weffp, K, n0, n1);
    }
    if (!gemm_in_team) {
      if (!merge) Kern::adapter_rows(xap, RP, r, bt, bp, yp, N, N, nullptr, 1.0f, m0, m1);
      return;
    }
#pragma omp barrier
    // Every row's xa is done: the adapter term and then x W^T for all rows in columns [n0, n1).
    Kern::adapter_rows(xap, RP, r, bt + n0, bp ? bp + n0 : nullptr, yp + n0, n1 - n0, N, nullptr,
                       1.0f, 0, M);
    gemm_columns(reinterpret_cast<const float*>(xp), weight.const_data_ptr<float>(),
                 reinterpret_cast<float*>(yp), M, N, K, n0, n1);
  });
  if (merge) {
    y = b.defined() ? at::addmm(b, x, w_eff.t()) : at::mm(x, w_eff.t());
  } else if (!gemm_in_team) {
    y.addmm_(x, weight.t());
  }
  at::Tensor xa = RP == r ? xa_p : xa_p.narrow(1, 0, r).contiguous();
  return {y, wide16 ? xa.to(x.scalar_type()) : xa};
}

// Backward with the SIMD kernels Kern for T = float, bf16 or fp16, in one parallel region. Each
// thread, for its rows: ONE pass over g for s u = s g B and its partial of g^T xa (BLAS reads g
// at a few GB/s for these rank-r products, and g^T xa as BLAS sees it costs as much as the big
// GEMM); then one pass over the rows that writes dx = (s u) A and sums its partial of
// dA = (s u)^T x (MKL took 3-5x the time of a write of dx / a read of x for these). After a
// barrier each thread adds up its rows of dB and dA from all the partials. Then dx += g W inside
// the big GEMM (beta = 1): measured as fast as g W_eff for every M (which costs two passes over
// [N, K]). The adapter math is float for every T; dA and dB are rounded to T at the end. With a
// dropout mask: dx = g W + d'((s u) A) and dA = (s u)^T d(x), x widened and masked per block.
template <class Kern, typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_simd(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, const bool* mask,
    double keep_scale, bool compute_dx) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const int64_t RP = padded_rank(r);
  const bool wide16 = !std::is_same_v<T, float>;  // 16-bit g, x and dx
  const auto f32 = x.options().dtype(at::kFloat);
  const at::Tensor Bp = pad_cols(lora_B, RP, at::kFloat);  // [N, RP]
  const at::Tensor xa_p = pad_cols(xa, RP, at::kFloat);    // [M, RP]
  const at::Tensor A32 = lora_A.to(at::kFloat).contiguous();
  at::Tensor us = at::empty({M, RP}, f32);                 // s u = s g B (padded columns 0)
  // Per thread: its partial of g^T xa [N, RP], then its partial of dA [r, K], then (when its rows
  // may span more than one row-sum block) the project pass's scratch block [N, RP], then the
  // widened rows of g (16-bit) and of d(x) (masked), one after the other.
  const int64_t part_len = N * RP + r * K;
  const int64_t scratch_len = M > Kern::row_sum_block ? N * RP : 0;
  const int64_t wide_len = std::max(wide16 ? Kern::widen_rows * N : 0,
                                    mask != nullptr ? Kern::outer_rows_block * K : 0);
  const int64_t stride = part_len + scratch_len + wide_len;
  at::Tensor parts = at::empty({at::get_num_threads() * stride}, f32);
  at::Tensor dx = compute_dx ? at::empty({M, K}, x.options()) : at::empty({0}, x.options());
  at::Tensor dA = at::empty({r, K}, f32);
  at::Tensor dB = at::empty({N, r}, f32);
  const auto *gp = storage_ptr<T>(g), *xp = storage_ptr<T>(x);
  const float *bptr = Bp.const_data_ptr<float>(), *xap = xa_p.const_data_ptr<float>();
  const float* ap = A32.const_data_ptr<float>();
  float *up = us.data_ptr<float>(), *pp = parts.data_ptr<float>();
  auto* dxp = compute_dx ? storage_ptr<T>(dx) : nullptr;
  float *dAp = dA.data_ptr<float>(), *dBp = dB.data_ptr<float>();
  const float s = static_cast<float>(scaling), keep = static_cast<float>(keep_scale);
  run_team(M, [&](int tid, int team) {
    float* dB_t = pp + tid * stride;
    float* dA_t = dB_t + N * RP;
    float* wide = dB_t + part_len + scratch_len;
    std::fill(dB_t, dB_t + part_len, 0.0f);
    const auto [m0, m1] = team_share(M, tid, team, RB);
    Kern::project_rows(gp, N, bptr, RP, xap, s, up, dB_t, dB_t + part_len, wide, m0, m1);
    if (dxp != nullptr) Kern::adapter_rows(up, RP, r, ap, nullptr, dxp, K, K, mask, keep, m0, m1);
    Kern::outer_rows(up, RP, r, xp, K, mask, keep, dA_t, wide, m0, m1);
#pragma omp barrier
    const auto [n0, n1] = team_share(N, tid, team);
    sum_partials<float>(pp, stride, team, RP, r, s, dBp, n0, n1);  // dB = s g^T xa
    const auto [j0, j1] = team_share(r, tid, team);
    sum_partials<float>(pp + N * RP, stride, team, K, K, 1.0f, dAp, j0, j1);
  });
  if (compute_dx) dx.addmm_(g, weight);
  if (wide16) return {dx, dA.to(lora_A.scalar_type()), dB.to(lora_B.scalar_type())};
  return {dx, dA, dB};
}

// The SIMD forward / backward at the selected kernel level into `out`; false at the "blas" level.
template <typename T>
bool fwd_simd_at_level(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                       const at::Tensor& lora_B, double scaling, const bool* mask,
                       double keep_scale, std::tuple<at::Tensor, at::Tensor>& out) {
  const bool merge = merge_forward_simd(x.size(0), x.size(1), lora_A.size(0));
  switch (selected_level().load()) {
    case 2:
      out = fwd_simd<avx512::Kernels, T>(x, weight, bias, lora_A, lora_B, scaling, mask,
                                         keep_scale, merge);
      return true;
    case 1:
      out = fwd_simd<avx2::Kernels, T>(x, weight, bias, lora_A, lora_B, scaling, mask,
                                       keep_scale, merge);
      return true;
    default: return false;
  }
}

template <typename T>
bool bwd_simd_at_level(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
                       double scaling, const bool* mask, double keep_scale, bool compute_dx,
                       std::tuple<at::Tensor, at::Tensor, at::Tensor>& out) {
  switch (selected_level().load()) {
    case 2:
      out = bwd_simd<avx512::Kernels, T>(g, x, weight, lora_A, lora_B, xa, scaling, mask,
                                         keep_scale, compute_dx);
      return true;
    case 1:
      out = bwd_simd<avx2::Kernels, T>(g, x, weight, lora_A, lora_B, xa, scaling, mask,
                                       keep_scale, compute_dx);
      return true;
    default: return false;
  }
}
#endif

template <typename T>
std::tuple<at::Tensor, at::Tensor> fwd_blas(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias,
                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                            double scaling) {
  const int64_t M = x.size(0), K = x.size(1);
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor xa = at::mm(x, lora_A.t());  // [M, r], one read of x
  at::Tensor y;
  if (merge_forward(M, K, lora_A.size(0))) {
    const at::Tensor w_eff = merged_weight(weight, lora_A, lora_B, scaling);
    y = has_bias ? at::addmm(*bias, x, w_eff.t()) : at::mm(x, w_eff.t());
  } else {
    // The adapter term (and the bias) first, as one rank-(r+1) product that only writes y:
    // y = [xa | 1] [s B | b]^T. The big GEMM then adds x W^T with beta = 1, reading y inside its
    // microkernel. The other order (bias copy, GEMM, then y += s xa B^T) sweeps y once more.
    const at::Tensor sB = lora_B * scaling;
    y = has_bias ? at::mm(at::cat({xa, at::ones({M, 1}, xa.options())}, 1),
                          at::cat({sB, bias->unsqueeze(1)}, 1).t())
                 : at::mm(xa, sB.t());
    y.addmm_(x, weight.t());
  }
  return {y, xa};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_blas(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, bool compute_dx) {
  using A = acc_t<T>;
  static_assert(std::is_same_v<A, T>, "fp32 / fp64 only");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const int64_t RP = padded_rank(r);
  const int nthreads = at::get_num_threads();
  at::Tensor Bp = pad_cols(lora_B, RP, x.scalar_type());   // [N, RP]
  at::Tensor xa_p = pad_cols(xa, RP, x.scalar_type());     // [M, RP]
  at::Tensor us = at::empty({M, RP}, x.options());         // s u = s g B (padded columns 0)
  at::Tensor dB_part = at::zeros({nthreads, N, RP}, x.options());
  {
    const T* gp = g.data_ptr<T>();
    const T *Bptr = Bp.data_ptr<T>(), *xap = xa_p.data_ptr<T>();
    T* up = us.data_ptr<T>();
    T* dBp = dB_part.data_ptr<T>();
    const T s = static_cast<T>(scaling);
    parallel_rows(M, [&](int64_t tid, int64_t m0, int64_t m1) {
      RowKernels<T>::k1(gp, N, nullptr, T(1), s, Bptr, RP, up, xap, dBp + tid * N * RP, m0, m1);
    });
  }
  at::Tensor dx = compute_dx ? at::empty({M, K}, x.options()) : at::empty({0}, x.options());
  const at::Tensor u_r = us.narrow(1, 0, r);  // [M, r] view, row stride RP (BLAS takes it as is)
  if (compute_dx) at::mm_out(dx, u_r, lora_A);
  const at::Tensor dA = at::mm(u_r.t(), x);
  // s u A is in dx; the GEMM adds g W with beta = 1, reading dx inside its microkernel. Measured
  // as fast as g W_eff for every M (which costs two passes over [N, K]).
  if (compute_dx) dx.addmm_(g, weight);
  return {dx, dA, reduce_thread_partials<T>(dB_part, r, scaling)};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> fwd_impl(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias,
                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                            double scaling, const bool* mask, double keep_scale) {
  using A = acc_t<T>;
  const at::ScalarType acc = accumulate_type(x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const int64_t RP = padded_rank(r);
  // Base product straight into y (BLAS), no [M, N] temporary anywhere after it.
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x, weight.t())
                                                       : at::mm(x, weight.t());
  at::Tensor At = pad_cols(lora_A.t(), RP, acc);          // [K, RP]
  at::Tensor Bt = lora_B.t().to(acc).contiguous();        // [r, N]
  at::Tensor xa_acc = at::empty({M, RP}, x.options().dtype(acc));
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const A* Ap = At.data_ptr<A>();
  const A* Bp = Bt.data_ptr<A>();
  A* xap = xa_acc.data_ptr<A>();
  const A keep = static_cast<A>(keep_scale), s = static_cast<A>(scaling);
  parallel_rows(M, [&](int64_t, int64_t m0, int64_t m1) {
    // xa for these rows, then y += s xa B^T for the same rows while xa is hot.
    RowKernels<T>::k1(xp, K, mask, keep, A(1), Ap, RP, xap, nullptr, nullptr, m0, m1);
    RowKernels<T>::k2(yp, nullptr, N, nullptr, A(1), s, A(0), xap, RP, r, Bp, nullptr, m0, m1);
  });
  at::Tensor xa = xa_acc.narrow(1, 0, r).to(x.scalar_type()).contiguous();
  return {y, xa};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_impl(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, const bool* mask,
    double keep_scale, bool compute_dx) {
  using A = acc_t<T>;
  const at::ScalarType acc = accumulate_type(x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const int64_t RP = padded_rank(r);
  const int nthreads = at::get_num_threads();
  at::Tensor Bp = pad_cols(lora_B, RP, acc);                   // [N, RP]
  at::Tensor xa_p = pad_cols(xa, RP, acc);                     // [M, RP]
  at::Tensor Aacc = lora_A.to(acc).contiguous();               // [r, K]
  at::Tensor u = at::empty({M, RP}, x.options().dtype(acc));   // u = g B
  // Per-thread partial sums of dB [N, RP] and dA [r, K]; reduced after the parallel passes.
  at::Tensor dB_part = at::zeros({nthreads, N, RP}, x.options().dtype(acc));
  at::Tensor dA_part = at::zeros({nthreads, r, K}, x.options().dtype(acc));
  const A keep = static_cast<A>(keep_scale), s = static_cast<A>(scaling);
  {
    const T* gp = g.data_ptr<T>();
    const A *Bptr = Bp.data_ptr<A>(), *xap = xa_p.data_ptr<A>();
    A* up = u.data_ptr<A>();
    A* dBp = dB_part.data_ptr<A>();
    // One pass over g: u = g B and dB += g^T xa.
    parallel_rows(M, [&](int64_t tid, int64_t m0, int64_t m1) {
      A* dBt = dBp + tid * N * RP;
      RowKernels<T>::k1(gp, N, nullptr, A(1), A(1), Bptr, RP, up, xap, dBt, m0, m1);
    });
  }
  at::Tensor dx;
  if (compute_dx) {
    dx = at::mm(g, weight);  // base product straight into dx (BLAS)
  } else {
    dx = at::empty({0}, x.options());
  }
  {
    const T* xp = x.data_ptr<T>();
    T* dxp = compute_dx ? dx.data_ptr<T>() : nullptr;
    const A *Ap = Aacc.data_ptr<A>(), *up = u.data_ptr<A>();
    A* dAp = dA_part.data_ptr<A>();
    // One pass over (x, dx): dx += s d(u A) and dA += s u^T d(x).
    parallel_rows(M, [&](int64_t tid, int64_t m0, int64_t m1) {
      RowKernels<T>::k2(dxp, xp, K, mask, keep, s, s, up, RP, r, Ap, dAp + tid * r * K, m0, m1);
    });
  }
  at::Tensor dB = dB_part.sum(0).narrow(1, 0, r).mul_(scaling).to(lora_B.scalar_type()).contiguous();
  at::Tensor dA = dA_part.sum(0).to(lora_A.scalar_type());
  return {dx, dA, dB};
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias,
    const at::Tensor& A_in, const at::Tensor& B_in, double scaling,
    const c10::optional<at::Tensor>& mask, double keep_scale) {
  check_lora_fwd_args(x_in, weight_in, bias, A_in, B_in, mask, keep_scale);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor lora_A = A_in.contiguous(), lora_B = B_in.contiguous();
  at::Tensor mask_holder;
  const bool* mp = mask_ptr(mask, mask_holder);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_linear_fwd_cpu", [&] {
    if (x.size(0) > 0) {
      if constexpr (!std::is_same_v<scalar_t, double>) {
#ifdef GSLORA_HAVE_SIMD_PATH
        // fp32 and 16-bit, with or without a dropout mask: the SIMD kernels (16-bit or masked
        // rows of x widened to float as they are read).
        if (fwd_simd_at_level<scalar_t>(x, weight, bias, lora_A, lora_B, scaling, mp, keep_scale,
                                        out))
          return;
#endif
      }
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
        if (mp == nullptr) {
          out = fwd_blas<scalar_t>(x, weight, bias, lora_A, lora_B, scaling);
          return;
        }
      }
    }
    out = fwd_impl<scalar_t>(x, weight, bias, lora_A, lora_B, scaling, mp, keep_scale);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(
    const at::Tensor& g_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& A_in, const at::Tensor& B_in, const at::Tensor& xa_in, double scaling,
    const c10::optional<at::Tensor>& mask, double keep_scale, bool compute_dx) {
  check_lora_bwd_args(g_in, x_in, weight_in, A_in, B_in, xa_in, mask, keep_scale);
  const at::Tensor g = g_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor lora_A = A_in.contiguous(), lora_B = B_in.contiguous();
  at::Tensor mask_holder;
  const bool* mp = mask_ptr(mask, mask_holder);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_linear_bwd_cpu", [&] {
    if (x.size(0) > 0) {
      if constexpr (!std::is_same_v<scalar_t, double>) {
#ifdef GSLORA_HAVE_SIMD_PATH
        // fp32 and 16-bit, with or without a dropout mask: the SIMD kernels.
        if (bwd_simd_at_level<scalar_t>(g, x, weight, lora_A, lora_B, xa_in.contiguous(), scaling,
                                        mp, keep_scale, compute_dx, out))
          return;
#endif
      }
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
        if (mp == nullptr) {
          out = bwd_blas<scalar_t>(g, x, weight, lora_A, lora_B, xa_in.contiguous(), scaling,
                                   compute_dx);
          return;
        }
      }
    }
    out = bwd_impl<scalar_t>(g, x, weight, lora_A, lora_B, xa_in, scaling, mp, keep_scale,
                             compute_dx);
  });
  return out;
}

}  // namespace

std::string cpu_kernels() { return kLevelNames[selected_level().load()]; }

int cpu_kernel_level() { return selected_level().load(); }

std::string set_cpu_kernels(const std::string& name) {
  const int level = level_of(name, "set_cpu_kernels");
  TORCH_CHECK(level <= best_level(), "set_cpu_kernels: this CPU or build cannot run the '", name,
              "' kernels (it can run: ", kLevelNames[best_level()], " and below)");
  return kLevelNames[selected_level().exchange(level)];
}

std::vector<std::string> cpu_kernels_supported() {
  std::vector<std::string> out;
  for (int i = best_level(); i >= 0; --i) out.emplace_back(kLevelNames[i]);
  return out;
}

}  // namespace gslora

TORCH_LIBRARY_IMPL(gslora, CPU, m) {
  m.impl("lora_linear_fwd", &gslora::lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &gslora::lora_linear_bwd_cpu);
}
