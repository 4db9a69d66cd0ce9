"""The specification of every gslora kernel, in plain PyTorch.

Every backend (C++ CPU, CUDA, Triton) is tested against these functions, and the ``torch``
backend calls them directly, so they must stay simple, obviously correct and device-agnostic.
Low-precision inputs are accumulated in float32 (float64 stays float64).

LoRA linear (W and b frozen, s = lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA)::

    y  = x Wᵀ + b + s · (d(x) Aᵀ) Bᵀ          x [M, K], W [N, K], A [r, K], B [N, r]
    xa = d(x) Aᵀ                                [M, r], kept from the forward for the backward
    d(x) = x ⊙ mask · keep_scale  (dropout; identity when mask is None)

Backward, with g = ∂L/∂y [M, N] and u = g B [M, r]::

    dB = s · gᵀ xa                  [N, r]
    dA = s · uᵀ d(x)                [r, K]
    dx = g W + s · d'(u A)          [M, K]   where d'(z) = z ⊙ mask · keep_scale

Group sparsity: tensor θ_i belongs to group ``group_ids[i]`` (a list of ints, one per tensor);
‖θ_g‖₂ is the L2 norm of the concatenation of the group's tensors. Per-group vectors (norms,
thresholds, coefficients) live on the tensors' device in the accumulate dtype.

Fused optimizer step (``adamw_prox_``): torch.optim.AdamW's update of every tensor (step count
t after the update, v̂ = v / (1 − β₂ᵗ))::

    θ ← θ (1 − lr·wd);  m ← lerp(m, ∇, 1 − β₁);  v ← β₂ v + (1 − β₂) ∇²
    θ ← θ − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

then the proximal step of every group with λ_g = thresholds[g], or, in Adam's metric,
λ_g = thresholds[g] / d_g with d_g = √(mean_{i∈g} v̂_i) + ε (when d_g > 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "accumulate_dtype",
    "lora_scaling",
    "lora_linear",
    "lora_linear_fwd",
    "lora_linear_bwd",
    "dropout_keep_mask",
    "philox4x32_10",
    "group_sq_norms",
    "group_norms",
    "group_lasso_penalty",
    "adamw_prox_",
    "group_scale",
    "group_prox_",
]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """s = lora_alpha / r (LoRA, the paper's choice) or lora_alpha / sqrt(r) (rsLoRA)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_BUMP = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF
_MASK_LANES = 16  # counters per block of the mask's layout


def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of a·m (a: int64 tensor of values < 2^32, m < 2^32), exact in
    int64 arithmetic: a is split into 16-bit halves so that no product exceeds 2^48."""
    t0, t1 = (a & 0xFFFF) * m, (a >> 16) * m
    return (t1 + (t0 >> 16)) >> 16, (t0 + ((t1 & 0xFFFF) << 16)) & _U32


def philox4x32_10(counter: Tensor, seed: int) -> Tensor:
    """Philox4x32-10 (Salmon et al., SC'11) of the 64-bit counters {c mod 2^32, c div 2^32, 0, 0}
    (counter: int64 tensor [C] of values >= 0) under the key {seed mod 2^32, seed div 2^32}
    (seed: 0 <= seed < 2^64): its four 32-bit output words, int64 [4, C]."""
    x = [counter & _U32, counter >> 32, torch.zeros_like(counter), torch.zeros_like(counter)]
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi0, lo0 = _mulhilo(x[0], _PHILOX_MUL[0])
        hi1, lo1 = _mulhilo(x[2], _PHILOX_MUL[1])
        x = [hi1 ^ x[1] ^ k0, lo1, hi0 ^ x[3] ^ k1, lo0]
        k0, k1 = (k0 + _PHILOX_BUMP[0]) & _U32, (k1 + _PHILOX_BUMP[1]) & _U32
    return torch.stack(x)


def dropout_keep_mask(x: Tensor, p: float, seed: int | Tensor) -> Tensor:
    """The LoRA dropout's keep mask, bool [M, K] for x [..., K] (M the product of x's leading
    sizes; only x's shape is read): element e of the row-major mask is kept iff its 32-bit
    Philox4x32-10 word under the key ``seed`` is >= ceil(p·2^32), so P(keep) = 1 - p. Element e
    is word (e mod 64) div 16 of counter 16·(e div 64) + e mod 16: each block of 16 counters
    gives 64 elements, word by word.

    The specification of the compiled op ``gslora::dropout_mask`` (which computes the same bits
    in SIMD lanes on every thread); gslora draws ``seed`` from torch's default generator per call.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must lie in [0, 1), got {p}")
    rows, cols = x.shape[:-1].numel(), x.shape[-1]
    n = rows * cols
    blocks = -(-n // (4 * _MASK_LANES))
    counter = torch.arange(blocks * _MASK_LANES, dtype=torch.int64, device=x.device)
    words = philox4x32_10(counter, int(seed) & 0xFFFFFFFFFFFFFFFF)  # [4, blocks L]
    words = words.view(4, blocks, _MASK_LANES).transpose(0, 1).reshape(-1)[:n]
    threshold = min(math.ceil(math.ldexp(p, 32)), _U32)
    return (words >= threshold).view(rows, cols)


def _dropped(x: Tensor, mask: Tensor | None, keep_scale: float) -> Tensor:
    return x if mask is None else x * mask.to(x.dtype) * keep_scale


def lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    mask: Tensor | None = None,
    keep_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Forward of the LoRA linear on 2-D x [M, K]. Returns (y [M, N], xa [M, r]) in x.dtype."""
    acc = accumulate_dtype(x.dtype)
    xf = x.to(acc)
    xa = _dropped(xf, mask, keep_scale) @ lora_A.to(acc).t()
    y = xf @ weight.to(acc).t() + scaling * (xa @ lora_B.to(acc).t())
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), xa.to(x.dtype)


def lora_linear_bwd(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scaling: float,
    mask: Tensor | None = None,
    keep_scale: float = 1.0,
    compute_dx: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Backward of :func:`lora_linear_fwd` for frozen W, b: returns (dx or None, dA, dB)."""
    acc = accumulate_dtype(x.dtype)
    g = grad_out.to(acc)
    A, B = lora_A.to(acc), lora_B.to(acc)
    u = g @ B
    dB = scaling * (g.t() @ xa.to(acc))
    dA = scaling * (u.t() @ _dropped(x.to(acc), mask, keep_scale))
    dx = None
    if compute_dx:
        dx = (g @ weight.to(acc) + _dropped(scaling * (u @ A), mask, keep_scale)).to(x.dtype)
    return dx, dA.to(lora_A.dtype), dB.to(lora_B.dtype)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
) -> Tensor:
    """Differentiable reference forward (plain autograd) on x [..., K] → [..., N]."""
    y = torch.nn.functional.linear(x, weight, bias)
    return y + scaling * torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A), lora_B)


def _check_groups(tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int) -> list[int]:
    ids = [int(i) for i in group_ids]
    if len(ids) != len(tensors):
        raise ValueError(f"group_ids has {len(ids)} entries for {len(tensors)} tensors")
    if any(i < 0 or i >= num_groups for i in ids):
        raise ValueError(f"group_ids must lie in [0, {num_groups}), got {ids}")
    return ids


def group_sq_norms(tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int) -> Tensor:
    """Σ_{i in g} ‖θ_i‖² per group, shape [num_groups], in the accumulate dtype."""
    ids = _check_groups(tensors, group_ids, num_groups)
    acc = accumulate_dtype(tensors[0].dtype) if tensors else torch.float32
    device = tensors[0].device if tensors else None
    out = torch.zeros(num_groups, dtype=acc, device=device)
    for t, g in zip(tensors, ids, strict=True):
        out[g] += t.detach().to(acc).pow(2).sum()
    return out


def group_norms(tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int) -> Tensor:
    """‖θ_g‖₂ per group, shape [num_groups]."""
    return group_sq_norms(tensors, group_ids, num_groups).sqrt()


def group_lasso_penalty(
    tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int, weights: Tensor | None = None
) -> Tensor:
    """Σ_g w_g ‖θ_g‖₂, differentiable by plain autograd (sub-gradient 0 at θ_g = 0)."""
    ids = _check_groups(tensors, group_ids, num_groups)
    acc = accumulate_dtype(tensors[0].dtype)
    total = torch.zeros((), dtype=acc, device=tensors[0].device)
    for g in range(num_groups):
        members = [t.to(acc).pow(2).sum() for t, i in zip(tensors, ids, strict=True) if i == g]
        if not members:  # a group without tensors has norm 0 and contributes nothing
            continue
        sq = torch.stack(members).sum()
        # where(sq > 0, sqrt, 0) with a safe argument keeps the gradient at 0 finite (0, not NaN).
        safe = torch.where(sq > 0, sq, torch.ones_like(sq))
        norm = torch.where(sq > 0, safe.sqrt(), torch.zeros_like(sq))
        total = total + (1.0 if weights is None else weights[g].to(acc)) * norm
    return total


def group_scale(tensors: Sequence[Tensor], group_ids: Sequence[int], coeffs: Tensor) -> list[Tensor]:
    """Out-of-place θ_i · c_{g(i)}: the penalty's backward with c_g = grad · w_g / ‖θ_g‖."""
    ids = _check_groups(tensors, group_ids, coeffs.numel())
    return [(t.to(coeffs.dtype) * coeffs[g]).to(t.dtype) for t, g in zip(tensors, ids, strict=True)]


def group_prox_(
    tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int, thresholds: Tensor
) -> Tensor:
    """In-place block soft-thresholding θ_g ← θ_g · max(0, 1 − λ_g / ‖θ_g‖₂).

    ``thresholds`` [num_groups] holds λ_g = lr · α · w_g. Groups whose norm is ≤ λ_g become exact
    zeros. Returns the norms *before* the step, [num_groups] in the accumulate dtype.
    """
    norms = group_norms(tensors, group_ids, num_groups)
    lam = thresholds.to(norms.dtype)
    factor = torch.where(norms > lam, 1 - lam / torch.where(norms > 0, norms, 1), 0)
    ids = _check_groups(tensors, group_ids, num_groups)
    with torch.no_grad():
        for t, g in zip(tensors, ids, strict=True):
            t.copy_((t.to(norms.dtype) * factor[g]).to(t.dtype))
    return norms


def adamw_prox_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    group_ids: Sequence[int],
    num_groups: int,
    thresholds: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adam_metric: bool,
) -> tuple[Tensor, Tensor]:
    """AdamW on every tensor, then the group prox (see the module docstring), in place.

    ``state_steps`` are AdamW's per-tensor step counts (one-element tensors), all equal; they are
    incremented, and t is their value after that. Returns the norms after the AdamW update
    (before shrinking) and the thresholds λ_g used, both [num_groups].
    """
    ids = _check_groups(params, group_ids, num_groups)
    lists = (grads, exp_avgs, exp_avg_sqs, state_steps)
    if any(len(ts) != len(params) for ts in lists):
        raise ValueError("grads, exp_avgs, exp_avg_sqs and state_steps need one entry per param")
    counts = {float(s) for s in state_steps}
    if len(counts) != 1:
        raise ValueError(f"state_steps must all be equal, got {sorted(counts)}")
    step = counts.pop() + 1
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    with torch.no_grad():
        # torch.optim.AdamW's single-tensor step, op for op.
        for p, g, m, v, s in zip(params, *lists, strict=True):
            s += 1
            p.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / bc1)
        lam = thresholds.to(accumulate_dtype(params[0].dtype))
        if adam_metric:
            sizes = torch.zeros(num_groups, dtype=torch.float64)
            for p, gid in zip(params, ids, strict=True):
                sizes[gid] += p.numel()
            sum_v = torch.zeros(num_groups, dtype=lam.dtype, device=lam.device)
            for v, gid in zip(exp_avg_sqs, ids, strict=True):
                sum_v[gid] += v.to(lam.dtype).sum()
            d = (sum_v / (sizes * bc2).to(lam)).sqrt() + eps
            ok = torch.isfinite(d) & (d > 0)
            lam = torch.where(ok, lam / torch.where(ok, d, 1), lam)
        norms = group_prox_(params, ids, num_groups, lam)
    return norms, lam
