"""gslora: Group Sparse LoRA (GS-LoRA) for continual forgetting, with fused kernels."""

from .backends import BackendError, describe_backends, select_backend
from .functional import (
    group_lasso_penalty,
    group_norms,
    group_prox_,
    group_sq_norms,
    lora_linear,
)
from .layers import GSLoRALinear

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "GSLoRALinear",
    "describe_backends",
    "group_lasso_penalty",
    "group_norms",
    "group_prox_",
    "group_sq_norms",
    "lora_linear",
    "select_backend",
]
