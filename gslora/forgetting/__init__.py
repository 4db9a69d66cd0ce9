"""The continual-forgetting engine: losses, data, the task loop, metrics, baselines, reports.

Imported lazily (``import gslora`` does not load it). Main entry points:
:class:`~gslora.forgetting.engine.ContinualForgetting`, :func:`~gslora.forgetting.engine.train_task`,
the losses in :mod:`gslora.forgetting.losses`, and :func:`~gslora.forgetting.pretrain.pretrained_model`
(the library's ViT or a timm architecture, pre-trained and cached; or your weights:
:mod:`~gslora.forgetting.base_model`).
"""

from .base_model import ModelConfigError, build_model, load_model, load_weights, save_model
from .data import (
    IMAGE_FOLDER,
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
from .pretrain import (
    PretrainConfig,
    cache_dir,
    measure_accuracy,
    pretrain,
    pretrained_model,
    pretrained_vit,
)

__all__ = [
    "IMAGE_FOLDER",
    "METHODS",
    "ModelConfigError",
    "ContinualForgetting",
    "DatasetUnavailable",
    "ForgetConfig",
    "ForgetError",
    "PretrainConfig",
    "PrototypeLoss",
    "TensorImageDataset",
    "bounded_forget_loss",
    "build_model",
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
    "load_model",
    "load_weights",
    "make_tasks",
    "measure_accuracy",
    "pretrain",
    "pretrained_model",
    "pretrained_vit",
    "replay_indices",
    "retain_loss",
    "save_model",
    "task_metrics",
    "train_task",
    "validate_tasks",
]
