"""Unreadable images in the `imagefolder` dataset: a clear error naming the file, or skip and count."""

from __future__ import annotations

import io
import pickle
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from pemae.config.params import build_config
from pemae.data import datasets, transforms
from pemae.data.datasets import skipped_images
from pemae.data.images import BadImageError

IMG_SIZE = 32


# --------------------------------------------------------------------------------------------
# Helpers: an ImageNet-layout folder with good and bad files
# --------------------------------------------------------------------------------------------
def jpeg_bytes(seed: int, size: int = 40) -> bytes:
    """A valid JPEG of random pixels (noise, so its scan data is large)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)  # [H, W, 3]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


BAD_FILES = {
    "truncated": lambda: jpeg_bytes(99)[: len(jpeg_bytes(99)) // 2],
    "garbage": lambda: np.random.default_rng(7).bytes(600),
    "empty": lambda: b"",
}


def write_folder(root: Path, per_class: int = 3) -> None:
    """`root/{train,val}/{cat,dog}/img<i>.jpg`, all readable."""
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"img{i}.jpg").write_bytes(jpeg_bytes(100 * c + i))


def write_bad(root: Path) -> list[Path]:
    """Two bad train files: a truncated JPEG mid-class and garbage as the very last sample."""
    bad = [root / "train" / "cat" / "img1_cut.jpg", root / "train" / "dog" / "zz_garbage.jpg"]
    bad[0].write_bytes(BAD_FILES["truncated"]())
    bad[1].write_bytes(BAD_FILES["garbage"]())
    return bad


def data_cfg(root: Path, **values):
    """The tiny preset's `DataConfig` for an imagefolder at `root`, with `values` on top."""
    base = {"dataset": "imagefolder", "root": str(root), "img_size": IMG_SIZE, "in_chans": 3,
            "train_subset": 0, "test_subset": 0, "download": False, "val_fraction": 0.0}
    return build_config("tiny", {"data": {**base, **values}, "pretrain": {"device": "cpu"}}).data


def train_set(root: Path, transform: bool = True, **values):
    cfg = data_cfg(root, **values)
    return datasets.build_dataset(cfg, "train", transforms.pretrain_transform(cfg) if transform else None)


def check_items(items: list, n: int) -> None:
    assert len(items) == n
    for x, y in items:
        assert x.shape == (3, IMG_SIZE, IMG_SIZE) and x.dtype == torch.float32
        assert y in (0, 1)


def loader(ds) -> DataLoader:
    return DataLoader(ds, batch_size=2, num_workers=2)


def loader_error(ds) -> tuple[type, str]:
    """Iterate `ds` through DataLoader workers; the type and text of the error it raised.

    The traceback's frames are cleared so the iterator goes away at once: one left in the
    reference cycle that DataLoader's re-raise makes takes 10 s to stop its workers at garbage
    collection.
    """
    try:
        for _ in loader(ds):
            pass
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        traceback.clear_frames(exc.__traceback__)
        return type(exc), str(exc)
    raise AssertionError("the DataLoader raised nothing")


# --------------------------------------------------------------------------------------------
# skip_bad false: stop with the file's path
# --------------------------------------------------------------------------------------------
def test_bad_files_in_setup_are_really_bad():
    """The helpers' bad bytes fail in PIL the way real damaged files do."""
    with pytest.raises(OSError, match="truncated"):
        Image.open(io.BytesIO(BAD_FILES["truncated"]())).load()
    for kind in ("garbage", "empty"):
        with pytest.raises(OSError):
            Image.open(io.BytesIO(BAD_FILES[kind]()))


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_image_raises_with_path(tmp_path, kind):
    write_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / f"img1_{kind}.jpg"
    bad.write_bytes(BAD_FILES[kind]())
    ds = train_set(tmp_path)
    with pytest.raises(BadImageError) as err:
        for _ in ds:
            pass
    msg = str(err.value)
    assert str(bad) in msg and "data.skip_bad: true" in msg
    assert isinstance(err.value, OSError) and isinstance(err.value.__cause__, OSError)
    assert skipped_images(ds) == 0
    # the good images before it still load
    bad_index = [p for p, _ in ds.samples].index(str(bad))
    check_items([ds[i] for i in range(bad_index)], bad_index)


def test_bad_image_error_through_dataloader_workers(tmp_path):
    write_folder(tmp_path)
    bad = write_bad(tmp_path)
    kind, text = loader_error(train_set(tmp_path))
    assert kind is BadImageError
    assert "DataLoader worker" in text and any(str(p) in text for p in bad)
    assert "skip_bad" in text


# --------------------------------------------------------------------------------------------
# skip_bad true: the next readable image stands in, the skips are counted
# --------------------------------------------------------------------------------------------
def test_skip_bad_iterates_everything_and_counts(tmp_path, capsys):
    write_folder(tmp_path)
    bad = write_bad(tmp_path)
    ds = train_set(tmp_path, skip_bad=True)
    assert len(ds) == 8 and skipped_images(ds) == 0
    check_items(list(ds), 8)
    assert skipped_images(ds) == 2
    check_items(list(ds), 8)
    assert skipped_images(ds) == 4
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("pemae: skipping unreadable image ")]
    assert len(warnings) == 2  # once per file
    for p in bad:
        assert sum(f" image {p} (" in line for line in warnings) == 1
    assert "truncated" in err and "UnidentifiedImageError" in err


def test_skip_bad_takes_the_next_readable_image(tmp_path):
    write_folder(tmp_path)
    write_bad(tmp_path)
    ds = train_set(tmp_path, transform=False, skip_bad=True)
    paths = [Path(p).name for p, _ in ds.samples]
    cut, last = paths.index("img1_cut.jpg"), len(paths) - 1
    assert paths[last] == "zz_garbage.jpg"

    def pixels(i: int) -> np.ndarray:
        return np.asarray(ds[i][0])

    assert np.array_equal(pixels(cut), pixels(cut + 1))  # replaced by the next one
    assert ds[cut][1] == 0 and not np.array_equal(pixels(cut), pixels(cut - 1))
    assert np.array_equal(pixels(last), pixels(0)) and ds[last][1] == 0  # wraps around
    assert ds[-1][1] == 0  # negative indices too
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_skip_bad_counts_across_dataloader_workers(tmp_path):
    write_folder(tmp_path)
    write_bad(tmp_path)
    ds = train_set(tmp_path, skip_bad=True)
    items = [(x, int(y)) for xb, yb in loader(ds) for x, y in zip(xb, yb)]
    check_items(items, 8)
    assert skipped_images(ds) == 2  # counted in the workers, seen here
    copy = pickle.loads(pickle.dumps(ds))
    check_items([copy[i] for i in range(len(copy))], 8)


def test_skipped_images_through_subset_and_wrappers(tmp_path):
    write_folder(tmp_path)
    bad = write_bad(tmp_path)
    ds = train_set(tmp_path, skip_bad=True, train_subset=7)
    assert isinstance(ds, Subset)
    bad_indices = {ds.dataset.samples.index((str(p), label)) for p, label in zip(bad, (0, 1))}
    expected = len(bad_indices & set(ds.indices))
    assert expected >= 1  # the subset holds a bad file, so the test means something
    check_items([ds[i] for i in range(len(ds))], 7)
    assert skipped_images(ds) == expected
    assert skipped_images(SimpleNamespace(dataset=SimpleNamespace(dataset=ds))) == expected
    assert skipped_images(Subset(list(range(3)), [0, 1])) == 0
    assert skipped_images(train_set(tmp_path, skip_bad=True)) == 0  # a fresh dataset, a fresh count


def test_all_bad_with_skip_raises_not_hangs(tmp_path):
    for cls in ("cat", "dog"):
        folder = tmp_path / "train" / cls
        folder.mkdir(parents=True)
        for i, kind in enumerate(sorted(BAD_FILES)):
            (folder / f"img{i}.jpg").write_bytes(BAD_FILES[kind]())
    ds = train_set(tmp_path, skip_bad=True)
    with pytest.raises(BadImageError, match="none of its 6 images"):
        ds[2]
    assert skipped_images(ds) == 6
