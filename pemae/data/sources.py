"""The built-in data sets: Fashion-MNIST read from its IDX files (found on the machine, else
downloaded when `data.download`) and CIFAR-10."""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from pemae.config.schema import DataConfig
from pemae.data.images import ModeThen, channel_mode


# --------------------------------------------------------------------------------------------
# Constants (module level so tests can point them elsewhere)
# --------------------------------------------------------------------------------------------
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt `dataset-fashion-mnist`
DEFAULT_CACHE = Path("~/.cache/pemae").expanduser()  # torchvision downloads when data.root = ""

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_FILES = {  # split -> (images, labels), without the optional ".gz"
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_IDX_DTYPES = {  # IDX type code -> big-endian numpy dtype
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


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
