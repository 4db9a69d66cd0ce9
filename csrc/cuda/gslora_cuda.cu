// CUDA kernels of the gslora ops.
//
// Group ops: one multi-tensor launch per phase over a (tensor, chunk) table, never one launch per
// tensor. Phase 1 sums squares per chunk in the accumulate type and adds them to the group's
// slot with one atomicAdd per block; phase 2 (prox, scale) multiplies each chunk by its group's
// factor, computed from the shared math in gslora_math.h (prox_factor), so the CUDA code runs
// exactly the arithmetic that the CPU tests check.
//
// LoRA linear: ATen / cuBLAS calls in the same minimal-pass order as the CPU path: the base
// product goes straight into y (addmm), the rank-r update accumulates in place (addmm_ with
// beta = 1), and the backward computes u = g B once and accumulates s u A into dx in place.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "checks.h"
#include "gslora_math.h"

namespace gslora {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkElems = 8192;  // elements per (tensor, chunk) entry: 32 per thread

// One row of the chunk table: tensor base pointer, its numel, this chunk's start, its group.
struct ChunkEntry {
  void* ptr;
  int64_t numel;
  int64_t start;
  int64_t group;
};

template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  __shared__ A warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[lane] : A(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // valid in thread 0
}

// Phase 1: sq[group] += sum of squares of the chunk (one block per chunk).
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) group_sq_kernel(const ChunkEntry* table, A* sq) {
  const ChunkEntry e = table[blockIdx.x];
  const T* p = static_cast<const T*>(e.ptr);
  const int64_t end = e.start + kChunkElems < e.numel ? e.start + kChunkElems : e.numel;
  A acc = A(0);
  for (int64_t i = e.start + threadIdx.x; i < end; i += kThreads) {
    const A v = static_cast<A>(p[i]);
    acc += v * v;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) atomicAdd(sq + e.group, acc);
}

// Phase 2: out = in * factor[group] in the accumulate type; factor 0 writes exact zeros.
// mode 0: factor = coeffs[g] (group_scale, out of place); mode 1: factor = prox_factor(norm, lam)
// from the squared norms (group_prox_, in place).
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    group_apply_kernel(const ChunkEntry* table, const ChunkEntry* out_table, const A* vec,
                       const A* lam, int mode) {
  const ChunkEntry e = table[blockIdx.x];
  const T* in = static_cast<const T*>(e.ptr);
  T* out = static_cast<T*>(out_table[blockIdx.x].ptr);
  A f;
  if (mode == 0) {
    f = vec[e.group];
  } else {
    f = prox_factor<A>(gsqrt(vec[e.group]), lam[e.group]);
    if (f == A(1)) return;  // threshold 0: identity, skip the write
  }
  const int64_t end = e.start + kChunkElems < e.numel ? e.start + kChunkElems : e.numel;
  for (int64_t i = e.start + threadIdx.x; i < end; i += kThreads)
    out[i] = f == A(0) ? static_cast<T>(A(0)) : static_cast<T>(static_cast<A>(in[i]) * f);
}

// Builds the chunk table of `ts` on the host and copies it to the device (one H2D copy).
at::Tensor chunk_table(const std::vector<at::Tensor>& ts, at::IntArrayRef group_ids,
                       int64_t* n_chunks) {
  std::vector<ChunkEntry> rows;
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t n = ts[i].numel();
    for (int64_t s = 0; s < n; s += kChunkElems)
      rows.push_back({ts[i].data_ptr(), n, s, group_ids[i]});
  }
  *n_chunks = static_cast<int64_t>(rows.size());
  const int64_t bytes = static_cast<int64_t>(rows.size() * sizeof(ChunkEntry));
  at::Tensor host = at::empty({std::max<int64_t>(bytes, 1)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (bytes > 0) std::memcpy(host.data_ptr(), rows.data(), bytes);
  // The pinned host buffer stays alive until the copy is done: the caching host allocator
  // records the stream use of non_blocking copies.
  return host.to(ts[0].device(), /*non_blocking=*/true);
}

std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

at::Tensor sq_norms_launch(const std::vector<at::Tensor>& ts, at::IntArrayRef group_ids,
                           int64_t num_groups, at::Tensor* table, int64_t* n_chunks) {
  const auto acc = accumulate_type(ts[0].scalar_type());
  at::Tensor sq = at::zeros({num_groups}, ts[0].options().dtype(acc));
  *table = chunk_table(ts, group_ids, n_chunks);
  if (*n_chunks == 0) return sq;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ts[0].scalar_type(), "group_sq_cuda", [&] {
    using A = acc_t<scalar_t>;
    group_sq_kernel<scalar_t, A><<<*n_chunks, kThreads, 0, stream>>>(
        reinterpret_cast<const ChunkEntry*>(table->data_ptr()), sq.data_ptr<A>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sq;
}

at::Tensor group_sq_norms_cuda(at::TensorList tensors, at::IntArrayRef group_ids,
                               int64_t num_groups) {
  check_group_args("gslora::group_sq_norms", tensors, group_ids, num_groups);
  c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto ts = contiguous_all(tensors);
  at::Tensor table;
  int64_t n = 0;
  return sq_norms_launch(ts, group_ids, num_groups, &table, &n);
}

std::vector<at::Tensor> group_scale_cuda(at::TensorList tensors, at::IntArrayRef group_ids,
                                         const at::Tensor& coeffs_in) {
  const char* op = "gslora::group_scale";
  TORCH_CHECK(coeffs_in.defined() && coeffs_in.dim() == 1, op,
              ": coeffs must be a 1-D [num_groups] tensor");
  check_group_args(op, tensors, group_ids, coeffs_in.size(0));
  check_group_vector(op, "coeffs", coeffs_in, coeffs_in.size(0), tensors[0].device());
  c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto acc = accumulate_type(tensors[0].scalar_type());
  const at::Tensor coeffs = coeffs_in.to(acc).contiguous();
  const auto ts = contiguous_all(tensors);
  std::vector<at::Tensor> outs;
  for (const auto& t : ts) outs.push_back(at::empty_like(t, at::MemoryFormat::Contiguous));
  int64_t n = 0, n_out = 0;
  at::Tensor table = chunk_table(ts, group_ids, &n);
  at::Tensor out_table = chunk_table(outs, group_ids, &n_out);
  if (n == 0) return outs;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ts[0].scalar_type(), "group_scale_cuda", [&] {
    using A = acc_t<scalar_t>;
    group_apply_kernel<scalar_t, A><<<n, kThreads, 0, stream>>>(
        reinterpret_cast<const ChunkEntry*>(table.data_ptr()),
        reinterpret_cast<const ChunkEntry*>(out_table.data_ptr()), coeffs.data_ptr<A>(), nullptr,
        0);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return outs;
}

at::Tensor group_prox_cuda(at::TensorList tensors, at::IntArrayRef group_ids, int64_t num_groups,
                           const at::Tensor& thresholds_in) {
  const char* op = "gslora::group_prox_";
  check_group_args(op, tensors, group_ids, num_groups);
  check_group_vector(op, "thresholds", thresholds_in, num_groups, tensors[0].device());
  c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto acc = accumulate_type(tensors[0].scalar_type());
  const at::Tensor lam = thresholds_in.to(acc).contiguous();
  const auto ts = contiguous_all(tensors);
  at::Tensor table;
  int64_t n = 0;
  at::Tensor sq = sq_norms_launch(ts, group_ids, num_groups, &table, &n);
  if (n > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ts[0].scalar_type(), "group_prox_cuda", [&] {
      using A = acc_t<scalar_t>;
      const auto* tab = reinterpret_cast<const ChunkEntry*>(table.data_ptr());
      group_apply_kernel<scalar_t, A><<<n, kThreads, 0, stream>>>(tab, tab, sq.data_ptr<A>(),
                                                                  lam.data_ptr<A>(), 1);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (size_t i = 0; i < tensors.size(); ++i)
    if (!ts[i].is_same(tensors[i])) const_cast<at::Tensor&>(tensors[i]).copy_(ts[i]);
  return sq.sqrt_();
}

// d(x) = x * mask * keep_scale (a copy only when there is a mask).
at::Tensor dropped(const at::Tensor& x, const c10::optional<at::Tensor>& mask, double keep) {
  if (!mask.has_value() || !mask->defined()) return x;
  return x.mul(*mask).mul_(keep);
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cuda(
    const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
    const c10::optional<at::Tensor>& mask, double keep_scale) {
  check_lora_fwd_args(x_in, weight, bias, lora_A, lora_B, mask, keep_scale);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x, weight.t())
                                                       : at::mm(x, weight.t());
  at::Tensor xa = at::mm(dropped(x, mask, keep_scale), lora_A.t());
  y.addmm_(xa, lora_B.t(), /*beta=*/1, /*alpha=*/scaling);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cuda(
    const at::Tensor& g_in, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
    const c10::optional<at::Tensor>& mask, double keep_scale, bool compute_dx) {
  check_lora_bwd_args(g_in, x_in, weight, lora_A, lora_B, xa, mask, keep_scale);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor g = g_in.contiguous(), x = x_in.contiguous();
  const at::Tensor u = at::mm(g, lora_B);                        // [M, r], once
  at::Tensor dB = at::mm(g.t(), xa).mul_(scaling);               // [N, r]
  at::Tensor dA = at::mm(u.t(), dropped(x, mask, keep_scale)).mul_(scaling);  // [r, K]
  at::Tensor dx;
  if (compute_dx) {
    dx = at::mm(g, weight);
    if (mask.has_value() && mask->defined())
      dx.add_(at::mm(u, lora_A).mul_(*mask), scaling * keep_scale);
    else
      dx.addmm_(u, lora_A, /*beta=*/1, /*alpha=*/scaling);
  } else {
    dx = at::empty({0}, x.options());
  }
  return {dx, dA, dB};
}

}  // namespace
}  // namespace gslora

TORCH_LIBRARY_IMPL(gslora, CUDA, m) {
  m.impl("lora_linear_fwd", &gslora::lora_linear_fwd_cuda);
  m.impl("lora_linear_bwd", &gslora::lora_linear_bwd_cuda);
  m.impl("group_sq_norms", &gslora::group_sq_norms_cuda);
  m.impl("group_scale", &gslora::group_scale_cuda);
  m.impl("group_prox_", &gslora::group_prox_cuda);
}
