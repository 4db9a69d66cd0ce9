// CPU kernels of the group-sparsity ops: per-group squared norms, per-group scaling, the in-place
// proximal step (block soft-thresholding), the AdamW step fused with it and the penalty's
// gradient written into .grad, over a whole list of tensors in one call.
//
// For the norms the threads split every group evenly between them (so the work balances whatever
// the number and sizes of the groups) and sum the squares of their shares. The prox, the fused
// AdamW step and the penalty's gradient must finish a group (norm, then rewrite) while it is in
// cache: each thread takes whole groups when that balances (a model's equal-sized blocks), else
// an even share of every group with a barrier per group. The prox and the gradient rewrite one
// group while summing the next (for_each_group_rewrite; the prox step by step within each piece,
// sum_squares_scale). Calls too small to pay for waking the thread team run on the calling
// thread. Partial sums are added in thread order, so results do not depend on timing.
// Squares are summed in float (double for double) in four 32-byte vector accumulators per
// 4096-element chunk, and the chunk sums are added in double, which keeps fp32 sums of millions
// of elements accurate.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "always_inline.h"
#include "checks.h"
#include "gslora_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// x86-64-v4 (AVX-512) too: the in-place scale of the prox moves 64 bytes per instruction there.
#define GSLORA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GSLORA_CLONES
#endif

namespace gslora {
namespace {

constexpr int64_t kChunk = 4096;  // elements summed in the accumulate type before going to double
// Below this many elements per call the kernels run on the calling thread: waking an OpenMP
// team costs more than the pass itself.
constexpr int64_t kParallelMin = 1 << 15;

// 32 bytes of the accumulate type as a GCC/Clang vector: + and * become AVX instructions in the
// x86-64-v3 clone and SSE pairs in the default one. Written out instead of left to the
// auto-vectoriser, which turned a 16-lane scalar loop into a slow shuffle-heavy SLP kernel.
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
template <typename A>  // A: an accumulate type, float or double
using vec_t = std::conditional_t<std::is_same_v<A, double>, f64x4, f32x8>;

// v = p[0 .. W) in the accumulate type (an out-parameter: returning a vector by value from a
// non-AVX translation unit would trip GCC's ABI warning).
template <typename T>
inline void load_acc(const T* p, vec_t<acc_t<T>>& v) {
  using A = acc_t<T>;
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(&v, p, sizeof(v));  // unaligned load
  } else {
    for (size_t j = 0; j < sizeof(v) / sizeof(A); ++j) v[j] = static_cast<A>(p[j]);
  }
}

// Elements per step of the sum of squares: four vectors of the accumulate type.
template <typename T>
constexpr int64_t kSumBlockElems = 4 * int64_t(sizeof(vec_t<acc_t<T>>) / sizeof(acc_t<T>));

// The sum of squares of p[c0, c1) (one chunk: c1 - c0 <= kChunk) in the accumulate type. After
// each step of kSumBlockElems<T> elements it calls side(offset of the step from c0), so that
// other memory work can run alongside the loads (sum_squares_scale_impl); the sum itself does
// not depend on side.
template <typename T, typename Side>
GSLORA_INLINE acc_t<T> chunk_sum_squares(const T* p, int64_t c0, int64_t c1, Side&& side) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int64_t W = sizeof(V) / sizeof(A);
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = c0;
  for (; i + 4 * W <= c1; i += 4 * W) {
    V v0, v1, v2, v3;
    load_acc(p + i, v0);
    load_acc(p + i + W, v1);
    load_acc(p + i + 2 * W, v2);
    load_acc(p + i + 3 * W, v3);
    a0 += v0 * v0;
    a1 += v1 * v1;
    a2 += v2 * v2;
    a3 += v3 * v3;
    side(i - c0);
  }
  const V a = (a0 + a1) + (a2 + a3);
  A chunk = A(0);
  for (int64_t j = 0; j < W; ++j) chunk += a[j];
  for (; i < c1; ++i) {
    const A v = static_cast<A>(p[i]);
    chunk += v * v;
  }
  return chunk;
}

template <typename T>
inline double sum_squares_impl(const T* p, int64_t n) {
  double total = 0.0;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk)
    total += static_cast<double>(chunk_sum_squares(p, c0, std::min(n, c0 + kChunk),
                                                   [](int64_t) {}));
  return total;
}

// out[i] = in[i] * f, computed in the accumulate type and rounded once; f == 0 writes exact zeros.
// Element-wise, so any vector width gives the same bits: 64-byte vectors, one AVX-512 register in
// the x86-64-v4 clone (the prox rewrites each group from L2, where the width pays), two AVX ones
// in the v3 clone.
template <typename T>
GSLORA_INLINE void scale_impl(const T* in, T* out, int64_t n, acc_t<T> f) {
  using A = acc_t<T>;
  if (f == A(0)) {
    std::memset(static_cast<void*>(out), 0, n * sizeof(T));  // +0.0 is all-zero bits in every dtype
    return;
  }
  int64_t i = 0;
  if constexpr (std::is_same_v<T, A>) {
    typedef A V __attribute__((vector_size(64)));
    constexpr int64_t W = sizeof(V) / sizeof(A);
    for (; i + W <= n; i += W) {
      V v;
      std::memcpy(&v, in + i, sizeof(v));
      v *= f;
      std::memcpy(out + i, &v, sizeof(v));
    }
  }
  for (; i < n; ++i) out[i] = static_cast<T>(static_cast<A>(in[i]) * f);
}

// sum_squares_impl(p, n) of one piece (n <= kChunk: the same bits), and alongside it q[0, nq)
// scaled in place by f as scale_impl does (f == 1: q is left as it is), a step of q after each
// step of p: the rewrite of q (in cache) then runs while the loads of p (from memory) are in
// flight. (Before, the prox rewrote a whole piece of a group between pieces of the next group's
// sum; the group bench's runs before and after this change are cited in benchmarks/HISTORY.md.)
template <typename T>
GSLORA_INLINE double sum_squares_scale_impl(const T* p, int64_t n, T* q, int64_t nq, acc_t<T> f) {
  constexpr int64_t B = kSumBlockElems<T>;
  const bool rewrite = f != acc_t<T>(1);
  int64_t done = 0;  // q[0, done) rewritten
  const acc_t<T> sq = chunk_sum_squares(p, 0, n, [&](int64_t i) GSLORA_INLINE_LAMBDA {
    if (rewrite && i + B <= nq) {
      scale_impl<T>(q + i, q + i, B, f);
      done = i + B;
    }
  });
  if (rewrite && done < nq) scale_impl<T>(q + done, q + done, nq - done, f);
  return static_cast<double>(sq);
}

// Keeps GCC from fusing a product and the sum it feeds into one FMA (it contracts across
// statements by default); clang contracts within one expression only, which the code avoids.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define GSLORA_NO_FMA(x) __builtin_assoc_barrier(x)
#else
#define GSLORA_NO_FMA(x) (x)
#endif

// out[i] += in[i] * f with the roundings of group_scale followed by autograd's accumulation:
// the product rounded to T, then the sum computed in the accumulate type and rounded to T. The
// result is bit-identical to adding group_scale's output to out. f == 0 adds nothing.
template <typename T>
inline void scale_add_impl(const T* in, T* out, int64_t n, acc_t<T> f) {
  using A = acc_t<T>;
  if (f == A(0)) return;
  if constexpr (std::is_same_v<T, A>) {
    using V = vec_t<A>;
    constexpr int64_t W = sizeof(V) / sizeof(A);
    // The tail goes through the vector code on a zero-padded copy: a scalar loop would be
    // auto-vectorised with FMAs.
    for (int64_t i = 0; i < n; i += W) {
      const size_t bytes = std::min<int64_t>(W, n - i) * sizeof(A);
      V v = {}, o = {};
      std::memcpy(&v, in + i, bytes);
      std::memcpy(&o, out + i, bytes);
      V p = v * f;
      p = GSLORA_NO_FMA(p);
      o += p;
      std::memcpy(out + i, &o, bytes);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T prod = static_cast<T>(static_cast<A>(in[i]) * f);
      out[i] = static_cast<T>(static_cast<A>(out[i]) + static_cast<A>(prod));
    }
  }
}

#define GSLORA_DEFINE_GROUP_KERNELS(T, SUFFIX)                                                    \
  GSLORA_CLONES double sum_squares_##SUFFIX(const T* p, int64_t n) {                              \
    return sum_squares_impl<T>(p, n);                                                             \
  }                                                                                               \
  GSLORA_CLONES void scale_##SUFFIX(const T* in, T* out, int64_t n, acc_t<T> f) {                 \
    scale_impl<T>(in, out, n, f);                                                                 \
  }                                                                                               \
  GSLORA_CLONES double sum_squares_scale_##SUFFIX(const T* p, int64_t n, T* q, int64_t nq,         \
                                                 acc_t<T> f) {                                    \
    return sum_squares_scale_impl<T>(p, n, q, nq, f);                                             \
  }                                                                                               \
  GSLORA_CLONES void scale_add_##SUFFIX(const T* in, T* out, int64_t n, acc_t<T> f) {             \
    scale_add_impl<T>(in, out, n, f);                                                             \
  }
GSLORA_DEFINE_GROUP_KERNELS(float, f32)
GSLORA_DEFINE_GROUP_KERNELS(double, f64)
GSLORA_DEFINE_GROUP_KERNELS(c10::BFloat16, bf16)
GSLORA_DEFINE_GROUP_KERNELS(c10::Half, f16)
#undef GSLORA_DEFINE_GROUP_KERNELS

inline double sum_squares(const float* p, int64_t n) { return sum_squares_f32(p, n); }
inline double sum_squares(const double* p, int64_t n) { return sum_squares_f64(p, n); }
inline double sum_squares(const c10::BFloat16* p, int64_t n) { return sum_squares_bf16(p, n); }
inline double sum_squares(const c10::Half* p, int64_t n) { return sum_squares_f16(p, n); }
inline double sum_squares_scale(const float* p, int64_t n, float* q, int64_t nq, float f) {
  return sum_squares_scale_f32(p, n, q, nq, f);
}
inline double sum_squares_scale(const double* p, int64_t n, double* q, int64_t nq, double f) {
  return sum_squares_scale_f64(p, n, q, nq, f);
}
inline double sum_squares_scale(const c10::BFloat16* p, int64_t n, c10::BFloat16* q, int64_t nq,
                                float f) {
  return sum_squares_scale_bf16(p, n, q, nq, f);
}
inline double sum_squares_scale(const c10::Half* p, int64_t n, c10::Half* q, int64_t nq, float f) {
  return sum_squares_scale_f16(p, n, q, nq, f);
}
inline void scale(const float* in, float* out, int64_t n, float f) { scale_f32(in, out, n, f); }
inline void scale(const double* in, double* out, int64_t n, double f) { scale_f64(in, out, n, f); }
inline void scale(const c10::BFloat16* in, c10::BFloat16* out, int64_t n, float f) {
  scale_bf16(in, out, n, f);
}
inline void scale(const c10::Half* in, c10::Half* out, int64_t n, float f) {
  scale_f16(in, out, n, f);
}
inline void scale_add(const float* in, float* out, int64_t n, float f) {
  scale_add_f32(in, out, n, f);
}
inline void scale_add(const double* in, double* out, int64_t n, double f) {
  scale_add_f64(in, out, n, f);
}
inline void scale_add(const c10::BFloat16* in, c10::BFloat16* out, int64_t n, float f) {
  scale_add_bf16(in, out, n, f);
}
inline void scale_add(const c10::Half* in, c10::Half* out, int64_t n, float f) {
  scale_add_f16(in, out, n, f);
}

// The tensors of each group and the group sizes.
struct GroupPlan {
  std::vector<std::vector<int64_t>> members;  // tensor indices per group
  std::vector<int64_t> size;                  // elements per group
  bool parallel = false;                      // enough work to wake the OpenMP team
};

GroupPlan plan_groups(at::TensorList tensors, at::IntArrayRef group_ids, int64_t num_groups) {
  GroupPlan plan;
  plan.members.resize(num_groups);
  plan.size.assign(num_groups, 0);
  for (size_t i = 0; i < tensors.size(); ++i) {
    plan.members[group_ids[i]].push_back(static_cast<int64_t>(i));
    plan.size[group_ids[i]] += tensors[i].numel();
  }
  const int64_t total = std::accumulate(plan.size.begin(), plan.size.end(), int64_t(0));
  plan.parallel = total >= kParallelMin;
  return plan;
}

// Thread `tid` of `nthreads` owns elements [lo, hi) of a group of n elements (the concatenation of
// its tensors), cut at multiples of 16 elements so that two threads never write one cache line.
inline std::pair<int64_t, int64_t> share(int64_t n, int tid, int nthreads) {
  auto cut = [&](int k) { return k == nthreads ? n : std::min(n, (n * k / nthreads) / 16 * 16); };
  return {cut(tid), cut(tid + 1)};
}

// fn(tensor index, offset, count) for every piece of elements [lo, hi) of the group.
template <typename Fn>
inline void for_each_piece(const std::vector<at::Tensor>& ts, const std::vector<int64_t>& members,
                           int64_t lo, int64_t hi, Fn&& fn) {
  int64_t off = 0;
  for (int64_t i : members) {
    const int64_t n = ts[i].numel();
    const int64_t a = std::max(lo, off), b = std::min(hi, off + n);
    if (a < b) fn(i, a - off, b - a);
    off += n;
    if (off >= hi) break;
  }
}

// The sum of squares of elements [lo, hi) of group g.
template <typename T>
inline double range_sum_squares(const std::vector<at::Tensor>& ts, const GroupPlan& plan,
                                int64_t g, int64_t lo, int64_t hi) {
  double sq = 0.0;
  for_each_piece(ts, plan.members[g], lo, hi, [&](int64_t i, int64_t off, int64_t n) {
    sq += sum_squares(ts[i].const_data_ptr<T>() + off, n);
  });
  return sq;
}

// Contiguous views (or copies) of the inputs; ATen calls stay on the calling thread.
std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

// Every thread sums its share of every group (so all threads work whatever the number and
// sizes of the groups); the partial sums are added in thread order, independent of timing.
template <typename T>
void group_sq_norms_kernel(const std::vector<at::Tensor>& ts, const GroupPlan& plan,
                           acc_t<T>* out) {
  const int64_t G = static_cast<int64_t>(plan.size.size());
  const int nthreads = plan.parallel ? at::get_num_threads() : 1;
  std::vector<double> partial(G * nthreads, 0.0);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    for (int64_t g = 0; g < G; ++g) {
      const auto [lo, hi] = share(plan.size[g], tid, team);
      partial[g * nthreads + tid] = range_sum_squares<T>(ts, plan, g, lo, hi);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    double sq = 0.0;
    for (int t = 0; t < nthreads; ++t) sq += partial[g * nthreads + t];
    out[g] = static_cast<acc_t<T>>(sq);
  }
}

at::Tensor group_sq_norms_cpu(at::TensorList tensors, at::IntArrayRef group_ids,
                              int64_t num_groups) {
  check_group_args("gslora::group_sq_norms", tensors, group_ids, num_groups);
  const auto acc = accumulate_type(tensors[0].scalar_type());
  at::Tensor out = at::empty({num_groups}, tensors[0].options().dtype(acc));
  const auto ts = contiguous_all(tensors);
  const GroupPlan plan = plan_groups(tensors, group_ids, num_groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tensors[0].scalar_type(),
                                  "group_sq_norms_cpu", [&] {
    group_sq_norms_kernel<scalar_t>(ts, plan, out.data_ptr<acc_t<scalar_t>>());
  });
  return out;
}

template <typename T>
void group_scale_kernel(const std::vector<at::Tensor>& ts, at::IntArrayRef group_ids,
                        const acc_t<T>* c, std::vector<at::Tensor>& outs) {
  const int64_t n = static_cast<int64_t>(ts.size());
  int64_t total = 0;
  for (const auto& t : ts) total += t.numel();
  // Element-wise with no reduction: one task per tensor balances as well as one per group.
#pragma omp parallel for schedule(dynamic, 1) if (n > 1 && total >= kParallelMin)
  for (int64_t i = 0; i < n; ++i)
    scale(ts[i].const_data_ptr<T>(), outs[i].data_ptr<T>(), ts[i].numel(), c[group_ids[i]]);
}

std::vector<at::Tensor> group_scale_cpu(at::TensorList tensors, at::IntArrayRef group_ids,
                                        const at::Tensor& coeffs_in) {
  const char* op = "gslora::group_scale";
  TORCH_CHECK(coeffs_in.defined() && coeffs_in.dim() == 1, op,
              ": coeffs must be a 1-D [num_groups] tensor");
  const int64_t G = coeffs_in.size(0);
  check_group_args(op, tensors, group_ids, G);
  check_group_vector(op, "coeffs", coeffs_in, G, tensors[0].device());
  const auto acc = accumulate_type(tensors[0].scalar_type());
  const at::Tensor coeffs = coeffs_in.to(acc).contiguous();
  const auto ts = contiguous_all(tensors);
  std::vector<at::Tensor> outs;
  outs.reserve(ts.size());
  for (const auto& t : ts) outs.push_back(at::empty_like(t, at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tensors[0].scalar_type(),
                                  "group_scale_cpu", [&] {
    group_scale_kernel<scalar_t>(ts, group_ids, coeffs.const_data_ptr<acc_t<scalar_t>>(), outs);
  });
  return outs;
}

// In place, elements [off, off + n) of tensor i times the prox factor f (f == 1, i.e. lam == 0:
// no write pass).
template <typename T>
inline void shrink_piece(const std::vector<at::Tensor>& ts, int64_t i, int64_t off, int64_t n,
                         acc_t<T> f) {
  if (f == acc_t<T>(1)) return;
  T* p = ts[i].data_ptr<T>() + off;
  scale(p, p, n, f);
}

// In place, elements [lo, hi) of group g times the prox factor f.
template <typename T>
inline void scale_range(const std::vector<at::Tensor>& ts, const GroupPlan& plan, int64_t g,
                        int64_t lo, int64_t hi, acc_t<T> f) {
  for_each_piece(ts, plan.members[g], lo, hi,
                 [&](int64_t i, int64_t off, int64_t n) { shrink_piece<T>(ts, i, off, n, f); });
}

// What a prox-style kernel sums over (part of) a group before it can finish the group.
struct GroupSums {
  double sq = 0.0;  // sum of squares
  double v = 0.0;   // sum of AdamW's exp_avg_sq (adamw_prox_ only)
};

// Consecutive whole groups per thread, thread t taking groups [first[t], first[t + 1]), when
// that balances the threads' work within 1/8 (a model's equal-sized blocks, at least one per
// thread); empty otherwise.
std::vector<int64_t> whole_group_split(const GroupPlan& plan, int nthreads) {
  const int64_t G = static_cast<int64_t>(plan.size.size());
  if (nthreads < 2 || G < nthreads) return {};
  const int64_t total = std::accumulate(plan.size.begin(), plan.size.end(), int64_t(0));
  std::vector<int64_t> first{0};
  int64_t g = 0, done = 0, max_load = 0;
  for (int t = 1; t <= nthreads; ++t) {
    const int64_t target = t == nthreads ? total : total * t / nthreads, start = done;
    // Take groups while that brings the cut closer to the target.
    while (g < G && (t == nthreads || std::llabs(done + plan.size[g] - target) <
                                          std::llabs(done - target))) {
      done += plan.size[g++];
    }
    first.push_back(g);
    max_load = std::max(max_load, done - start);
  }
  if (8 * max_load * nthreads > 9 * total) return {};
  return first;
}

// The driver of the fused AdamW + prox kernel, whose first pass over a group writes (the AdamW
// update, summing the squares of its result), unlike those of for_each_group_rewrite's kernels:
// per group, sum(g, lo, hi) -> GroupSums over elements [lo, hi) of the group, then finish(g, sums
// of the whole group, lo, hi, writes_outputs) updates [lo, hi) in place while it is still in the
// thread's cache.
// * Whole groups per thread where that balances (whole_group_split): no synchronisation at all.
// * Otherwise every thread takes an even share of every group; the team meets at a barrier per
//   group and adds the partial sums in thread order, so results do not depend on timing.
template <typename Sum, typename Finish>
void for_each_group_in_cache(const GroupPlan& plan, Sum&& sum, Finish&& finish) {
  const int64_t G = static_cast<int64_t>(plan.size.size());
  const int nthreads = plan.parallel ? at::get_num_threads() : 1;
  const std::vector<int64_t> first = whole_group_split(plan, nthreads);
  std::vector<GroupSums> partial(G * nthreads);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    if (team == 1 || (team == nthreads && !first.empty())) {
      const int64_t g0 = team == 1 ? 0 : first[tid], g1 = team == 1 ? G : first[tid + 1];
      for (int64_t g = g0; g < g1; ++g) finish(g, sum(g, 0, plan.size[g]), 0, plan.size[g], true);
    } else {
      for (int64_t g = 0; g < G; ++g) {
        const auto [lo, hi] = share(plan.size[g], tid, team);
        partial[g * nthreads + tid] = sum(g, lo, hi);
#pragma omp barrier
        GroupSums all;
        for (int t = 0; t < team; ++t) {
          all.sq += partial[g * nthreads + t].sq;
          all.v += partial[g * nthreads + t].v;
        }
        finish(g, all, lo, hi, tid == 0);
      }
    }
  }
}

// Walks elements [lo, hi) of one group (the concatenation of its tensors) in pieces of at most
// kChunk elements, each tensor's part cut from its first element in that range, so that per-piece
// sum_squares add up, tensor by tensor, to the same doubles as range_sum_squares(lo, hi).
class GroupCursor {
 public:
  GroupCursor() = default;
  GroupCursor(const std::vector<at::Tensor>& ts, const std::vector<int64_t>& members, int64_t lo,
              int64_t hi)
      : ts_(&ts), members_(&members), lo_(lo), hi_(hi) {
    enter();
  }
  bool more() const { return members_ != nullptr && j_ < members_->size(); }
  // The next piece: fn(tensor index, offset, count, whether it ends this tensor's part).
  template <typename Fn>
  void next(Fn&& fn) {
    const int64_t i = (*members_)[j_];
    const int64_t off = off_, cnt = std::min(kChunk, end_ - off_);
    off_ += cnt;
    const bool last = off_ == end_;
    if (last) {
      base_ += (*ts_)[i].numel();
      ++j_;
      enter();
    }
    fn(i, off, cnt, last);
  }

 private:
  // Moves to the first tensor from j_ on with elements in [lo, hi) and sets its part.
  void enter() {
    for (; j_ < members_->size(); ++j_) {
      const int64_t n = (*ts_)[(*members_)[j_]].numel();
      const int64_t a = std::max(lo_, base_), b = std::min(hi_, base_ + n);
      if (a < b) {
        off_ = a - base_;
        end_ = b - base_;
        return;
      }
      if (base_ + n >= hi_) {  // past the range
        j_ = members_->size();
        return;
      }
      base_ += n;
    }
  }
  const std::vector<at::Tensor>* ts_ = nullptr;
  const std::vector<int64_t>* members_ = nullptr;
  int64_t lo_ = 0, hi_ = 0;
  size_t j_ = 0;
  int64_t base_ = 0;  // the group offset of tensor members_[j_]
  int64_t off_ = 0, end_ = 0;  // the current tensor's part: [off_, end_) of its elements
};

// Rewrites elements [lo, hi) of a group with apply while summing the squares of elements
// [nlo, nhi) of the next one (nxt_members null: none), piece by piece, so that two memory streams
// are in flight; returns the sum of squares. kScale: apply is the in-place scale by f (the prox),
// and a piece of each group runs as one sum_squares_scale call, block by block.
template <typename T, bool kScale, typename Apply>
double rewrite_and_sum_next(const std::vector<at::Tensor>& ts,
                            const std::vector<int64_t>& members, int64_t lo, int64_t hi,
                            const std::vector<int64_t>* nxt_members, int64_t nlo, int64_t nhi,
                            Apply&& apply, acc_t<T> f) {
  GroupCursor cur(ts, members, lo, hi), nxt;
  if (nxt_members != nullptr) nxt = GroupCursor(ts, *nxt_members, nlo, nhi);
  double next_sq = 0.0, piece = 0.0;
  auto add = [&](double sq, bool last) {  // a piece's sum, tensor by tensor
    piece += sq;
    if (last) {
      next_sq += piece;
      piece = 0.0;
    }
  };
  while (cur.more() || nxt.more()) {
    if (kScale && cur.more() && nxt.more()) {
      const T* np = nullptr;
      int64_t nn = 0;
      bool nlast = false;
      nxt.next([&](int64_t i, int64_t off, int64_t n, bool last) {
        np = ts[i].const_data_ptr<T>() + off;
        nn = n;
        nlast = last;
      });
      cur.next([&](int64_t i, int64_t off, int64_t n, bool) {
        add(sum_squares_scale(np, nn, ts[i].data_ptr<T>() + off, n, f), nlast);
      });
      continue;
    }
    if (nxt.more()) {
      nxt.next([&](int64_t i, int64_t off, int64_t n, bool last) {
        add(sum_squares(ts[i].const_data_ptr<T>() + off, n), last);
      });
    }
    if (cur.more()) cur.next([&](int64_t i, int64_t off, int64_t n, bool) { apply(i, off, n); });
  }
  return next_sq;
}

// The driver of kernels that read a group (sum of squares), record its norm and then rewrite the
// group with a per-group factor: factor(g, norm) -> the group's factor; apply(i, off, n, f)
// rewrites that piece of tensor i. The rewrite of group g runs interleaved, piece by piece, with
// the sum over group g + 1, so that two memory streams are in flight instead of one (the passes
// are bound by memory latency here, not bandwidth). Each thread takes whole groups where that
// balances (whole_group_split), otherwise a share of every group, with a barrier per group. The
// pieces are cut like range_sum_squares' calls, so the sums are the same doubles. (Shares of
// every group also for equal groups too large to stay in L2 until their rewrite, such as ViT-B
// r = 16's 480 KB here, were tried: timed interleaved with the whole benchmark's providers, the
// barriers cost more than the cache misses they save.) kScale: apply is the in-place scale by
// the factor (the prox), which then runs inside the next group's sum (rewrite_and_sum_next).
template <typename T, bool kScale, typename Factor, typename Apply>
void for_each_group_rewrite(const std::vector<at::Tensor>& ts, const GroupPlan& plan,
                            acc_t<T>* norms, Factor&& factor, Apply&& apply) {
  using A = acc_t<T>;
  const int64_t G = static_cast<int64_t>(plan.size.size());
  const int nthreads = plan.parallel ? at::get_num_threads() : 1;
  const std::vector<int64_t> first = whole_group_split(plan, nthreads);
  auto finish = [&](int64_t g, double sq, bool record) {
    const A norm = gsqrt(static_cast<A>(sq));
    if (record) norms[g] = norm;
    return factor(g, norm);
  };
  // Whole groups g0 .. g1 - 1 on this thread.
  auto run = [&](int64_t g0, int64_t g1) {
    double sq = g0 < g1 ? range_sum_squares<T>(ts, plan, g0, 0, plan.size[g0]) : 0.0;
    for (int64_t g = g0; g < g1; ++g) {
      const A f = finish(g, sq, true);
      const bool more = g + 1 < g1;
      sq = rewrite_and_sum_next<T, kScale>(
          ts, plan.members[g], 0, plan.size[g], more ? &plan.members[g + 1] : nullptr, 0,
          more ? plan.size[g + 1] : 0, [&](int64_t i, int64_t off, int64_t n) { apply(i, off, n, f); },
          f);
    }
  };
  std::vector<double> partial(nthreads * (G + 1), 0.0);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    if (team == 1 || team != nthreads) {
      if (tid == 0) run(0, G);  // one thread, or a smaller team than asked for: all groups here
    } else if (!first.empty()) {
      run(first[tid], first[tid + 1]);
    } else {
      // Every thread its share of every group; a barrier per group to add the partial sums in
      // thread order (results independent of timing).
      auto sh = [&](int64_t g) { return share(plan.size[g], tid, team); };
      partial[tid] = range_sum_squares<T>(ts, plan, 0, sh(0).first, sh(0).second);
#pragma omp barrier
      for (int64_t g = 0; g < G; ++g) {
        double sq = 0.0;
        for (int t = 0; t < team; ++t) sq += partial[g * team + t];
        const A f = finish(g, sq, tid == 0);
        const bool more = g + 1 < G;
        const auto [lo, hi] = sh(g);
        const auto [nlo, nhi] = more ? sh(g + 1) : std::pair<int64_t, int64_t>{0, 0};
        partial[(g + 1) * team + tid] = rewrite_and_sum_next<T, kScale>(
            ts, plan.members[g], lo, hi, more ? &plan.members[g + 1] : nullptr, nlo, nhi,
            [&](int64_t i, int64_t off, int64_t n) { apply(i, off, n, f); }, f);
#pragma omp barrier
      }
    }
  }
}

// Per group: the sum of squares, then the shrink while the group (or this thread's share of it)
// is in cache (for_each_group_rewrite).
template <typename T>
void group_prox_kernel(const std::vector<at::Tensor>& ts, const GroupPlan& plan,
                       const acc_t<T>* lam, acc_t<T>* norms) {
  using A = acc_t<T>;
  for_each_group_rewrite<T, /*kScale=*/true>(
      ts, plan, norms, [&](int64_t g, A norm) { return prox_factor<A>(norm, lam[g]); },
      [&](int64_t i, int64_t off, int64_t n, A f) { shrink_piece<T>(ts, i, off, n, f); });
}

at::Tensor group_prox_cpu(at::TensorList tensors, at::IntArrayRef group_ids, int64_t num_groups,
                          const at::Tensor& thresholds_in) {
  const char* op = "gslora::group_prox_";
  check_group_args(op, tensors, group_ids, num_groups);
  check_group_vector(op, "thresholds", thresholds_in, num_groups, tensors[0].device());
  const auto acc = accumulate_type(tensors[0].scalar_type());
  const at::Tensor lam = thresholds_in.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "group_prox_cpu_check", [&] {
    const scalar_t* l = lam.const_data_ptr<scalar_t>();
    // !(l >= 0) also rejects NaN.
    for (int64_t g = 0; g < num_groups; ++g)
      TORCH_CHECK(l[g] >= scalar_t(0), op, ": thresholds must be >= 0, got ", l[g],
                  " for group ", g);
  });
  at::Tensor norms = at::empty({num_groups}, tensors[0].options().dtype(acc));
  // Non-contiguous tensors are updated through contiguous copies, written back afterwards.
  const auto ts = contiguous_all(tensors);
  const GroupPlan plan = plan_groups(tensors, group_ids, num_groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tensors[0].scalar_type(),
                                  "group_prox_cpu", [&] {
    group_prox_kernel<scalar_t>(ts, plan, lam.const_data_ptr<acc_t<scalar_t>>(),
                                norms.data_ptr<acc_t<scalar_t>>());
  });
  for (size_t i = 0; i < tensors.size(); ++i)
    if (!ts[i].is_same(tensors[i])) const_cast<at::Tensor&>(tensors[i]).copy_(ts[i]);
  return norms;
}

// ---------------------------------------------------------------------------------------------
// The group-lasso penalty's value and gradient in one pass, straight into .grad: per group, the
// sum of squares, then grad_i (+)= theta_i * c_g with c_g = alpha * w_g / ||theta_g|| (0 for a
// zero group) while the group is in cache. The same numbers as (alpha * penalty).backward()
// without autograd: no graph, no gradient tensors handed to AccumulateGrad, and an existing .grad
// is updated in place instead of being added to a new tensor.

template <typename T>
void group_lasso_grad_kernel(const std::vector<at::Tensor>& ts, const std::vector<at::Tensor>& grads,
                             const std::vector<char>& accumulate, const GroupPlan& plan,
                             const acc_t<T>* w, acc_t<T> alpha, acc_t<T>* norms) {
  using A = acc_t<T>;
  for_each_group_rewrite<T, /*kScale=*/false>(
      ts, plan, norms,
      // The autograd backward's c_g (penalty_coeffs with grad = alpha), the same rounding.
      [&](int64_t g, A norm) {
        return norm > A(0) ? (w != nullptr ? alpha * w[g] : alpha) / norm : A(0);
      },
      [&](int64_t i, int64_t off, int64_t n, A c) {
        const T* src = ts[i].const_data_ptr<T>() + off;
        T* dst = grads[i].data_ptr<T>() + off;
        if (accumulate[i]) scale_add(src, dst, n, c);
        else scale(src, dst, n, c);
      });
}

// Registered for AutogradCPU, not CPU: .grad lives on the autograd-level tensor, so the op must
// run above autograd (the ATen calls inside go below it). Returns sum_g w_g ||theta_g||.
at::Tensor add_group_lasso_grad_cpu(at::TensorList tensors, at::IntArrayRef group_ids,
                                    int64_t num_groups, const std::optional<at::Tensor>& weights,
                                    double alpha) {
  const char* op = "gslora::add_group_lasso_grad_";
  check_group_args(op, tensors, group_ids, num_groups);
  TORCH_CHECK(std::isfinite(alpha) && alpha >= 0, op, ": alpha must be finite and >= 0, got ",
              alpha);
  const auto dtype = tensors[0].scalar_type();
  const auto acc = accumulate_type(dtype);
  at::Tensor w;
  if (weights.has_value()) {
    check_group_vector(op, "weights", *weights, num_groups, tensors[0].device());
    TORCH_CHECK(weights->scalar_type() == acc, op, ": weights must have the accumulate dtype ",
                acc, " of the tensors, got ", weights->scalar_type());
    w = weights->contiguous();
  }
  // Two entries for one tensor would have two threads write one .grad.
  std::vector<const void*> impls;
  impls.reserve(tensors.size());
  for (const at::Tensor& t : tensors) impls.push_back(t.unsafeGetTensorImpl());
  std::sort(impls.begin(), impls.end());
  TORCH_CHECK(std::adjacent_find(impls.begin(), impls.end()) == impls.end(), op,
              ": a tensor appears twice in tensors; list each tensor once");

  at::AutoDispatchBelowADInplaceOrView guard;
  const auto ts = contiguous_all(tensors);
  const size_t n = tensors.size();
  // grads[i]: the existing .grad, updated in place (accumulate), or a new tensor to write.
  std::vector<at::Tensor> grads(n);
  std::vector<char> accumulate(n, 0);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& grad = tensors[i].grad();
    if (grad.defined()) {
      TORCH_CHECK(grad.layout() == at::kStrided && grad.scalar_type() == dtype &&
                      grad.device() == tensors[i].device() &&
                      grad.sizes() == tensors[i].sizes(),
                  op, ": tensors[", i, "].grad must be a dense tensor like tensors[", i,
                  "] (shape ", tensors[i].sizes(), ", ", dtype, ", ", tensors[i].device(),
                  "), got ", grad.sizes(), ", ", grad.scalar_type(), ", ", grad.device());
      if (grad.is_contiguous()) {
        grads[i] = grad;
        accumulate[i] = 1;
        continue;
      }
    }
    grads[i] = at::empty_like(ts[i], at::MemoryFormat::Contiguous);
  }
  at::Tensor norms = at::empty({num_groups}, tensors[0].options().dtype(acc));
  at::Tensor penalty = at::empty({}, norms.options());
  const GroupPlan plan = plan_groups(tensors, group_ids, num_groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "add_group_lasso_grad_cpu", [&] {
    using A = acc_t<scalar_t>;
    const A* wp = w.defined() ? w.const_data_ptr<A>() : nullptr;
    group_lasso_grad_kernel<scalar_t>(ts, grads, accumulate, plan, wp, static_cast<A>(alpha),
                                      norms.data_ptr<A>());
    const A* nr = norms.const_data_ptr<A>();
    A sum = 0;
    for (int64_t g = 0; g < num_groups; ++g) sum += (wp != nullptr ? wp[g] : A(1)) * nr[g];
    *penalty.data_ptr<A>() = sum;
  });
  for (size_t i = 0; i < n; ++i) {
    at::Tensor& grad = tensors[i].mutable_grad();
    if (accumulate[i]) {
      torch::autograd::impl::bump_version(grad);
    } else if (grad.defined()) {  // a non-contiguous .grad
      grad.add_(grads[i]);
      torch::autograd::impl::bump_version(grad);
    } else if (tensors[i].is_contiguous()) {
      grad = grads[i];
    } else {  // the tensor's own strides, as AccumulateGrad would give it
      grad = at::empty_like(tensors[i]).copy_(grads[i]);
    }
  }
  return penalty;
}

// ---------------------------------------------------------------------------------------------
// Fused AdamW + proximal step: per group, every thread applies torch.optim.AdamW's update to its
// share of the group's elements (θ, m, v written once) while summing θ² (and v, for the threshold
// in Adam's metric) of the updated values; after the per-group barrier it scales its share, which
// is still in its cache. The separate optimizer step and prox read θ once more and write it twice.

// AdamW's per-call constants in the accumulate type, as torch.optim.AdamW rounds them.
template <typename A>
struct AdamWCoefs {
  A decay;      // 1 - lr * weight_decay
  A w1;         // 1 - beta1, the lerp weight of exp_avg towards grad
  A beta2, w2;  // exp_avg_sq <- beta2 * exp_avg_sq + (1 - beta2) * grad^2
  A bc2_sqrt;   // sqrt(1 - beta2^step)
  A eps;
  A step_size;  // lr / (1 - beta1^step)
};

// AdamW on n elements, in the accumulate type, each stored value rounded once. Adds Σθ² and Σv of
// the stored updated values to sq / sv. The formulas (and their evaluation order) are those of
// torch.optim.AdamW's single-tensor step: θ *= decay; m = lerp(m, g, w1); v = v β2 + w2 g g;
// θ += -step_size · m / (√v / √bc2 + eps).
template <typename T>
inline void adamw_update_impl(T* __restrict p, const T* __restrict g, T* __restrict m,
                              T* __restrict v, int64_t n, const AdamWCoefs<acc_t<T>>& c,
                              double& sq, double& sv) {
  using A = acc_t<T>;
  // torch's lerp switches formulas at weight 0.5 for accuracy; so does this.
  const bool lerp_low = c.w1 < A(0.5);
  const A w1c = A(1) - c.w1;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    A csq = A(0), csv = A(0);
#pragma omp simd reduction(+ : csq, csv)
    for (int64_t i = c0; i < c1; ++i) {
      const A gi = static_cast<A>(g[i]);
      const A m0 = static_cast<A>(m[i]);
      const A mi = lerp_low ? m0 + c.w1 * (gi - m0) : gi - (gi - m0) * w1c;
      const A vi = static_cast<A>(v[i]) * c.beta2 + c.w2 * gi * gi;
      const A denom = gsqrt(vi) / c.bc2_sqrt + c.eps;
      const A pi = static_cast<A>(p[i]) * c.decay + (-c.step_size) * (mi / denom);
      const T ps = static_cast<T>(pi), vs = static_cast<T>(vi);
      p[i] = ps;
      m[i] = static_cast<T>(mi);
      v[i] = vs;
      const A pr = static_cast<A>(ps);
      csq += pr * pr;
      csv += static_cast<A>(vs);
    }
    sq += static_cast<double>(csq);
    sv += static_cast<double>(csv);
  }
}

#define GSLORA_DEFINE_ADAMW_KERNEL(T, SUFFIX)                                                     \
  GSLORA_CLONES void adamw_update_##SUFFIX(T* p, const T* g, T* m, T* v, int64_t n,               \
                                           const AdamWCoefs<acc_t<T>>& c, double& sq,             \
                                           double& sv) {                                          \
    adamw_update_impl<T>(p, g, m, v, n, c, sq, sv);                                               \
  }
GSLORA_DEFINE_ADAMW_KERNEL(float, f32)
GSLORA_DEFINE_ADAMW_KERNEL(double, f64)
GSLORA_DEFINE_ADAMW_KERNEL(c10::BFloat16, bf16)
GSLORA_DEFINE_ADAMW_KERNEL(c10::Half, f16)
#undef GSLORA_DEFINE_ADAMW_KERNEL

inline void adamw_update(float* p, const float* g, float* m, float* v, int64_t n,
                         const AdamWCoefs<float>& c, double& sq, double& sv) {
  adamw_update_f32(p, g, m, v, n, c, sq, sv);
}
inline void adamw_update(double* p, const double* g, double* m, double* v, int64_t n,
                         const AdamWCoefs<double>& c, double& sq, double& sv) {
  adamw_update_f64(p, g, m, v, n, c, sq, sv);
}
inline void adamw_update(c10::BFloat16* p, const c10::BFloat16* g, c10::BFloat16* m,
                         c10::BFloat16* v, int64_t n, const AdamWCoefs<float>& c, double& sq,
                         double& sv) {
  adamw_update_bf16(p, g, m, v, n, c, sq, sv);
}
inline void adamw_update(c10::Half* p, const c10::Half* g, c10::Half* m, c10::Half* v, int64_t n,
                         const AdamWCoefs<float>& c, double& sq, double& sv) {
  adamw_update_f16(p, g, m, v, n, c, sq, sv);
}

// The tensors of one adamw_prox_ call, contiguous (views of the inputs, or copies).
struct AdamWTensors {
  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs;
};

// Per group: AdamW's update of the group (or this thread's share) summing θ² and v, then the
// threshold λ_g is final (divided by Adam's scale d_g = √(mean v̂) + eps for adam_metric, when
// d_g > 0) and the group is shrunk while in cache. norms: ‖θ_g‖ after the AdamW update;
// lam_out: λ_g.
template <typename T>
void adamw_prox_kernel(const AdamWTensors& ts, const GroupPlan& plan,
                       const AdamWCoefs<acc_t<T>>& c, double bc2, bool adam_metric,
                       const acc_t<T>* lam_in, acc_t<T>* norms, acc_t<T>* lam_out) {
  using A = acc_t<T>;
  for_each_group_in_cache(
      plan,
      [&](int64_t g, int64_t lo, int64_t hi) {
        GroupSums s;
        for_each_piece(ts.params, plan.members[g], lo, hi, [&](int64_t i, int64_t off, int64_t n) {
          adamw_update(ts.params[i].data_ptr<T>() + off, ts.grads[i].const_data_ptr<T>() + off,
                       ts.exp_avgs[i].data_ptr<T>() + off, ts.exp_avg_sqs[i].data_ptr<T>() + off,
                       n, c, s.sq, s.v);
        });
        return s;
      },
      [&](int64_t g, const GroupSums& s, int64_t lo, int64_t hi, bool writes_outputs) {
        const A norm = gsqrt(static_cast<A>(s.sq));
        A lam = lam_in[g];
        if (adam_metric) {
          const A d = gsqrt(static_cast<A>(s.v / (static_cast<double>(plan.size[g]) * bc2))) + c.eps;
          if (d > A(0) && d < std::numeric_limits<A>::infinity()) lam = lam / d;
        }
        if (writes_outputs) {
          norms[g] = norm;
          lam_out[g] = lam;
        }
        scale_range<T>(ts.params, plan, g, lo, hi, prox_factor<A>(norm, lam));
      });
}

// `name`[i] must match params[i] in shape, dtype and device.
void check_like_params(const char* op, const char* name, at::TensorList ts, at::TensorList params) {
  TORCH_CHECK(ts.size() == params.size(), op, ": ", name, " has ", ts.size(), " tensors for ",
              params.size(), " params (one per param)");
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(ts[i].sizes() == params[i].sizes(), op, ": ", name, "[", i, "] has shape ",
                ts[i].sizes(), " but params[", i, "] has shape ", params[i].sizes());
    TORCH_CHECK(ts[i].scalar_type() == params[i].scalar_type(), op, ": ", name, "[", i,
                "] has dtype ", ts[i].scalar_type(), " but params[", i, "] has dtype ",
                params[i].scalar_type());
    TORCH_CHECK(ts[i].device() == params[i].device(), op, ": ", name, "[", i, "] is on ",
                ts[i].device(), " but params[", i, "] is on ", params[i].device());
  }
}

// AdamW's step counts (float CPU scalars, one per param, as torch.optim.AdamW keeps them) must all
// be equal: returns their value. Nothing is changed here, so a failed call leaves the state as it was.
double common_step(const char* op, at::TensorList steps, size_t n) {
  TORCH_CHECK(steps.size() == n, op, ": state_steps has ", steps.size(), " tensors for ", n,
              " params (one per param)");
  double value = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = steps[i];
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.numel() == 1 &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                op, ": state_steps[", i, "] must be a one-element float CPU tensor (AdamW's step)");
    const double s = t.scalar_type() == at::kFloat ? double(*t.const_data_ptr<float>())
                                                    : *t.const_data_ptr<double>();
    if (i == 0) value = s;
    TORCH_CHECK(s == value, op, ": state_steps[", i, "] = ", s, " but state_steps[0] = ", value,
                ": the fused step needs one step count for all params");
  }
  return value;
}

void increment_steps(at::TensorList steps) {
  for (const at::Tensor& t : steps) {
    if (t.scalar_type() == at::kFloat) *const_cast<at::Tensor&>(t).data_ptr<float>() += 1.0f;
    else *const_cast<at::Tensor&>(t).data_ptr<double>() += 1.0;
  }
}

std::tuple<at::Tensor, at::Tensor> adamw_prox_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList state_steps, at::IntArrayRef group_ids,
    int64_t num_groups, const at::Tensor& thresholds_in, double lr, double beta1, double beta2,
    double eps, double weight_decay, bool adam_metric) {
  const char* op = "gslora::adamw_prox_";
  check_group_args(op, params, group_ids, num_groups);
  check_like_params(op, "grads", grads, params);
  check_like_params(op, "exp_avgs", exp_avgs, params);
  check_like_params(op, "exp_avg_sqs", exp_avg_sqs, params);
  const double step = common_step(op, state_steps, params.size()) + 1.0;
  check_group_vector(op, "thresholds", thresholds_in, num_groups, params[0].device());
  TORCH_CHECK(lr >= 0 && std::isfinite(lr), op, ": lr must be finite and >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, op, ": beta1 must lie in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, op, ": beta2 must lie in [0, 1), got ", beta2);
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(weight_decay >= 0 && std::isfinite(weight_decay), op,
              ": weight_decay must be finite and >= 0, got ", weight_decay);
  TORCH_CHECK(step >= 1 && std::isfinite(step), op,
              ": state_steps must be >= 0 (the count before this update), got ", step - 1);
  const auto acc = accumulate_type(params[0].scalar_type());
  const at::Tensor lam = thresholds_in.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "adamw_prox_cpu_check", [&] {
    const scalar_t* l = lam.const_data_ptr<scalar_t>();
    for (int64_t g = 0; g < num_groups; ++g)
      TORCH_CHECK(l[g] >= scalar_t(0), op, ": thresholds must be >= 0, got ", l[g], " for group ",
                  g);
  });
  const double bc1 = 1.0 - std::pow(beta1, step), bc2 = 1.0 - std::pow(beta2, step);
  at::Tensor norms = at::empty({num_groups}, params[0].options().dtype(acc));
  at::Tensor lam_used = at::empty({num_groups}, params[0].options().dtype(acc));
  // Non-contiguous tensors are updated through contiguous copies, written back afterwards.
  const AdamWTensors ts{contiguous_all(params), contiguous_all(grads), contiguous_all(exp_avgs),
                        contiguous_all(exp_avg_sqs)};
  const GroupPlan plan = plan_groups(params, group_ids, num_groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(),
                                  "adamw_prox_cpu", [&] {
    using A = acc_t<scalar_t>;
    const AdamWCoefs<A> c{static_cast<A>(1.0 - lr * weight_decay),
                          static_cast<A>(1.0 - beta1),
                          static_cast<A>(beta2),
                          static_cast<A>(1.0 - beta2),
                          static_cast<A>(std::sqrt(bc2)),
                          static_cast<A>(eps),
                          static_cast<A>(lr / bc1)};
    adamw_prox_kernel<scalar_t>(ts, plan, c, bc2, adam_metric, lam.const_data_ptr<A>(),
                                norms.data_ptr<A>(), lam_used.data_ptr<A>());
  });
  auto write_back = [](at::TensorList dst, const std::vector<at::Tensor>& src) {
    for (size_t i = 0; i < dst.size(); ++i)
      if (!src[i].is_same(dst[i])) const_cast<at::Tensor&>(dst[i]).copy_(src[i]);
  };
  write_back(params, ts.params);
  write_back(exp_avgs, ts.exp_avgs);
  write_back(exp_avg_sqs, ts.exp_avg_sqs);
  increment_steps(state_steps);
  return {norms, lam_used};
}

}  // namespace
}  // namespace gslora

TORCH_LIBRARY_IMPL(gslora, CPU, m) {
  m.impl("adamw_prox_", &gslora::adamw_prox_cpu);
  m.impl("group_sq_norms", &gslora::group_sq_norms_cpu);
  m.impl("group_scale", &gslora::group_scale_cpu);
  m.impl("group_prox_", &gslora::group_prox_cpu);
}

TORCH_LIBRARY_IMPL(gslora, AutogradCPU, m) {
  m.impl("add_group_lasso_grad_", &gslora::add_group_lasso_grad_cpu);
}
