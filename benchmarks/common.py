"""Model-building helpers shared by the bench scripts: the same LoRA weights in every provider.

Every provider of a comparison wraps an identical frozen base (a deep copy) and gets identical
LoRA factors, with B random rather than zero: at B = 0 a kernel could legitimately skip the
LoRA branch (a zero group contributes nothing), which would flatter it against a trained model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "PHASES",
    "training_phase_cases",
    "lora_factors",
    "to_gslora",
    "to_peft",
    "lora_pairs",
    "clear_grads",
    "gslora_backend_name",
]


def lora_factors(in_features: int, out_features: int, r: int, *, device: torch.device,
                 dtype: torch.dtype, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """A [r, in] ~ kaiming-uniform bound, B [out, r] small random (non-zero, see module doc)."""
    bound = 1.0 / math.sqrt(in_features)
    a = (torch.rand(r, in_features, generator=generator) * 2 - 1) * bound
    b = torch.randn(out_features, r, generator=generator) * 0.02
    return a.to(device, dtype), b.to(device, dtype)


def to_gslora(model: nn.Module, targets: Sequence[str], r: int, lora_alpha: float,
              factors: dict[str, tuple[Tensor, Tensor]], backend: str | None = None,
              lora_dropout: float = 0.0) -> nn.Module:
    """A deep copy of ``model`` with the ``nn.Linear`` submodules named ``targets`` (dotted
    paths) replaced by ``GSLoRALinear`` holding ``factors[name] = (A, B)``; all else frozen."""
    from gslora import GSLoRALinear

    model = copy.deepcopy(model)
    model.requires_grad_(False)
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, leaf)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"target {name!r} is a {type(linear).__name__}, not nn.Linear")
        layer = GSLoRALinear.from_linear(linear, r=r, lora_alpha=lora_alpha,
                                         lora_dropout=lora_dropout, backend=backend)
        with torch.no_grad():
            layer.lora_A.copy_(factors[name][0])
            layer.lora_B.copy_(factors[name][1])
        setattr(parent, leaf, layer)
    return model


def to_peft(model: nn.Module, targets: Sequence[str], r: int, lora_alpha: float,
            factors: dict[str, tuple[Tensor, Tensor]], lora_dropout: float = 0.0) -> nn.Module:
    """A deep copy of ``model`` with PEFT LoRA (``get_peft_model``) on ``targets``, holding the
    same factors. Returns the user's model with the LoRA layers injected (not the PeftModel
    wrapper, whose generic ``forward`` only forwards the call)."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(model)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=list(targets), bias="none")
    peft_model = get_peft_model(model, config)
    inner = peft_model.base_model.model
    for name in targets:
        layer = inner.get_submodule(name)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(factors[name][0])
            layer.lora_B["default"].weight.copy_(factors[name][1])
    return inner


def lora_pairs(model: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """(module name, A, B) for every LoRA module of a gslora or PEFT model, in module order."""
    from gslora import GSLoRALinear

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, GSLoRALinear):
            out.append((name, mod.lora_A, mod.lora_B))
        elif hasattr(mod, "lora_A") and isinstance(mod.lora_A, nn.ModuleDict):
            if "default" in mod.lora_A:
                out.append((name, mod.lora_A["default"].weight, mod.lora_B["default"].weight))
    return out


def clear_grads(tensors: Iterable[Tensor]) -> None:
    """``.grad = None`` on each (so no provider pays for accumulating into an old gradient)."""
    for t in tensors:
        t.grad = None


def gslora_backend_name(device: torch.device, backend: str | None = None) -> str:
    """The gslora backend that serves ``device`` (what ``GSLoRALinear`` will run)."""
    from gslora.backends import select_backend

    return select_backend(device, backend).name


PHASES = ("fwd", "bwd", "fwd+bwd")


def training_phase_cases(
    modules: dict[str, nn.Module], x: Tensor, grad_out: Tensor
) -> dict[str, dict[str, object]]:
    """The three timed phases of a training call of each module on ``x`` (which requires grad,
    as the input of a layer in the middle of a network does):

    * ``fwd``: ``y = module(x)`` with autograd recording (what training pays for the forward);
    * ``bwd``: ``y.backward(grad_out)`` after an untimed forward;
    * ``fwd+bwd``: both in one timed call.

    Gradients are cleared (``None``) before every call. Returns ``{phase: {provider: Case}}``.
    """
    from .harness import Case

    if not x.requires_grad:
        raise ValueError("x must require grad (a layer inside a network also computes dx)")
    out: dict[str, dict[str, object]] = {p: {} for p in PHASES}
    for name, mod in modules.items():
        leaves = [x] + [p for p in mod.parameters() if p.requires_grad]

        def fresh(leaves=leaves) -> None:
            clear_grads(leaves)

        def forward_only(_, mod=mod):
            return mod(x)

        def setup_bwd(mod=mod, leaves=leaves):
            clear_grads(leaves)
            return mod(x)

        def backward_only(y):
            y.backward(grad_out)

        def both(_, mod=mod):
            mod(x).backward(grad_out)

        out["fwd"][name] = Case(fn=forward_only, setup=fresh)
        out["bwd"][name] = Case(fn=backward_only, setup=setup_bwd)
        out["fwd+bwd"][name] = Case(fn=both, setup=fresh)
    return out


class FailingProvider(nn.Module):
    """Stands in for a provider that could not be built: raises the build error when called."""

    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError(f"provider could not be built: {type(self.exc).__name__}: {self.exc}")
