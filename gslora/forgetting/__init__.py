"""The continual-forgetting engine: losses, data, the task loop, metrics, baselines, reports.

Imported lazily (``import gslora`` does not load it). Main entry points:
:class:`~gslora.forgetting.engine.ContinualForgetting`, :func:`~gslora.forgetting.engine.train_task`,
the losses in :mod:`gslora.forgetting.losses`, and :func:`~gslora.forgetting.pretrain.pretrained_vit`.
"""

from .data import (
    DatasetUnavailable,
    TensorImageDataset,
    class_indices,
    dataset_targets,
    load_dataset,
    replay_indices,
)
from .engine import (
    METHODS,
    ContinualForgetting,
    ForgetConfig,
    ForgetError,
    evaluate_per_class,
    h_mean,
    make_tasks,
    task_metrics,
    train_task,
    validate_tasks,
)
from .losses import (
    PrototypeLoss,
    bounded_forget_loss,
    compute_prototypes,
    default_bnd,
    embedding_fn,
    estimate_logit_scale,
    retain_loss,
)
from .pretrain import PretrainConfig, cache_dir, pretrain, pretrained_vit

__all__ = [
    "METHODS",
    "ContinualForgetting",
    "DatasetUnavailable",
    "ForgetConfig",
    "ForgetError",
    "PretrainConfig",
    "PrototypeLoss",
    "TensorImageDataset",
    "bounded_forget_loss",
    "cache_dir",
    "class_indices",
    "compute_prototypes",
    "dataset_targets",
    "default_bnd",
    "embedding_fn",
    "estimate_logit_scale",
    "evaluate_per_class",
    "h_mean",
    "load_dataset",
    "make_tasks",
    "pretrain",
    "pretrained_vit",
    "replay_indices",
    "retain_loss",
    "task_metrics",
    "train_task",
    "validate_tasks",
]
