"""A small Vision Transformer with timm's module names, for pre-training and forgetting.

Module names follow timm's ``VisionTransformer`` so that code written for it (model surgery
on ``blocks[i].mlp.fc1`` / ``fc2``, ``forward_features`` / ``forward_head``) runs unchanged on
either::

    patch_embed.proj, cls_token, pos_embed,
    blocks[i].norm1, blocks[i].attn.{qkv,proj}, blocks[i].norm2, blocks[i].mlp.{fc1,act,fc2},
    norm, head

The head is either a plain ``nn.Linear`` or a CosFace-style normalized head
(:class:`CosFaceHead`): logits = s · cos(θ) with cos(θ) between the L2-normalized embedding and
the L2-normalized class weights, so every logit lies in [−s, s]. The logit scale matters for
forgetting: the bounded forget loss ReLU(BND − CE) needs a BND on the scale of the logits (see
:func:`gslora.forgetting.losses.default_bnd`), and :attr:`ViT.logit_scale` exposes s.

Checkpoints (:func:`save_vit` / :func:`load_vit`) are a safetensors file plus a JSON config;
loading never unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ViTConfig",
    "ViT",
    "CosFaceHead",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "Block",
    "save_vit",
    "load_vit",
    "CheckpointError",
]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


@dataclass
class ViTConfig:
    """Architecture of :class:`ViT`.

    Defaults are the small model measured in DATA.md for 28×28 grayscale images
    (patch 4 → 49 tokens + cls, dim 64, depth 4, MLP 128: ~139 k parameters).
    ``head`` is ``"linear"`` or ``"cosface"``; ``head_scale`` (s) and ``head_margin`` (m)
    only apply to the CosFace head.
    """

    img_size: int = 28
    patch_size: int = 4
    in_chans: int = 1
    num_classes: int = 10
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 128
    head: str = "linear"
    head_scale: float = 16.0
    head_margin: float = 0.2
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        positive = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                    "num_heads", "mlp_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be an integer >= 1, got {value!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"ViTConfig.img_size ({self.img_size}) must be a multiple of "
                             f"patch_size ({self.patch_size})")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViTConfig.embed_dim ({self.embed_dim}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if self.head not in ("linear", "cosface"):
            raise ValueError(f"ViTConfig.head must be 'linear' or 'cosface', got {self.head!r}")
        if not (math.isfinite(self.head_scale) and self.head_scale > 0):
            raise ValueError(f"ViTConfig.head_scale must be > 0, got {self.head_scale!r}")
        if not (math.isfinite(self.head_margin) and self.head_margin >= 0):
            raise ValueError(f"ViTConfig.head_margin must be >= 0, got {self.head_margin!r}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"ViTConfig.drop_rate must lie in [0, 1), got {self.drop_rate!r}")

    @classmethod
    def from_dict(cls, data: dict) -> ViTConfig:
        """Build from a dict, rejecting unknown keys by name (a typo is an error)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig key(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


class PatchEmbed(nn.Module):
    """[B, C, H, W] → [B, N, D] with a strided convolution (one token per patch)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"x must have shape [B, C, {self.img_size}, {self.img_size}], "
                             f"got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with timm's names (``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """The FFN: fc1 → GELU → fc2 (the two linears GS-LoRA adapts)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CosFaceHead(nn.Module):
    """CosFace (large-margin cosine) head: logits = s · (cos θ − m·[class = label]).

    ``weight`` is [num_classes, dim]. Without labels (inference, forgetting) the margin is not
    applied and every logit lies in [−s, s]. With labels (``forward(x, labels)``, used when
    training the head) the target logit is reduced by s·m, as in CosFace.
    """

    def __init__(self, dim: int, num_classes: int, scale: float = 16.0, margin: float = 0.2) -> None:
        super().__init__()
        self.scale, self.margin = float(scale), float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=0.02)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        cos = F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))
        if labels is not None and self.margin > 0:
            cos = cos - self.margin * F.one_hot(labels, cos.shape[-1]).to(cos.dtype)
        return self.scale * cos

    def extra_repr(self) -> str:
        return (f"dim={self.weight.shape[1]}, num_classes={self.weight.shape[0]}, "
                f"scale={self.scale:g}, margin={self.margin:g}")


class ViT(nn.Module):
    """Vision Transformer classifier, [B, C, H, W] → logits [B, num_classes].

    * ``forward_features(x)`` → tokens [B, 1 + N, D] after the final norm (timm convention).
    * ``forward_head(tokens, pre_logits=False)`` → logits [B, C], or the class-token embedding
      [B, D] with ``pre_logits=True`` (the embedding GS-LoRA++ prototypes are built from).
    * ``embed(x)`` = ``forward_head(forward_features(x), pre_logits=True)``.
    * ``forward(x, labels=None)``: labels only matter for the CosFace margin in training.
    """

    def __init__(self, config: ViTConfig | None = None, **overrides) -> None:
        super().__init__()
        if config is None:
            config = ViTConfig(**overrides)
        elif overrides:
            config = ViTConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        c = config
        self.num_classes = c.num_classes
        self.embed_dim = c.embed_dim
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, c.embed_dim))
        self.pos_drop = nn.Dropout(c.drop_rate)
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_dim, c.drop_rate) for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.embed_dim)
        if c.head == "cosface":
            self.head: nn.Module = CosFaceHead(c.embed_dim, c.num_classes, c.head_scale, c.head_margin)
        else:
            self.head = nn.Linear(c.embed_dim, c.num_classes)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def logit_scale(self) -> float | None:
        """s for a CosFace head (logits within [−s, s]); None for an unbounded linear head."""
        return self.head.scale if isinstance(self.head, CosFaceHead) else None

    def forward_features(self, x: Tensor) -> Tensor:
        """[B, C, H, W] → normalized tokens [B, 1 + N, D] (class token first)."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False, labels: Tensor | None = None) -> Tensor:
        """Tokens [B, 1 + N, D] → logits [B, C] (or the class-token embedding [B, D])."""
        x = x[:, 0]
        if pre_logits:
            return x
        if isinstance(self.head, CosFaceHead):
            return self.head(x, labels)
        return self.head(x)

    def embed(self, x: Tensor) -> Tensor:
        """[B, C, H, W] → embedding [B, D] (input of the head)."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.forward_head(self.forward_features(x), labels=labels)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    # Write beside the target and rename: a crash never leaves a half-written file in place.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_vit(model: ViT, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (config + ``extra`` metadata) atomically.

    Returns the directory. ``extra`` (JSON-serializable) lands under ``"meta"`` in config.json,
    e.g. the test accuracy measured after pre-training.
    """
    from safetensors.torch import save

    if not isinstance(model, ViT):
        raise TypeError(f"model must be a gslora ViT, got {type(model).__name__}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Weights first, config last: a directory whose config.json exists is complete.
    _atomic_write_bytes(out / "model.safetensors", save(state))
    payload = {"format": "gslora-vit", "version": 1, "config": model.config.to_dict(),
               "meta": extra or {}}
    _atomic_write_bytes(out / "config.json", json.dumps(payload, indent=2).encode())
    return out


def load_vit(directory: str | os.PathLike, map_location: str | torch.device = "cpu",
             expect: ViTConfig | None = None) -> tuple[ViT, dict]:
    """Load a :func:`save_vit` checkpoint → (model in eval mode, meta dict).

    Raises :class:`CheckpointError` (one line) if files are missing or corrupt, if the weights
    do not match the config, or if ``expect`` is given and the stored config differs from it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    src = Path(directory)
    cfg_path, weights_path = src / "config.json", src / "model.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"no ViT checkpoint in {src} (needs config.json and model.safetensors)")
    try:
        payload = json.loads(cfg_path.read_text())
        if payload.get("format") != "gslora-vit":
            raise CheckpointError(f"{cfg_path} is not a gslora ViT config")
        config = ViTConfig.from_dict(payload["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"corrupt checkpoint config {cfg_path}: {e}") from None
    if expect is not None and expect != config:
        diff = {k: (v, getattr(config, k)) for k, v in expect.to_dict().items()
                if getattr(config, k) != v}
        raise CheckpointError(f"checkpoint {src} does not match the requested model "
                              f"(expected vs stored: {diff})")
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"corrupt weights {weights_path}: {e}") from None
    model = ViT(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"weights {weights_path} do not match the config: "
                              f"{' '.join(s.strip() for s in first[:3])}") from None
    return model.to(map_location).eval(), payload.get("meta", {})
