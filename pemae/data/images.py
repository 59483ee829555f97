"""Image folders: channel conversion to the configured grayscale or RGB, and a checked ImageFolder
that names an unreadable file (and skips it when `data.skip_bad`) instead of failing mid-epoch."""

from __future__ import annotations

import functools
import struct
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from pemae.config.schema import ConfigError, DataConfig


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
