"""The continual-forgetting loop (METHOD.md, "Continual procedure") and its baselines.

For each task t (a set of classes to forget):

1. evaluate the start-of-task model (per-class accuracy: Acc_f before the task, for Drop);
2. GS-LoRA++ only: class prototypes from this frozen start-of-task model;
3. attach fresh adapters (``gslora``/``lora``) or unfreeze the backbone (``full``);
4. train ``steps`` steps on a forget batch + a replay batch of the remaining classes:
   L = CE_retain + β·ReLU(BND − CE_forget) [+ α·Σ‖θ_g‖ (penalty) | prox step] [+ prototypes];
5. evaluate, record group norms, save the adapters, merge them into the base weights, remove
   them, and checkpoint the merged model (atomic: temporary file, then rename).

Methods: ``gslora`` (group sparse LoRA, the method), ``lora`` (same, no group sparsity),
``full`` (all backbone weights trained with the same losses; head frozen as in GS-LoRA) and
``retrain`` (a fresh model trained from scratch on the remaining classes — the gold standard
for "forgotten"; needs a ``retrain_fn``).

Resuming: every finished task writes ``state.json`` (metrics so far) and the merged model; every
``ckpt_every`` steps a step checkpoint holds the trainable tensors and the optimizer. Batches are
drawn from a generator seeded by (seed, task, step), so a resumed run sees exactly the batches
the interrupted one would have. A run directory holding a different run (other config or tasks)
is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .data import class_indices, dataset_targets, fetch, iterate_batches, replay_indices
from .losses import (
    PrototypeLoss,
    bounded_forget_loss,
    compute_prototypes,
    default_bnd,
    embedding_fn,
    estimate_logit_scale,
    retain_loss,
)

__all__ = [
    "ForgetConfig",
    "ForgetError",
    "make_tasks",
    "validate_tasks",
    "evaluate_per_class",
    "task_metrics",
    "h_mean",
    "train_task",
    "ContinualForgetting",
    "METHODS",
]

METHODS = ("gslora", "lora", "full", "retrain")


class ForgetError(ValueError):
    """Bad input to the forgetting engine (tasks, classes, config, run directory)."""


@dataclass
class ForgetConfig:
    """Everything METHOD.md exposes, per forgetting task.

    Attributes:
        method: "gslora" | "lora" | "full" | "retrain".
        r, lora_alpha, target, group_by: the adapter (s = lora_alpha / r; FFN fc1+fc2; one
            group per Transformer block by default).
        sparsity: "prox" (block soft-thresholding after each step: exact zeros) or "penalty"
            (α·Σ_g‖θ_g‖ added to the loss, the authors' code: groups only shrink).
        alpha: group-lasso strength α after warm-up. warmup: fraction of the task's steps with
            α = 0 (METHOD.md's "first N epochs", expressed relative to the task length).
        target_zero_groups: prox only. None: α fixed after warm-up (the paper's schedule).
            An integer k: α starts at ``alpha`` after warm-up and is steered (×1.05 per step up,
            ÷1.05 down) until k groups are exactly zero (negative k: all groups but |k|).
            Why: under AdamW every coordinate moves by ~lr per step whatever its gradient scale,
            so the prox threshold lr·α acts like a cliff — below some α no group dies, slightly
            above it every group does; steering α finds the point where only the groups the
            task needs survive (measured in the README).
        prox_metric: the metric of the proximal step (:class:`gslora.sparsity.ProxOptimizer`):
            "adam" (threshold lr·α·w_g/d_g, d_g the group RMS of AdamW's √v̂+ε: a group survives
            only while its gradient pressure beats α, which removes the cliff above),
            "euclidean" (threshold lr·α·w_g, exact after SGD), or "auto" (adam with AdamW,
            euclidean with SGD).
        beta: weight β of the bounded forget loss. bnd: its bound (None: :func:`default_bnd`
            of the head's logit scale, ``bnd_ratio``·2s).
        steps: optimizer steps per task. epochs: if set, overrides ``steps`` with
            ceil(epochs · forget-set size / batch_size) (an epoch = one pass over the forget
            data). batch_size: forget and replay batch size each.
        lr, lr_min: AdamW learning rate, cosine-annealed to lr_min within a task.
        full_lr: learning rate for the ``full`` baseline (None: lr).
        weight_decay: AdamW weight decay.
        optimizer: "adamw" (the authors) or "sgd" (momentum 0.9): with SGD the prox step is
            exact proximal gradient, so a group survives only if its loss gradient outweighs α.
        replay_ratio / replay_shots: replay subset of remaining classes: a fraction of each
            class, or a few-shot count per class (set one; shots wins when both are set).
        pro_f, pro_r, bnd_pro: GS-LoRA++ prototype terms (0 disables).
        ckpt_every: steps between mid-task checkpoints (0 disables).
        seed, device, backend: class order/batches/init seed, torch device, kernel backend.
    """

    method: str = "gslora"
    r: int = 8
    lora_alpha: float = 1.0
    target: str = "ffn"
    group_by: str = "block"
    sparsity: str = "prox"
    alpha: float = 0.01
    warmup: float = 0.3
    target_zero_groups: int | None = None
    prox_metric: str = "auto"
    beta: float = 0.2
    bnd: float | None = None
    bnd_ratio: float = 0.85
    steps: int = 200
    epochs: float | None = None
    batch_size: int = 64
    lr: float = 1e-2
    lr_min: float = 1e-5
    full_lr: float | None = None
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    replay_ratio: float | None = 0.1
    replay_shots: int | None = None
    pro_f: float = 0.0
    pro_r: float = 0.0
    bnd_pro: float = 1.0
    eval_batch_size: int = 500
    ckpt_every: int = 50
    seed: int = 0
    device: str = "cpu"
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ForgetError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ForgetError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.sparsity not in ("prox", "penalty"):
            raise ForgetError(f"sparsity must be 'prox' or 'penalty', got {self.sparsity!r}")
        if self.prox_metric not in ("auto", "adam", "euclidean"):
            raise ForgetError(f"prox_metric must be 'auto', 'adam' or 'euclidean', got {self.prox_metric!r}")
        if self.prox_metric == "adam" and self.optimizer != "adamw":
            raise ForgetError(f"prox_metric 'adam' needs optimizer 'adamw' (it reads AdamW's second "
                              f"moments), got optimizer {self.optimizer!r}")
        for name in ("r", "steps", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ForgetError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.ckpt_every, int) or self.ckpt_every < 0:
            raise ForgetError(f"ckpt_every must be an integer >= 0, got {self.ckpt_every!r}")
        for name in ("lora_alpha", "lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ForgetError(f"{name} must be a number > 0, got {v!r}")
        for name in ("alpha", "beta", "lr_min", "weight_decay", "pro_f", "pro_r", "bnd_pro"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ForgetError(f"{name} must be a number >= 0, got {v!r}")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float))
                                            and math.isfinite(self.epochs) and self.epochs > 0):
            raise ForgetError(f"epochs must be a number > 0 (or null to use steps), got {self.epochs!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ForgetError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if self.target_zero_groups is not None:
            if not isinstance(self.target_zero_groups, int) or isinstance(self.target_zero_groups, bool):
                raise ForgetError(f"target_zero_groups must be an integer or null, got {self.target_zero_groups!r}")
            if self.sparsity != "prox":
                raise ForgetError("target_zero_groups needs sparsity 'prox' (it counts exact zeros)")
            if self.alpha <= 0:
                raise ForgetError("target_zero_groups needs alpha > 0 (the starting strength)")
        if self.bnd is not None and not (math.isfinite(self.bnd) and self.bnd > 0):
            raise ForgetError(f"bnd must be > 0 (or null for the default), got {self.bnd!r}")
        if not 0 < self.bnd_ratio <= 1:
            raise ForgetError(f"bnd_ratio must lie in (0, 1], got {self.bnd_ratio!r}")
        if self.full_lr is not None and not (math.isfinite(self.full_lr) and self.full_lr > 0):
            raise ForgetError(f"full_lr must be > 0, got {self.full_lr!r}")
        if self.replay_shots is not None:
            if not isinstance(self.replay_shots, int) or self.replay_shots < 1:
                raise ForgetError(f"replay_shots must be an integer >= 1, got {self.replay_shots!r}")
        elif self.replay_ratio is None or not 0 < self.replay_ratio <= 1:
            raise ForgetError(f"replay_ratio must lie in (0, 1], got {self.replay_ratio!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ForgetConfig:
        """Build from a dict; an unknown key (a typo) is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ForgetError(f"unknown forgetting option(s): {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_tasks(classes: Sequence[int], forget_per_task: int, num_tasks: int, seed: int = 0) -> list[list[int]]:
    """Shuffle ``classes`` with ``seed`` and cut ``num_tasks`` consecutive forget sets of
    ``forget_per_task`` classes (e.g. 10 classes, 2 per task, 4 tasks: 10-2, 8-2, 6-2, 4-2)."""
    classes = list(classes)
    if forget_per_task < 1:
        raise ForgetError(f"forget_per_task must be >= 1, got {forget_per_task}")
    if num_tasks < 1:
        raise ForgetError(f"num_tasks must be >= 1, got {num_tasks}")
    if forget_per_task * num_tasks >= len(classes):
        raise ForgetError(f"{num_tasks} tasks × {forget_per_task} classes would forget all "
                          f"{len(classes)} classes; at least one class must remain")
    g = torch.Generator().manual_seed(seed)
    order = [classes[i] for i in torch.randperm(len(classes), generator=g).tolist()]
    return [sorted(order[t * forget_per_task:(t + 1) * forget_per_task]) for t in range(num_tasks)]


def validate_tasks(tasks: Sequence[Sequence[int]], num_classes: int) -> list[list[int]]:
    """Check explicit forget sets: non-empty, known class ids, no class twice, and at least one
    class left after the last task. Returns them as sorted lists of ints."""
    if len(tasks) == 0:
        raise ForgetError("tasks is empty: give at least one forget set")
    seen: set[int] = set()
    out = []
    for t, task in enumerate(tasks):
        ids = list(task)
        if not ids:
            raise ForgetError(f"task {t + 1} has an empty forget set")
        for c in ids:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
                raise ForgetError(f"task {t + 1}: unknown class id {c!r} "
                                  f"(valid ids are 0..{num_classes - 1})")
            if c in seen:
                raise ForgetError(f"task {t + 1}: class {c} is forgotten twice")
            seen.add(c)
        out.append(sorted(ids))
    if len(seen) >= num_classes:
        raise ForgetError(f"the forget sets cover all {num_classes} classes; at least one class "
                          "must remain")
    return out


@torch.no_grad()
def evaluate_per_class(model: nn.Module, dataset: Dataset, num_classes: int, device: str | torch.device,
                       batch_size: int = 500, indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(correct [C], count [C]) int64 of ``model`` on ``dataset`` (or its ``indices``)."""
    was_training = model.training
    model.eval()
    if indices is None:
        indices = torch.arange(len(dataset))
    correct = torch.zeros(num_classes, dtype=torch.long)
    count = torch.zeros(num_classes, dtype=torch.long)
    for x, y in iterate_batches(dataset, indices, batch_size, device):
        pred = model(x).argmax(dim=1)
        y = y.cpu()
        count += torch.bincount(y, minlength=num_classes)
        correct += torch.bincount(y[pred.cpu() == y], minlength=num_classes)
    model.train(was_training)
    return correct, count


def _acc(correct: Tensor, count: Tensor, classes: Sequence[int]) -> float | None:
    if not classes:
        return None
    idx = torch.as_tensor(list(classes))
    n = int(count[idx].sum())
    return 100.0 * float(correct[idx].sum()) / n if n else None


def h_mean(drop: float, acc_r: float) -> float:
    """H-Mean = 2·Drop·Acc_r / (Drop + Acc_r) (0 when either is ≤ 0)."""
    if drop <= 0 or acc_r <= 0:
        return 0.0
    return 2 * drop * acc_r / (drop + acc_r)


def task_metrics(before: tuple[Tensor, Tensor], after: tuple[Tensor, Tensor],
                 pretrained: tuple[Tensor, Tensor], forget: Sequence[int], old: Sequence[int],
                 retain: Sequence[int]) -> dict[str, Any]:
    """Acc_r, Acc_f, Acc_o, Drop, H-Mean (percent) from per-class (correct, count) pairs."""
    acc_r, acc_f = _acc(*after, retain), _acc(*after, forget)
    acc_f_before = _acc(*before, forget)
    drop = acc_f_before - acc_f
    return {
        "acc_r": acc_r, "acc_f": acc_f, "acc_o": _acc(*after, old),
        "acc_r_before": _acc(*before, retain), "acc_f_before": acc_f_before,
        "acc_r_pretrained": _acc(*pretrained, retain),
        "drop": drop, "h_mean": h_mean(drop, acc_r),
        "per_class_acc": [100.0 * c / n if n else None
                          for c, n in zip(after[0].tolist(), after[1].tolist(), strict=True)],
    }


def _atomic_write(path: Path, writer: Callable[[str], None]) -> None:
    """Run writer(tmp_path) then rename onto ``path``: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(path: Path, obj: Any) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    _atomic_write(path, w)


def _save_state_dict(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp))


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise ForgetError(f"corrupt checkpoint {path}: {e}") from None


def _cosine_lr(step: int, total: int, lr: float, lr_min: float) -> float:
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * step / max(1, total)))


def _head_fn(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    # Embedding → logits without a second backbone pass (ours, timm: .head; torchvision: .heads).
    for name in ("head", "heads"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def train_task(
    model: nn.Module,
    train_set: Dataset,
    forget_idx: Tensor,
    replay_idx: Tensor,
    config: ForgetConfig,
    bnd: float,
    task: int = 0,
    sparsity: Any = None,
    proto: PrototypeLoss | None = None,
    embed_fn: Callable[[Tensor], Tensor] | None = None,
    ckpt_path: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the model's trainable parameters for one forgetting task (usable on its own).

    ``sparsity`` is a :class:`gslora.sparsity.GroupSparsity` over the adapter groups (None: no
    structure term). Each step draws ``config.batch_size`` forget samples (``forget_idx``) and
    as many replay samples (``replay_idx``), seeded by (seed, task, step). Returns training
    statistics (final losses, step time). With ``ckpt_path``, resumes from and writes step
    checkpoints (``torch.load(weights_only=True)``-safe: tensors and plain numbers only).
    """
    from tqdm.auto import tqdm

    from ..sparsity import AdaptiveSparsity, ProxOptimizer, SparsityWarmup

    if len(forget_idx) == 0:
        raise ForgetError("the forget set has no training samples")
    if len(replay_idx) == 0:
        raise ForgetError("the replay set has no samples of the remaining classes")
    device = torch.device(config.device)
    total = config.steps if config.epochs is None else \
        max(1, math.ceil(config.epochs * len(forget_idx) / config.batch_size))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ForgetError("the model has no trainable parameters")
    lr = config.full_lr if (config.method == "full" and config.full_lr) else config.lr
    if config.optimizer == "sgd":
        inner = torch.optim.SGD([p for _, p in named], lr=lr, momentum=0.9,
                                weight_decay=config.weight_decay)
    else:
        inner = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=config.weight_decay)
    warmup_steps = int(round(config.warmup * total))
    use_prox = sparsity is not None and config.sparsity == "prox"
    if use_prox and config.target_zero_groups is not None:
        k = config.target_zero_groups
        k = max(0, sparsity.num_groups + k) if k < 0 else min(k, sparsity.num_groups)
        schedule = AdaptiveSparsity(config.alpha, k, warmup_steps, growth=1.05, interval=1)
    else:
        schedule = SparsityWarmup(config.alpha if sparsity is not None else 0.0, warmup_steps)
    metric = config.prox_metric
    if metric == "auto":
        metric = "adam" if config.optimizer == "adamw" else "euclidean"
    opt = ProxOptimizer(inner, sparsity, schedule, metric=metric) if use_prox else inner
    start = 0
    if ckpt_path is not None and ckpt_path.is_file():
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            params = dict(named)
            with torch.no_grad():
                for n, t in ck["params"].items():
                    params[n].copy_(t)
            opt.load_state_dict(ck["optim"])
            if not use_prox:
                schedule.load_state_dict(ck["schedule"])
            start = int(ck["step"])
        except (KeyError, RuntimeError, ValueError, OSError) as e:
            raise ForgetError(f"corrupt or mismatched step checkpoint {ckpt_path}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    head = _head_fn(model) if proto is not None else None
    model.train()
    stats: dict[str, float] = {}
    t0 = time.perf_counter()
    bar = tqdm(range(start, total), initial=start, total=total, disable=not progress,
               desc=f"{config.method} task {task + 1}", leave=False, dynamic_ncols=True)
    for step in bar:
        cur_lr = _cosine_lr(step, total, lr, config.lr_min)
        for pg in inner.param_groups:
            pg["lr"] = cur_lr
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + task * 10_007 + step)
        fi = forget_idx[torch.randint(len(forget_idx), (config.batch_size,), generator=g)]
        ri = replay_idx[torch.randint(len(replay_idx), (config.batch_size,), generator=g)]
        xf, yf = fetch(train_set, fi, device)
        xr, yr = fetch(train_set, ri, device)
        x = torch.cat([xf, xr])
        nf = xf.shape[0]
        if proto is not None:
            emb = embed_fn(x)
            logits = head(emb) if head is not None else model(x)
        else:
            logits = model(x)
        l_r = retain_loss(logits[nf:], yr)
        l_f = bounded_forget_loss(logits[:nf], yf, bnd)
        loss = l_r + config.beta * l_f
        alpha = schedule.alpha
        if proto is not None:
            loss = loss + proto(emb[:nf], yf, emb[nf:], yr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        penalty = None
        if sparsity is not None and not use_prox and alpha > 0:
            # The gradient of + α·Σ_g‖θ_g‖ in the loss, added to .grad in one fused pass.
            penalty = sparsity.add_penalty_grad_(alpha)
        opt.step()
        if not use_prox:
            schedule.step()
        if step % 10 == 0 or step == total - 1:
            total_loss = loss.item() + (0.0 if penalty is None else alpha * penalty.item())
            stats = {"loss": total_loss, "retain_ce": l_r.item(), "forget_term": l_f.item()}
            bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items()})
        if ckpt_path is not None and config.ckpt_every and (step + 1) % config.ckpt_every == 0 \
                and step + 1 < total:
            ck = {"step": step + 1, "params": {n: p.detach().cpu() for n, p in named},
                  "optim": opt.state_dict(), "schedule": schedule.state_dict()}
            _atomic_write(ckpt_path, lambda tmp, ck=ck: torch.save(ck, tmp))
    bar.close()
    stats["train_s"] = time.perf_counter() - t0
    stats["final_alpha"] = float(schedule.alpha)
    stats["steps_run"] = total - start
    # Whether the optimizer ran AdamW and the prox as one fused kernel (ProxOptimizer.fused).
    stats["fused_step"] = bool(getattr(opt, "last_step_fused", False))
    return stats


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ContinualForgetting:
    """Run a sequence of forgetting tasks on any ``nn.Module`` classifier.

    Args:
        model: classifier, images → logits [B, num_classes]; modified in place (merged weights).
        train_set, test_set: any Dataset of (image, label); training draws forget and replay
            batches from ``train_set``; metrics are measured on ``test_set``.
        tasks: forget sets (lists of class ids), see :func:`make_tasks`.
        config: :class:`ForgetConfig`.
        num_classes: number of classes (default: max label + 1 of ``train_set``).
        run_dir: where to checkpoint (resumable) and write adapters; None keeps nothing.
        embed_fn: images → embeddings [B, D] for GS-LoRA++ (default: :func:`embedding_fn`).
        retrain_fn: for ``method="retrain"``: (remaining class ids) → a model trained from
            scratch on them.
        progress: show tqdm bars. log: where one-line messages go.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, test_set: Dataset,
                 tasks: Sequence[Sequence[int]], config: ForgetConfig, num_classes: int | None = None,
                 run_dir: str | os.PathLike | None = None,
                 embed_fn: Callable[[Tensor], Tensor] | None = None,
                 retrain_fn: Callable[[list[int]], nn.Module] | None = None,
                 progress: bool = True, log: Callable[[str], None] = print) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model.to(config.device)
        self.train_set, self.test_set = train_set, test_set
        self.config = config
        self.train_targets = dataset_targets(train_set)
        self.test_targets = dataset_targets(test_set)
        if num_classes is None:
            num_classes = int(self.train_targets.max()) + 1
        self.num_classes = num_classes
        self.tasks = validate_tasks(tasks, num_classes)
        if config.method == "retrain" and retrain_fn is None:
            raise ForgetError("method 'retrain' needs a retrain_fn (remaining classes → model)")
        self.retrain_fn = retrain_fn
        self.embed_fn = embed_fn
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress, self.log = progress, log
        self.fingerprint = _fingerprint({"config": config.to_dict(), "tasks": self.tasks,
                                         "num_classes": num_classes, "n_train": len(train_set),
                                         "n_test": len(test_set)})

    # -------------------------------------------------------------- bookkeeping
    def _load_state(self) -> dict[str, Any]:
        fresh = {"fingerprint": self.fingerprint, "config": self.config.to_dict(),
                 "tasks": self.tasks, "results": [], "pretrained_eval": None}
        if self.run_dir is None or not (self.run_dir / "state.json").is_file():
            return fresh
        try:
            state = json.loads((self.run_dir / "state.json").read_text())
        except json.JSONDecodeError as e:
            raise ForgetError(f"corrupt run state {self.run_dir / 'state.json'}: {e}") from None
        if state.get("fingerprint") != self.fingerprint:
            raise ForgetError(f"{self.run_dir} holds a different run (other config, tasks or "
                              "data); use another output directory or remove it")
        done = len(state["results"])
        if done and self.config.method != "retrain":
            weights = self.run_dir / state.get("model_file", "model.safetensors")
            if not weights.is_file():
                raise ForgetError(f"{weights} is missing although {done} task(s) are recorded")
            sd = _load_state_dict(weights)
            try:
                self.model.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise ForgetError(f"checkpoint {weights} does not match the model: "
                                  f"{str(e).splitlines()[0]}") from None
        if done:
            self.log(f"[{self.config.method}] resuming after task {done}/{len(self.tasks)}")
        return state

    def _bnd(self, forget_idx: Tensor) -> float:
        if self.config.bnd is not None:
            return float(self.config.bnd)
        scale = getattr(self.model, "logit_scale", None)
        if scale is None:
            # Unbounded (linear) head: the typical logit magnitude of the start-of-task model.
            g = torch.Generator().manual_seed(self.config.seed)
            idx = forget_idx[torch.randperm(len(forget_idx), generator=g)[:512]]
            batches = (x for x, _ in iterate_batches(self.train_set, idx, 256, self.config.device))
            scale = estimate_logit_scale(self.model, batches)
        return default_bnd(scale, self.config.bnd_ratio)

    def _eval(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        return evaluate_per_class(model, self.test_set, self.num_classes, self.config.device,
                                  self.config.eval_batch_size)

    # -------------------------------------------------------------- the loop
    def run(self) -> list[dict[str, Any]]:
        """Run (or resume) all tasks; returns one metrics dict per task."""
        from ..surgery import add_gslora, unload_gslora

        cfg = self.config
        state = self._load_state()
        if state["pretrained_eval"] is None:
            # Only valid before task 1 has changed the model: computed once and stored.
            correct, count = self._eval(self.model)
            state["pretrained_eval"] = [correct.tolist(), count.tolist()]
        pre = tuple(torch.tensor(v) for v in state["pretrained_eval"])
        results: list[dict[str, Any]] = state["results"]
        base_params = sum(p.numel() for p in self.model.parameters())
        for t in range(len(results), len(self.tasks)):
            forget = self.tasks[t]
            old = sorted(c for task in self.tasks[:t] for c in task)
            retain = sorted(set(range(self.num_classes)) - set(forget) - set(old))
            t0 = time.perf_counter()
            before = self._eval(self.model) if t > 0 else pre
            record: dict[str, Any] = {"task": t + 1, "forget": forget, "old": old,
                                      "method": cfg.method}
            if cfg.method == "retrain":
                self.model = self.retrain_fn(retain).to(cfg.device)
                record.update(trainable_ratio=1.0, zero_groups=None, num_groups=None,
                              group_norms=None)
            else:
                record.update(self._forget_one(t, forget, retain, base_params,
                                               add_gslora, unload_gslora))
            after = self._eval(self.model)
            record.update(task_metrics(before, after, pre, forget, old, retain))
            record["wall_s"] = time.perf_counter() - t0
            results.append(record)
            if self.run_dir is not None:
                # Model first under a per-task name, then the state that points at it: a crash
                # in between leaves the previous, consistent (state, model) pair in charge.
                previous = state.get("model_file")
                if cfg.method != "retrain":
                    state["model_file"] = f"model_task{t + 1}.safetensors"
                    _save_state_dict(self.run_dir / state["model_file"], self.model.state_dict())
                _write_json(self.run_dir / "state.json", state)
                for stale in (previous, f"task{t + 1}.step.pt"):
                    if stale and stale != state.get("model_file") and (self.run_dir / stale).exists():
                        (self.run_dir / stale).unlink()
            self.log(_one_line(record))
        return results

    def _forget_one(self, t: int, forget: list[int], retain: list[int], base_params: int,
                    add_gslora, unload_gslora) -> dict[str, Any]:
        from ..sparsity import GroupSparsity

        cfg = self.config
        forget_idx = class_indices(self.train_targets, forget)
        replay_idx = replay_indices(self.train_targets, retain, ratio=None if cfg.replay_shots else cfg.replay_ratio,
                                    shots=cfg.replay_shots, seed=cfg.seed * 31 + t)
        bnd = self._bnd(forget_idx)
        proto = None
        embed = None
        if cfg.pro_f > 0 or cfg.pro_r > 0:
            embed = self.embed_fn or embedding_fn(self.model)
            # Prototypes from the frozen start-of-task model, on the data this task may use.
            idx = torch.cat([forget_idx, replay_idx])
            self.model.eval()
            protos = compute_prototypes(embed, iterate_batches(self.train_set, idx, cfg.eval_batch_size,
                                                               cfg.device), self.num_classes)
            proto = PrototypeLoss(protos, cfg.pro_f, cfg.pro_r, cfg.bnd_pro).to(cfg.device)
        torch.manual_seed(cfg.seed * 7919 + t)  # fresh adapters, reproducible on resume
        sparsity = None
        group_names: list[str] = []
        if cfg.method in ("gslora", "lora"):
            groups = add_gslora(self.model, r=cfg.r, lora_alpha=cfg.lora_alpha, target=cfg.target,
                                group_by=cfg.group_by, backend=cfg.backend)
            self.model.to(cfg.device)
            group_names = list(groups)
            tracker = GroupSparsity(groups, backend=cfg.backend)
            sparsity = tracker if cfg.method == "gslora" else None
        else:  # full fine-tuning: backbone trainable, head frozen (as for the adapters)
            head = _head_fn(self.model)
            head_ids = {id(p) for p in head.parameters()} if head is not None else set()
            for p in self.model.parameters():
                p.requires_grad_(id(p) not in head_ids)
            tracker = None
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        ckpt = self.run_dir / f"task{t + 1}.step.pt" if self.run_dir is not None else None
        stats = train_task(self.model, self.train_set, forget_idx, replay_idx, cfg, bnd, task=t,
                           sparsity=sparsity, proto=proto, embed_fn=embed, ckpt_path=ckpt,
                           progress=self.progress)
        out: dict[str, Any] = {"bnd": bnd, "trainable_ratio": trainable / base_params,
                               "train": stats, "n_forget_train": len(forget_idx),
                               "n_replay": len(replay_idx)}
        if tracker is not None:
            norms = tracker.norms().tolist()
            out.update(group_names=group_names, group_norms=norms,
                       zero_groups=sum(1 for n in norms if n == 0.0), num_groups=len(norms))
            if self.run_dir is not None:
                from ..adapters import save_adapter

                self.run_dir.mkdir(parents=True, exist_ok=True)
                save_adapter(self.model, self.run_dir / f"adapter_task{t + 1}.safetensors")  # atomic
            # W ← W + s·B·A (zeroed groups skipped), then plain nn.Linear layers again: only
            # merged weights carry over to the next task (METHOD.md).
            unload_gslora(self.model, merge=True)
        for p in self.model.parameters():
            p.requires_grad_(False)
        if tracker is None:
            out.update(group_names=None, group_norms=None, zero_groups=None, num_groups=None)
        return out


def _one_line(r: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "  -  " if v is None else f"{v:5.1f}"
    z = "" if r.get("zero_groups") is None else f" zero groups {r['zero_groups']}/{r['num_groups']}"
    return (f"[{r['method']}] task {r['task']} forget {r['forget']}: Acc_r {f(r['acc_r'])} "
            f"Acc_f {f(r['acc_f'])} Acc_o {f(r['acc_o'])} Drop {f(r['drop'])} "
            f"H {f(r['h_mean'])}{z} ({r['wall_s']:.1f} s)")


def configs_for_methods(config: ForgetConfig, methods: Sequence[str]) -> dict[str, ForgetConfig]:
    """One config per method, identical except ``method`` (same data, steps and losses)."""
    return {m: replace(config, method=m) for m in methods}

