"""Datasets and transforms.

One job: turn a `DataConfig` into `torch.utils.data.Dataset`s whose items are
`(image [C, H, W] float32, int label)` with `C = cfg.in_chans` and `H = W = cfg.img_size`.

Every dataset hands its transform a PIL image already converted to the configured channel mode
("L" for `in_chans = 1`, "RGB" for 3), whatever the source (grayscale PNG, RGB JPEG, RGBA, 16-bit);
the transforms below resample to exactly `img_size x img_size` and normalise.

Datasets (`cfg.dataset`):
- `fashion_mnist`: the four IDX files, read by the small reader below from the first of
  `/usr/share/datasets/fashion-mnist/` (Debian `dataset-fashion-mnist`), `cfg.root`,
  `cfg.root/FashionMNIST/raw/` (torchvision's layout), or torchvision's downloader if
  `cfg.download`. Images stay in memory as one uint8 tensor.
- `cifar10`: torchvision's `CIFAR10` (`<root>/cifar-10-batches-py/`).
- `imagefolder`: the ImageNet layout `<root>/train/<class>/*` and `<root>/val/<class>/*`.
  An unreadable image raises `BadImageError` naming it; with `cfg.skip_bad` the next readable
  image stands in for it and `skipped_images(dataset)` counts the skips.
"""

from __future__ import annotations

import functools
import gzip
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from timm.data import create_transform
from timm.data.auto_augment import AugmentOp
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from pemae.config import ConfigError, DataConfig, FinetuneConfig

# --------------------------------------------------------------------------------------------
# Constants (module level so tests can point them elsewhere)
# --------------------------------------------------------------------------------------------
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt `dataset-fashion-mnist`
DEFAULT_CACHE = Path("~/.cache/pemae").expanduser()  # torchvision downloads when data.root = ""

DATASET_STATS: dict[str, tuple[list[float], list[float]]] = {
    "fashion_mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "imagefolder": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),  # ImageNet
}

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_FILES = {  # split -> (images, labels), without the optional ".gz"
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLITS = ("train", "val", "test")  # val: held out of the training images (data.val_fraction)
SOURCE_SPLITS = ("train", "test")  # the splits the data sets ship with
SMALL_IMAGE = 64  # eval: images up to this size are resized whole, larger ones centre-cropped
EVAL_CROP_RATIO = 0.875  # eval: Resize(img_size / 0.875) then CenterCrop(img_size), as in MAE
RE_MODE, RE_COUNT = "pixel", 1  # random erasing: one box of per-pixel noise (as in MAE)

_IDX_DTYPES = {  # IDX type code -> big-endian numpy dtype
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


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


# --------------------------------------------------------------------------------------------
# Images in the configured channel mode
# --------------------------------------------------------------------------------------------
def channel_mode(in_chans: int) -> str:
    """The PIL mode for `in_chans` channels."""
    if in_chans not in (1, 3):
        raise ConfigError(f"data.in_chans = {in_chans}: must be 1 or 3")
    return "L" if in_chans == 1 else "RGB"


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit / float grayscale to 8 bits (PIL's convert would clip at 255)."""
    arr = np.asarray(img, dtype=np.float64)  # [H, W]
    peak = arr.max(initial=0.0)
    if img.mode == "F" and peak <= 1.0:
        arr = arr * 255.0
    elif peak > 255.0:
        arr = arr / (257.0 if peak <= 65535.0 else peak / 255.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))  # mode "L"


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image to `mode` ("L" or "RGB"), including RGBA, palette and 16-bit."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    return img if img.mode == mode else img.convert(mode)


def pil_loader(path: str, mode: str) -> Image.Image:
    """Open an image file and convert it to `mode` (an `ImageFolder` loader)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return to_mode(img, mode)


class ModeThen:
    """Convert a PIL image to a channel mode, then apply `transform` (picklable for workers)."""

    def __init__(self, mode: str, transform: Callable | None):
        self.mode = mode
        self.transform = transform

    def __call__(self, img: Image.Image) -> Any:
        img = to_mode(img, self.mode)
        return img if self.transform is None else self.transform(img)

    def __repr__(self) -> str:
        return f"ModeThen(mode={self.mode!r}, transform={self.transform!r})"


# --------------------------------------------------------------------------------------------
# IDX files (the MNIST / Fashion-MNIST format)
# --------------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"corrupt IDX file {path}: cannot read it ({exc})") from exc


def parse_idx(raw: bytes, path: Path | str = "<bytes>", ndim: int | None = None) -> np.ndarray:
    """Parse IDX bytes into a numpy array; validate magic number, rank and size."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"corrupt IDX file {path}: bad magic number {raw[:4].hex() or '(empty)'}")
    dtype, rank = _IDX_DTYPES[raw[2]], raw[3]
    if ndim is not None and rank != ndim:
        raise ValueError(f"corrupt IDX file {path}: {rank} dimensions, expected {ndim}")
    header = 4 + 4 * rank
    if len(raw) < header:
        raise ValueError(f"corrupt IDX file {path}: truncated header")
    shape = struct.unpack(f">{rank}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"corrupt IDX file {path}: header says shape {shape} ({expected} bytes of data), "
            f"the file holds {len(raw) - header}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (plain or .gz); errors name the file."""
    path = Path(path)
    return parse_idx(_read_bytes(path), path, ndim)


@functools.lru_cache(maxsize=4)
def _load_idx_pair_cached(images: str, labels: str, stamp: tuple) -> tuple[Tensor, Tensor]:
    """Read (images [N, H, W] uint8, labels [N] int64); cached per files and mtimes."""
    img = read_idx(images, ndim=3)
    lab = read_idx(labels, ndim=1)
    if img.dtype != np.uint8:
        raise ValueError(f"corrupt IDX file {images}: pixels are {img.dtype}, expected uint8")
    if len(img) != len(lab):
        raise ValueError(f"IDX files disagree: {images} has {len(img)} images, {labels} has {len(lab)} labels")
    if len(lab) and (lab.min() < 0 or lab.max() >= len(FASHION_MNIST_CLASSES)):
        raise ValueError(f"corrupt IDX file {labels}: labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return torch.from_numpy(img), torch.from_numpy(lab.astype(np.int64))  # [N, H, W], [N]


def load_idx_pair(images: Path, labels: Path) -> tuple[Tensor, Tensor]:
    """Images [N, H, W] uint8 and labels [N] int64 from two IDX files (cached while unchanged)."""
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (images, labels))
    return _load_idx_pair_cached(str(images), str(labels), stamp)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------
class TensorImages(Dataset):
    """In-memory uint8 grayscale images `[N, H, W]` with labels; items go through PIL + transform."""

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str], in_chans: int,
                 transform: Callable | None = None):
        self.images = images  # [N, H, W] uint8
        self.targets = labels  # [N] int64
        self.classes = list(classes)
        self.mode = channel_mode(in_chans)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index].numpy())  # mode "L"
        if self.mode != "L":
            img = img.convert(self.mode)
        if self.transform is not None:
            img = self.transform(img)  # [C, img_size, img_size]
        return img, int(self.targets[index])


def _existing(folder: Path, name: str) -> Path | None:
    """`folder/name` or `folder/name.gz`, whichever exists (plain first)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_folders(cfg: DataConfig) -> list[Path]:
    """The folders searched for the IDX files, in order."""
    folders = [DEBIAN_FASHION_MNIST]
    if cfg.root:
        root = Path(cfg.root).expanduser()
        folders += [root, root / "FashionMNIST" / "raw"]
    else:
        folders.append(DEFAULT_CACHE / "FashionMNIST" / "raw")
    return folders


def _find_idx_pair(folders: list[Path], split: str) -> tuple[Path, Path] | None:
    """The first folder holding both IDX files of `split`."""
    image_name, label_name = FASHION_MNIST_FILES[split]
    for folder in folders:
        images, labels = _existing(folder, image_name), _existing(folder, label_name)
        if images and labels:
            return images, labels
    return None


def _fashion_mnist_missing(folders: list[Path], split: str, reason: str = "") -> FileNotFoundError:
    """The error that says where we looked and how to get the data."""
    names = ", ".join(f"{n}[.gz]" for n in FASHION_MNIST_FILES[split])
    looked = "\n".join(f"  - {f}" for f in folders)
    return FileNotFoundError(
        f"Fashion-MNIST ({split} split) not found: no folder holds {names}.\nLooked in:\n{looked}\n"
        + (f"{reason}\n" if reason else "")
        + "To get the data, do one of:\n"
        "  - as root: apt-get install dataset-fashion-mnist   (installs it under "
        f"{DEBIAN_FASHION_MNIST}/)\n"
        "  - put the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; .gz or plain) in the folder named by data.root\n"
        "  - set data.download: true (needs internet; torchvision downloads it)"
    )


def _download_fashion_mnist(cfg: DataConfig, split: str) -> Path:
    """Let torchvision download Fashion-MNIST; return its raw folder."""
    from torchvision.datasets import FashionMNIST

    root = Path(cfg.root).expanduser() if cfg.root else DEFAULT_CACHE
    ds = FashionMNIST(root=str(root), train=split == "train", download=True)
    return Path(ds.raw_folder)


def _locate_fashion_mnist(cfg: DataConfig, split: str) -> tuple[Path, Path]:
    """Find (or download) the IDX files of `split`."""
    folders = fashion_mnist_folders(cfg)
    found = _find_idx_pair(folders, split)
    if found:
        return found
    if not cfg.download:
        raise _fashion_mnist_missing(folders, split, "data.download is false, so nothing was downloaded.")
    try:
        raw = _download_fashion_mnist(cfg, split)
    except (OSError, RuntimeError) as exc:  # no internet: URLError (an OSError) or RuntimeError
        raise _fashion_mnist_missing(folders, split, f"The download failed: {exc}") from exc
    found = _find_idx_pair([raw], split)
    if not found:
        raise _fashion_mnist_missing(folders + [raw], split, "The download left no IDX files.")
    return found


def fashion_mnist(cfg: DataConfig, split: str, transform: Callable | None) -> TensorImages:
    """Fashion-MNIST `split` as an in-memory dataset."""
    images, labels = load_idx_pair(*_locate_fashion_mnist(cfg, split))  # [N, 28, 28], [N]
    return TensorImages(images, labels, FASHION_MNIST_CLASSES, cfg.in_chans, transform)


# --------------------------------------------------------------------------------------------
# CIFAR-10 and ImageFolder
# --------------------------------------------------------------------------------------------
def cifar10(cfg: DataConfig, split: str, transform: Callable | None) -> Dataset:
    """torchvision's CIFAR-10, converted to `in_chans` before the transform."""
    from torchvision.datasets import CIFAR10

    root = Path(cfg.root).expanduser() if cfg.root else DEFAULT_CACHE
    try:
        return CIFAR10(root=str(root), train=split == "train", download=cfg.download,
                       transform=ModeThen(channel_mode(cfg.in_chans), transform))
    except (OSError, RuntimeError) as exc:
        raise FileNotFoundError(
            f"CIFAR-10 not found under {root} (data.root = {cfg.root!r}"
            f"{'; empty means ' + str(DEFAULT_CACHE) if not cfg.root else ''}). Expected layout: "
            f"{root}/cifar-10-batches-py/ with data_batch_1..data_batch_5, test_batch and batches.meta "
            "(the python version from https://www.cs.toronto.edu/~kriz/cifar.html, unpacked). "
            f"Set data.download: true (needs internet) to let torchvision fetch it. Cause: {exc}"
        ) from exc


class BadImageError(OSError):
    """An image file that cannot be opened or decoded; the message names the file."""


# What PIL raises for unreadable files: UnidentifiedImageError and "image file is truncated"
# are OSErrors; some decoders raise SyntaxError, ValueError, EOFError or struct.error.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


class CheckedImageFolder(ImageFolder):
    """`ImageFolder` whose unreadable images raise `BadImageError`, or with `skip_bad` are
    replaced by the next readable one (index + 1, + 2, ... modulo len) and counted.

    The count lives in a shared-memory tensor, so skips in DataLoader workers show in the main
    process (concurrent increments from several workers may rarely lose one).
    """

    def __init__(self, root: str, transform: Callable | None, loader: Callable[[str], Any],
                 skip_bad: bool = False):
        super().__init__(root, transform=transform, loader=loader)
        self.skip_bad = skip_bad
        self.skipped = torch.zeros((), dtype=torch.int64).share_memory_()  # [] images skipped
        self._warned: set[str] = set()  # files already reported by this process

    def load(self, path: str) -> Any:
        """The loader's image for `path`; `BadImageError` when the file cannot be read."""
        try:
            return self.loader(path)
        except _DECODE_ERRORS as exc:
            raise BadImageError(
                f"cannot read image {path}: {type(exc).__name__}: {exc} "
                "(set data.skip_bad: true to skip such files instead)"
            ) from exc

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for step in range(n):
            path, target = self.samples[(index + step) % n]
            try:
                sample = self.load(path)
            except BadImageError as exc:
                if not self.skip_bad:
                    raise
                self.skipped += 1
                if path not in self._warned:
                    self._warned.add(path)
                    cause = exc.__cause__
                    print(f"pemae: skipping unreadable image {path} ({type(cause).__name__}: {cause})",
                          file=sys.stderr)
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            return sample, target
        raise BadImageError(f"imagefolder {self.root}: none of its {n} images can be read "
                            "(data.skip_bad: true skipped them all)")


def image_folder(cfg: DataConfig, split: str, transform: Callable | None) -> CheckedImageFolder:
    """An ImageNet-layout folder: `root/train/<class>/*` and `root/val/<class>/*` ("test" = val)."""
    if not cfg.root:
        raise ConfigError("data.root: required for dataset 'imagefolder' (a folder with train/ and val/)")
    folder = Path(cfg.root).expanduser() / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"imagefolder: missing folder {folder} (data.root = {cfg.root!r}); expected the ImageNet "
            "layout <root>/train/<class>/<image> and <root>/val/<class>/<image>"
        )
    loader = functools.partial(pil_loader, mode=channel_mode(cfg.in_chans))
    return CheckedImageFolder(str(folder), transform, loader, skip_bad=cfg.skip_bad)


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
