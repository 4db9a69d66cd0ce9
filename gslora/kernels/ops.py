"""The Triton ops as ``torch.ops.gslora_triton.*`` custom ops, plus the validated public API.

Registering them with :func:`torch.library.custom_op` (with fake implementations) lets
``torch.compile`` trace through calls without graph breaks: the compiler sees opaque ops with
known output shapes. Registration is idempotent: importing this module a second time (reload,
two import paths) reuses the ops already registered instead of failing.

This module imports triton; ``gslora.kernels`` imports it lazily.
"""

# No ``from __future__ import annotations``: torch.library infers the op schemas from the
# runtime annotations below; the custom-op bodies keep ``Optional`` because older torch releases
# (the GPU machines run 2.11) parse only that spelling reliably.
import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from . import group, lora

NAMESPACE = "gslora_triton"


def _register(name: str, fn, fake, mutates_args: tuple[str, ...] = ()):
    """The op ``gslora_triton::name``: registered now, or the one registered by an earlier import."""
    namespace = getattr(torch.ops, NAMESPACE)
    try:
        return getattr(namespace, name)
    except (AttributeError, RuntimeError):
        pass
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args)(fn)
    op.register_fake(fake)
    return getattr(namespace, name)


# ------------------------------ LoRA linear ------------------------------------------------

def _fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,  # noqa: UP045
         lora_B: Tensor, scaling: float, mask: Optional[Tensor],  # noqa: UP045
         keep_scale: float) -> tuple[Tensor, Tensor]:
    return lora.lora_linear_fwd_impl(x, weight, bias, lora_A, lora_B, scaling, mask, keep_scale)


def _fwd_fake(x, weight, bias, lora_A, lora_B, scaling, mask, keep_scale):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


def _bwd(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
         scaling: float, mask: Optional[Tensor], keep_scale: float,  # noqa: UP045
         compute_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dA, dB = lora.lora_linear_bwd_impl(
        grad_out, x, weight, lora_A, lora_B, xa, scaling, mask, keep_scale, compute_dx
    )
    # Custom ops cannot return None: an empty tensor stands for "dx not computed".
    return (dx if dx is not None else x.new_empty((0,))), dA, dB


def _bwd_fake(grad_out, x, weight, lora_A, lora_B, xa, scaling, mask, keep_scale, compute_dx):
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty((0,))
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


# ------------------------------ group ops --------------------------------------------------

def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sq_norms(tensors: list[Tensor], group_ids: list[int], num_groups: int) -> Tensor:
    return group.group_sq_norms_impl(tensors, list(group_ids), num_groups)


def _sq_norms_fake(tensors, group_ids, num_groups):
    return tensors[0].new_empty((num_groups,), dtype=_acc(tensors[0].dtype))


def _scale(tensors: list[Tensor], group_ids: list[int], coeffs: Tensor) -> list[Tensor]:
    return group.group_scale_impl(tensors, list(group_ids), coeffs)


def _scale_fake(tensors, group_ids, coeffs):
    return [torch.empty_like(t) for t in tensors]


def _prox(tensors: list[Tensor], group_ids: list[int], num_groups: int, thresholds: Tensor
          ) -> Tensor:
    return group.group_prox_impl(tensors, list(group_ids), num_groups, thresholds)


def _prox_fake(tensors, group_ids, num_groups, thresholds):
    return tensors[0].new_empty((num_groups,), dtype=_acc(tensors[0].dtype))


def _adamw_prox(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], state_steps: list[Tensor], group_ids: list[int],
                num_groups: int, thresholds: Tensor, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, adam_metric: bool) -> tuple[Tensor, Tensor]:
    return group.adamw_prox_impl(params, grads, exp_avgs, exp_avg_sqs, state_steps,
                                 list(group_ids), num_groups, thresholds, lr, beta1, beta2, eps,
                                 weight_decay, adam_metric)


def _adamw_prox_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, group_ids, num_groups,
                     thresholds, lr, beta1, beta2, eps, weight_decay, adam_metric):
    out = params[0].new_empty((num_groups,), dtype=_acc(params[0].dtype))
    return out, torch.empty_like(out)


lora_linear_fwd_op = _register("lora_linear_fwd", _fwd, _fwd_fake)
lora_linear_bwd_op = _register("lora_linear_bwd", _bwd, _bwd_fake)
group_sq_norms_op = _register("group_sq_norms", _sq_norms, _sq_norms_fake)
group_scale_op = _register("group_scale", _scale, _scale_fake)
group_prox_op = _register("group_prox_", _prox, _prox_fake, mutates_args=("tensors",))
adamw_prox_op = _register("adamw_prox_", _adamw_prox, _adamw_prox_fake,
                          mutates_args=("params", "exp_avgs", "exp_avg_sqs", "state_steps"))


# ------------------------------ validation -------------------------------------------------

def _check_float(name: str, t: Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype} (the dtype of x)")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of x)")


def _check_device(t: Tensor, name: str) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and lora.INTERPRET:
        return
    raise ValueError(
        f"{name} is on {t.device}: the triton backend runs CUDA tensors "
        "(or CPU tensors when TRITON_INTERPRET=1 was set before import)"
    )


def _check_mask(mask: Tensor | None, shape: tuple[int, int], device: torch.device,
                keep_scale: float) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must have shape {list(shape)} (like x), got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device}, expected {device}")
    if not keep_scale > 0:
        raise ValueError(f"keep_scale must be > 0, got {keep_scale}")


def _check_lora(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                bias: Tensor | None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in lora.SUPPORTED_DTYPES:
        raise ValueError(
            f"x has dtype {x.dtype}; the triton backend supports float16, bfloat16 and float32"
        )
    _check_device(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {list(x.shape)}")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _check_float(name, t, x.dtype, x.device)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {list(t.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    r = lora_A.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight must have shape [N, {k}], got {list(weight.shape)}")
    if lora_A.shape[1] != k or r < 1:
        raise ValueError(f"lora_A must have shape [r >= 1, {k}], got {list(lora_A.shape)}")
    if tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must have shape [{n}, {r}], got {list(lora_B.shape)}")
    if bias is not None:
        _check_float("bias", bias, x.dtype, x.device)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape [{n}], got {list(bias.shape)}")


def _check_groups(tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int
                  ) -> list[int]:
    if len(tensors) == 0:
        raise ValueError("tensors must not be empty")
    ids = [int(g) for g in group_ids]
    if len(ids) != len(tensors):
        raise ValueError(f"group_ids has {len(ids)} entries for {len(tensors)} tensors")
    if num_groups < 1 or any(not 0 <= g < num_groups for g in ids):
        raise ValueError(f"every group id must lie in [0, {num_groups}), got {ids}")
    first = tensors[0]
    if first.dtype not in (*lora.SUPPORTED_DTYPES, torch.float64):
        raise ValueError(f"tensors[0] has unsupported dtype {first.dtype}")
    _check_device(first, "tensors[0]")
    for i, t in enumerate(tensors):
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"tensors[{i}] is {t.dtype} on {t.device}; tensors[0] is {first.dtype} on "
                f"{first.device}: one dtype and device per call"
            )
    return ids


def _check_group_vector(name: str, v: Tensor, num_groups: int, device: torch.device) -> None:
    if not isinstance(v, Tensor) or tuple(v.shape) != (num_groups,):
        shape = list(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a tensor of shape [{num_groups}], got {shape}")
    if not v.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device}, expected {device} (the tensors' device)")


# ------------------------------ public API -------------------------------------------------

def lora_linear_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                    lora_B: Tensor, scaling: float, mask: Tensor | None = None,
                    keep_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """y [M, N], xa [M, r] of y = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ (see gslora.reference)."""
    _check_lora(x, weight, lora_A, lora_B, bias)
    _check_mask(mask, tuple(x.shape), x.device, keep_scale)
    return lora_linear_fwd_op(x, weight, bias, lora_A, lora_B, float(scaling), mask,
                              float(keep_scale))


def lora_linear_bwd(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                    xa: Tensor, scaling: float, mask: Tensor | None = None,
                    keep_scale: float = 1.0, compute_dx: bool = True
                    ) -> tuple[Tensor | None, Tensor, Tensor]:
    """(dx [M, K] or None, dA [r, K], dB [N, r]) for g = grad_out [M, N] (see gslora.reference)."""
    _check_lora(x, weight, lora_A, lora_B, None)
    m, n, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    _check_float("grad_out", grad_out, x.dtype, x.device)
    if tuple(grad_out.shape) != (m, n):
        raise ValueError(f"grad_out must have shape [{m}, {n}], got {list(grad_out.shape)}")
    _check_float("xa", xa, x.dtype, x.device)
    if tuple(xa.shape) != (m, r):
        raise ValueError(f"xa must have shape [{m}, {r}], got {list(xa.shape)}")
    _check_mask(mask, tuple(x.shape), x.device, keep_scale)
    dx, dA, dB = lora_linear_bwd_op(grad_out, x, weight, lora_A, lora_B, xa, float(scaling), mask,
                                    float(keep_scale), bool(compute_dx))
    return (dx if compute_dx else None), dA, dB


def group_sq_norms(tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int) -> Tensor:
    """Σ_{i in g} ‖θ_i‖² per group: [num_groups] in the accumulate dtype, one launch."""
    ids = _check_groups(tensors, group_ids, num_groups)
    return group_sq_norms_op(list(tensors), ids, int(num_groups))


def group_scale(tensors: Sequence[Tensor], group_ids: Sequence[int], coeffs: Tensor) -> list[Tensor]:
    """New tensors θ_i · coeffs[g(i)] (computed in coeffs.dtype), one launch."""
    if not isinstance(coeffs, Tensor) or coeffs.dim() != 1:
        raise ValueError("coeffs must be a 1-D tensor [num_groups]")
    ids = _check_groups(tensors, group_ids, coeffs.numel())
    _check_group_vector("coeffs", coeffs, coeffs.numel(), tensors[0].device)
    return group_scale_op(list(tensors), ids, coeffs)


def group_prox_(tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int,
                thresholds: Tensor) -> Tensor:
    """In place θ_g ← θ_g·max(0, 1 − λ_g/‖θ_g‖₂); returns the norms before, [num_groups]."""
    ids = _check_groups(tensors, group_ids, num_groups)
    _check_group_vector("thresholds", thresholds, num_groups, tensors[0].device)
    return group_prox_op(list(tensors), ids, int(num_groups), thresholds)


def adamw_prox_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor],
                group_ids: Sequence[int], num_groups: int, thresholds: Tensor, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float, adam_metric: bool
                ) -> tuple[Tensor, Tensor]:
    """AdamW on every tensor, then the group prox, in place and in one launch (see
    gslora.reference.adamw_prox_); returns (norms after the AdamW update, thresholds used)."""
    ids = _check_groups(params, group_ids, num_groups)
    first = params[0]
    for name, ts in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        if len(ts) != len(params):
            raise ValueError(f"{name} has {len(ts)} tensors for {len(params)} params (one per param)")
        for i, (t, p) in enumerate(zip(ts, params, strict=True)):
            if t.shape != p.shape or t.dtype != first.dtype or t.device != first.device:
                raise ValueError(f"{name}[{i}] is {list(t.shape)} {t.dtype} on {t.device}; "
                                 f"params[{i}] is {list(p.shape)} {first.dtype} on {first.device}")
    if len(state_steps) != len(params):
        raise ValueError(f"state_steps has {len(state_steps)} tensors for {len(params)} params")
    counts = {float(s) for s in state_steps}  # AdamW keeps them on the CPU: no device sync
    if len(counts) != 1:
        raise ValueError(f"state_steps must all be equal (one step count for the fused step), "
                         f"got {sorted(counts)}")
    if min(counts) < 0:
        raise ValueError(f"state_steps must be >= 0, got {min(counts)}")
    _check_group_vector("thresholds", thresholds, num_groups, first.device)
    for name, value, ok in (("lr", lr, lr >= 0), ("beta1", beta1, 0 <= beta1 < 1),
                            ("beta2", beta2, 0 <= beta2 < 1), ("eps", eps, eps >= 0),
                            ("weight_decay", weight_decay, weight_decay >= 0)):
        if not (ok and math.isfinite(value)):
            raise ValueError(f"{name} = {value} is out of range")
    return adamw_prox_op(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                         list(state_steps), ids, int(num_groups), thresholds, float(lr),
                         float(beta1), float(beta2), float(eps), float(weight_decay),
                         bool(adam_metric))
