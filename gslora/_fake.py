"""Fake (meta) kernels of the ``torch.ops.gslora`` ops, for ``torch.compile`` and FakeTensor.

They give every op's outputs the right shapes, dtypes and devices without computing anything,
so ``torch.compile(fullgraph=True)`` traces models of ``GSLoRALinear`` without graph breaks.
Imported by :mod:`gslora._ext` right after ``gslora._C`` (which defines the ops).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .reference import accumulate_dtype

__all__: list[str] = []


@torch.library.register_fake("gslora::lora_linear_fwd")
def _lora_linear_fwd_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    mask: Tensor | None,
    keep_scale: float,
) -> tuple[Tensor, Tensor]:
    """y [M, N] and xa [M, r], both in x's dtype and on x's device."""
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got {tuple(x.shape)}")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[1],
                 lambda: f"weight must have shape [N, {x.shape[1]}], got {tuple(weight.shape)}")
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] == x.shape[1],
                 lambda: f"lora_A must have shape [r, {x.shape[1]}], got {tuple(lora_A.shape)}")
    m, n, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    return x.new_empty((m, n)), x.new_empty((m, r))


@torch.library.register_fake("gslora::lora_linear_bwd")
def _lora_linear_bwd_fake(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scaling: float,
    mask: Tensor | None,
    keep_scale: float,
    compute_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dx [M, K] (numel 0 when not compute_dx), dA like lora_A, dB like lora_B."""
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty((0,))
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


@torch.library.register_fake("gslora::group_sq_norms")
def _group_sq_norms_fake(tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int) -> Tensor:
    """[num_groups] in the accumulate dtype, on the tensors' device."""
    t0 = tensors[0]
    return t0.new_empty((num_groups,), dtype=accumulate_dtype(t0.dtype))


@torch.library.register_fake("gslora::group_scale")
def _group_scale_fake(tensors: Sequence[Tensor], group_ids: Sequence[int], coeffs: Tensor) -> list[Tensor]:
    """One new contiguous tensor per input, same shape and dtype."""
    return [t.new_empty(t.shape) for t in tensors]


@torch.library.register_fake("gslora::group_prox_")
def _group_prox_fake(
    tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int, thresholds: Tensor
) -> Tensor:
    """The norms before the step, [num_groups] in the accumulate dtype (tensors change in place)."""
    t0 = tensors[0]
    return t0.new_empty((num_groups,), dtype=accumulate_dtype(t0.dtype))


@torch.library.register_fake("gslora::adamw_prox_")
def _adamw_prox_fake(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor], group_ids: Sequence[int],
    num_groups: int, thresholds: Tensor, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, adam_metric: bool,
) -> tuple[Tensor, Tensor]:
    """Norms and thresholds, [num_groups] each in the accumulate dtype (the lists change in place)."""
    t0 = params[0]
    acc = accumulate_dtype(t0.dtype)
    return t0.new_empty((num_groups,), dtype=acc), t0.new_empty((num_groups,), dtype=acc)


@torch.library.register_fake("gslora::group_lasso_penalty")
def _group_lasso_penalty_fake(
    tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int, weights: Tensor | None
) -> Tensor:
    """A 0-d tensor in the accumulate dtype."""
    t0 = tensors[0]
    return t0.new_empty((), dtype=accumulate_dtype(t0.dtype))


@torch.library.register_fake("gslora::lora_linear")
def _lora_linear_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    mask: Tensor | None,
    keep_scale: float,
) -> Tensor:
    """y [..., N] for x [..., K], in x's dtype and on x's device."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("gslora::dropout_mask")
def _dropout_mask_fake(x: Tensor, p: float, seed: Tensor) -> Tensor:
    """bool [M, K] for x [..., K], on x's device."""
    return x.new_empty((x.shape[:-1].numel(), x.shape[-1]), dtype=torch.bool)
