"""Offline datasets, class-split helpers and fast batching for the forgetting engine.

Built-in datasets (no network, see DATA.md):

* ``"fashion-mnist"``: Debian ``dataset-fashion-mnist`` (60 k / 10 k, 28×28, 10 classes).
* ``"digits"``: scikit-learn's bundled ``load_digits`` (1,797 images 8×8, 10 classes), split
  80/20 with a fixed seed — small enough for tests.
* ``"synthetic"``: random class-conditional blobs, for unit tests only.

Your own images: ``"imagefolder:ROOT"``, torchvision's ``ImageFolder`` layout (one folder of
images per class) under ``ROOT/train`` and ``ROOT/test`` (or ``ROOT/val``), resized to the
model's input size and channels.

Every one of these is a :class:`TensorImageDataset` (images [N, C, H, W] float32, targets
[N] int64 in memory). The engine accepts any ``torch.utils.data.Dataset`` yielding
``(image, label)``; in-memory tensor datasets are batched by direct indexing (no DataLoader
overhead), everything else through a ``DataLoader``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = [
    "TensorImageDataset",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "DatasetUnavailable",
    "IMAGE_FOLDER",
    "load_dataset",
    "dataset_targets",
    "class_indices",
    "replay_indices",
    "iterate_batches",
]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_DIR = Path(os.environ.get("GSLORA_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


class DatasetUnavailable(RuntimeError):
    """A dataset is unknown, or its files (or package) are missing or unreadable; the message
    says what to install or how to lay the files out."""


class TensorImageDataset(TensorDataset):
    """Images [N, C, H, W] float32 and targets [N] int64 held in memory, with class names."""

    def __init__(self, images: Tensor, targets: Tensor, classes: Sequence[str]) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must be [{images.shape[0]}], got {tuple(targets.shape)}")
        super().__init__(images.float(), targets.long())
        self.images, self.targets = self.tensors
        self.classes = tuple(classes)


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def _fashion_mnist(split: str) -> TensorImageDataset:
    prefix = "train" if split == "train" else "t10k"
    img_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.is_file() or not lbl_path.is_file():
        raise DatasetUnavailable(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR}; install it with "
            "`apt-get install dataset-fashion-mnist` or set GSLORA_FASHION_MNIST_DIR")
    labels = _read_idx(lbl_path, 8)
    images = _read_idx(img_path, 16).reshape(len(labels), 1, 28, 28)
    # Per-dataset standardization (mean 0.286, std 0.353 over the training images).
    x = (torch.from_numpy(images.copy()).float() / 255.0 - 0.2860) / 0.3530
    return TensorImageDataset(x, torch.from_numpy(labels.astype(np.int64)), FASHION_MNIST_CLASSES)


def _digits(split: str) -> TensorImageDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetUnavailable("the 'digits' dataset needs scikit-learn (pip install scikit-learn)") from None
    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    perm = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    idx = perm[:cut] if split == "train" else perm[cut:]
    x = (torch.from_numpy(images[idx]).unsqueeze(1) - 0.3) / 0.4
    return TensorImageDataset(x, torch.from_numpy(bunch.target[idx].astype(np.int64)),
                              [str(i) for i in range(10)])


def _synthetic(split: str, num_classes: int = 6, per_class: int = 40, size: int = 8) -> TensorImageDataset:
    # Fixed class templates (seed 0) + split-dependent noise: learnable, but not trivially.
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(num_classes, 1, size, size, generator=g)
    g.manual_seed(1 if split == "train" else 2)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = templates[y] + 0.6 * torch.randn(len(y), 1, size, size, generator=g)
    return TensorImageDataset(x, y, [f"c{i}" for i in range(num_classes)])


IMAGE_FOLDER = "imagefolder:"  # prefix of a dataset name that points at the user's images


def _image_folder(root: Path, split: str, img_size: int, in_chans: int) -> TensorImageDataset:
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    layout = "ROOT/train/CLASS/*.png and ROOT/test/CLASS/*.png"
    folders = [root / "train"] if split == "train" else [root / "test", root / "val"]
    folder = next((f for f in folders if f.is_dir()), None)
    if folder is None or not (root / "train").is_dir():
        missing = "train" if not (root / "train").is_dir() else " or ".join(f.name for f in folders)
        raise DatasetUnavailable(f"image folder {root} has no {missing}/ subfolder (expected {layout})")
    mode = {1: "L", 3: "RGB"}.get(in_chans)
    if mode is None:
        raise DatasetUnavailable(f"image folders load as 1 (grayscale) or 3 (RGB) channels, not {in_chans}")
    try:
        # The classes are train's sorted folder names; a test folder may lack some, not add any.
        classes, class_to_idx = find_classes(str(root / "train"))
        extra = sorted(set(find_classes(str(folder))[0]) - set(classes))
        if extra:
            raise DatasetUnavailable(f"{folder} has class folders that {root / 'train'} lacks: {extra}")
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS,
                               allow_empty=split != "train")
    except (FileNotFoundError, OSError) as e:
        raise DatasetUnavailable(f"image folder {folder}: {' '.join(str(e).split())}") from None
    if not samples:
        raise DatasetUnavailable(f"no images in {folder} (expected {layout})")
    images = np.empty((len(samples), img_size, img_size, in_chans), np.uint8)

    def read(i: int) -> None:
        path = samples[i][0]
        try:
            with Image.open(path) as im:
                im = im.convert(mode).resize((img_size, img_size), Image.BILINEAR)
                images[i] = np.asarray(im).reshape(img_size, img_size, in_chans)
        except OSError as e:
            raise DatasetUnavailable(f"cannot read image {path}: {e}") from None

    # PIL's decoding and resizing release the GIL, so a thread per core reads images in parallel.
    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        for _ in pool.map(read, range(len(samples))):  # (re-raises the first error)
            pass
    # [0, 255] -> [-1, 1] (mean = std = 0.5 per channel): the same for every split, no statistics
    # to carry from train to test.
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
    return TensorImageDataset(x, torch.tensor([c for _, c in samples], dtype=torch.long), classes)


_LOADERS = {"fashion-mnist": _fashion_mnist, "digits": _digits, "synthetic": _synthetic}


def load_dataset(name: str, split: str, img_size: int | None = None,
                 in_chans: int | None = None) -> TensorImageDataset:
    """``split`` ("train" or "test") of a built-in dataset (``name`` in {"fashion-mnist",
    "digits", "synthetic"}), or of your images: ``name = "imagefolder:ROOT"`` with
    ``ROOT/train/CLASS/*`` and ``ROOT/test/CLASS/*`` (or ``ROOT/val``), every image resized to
    ``img_size`` × ``img_size`` with ``in_chans`` channels (1 or 3; both required for image
    folders, unused otherwise) and scaled to [-1, 1]; classes are the sorted folder names.
    The images are held in memory (N·C·H·W floats). Raises :class:`DatasetUnavailable` if the
    files are missing or unreadable."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name.startswith(IMAGE_FOLDER):
        if img_size is None or in_chans is None:
            raise ValueError("an image folder needs img_size and in_chans (the model's input)")
        return _image_folder(Path(name[len(IMAGE_FOLDER):]).expanduser(), split, img_size, in_chans)
    if name not in _LOADERS:
        raise DatasetUnavailable(f"unknown dataset {name!r}; choose one of {', '.join(_LOADERS)} "
                                 f"or {IMAGE_FOLDER}ROOT")
    return _LOADERS[name](split)


def dataset_targets(dataset: Dataset) -> Tensor:
    """Labels [N] int64 of any (image, label) dataset: ``.targets`` when present (torchvision,
    ours), else read by iterating once. ``Subset`` is unwrapped without touching images."""
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def class_indices(targets: Tensor, classes: Sequence[int]) -> Tensor:
    """Indices [n] (ascending) of the samples whose label is in ``classes``."""
    if len(classes) == 0:
        return torch.empty(0, dtype=torch.long)
    mask = torch.isin(targets, torch.as_tensor(list(classes), dtype=targets.dtype))
    return mask.nonzero().flatten()


def replay_indices(targets: Tensor, classes: Sequence[int], ratio: float | None = None,
                   shots: int | None = None, seed: int = 0) -> Tensor:
    """The replay subset of the remaining ``classes``: a fraction ``ratio`` of each class's
    samples (at least one), or ``shots`` samples per class (few-shot). Exactly one of the two."""
    if (ratio is None) == (shots is None):
        raise ValueError("give exactly one of replay ratio or replay shots")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ValueError(f"replay ratio must lie in (0, 1], got {ratio!r}")
    if shots is not None and shots < 1:
        raise ValueError(f"replay shots must be >= 1, got {shots!r}")
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in classes:
        idx = (targets == c).nonzero().flatten()
        if len(idx) == 0:
            continue
        n = max(1, round(ratio * len(idx))) if ratio is not None else min(shots, len(idx))
        picked.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(picked).sort().values if picked else torch.empty(0, dtype=torch.long)


def _is_tensor_dataset(dataset: Dataset) -> bool:
    return isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2


def fetch(dataset: Dataset, indices: Tensor, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """One batch (images, labels) for ``indices``, moved to ``device``."""
    if _is_tensor_dataset(dataset):
        x, y = dataset.tensors[0][indices], dataset.tensors[1][indices]
    else:
        items = [dataset[int(i)] for i in indices]
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def iterate_batches(dataset: Dataset, indices: Tensor, batch_size: int, device: torch.device | str,
                    num_workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Evaluation order batches (images, labels) over ``indices``."""
    if _is_tensor_dataset(dataset):
        for start in range(0, len(indices), batch_size):
            yield fetch(dataset, indices[start:start + batch_size], device)
        return
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    for x, y in loader:
        yield x.to(device), torch.as_tensor(y, dtype=torch.long).to(device)
