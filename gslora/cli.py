"""The ``gslora`` command: ``info``, ``pretrain``, ``forget``.

``gslora forget`` with no arguments pre-trains the library's small ViT on Fashion-MNIST (or
loads it from the cache), runs a 4-task continual forgetting sequence (10-2, 8-2, 6-2, 4-2)
with GS-LoRA and the plain-LoRA and full-fine-tuning baselines, prints the per-task table and
writes a report directory (metrics.json, table.txt, plots, merged models and adapters).

Settings come from, in increasing priority: the built-in defaults (:data:`DEFAULTS`, mirrored
by ``configs/default.yaml``), a ``--config`` file (YAML or TOML), and command-line flags.
Every error is reported in one line (``gslora: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "DEFAULTS", "load_config", "build_parser"]

#: The built-in default run (``configs/default.yaml`` holds the same values).
DEFAULTS: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "out": "gslora-report",
    "methods": ["gslora", "lora", "full"],
    "retrain": False,
    "retrain_epochs": 2.0,
    "tasks": {"forget_per_task": 2, "num_tasks": 4, "classes": None},
    "model": {"arch": "vit", "checkpoint": None, "img_size": 28, "patch_size": 4, "in_chans": 1,
              "num_classes": None, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_dim": 128,
              "head": "linear", "head_scale": 16.0, "head_margin": 0.2, "drop_rate": 0.0,
              "timm_kwargs": {}},
    "pretrain": {"epochs": 4.0, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.05, "seed": 0},
    "forget": {"r": 8, "lora_alpha": 1.0, "target": "ffn", "group_by": "block",
               "sparsity": "prox", "alpha": 0.15, "warmup": 0.2, "target_zero_groups": None, "prox_metric": "auto",
               "beta": 0.2, "bnd": None, "bnd_ratio": 0.85, "steps": 200, "epochs": None,
               "batch_size": 64, "lr": 1e-2, "lr_min": 1e-5, "full_lr": 1e-3,
               "weight_decay": 0.05, "optimizer": "adamw", "replay_ratio": None,
               "replay_shots": 10, "pro_f": 0.0, "pro_r": 0.0, "bnd_pro": 1.0,
               "eval_batch_size": 500, "ckpt_every": 50, "seed": 0, "device": "cpu",
               "backend": None},
}

_SECTIONS = {k for k, v in DEFAULTS.items() if isinstance(v, dict)}


class CLIError(Exception):
    """A one-line user error."""


def _merge(base: dict[str, Any], override: dict[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            raise CLIError(f"unknown key {where}{key!r} in config; known: {', '.join(sorted(base))}")
        if key in _SECTIONS and where == "":
            if not isinstance(value, dict):
                raise CLIError(f"config section {key!r} must be a mapping, got {type(value).__name__}")
            out[key] = _merge(base[key], value, f"{key}.")
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None) -> dict[str, Any]:
    """DEFAULTS overridden by a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file; unknown keys
    (typos) are errors naming the key."""
    if path is None:
        return copy.deepcopy(DEFAULTS)
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # yaml.YAMLError / tomllib.TOMLDecodeError: report in one line
        raise CLIError(f"cannot parse {p}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise CLIError(f"config file {p} must hold a mapping at the top level")
    cfg = _merge(DEFAULTS, data, "")
    forget = data.get("forget")
    if isinstance(forget, dict) and "replay_ratio" in forget and "replay_shots" not in forget:
        cfg["forget"]["replay_shots"] = None  # a replay ratio replaces the default few-shot replay
    return cfg


# Flags: (flag, section, key, type, help). Section None = top level.
_FORGET_FLAGS: list[tuple[str, str | None, str, Any, str]] = [
    ("--dataset", None, "dataset", str,
     "fashion-mnist | digits | synthetic | imagefolder:ROOT (ROOT/train/CLASS/*, ROOT/test/CLASS/*)"),
    ("--out", None, "out", str, "report directory (resumes if it holds the same run)"),
    ("--methods", None, "methods", "list", "comma list of gslora,lora,full,retrain"),
    ("--retrain-epochs", None, "retrain_epochs", float, "epochs of the retrain-from-scratch baseline"),
    ("--forget-per-task", "tasks", "forget_per_task", int, "classes forgotten per task"),
    ("--num-tasks", "tasks", "num_tasks", int, "number of tasks"),
    ("--tasks", "tasks", "classes", "tasks", "explicit forget sets, e.g. '0,1;2,3'"),
    ("--r", "forget", "r", int, "LoRA rank"),
    ("--lora-alpha", "forget", "lora_alpha", float, "LoRA alpha (scaling = lora_alpha / r)"),
    ("--group-by", "forget", "group_by", str, "block | module | tensor"),
    ("--sparsity", "forget", "sparsity", str, "prox (exact zeros) | penalty (paper's loss term)"),
    ("--alpha", "forget", "alpha", float, "group-lasso strength after warm-up"),
    ("--warmup", "forget", "warmup", float, "fraction of each task with alpha = 0"),
    ("--target-zero-groups", "forget", "target_zero_groups", int,
     "prox: steer alpha until this many groups are exactly zero (negative: all but N)"),
    ("--optimizer", "forget", "optimizer", str, "adamw (authors) | sgd (exact proximal gradient)"),
    ("--beta", "forget", "beta", float, "weight of the bounded forget loss"),
    ("--bnd", "forget", "bnd", float, "forget-loss bound (default: 0.85 x 2 x logit scale)"),
    ("--steps", "forget", "steps", int, "optimizer steps per task"),
    ("--epochs", "forget", "epochs", float, "epochs over the forget data per task (overrides --steps)"),
    ("--batch-size", "forget", "batch_size", int, "forget and replay batch size"),
    ("--lr", "forget", "lr", float, "AdamW learning rate (cosine to lr-min)"),
    ("--lr-min", "forget", "lr_min", float, "final learning rate"),
    ("--full-lr", "forget", "full_lr", float, "learning rate of the full fine-tuning baseline"),
    ("--weight-decay", "forget", "weight_decay", float, "AdamW weight decay"),
    ("--replay-ratio", "forget", "replay_ratio", float, "replay fraction of remaining-class data"),
    ("--replay-shots", "forget", "replay_shots", int, "few-shot replay: samples per remaining class"),
    ("--pro-f", "forget", "pro_f", float, "GS-LoRA++ forget-side prototype weight"),
    ("--pro-r", "forget", "pro_r", float, "GS-LoRA++ retain-side prototype weight"),
    ("--bnd-pro", "forget", "bnd_pro", float, "GS-LoRA++ prototype KL bound"),
    ("--seed", "forget", "seed", int, "seed of class order, batches and adapter init"),
    ("--device", "forget", "device", str, "torch device (cpu, cuda, ...)"),
    ("--backend", "forget", "backend", str, "kernel backend (torch, cpu, triton, cuda; default auto)"),
    ("--pretrain-epochs", "pretrain", "epochs", float, "pre-training epochs"),
    ("--head", "model", "head", str, "classifier head of the ViT: linear | cosface"),
    ("--model", "model", "arch", str, "vit (the library's) | timm:NAME (e.g. timm:vit_small_patch16_224)"),
    ("--checkpoint", "model", "checkpoint", str,
     "weights of the model to start from (safetensors, a torch state dict or a saved model "
     "directory); default: pre-train on the dataset and cache"),
    ("--img-size", "model", "img_size", int, "model input size (image folders are resized to it)"),
    ("--in-chans", "model", "in_chans", int, "model input channels (1: grayscale, 3: RGB)"),
]


def _parse_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _parse_tasks(text: str) -> list[list[int]]:
    try:
        return [[int(c) for c in part.split(",") if c.strip()] for part in text.split(";")]
    except ValueError:
        raise CLIError(f"--tasks must look like '0,1;2,3' (class ids), got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gslora", description="GS-LoRA continual forgetting")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and the kernel backends available here")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML or TOML config file (see configs/default.yaml)")
        p.add_argument("--cache-dir", help="pre-trained model cache (default $GSLORA_CACHE or ~/.cache/gslora)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    pre = sub.add_parser("pretrain", help="pre-train (or load cached) the model on all classes")
    common(pre)
    pre.add_argument("--dataset")
    pre.add_argument("--pretrain-epochs", type=float)
    pre.add_argument("--head")
    pre.add_argument("--model")
    pre.add_argument("--img-size", type=int)
    pre.add_argument("--in-chans", type=int)
    pre.add_argument("--device")
    pre.add_argument("--force", action="store_true", help="retrain even if cached")

    fg = sub.add_parser("forget", help="run continual forgetting with GS-LoRA and baselines")
    common(fg)
    for flag, _section, _key, typ, help_ in _FORGET_FLAGS:
        fg.add_argument(flag, type=str if typ in ("list", "tasks") else typ, help=help_)
    fg.add_argument("--retrain", action="store_true", help="add the retrain-from-scratch baseline")
    fg.add_argument("--force-pretrain", action="store_true", help="retrain the cached model")
    fg.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def _apply_flags(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    for flag, section, key, typ, _ in _FORGET_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is None:
            continue
        if typ == "list":
            value = _parse_list(value)
        elif typ == "tasks":
            value = _parse_tasks(value)
        (cfg if section is None else cfg[section])[key] = value
    if getattr(args, "replay_ratio", None) is not None and getattr(args, "replay_shots", None) is None:
        cfg["forget"]["replay_shots"] = None  # --replay-ratio replaces the few-shot default
    if getattr(args, "retrain", False):
        cfg["retrain"] = True
    return cfg


def _cmd_info() -> int:
    from .info import info_text

    print(info_text())
    return 0


def _load_data(cfg: dict[str, Any]):
    """(train set, test set, model section with num_classes set): a missing or unreadable
    dataset, or more labels than ``model.num_classes``, fails before any training."""
    from .forgetting import dataset_targets, load_dataset

    model_cfg = dict(cfg["model"])
    size = model_cfg["img_size"], model_cfg["in_chans"]
    train_set, test_set = load_dataset(cfg["dataset"], "train", *size), load_dataset(cfg["dataset"], "test", *size)
    n_data = len(train_set.classes)
    labels_seen = int(dataset_targets(train_set).max()) + 1
    if model_cfg["num_classes"] is None:  # the default: as many outputs as the data has classes
        model_cfg["num_classes"] = n_data
    elif labels_seen > model_cfg["num_classes"]:
        raise CLIError(f"dataset {cfg['dataset']!r} has {labels_seen} classes but model.num_classes "
                       f"is {model_cfg['num_classes']}")
    return train_set, test_set, model_cfg


def _start_model(cfg: dict[str, Any], model_cfg: dict[str, Any], test_set, args: argparse.Namespace,
                 force: bool):
    """The model the run starts from: the ``checkpoint`` file's weights, else the cached
    pre-trained model (trained now on a first run). Returns (model, meta with test_acc)."""
    from .forgetting import (
        PretrainConfig,
        build_model,
        load_weights,
        measure_accuracy,
        pretrained_model,
    )

    device = cfg["forget"]["device"]
    if model_cfg["checkpoint"]:
        model = build_model(model_cfg)
        load_weights(model, model_cfg["checkpoint"], map_location=device)
        model.to(device).eval()
        meta = {"path": str(model_cfg["checkpoint"]), "cached": False,
                **measure_accuracy(model, test_set, model_cfg["num_classes"], device)}
        print(f"loaded weights from {model_cfg['checkpoint']} (test accuracy {meta['test_acc']:.2f}%)")
        return model, meta
    recipe = PretrainConfig.from_dict(cfg["pretrain"])
    cache = Path(args.cache_dir) if args.cache_dir else None
    return pretrained_model(cfg["dataset"], model_cfg, recipe, device=device, cache=cache,
                            progress=not args.no_progress, force=force)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    for attr, section, key in (("dataset", None, "dataset"), ("pretrain_epochs", "pretrain", "epochs"),
                               ("head", "model", "head"), ("model", "model", "arch"),
                               ("img_size", "model", "img_size"), ("in_chans", "model", "in_chans"),
                               ("device", "forget", "device")):
        if getattr(args, attr) is not None:
            (cfg if section is None else cfg[section])[key] = getattr(args, attr)
    cfg["model"]["checkpoint"] = None  # this command trains; `forget --checkpoint` starts from one
    _, test_set, model_cfg = _load_data(cfg)
    _, meta = _start_model(cfg, model_cfg, test_set, args, args.force)
    print(json.dumps({k: meta[k] for k in ("path", "test_acc", "cached") if k in meta}))
    return 0


def _cmd_forget(args: argparse.Namespace) -> int:
    from torch import nn

    from .forgetting import (
        METHODS,
        ContinualForgetting,
        ForgetConfig,
        PretrainConfig,
        build_model,
        make_tasks,
        pretrain,
        save_model,
        validate_tasks,
    )
    from .forgetting.report import format_table, write_report

    t_start = time.perf_counter()
    cfg = _apply_flags(load_config(args.config), args)
    methods = list(cfg["methods"])
    if cfg["retrain"] and "retrain" not in methods:
        methods.append("retrain")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise CLIError(f"methods must be a non-empty list of {', '.join(METHODS)}; got {methods}")
    base_cfg = ForgetConfig.from_dict(cfg["forget"])  # validates every forgetting option
    # Data before the (possibly long) pre-training: a missing dataset fails fast.
    train_set, test_set, model_cfg = _load_data(cfg)
    cfg["model"] = model_cfg  # the report's config names the class count the model has
    n_classes = int(model_cfg["num_classes"])
    tcfg = cfg["tasks"]
    unknown = sorted(set(tcfg) - set(DEFAULTS["tasks"]))
    if unknown:
        raise CLIError(f"unknown key(s) tasks.{unknown[0]}; known: {', '.join(DEFAULTS['tasks'])}")
    if tcfg.get("classes"):
        tasks = validate_tasks(tcfg["classes"], n_classes)
    elif tcfg.get("classes") is not None:
        raise CLIError("tasks.classes is empty: give at least one forget set")
    else:
        tasks = make_tasks(range(n_classes), int(tcfg["forget_per_task"]), int(tcfg["num_tasks"]),
                           seed=base_cfg.seed)
    model, meta = _start_model(cfg, model_cfg, test_set, args, args.force_pretrain)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    names = list(train_set.classes)
    print(f"tasks (forget sets): {'; '.join(', '.join(names[c] for c in t) for t in tasks)}")

    def retrain_fn(retain: list[int]) -> nn.Module:
        import torch

        torch.manual_seed(base_cfg.seed)
        fresh = build_model(model_cfg)
        recipe = PretrainConfig.from_dict({**cfg["pretrain"], "epochs": cfg["retrain_epochs"]})
        pretrain(fresh, train_set, recipe, device=base_cfg.device, classes=retain,
                 progress=not args.no_progress, desc="retrain")
        return fresh.eval()

    results: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        mcfg = ForgetConfig.from_dict({**cfg["forget"], "method": method})
        run = ContinualForgetting(copy.deepcopy(model), train_set, test_set, tasks, mcfg,
                                  num_classes=n_classes, run_dir=out / method,
                                  retrain_fn=retrain_fn if method == "retrain" else None,
                                  progress=not args.no_progress)
        results[method] = run.run()
        if method == "gslora":
            save_model(run.model, out / "gslora" / "final_model", model_cfg, extra={"tasks": tasks})
    report_meta = {"dataset": cfg["dataset"], "tasks": tasks, "class_names": names,
                   "pretrained_test_acc": meta.get("test_acc"), "pretrained_path": meta.get("path"),
                   "config": cfg, "wall_s": time.perf_counter() - t_start}
    paths = write_report(out, results, report_meta, plots=not args.no_plots)
    print(format_table(results, meta.get("test_acc")))
    print(f"report: {out}/ ({', '.join(p.name for p in paths.values())}); "
          f"total {time.perf_counter() - t_start:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gslora`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .backends import BackendError
    from .models.vit import CheckpointError

    user_errors: tuple[type[BaseException], ...] = (CLIError, CheckpointError, BackendError)
    try:
        from .forgetting import DatasetUnavailable, ForgetError, ModelConfigError
        from .surgery import SurgeryError

        user_errors += (ForgetError, DatasetUnavailable, ModelConfigError, SurgeryError)
    except ImportError:  # engine extras missing: their import error is reported below
        pass
    try:
        if args.command == "info":
            return _cmd_info()
        if args.command == "pretrain":
            return _cmd_pretrain(args)
        return _cmd_forget(args)
    except user_errors as e:
        print(f"gslora: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"gslora: error: missing dependency: {e} (pip install 'gslora[engine]')", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gslora: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
