"""Triton GPU kernels for gslora (fused LoRA linear forward/backward, fused group ops).

The six ops have exactly the signatures and semantics of :mod:`gslora.reference`:
``lora_linear_fwd``, ``lora_linear_bwd``, ``group_sq_norms``, ``group_scale``, ``group_prox_``
and ``adamw_prox_`` (the AdamW step fused with the prox).
They run CUDA tensors, or CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` was set
before this package was first used. They are also registered as ``torch.ops.gslora_triton.*``
custom ops (with fake implementations) so ``torch.compile`` can trace them.

This package imports without triton; :func:`unavailable_reason` then says why it cannot run.
The kernels themselves live in :mod:`gslora.kernels.lora` and :mod:`gslora.kernels.group`;
:mod:`gslora.kernels.aot` compiles them ahead of time for sm_80/sm_90 (no GPU needed).

Dtypes: the LoRA ops take fp16, bf16 (tensor cores, fp32 accumulation) and fp32 (exact fp32
FMA products, no TF32, Kahan-compensated); fp64 raises a ValueError naming x. The group ops also
take fp64. ``GSLORA_TRITON_AUTOTUNE=0`` launches the first autotune config instead of tuning
(used by the GPU tests; tuning every config for every new shape costs seconds).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "unavailable_reason",
    "lora_linear_fwd",
    "lora_linear_bwd",
    "group_sq_norms",
    "group_scale",
    "group_prox_",
    "adamw_prox_",
]

_load_error: str | None = None
_ops: Any = None


def _load() -> Any:
    """Import the triton-backed ops once; remember a failure as a reason string."""
    global _ops, _load_error
    if _ops is None and _load_error is None:
        try:
            _ops = importlib.import_module(".ops", __name__)
        except ImportError as exc:
            _load_error = f"triton is not installed or failed to import ({exc})"
        except Exception as exc:  # a broken triton install must not break `import gslora`
            _load_error = f"gslora.kernels failed to load ({type(exc).__name__}: {exc})"
    return _ops


def unavailable_reason() -> str | None:
    """None when the Triton kernels can run here, else a short reason."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpreting and not torch.cuda.is_available():
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors)"
    if _load() is None:
        return _load_error
    from . import lora

    if lora.INTERPRET != interpreting:
        return (
            "TRITON_INTERPRET changed after gslora.kernels was imported "
            f"(kernels were built with TRITON_INTERPRET={'1' if lora.INTERPRET else 'unset'})"
        )
    if not interpreting:
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return f"needs a GPU of compute capability >= 8.0 (bf16 tensor cores), got {major}.{minor}"
    return None


def _require() -> Any:
    ops = _load()
    if ops is None:
        raise RuntimeError(f"gslora.kernels cannot run: {_load_error}")
    return ops


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
    """y = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ [M, N] and xa = d(x)·Aᵀ [M, r], both in x.dtype.

    x [M, K], weight [N, K], bias [N] or None, lora_A [r, K], lora_B [N, r], mask bool [M, K]
    or None (dropout: d(x) = x ⊙ mask · keep_scale). fp16, bf16 or fp32; fp32 accumulation.
    """
    return _require().lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, mask, keep_scale)


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
    """(dx [M, K] or None, dA [r, K], dB [N, r]) for grad_out [M, N]; W and b frozen."""
    return _require().lora_linear_bwd(
        grad_out, x, weight, lora_A, lora_B, xa, scaling, mask, keep_scale, compute_dx
    )


def group_sq_norms(tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int) -> Tensor:
    """[num_groups] Σ‖θ_i‖² per group (fp32, fp64 for fp64 tensors) in one launch."""
    return _require().group_sq_norms(tensors, group_ids, num_groups)


def group_scale(tensors: Sequence[Tensor], group_ids: Sequence[int], coeffs: Tensor) -> list[Tensor]:
    """New tensors θ_i · coeffs[g(i)], coeffs [num_groups], in one launch."""
    return _require().group_scale(tensors, group_ids, coeffs)


def group_prox_(
    tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int, thresholds: Tensor
) -> Tensor:
    """In place θ_g ← θ_g·max(0, 1 − λ_g/‖θ_g‖₂) in one launch; returns the norms before [G]."""
    return _require().group_prox_(tensors, group_ids, num_groups, thresholds)


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
    """torch.optim.AdamW's step and then the group prox, in place, one launch (one program per
    group: update and sum, then shrink while the group is in L2); returns the norms after the
    AdamW update and the thresholds used, [num_groups] each. ``state_steps``: AdamW's per-tensor
    step counts (CPU scalars, all equal), incremented."""
    return _require().adamw_prox_(params, grads, exp_avgs, exp_avg_sqs, state_steps, group_ids,
                                  num_groups, thresholds, lr, beta1, beta2, eps, weight_decay,
                                  adam_metric)
