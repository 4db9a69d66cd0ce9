"""``GSLoRALinear``: a drop-in replacement for ``nn.Linear`` with a LoRA adapter."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .functional import lora_linear
from .reference import lora_scaling

__all__ = ["GSLoRALinear"]


class GSLoRALinear(nn.Module):
    """y = x Wᵀ + b + s·(dropout(x) Aᵀ) Bᵀ with W, b frozen and A [r, in], B [out, r] trained.

    Parameter names are those of ``nn.Linear`` (``weight``, ``bias``) plus ``lora_A`` and
    ``lora_B``, so a plain ``nn.Linear`` state dict loads into it (the adapter then keeps its
    initialisation). At init B = 0: the output equals the wrapped linear's.

    Args:
        in_features, out_features, bias: as for ``nn.Linear``.
        r: LoRA rank (>= 1). lora_alpha: s = lora_alpha / r (or / sqrt(r) with use_rslora).
        lora_dropout: dropout probability in [0, 1) on the LoRA branch's input.
        backend: force a kernel backend (see :mod:`gslora.backends`); None chooses by device.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        _base: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r (LoRA rank) must be an integer >= 1, got {r!r}")
        if not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha) or lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a finite number > 0, got {lora_alpha!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {lora_dropout!r}")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.lora_dropout = r, float(lora_alpha), float(lora_dropout)
        self.use_rslora, self.backend = use_rslora, backend
        self.scaling = lora_scaling(r, float(lora_alpha), use_rslora)
        self.merged = False
        factory = {"device": device, "dtype": dtype}
        if _base is None:
            _base = nn.Linear(in_features, out_features, bias=bias, **factory)
        # Shared, not copied: merging writes into the wrapped linear's own weight.
        self.weight = _base.weight
        self.bias = _base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 1.0, **kwargs) -> GSLoRALinear:
        """Wrap ``linear``, reusing its weight and bias tensors (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, r=r, lora_alpha=lora_alpha,
                   bias=linear.bias is not None, _base=linear, **kwargs)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A ~ kaiming_uniform(a=√5) (as nn.Linear and the authors), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> Tensor:
        """s · B A, [out, in], in float32 or better, then cast to the weight's dtype."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return (self.scaling * (self.lora_B.detach().to(acc) @ self.lora_A.detach().to(acc))).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + s·B·A; the forward then runs the plain linear. No-op if already merged."""
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − s·B·A (undo :meth:`merge`, exact up to float rounding)."""
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding W + s·B·A (this module is left unmerged)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight if self.merged else self.weight + self.delta_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout=self.lora_dropout, training=self.training, backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A plain nn.Linear checkpoint (no LoRA keys at all) loads strictly: the adapter keeps
        # its initialisation. A checkpoint with only one of the two LoRA keys is still an error.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        lora_keys = (prefix + "lora_A", prefix + "lora_B")
        if all(k not in state_dict for k in lora_keys):
            for k in lora_keys:
                if k in missing_keys:
                    missing_keys.remove(k)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, lora_alpha={self.lora_alpha:g}, "
                f"scaling={self.scaling:g}, lora_dropout={self.lora_dropout:g}, merged={self.merged}")
