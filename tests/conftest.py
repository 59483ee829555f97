"""Shared fixtures: tiny configs and one tiny pretraining run reused by several test modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from pemae.config.params import build_config
from pemae.config.schema import Config
from pemae.data import datasets, sources


def fashion_mnist_installed() -> bool:
    """True when the Debian Fashion-MNIST files (both splits) are on disk."""
    folder = sources.DEBIAN_FASHION_MNIST
    return all(sources._find_idx_pair([folder], split) for split in datasets.SOURCE_SPLITS)


needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_installed(),
    reason=f"real Fashion-MNIST not installed under {sources.DEBIAN_FASHION_MNIST} "
    "(apt-get install dataset-fashion-mnist)",
)


def study_script(name: str):
    """A script of study/ (study/<name>.py) loaded as a module, for its functions."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "study" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(**sections) -> Config:
    """The `tiny` preset on the CPU, never downloading, with `sections` merged on top.

    A test that sizes the training set itself (`data={"train_subset": N}`) trains on exactly N
    images: no validation split is held out of them unless it asks for one.
    """
    base = {"data": {"download": False}, "pretrain": {"device": "cpu"}}
    if "train_subset" in sections.get("data", {}):
        base["data"]["val_fraction"] = 0.0
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return build_config("tiny", base)


def run_pretrain(cfg: Config, out_dir: Path) -> SimpleNamespace:
    """Run `pretrain`; keep the trained model it returns."""
    from pemae.engine.pretrain import pretrain

    model, summary = pretrain(cfg, out_dir, progress=False)
    return SimpleNamespace(cfg=cfg, out_dir=Path(out_dir), summary=summary, model=model.eval())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> SimpleNamespace:
    """One tiny MAE pretraining run (512 images, 8 steps, one row logged per step)."""
    if not fashion_mnist_installed():
        pytest.skip(f"real Fashion-MNIST not installed under {sources.DEBIAN_FASHION_MNIST}")
    return run_pretrain(tiny_config(method={"name": "mae"}), tmp_path_factory.mktemp("tiny_pretrain"))
