"""Shared fixtures: tiny configs and one tiny pretraining run reused by several test modules."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from pemae import data
from pemae.config import Config, build_config


def fashion_mnist_installed() -> bool:
    """True when the Debian Fashion-MNIST files (both splits) are on disk."""
    folder = data.DEBIAN_FASHION_MNIST
    return all(data._find_idx_pair([folder], split) for split in data.SPLITS)


needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_installed(),
    reason=f"real Fashion-MNIST not installed under {data.DEBIAN_FASHION_MNIST} "
    "(apt-get install dataset-fashion-mnist)",
)


def tiny_config(**sections) -> Config:
    """The `tiny` preset on the CPU, never downloading, with `sections` merged on top."""
    base = {"data": {"download": False}, "pretrain": {"device": "cpu"}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return build_config("tiny", base)


def run_pretrain(cfg: Config, out_dir: Path) -> SimpleNamespace:
    """Run `pretrain` and also capture the trained model instance it built."""
    from pemae import pretrain as pretrain_module

    built = []
    original = pretrain_module.build_model

    def capture(c):
        model = original(c)
        built.append(model)
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain_module, "build_model", capture)
        summary = pretrain_module.pretrain(cfg, out_dir, progress=False)
    assert len(built) == 1
    return SimpleNamespace(cfg=cfg, out_dir=Path(out_dir), summary=summary, model=built[0].eval())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> SimpleNamespace:
    """One tiny pretraining run (512 images, 8 steps, one row logged per step)."""
    if not fashion_mnist_installed():
        pytest.skip(f"real Fashion-MNIST not installed under {data.DEBIAN_FASHION_MNIST}")
    return run_pretrain(tiny_config(), tmp_path_factory.mktemp("tiny_pretrain"))
