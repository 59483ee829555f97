"""The dense probe's scenes (`build_scenes`; the probe itself is `pemae.eval.dense`).

`dense.min_items`..`dense.max_items` items of the configured data set (Fashion-MNIST by default)
are pasted at random positions, possibly overlapping, on a black canvas `dense.canvas_scale` times
the data's `img_size` (56 x 56 by default). Each pixel is labelled 0 (background) or 1 + the class
of the item on top there; an item covers its silhouette (its pixels brighter than
`dense.threshold`), not its bounding box, so a lower item shows through around an upper one.
Train / val / test scenes take their items only from the pipeline's train / val / test split
(`pemae.data.datasets.build_dataset`, the same validation hold-out), so no validation or test item
is ever seen by a probe in training. The scenes are drawn by `dense.scene_seed` alone (a
`torch.Generator`): every run and seed is scored on the same scenes; nothing is downloaded or
written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from pemae.config.schema import Config, DataConfig
from pemae.data.datasets import SPLITS, build_dataset, class_names, source_indices
from pemae.data.transforms import denormalise, eval_transform


BACKGROUND = 0  # label of the pixels no item covers; item classes are shifted by one
SOURCE_OF_SPLIT = {"train": "train", "val": "train", "test": "test"}  # the data set's own files


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------
@dataclass
class Scenes:
    """Composed scenes of one split.

    `items` index the split's data set (`build_dataset(cfg.data, split, ...)`), `source_items` the
    same items in the data set's own `source` files ("train" or "test"), -1 where a scene has
    fewer than `max_items` items; items are listed bottom to top (the last one is on top).
    """

    pixels: Tensor  # [S, C, H, W] float in [0, 1], not normalised
    labels: Tensor  # [S, H, W] int64: 0 background, 1 + class of the item on top
    items: Tensor  # [S, M] int64, -1 = no item
    positions: Tensor  # [S, M, 2] int64: (top, left) of each item
    source_items: Tensor  # [S, M] int64, -1 = no item
    source: str  # "train" or "test"
    class_names: list[str]  # label c + 1 is class c (label 0: background)

    @property
    def num_labels(self) -> int:
        """1 + the number of classes."""
        return 1 + len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)


def canvas_size(cfg: Config) -> int:
    """The scene's side in pixels: `dense.canvas_scale * data.img_size`."""
    return cfg.dense.canvas_scale * cfg.data.img_size


def scene_generator(seed: int, split: str) -> torch.Generator:
    """The generator of one split's scenes: distinct for every (seed, split) pair."""
    return torch.Generator().manual_seed(seed * len(SPLITS) + SPLITS.index(split))


def draw_placements(num_items: int, num_scenes: int, canvas: int, item_size: int,
                    min_items: int, max_items: int, generator: torch.Generator
                    ) -> tuple[Tensor, Tensor]:
    """Which items go where: (item indices [S, M] with -1 past each scene's count, top-left
    positions [S, M, 2]); counts uniform in [min_items, max_items], items drawn with replacement,
    positions uniform over the canvas (items may overlap, never leave it)."""
    counts = torch.randint(min_items, max_items + 1, (num_scenes,), generator=generator)  # [S]
    items = torch.randint(num_items, (num_scenes, max_items), generator=generator)  # [S, M]
    positions = torch.randint(canvas - item_size + 1, (num_scenes, max_items, 2),
                              generator=generator)  # [S, M, 2]
    present = torch.arange(max_items)[None, :] < counts[:, None]  # [S, M]
    return items.masked_fill(~present, -1), positions  # [S, M], [S, M, 2]


def silhouette(item: Tensor, threshold: float) -> Tensor:
    """The item's own pixels: intensity (mean over channels) above `threshold`. [C, h, w] -> [h, w]."""
    return item.mean(0) > threshold  # [h, w]


def paste(pixels: Tensor, labels: Tensor, item: Tensor, label: int, top: int, left: int,
          threshold: float) -> None:
    """Paste `item` [C, h, w] on a scene (pixels [C, H, W], labels [H, W]) in place, at (top,
    left): its silhouette's pixels take the item's values and `label`; the rest stays."""
    h, w = item.shape[-2:]
    mask = silhouette(item, threshold)  # [h, w]
    region = pixels[:, top:top + h, left:left + w]  # [C, h, w], a view
    region[:, mask] = item[:, mask]  # [C, P] with P pixels in the silhouette
    labels[top:top + h, left:left + w][mask] = label


def compose_scenes(items: Tensor, classes: Tensor, placements: Tensor, positions: Tensor,
                   canvas: int, threshold: float) -> tuple[Tensor, Tensor]:
    """Render scenes from item images [N, C, h, w] in [0, 1] and their classes [N]: items
    `placements` [S, M] (-1 = none) at `positions` [S, M, 2], pasted bottom to top on a black
    canvas. Returns (pixels [S, C, canvas, canvas], labels [S, canvas, canvas]), label 1 + class."""
    num_scenes, channels = len(placements), items.shape[1]
    pixels = torch.zeros(num_scenes, channels, canvas, canvas)  # [S, C, H, W]
    labels = torch.full((num_scenes, canvas, canvas), BACKGROUND, dtype=torch.int64)  # [S, H, W]
    for s in range(num_scenes):
        for item, (top, left) in zip(placements[s].tolist(), positions[s].tolist()):
            if item >= 0:
                paste(pixels[s], labels[s], items[item], 1 + int(classes[item]), top, left, threshold)
    return pixels, labels


def load_items(dataset: Dataset, indices: Tensor, data: DataConfig) -> tuple[Tensor, Tensor]:
    """Items `indices` [n] of a dataset built with `eval_transform` (the pipeline's own loading
    and resizing), back in [0, 1]: (images [n, C, h, w], classes [n])."""
    pairs = [dataset[i] for i in indices.tolist()]
    images = torch.stack([img for img, _ in pairs])  # [n, C, h, w], normalised
    classes = torch.tensor([label for _, label in pairs], dtype=torch.int64)  # [n]
    return denormalise(images, data), classes  # [n, C, h, w] in [0, 1], [n]


def build_scenes(cfg: Config, split: str) -> Scenes:
    """`dense.<split>_scenes` scenes composed from the items of the pipeline's `split`."""
    dc, data = cfg.dense, cfg.data
    dataset = build_dataset(data, split, eval_transform(data))
    count = {"train": dc.train_scenes, "val": dc.val_scenes, "test": dc.test_scenes}[split]
    canvas = canvas_size(cfg)
    placements, positions = draw_placements(len(dataset), count, canvas, data.img_size,
                                            dc.min_items, dc.max_items,
                                            scene_generator(dc.scene_seed, split))  # [S, M], [S, M, 2]
    used, local = torch.unique(placements[placements >= 0], return_inverse=True)  # [U], [P]
    images, classes = load_items(dataset, used, data)  # [U, C, h, w], [U]
    local_placements = placements.clone()  # [S, M] indices into `used`
    local_placements[placements >= 0] = local
    pixels, labels = compose_scenes(images, classes, local_placements, positions, canvas,
                                    dc.threshold)  # [S, C, H, W], [S, H, W]
    return Scenes(pixels, labels, placements, positions, source_indices(dataset, placements),
                  SOURCE_OF_SPLIT[split], class_names(dataset))
