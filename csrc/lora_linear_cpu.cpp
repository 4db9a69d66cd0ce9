// CPU kernels of the LoRA linear: y = x W^T + b + s (d(x) A^T) B^T and its backward.
//
// fp32 / fp64 without dropout (the training hot path; measured on an AMD EPYC with MKL):
//   forward : xa = x A^T; y = b + x W_eff^T with W_eff = W + s B A when M r > 64 K, else
//             y = b + xa (s B)^T (written once) and then y += x W^T inside the big GEMM
//             (beta = 1: y is read in its microkernel). In fp32 on AVX2 CPUs the rank-r
//             products are explicit AVX2 kernels (xa_rows_avx2, adapter_rows_avx2) in one
//             parallel region (fwd_avx2); otherwise BLAS ([xa | 1] [s B | b]^T for the second).
//   backward: ONE fused pass over g gives s u = s g B and dB = s g^T xa (explicit AVX2: BLAS
//             reads g for these rank-r products at a few GB/s, and g^T xa as BLAS sees it costs
//             as much as the big GEMM); then one pass over the rows writes dx = (s u) A and
//             sums dA = (s u)^T x (AVX2: MKL took 3-5x the time of a write of dx / a read of x
//             for these), and dx += g W inside the big GEMM (beta = 1). In fp32 with AVX2 all
//             but the GEMM run in one parallel region (bwd_avx2). Without AVX2: BLAS.
//   With a dropout mask W_eff is not an identity, so masked calls and the 16-bit dtypes take
//   the fused row-block kernels below (whose u / dB pass is the same AVX2 kernel for fp32).
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
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "gslora_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GSLORA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GSLORA_CLONES
#endif
#define GSLORA_INLINE inline __attribute__((always_inline))

namespace gslora {
namespace {

constexpr int VW = 8;      // vector width of the inner loops (one AVX2 register of floats)
constexpr int64_t RB = 4;  // rows per register block

// ---------------------------------------------------------------------------------------------
// K1: out[m, c:c+VW] = oscale * sum_l d(X)[m, l] P[l, c:c+VW] for every column chunk c of the
// padded rank RP (a multiple of VW), and D[l, :] += sum_m X[m, l] V[m, :] when HAS_D.
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
    for (int64_t l = 0; l < L; ++l) {
      const A* p = P + l * RP + c;
      A xr[NR], xd[NR];
      for (int i = 0; i < NR; ++i) {
        xr[i] = static_cast<A>(X[(m + i) * L + l]);
        xd[i] = HAS_MASK ? (mask[(m + i) * L + l] ? xr[i] * keep : A(0)) : xr[i];
      }
      for (int i = 0; i < NR; ++i)
        for (int j = 0; j < VW; ++j) acc[i][j] += xd[i] * p[j];
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

// The fp32 AVX2 paths run each pass in ONE OpenMP region instead of several parallel_for calls and
// ATen ops around them: each region, and each ATen call on the calling thread in between (the
// transposes, zeroing the partial sums, their reduction), cost tens of µs here against a rank-r
// pass of a few hundred at M = 256. body(tid, team) runs once on every thread of a team of up to
// at::get_num_threads() (one for fewer than two kRowGrain row blocks; one inside another parallel
// region) and may meet the team at `#pragma omp barrier`.
template <typename F>
void run_team(int64_t M, const F& body) {
  const int want = static_cast<int>(
      std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, M / kRowGrain)));
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
void sum_partials(const T* parts, int64_t stride, int team, int64_t ld, int64_t cols, T scale,
                  T* out, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    T* o = out + i * cols;
    const T* p = parts + i * ld;
    for (int64_t j = 0; j < cols; ++j) o[j] = p[j];
    for (int t = 1; t < team; ++t)
      for (int64_t j = 0; j < cols; ++j) o[j] += p[t * stride + j];
    if (scale != T(1))
      for (int64_t j = 0; j < cols; ++j) o[j] *= scale;
  }
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
// fp32 "project" pass of the backward with explicit AVX2 (the generic K1 above compiles to
// partly scalar code and measured ~12 cycles per element of g; this one ~1-2): for the rows
// [m0, m1) of g [M, N] and the padded rank RP,
//   us[m, :] = s * sum_n g[m, n] Bp[n, :]          (s u = s g B)
//   D[n, :] += sum_m g[m, n] xa[m, :]               (g^T xa, this thread's partial)
// in passes over 16 columns (CW = 2 chunks of 8) with NR = 4 rows, then a last 8-column chunk
// with NR = 8: each pass keeps NR x CW independent FMA chains for us and CW for D in flight, and
// each load of Bp[n] / D[n] serves NR rows. (One chunk per pass with 4 rows, as before, ran the
// r = 16 pass 1.3-1.5x slower: half the chains, and g read once per chunk.) Both sums are blocked
// (partials of kSumBlock terms over n, kRowSumBlock rows over m, added at the end) so that their
// rounding error grows like BLAS's, not linearly in N or M.
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define GSLORA_HAVE_AVX2_PATH 1

constexpr int64_t kSumBlock = 128;
constexpr int64_t kRowSumBlock = 256;

// Columns [c, c + 8 CW) of the pass above for the NR rows from m. Without HAS_D it is the plain
// projection us = s g Bp (the forward's xa = x A^T uses it).
template <int NR, int CW, bool HAS_D>
__attribute__((target("avx2,fma"))) GSLORA_INLINE void project_block_avx2(
    const float* __restrict g, int64_t N, const float* __restrict Bp, int64_t RP, int64_t c,
    const float* __restrict xa, __m256 sv, float* __restrict us, float* __restrict D, int64_t m) {
  __m256 acc[NR][CW], xv[NR][CW];
  const float* grow[NR];
  for (int i = 0; i < NR; ++i) {
    for (int w = 0; w < CW; ++w) {
      acc[i][w] = _mm256_setzero_ps();
      xv[i][w] = HAS_D ? _mm256_loadu_ps(xa + (m + i) * RP + c + 8 * w) : _mm256_setzero_ps();
    }
    grow[i] = g + (m + i) * N;
  }
  for (int64_t n0 = 0; n0 < N; n0 += kSumBlock) {
    const int64_t n1 = std::min(N, n0 + kSumBlock);
    __m256 part[NR][CW];
    for (int i = 0; i < NR; ++i)
      for (int w = 0; w < CW; ++w) part[i][w] = _mm256_setzero_ps();
    const float* bp = Bp + n0 * RP + c;
    for (int64_t n = n0; n < n1; ++n, bp += RP) {
      float* dp = HAS_D ? D + n * RP + c : nullptr;
      __m256 bv[CW], d[CW];
      for (int w = 0; w < CW; ++w) {
        bv[w] = _mm256_loadu_ps(bp + 8 * w);
        d[w] = HAS_D ? _mm256_loadu_ps(dp + 8 * w) : _mm256_setzero_ps();
      }
      for (int i = 0; i < NR; ++i) {
        const __m256 gi = _mm256_broadcast_ss(grow[i] + n);
        for (int w = 0; w < CW; ++w) {
          part[i][w] = _mm256_fmadd_ps(gi, bv[w], part[i][w]);
          if (HAS_D) d[w] = _mm256_fmadd_ps(gi, xv[i][w], d[w]);
        }
      }
      if (HAS_D)
        for (int w = 0; w < CW; ++w) _mm256_storeu_ps(dp + 8 * w, d[w]);
    }
    for (int i = 0; i < NR; ++i)
      for (int w = 0; w < CW; ++w) acc[i][w] = _mm256_add_ps(acc[i][w], part[i][w]);
  }
  for (int i = 0; i < NR; ++i)
    for (int w = 0; w < CW; ++w)
      _mm256_storeu_ps(us + (m + i) * RP + c + 8 * w, _mm256_mul_ps(acc[i][w], sv));
}

template <int NR, int CW, bool HAS_D>
__attribute__((target("avx2,fma"))) GSLORA_INLINE void project_pass_avx2(
    const float* g, int64_t N, const float* Bp, int64_t RP, int64_t c, const float* xa, __m256 sv,
    float* us, float* D, int64_t m0, int64_t m1) {
  int64_t m = m0;
  for (; m + NR <= m1; m += NR) project_block_avx2<NR, CW, HAS_D>(g, N, Bp, RP, c, xa, sv, us, D, m);
  for (; m < m1; ++m) project_block_avx2<1, CW, HAS_D>(g, N, Bp, RP, c, xa, sv, us, D, m);
}

// Every column of the rows [m0, m1): 16-column passes, then the last 8 columns.
template <bool HAS_D>
__attribute__((target("avx2,fma"))) GSLORA_INLINE void project_range_avx2(
    const float* g, int64_t N, const float* Bp, int64_t RP, const float* xa, __m256 sv,
    float* us, float* D, int64_t m0, int64_t m1) {
  int64_t c = 0;
  for (; c + 16 <= RP; c += 16)
    project_pass_avx2<4, 2, HAS_D>(g, N, Bp, RP, c, xa, sv, us, D, m0, m1);
  if (c < RP) project_pass_avx2<8, 1, HAS_D>(g, N, Bp, RP, c, xa, sv, us, D, m0, m1);
}

// D [N, RP] += the g^T xa sum over rows [m0, m1), kRowSumBlock rows at a time: the first block
// straight into D, later ones in a scratch block then added to D.
__attribute__((target("avx2,fma"))) void project_rows_avx2(const float* g, int64_t N,
                                                           const float* Bp, int64_t RP,
                                                           const float* xa, float s, float* us,
                                                           float* D, int64_t m0, int64_t m1) {
  const __m256 sv = _mm256_set1_ps(s);
  std::vector<float> part;
  for (int64_t b0 = m0; b0 < m1; b0 += kRowSumBlock) {
    const int64_t b1 = std::min(m1, b0 + kRowSumBlock);
    float* P = D;
    if (b0 > m0) {
      part.assign(static_cast<size_t>(N * RP), 0.0f);
      P = part.data();
    }
    project_range_avx2<true>(g, N, Bp, RP, xa, sv, us, P, b0, b1);
    if (P != D)
      for (int64_t i = 0; i < N * RP; i += 8)
        _mm256_storeu_ps(D + i, _mm256_add_ps(_mm256_loadu_ps(D + i), _mm256_loadu_ps(P + i)));
  }
}

// xa [M, RP] = x A^T for the rows [m0, m1) of x [M, K], At [K, RP] (the padded A^T): the projection
// above without D. MKL reads x at a few GB/s for this rank-r product.
__attribute__((target("avx2,fma"))) void xa_rows_avx2(const float* x, int64_t K, const float* At,
                                                      int64_t RP, float* xa, int64_t m0,
                                                      int64_t m1) {
  project_range_avx2<false>(x, K, At, RP, nullptr, _mm256_set1_ps(1.0f), xa, nullptr, m0, m1);
}

// y[m, :] = b + xa[m, :r] sBt for the rows [m0, m1): the adapter term (and the bias) written once
// into y, which the big GEMM then accumulates into with beta = 1. xa [M, RP], sBt [r, N] = s B^T,
// b [N] or null. 16 columns x NR rows per register block (12 accumulators for NR = 6, 1.2-1.3x
// faster than NR = 4 here); each sBt row load serves NR rows.
template <int NR>
__attribute__((target("avx2,fma"))) GSLORA_INLINE void adapter_block_avx2(
    const float* __restrict xa, int64_t RP, int64_t r, const float* __restrict sBt,
    const float* __restrict b, float* __restrict y, int64_t N, int64_t m) {
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) {
    __m256 acc[NR][2];
    const __m256 b0 = b ? _mm256_loadu_ps(b + n) : _mm256_setzero_ps();
    const __m256 b1 = b ? _mm256_loadu_ps(b + n + 8) : _mm256_setzero_ps();
    for (int i = 0; i < NR; ++i) {
      acc[i][0] = b0;
      acc[i][1] = b1;
    }
    for (int64_t j = 0; j < r; ++j) {
      const __m256 v0 = _mm256_loadu_ps(sBt + j * N + n);
      const __m256 v1 = _mm256_loadu_ps(sBt + j * N + n + 8);
      for (int i = 0; i < NR; ++i) {
        const __m256 a = _mm256_broadcast_ss(xa + (m + i) * RP + j);
        acc[i][0] = _mm256_fmadd_ps(a, v0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(a, v1, acc[i][1]);
      }
    }
    for (int i = 0; i < NR; ++i) {
      _mm256_storeu_ps(y + (m + i) * N + n, acc[i][0]);
      _mm256_storeu_ps(y + (m + i) * N + n + 8, acc[i][1]);
    }
  }
  for (; n < N; ++n)  // column tail
    for (int i = 0; i < NR; ++i) {
      float v = b ? b[n] : 0.0f;
      for (int64_t j = 0; j < r; ++j) v += xa[(m + i) * RP + j] * sBt[j * N + n];
      y[(m + i) * N + n] = v;
    }
}

__attribute__((target("avx2,fma"))) void adapter_rows_avx2(const float* xa, int64_t RP, int64_t r,
                                                           const float* sBt, const float* b,
                                                           float* y, int64_t N, int64_t m0,
                                                           int64_t m1) {
  int64_t m = m0;
  for (; m + 6 <= m1; m += 6) adapter_block_avx2<6>(xa, RP, r, sBt, b, y, N, m);
  for (; m < m1; ++m) adapter_block_avx2<1>(xa, RP, r, sBt, b, y, N, m);
}

// D[j0 + j, k:k+8] += sum over the rows [m0, m1) of us[m, j0 + j] x[m, k:k+8], j < JN: JN
// independent FMA chains over the rows, each D chunk loaded and stored once per call. PREFETCH:
// also fetch the next cache line of each row of x, which the walk after next reads (the walk down
// the rows defeats the hardware prefetcher: with x in memory it ran 1.4-1.5x slower without).
template <int JN, bool PREFETCH>
__attribute__((target("avx2,fma"))) GSLORA_INLINE void outer_cols_avx2(
    const float* __restrict us, int64_t RP, int64_t j0, const float* __restrict x, int64_t K,
    float* __restrict D, int64_t k, int64_t m0, int64_t m1) {
  __m256 acc[JN];
  for (int j = 0; j < JN; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t m = m0; m < m1; ++m) {
    const __m256 xv = _mm256_loadu_ps(x + m * K + k);
    if (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(x + m * K + k + 16), _MM_HINT_T0);
    for (int j = 0; j < JN; ++j)
      acc[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(us + m * RP + j0 + j), xv, acc[j]);
  }
  for (int j = 0; j < JN; ++j) {
    float* d = D + (j0 + j) * K + k;
    _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), acc[j]));
  }
}

// D [r, K] += (s u)^T x over the rows [m0, m1) (this thread's partial of dA), in
// blocks of kOuterRows rows, each swept 8 columns of x by up to 8 rows of D at a time. (Row
// blocks of x in registers with a chain through each D chunk, as before, ran 1.3-1.5x slower with
// x in L2 or L3 at r = 16: the chains were as long as the block; with x in memory that order
// streams x better and was up to 1.6x faster, at K = 768, r = 8.) MKL reads x for this rank-r
// product at a fraction of the memory speed.
constexpr int64_t kOuterRows = 64;

__attribute__((target("avx2,fma"))) void outer_rows_avx2(const float* us, int64_t RP, int64_t r,
                                                         const float* x, int64_t K, float* D,
                                                         int64_t m0, int64_t m1) {
  for (int64_t b0 = m0; b0 < m1; b0 += kOuterRows) {
    const int64_t b1 = std::min(m1, b0 + kOuterRows);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      // Prefetch on the first sweep over each 16-float cache line of the rows.
      const bool pf = k % 16 == 0 && k + 16 < K;
      int64_t j = 0;
      for (; j + 8 <= r; j += 8) {
        if (pf && j == 0)
          outer_cols_avx2<8, true>(us, RP, j, x, K, D, k, b0, b1);
        else
          outer_cols_avx2<8, false>(us, RP, j, x, K, D, k, b0, b1);
      }
      for (; j + 4 <= r; j += 4) outer_cols_avx2<4, false>(us, RP, j, x, K, D, k, b0, b1);
      for (; j < r; ++j) outer_cols_avx2<1, false>(us, RP, j, x, K, D, k, b0, b1);
    }
    for (; k < K; ++k)  // column tail
      for (int64_t j = 0; j < r; ++j) {
        float d = 0.0f;
        for (int64_t m = b0; m < b1; ++m) d += us[m * RP + j] * x[m * K + k];
        D[j * K + k] += d;
      }
  }
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

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

// W_eff = W + s B A  [N, K] (one GEMM with k = r, beta = 1).
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& lora_A,
                         const at::Tensor& lora_B, double scaling) {
  return at::addmm(weight, lora_B, lora_A, /*beta=*/1, /*alpha=*/scaling);
}

#ifdef GSLORA_HAVE_AVX2_PATH
// fp32 forward with AVX2, xa and (without a merge) the adapter term in one parallel region: each
// thread writes its part of A^T [K, RP] (zero-padded) and, without a merge, of s B^T [r, N]; after
// a barrier, for its rows, xa = x A^T and then y = b + xa (s B)^T written once by the adapter
// kernel (while the rows' xa is hot). Then the big GEMM: y += x W^T (beta = 1), or with a merge
// y = b + x W_eff^T. MKL runs both rank-r products far below the memory speed (x A^T at M = 4096
// took it 0.6-1.7 ms here; the adapter term as slowly as the bias copy of a plain Linear times six
// at M = 788, N = 2048).
std::tuple<at::Tensor, at::Tensor> fwd_avx2(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias,
                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                            double scaling, bool merge) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const int64_t RP = padded_rank(r);
  const at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  at::Tensor At = at::empty({K, RP}, x.options());
  at::Tensor sBt = merge ? at::Tensor() : at::empty({r, N}, x.options());
  at::Tensor xa_p = at::empty({M, RP}, x.options());
  at::Tensor y = merge ? at::Tensor() : at::empty({M, N}, x.options());
  const float *xp = x.const_data_ptr<float>(), *a = lora_A.const_data_ptr<float>();
  const float *bsrc = lora_B.const_data_ptr<float>(), *bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float *at_ = At.data_ptr<float>(), *bt = merge ? nullptr : sBt.data_ptr<float>();
  float *xap = xa_p.data_ptr<float>(), *yp = merge ? nullptr : y.data_ptr<float>();
  const float s = static_cast<float>(scaling);
  run_team(M, [&](int tid, int team) {
    const auto [k0, k1] = team_share(K, tid, team);
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t j = 0; j < RP; ++j) at_[k * RP + j] = j < r ? a[j * K + k] : 0.0f;
    if (!merge) {
      const auto [n0, n1] = team_share(N, tid, team);
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t j = 0; j < r; ++j) bt[j * N + n] = s * bsrc[n * r + j];
    }
#pragma omp barrier
    const auto [m0, m1] = team_share(M, tid, team, RB);
    xa_rows_avx2(xp, K, at_, RP, xap, m0, m1);
    if (!merge) adapter_rows_avx2(xap, RP, r, bt, bp, yp, N, m0, m1);
  });
  if (merge) {
    const at::Tensor w_eff = merged_weight(weight, lora_A, lora_B, scaling);
    y = b.defined() ? at::addmm(b, x, w_eff.t()) : at::mm(x, w_eff.t());
  } else {
    y.addmm_(x, weight.t());
  }
  at::Tensor xa = RP == r ? xa_p : xa_p.narrow(1, 0, r).contiguous();
  return {y, xa};
}

// fp32 backward with AVX2, in one parallel region. Each thread, for its rows: ONE pass over g for
// s u = s g B and its partial of g^T xa (BLAS reads g at a few GB/s for these rank-r products, and
// g^T xa as BLAS sees it costs as much as the big GEMM); then one pass over the rows that writes
// dx = (s u) A and sums its partial of dA = (s u)^T x (MKL took 3-5x the time of a write of dx / a
// read of x for these). After a barrier each thread adds up its rows of dB and dA from all the
// partials. Then dx += g W inside the big GEMM (beta = 1): measured as fast as g W_eff for every M
// (which costs two passes over [N, K]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_avx2(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, bool compute_dx) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const int64_t RP = padded_rank(r);
  const at::Tensor Bp = pad_cols(lora_B, RP, at::kFloat);  // [N, RP]
  const at::Tensor xa_p = pad_cols(xa, RP, at::kFloat);    // [M, RP]
  at::Tensor us = at::empty({M, RP}, x.options());         // s u = s g B (padded columns 0)
  // Per thread: its partial of g^T xa [N, RP], then its partial of dA [r, K].
  const int64_t part_len = N * RP + r * K;
  at::Tensor parts = at::empty({at::get_num_threads() * part_len}, x.options());
  at::Tensor dx = compute_dx ? at::empty({M, K}, x.options()) : at::empty({0}, x.options());
  at::Tensor dA = at::empty({r, K}, x.options());
  at::Tensor dB = at::empty({N, r}, x.options());
  const float *gp = g.const_data_ptr<float>(), *xp = x.const_data_ptr<float>();
  const float *bptr = Bp.const_data_ptr<float>(), *xap = xa_p.const_data_ptr<float>();
  const float* ap = lora_A.const_data_ptr<float>();
  float *up = us.data_ptr<float>(), *pp = parts.data_ptr<float>();
  float *dxp = compute_dx ? dx.data_ptr<float>() : nullptr;
  float *dAp = dA.data_ptr<float>(), *dBp = dB.data_ptr<float>();
  const float s = static_cast<float>(scaling);
  run_team(M, [&](int tid, int team) {
    float* dB_t = pp + tid * part_len;
    float* dA_t = dB_t + N * RP;
    std::fill(dB_t, dB_t + part_len, 0.0f);
    const auto [m0, m1] = team_share(M, tid, team, RB);
    project_rows_avx2(gp, N, bptr, RP, xap, s, up, dB_t, m0, m1);
    if (dxp != nullptr) adapter_rows_avx2(up, RP, r, ap, nullptr, dxp, K, m0, m1);
    outer_rows_avx2(up, RP, r, xp, K, dA_t, m0, m1);
#pragma omp barrier
    const auto [n0, n1] = team_share(N, tid, team);
    sum_partials<float>(pp, part_len, team, RP, r, s, dBp, n0, n1);  // dB = s g^T xa
    const auto [j0, j1] = team_share(r, tid, team);
    sum_partials<float>(pp + N * RP, part_len, team, K, K, 1.0f, dAp, j0, j1);
  });
  if (compute_dx) dx.addmm_(g, weight);
  return {dx, dA, dB};
}
#endif

template <typename T>
std::tuple<at::Tensor, at::Tensor> fwd_blas(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias,
                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                            double scaling) {
  const int64_t M = x.size(0), K = x.size(1);
  const bool has_bias = bias.has_value() && bias->defined();
#ifdef GSLORA_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2_fma())
      return fwd_avx2(x, weight, bias, lora_A, lora_B, scaling, merge_forward(M, K, lora_A.size(0)));
  }
#endif
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
#ifdef GSLORA_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2_fma())
      return bwd_avx2(g, x, weight, lora_A, lora_B, xa, scaling, compute_dx);
  }
#endif
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
#ifdef GSLORA_HAVE_AVX2_PATH
      if constexpr (std::is_same_v<T, float>) {
        if (cpu_has_avx2_fma()) return project_rows_avx2(gp, N, Bptr, RP, xap, A(1), up, dBt, m0, m1);
      }
#endif
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
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      if (mp == nullptr && x.size(0) > 0) {
        out = fwd_blas<scalar_t>(x, weight, bias, lora_A, lora_B, scaling);
        return;
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
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      if (mp == nullptr && x.size(0) > 0) {
        out = bwd_blas<scalar_t>(g, x, weight, lora_A, lora_B, xa_in.contiguous(), scaling,
                                 compute_dx);
        return;
      }
    }
    out = bwd_impl<scalar_t>(g, x, weight, lora_A, lora_B, xa_in, scaling, mp, keep_scale,
                             compute_dx);
  });
  return out;
}

}  // namespace
}  // namespace gslora

TORCH_LIBRARY_IMPL(gslora, CPU, m) {
  m.impl("lora_linear_fwd", &gslora::lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &gslora::lora_linear_bwd_cpu);
}
