"""gslora: Group Sparse LoRA (GS-LoRA) for continual forgetting, with fused kernels.

The core (modules, functional ops, group sparsity, model surgery) needs only torch and numpy;
adapter files (safetensors) and the forgetting engine are imported on first use.
"""

from .backends import BackendError, describe_backends, select_backend
from .functional import (
    add_group_lasso_grad_,
    group_lasso_penalty,
    group_norms,
    group_prox_,
    group_sq_norms,
    lora_linear,
)
from .layers import GSLoRALinear
from .sparsity import AdaptiveSparsity, GroupSparsity, ProxOptimizer, SparsityWarmup
from .surgery import add_gslora, count_trainable, lora_groups, merge_gslora, unload_gslora

__version__ = "0.1.0"

_LAZY = {
    "save_adapter": "adapters", "load_adapter": "adapters",
    "export_peft": "adapters", "import_peft": "adapters",
}


def __getattr__(name: str):
    # safetensors is only needed once adapters are saved or loaded.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'gslora' has no attribute {name!r}")


__all__ = [
    "AdaptiveSparsity",
    "BackendError",
    "GSLoRALinear",
    "GroupSparsity",
    "ProxOptimizer",
    "SparsityWarmup",
    "add_group_lasso_grad_",
    "add_gslora",
    "count_trainable",
    "describe_backends",
    "export_peft",
    "group_lasso_penalty",
    "group_norms",
    "group_prox_",
    "group_sq_norms",
    "import_peft",
    "load_adapter",
    "lora_groups",
    "lora_linear",
    "merge_gslora",
    "save_adapter",
    "select_backend",
    "unload_gslora",
]
