"""Adapter files: save/load only the LoRA tensors (and the kept-trainable ones) with their config.

Two formats, both safetensors (loading never unpickles anything):

* **gslora** (:func:`save_adapter` / :func:`load_adapter`): one ``.safetensors`` file with
  tensors ``<module>.lora_A`` [r, in] and ``<module>.lora_B`` [out, r] for every
  :class:`~gslora.layers.GSLoRALinear`, plus the parameters kept trainable by
  ``add_gslora(trainable=...)`` under their own names; the header metadata ``"gslora"`` holds
  the JSON config (format version, r, lora_alpha, dropout, rsLoRA, target module names,
  group_by and the groups, per-module ranks and sizes).
* **PEFT** (:func:`export_peft` / :func:`import_peft`): a directory with
  ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight`` [r, in],
  ``.lora_B.weight`` [out, r], kept-trainable modules as ``modules_to_save``) and
  ``adapter_config.json`` (``peft_type: "LORA"``), which ``peft.PeftModel.from_pretrained``
  loads onto the same base model. PEFT's scaling lora_alpha / r (or / √r with rsLoRA) is ours.

Loading checks that the adapter fits the model — module names, shapes, rank, scaling — before
anything is copied, and raises :class:`AdapterError` naming every mismatch. Loading into a
model that has no GS-LoRA layers yet first applies :func:`~gslora.surgery.add_gslora` with the
file's configuration (same target modules, rank, alpha, grouping).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ._dtensor import copy_whole_, whole
from .layers import GSLoRALinear
from .surgery import CONFIG_ATTR, add_gslora, gslora_modules, lora_groups

__all__ = [
    "AdapterError",
    "ADAPTER_FILE",
    "PEFT_WEIGHTS_FILE",
    "PEFT_CONFIG_FILE",
    "adapter_state_dict",
    "save_adapter",
    "read_adapter",
    "load_adapter",
    "export_peft",
    "import_peft",
]

ADAPTER_FORMAT = "gslora-adapter"
ADAPTER_VERSION = 1
#: File name used by :func:`save_adapter` when given a directory.
ADAPTER_FILE = "gslora_adapter.safetensors"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter file is malformed, or does not fit the model it is loaded into."""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside (Distributed)DataParallel and torch.compile wrappers.

    Their parameter names carry a ``module.`` / ``_orig_mod.`` prefix; adapters are always
    written and read with the names of the bare model, so files move between the wrappers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _require_gslora(model: nn.Module, what: str) -> list[tuple[str, GSLoRALinear]]:
    mods = gslora_modules(model)
    if not mods:
        raise AdapterError(f"{what}: the model holds no GSLoRALinear layer (call add_gslora first)")
    return mods


def _extra_trainable(model: nn.Module) -> list[str]:
    config = getattr(model, CONFIG_ATTR, None) or {}
    return list(config.get("extra_trainable", []))


def _group_names(model: nn.Module) -> dict[str, list[str]]:
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return {g: [names[id(p)] for p in ps] for g, ps in lora_groups(model).items()}


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    # Written beside the target, then renamed: a crash never leaves a half-written adapter.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{path} is not a readable safetensors file: {e}") from e
    return tensors, metadata


def _same_scaling(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def _check_and_copy(
    model: nn.Module,
    lora: dict[str, tuple[Tensor, Tensor]],
    extras: dict[str, Tensor],
    lora_alpha: float,
    use_rslora: bool,
    strict: bool,
    source: str,
) -> dict[str, list[str]]:
    """Validate everything, then copy: an error leaves the model untouched."""
    modules = dict(model.named_modules())
    layers = {n: m for n, m in modules.items() if isinstance(m, GSLoRALinear)}
    problems: list[str] = []
    unexpected: list[str] = []
    for name, (a, b) in lora.items():
        m = layers.get(name)
        if m is None:
            if name in modules:
                problems.append(f"{name}: is a {type(modules[name]).__name__} in the model, not a GSLoRALinear")
            else:
                unexpected.append(name)
            continue
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{name}: malformed adapter, lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                            "must be [r, in] and [out, r]")
            continue
        if a.shape[0] != m.r:
            problems.append(f"{name}: rank r={a.shape[0]} in the adapter, r={m.r} in the model")
        if a.shape[1] != m.in_features or b.shape[0] != m.out_features:
            problems.append(f"{name}: adapter is for a [{a.shape[1]}→{b.shape[0]}] layer, the model's is "
                            f"[{m.in_features}→{m.out_features}]")
        if not _same_scaling(m.lora_alpha, lora_alpha) or bool(m.use_rslora) != bool(use_rslora):
            problems.append(f"{name}: adapter has lora_alpha={lora_alpha:g}, use_rslora={use_rslora}; the model's "
                            f"layer has lora_alpha={m.lora_alpha:g}, use_rslora={m.use_rslora} (different scaling)")
        if m.merged:
            problems.append(f"{name}: the layer is merged (its adapter is inside the weight); unmerge() it first")
        if not a.is_floating_point() or not b.is_floating_point():
            problems.append(f"{name}: adapter tensors must be floating point, got {a.dtype} / {b.dtype}")
    missing = [n for n in layers if n not in lora]
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    missing_extra = [n for n in _extra_trainable(model) if n not in extras]
    for pname, t in extras.items():
        p = targets.get(pname)
        if p is None:
            unexpected.append(pname)
        elif p.shape != t.shape:
            problems.append(f"{pname}: shape {tuple(t.shape)} in the adapter, {tuple(p.shape)} in the model")
    if strict:
        if missing:
            problems.append(f"GS-LoRA layers of the model missing from the adapter: {_preview(missing)}")
        if missing_extra:
            problems.append(f"kept-trainable parameters of the model missing from the adapter: "
                            f"{_preview(missing_extra)}")
        if unexpected:
            problems.append(f"adapter entries with no GS-LoRA layer / parameter in the model: {_preview(unexpected)}")
    if problems:
        raise AdapterError(f"adapter {source} does not fit the model:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for name, (a, b) in lora.items():
            if name in layers:
                copy_whole_(layers[name].lora_A, a)
                copy_whole_(layers[name].lora_B, b)
        for pname, t in extras.items():
            if pname in targets:
                copy_whole_(targets[pname], t)
    loaded = [n for n in lora if n in layers] + [n for n in extras if n in targets]
    return {"loaded": loaded, "missing": missing + missing_extra, "unexpected": unexpected}


def _preview(names: list[str], limit: int = 8) -> str:
    head = ", ".join(names[:limit])
    return head + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def _ensure_gslora(
    model: nn.Module,
    lora: dict[str, tuple[Tensor, Tensor]],
    extras: dict[str, Tensor],
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    use_rslora: bool,
    group_by: Any,
    source: str,
) -> bool:
    """Apply add_gslora from the adapter's own config if the model has no GS-LoRA layers yet."""
    if gslora_modules(model):
        return False
    names = set(lora)
    ranks = {a.shape[0] for a, _ in lora.values()}
    if ranks != {r}:
        raise AdapterError(f"adapter {source}: config says r={r} but its lora_A tensors have ranks {sorted(ranks)}")
    extra_names = set(extras)
    add_gslora(model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
               target=lambda n, _m: n in names, group_by=group_by,
               trainable=lambda n: n in extra_names)
    return True


# --------------------------------------------------------------------------------------------
# gslora format
# --------------------------------------------------------------------------------------------

def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``{<module>.lora_A: [r, in], <module>.lora_B: [out, r], <kept trainable param>: ...}``.

    Detached references to the model's own tensors (no copy); DTensors (FSDP2) gathered whole,
    a collective: every rank calls it.
    """
    model = _unwrap(model)
    mods = _require_gslora(model, "adapter_state_dict")
    out: dict[str, Tensor] = {}
    for name, m in mods:
        out[f"{name}.lora_A"] = whole(m.lora_A)
        out[f"{name}.lora_B"] = whole(m.lora_B)
    params = dict(model.named_parameters())
    for pname in _extra_trainable(model):
        if pname in params:
            out[pname] = whole(params[pname])
    return out


def _adapter_config(model: nn.Module, mods: list[tuple[str, GSLoRALinear]]) -> dict[str, Any]:
    from . import __version__

    stored = getattr(model, CONFIG_ATTR, None) or {}
    first = mods[0][1]
    for name, m in mods:
        if not _same_scaling(m.lora_alpha, first.lora_alpha) or m.use_rslora != first.use_rslora:
            raise AdapterError(f"save_adapter: {name} has lora_alpha={m.lora_alpha:g}, use_rslora={m.use_rslora} "
                               f"but {mods[0][0]} has {first.lora_alpha:g}, {first.use_rslora}: one scaling rule "
                               "per adapter is supported")
    return {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "gslora_version": __version__,
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": first.lora_dropout,
        "use_rslora": bool(first.use_rslora),
        "target_modules": [n for n, _ in mods],
        "group_by": stored.get("group_by", "block"),
        "groups": _group_names(model),
        "extra_trainable": _extra_trainable(model),
        "modules": {n: {"r": m.r, "in_features": m.in_features, "out_features": m.out_features}
                    for n, m in mods},
    }


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's adapter (LoRA tensors, kept-trainable tensors, config) to ``path``.

    ``path`` is a ``.safetensors`` file, or an existing directory (the file is then
    ``<dir>/gslora_adapter.safetensors``). Tensors keep their dtype. Returns the file path.
    DTensor parameters (FSDP2) are gathered whole: every rank calls it and writes the same file
    (atomically).
    """
    model = _unwrap(model)
    mods = _require_gslora(model, "save_adapter")
    config = _adapter_config(model, mods)
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    _atomic_save(tensors, path, {"format": "pt", "gslora": json.dumps(config)})
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a gslora adapter file: ``(tensors on CPU, config)``; never unpickles."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    tensors, metadata = _read_safetensors(path)
    if "gslora" not in metadata:
        hint = (" It looks like a PEFT adapter: use import_peft(model, directory)."
                if any(k.startswith(_PEFT_PREFIX) for k in tensors) else "")
        raise AdapterError(f"{path} is not a gslora adapter (no 'gslora' config in its metadata).{hint}")
    try:
        config = json.loads(metadata["gslora"])
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: the 'gslora' metadata is not valid JSON: {e}") from e
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{path}: metadata 'gslora' is not a {ADAPTER_FORMAT!r} config")
    if not isinstance(config.get("version"), int) or config["version"] > ADAPTER_VERSION:
        raise AdapterError(f"{path}: adapter format version {config.get('version')!r} is newer than this "
                           f"gslora reads ({ADAPTER_VERSION}); upgrade gslora")
    for key in ("r", "lora_alpha", "use_rslora", "target_modules"):
        if key not in config:
            raise AdapterError(f"{path}: adapter config lacks {key!r}")
    return tensors, config


def _split_gslora(tensors: dict[str, Tensor], config: dict[str, Any], source: str
                  ) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
    lora: dict[str, tuple[Tensor, Tensor]] = {}
    for name in config["target_modules"]:
        a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if a is None or b is None:
            raise AdapterError(f"adapter {source} is incomplete: {name}.lora_A / .lora_B missing")
        lora[name] = (a, b)
    lora_keys = {f"{n}.{s}" for n in lora for s in ("lora_A", "lora_B")}
    extras = {k: v for k, v in tensors.items() if k not in lora_keys}
    stray = [k for k in extras if k.endswith((".lora_A", ".lora_B"))]
    if stray:
        raise AdapterError(f"adapter {source} holds LoRA tensors not listed in its config: {_preview(stray)}")
    return lora, extras


def load_adapter(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> dict[str, list[str]]:
    """Load an adapter written by :func:`save_adapter` into ``model``.

    If the model has no GS-LoRA layers, :func:`~gslora.surgery.add_gslora` is applied first with
    the file's configuration. Everything is checked before anything is copied: module names
    (with ``strict``, the adapter and the model must have exactly the same GS-LoRA layers and
    kept-trainable tensors), shapes, rank and scaling; on a mismatch :class:`AdapterError`
    lists every problem and the model is unchanged. The copy is exact (bit for bit when the
    dtypes match). Returns ``{"loaded", "missing", "unexpected"}`` names. Into DTensor
    parameters (FSDP2) each rank copies its own shard of the file's tensors.
    """
    model = _unwrap(model)
    tensors, config = read_adapter(path)
    source = str(path)
    lora, extras = _split_gslora(tensors, config, source)
    group_by: Any = config.get("group_by", "block")
    if group_by not in ("block", "module", "tensor"):
        # A custom grouping cannot be stored as code: rebuild it from the stored group lists.
        owner = {p.rsplit(".", 1)[0]: g for g, ps in config.get("groups", {}).items() for p in ps}
        group_by = lambda n, _m: owner.get(n, n)  # noqa: E731
    _ensure_gslora(model, lora, extras, int(config["r"]), float(config["lora_alpha"]),
                   float(config.get("lora_dropout", 0.0)), bool(config["use_rslora"]), group_by, source)
    return _check_and_copy(model, lora, extras, float(config["lora_alpha"]), bool(config["use_rslora"]),
                           strict, source)


# --------------------------------------------------------------------------------------------
# PEFT format
# --------------------------------------------------------------------------------------------

def _peft_target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    # PEFT matches a list entry t against a module key k by k == t or k.endswith("." + t). Full
    # names are exact unless some other module's name ends with one; then an anchored regex
    # (PEFT's string form, re.fullmatch) says exactly what we mean.
    chosen = set(names)
    others = [k for k, _ in model.named_modules() if k and k not in chosen]
    if any(k.endswith("." + t) for k in others for t in names):
        return "(" + "|".join(re.escape(t) for t in names) + ")"
    return list(names)


def _peft_modules_to_save(model: nn.Module, extra: list[str]) -> list[str]:
    owners: list[str] = []
    for pname in extra:
        owner = pname.rpartition(".")[0]
        if not owner:
            raise AdapterError(f"export_peft: trainable parameter {pname!r} belongs to the model's root module, "
                               "which PEFT's modules_to_save cannot express; pass include_trainable=False")
        if owner not in owners:
            owners.append(owner)
    keys = [k for k, _ in model.named_modules()]
    for owner in owners:
        # PEFT matches modules_to_save with a bare str.endswith: it must select only `owner`.
        clash = [k for k in keys if k.endswith(owner) and k != owner]
        if clash:
            raise AdapterError(f"export_peft: PEFT would also treat {_preview(clash)} as modules_to_save "
                               f"{owner!r} (it matches by name suffix); pass include_trainable=False")
    return owners


def export_peft(model: nn.Module, directory: str | os.PathLike, include_trainable: bool = True) -> Path:
    """Write the adapter in PEFT's LoRA format to ``directory`` and return it.

    ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight`` [r, in] and
    ``.lora_B.weight`` [out, r]; with ``include_trainable`` the modules owning the kept-trainable
    parameters (e.g. the head) go into ``modules_to_save`` with their whole state. Load it with
    ``PeftModel.from_pretrained(base_model, directory)``. All layers must share r, lora_alpha,
    dropout and rsLoRA, and none may be merged (PEFT would add the adapter a second time).
    """
    model = _unwrap(model)
    mods = _require_gslora(model, "export_peft")
    first_name, first = mods[0]
    for name, m in mods:
        if m.merged:
            raise AdapterError(f"export_peft: {name} is merged (its adapter is inside the weight); unmerge() "
                               "it or export before merging")
        same = (m.r == first.r and _same_scaling(m.lora_alpha, first.lora_alpha)
                and m.lora_dropout == first.lora_dropout and m.use_rslora == first.use_rslora)
        if not same:
            raise AdapterError(f"export_peft: {name} (r={m.r}, lora_alpha={m.lora_alpha:g}, dropout="
                               f"{m.lora_dropout:g}, rslora={m.use_rslora}) differs from {first_name}; "
                               "this exporter writes one LoRA config for all layers")
    names = [n for n, _ in mods]
    extra = _extra_trainable(model) if include_trainable else []
    modules_to_save = _peft_modules_to_save(model, extra) if extra else []
    tensors: dict[str, Tensor] = {}
    for name, m in mods:
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = whole(m.lora_A).to("cpu").contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = whole(m.lora_B).to("cpu").contiguous()
    for owner in modules_to_save:
        for k, v in model.get_submodule(owner).state_dict().items():
            tensors[f"{_PEFT_PREFIX}{owner}.{k}"] = whole(v).to("cpu").contiguous()
    lora_alpha = int(first.lora_alpha) if float(first.lora_alpha).is_integer() else first.lora_alpha
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": first.r,
        "lora_alpha": lora_alpha,
        "lora_dropout": first.lora_dropout,
        "use_rslora": bool(first.use_rslora),
        "target_modules": _peft_target_modules(model, names),
        "exclude_modules": None,
        "modules_to_save": modules_to_save or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    directory = Path(directory)
    _atomic_save(tensors, directory / PEFT_WEIGHTS_FILE, {"format": "pt"})
    _atomic_write_text(directory / PEFT_CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def _read_peft_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / PEFT_CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"PEFT adapter config not found: {cfg_path}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_path} must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not supported, only 'LORA'")
    unsupported = {
        "use_dora": (False, None), "fan_in_fan_out": (False, None), "lora_bias": (False, None),
        "bias": ("none", None), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
        "layer_replication": (None,), "use_qalora": (False, None),
    }
    for key, ok in unsupported.items():
        if key in config and config[key] not in ok:
            raise AdapterError(f"{cfg_path}: {key}={config[key]!r} is not supported by GS-LoRA "
                               f"(expected {ok[0]!r})")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise AdapterError(f"{cfg_path}: {key} must be a number, got {config.get(key)!r}")
    return config


def import_peft(model: nn.Module, directory: str | os.PathLike, group_by: Any = "block",
                strict: bool = True) -> dict[str, list[str]]:
    """Load a PEFT LoRA adapter directory (safetensors only) into ``model``.

    If the model has no GS-LoRA layers, :func:`~gslora.surgery.add_gslora` is applied to the
    adapter's layers first (with ``group_by``; its ``modules_to_save`` parameters are kept
    trainable). Then the same checks and exact copy as :func:`load_adapter`. Only plain LoRA on
    linear layers is accepted (no DoRA, LoRA bias, per-layer ranks, embeddings or convolutions).
    """
    model = _unwrap(model)
    directory = Path(directory)
    config = _read_peft_config(directory)
    weights = directory / PEFT_WEIGHTS_FILE
    if not weights.is_file() and (directory / "adapter_model.bin").is_file():
        raise AdapterError(f"{directory} holds adapter_model.bin (a pickle); gslora only reads safetensors. "
                           "Re-save it with save_pretrained(..., safe_serialization=True)")
    tensors, _ = _read_safetensors(weights)
    lora_parts: dict[str, dict[str, Tensor]] = {}
    extras: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(_PEFT_PREFIX):
            raise AdapterError(f"{weights}: key {key!r} does not start with {_PEFT_PREFIX!r}")
        k = key[len(_PEFT_PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", k)
        if m:
            lora_parts.setdefault(m.group(1), {})[m.group(2)] = t
        elif re.search(r"(^|\.)(lora_\w+|magnitude\w*)(\.|$)", k):
            raise AdapterError(f"{weights}: {k!r} is not a plain LoRA weight on a linear layer; not supported")
        else:
            extras[k] = t
    if not lora_parts:
        raise AdapterError(f"{weights} holds no lora_A / lora_B weights")
    incomplete = [n for n, parts in lora_parts.items() if set(parts) != {"lora_A", "lora_B"}]
    if incomplete:
        raise AdapterError(f"{weights}: lora_A / lora_B pairs incomplete for {_preview(incomplete)}")
    lora = {n: (parts["lora_A"], parts["lora_B"]) for n, parts in lora_parts.items()}
    r, lora_alpha = int(config["r"]), float(config["lora_alpha"])
    use_rslora = bool(config.get("use_rslora", False))
    source = str(directory)
    _ensure_gslora(model, lora, extras, r, lora_alpha, float(config.get("lora_dropout", 0.0) or 0.0),
                   use_rslora, group_by, source)
    return _check_and_copy(model, lora, extras, lora_alpha, use_rslora, strict, source)
