"""Image transforms: normalisation, the pretraining crop and flip, the fine-tuning augmentations
(timm's RandAugment / random erasing recipe or the plain one), and the evaluation resize and
centre crop; any image size, one or three channels."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import AugmentOp
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from pemae.config.schema import ConfigError, DataConfig, FinetuneConfig


DATASET_STATS: dict[str, tuple[list[float], list[float]]] = {
    "fashion_mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "imagefolder": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),  # ImageNet
}
SMALL_IMAGE = 64  # eval: images up to this size are resized whole, larger ones centre-cropped
EVAL_CROP_RATIO = 0.875  # eval: Resize(img_size / 0.875) then CenterCrop(img_size), as in MAE
RE_MODE, RE_COUNT = "pixel", 1  # random erasing: one box of per-pixel noise (as in MAE)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
def _fit_channels(values: list[float], in_chans: int) -> list[float]:
    """Adapt per-channel statistics to `in_chans`: average 3 -> 1, repeat 1 -> 3."""
    if len(values) == in_chans:
        return list(values)
    if in_chans == 1:
        return [sum(values) / len(values)]
    if len(values) == 1:
        return list(values) * in_chans
    raise ConfigError(f"cannot adapt {len(values)}-channel statistics to data.in_chans = {in_chans}")


def normalisation(cfg: DataConfig) -> tuple[list[float], list[float]]:
    """(mean, std) per channel: `cfg.mean` / `cfg.std` when given, else the dataset's own."""
    if cfg.dataset not in DATASET_STATS:
        raise ConfigError(f"data.dataset = {cfg.dataset!r}: no statistics (known: {', '.join(DATASET_STATS)})")
    mean, std = DATASET_STATS[cfg.dataset]
    mean = list(cfg.mean) if cfg.mean else _fit_channels(mean, cfg.in_chans)
    std = list(cfg.std) if cfg.std else _fit_channels(std, cfg.in_chans)
    return mean, std


def denormalise(x: Tensor, cfg: DataConfig) -> Tensor:
    """Invert `Normalize` for images `[B, C, H, W]` (or `[C, H, W]`), clamped to [0, 1]."""
    mean, std = normalisation(cfg)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)  # [C, 1, 1]
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)  # [C, 1, 1]
    return (x * std_t + mean_t).clamp(0.0, 1.0)  # [B, C, H, W]


# --------------------------------------------------------------------------------------------
# Transforms (they take the PIL image the datasets give; tensors [C, H, W] work too)
# --------------------------------------------------------------------------------------------
def normalisation_tensors(cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """`normalisation(cfg)` as float32 tensors (mean, std) [C, 1, 1], to broadcast over images."""
    mean, std = normalisation(cfg)
    return (torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))


def scale_and_normalise(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 images [..., C, H, W] -> float32 normalised, with v2's arithmetic: ToDtype(float32,
    scale=True) (x * (1/255)), then Normalize ((x - mean) / std), element by element."""
    x = images.to(torch.float32).mul_(1.0 / 255)  # [..., C, H, W] in [0, 1]
    return x.sub_(mean).div_(std)  # [..., C, H, W]


def _to_normalised_tensor(cfg: DataConfig) -> list[Callable]:
    """The common tail: PIL/uint8 -> float32 in [0, 1] -> normalised plain tensor."""
    mean, std = normalisation(cfg)
    return [
        v2.ToImage(),  # [C, H, W] uint8
        v2.ToDtype(torch.float32, scale=True),  # [C, H, W] float in [0, 1]
        v2.Normalize(mean=mean, std=std),
        v2.ToPureTensor(),
    ]


def _random_crop_flip(cfg: DataConfig, min_scale: float) -> list[Callable]:
    """RandomResizedCrop to `img_size` (bicubic) and an optional horizontal flip."""
    ops: list[Callable] = [
        v2.RandomResizedCrop(
            cfg.img_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True
        )
    ]
    if cfg.hflip:
        ops.append(v2.RandomHorizontalFlip())
    return ops


class CropFlipNormalise:
    """`v2.Compose(_random_crop_flip(cfg, min_scale) + _to_normalised_tensor(cfg))` on a PIL image,
    bit for bit, in one call: v2's own crop parameters (the same random draws, in the same order),
    PIL's crop and bicubic resize as v2 calls them, the flip on `torch.rand(1) < 0.5` as v2 draws
    it, and v2's uint8 -> float scaling and normalisation arithmetic. What it saves is v2's
    per-transform dispatch, most of the pretraining data path's time (tests/test_data.py checks
    the equality item by item)."""

    def __init__(self, cfg: DataConfig, min_scale: float):
        self.reference = v2.Compose(_random_crop_flip(cfg, min_scale) + _to_normalised_tensor(cfg))
        self.crop = self.reference.transforms[0]  # v2.RandomResizedCrop: its parameters only
        self.size = (cfg.img_size, cfg.img_size)  # (width, height) for PIL
        self.hflip = cfg.hflip
        self.mean, self.std = normalisation_tensors(cfg)  # [C, 1, 1] each

    def __call__(self, img: Image.Image | Tensor) -> Tensor:
        if not isinstance(img, Image.Image):  # a tensor [C, H, W]: v2's own tensor kernels
            return self.reference(img)
        box = self.crop.make_params([img])  # top, left, height, width
        img = img.crop((box["left"], box["top"], box["left"] + box["width"], box["top"] + box["height"]))
        if img.size != self.size:
            img = img.resize(self.size, Image.BICUBIC)
        if self.hflip and torch.rand(1) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, copy=True)).view(img.size[1], img.size[0], -1)  # [H, W, C] uint8
        return scale_and_normalise(x.permute(2, 0, 1), self.mean, self.std)  # [C, H, W]


def pretrain_transform(cfg: DataConfig) -> Callable:
    """MAE pre-training augmentation: RandomResizedCrop(scale=(crop_min_scale, 1)), flip, normalise
    (`CropFlipNormalise`: torchvision's v2 transforms, computed in one call)."""
    return CropFlipNormalise(cfg, cfg.crop_min_scale)


def finetune_transform(cfg: DataConfig, crop_min_scale: float = 0.08) -> Callable:
    """A light fine-tuning augmentation: RandomResizedCrop(scale=(crop_min_scale, 1)), flip,
    normalise (0.08 is the Inception / MAE crop; small images keep more: finetune.crop_min_scale);
    `CropFlipNormalise`, as pretraining."""
    return CropFlipNormalise(cfg, crop_min_scale)


def uses_timm_augmentation(fc: FinetuneConfig) -> bool:
    """True when a fine-tuning knob asks for timm's augmentation (auto-augment or erasing)."""
    return bool(fc.auto_augment) or fc.re_prob > 0


def timm_finetune_transform(cfg: DataConfig, fc: FinetuneConfig) -> Callable:
    """MAE's fine-tuning augmentation, built by timm's `create_transform`: RandomResizedCrop(
    scale=(crop_min_scale, 1)) bicubic, flip, the `auto_augment` policy (no colour jitter),
    normalise with pemae's statistics, random erasing (`re_prob`).

    Grayscale works: the PIL image arrives in mode "L", every timm policy handles it, and the
    statistics have `in_chans` values, so the output is [in_chans, img_size, img_size].
    """
    mean, std = normalisation(cfg)
    try:
        transform = create_transform(
            cfg.img_size, is_training=True, scale=(fc.crop_min_scale, 1.0),
            hflip=0.5 if cfg.hflip else 0.0, color_jitter=None,
            auto_augment=fc.auto_augment or None, interpolation="bicubic",
            mean=tuple(mean), std=tuple(std), re_prob=fc.re_prob, re_mode=RE_MODE, re_count=RE_COUNT,
        )
    except (AssertionError, ValueError, KeyError, IndexError) as exc:  # timm's policy parser
        raise ConfigError(f"finetune.auto_augment = {fc.auto_augment!r}: timm cannot parse it "
                          f"({type(exc).__name__}: {exc})") from exc
    for op in augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = BlackBelowOneBit(op.aug_fn)
    return transform


def augment_ops(transform: Callable) -> list[AugmentOp]:
    """The `AugmentOp`s inside a timm transform (RandAugment / AugMix ops, AutoAugment policies)."""
    ops = []
    for step in getattr(transform, "transforms", []):
        ops += list(getattr(step, "ops", None) or [])  # RandAugment, AugMix
        ops += [op for sub in getattr(step, "policy", None) or [] for op in sub]  # AutoAugment
    return [op for op in ops if isinstance(op, AugmentOp)]


class BlackBelowOneBit:
    """timm's posterize, with 0 bits kept (RandAugment's `PosterizeIncreasing` at magnitude 10)
    giving a black image, as older Pillow did. Pillow 13 (installed here) refuses bits < 1 with a
    ValueError: about one image in 700 under `rand-m9-mstd0.5-inc1` (magnitude N(9, 0.5) >= 10;
    measured 42 in 30k), i.e. most batches of 1024 would stop the run. Picklable (workers)."""

    def __init__(self, posterize: Callable):
        self.posterize = posterize

    def __call__(self, img: Image.Image, bits: int, **kwargs) -> Image.Image:
        if bits < 1:
            return Image.new(img.mode, img.size)  # every bit masked away: black
        return self.posterize(img, bits, **kwargs)


def finetune_train_transform(cfg: DataConfig, fc: FinetuneConfig) -> Callable:
    """The fine-tuning training transform: timm's (MAE's recipe) when `finetune.auto_augment` or
    `finetune.re_prob` asks for it, else the light `finetune_transform` exactly as before."""
    if uses_timm_augmentation(fc):
        return timm_finetune_transform(cfg, fc)
    return finetune_transform(cfg, fc.crop_min_scale)


class EvalTransform:
    """The deterministic evaluation transform: small images are resized whole, larger ones
    resized then centre-cropped; then MAE's normalisation (torchvision v2, `reference`).

    `batch` does the same to a whole uint8 batch of images that are already `img_size` square
    (where the geometry is the identity), bit for bit, in two tensor operations: what
    `eval_batches` uses for data sets held in memory.
    """

    def __init__(self, cfg: DataConfig):
        size = cfg.img_size
        if size <= SMALL_IMAGE:
            geometry = [v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True)]
        else:
            geometry = [
                v2.Resize(int(size / EVAL_CROP_RATIO), interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(size),
            ]
        self.reference = v2.Compose(geometry + _to_normalised_tensor(cfg))
        self.size = size
        self.mean, self.std = normalisation_tensors(cfg)  # [C, 1, 1] each

    def __call__(self, img: Image.Image | Tensor) -> Tensor:
        return self.reference(img)  # [C, img_size, img_size]

    def batch(self, images: Tensor) -> Tensor:
        """uint8 images [B, C, img_size, img_size] -> normalised float32 [B, C, img_size, img_size],
        the same values as `self(image)` on each (v2's uint8 -> float scaling, then normalise)."""
        return scale_and_normalise(images, self.mean, self.std)  # [B, C, H, W]


def eval_transform(cfg: DataConfig) -> EvalTransform:
    """Deterministic: small images are resized whole; larger ones resized then centre-cropped."""
    return EvalTransform(cfg)
