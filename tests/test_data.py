"""Tests for `pemae.data.datasets` on real files the tests write to disk (no mocks of the readers)."""

from __future__ import annotations

import gzip
import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import Subset
from torchvision.transforms import v2

from pemae.config.params import build_config
from pemae.config.schema import ConfigError
from pemae.data import datasets, images, sources, transforms

N_TRAIN, N_TEST = 20, 10


# --------------------------------------------------------------------------------------------
# Helpers: configs, transforms and fake datasets on disk
# --------------------------------------------------------------------------------------------
def data_cfg(**values):
    """A validated `DataConfig` from the default preset with `values` overridden (no validation
    split unless `val_fraction` is given, so "train" is the whole training set)."""
    values.setdefault("val_fraction", 0.0)
    return build_config("default", {"data": values}).data


def as_uint8(img: Image.Image) -> torch.Tensor:
    """Identity transform: the PIL image's exact pixels as uint8 `[C, H, W]`."""
    return v2.functional.pil_to_tensor(img)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def fake_fashion_mnist(folder: Path, gz: bool = True, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the four IDX files of a small Fashion-MNIST; return {split: (images, labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)  # [N, 28, 28]
        labels = (np.arange(n) % 10).astype(np.uint8)  # [N]
        image_name, label_name = sources.FASHION_MNIST_FILES[split]
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{image_name}{suffix}", images)
        write_idx(folder / f"{label_name}{suffix}", labels)
        written[split] = (images, labels)
    return written


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Point the Debian Fashion-MNIST folder at an empty place so only data.root is used."""
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(sources, "DEFAULT_CACHE", tmp_path / "no-cache")


def fake_cifar10(root: Path, per_batch: int = 4, n_test: int = 6) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write a tiny `cifar-10-batches-py` in the real pickle format; return {split: (data, labels)}.

    The real files are Python 2 pickles whose str keys load as str under torchvision's
    `encoding="latin1"`, so the keys here are str ("data", "labels"), not bytes.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_data, train_labels = [], []
    for i in range(1, 6):
        batch = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)  # [N, 3*32*32]
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {i} of 5", "data": batch, "labels": labels}, f)
        train_data.append(batch)
        train_labels += labels
    test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)  # [N, 3072]
    test_labels = [int(v) for v in rng.integers(0, 10, size=n_test)]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "data": test, "labels": test_labels}, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return {"train": (np.concatenate(train_data), train_labels), "test": (test, test_labels)}


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """torchvision checks the real files' md5 (in `_check_integrity` and `_load_meta`), which
    fake files cannot match: replace its `check_integrity` by a plain existence check."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())


def write_image_folder(root: Path) -> None:
    """An ImageNet-layout folder: train/ and val/, classes cat and dog, mixed modes and sizes."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
            Image.fromarray(rng.integers(0, 256, (70, 30), dtype=np.uint8)).save(folder / "gray.png")
            Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)).save(folder / "rgba.png")
            Image.fromarray(rng.integers(0, 256, (90, 120), dtype=np.uint8)).convert("P").save(folder / "pal.png")


# --------------------------------------------------------------------------------------------
# Fashion-MNIST: the IDX reader and the search order
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_round_trip(tmp_path, no_debian, gz, layout):
    folder = tmp_path / "fm" if layout == "flat" else tmp_path / "fm" / "FashionMNIST" / "raw"
    written = fake_fashion_mnist(folder, gz=gz)
    cfg = data_cfg(root=str(tmp_path / "fm"), download=False)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        ds = datasets.build_dataset(cfg, split, as_uint8)
        assert len(ds) == n and datasets.num_classes(ds) == 10
        images, labels = written[split]
        for i in range(n):
            x, y = ds[i]
            assert x.shape == (1, 28, 28) and x.dtype == torch.uint8
            assert torch.equal(x[0], torch.from_numpy(images[i]))
            assert isinstance(y, int) and y == labels[i]


def test_fashion_mnist_three_channels(tmp_path, no_debian):
    written = fake_fashion_mnist(tmp_path)
    cfg = data_cfg(root=str(tmp_path), in_chans=3, download=False)
    x, _ = datasets.build_dataset(cfg, "train", as_uint8)[3]
    assert x.shape == (3, 28, 28)  # grey repeated into R, G and B
    for c in range(3):
        assert torch.equal(x[c], torch.from_numpy(written["train"][0][3]))


def test_debian_folder_comes_first(tmp_path, monkeypatch):
    debian = fake_fashion_mnist(tmp_path / "debian", seed=1)
    fake_fashion_mnist(tmp_path / "root", seed=2)
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    x, _ = datasets.build_dataset(data_cfg(root=str(tmp_path / "root")), "test", as_uint8)[0]
    assert torch.equal(x[0], torch.from_numpy(debian["test"][0][0]))


def test_idx_bad_magic_names_file(tmp_path, no_debian):
    fake_fashion_mnist(tmp_path, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34" + bad.read_bytes()[2:])
    with pytest.raises(ValueError, match="magic") as err:
        datasets.build_dataset(data_cfg(root=str(tmp_path), download=False), "train", None)
    assert str(bad) in str(err.value)


def test_idx_truncated_and_bad_gzip(tmp_path):
    path = tmp_path / "short-idx1-ubyte"
    write_idx(path, np.zeros(10, dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="short-idx1-ubyte"):
        sources.read_idx(path)
    gz = tmp_path / "broken.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="broken.gz"):
        sources.read_idx(gz)
    write_idx(path, np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="dimensions"):
        sources.read_idx(path, ndim=1)


def test_fashion_mnist_missing_says_how(tmp_path, no_debian):
    cfg = data_cfg(root=str(tmp_path / "empty"), download=False)
    with pytest.raises(FileNotFoundError) as err:
        datasets.build_dataset(cfg, "train", None)
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "data.root" in msg and "data.download: true" in msg
    for folder in (tmp_path / "no-debian", tmp_path / "empty", tmp_path / "empty" / "FashionMNIST" / "raw"):
        assert str(folder) in msg


def test_fashion_mnist_download_reads_raw_files(tmp_path, no_debian, monkeypatch):
    """data.download: torchvision's downloader runs, then its raw IDX files are read.
    The network part is replaced by writing the files where torchvision would put them."""
    written = {}

    def fake_download(self):
        written.update(fake_fashion_mnist(Path(self.raw_folder), gz=False))

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", fake_download)
    ds = datasets.build_dataset(data_cfg(root=str(tmp_path / "dl"), download=True), "test", as_uint8)
    assert len(ds) == N_TEST
    assert torch.equal(ds[5][0][0], torch.from_numpy(written["test"][0][5]))


def test_fashion_mnist_download_failure_says_how(tmp_path, no_debian, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        datasets.build_dataset(data_cfg(root=str(tmp_path), download=True), "train", None)
    assert "no internet" in str(err.value)


def test_real_fashion_mnist():
    if not sources.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip(f"{sources.DEBIAN_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)")
    cfg = data_cfg(download=False)
    train = datasets.build_dataset(cfg, "train", transforms.pretrain_transform(cfg))
    test = datasets.build_dataset(cfg, "test", transforms.eval_transform(cfg))
    assert (len(train), len(test)) == (60000, 10000)
    assert datasets.num_classes(train) == datasets.num_classes(test) == 10
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    x, y = test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------
def test_cifar10_fake_batches(tmp_path, skip_cifar_md5):
    written = fake_cifar10(tmp_path)
    cfg = data_cfg(dataset="cifar10", root=str(tmp_path), in_chans=3, img_size=32, download=False)
    for split in ("train", "test"):
        ds = datasets.build_dataset(cfg, split, as_uint8)
        pixels, labels = written[split]
        assert len(ds) == len(labels) and datasets.num_classes(ds) == 10
        x, y = ds[1]
        assert torch.equal(x, torch.from_numpy(pixels[1].reshape(3, 32, 32)))  # [3, 32, 32]
        assert y == labels[1]
    gray = data_cfg(dataset="cifar10", root=str(tmp_path), in_chans=1, img_size=32, download=False)
    x, _ = datasets.build_dataset(gray, "test", transforms.pretrain_transform(gray))[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32


def test_cifar10_missing_names_root_and_layout(tmp_path):
    cfg = data_cfg(dataset="cifar10", root=str(tmp_path / "nothing"), in_chans=3, img_size=32, download=False)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as err:
        datasets.build_dataset(cfg, "train", None)
    assert "data.root" in str(err.value) and str(tmp_path / "nothing") in str(err.value)


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("img_size", [32, 80])
def test_image_folder_shapes_and_labels(tmp_path, in_chans, img_size):
    write_image_folder(tmp_path)
    cfg = data_cfg(dataset="imagefolder", root=str(tmp_path), in_chans=in_chans, img_size=img_size)
    for split, make in (("train", transforms.pretrain_transform), ("train", transforms.finetune_transform),
                        ("test", transforms.eval_transform)):
        ds = datasets.build_dataset(cfg, split, make(cfg))
        assert len(ds) == 8 and datasets.num_classes(ds) == 2
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (in_chans, img_size, img_size) and x.dtype == torch.float32
            assert y == ["cat", "dog"].index(Path(ds.samples[i][0]).parent.name)


def test_datasets_pickle_for_worker_processes(tmp_path, no_debian, skip_cifar_md5):
    """DataLoader workers started with spawn pickle the dataset and its transform."""
    write_image_folder(tmp_path / "inet")
    fake_fashion_mnist(tmp_path / "fm")
    fake_cifar10(tmp_path / "cifar")
    cfgs = [data_cfg(dataset="imagefolder", root=str(tmp_path / "inet"), in_chans=1),
            data_cfg(root=str(tmp_path / "fm"), train_subset=5),
            data_cfg(dataset="cifar10", root=str(tmp_path / "cifar"), in_chans=3, img_size=32, download=False)]
    for cfg in cfgs:
        ds = datasets.build_dataset(cfg, "train", transforms.eval_transform(cfg))
        copy = pickle.loads(pickle.dumps(ds))
        assert torch.equal(copy[0][0], ds[0][0]) and copy[0][1] == ds[0][1]


def test_image_folder_missing_val(tmp_path):
    write_image_folder(tmp_path)
    for cls in ("cat", "dog"):
        for f in (tmp_path / "val" / cls).iterdir():
            f.unlink()
        (tmp_path / "val" / cls).rmdir()
    (tmp_path / "val").rmdir()
    cfg = data_cfg(dataset="imagefolder", root=str(tmp_path), in_chans=3, img_size=32)
    assert len(datasets.build_dataset(cfg, "train", None)) == 8
    with pytest.raises(FileNotFoundError, match="val") as err:
        datasets.build_dataset(cfg, "test", None)
    assert str(tmp_path / "val") in str(err.value)


def test_sixteen_bit_images_are_scaled_not_clipped():
    img = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))  # [1, 3] mode I;16
    assert np.asarray(images.to_mode(img, "L")).tolist() == [[0, 100, 255]]
    assert np.asarray(images.to_mode(img, "RGB"))[0, 1].tolist() == [100, 100, 100]


# --------------------------------------------------------------------------------------------
# Subsets and bad input
# --------------------------------------------------------------------------------------------
def test_subsets_are_fixed_and_sized(tmp_path, no_debian):
    fake_fashion_mnist(tmp_path)
    cfg = data_cfg(root=str(tmp_path), train_subset=7, test_subset=3)
    a = datasets.build_dataset(cfg, "train", as_uint8)
    b = datasets.build_dataset(cfg, "train", None)
    assert isinstance(a, Subset) and len(a) == 7 and len(datasets.build_dataset(cfg, "test", None)) == 3
    assert a.indices == b.indices == sorted(a.indices) and len(set(a.indices)) == 7
    expected = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(0))[:7].sort().values
    assert a.indices == expected.tolist()
    assert datasets.num_classes(a) == 10
    assert len(datasets.build_dataset(data_cfg(root=str(tmp_path)), "train", None)) == N_TRAIN  # 0 = all


@pytest.mark.parametrize("key", ["train_subset", "test_subset"])
def test_subset_too_large(tmp_path, no_debian, key):
    fake_fashion_mnist(tmp_path)
    cfg = data_cfg(root=str(tmp_path), **{key: 1000})
    with pytest.raises(ConfigError, match=f"data.{key}"):
        datasets.build_dataset(cfg, key.split("_")[0], None)


def test_unknown_split(tmp_path, no_debian):
    fake_fashion_mnist(tmp_path)
    with pytest.raises(ValueError, match="'validation'"):
        datasets.build_dataset(data_cfg(root=str(tmp_path)), "validation", None)


# --------------------------------------------------------------------------------------------
# Transforms and normalisation
# --------------------------------------------------------------------------------------------
def test_normalisation_choices():
    assert transforms.normalisation(data_cfg()) == ([0.2860], [0.3530])
    assert transforms.normalisation(data_cfg(mean=[0.5], std=[0.25])) == ([0.5], [0.25])
    mean, std = transforms.normalisation(data_cfg(dataset="imagefolder", root="x", in_chans=1))
    assert mean == pytest.approx([(0.485 + 0.456 + 0.406) / 3]) and std == pytest.approx([(0.229 + 0.224 + 0.225) / 3])
    assert transforms.normalisation(data_cfg(dataset="cifar10", in_chans=3)) == transforms.DATASET_STATS["cifar10"]


def test_pretrain_transform_shape_and_dtype():
    cfg = data_cfg(in_chans=3, img_size=32)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    x = transforms.pretrain_transform(cfg)(img)
    assert type(x) is torch.Tensor and x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_eval_transform_is_deterministic():
    rng = np.random.default_rng(0)
    for size, shape in ((28, (28, 28)), (28, (50, 33)), (96, (120, 150))):
        cfg = data_cfg(img_size=size)
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        tf = transforms.eval_transform(cfg)
        a, b = tf(img), tf(img)
        assert a.shape == (1, size, size) and torch.equal(a, b)


def test_denormalise_inverts_normalise():
    cfg = data_cfg(dataset="cifar10", in_chans=3, img_size=32)
    images = torch.rand(4, 3, 32, 32)  # [B, C, H, W] in [0, 1]
    mean, std = transforms.normalisation(cfg)
    normalised = v2.functional.normalize(images, mean, std)  # [B, C, H, W]
    assert torch.allclose(transforms.denormalise(normalised, cfg), images, atol=1e-6)
    assert transforms.denormalise(normalised * 10, cfg).min() >= 0 and transforms.denormalise(normalised * 10, cfg).max() <= 1
    # on a whole pipeline: the eval transform at the native size is resize-free
    img = Image.fromarray((images[0].permute(1, 2, 0) * 255).round().byte().numpy())  # [32, 32, 3]
    x = transforms.eval_transform(cfg)(img)  # [3, 32, 32]
    assert torch.allclose(transforms.denormalise(x[None], cfg)[0], as_uint8(img) / 255.0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The validation split
# --------------------------------------------------------------------------------------------
def _items(dataset) -> list[bytes]:
    """Each item's exact pixels, to compare splits by content, not by index."""
    return [dataset[i][0].numpy().tobytes() for i in range(len(dataset))]


def test_val_split_is_disjoint_from_train_fixed_and_complete(tmp_path, no_debian):
    fake_fashion_mnist(tmp_path)
    cfg = data_cfg(root=str(tmp_path), val_fraction=0.25, split_seed=3)
    train, val = (datasets.build_dataset(cfg, s, as_uint8) for s in ("train", "val"))
    assert (len(train), len(val)) == (15, 5)  # round(0.25 * 20) held out
    whole = _items(datasets.build_dataset(data_cfg(root=str(tmp_path)), "train", as_uint8))
    assert sorted(_items(train) + _items(val)) == sorted(whole)  # nothing lost, nothing twice
    assert not set(_items(train)) & set(_items(val))
    again = datasets.build_dataset(cfg, "val", as_uint8)
    assert again.indices == val.indices  # fixed by split_seed
    other = datasets.build_dataset(data_cfg(root=str(tmp_path), val_fraction=0.25, split_seed=4), "val", None)
    assert other.indices != val.indices
    assert len(datasets.build_dataset(cfg, "test", None)) == N_TEST  # the test split is untouched


def test_val_split_is_taken_from_the_training_subset(tmp_path, no_debian):
    fake_fashion_mnist(tmp_path)
    cfg = data_cfg(root=str(tmp_path), train_subset=10, val_fraction=0.1)
    train, val = (datasets.build_dataset(cfg, s, as_uint8) for s in ("train", "val"))
    subset = _items(datasets.build_dataset(data_cfg(root=str(tmp_path), train_subset=10), "train", as_uint8))
    assert (len(train), len(val)) == (9, 1)
    assert sorted(_items(train) + _items(val)) == sorted(subset)
    assert datasets.num_classes(val) == 10


def test_no_val_split_is_named_when_asked_for(tmp_path, no_debian):
    fake_fashion_mnist(tmp_path)
    with pytest.raises(ConfigError, match="data.val_fraction = 0"):
        datasets.build_dataset(data_cfg(root=str(tmp_path)), "val", None)
    with pytest.raises(ConfigError, match=r"data.val_fraction"):
        data_cfg(val_fraction=1.0)


@pytest.mark.parametrize("n, fraction, expected", [(20, 0.1, 2), (20, 0.01, 1), (2, 0.9, 1), (1, 0.5, 0)])
def test_train_val_indices_sizes(n, fraction, expected):
    train, val = datasets.train_val_indices(n, fraction, seed=0)
    assert len(val) == expected and len(train) == n - expected
    assert sorted(train + val) == list(range(n))


@pytest.mark.parametrize("in_chans, img_size, shape, hflip, min_scale", [
    (1, 28, (28, 28), True, 0.2),  # the default: Fashion-MNIST as it is
    (1, 32, (8, 8), True, 0.2),  # digits, upsampled
    (3, 32, (30, 45), False, 0.08),  # RGB, not square, no flip
    (3, 24, (64, 64), True, 1.0),  # downsampled, no scale jitter
])
def test_pretraining_augmentation_is_torchvisions_bit_for_bit(in_chans, img_size, shape, hflip, min_scale):
    """`CropFlipNormalise` is the v2 pipeline it replaces: the same tensors and the same RNG use."""
    cfg = data_cfg(img_size=img_size, in_chans=in_chans, hflip=hflip, mean=[0.3] * in_chans,
                   std=[0.2] * in_chans)
    reference = v2.Compose(transforms._random_crop_flip(cfg, min_scale) + transforms._to_normalised_tensor(cfg))
    fast = transforms.CropFlipNormalise(cfg, min_scale)
    rng = np.random.default_rng(0)
    mode = "L" if in_chans == 1 else "RGB"
    for seed in range(200):
        pixels = rng.integers(0, 256, size=shape + ((3,) if in_chans == 3 else ()), dtype=np.uint8)
        img = Image.fromarray(pixels).convert(mode)
        outs = []
        for transform in (reference, fast):
            torch.manual_seed(seed)
            outs.append((transform(img), torch.rand(1)))  # the image, then the RNG's next draw
        (want, next_want), (got, next_got) = outs
        assert got.shape == (in_chans, img_size, img_size) and got.dtype == torch.float32
        assert torch.equal(got, want) and torch.equal(next_got, next_want), seed
    tensor = v2.functional.pil_to_tensor(img)  # [C, H, W] uint8: v2's tensor path, as before
    torch.manual_seed(0)
    want = reference(tensor)
    torch.manual_seed(0)
    assert torch.equal(fast(tensor), want)


# --------------------------------------------------------------------------------------------
# Evaluation batches: whole uint8 batches converted at once, the DataLoader's tensors exactly
# --------------------------------------------------------------------------------------------
def loader_batches(dataset, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(torch.utils.data.DataLoader(dataset, batch_size=batch))


@pytest.mark.parametrize("split, values", [
    ("train", {}),
    ("train", {"val_fraction": 0.3, "train_subset": 16}),  # a subset of a subset
    ("val", {"val_fraction": 0.3}),
    ("test", {"test_subset": 7}),
])
def test_eval_batches_are_the_dataloaders_tensors_bit_for_bit(tmp_path, no_debian, split, values):
    fake_fashion_mnist(tmp_path)
    cfg = data_cfg(root=str(tmp_path), download=False, **values)
    dataset = datasets.build_dataset(cfg, split, transforms.eval_transform(cfg))
    shard = Subset(dataset, range(1, len(dataset)))  # as a process shard wraps it once more
    for ds in (dataset, shard):
        fast = datasets.eval_batches(ds, 4)
        assert isinstance(fast, datasets.TensorBatches)
        expected = loader_batches(ds, 4)
        got = list(fast)
        assert len(fast) == len(got) == len(expected)
        for (x, y), (x_ref, y_ref) in zip(got, expected):
            assert x.dtype == x_ref.dtype and y.dtype == y_ref.dtype
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


@pytest.mark.parametrize("values", [{"img_size": 32}, {"in_chans": 3}])
def test_eval_batches_fall_back_to_a_dataloader_where_the_transform_does_more(tmp_path, no_debian, values):
    fake_fashion_mnist(tmp_path)
    cfg = data_cfg(root=str(tmp_path), download=False, **values)
    dataset = datasets.build_dataset(cfg, "test", transforms.eval_transform(cfg))  # resized, or converted to RGB
    batches = datasets.eval_batches(dataset, 4)
    assert isinstance(batches, torch.utils.data.DataLoader)
    x, _ = next(iter(batches))
    assert x.shape == (4, cfg.in_chans, cfg.img_size, cfg.img_size)
