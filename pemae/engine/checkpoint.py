"""Checkpoints of tensors and plain dicts, readable with `torch.load(weights_only=True)`."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import timm
import torch
from torch import nn

from pemae.config.schema import Config
from pemae.models.encoder import TIMM_ARCH, encoder_kwargs


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file that exists but cannot be read (truncated, zero-filled, bit-flipped); the
    message names the file and the reason."""


# What zipfile raises on a damaged archive, and what torch.load raises on bytes it cannot parse
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError,
               zlib.error, struct.error)
_TORCH_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError,
                      IndexError, zipfile.BadZipFile)


def damage(path: str | Path) -> str | None:
    """Why the checkpoint file `path` is damaged, or None when it is intact.

    torch.save writes a zip archive that records a CRC-32 of every member; checking them finds a
    truncated or overwritten file and also a flipped bit in the tensor data, which torch.load
    would otherwise read without complaint. Reads the whole file once.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            corrupt_member = archive.testzip()
    except _ZIP_ERRORS as err:
        return f"not a valid checkpoint archive ({err}); the file was truncated or overwritten"
    if corrupt_member is not None:
        return f"{corrupt_member} fails its CRC-32 check: the bytes changed after they were written"
    return None


def _first_sentence(err: Exception) -> str:
    """The first sentence of an error's message (torch's run on for a paragraph), at most 200 chars."""
    text = str(err).strip()
    return text.split(". ")[0].splitlines()[0][:200] if text else "(no message)"


def save_atomic(obj: dict, path: str | Path, previous: str | Path | None = None) -> None:
    """torch.save to a temporary file beside `path`, then rename: never a half-written file.

    With `previous`, the checkpoint `path` held is first moved there when it is intact (a damaged
    one is overwritten, and `previous` keeps the older good one): a later damaged `path` leaves
    `previous` to fall back to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        if previous is not None and path.is_file() and damage(path) is None:
            os.replace(path, previous)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint at `path` (`torch.load(weights_only=True)`). A missing file raises
    FileNotFoundError, an unreadable one DamagedCheckpointError; both name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (run the pretraining stage first)")
    reason = damage(path)
    if reason is None:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except _TORCH_LOAD_ERRORS as err:
            reason = f"torch.load failed with {type(err).__name__}: {_first_sentence(err)}"
    raise DamagedCheckpointError(f"checkpoint {path} is unreadable: {reason}")


def export_encoder(encoder: nn.Module, cfg: Config, path: str | Path) -> None:
    """Save the encoder alone, with what `timm.create_model` needs to rebuild it."""
    save_atomic(
        {
            "arch": TIMM_ARCH,
            "kwargs": encoder_kwargs(cfg.model, cfg.data),
            "state_dict": encoder.state_dict(),
        },
        path,
    )


def load_encoder(path: str | Path) -> nn.Module:
    """Rebuild an exported encoder as a timm ViT without a head (strict load)."""
    blob = load(path)
    vit = timm.create_model(blob["arch"], pretrained=False, num_classes=0, **blob["kwargs"])
    vit.load_state_dict(blob["state_dict"], strict=True)
    return vit
