"""Models of the library's own: a small timm-compatible ViT (:mod:`gslora.models.vit`)."""

from .vit import (
    Attention,
    Block,
    CheckpointError,
    CosFaceHead,
    Mlp,
    PatchEmbed,
    ViT,
    ViTConfig,
    load_vit,
    save_vit,
)

__all__ = [
    "Attention",
    "Block",
    "CheckpointError",
    "CosFaceHead",
    "Mlp",
    "PatchEmbed",
    "ViT",
    "ViTConfig",
    "load_vit",
    "save_vit",
]
