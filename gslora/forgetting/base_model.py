"""The model a forgetting run starts from, as a config's ``model`` section names it.

``arch: vit`` is the library's own ViT (:class:`gslora.models.ViT`, the section's other keys
are its :class:`~gslora.models.ViTConfig`); ``arch: timm:NAME`` is any timm architecture, built
without downloaded weights (``pretrained=False``) with the section's ``num_classes``,
``img_size``, ``in_chans`` and ``drop_rate`` and any further keyword arguments in
``timm_kwargs`` (e.g. ``{patch_size: 4, depth: 6}``). ``checkpoint`` names a weights file for
that model (safetensors, a ``torch.save``'d state dict, or a :func:`gslora.models.save_vit`
directory); without one the model is pre-trained on the run's dataset and cached
(:func:`gslora.forgetting.pretrain.pretrained_model`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.vit import CheckpointError, ViT, ViTConfig, _atomic_write_bytes, load_vit, save_vit

__all__ = ["ARCH_KEYS", "TIMM", "ModelConfigError", "vit_config", "build_model", "load_weights",
           "save_model", "load_model"]

TIMM = "timm:"  # prefix of a timm architecture's name in ``arch``
#: The model section's keys that are not ViTConfig fields.
ARCH_KEYS = ("arch", "checkpoint", "timm_kwargs")


class ModelConfigError(ValueError):
    """A model section that names no model this library can build (one line)."""


def vit_config(model_cfg: dict[str, Any]) -> ViTConfig:
    """The ViTConfig of a model section (its ``arch`` keys left out)."""
    try:
        return ViTConfig.from_dict({k: v for k, v in model_cfg.items() if k not in ARCH_KEYS})
    except (TypeError, ValueError) as e:
        raise ModelConfigError(f"model: {e}") from None


def build_model(model_cfg: dict[str, Any]) -> nn.Module:
    """A freshly initialised model for a model section whose ``num_classes`` is set;
    ModelConfigError for an unknown architecture or arguments it does not take."""
    arch = model_cfg.get("arch", "vit")
    if arch == "vit":
        return ViT(vit_config(model_cfg))
    if not isinstance(arch, str) or not arch.startswith(TIMM):
        raise ModelConfigError(f"model.arch must be 'vit' or 'timm:NAME', got {arch!r}")
    if model_cfg.get("head", "linear") != "linear":
        raise ModelConfigError(f"model.head {model_cfg['head']!r} needs arch 'vit' (a timm model "
                               "keeps its own linear head)")
    import timm

    name = arch[len(TIMM):]
    kwargs = dict(model_cfg.get("timm_kwargs") or {})
    try:
        return timm.create_model(name, pretrained=False, num_classes=model_cfg["num_classes"],
                                 img_size=model_cfg["img_size"], in_chans=model_cfg["in_chans"],
                                 drop_rate=model_cfg["drop_rate"], **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise ModelConfigError(f"timm cannot build {name!r} with num_classes, img_size, in_chans, "
                               f"drop_rate and timm_kwargs {kwargs}: {' '.join(str(e).split())}"
                               ) from None


def _read_state(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    if path.is_dir():  # a save_vit / save_model directory
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(map_location))
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # SafetensorError, UnpicklingError, ...: one line naming the file
        raise CheckpointError(f"cannot read checkpoint {path}: {' '.join(str(e).split())}") from None
    # Training scripts often wrap the weights: {"state_dict": ...} or {"model": ...}.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike,
                 map_location: str | torch.device = "cpu") -> None:
    """Load a weights file into ``model`` (every key, the same shapes); CheckpointError (one
    line) if it cannot be read or does not fit."""
    state = _read_state(Path(path).expanduser(), map_location)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [s.strip() for s in str(e).strip().splitlines()[:3]]
        raise CheckpointError(f"checkpoint {path} does not fit the model: {' '.join(lines)}") from None


def save_model(model: nn.Module, directory: str | os.PathLike, model_cfg: dict[str, Any],
               extra: dict | None = None) -> Path:
    """``model.safetensors`` and ``config.json`` (the model section and ``extra``), written
    atomically; the library's ViT goes through :func:`~gslora.models.save_vit`."""
    if isinstance(model, ViT):
        return save_vit(model, directory, extra=extra)
    from safetensors.torch import save

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write_bytes(out / "model.safetensors", save(state))
    payload = {"format": "gslora-model", "version": 1, "model": model_cfg, "meta": extra or {}}
    _atomic_write_bytes(out / "config.json", json.dumps(payload, indent=2).encode())
    return out


def load_model(directory: str | os.PathLike, model_cfg: dict[str, Any],
               map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A :func:`save_model` directory → (model in eval mode, meta); CheckpointError if it is
    missing, corrupt or saved for another model section."""
    src = Path(directory)
    if model_cfg.get("arch", "vit") == "vit":
        return load_vit(src, map_location=map_location, expect=vit_config(model_cfg))
    try:
        payload = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"no readable model config in {src}: {' '.join(str(e).split())}") from None
    if payload.get("format") != "gslora-model" or payload.get("model") != model_cfg:
        raise CheckpointError(f"checkpoint {src} was saved for another model "
                              f"({payload.get('model')!r}, requested {model_cfg!r})")
    model = build_model(model_cfg)
    load_weights(model, src, map_location)
    return model.to(map_location).eval(), payload.get("meta", {})
