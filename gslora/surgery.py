"""Model surgery: put GS-LoRA into a pre-trained Transformer, group it, count it, merge it, take it out.

The paper's recipe (METHOD.md) is LoRA on both FFN linears (fc1, fc2) of every Transformer block,
one sparsity group per block, everything else frozen. :func:`add_gslora` does that in place on

* timm ``VisionTransformer`` / DeiT / ViT variants (``blocks.{i}.mlp.fc1`` / ``fc2``),
* torchvision ``vit_b_16`` and family (``encoder.layers.encoder_layer_{i}.mlp.0`` / ``mlp.3``),
* Transformers-style ViT / BERT layouts (``encoder.layer.{i}.intermediate.dense`` /
  ``encoder.layer.{i}.output.dense``),
* the library's own :class:`gslora.models.ViT` (timm names),
* ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` and DETR-style layers (``linear1`` / ``linear2``,
  or ``fc1`` / ``fc2`` directly on the layer as in Transformers' older DETR/BART layers),
* vit-pytorch-style ``FeedForward`` modules (the authors' face model),

and on any other model through an explicit selection (name patterns or a predicate, like PEFT's
``target_modules``) with an explicit grouping (``group_by`` = "block" | "module" | "tensor" | a
callable).

How blocks are found (no per-library tables needed): a *block* is a child of an ``nn.ModuleList``,
``nn.Sequential`` or ``nn.ModuleDict`` whose siblings are structurally the same (same class, same parameter names,
LoRA tensors ignored) and which contains at least one ``nn.Linear``. A layer's block is its
nearest such ancestor. This finds ``blocks.{i}`` (timm, ours), ``encoder.layers.encoder_layer_{i}``
(torchvision), ``encoder.layer.{i}`` (Transformers), ``layers.{i}`` (``nn.TransformerEncoder``),
``transformer.layers.{i}`` (vit-pytorch) and ``layers.{s}.blocks.{j}`` (Swin stages).

How FFN linears are found (``target="ffn"``): an ``nn.Linear`` inside a block, not inside an
attention module, and either under a module named ``mlp`` / ``ffn`` / ``feed_forward`` / … or of a
class named ``*Mlp*`` / ``*FeedForward*`` / ``*FFN*``; or ``intermediate.dense`` and the block's own
``output.dense`` (Transformers); or ``linear1`` / ``linear2`` (``fc1`` / ``fc2``) of a layer that
has both (PyTorch, DETR and BART-style Transformer layers).

The configuration is stored on the model as ``model.gslora_config`` (a JSON-serializable dict)
for :func:`lora_groups`, :func:`merge_gslora` and the adapter files of :mod:`gslora.adapters`.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .layers import GSLoRALinear
from .reference import lora_scaling

__all__ = [
    "SurgeryError",
    "TargetSpec",
    "GroupBy",
    "CONFIG_ATTR",
    "add_gslora",
    "lora_groups",
    "gslora_modules",
    "find_blocks",
    "find_ffn_linears",
    "merge_gslora",
    "unload_gslora",
    "count_trainable",
    "gslora_summary",
    "match_name",
]

logger = logging.getLogger("gslora")

#: Attribute under which :func:`add_gslora` stores its configuration on the model.
CONFIG_ATTR = "gslora_config"
# Names of the parameters that were trainable before add_gslora froze them (restored by unload).
_FROZEN_ATTR = "_gslora_frozen"
CONFIG_VERSION = 1

#: "ffn", one name pattern, a sequence of name patterns, or predicate(name, linear) -> bool.
TargetSpec = str | Sequence[str] | Callable[[str, nn.Module], bool]
#: "block" | "module" | "tensor" | callable(module_name, GSLoRALinear) -> group name.
GroupBy = str | Callable[[str, GSLoRALinear], str]

_FFN_NAMES = frozenset({"mlp", "ffn", "ff", "feed_forward", "feedforward", "mlp_block", "ffn_block",
                        "fc_block", "mlpblock"})
_FFN_CLASS = re.compile(r"mlp|feedforward|feed_forward|ffn", re.IGNORECASE)
_ATTN_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
_LORA_PARAM_NAMES = ("lora_A", "lora_B")


class SurgeryError(ValueError):
    """The model, the selection or the grouping does not allow the requested surgery."""


# --------------------------------------------------------------------------------------------
# Name matching
# --------------------------------------------------------------------------------------------

def match_name(pattern: str, name: str) -> bool:
    """Whether module/parameter ``name`` is selected by ``pattern``.

    * ``"re:<regex>"``: the regex must match the whole name (PEFT's string semantics);
    * a pattern with ``*``, ``?`` or ``[``: a glob over the whole name (``"blocks.*.mlp.fc?"``);
    * otherwise the name itself or a dotted suffix of it (PEFT's list semantics):
      ``"fc1"`` selects ``"blocks.0.mlp.fc1"``, ``"mlp.fc1"`` too, ``"c1"`` does not.
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def _as_patterns(value: str | Sequence[str], argname: str) -> list[str]:
    patterns = [value] if isinstance(value, str) else list(value)
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise TypeError(f"{argname} must hold non-empty name patterns (str), got {p!r}")
    return patterns


def _preview(names: Iterable[str], limit: int = 12) -> str:
    names = list(names)
    head = ", ".join(names[:limit])
    return head + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------------------------
# Blocks and FFN layers
# --------------------------------------------------------------------------------------------

def _structure_key(module: nn.Module) -> tuple:
    # Class plus parameter names, LoRA tensors ignored, so that wrapping some layers of some
    # blocks (explicit targets) does not make otherwise identical blocks look different.
    names = tuple(n for n, _ in module.named_parameters() if n.rsplit(".", 1)[-1] not in _LORA_PARAM_NAMES)
    return (type(module).__qualname__, names)


def _has_inner_linear(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, GSLoRALinear)) for m in module.modules() if m is not module)


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the repeated Transformer blocks of ``model``, in module order.

    A block is an element of an ``nn.ModuleList`` / ``nn.Sequential`` / ``nn.ModuleDict`` that contains a linear
    layer and whose structure (class and parameter names) is shared by all its siblings or by
    at least one other sibling. Nested lists (Swin's stages of blocks) give the inner blocks.
    """
    blocks: list[str] = []
    for cname, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            continue
        kids = list(container.named_children())
        if not kids:
            continue
        keys = [_structure_key(k) for _, k in kids]
        counts = Counter(keys)
        uniform = len(counts) == 1
        for (kname, kid), key in zip(kids, keys, strict=True):
            if (uniform or counts[key] >= 2) and _has_inner_linear(kid):
                blocks.append(f"{cname}.{kname}" if cname else kname)
    return blocks


def _block_of(name: str, blocks: set[str]) -> str | None:
    # Nearest strict ancestor of `name` that is a block.
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in blocks:
            return prefix
    return None


def _attention_owned(model: nn.Module) -> set[str]:
    # Linears owned by nn.MultiheadAttention are read as raw weights by F.multi_head_attention_forward,
    # never called: wrapping them would silently do nothing. They are never targets.
    owned = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            owned.update(f"{name}.{n}" if name else n for n, _ in m.named_modules() if n)
    return owned


def _is_ffn(mods: dict[str, nn.Module], name: str, block: str) -> bool:
    rel = name[len(block) + 1:].split(".")
    # Modules strictly between the block and the linear.
    between = [(rel[i], mods[block + "." + ".".join(rel[: i + 1])]) for i in range(len(rel) - 1)]
    for attr, m in between:
        if _ATTN_CLASS.search(attr) or _ATTN_CLASS.search(type(m).__name__):
            return False
    for attr, m in between:
        if attr.lower() in _FFN_NAMES or _FFN_CLASS.search(type(m).__name__):
            return True
    leaf = rel[-1]
    parent = mods[name.rsplit(".", 1)[0]]
    # Transformers (ViT, BERT, …): block.intermediate.dense and block.output.dense, where the
    # block also has `intermediate` (attention.output.dense is excluded above).
    if len(rel) == 2 and leaf == "dense":
        if rel[0] == "intermediate":
            return True
        if rel[0] == "output" and hasattr(mods[block], "intermediate"):
            return True
    # nn.TransformerEncoderLayer / DecoderLayer and DETR's layers: linear1 → act → linear2; the
    # BART-style layers of Transformers < 5 (DETR, Whisper, …): fc1 → act → fc2 on the layer.
    for pair in (("linear1", "linear2"), ("fc1", "fc2")):
        if leaf in pair and all(isinstance(getattr(parent, a, None), (nn.Linear, GSLoRALinear)) for a in pair):
            return True
    return False


def find_ffn_linears(model: nn.Module) -> list[str]:
    """Names of the FFN ``nn.Linear`` layers inside the Transformer blocks of ``model``."""
    blocks = set(find_blocks(model))
    skip = _attention_owned(model)
    mods = dict(model.named_modules())
    found = []
    for name, m in mods.items():
        if type(m) is not nn.Linear or name in skip:
            continue
        block = _block_of(name, blocks)
        if block is not None and _is_ffn(mods, name, block):
            found.append(name)
    return found


def _select_targets(model: nn.Module, target: TargetSpec) -> list[str]:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    skip = _attention_owned(model)
    if isinstance(target, str) and target == "ffn":
        names = find_ffn_linears(model)
        if not names:
            raise SurgeryError(
                "target='ffn' found no FFN linear layers inside repeated Transformer blocks; "
                "select them explicitly, e.g. target=['mlp.fc1', 'mlp.fc2'] or a predicate. "
                f"Linear layers in this model: {_preview(linears) or 'none'}")
        return names
    if callable(target):
        names = [n for n in linears if target(n, model.get_submodule(n))]
        what = "the target predicate"
    elif isinstance(target, (str, Sequence)):
        patterns = _as_patterns(target, "target")
        unmatched = [p for p in patterns if not any(match_name(p, n) for n in linears)]
        if unmatched:
            raise SurgeryError(
                f"target pattern(s) {unmatched} match no nn.Linear layer; "
                f"linear layers in this model: {_preview(linears) or 'none'}")
        names = [n for n in linears if any(match_name(p, n) for p in patterns)]
        what = f"target patterns {patterns}"
    else:
        raise TypeError(f"target must be 'ffn', a name pattern, a list of patterns or a predicate, "
                        f"got {type(target).__name__}")
    if not names:
        raise SurgeryError(f"{what} selected no nn.Linear layer; "
                           f"linear layers in this model: {_preview(linears) or 'none'}")
    bad = [n for n in names if n in skip]
    if bad:
        raise SurgeryError(
            f"cannot wrap {bad}: they belong to nn.MultiheadAttention, which reads their weights "
            "directly instead of calling them, so a LoRA branch there would never run")
    return names


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------

def gslora_modules(model: nn.Module) -> list[tuple[str, GSLoRALinear]]:
    """All ``(name, GSLoRALinear)`` pairs of ``model`` in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GSLoRALinear)]


def _check_group_by(group_by: GroupBy | None) -> None:
    if group_by is None or callable(group_by):
        return
    if group_by not in ("block", "module", "tensor"):
        raise ValueError(f"group_by must be 'block', 'module', 'tensor' or a callable "
                         f"(module_name, module) -> group name, got {group_by!r}")


def _module_groups(model: nn.Module, names: list[str], group_by: GroupBy) -> dict[str, list[str]]:
    """Group name -> LoRA parameter names (``<module>.lora_A`` / ``.lora_B``), in module order."""
    groups: dict[str, list[str]] = {}
    if group_by == "block":
        blocks = set(find_blocks(model))
        orphans = [n for n in names if _block_of(n, blocks) is None]
        if orphans:
            raise SurgeryError(
                f"group_by='block': {_preview(orphans)} lie in no repeated Transformer block "
                f"(blocks found: {_preview(sorted(blocks)) or 'none'}); use group_by='module', "
                "'tensor' or a callable (module_name, module) -> group name")
        for n in names:
            groups.setdefault(_block_of(n, blocks), []).extend(f"{n}.{p}" for p in _LORA_PARAM_NAMES)
    elif group_by == "module":
        for n in names:
            groups[n] = [f"{n}.{p}" for p in _LORA_PARAM_NAMES]
    elif group_by == "tensor":
        for n in names:
            for p in _LORA_PARAM_NAMES:
                groups[f"{n}.{p}"] = [f"{n}.{p}"]
    elif callable(group_by):
        for n in names:
            g = group_by(n, model.get_submodule(n))
            if not isinstance(g, str) or not g:
                raise SurgeryError(f"group_by callable returned {g!r} for {n!r}; expected a non-empty str")
            groups.setdefault(g, []).extend(f"{n}.{p}" for p in _LORA_PARAM_NAMES)
    else:
        _check_group_by(group_by)
    return groups


def lora_groups(model: nn.Module, group_by: GroupBy | None = None) -> dict[str, list[nn.Parameter]]:
    """Ordered group name -> LoRA parameters of a model that holds ``GSLoRALinear`` layers.

    ``group_by``: "block" (one group per Transformer block: fc1.A, fc1.B, fc2.A, fc2.B — the
    paper), "module" (one per adapted layer: A, B), "tensor" (one per matrix), or a callable
    ``(module_name, module) -> group name``. None uses the grouping chosen at :func:`add_gslora`
    time (stored in ``model.gslora_config``), or "block" for a model without a stored config.
    Parameters are the model's own objects, so optimizers and group-sparsity helpers built from
    them stay valid across :func:`merge_gslora` (which re-initializes in place).
    """
    _check_group_by(group_by)
    mods = gslora_modules(model)
    if not mods:
        raise SurgeryError("the model holds no GSLoRALinear layer; call add_gslora(model, ...) first")
    params = dict(model.named_parameters(remove_duplicate=False))
    config = getattr(model, CONFIG_ATTR, None)
    if group_by is None and config is not None:
        stored: dict[str, list[str]] = config["groups"]
        missing = [p for names in stored.values() for p in names if p not in params]
        if missing:
            raise SurgeryError(f"model.{CONFIG_ATTR} names LoRA parameters the model does not have: "
                               f"{_preview(missing)}; pass group_by explicitly")
        return {g: [params[p] for p in names] for g, names in stored.items()}
    groups = _module_groups(model, [n for n, _ in mods], group_by or "block")
    return {g: [params[p] for p in names] for g, names in groups.items()}


# --------------------------------------------------------------------------------------------
# add / merge / unload
# --------------------------------------------------------------------------------------------

def _trainable_selector(trainable: Sequence[str] | Callable[[str], bool]) -> Callable[[str], bool]:
    if callable(trainable):
        return trainable
    patterns = _as_patterns(trainable, "trainable")

    def selected(pname: str) -> bool:
        # A parameter is kept trainable if its own name or any of its owner modules matches.
        return any(match_name(p, q) for p in patterns for q in _prefixes(pname))

    return selected


def _check_scalar_args(r: Any, lora_alpha: Any, lora_dropout: Any) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r (LoRA rank) must be an integer >= 1, got {r!r}")
    if (not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool)
            or not math.isfinite(lora_alpha) or lora_alpha <= 0):
        raise ValueError(f"lora_alpha must be a finite number > 0, got {lora_alpha!r}")
    if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must lie in [0, 1), got {lora_dropout!r}")


def add_gslora(
    model: nn.Module,
    r: int = 8,
    lora_alpha: float = 1.0,
    lora_dropout: float = 0.0,
    target: TargetSpec = "ffn",
    group_by: GroupBy = "block",
    trainable: Sequence[str] | Callable[[str], bool] = (),
    use_rslora: bool = False,
    backend: str | None = None,
    verbose: bool = False,
) -> dict[str, list[nn.Parameter]]:
    """Turn ``model`` into a GS-LoRA model in place and return its groups.

    Each selected ``nn.Linear`` is replaced by a :class:`GSLoRALinear` that shares its weight and
    bias (no copy: merging writes into the original tensors) and adds A [r, in] (kaiming) and
    B [out, r] (zeros), so the model's outputs are unchanged at init. Every other parameter is
    frozen except those selected by ``trainable``.

    Args:
        model: any ``nn.Module``; modified in place.
        r, lora_alpha, lora_dropout, use_rslora: adapter hyper-parameters (scaling
            s = lora_alpha / r, or lora_alpha / √r with rsLoRA). Authors' defaults: 8, 1, 0.
        target: "ffn" (both FFN linears of every Transformer block — the paper), a name
            pattern or list of patterns (see :func:`match_name`; matched against ``nn.Linear``
            layers only), or a predicate ``(name, linear) -> bool`` called on every ``nn.Linear``.
        group_by: "block" | "module" | "tensor" | callable ``(module_name, module) -> group``.
        trainable: name patterns of modules or parameters to keep trainable (e.g. ``("head",)``),
            or a predicate on parameter names. Default: everything but LoRA is frozen (paper).
        backend: kernel backend forced for the new layers (None: chosen by device).
        verbose: also print the summary (it is always logged at INFO level on logger "gslora").

    Returns:
        Ordered ``{group name: [LoRA parameters]}``, e.g. ``{"blocks.0": [fc1.lora_A,
        fc1.lora_B, fc2.lora_A, fc2.lora_B], ...}`` — the input of the group-sparsity helper.

    Raises:
        SurgeryError: the model already holds GS-LoRA layers, nothing matches ``target`` or
            ``trainable``, or ``group_by="block"`` is asked for layers outside any block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_scalar_args(r, lora_alpha, lora_dropout)
    _check_group_by(group_by)
    if group_by is None:
        raise ValueError("group_by must be 'block', 'module', 'tensor' or a callable, got None")
    if gslora_modules(model):
        raise SurgeryError("the model already holds GSLoRALinear layers; call merge_gslora / "
                           "unload_gslora first, or use lora_groups(model) to get its groups")

    # Everything is validated before the model is touched: an error leaves it unchanged.
    names = _select_targets(model, target)
    if "" in names:
        raise SurgeryError("the model itself is an nn.Linear; wrap it with GSLoRALinear.from_linear")
    groups = _module_groups(model, names, group_by)
    keep = _trainable_selector(trainable)
    all_params = [n for n, _ in model.named_parameters()]
    kept = {n for n in all_params if keep(n)}
    if not callable(trainable):
        for p in _as_patterns(trainable, "trainable"):
            if not any(match_name(p, q) for n in all_params for q in _prefixes(n)):
                raise SurgeryError(f"trainable pattern {p!r} matches no module or parameter; top-level "
                                   f"modules: {_preview(n for n, _ in model.named_children())}")

    frozen = []
    for pname, p in model.named_parameters():
        if p.requires_grad and pname not in kept:
            frozen.append(pname)
        p.requires_grad_(pname in kept)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        layer = GSLoRALinear.from_linear(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                         use_rslora=use_rslora, backend=backend)
        # from_linear froze the shared base; a `trainable` pattern covering it wins.
        layer.weight.requires_grad_(f"{name}.weight" in kept)
        if layer.bias is not None:
            layer.bias.requires_grad_(f"{name}.bias" in kept)
        setattr(parent, attr, layer)

    config = {
        "format": "gslora",
        "version": CONFIG_VERSION,
        "r": r,
        "lora_alpha": float(lora_alpha),
        "lora_dropout": float(lora_dropout),
        "use_rslora": bool(use_rslora),
        "scaling": lora_scaling(r, float(lora_alpha), use_rslora),
        "target": _describe_spec(target),
        "target_modules": names,
        "group_by": group_by if isinstance(group_by, str) else "callable",
        "groups": groups,
        "trainable": _describe_spec(trainable),
        "extra_trainable": [n for n in all_params if n in kept],
    }
    setattr(model, CONFIG_ATTR, config)
    setattr(model, _FROZEN_ATTR, frozen)
    summary = gslora_summary(model)
    logger.info("%s", summary)
    if verbose:
        print(summary)
    return lora_groups(model)


def _prefixes(pname: str) -> list[str]:
    parts = pname.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _describe_spec(spec: Any) -> Any:
    if callable(spec):
        return f"<callable {getattr(spec, '__qualname__', type(spec).__name__)}>"
    return spec if isinstance(spec, str) else list(spec)


@torch.no_grad()
def merge_gslora(model: nn.Module, reinit: bool = True, skip_zero: bool = True) -> dict[str, list[str]]:
    """Fold every adapter into its base weight: W ← W + s·B·A, in place.

    ``reinit=True`` (the continual-forgetting step between tasks) then re-initializes each
    adapter in place (A kaiming, B = 0: the outputs stay those of the merged model) and the
    layers keep training on top of the new base; the ``nn.Parameter`` objects stay the same, so
    group lists stay valid (build a new optimizer: its moments belong to the old adapters).
    ``reinit=False`` leaves the adapters and marks the layers merged (``unmerge()`` undoes it).
    ``skip_zero``: an adapter with A = 0 or B = 0 (e.g. a group zeroed by the proximal step)
    adds nothing and is skipped — no [out, in] product is formed for it.

    Returns ``{"merged": [...], "skipped_zero": [...], "already_merged": [...]}`` module names.
    """
    mods = gslora_modules(model)
    if not mods:
        raise SurgeryError("the model holds no GSLoRALinear layer; nothing to merge")
    report: dict[str, list[str]] = {"merged": [], "skipped_zero": [], "already_merged": []}
    for name, m in mods:
        if m.merged:
            report["already_merged"].append(name)
        elif skip_zero and (not m.lora_B.any() or not m.lora_A.any()):
            report["skipped_zero"].append(name)
        else:
            m.weight.add_(m.delta_weight())
            report["merged"].append(name)
        if reinit:
            m.reset_lora_parameters()
            m.merged = False
        else:
            m.merged = True
    return report


@torch.no_grad()
def unload_gslora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every ``GSLoRALinear`` by a plain ``nn.Linear`` and return ``model``.

    ``merge=True`` bakes the adapters in (W ← W + s·B·A); ``merge=False`` drops them and
    restores the original weights (undoing a merge if the layer is merged). The ``nn.Linear``
    reuses the layer's weight and bias tensors (no copy). Parameters that :func:`add_gslora`
    froze are made trainable again, and ``model.gslora_config`` is removed: the result is an
    ordinary model whose state dict loads into the original architecture without gslora.
    """
    mods = gslora_modules(model)
    if not mods:
        raise SurgeryError("the model holds no GSLoRALinear layer; nothing to unload")
    if any(n == "" for n, _ in mods):
        raise SurgeryError("the model itself is a GSLoRALinear; use its to_linear() method")
    for name, m in mods:
        if merge and not m.merged and m.lora_B.any() and m.lora_A.any():
            m.weight.add_(m.delta_weight())
        elif not merge and m.merged:
            m.weight.sub_(m.delta_weight())
        # Built on the meta device, then given the existing tensors: no allocation, no copy.
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = m.weight
        linear.bias = m.bias
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, linear)
    frozen = set(getattr(model, _FROZEN_ATTR, ()))
    for pname, p in model.named_parameters():
        if pname in frozen:
            p.requires_grad_(True)
    for attr in (CONFIG_ATTR, _FROZEN_ATTR):
        if attr in model.__dict__:
            delattr(model, attr)
    return model


# --------------------------------------------------------------------------------------------
# Counting and reporting
# --------------------------------------------------------------------------------------------

def count_trainable(model: nn.Module) -> dict[str, Any]:
    """Parameter counts: ``{"total", "trainable", "ratio", "base", "lora", "ratio_base", "groups"}``.

    ``total`` counts every (unique) parameter of the model, LoRA included, ``ratio`` =
    trainable / total. ``base`` = total − lora is the original model's size and ``ratio_base``
    = trainable / base is the paper's "tunable parameters" (ViT-B/16 with a 100-class head,
    r = 8 on both FFN linears: 737,280 / 85,875,556 = 0.86%; 1.28% for its face model).
    ``groups`` maps each group of :func:`lora_groups` to its parameter count (empty without
    GS-LoRA layers).
    """
    total = trainable = lora = 0
    for pname, p in model.named_parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
        lora += n if pname.rsplit(".", 1)[-1] in _LORA_PARAM_NAMES else 0
    groups = ({g: sum(p.numel() for p in ps) for g, ps in lora_groups(model).items()}
              if gslora_modules(model) else {})
    base = total - lora
    return {"total": total, "trainable": trainable, "ratio": trainable / total if total else 0.0,
            "base": base, "lora": lora, "ratio_base": trainable / base if base else 0.0,
            "groups": groups}


def gslora_summary(model: nn.Module) -> str:
    """A short human-readable report of what :func:`add_gslora` wrapped, grouped and froze."""
    mods = gslora_modules(model)
    if not mods:
        return "GS-LoRA: no GSLoRALinear layers in this model"
    config = getattr(model, CONFIG_ATTR, {}) or {}
    counts = count_trainable(model)
    ranks = sorted({m.r for _, m in mods})
    scalings = sorted({m.scaling for _, m in mods})
    groups = lora_groups(model)
    by_param = {id(p): n for n, p in model.named_parameters()}
    lines = [
        f"GS-LoRA: {len(mods)} linear layers wrapped in {len(groups)} groups "
        f"(group_by={config.get('group_by', 'block')}), r={'/'.join(map(str, ranks))}, "
        f"scaling={'/'.join(f'{s:g}' for s in scalings)}",
        f"  trainable {counts['trainable']:,} of {counts['total']:,} parameters "
        f"({100 * counts['ratio']:.2f}%; {100 * counts['ratio_base']:.2f}% of the base model's "
        f"{counts['base']:,}); LoRA {counts['lora']:,}",
    ]
    for g, ps in groups.items():
        members = list(dict.fromkeys(by_param[id(p)].rsplit(".", 1)[0] for p in ps))
        shapes = ", ".join(f"{n} [{model.get_submodule(n).in_features}→{model.get_submodule(n).out_features}]"
                           for n in members)
        lines.append(f"  group {g}: {shapes} ({sum(p.numel() for p in ps):,} params)")
    extra = config.get("extra_trainable") or []
    if extra:
        lines.append(f"  also trainable: {_preview(extra)}")
    return "\n".join(lines)
