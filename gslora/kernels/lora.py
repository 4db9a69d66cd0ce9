"""Triton kernels and launchers for the LoRA linear (forward and backward).

Semantics are exactly :func:`gslora.reference.lora_linear_fwd` / ``lora_linear_bwd``.

Design: three kernels, each used twice.

* ``_lora_proj_kernel``  P[M, R_PAD] (fp32) = keep · (X ⊙ mask) · Aᵀ, a skinny GEMM over K.
  Forward: xa = d(x)·Aᵀ. Backward: u = g·B (A := Bᵀ via strides, no mask).
* ``_lora_gemm_kernel``  OUT[M, N] = X·W' + s·d'(P·V) + bias, a tiled GEMM whose epilogue adds the
  rank-r term from a [BLOCK_M, R_PAD] tile of P. Forward: y (W' = Wᵀ, V = Bᵀ). Backward: dx
  (X = g, W' = W, V = A, d' = output dropout mask).
* ``_lora_wgrad_kernel``  WS[S, R_PAD, C] = Σ_{m in split} Pᵀ[:, m]·(Q ⊙ mask)[m, :], a GEMM that
  reduces over M, split over S programs along M (deterministic; the S partials are summed after).
  Backward: dB = s·(xaᵀ g)ᵀ and dA = s·keep·uᵀ(x ⊙ mask). No [M, N] temporary anywhere.

Why a two-kernel forward (P first, then the GEMM) instead of accumulating x·Aᵀ in the K loop of
the output GEMM: every N-tile of the fused variant must recompute its rows' x·Aᵀ (the side
product is complete only at the end of the K loop), which costs R_PAD/BLOCK_N extra tensor-core
work (12.5 % at r = 16, BLOCK_N = 128; 50 % at r = 64) and, with dropout, re-reads the [M, K]
mask once per N-tile (N/BLOCK_N times). The split reads x once more from HBM: for ViT-B fc1
(M = 32768, K = 768, N = 3072, bf16) that is 50 MB ≈ 10 µs at 4.8 TB/s against ≈ 24 µs of extra
MMA work in the fused form; for fc2 (K = 3072, N = 768) 201 MB ≈ 42 µs against ≈ 24 µs — about
even overall, so the simpler split wins: xa is computed once (the saved xa and the one used in y
are the same numbers), the mask is read once, and the same two kernels serve the backward.

Precision: operands of tensor-core products are x.dtype; every accumulator is fp32. P is kept in
fp32 and, for 16-bit inputs, fed to the MMA as hi + lo (two x.dtype parts, ~16 mantissa bits), so
the rank-r term is as exact as the reference's fp32 matmul. fp32 inputs use IEEE fp32 products
(no TF32), matching torch's default. Under the interpreter bf16 operands are upcast to fp32 (the
interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# Autotune configurations. GPU: chosen for sm_80/sm_90 class parts (shared memory per config is
# checked by tests/test_triton_aot.py against 163 KiB / 227 KiB). Interpreter: one config with
# large blocks, because every program costs ~0.7 ms there.
# --------------------------------------------------------------------------------------------

def _cfg(num_warps: int, num_stages: int, **meta: int) -> triton.Config:
    return triton.Config(dict(meta), num_warps=num_warps, num_stages=num_stages)


GEMM_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
]
PROJ_CONFIGS = [
    _cfg(4, 4, BLOCK_M=64, BLOCK_K=128),
    _cfg(4, 3, BLOCK_M=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=32, BLOCK_K=128),
]
WGRAD_CONFIGS = [
    _cfg(4, 3, BLOCK_M=64, BLOCK_C=128),
    _cfg(4, 4, BLOCK_M=32, BLOCK_C=128),
    _cfg(4, 4, BLOCK_M=64, BLOCK_C=64),
]
# fp32 inputs run exact fp32 FMA products (no tensor cores): smaller tiles, 4-byte operands.
# The 16-bit configs above spill and exceed sm_80's shared memory in fp32 (AOT compile).
GEMM_CONFIGS_FP32 = [
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
]
PROJ_CONFIGS_FP32 = [
    _cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
    _cfg(4, 3, BLOCK_M=32, BLOCK_K=64),
]
WGRAD_CONFIGS_FP32 = [
    _cfg(4, 3, BLOCK_M=32, BLOCK_C=64),
    _cfg(4, 3, BLOCK_M=32, BLOCK_C=128),
]
INTERPRET_GEMM = _cfg(4, 1, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
INTERPRET_PROJ = _cfg(4, 1, BLOCK_M=64, BLOCK_K=64)
INTERPRET_WGRAD = _cfg(4, 1, BLOCK_M=64, BLOCK_C=64)


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a·b with fp32 accumulation.

    UPCAST (set only when interpreting bf16): the interpreter's bf16 tl.dot is wrong, so the
    operands are widened to fp32 there. IEEE (fp32 inputs): exact fp32 products, no TF32.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def to_bf16_rne(x):
    """fp32 → bf16 rounded to nearest even, by integer arithmetic.

    The GPU's native conversion already rounds to nearest even; Triton's interpreter truncates
    (measured with triton 3.8), so the kernels call this only when interpreting bf16.
    """
    u = x.to(tl.uint32, bitcast=True)
    u = u + (((u >> 16) & 1) + 0x7FFF)
    return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def rounded(val, ptrs, EMULATE_RNE: tl.constexpr):
    """val cast to the pointer's dtype, as a store rounds it (bf16 emulated under the interpreter)."""
    if EMULATE_RNE:
        return to_bf16_rne(val.to(tl.float32))
    return val.to(ptrs.dtype.element_ty)


@triton.jit
def store_rounded(ptrs, val, mask, EMULATE_RNE: tl.constexpr):
    """tl.store with the cast to the pointer's dtype (bf16 rounding emulated under the interpreter)."""
    tl.store(ptrs, rounded(val, ptrs, EMULATE_RNE), mask=mask)


@triton.jit
def _kahan_dot(a, b, acc, comp):
    """(acc, comp) after adding the fp32 block product a·b with Kahan compensation.

    The fp32 (IEEE, FMA) path of the K/M loops. One FMA chain over all of K (tl.dot with acc)
    made fp32 errors grow with K: on an H200, K = 1000-1531 gave 3-8x the error of cuBLAS fp32.
    Each block's product now starts from zero and is added to the running sum with
    compensation. The plain form ``acc + tl.dot(a, b)`` does not work: Triton's combiner folds
    it back into ``tl.dot(a, b, acc)`` (seen in the TTIR); the subtraction below is not folded.
    """
    part = tl.dot(a, b, input_precision="ieee")
    y = part - comp
    t = acc + y
    comp = (t - acc) - y
    return t, comp


@triton.jit
def _mma_fp32_lhs(p, v, acc, SPLIT_P: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + p·v for an fp32 p and a v in the input dtype: p = hi + lo in v's dtype when SPLIT_P."""
    p_hi = p.to(v.dtype)
    acc = _mma(p_hi, v, acc, UPCAST, IEEE)
    if SPLIT_P:
        p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
        acc = _mma(p_lo, v, acc, UPCAST, IEEE)
    return acc


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _lora_proj_kernel(
    x_ptr, a_ptr, mask_ptr, p_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_mm, stride_mk,
    keep_scale,
    HAS_MASK: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """P[M, R_PAD] = keep · (X ⊙ mask)[M, K] · A[R, K]ᵀ in fp32; columns ≥ R are zero."""
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    comp = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)  # Kahan compensation (fp32 inputs)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        ld = row_ok[:, None] & (kk[None, :] < K)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + kk[None, :] * stride_xk, mask=ld, other=0.0)
        if HAS_MASK:
            # x ⊙ mask is exact in any dtype; keep_scale is applied to the fp32 result instead.
            keep = tl.load(mask_ptr + rm64[:, None] * stride_mm + kk[None, :] * stride_mk,
                           mask=ld, other=0)
            x = tl.where(keep != 0, x, tl.zeros_like(x))
        a = tl.load(a_ptr + rr[:, None] * stride_ar + kk[None, :] * stride_ak,
                    mask=(rr[:, None] < R) & (kk[None, :] < K), other=0.0)
        if IEEE:
            acc, comp = _kahan_dot(x, tl.trans(a), acc, comp)
        else:
            acc = _mma(x, tl.trans(a), acc, UPCAST, IEEE)
    if HAS_MASK:
        acc = acc * keep_scale
    tl.store(p_ptr + rm64[:, None] * R_PAD + rr[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _lora_gemm_kernel(
    x_ptr, w_ptr, p_ptr, v_ptr, bias_ptr, mask_ptr, out_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_vr, stride_vn,
    stride_mm, stride_mn, stride_om, stride_on,
    scaling, keep_scale,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, R_PAD: tl.constexpr,
    SPLIT_P: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """OUT[M, N] = X[M, K]·W'[K, N] + s·d'(P[M, R_PAD]·V[R_PAD, N]) + bias[N].

    W'[k, n] lives at w_ptr + k·stride_wk + n·stride_wn (so Wᵀ and W are both served by
    strides); V rows ≥ R read as zero; d' multiplies by mask[M, N]·keep_scale when HAS_MASK.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M row-tiles share each W' column panel while it is in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    out_ok = (rm[:, None] < M) & (rn[None, :] < N)
    # Wrapped row/column indices keep the K loop free of M/N masks (out-of-range rows and
    # columns compute duplicates that the final store drops).
    rm_in = (rm % M).to(tl.int64)
    rn_in = (rn % N).to(tl.int64)

    # Rank-r term first, as a prologue: s·d'(P·V) initialises the accumulator that the K loop
    # then adds x·W' into. Doing it before the loop (not as an epilogue) keeps a single
    # [BLOCK_M, BLOCK_N] fp32 accumulator live: a separate one for the masked rank-r term
    # spilled the 128x256 tiles (255 registers + stack, seen in the AOT compile).
    rr = tl.arange(0, R_PAD)
    p = tl.load(p_ptr + rm_in[:, None] * R_PAD + rr[None, :])
    v = tl.load(v_ptr + rr[:, None] * stride_vr + rn_in[None, :] * stride_vn,
                mask=rr[:, None] < R, other=0.0)
    acc = _mma_fp32_lhs(p, v, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), SPLIT_P, UPCAST, IEEE)
    acc = acc * scaling
    if HAS_MASK:
        keep = tl.load(mask_ptr + rm64[:, None] * stride_mm + rn64[None, :] * stride_mn,
                       mask=out_ok, other=0)
        acc = tl.where(keep != 0, acc * keep_scale, 0.0)

    x_ptrs = x_ptr + rm_in[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rk[:, None] * stride_wk + rn_in[None, :] * stride_wn
    comp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # Kahan compensation (fp32 inputs)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        x = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if IEEE:
            acc, comp = _kahan_dot(x, w, acc, comp)
        else:
            acc = _mma(x, w, acc, UPCAST, IEEE)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        b = tl.load(bias_ptr + rn_in).to(tl.float32)
        acc += b[None, :]
    # UPCAST is set exactly when interpreting bf16: then emulate the GPU's rounding as well.
    store_rounded(out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on, acc, out_ok,
                  UPCAST)


@triton.jit
def _lora_wgrad_kernel(
    p_ptr, q_ptr, mask_ptr, ws_ptr,
    M, C, R, rows_per_split,
    stride_pm, stride_pr, stride_qm, stride_qc, stride_mm, stride_mc,
    HAS_MASK: tl.constexpr, R_PAD: tl.constexpr, P_FP32: tl.constexpr, SPLIT_P: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """WS[split, R_PAD, C] = Σ_{m in this split} P[m, :R]ᵀ · (Q ⊙ mask)[m, :] in fp32."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rr = tl.arange(0, R_PAD)
    rmb = tl.arange(0, BLOCK_M)
    col_ok = rc < C
    rc64 = rc.to(tl.int64)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    acc = tl.zeros((R_PAD, BLOCK_C), dtype=tl.float32)
    comp = tl.zeros((R_PAD, BLOCK_C), dtype=tl.float32)  # Kahan compensation (fp32 inputs)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + rmb
        row_ok = rm < m_end
        rm64 = rm.to(tl.int64)
        p = tl.load(p_ptr + rm64[:, None] * stride_pm + rr[None, :] * stride_pr,
                    mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
        ld = row_ok[:, None] & col_ok[None, :]
        q = tl.load(q_ptr + rm64[:, None] * stride_qm + rc64[None, :] * stride_qc, mask=ld, other=0.0)
        if HAS_MASK:
            keep = tl.load(mask_ptr + rm64[:, None] * stride_mm + rc64[None, :] * stride_mc,
                           mask=ld, other=0)
            q = tl.where(keep != 0, q, tl.zeros_like(q))
        if IEEE:
            acc, comp = _kahan_dot(tl.trans(p), q, acc, comp)
        elif P_FP32:
            acc = _mma_fp32_lhs(tl.trans(p), q, acc, SPLIT_P, UPCAST, IEEE)
        else:
            acc = _mma(tl.trans(p), q, acc, UPCAST, IEEE)
    ws = ws_ptr + pid_s.to(tl.int64) * R_PAD * C
    tl.store(ws + rr[:, None] * C + rc64[None, :], acc, mask=col_ok[None, :])


# Autotuned GPU variants, one per operand class (16-bit: tensor cores; fp32: FMA). Keys: problem
# sizes and every constexpr that changes the code.
_PROJ_KEY = ["M", "K", "R_PAD", "HAS_MASK"]
_GEMM_KEY = ["M", "N", "K", "R_PAD", "HAS_MASK"]
_WGRAD_KEY = ["M", "C", "R_PAD", "HAS_MASK", "P_FP32"]
_proj_tuned = triton.autotune(PROJ_CONFIGS, key=_PROJ_KEY)(_lora_proj_kernel)
_gemm_tuned = triton.autotune(GEMM_CONFIGS, key=_GEMM_KEY)(_lora_gemm_kernel)
_wgrad_tuned = triton.autotune(WGRAD_CONFIGS, key=_WGRAD_KEY)(_lora_wgrad_kernel)
_proj_tuned_fp32 = triton.autotune(PROJ_CONFIGS_FP32, key=_PROJ_KEY)(_lora_proj_kernel)
_gemm_tuned_fp32 = triton.autotune(GEMM_CONFIGS_FP32, key=_GEMM_KEY)(_lora_gemm_kernel)
_wgrad_tuned_fp32 = triton.autotune(WGRAD_CONFIGS_FP32, key=_WGRAD_KEY)(_lora_wgrad_kernel)


# --------------------------------------------------------------------------------------------
# Launchers (no validation here; the public functions in gslora.kernels.ops validate)
# --------------------------------------------------------------------------------------------

# Plain-Python helpers: triton.cdiv / next_power_of_2 are constexpr functions in recent Triton
# and cost ~10 µs per host call through their wrapper (profiled); launches call them often.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def r_pad(r: int) -> int:
    """LoRA rank padded to the MMA minimum (16) and a power of two (tl.arange needs one)."""
    return max(16, 1 << (r - 1).bit_length())


def _flags(dtype: torch.dtype) -> dict:
    return {
        "UPCAST": INTERPRET and dtype == torch.bfloat16,
        "IEEE": dtype == torch.float32,
    }


def _launch(tuned, plain, interp_cfg: triton.Config, grid, *args, **constexprs) -> None:
    """Launch ``plain`` (interpreter, fixed config) or the autotuned wrapper ``tuned``.

    ``tuned`` is a pair (16-bit wrapper, fp32 wrapper), picked by the IEEE flag (fp32 inputs).
    """
    tuned = tuned[1] if constexprs.get("IEEE") else tuned[0]
    if INTERPRET:
        plain[grid](*args, **constexprs, **interp_cfg.kwargs)
    elif os.environ.get("GSLORA_TRITON_AUTOTUNE", "1") == "0":
        # First config only: no benchmarking of every config for every new shape (GPU tests,
        # quick runs); the autotuned path is the default.
        cfg = tuned.configs[0]
        plain[grid](*args, **constexprs, **cfg.kwargs, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages)
    else:
        tuned[grid](*args, **constexprs)


def _mask_u8(mask: Tensor | None) -> Tensor | None:
    # bool tensors are passed as bytes: a 1-byte load is the same on every Triton version.
    return None if mask is None else mask.view(torch.uint8)


def lora_proj(x: Tensor, a: tuple[Tensor, int, int], r: int, mask: Tensor | None,
              keep_scale: float) -> Tensor:
    """P [M, r_pad(r)] fp32 = keep·(x ⊙ mask)·Aᵀ with A[r, K] given as (tensor, stride_r, stride_k)."""
    M, K = x.shape
    rp = r_pad(r)
    p = torch.empty((M, rp), device=x.device, dtype=torch.float32)
    if M == 0:
        return p
    a_t, s_ar, s_ak = a
    m8 = _mask_u8(mask)
    grid = lambda meta: (_cdiv(M, meta["BLOCK_M"]),)
    _launch(
        (_proj_tuned, _proj_tuned_fp32), _lora_proj_kernel, INTERPRET_PROJ, grid,
        x, a_t, m8 if m8 is not None else x, p,
        M, K, r,
        x.stride(0), x.stride(1), s_ar, s_ak,
        m8.stride(0) if m8 is not None else 0, m8.stride(1) if m8 is not None else 0,
        float(keep_scale),
        HAS_MASK=mask is not None, R_PAD=rp, **_flags(x.dtype),
    )
    return p


def lora_gemm(x: Tensor, w: tuple[Tensor, int, int], n: int, p: Tensor,
              v: tuple[Tensor, int, int], r: int, bias: Tensor | None, mask: Tensor | None,
              scaling: float, keep_scale: float) -> Tensor:
    """OUT [M, n] = x·W' + s·d'(P·V) + bias with W'[K, n] and V[r, n] given as (tensor, strides)."""
    M, K = x.shape
    out = torch.empty((M, n), device=x.device, dtype=x.dtype)
    if M == 0 or n == 0:
        return out
    w_t, s_wk, s_wn = w
    v_t, s_vr, s_vn = v
    m8 = _mask_u8(mask)
    grid = lambda meta: (_cdiv(M, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)
    _launch(
        (_gemm_tuned, _gemm_tuned_fp32), _lora_gemm_kernel, INTERPRET_GEMM, grid,
        x, w_t, p, v_t, bias if bias is not None else x, m8 if m8 is not None else x, out,
        M, n, K, r,
        x.stride(0), x.stride(1), s_wk, s_wn, s_vr, s_vn,
        m8.stride(0) if m8 is not None else 0, m8.stride(1) if m8 is not None else 0,
        out.stride(0), out.stride(1),
        float(scaling), float(keep_scale),
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, R_PAD=p.shape[1],
        SPLIT_P=x.dtype != torch.float32, **_flags(x.dtype),
    )
    return out


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(x: Tensor, programs_c: int, M: int) -> int:
    """How many M-splits the weight-gradient reduction uses: ~2 waves of programs on the GPU."""
    if INTERPRET or x.device.type != "cuda":
        return 1
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    want = _cdiv(2 * sms, max(programs_c, 1))
    # At least 256 rows per split so each program amortises its accumulator store.
    return max(1, min(want, _cdiv(M, 256)))


def lora_wgrad(p: Tensor, r: int, q: Tensor, mask: Tensor | None) -> Tensor:
    """[r, C] fp32 = P[:, :r]ᵀ · (q ⊙ mask) for P [M, ≥r] (fp32 or q.dtype) and q [M, C]."""
    M, C = q.shape
    rp = r_pad(r)
    if M == 0 or C == 0:
        return torch.zeros((r, C), device=q.device, dtype=torch.float32)
    min_block_c = 64
    splits = _num_splits(q, _cdiv(C, min_block_c), M)
    rows_per_split = _cdiv(_cdiv(M, splits), 64) * 64
    splits = _cdiv(M, rows_per_split)
    ws = torch.empty((splits, rp, C), device=q.device, dtype=torch.float32)
    m8 = _mask_u8(mask)
    grid = lambda meta: (_cdiv(C, meta["BLOCK_C"]), splits)
    _launch(
        (_wgrad_tuned, _wgrad_tuned_fp32), _lora_wgrad_kernel, INTERPRET_WGRAD, grid,
        p, q, m8 if m8 is not None else q, ws,
        M, C, r, rows_per_split,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        m8.stride(0) if m8 is not None else 0, m8.stride(1) if m8 is not None else 0,
        HAS_MASK=mask is not None, R_PAD=rp, P_FP32=p.dtype == torch.float32,
        SPLIT_P=p.dtype == torch.float32 and q.dtype != torch.float32, **_flags(q.dtype),
    )
    total = ws[0] if splits == 1 else ws.sum(0)
    return total[:r]


def lora_linear_fwd_impl(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                         lora_B: Tensor, scaling: float, mask: Tensor | None,
                         keep_scale: float) -> tuple[Tensor, Tensor]:
    """(y [M, N], xa [M, r]) for validated 2-D inputs (see gslora.reference.lora_linear_fwd)."""
    n = weight.shape[0]
    r = lora_A.shape[0]
    p = lora_proj(x, (lora_A, lora_A.stride(0), lora_A.stride(1)), r, mask, keep_scale)
    y = lora_gemm(
        x, (weight, weight.stride(1), weight.stride(0)), n, p,
        (lora_B, lora_B.stride(1), lora_B.stride(0)), r,
        None if bias is None else bias.contiguous(), None, scaling, 1.0,
    )
    # A fresh contiguous [M, r] tensor (for fp32, .to() alone would return a strided view of p).
    return y, p[:, :r].to(x.dtype).contiguous()


def lora_linear_bwd_impl(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor,
                         lora_B: Tensor, xa: Tensor, scaling: float, mask: Tensor | None,
                         keep_scale: float, compute_dx: bool
                         ) -> tuple[Tensor | None, Tensor, Tensor]:
    """(dx or None, dA, dB) for validated 2-D inputs (see gslora.reference.lora_linear_bwd)."""
    k = x.shape[1]
    r = lora_A.shape[0]
    # u = g·B [M, r_pad] in fp32: the projection kernel with A := Bᵀ (strides swapped).
    u = lora_proj(grad_out, (lora_B, lora_B.stride(1), lora_B.stride(0)), r, None, 1.0)
    dB = (lora_wgrad(xa, r, grad_out, None) * scaling).t().to(lora_B.dtype).contiguous()
    dA = (lora_wgrad(u, r, x, mask) * (scaling * (keep_scale if mask is not None else 1.0)))
    dA = dA.to(lora_A.dtype)
    dx = None
    if compute_dx:
        dx = lora_gemm(
            grad_out, (weight, weight.stride(0), weight.stride(1)), k, u,
            (lora_A, lora_A.stride(0), lora_A.stride(1)), r, None, mask, scaling, keep_scale,
        )
    return dx, dA, dB
