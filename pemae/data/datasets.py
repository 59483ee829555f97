"""Data sets: turn a `DataConfig` into `torch.utils.data.Dataset`s whose items are
`(image [C, H, W] float32, int label)` with `C = cfg.in_chans` and `H = W = cfg.img_size`.

Every dataset hands its transform a PIL image already converted to the configured channel mode
("L" for `in_chans = 1`, "RGB" for 3), whatever the source (grayscale PNG, RGB JPEG, RGBA, 16-bit);
the transforms (`pemae.data.transforms`) resample to exactly `img_size x img_size` and normalise.

Datasets (`cfg.dataset`):
- `fashion_mnist`: the four IDX files, read by the small reader of `pemae.data.sources` from the first of
  `/usr/share/datasets/fashion-mnist/` (Debian `dataset-fashion-mnist`), `cfg.root`,
  `cfg.root/FashionMNIST/raw/` (torchvision's layout), or torchvision's downloader if
  `cfg.download`. Images stay in memory as one uint8 tensor.
- `cifar10`: torchvision's `CIFAR10` (`<root>/cifar-10-batches-py/`).
- `imagefolder`: the ImageNet layout `<root>/train/<class>/*` and `<root>/val/<class>/*`.
  An unreadable image raises `BadImageError` naming it; with `cfg.skip_bad` the next readable
  image stands in for it and `skipped_images(dataset)` counts the skips.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from pemae.config.schema import ConfigError, DataConfig
from pemae.data.images import image_folder
from pemae.data.sources import TensorImages, cifar10, fashion_mnist
from pemae.data.transforms import EvalTransform


SPLITS = ("train", "val", "test")  # val: held out of the training images (data.val_fraction)
SOURCE_SPLITS = ("train", "test")  # the splits the data sets ship with


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
_BUILDERS: dict[str, Callable[[DataConfig, str, Callable | None], Dataset]] = {
    "fashion_mnist": fashion_mnist,
    "cifar10": cifar10,
    "imagefolder": image_folder,
}


def fixed_subset(dataset: Dataset, n: int, key: str) -> Dataset:
    """A fixed random subset of `n` items (seed 0, sorted indices); `n = 0` keeps everything."""
    if n == 0:
        return dataset
    total = len(dataset)
    if n > total:
        raise ConfigError(f"{key} = {n}: larger than the dataset ({total} items)")
    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(total, generator=generator)[:n].sort().values  # [n]
    return Subset(dataset, indices.tolist())


def train_val_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed split of `n` training items into (train, val) sorted index lists.

    `round(fraction * n)` items (at least one when fraction > 0, at most n - 1) go to val,
    drawn by `seed` alone, so every run, seed and stage holds out the same images.
    """
    n_val = min(max(round(fraction * n), 1 if fraction > 0 else 0), max(n - 1, 0))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # [n]
    return order[n_val:].sort().values.tolist(), order[:n_val].sort().values.tolist()


def build_dataset(cfg: DataConfig, split: str, transform: Callable | None) -> Dataset:
    """The `split` of `cfg.dataset`; items are (transform(image), int label).

    "train" and "val" divide the data set's training images (after `cfg.train_subset`) by
    `cfg.val_fraction` and `cfg.split_seed`; "test" is the data set's test split (imagefolder:
    `val/`), after `cfg.test_subset`. `transform` receives a PIL image in the `in_chans` mode;
    with `transform=None` the items are those PIL images.
    """
    if split not in SPLITS:
        raise ValueError(f"split = {split!r}: unknown (known: {', '.join(SPLITS)})")
    if cfg.dataset not in _BUILDERS:
        raise ConfigError(f"data.dataset = {cfg.dataset!r}: unknown (known: {', '.join(_BUILDERS)})")
    if split == "test":
        return fixed_subset(_BUILDERS[cfg.dataset](cfg, "test", transform), cfg.test_subset,
                            "data.test_subset")
    dataset = fixed_subset(_BUILDERS[cfg.dataset](cfg, "train", transform), cfg.train_subset,
                           "data.train_subset")
    if cfg.val_fraction == 0:
        if split == "val":
            raise ConfigError("data.val_fraction = 0: there is no validation split")
        return dataset
    train, val = train_val_indices(len(dataset), cfg.val_fraction, cfg.split_seed)
    if not train or not val:
        raise ConfigError(f"data.val_fraction = {cfg.val_fraction}: cannot split "
                          f"{len(dataset)} training image(s) into train and val")
    return Subset(dataset, train if split == "train" else val)


def source_indices(dataset: Dataset, indices: Tensor) -> Tensor:
    """Map indices of a (possibly nested) `Subset` to indices of the data set underneath
    (`source_dataset`); negative entries (placeholders) stay as they are."""
    out = indices.clone()  # [...]
    while isinstance(dataset, Subset):
        table = torch.as_tensor(dataset.indices, dtype=torch.int64)  # [len(dataset)]
        out = torch.where(out >= 0, table[out.clamp(min=0)], out)  # [...]
        dataset = dataset.dataset
    return out


def source_dataset(dataset: Dataset) -> Dataset:
    """The data set underneath a (possibly nested) `Subset`."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


class TensorBatches:
    """Batches (images [B, C, H, W], labels [B]) of in-memory uint8 images under `EvalTransform`,
    converted a whole batch at a time (`eval_batches`)."""

    def __init__(self, images: Tensor, labels: Tensor, transform: EvalTransform, batch_size: int):
        self.images, self.labels = images, labels  # [N, H, W] uint8, [N] int64
        self.transform, self.batch_size = transform, batch_size

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            images = self.images[start:start + self.batch_size].unsqueeze(1)  # [B, 1, H, W] uint8
            yield self.transform.batch(images), self.labels[start:start + self.batch_size]


def eval_batches(dataset: Dataset, batch_size: int, num_workers: int = 0) -> Iterable:
    """The batches of a dataset from `build_dataset` with `eval_transform`, in order: what a
    `DataLoader(dataset, batch_size)` gives, tensor for tensor.

    Grayscale images held in memory at `img_size` already (Fashion-MNIST at 28 px) are converted
    a whole batch at a time (`TensorBatches`), skipping PIL and the per-image transform (a third
    of a CPU feature extraction's time); anything else goes through a DataLoader.
    """
    base = source_dataset(dataset)  # under the subsets of build_dataset and of the process shards
    transform = getattr(base, "transform", None)
    if (isinstance(base, TensorImages) and isinstance(transform, EvalTransform) and base.mode == "L"
            and tuple(base.images.shape[1:]) == (transform.size, transform.size)):
        rows = source_indices(dataset, torch.arange(len(dataset)))  # [N]
        return TensorBatches(base.images[rows], base.targets[rows], transform, batch_size)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)


def skipped_images(dataset: Dataset) -> int:
    """Unreadable images skipped so far (all processes) by a dataset from `build_dataset`, found
    through `Subset` and other wrappers with a `.dataset`; 0 for datasets that never skip."""
    while not isinstance(getattr(dataset, "skipped", None), Tensor):
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            return 0
    return int(dataset.skipped)


def class_names(dataset: Dataset) -> list[str]:
    """The class names of a dataset from `build_dataset` (subsets included): its `classes`, or
    "0".."C-1" from its `targets` when it has no names."""
    dataset = source_dataset(dataset)
    classes = getattr(dataset, "classes", None)
    if classes:
        return [str(c) for c in classes]
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets):
        return [str(c) for c in range(int(max(int(t) for t in targets)) + 1)]
    raise ValueError(f"class_names: {type(dataset).__name__} has neither `classes` nor `targets`")


def num_classes(dataset: Dataset) -> int:
    """Number of classes of a dataset from `build_dataset` (subsets included)."""
    return len(class_names(dataset))
