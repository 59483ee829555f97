"""Evaluation and fine-tuning at scale: two torchrun (gloo) processes against one for fine-tuning,
the sharded k-NN / linear / dense probes and DDP resume (tests/scale_probe.py), fine-tuning
resumed after a stop, and the `evaluate`, `finetune` and `dense` commands."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_fashion_mnist, tiny_config
from pemae.cli import main as cli_main
from pemae.config.schema import ConfigError
from pemae.engine import checkpoint
from pemae.engine import finetune as finetune_module
from pemae.engine.finetune import finetune
from pemae.engine.runtime import read_log
from pemae.eval.probes import evaluate_encoder
from pemae.models.pemae import build_pretrain_model
from test_engine import BIN, REPO, assert_same_weights, cli_env

pytestmark = needs_fashion_mnist

TINY_SETS = ["data.download=false", "pretrain.device=cpu", "evaluation.linear_epochs=2"]
# randomness inside a step off (no flips, no crop jitter, no drop path): two processes then
# equal one (each process draws its own crops, flips and drop path; see pemae.engine.finetune)
DETERMINISTIC = {"data": {"hflip": False}, "finetune": {"drop_path": 0.0, "epochs": 2,
                                                        "checkpoint_every": 3}}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A randomly initialised tiny MAE encoder, exported: comparing runs needs no training."""
    cfg = tiny_config(method={"name": "mae"})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("encoder") / "encoder.pt"
    checkpoint.export_encoder(build_pretrain_model(cfg, 1, 1).encoder, cfg, path)
    return path


def run_dir_with(encoder: Path, out: Path) -> Path:
    """A run folder as `pretrain --out` leaves it, for the commands that read OUT/encoder.pt."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(encoder, out / "encoder.pt")
    return out


def cli_args(command: str, out: Path, *sets: str) -> list[str]:
    args = [command, "--preset", "tiny", "--out", str(out), "--no-progress"]
    for s in (*TINY_SETS, *sets):
        args += ["--set", s]
    return args


def flat_sets(sections: dict) -> list[str]:
    return [f"{section}.{key}={value}" for section, keys in sections.items() for key, value in keys.items()]


def one_image(split_size: int) -> float:
    """The accuracy (%) of one image: float rounding may flip a near tie, no more."""
    return 100.0 / split_size + 1e-9


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------
def test_two_processes_fine_tune_like_one_with_the_same_global_batch(encoder, tmp_path):
    two = run_dir_with(encoder, tmp_path / "two")
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "pemae.cli"]
    result = subprocess.run(launcher + cli_args("finetune", two, *flat_sets(DETERMINISTIC)),
                            env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = finetune(tiny_config(**DETERMINISTIC), encoder, tmp_path / "one", progress=False)

    a, b = read_log(tmp_path / "one/log.csv"), read_log(two / "finetune/log.csv")
    assert list(a["step"]) == list(b["step"]) == [4, 8]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert abs(b["val_top1"] - a["val_top1"]).max() <= one_image(57)
    summary = json.loads((two / "finetune/summary.json").read_text())
    assert summary["world_size"] == 2 and "world_size" not in one
    assert abs(summary["test_top1"] - one["test_top1"]) <= one_image(256)
    whole, parts = (checkpoint.load(p) for p in (tmp_path / "one/checkpoint.pt", two / "finetune/checkpoint.pt"))
    assert_same_weights(whole["model"], parts["model"], atol=1e-5)
    assert len(whole["rng"]) == 1 and len(parts["rng"]) == 2  # every process's RNG states


def test_accumulated_micro_batches_fine_tune_like_one_batch(encoder, tmp_path):
    """finetune.micro_batch_size splits each batch into accumulated micro-batches: the same update
    (to float rounding) as the whole batch at once, so one recipe runs on any number of GPUs."""
    whole = finetune(tiny_config(**DETERMINISTIC), encoder, tmp_path / "whole", progress=False)
    micro = {**DETERMINISTIC, "finetune": {**DETERMINISTIC["finetune"], "micro_batch_size": 16}}
    parts = finetune(tiny_config(**micro), encoder, tmp_path / "parts", progress=False)  # 4 x 16
    a, b = read_log(tmp_path / "whole/log.csv"), read_log(tmp_path / "parts/log.csv")
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert abs(parts["test_top1"] - whole["test_top1"]) <= one_image(256)
    assert_same_weights(*(checkpoint.load(tmp_path / run / "checkpoint.pt")["model"]
                          for run in ("whole", "parts")), atol=1e-5)
    with pytest.raises(ConfigError, match="finetune.batch_size = 64 does not split into 1 process"
                                          r"\(es\) x 3 equal micro-batches"):
        finetune(tiny_config(finetune={"micro_batch_size": 30}), encoder, tmp_path / "bad",
                 progress=False)


def test_sharded_probes_and_a_resumed_ddp_run_match_one_process(encoder, tmp_path):
    """tests/scale_probe.py under torchrun: sharded features, k-NN, linear and dense probes and
    split accuracy equal one process's exactly; a DDP fine-tuning run stopped mid-epoch and
    resumed ends with the uninterrupted run's weights and log."""
    result = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
                             str(REPO / "tests" / "scale_probe.py"), str(encoder), str(tmp_path)],
                            env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for check in ("gather_rows", "knn_accuracy", "split_features", "evaluate_features", "dense",
                  "split_accuracy", "finetune_resume"):
        assert result.stdout.count(f"ok {check}") == 2, (check, result.stdout)


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------
class Stop(Exception):
    """A run killed right after a checkpoint."""


def stop_after(step: int, monkeypatch) -> None:
    save = finetune_module.save_checkpoint

    def save_then_stop(path, model, optimizer, cfg, at, *args):
        save(path, model, optimizer, cfg, at, *args)
        if at == step:
            raise Stop

    monkeypatch.setattr(finetune_module, "save_checkpoint", save_then_stop)


def test_fine_tuning_stopped_after_a_checkpoint_resumes_to_the_uninterrupted_result(
        encoder, tmp_path, monkeypatch, capsys):
    # the tiny preset's own randomness (flips, drop path), crop jitter on top: 2 epochs x 4 steps,
    # last.pt at steps 2, 4 (an epoch's end) and 6
    cfg = tiny_config(finetune={"epochs": 2, "checkpoint_every": 2, "crop_min_scale": 0.5})
    whole = finetune(cfg, encoder, tmp_path / "whole", progress=False)
    with monkeypatch.context() as patch:
        stop_after(6, patch)
        with pytest.raises(Stop):
            finetune(cfg, encoder, tmp_path / "killed", progress=False)
    killed = tmp_path / "killed"
    assert checkpoint.load(killed / "last.pt")["step"] == 6
    assert checkpoint.load(killed / "last.prev.pt")["step"] == 4
    with pytest.raises(ConfigError, match="finetune.base_lr: 0.004 -> 0.001"):  # another config
        finetune(tiny_config(finetune={"epochs": 2, "checkpoint_every": 2, "crop_min_scale": 0.5,
                                       "base_lr": 1e-3}), encoder, killed, progress=False)
    damaged = tmp_path / "damaged"  # last.pt unreadable: back to last.prev.pt, an epoch's end
    shutil.copytree(killed, damaged)
    (damaged / "last.pt").write_bytes(b"")

    reference = checkpoint.load(tmp_path / "whole/checkpoint.pt")["model"]
    for folder, step in ((killed, 6), (damaged, 4)):  # mid-epoch, then at an epoch's end
        capsys.readouterr()
        resumed = finetune(cfg, encoder, folder, progress=False)
        assert f"resuming fine-tuning at step {step} from {folder}" in capsys.readouterr().out
        assert_same_weights(checkpoint.load(folder / "checkpoint.pt")["model"], reference)
        assert (folder / "log.csv").read_text() == (tmp_path / "whole/log.csv").read_text()
        assert {k: v for k, v in resumed.items() if k != "seconds"} == \
            {k: v for k, v in whole.items() if k != "seconds"}
        assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "log.csv", "summary.json"]


# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------
def test_evaluate_finetune_and_dense_commands_write_the_notebooks_files(encoder, tmp_path, capsys):
    out = run_dir_with(encoder, tmp_path / "run")
    cli_main(cli_args("evaluate", out))
    metrics = json.loads((out / "evaluate.json").read_text())
    cfg = tiny_config(evaluation={"linear_epochs": 2})
    assert metrics == evaluate_encoder(cfg, encoder, progress=False)  # the notebook's function
    assert set(metrics) == {"val", "test"} and set(metrics["test"]) == {"cls", "avg"}

    cli_main(cli_args("evaluate", tmp_path / "pixels") + ["--pixels"])
    assert set(json.loads((tmp_path / "pixels/evaluate.json").read_text())["test"]) == {"pixels"}

    cli_main(cli_args("finetune", out))  # finetune.checkpoint_every 0: no checkpoint files
    assert sorted(p.name for p in (out / "finetune").iterdir()) == ["log.csv", "summary.json"]
    assert {"val_top1", "test_top1", "epochs"} <= set(json.loads((out / "finetune/summary.json").read_text()))

    cli_main(cli_args("dense", out, "dense.epochs=1") + ["--encoder", str(encoder)])
    assert set(json.loads((out / "dense.json").read_text())) == {"val", "test"}
    maps = checkpoint.load(out / "dense_maps.pt")
    assert maps["maps"].shape == maps["truth"].shape and maps["maps"].dtype == torch.int16
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["evaluate", "finetune", "dense"])
def test_a_missing_encoder_exits_2_naming_it(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(cli_args(command, tmp_path / "empty"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"{tmp_path / 'empty' / 'encoder.pt'} does not exist" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as stop:
        cli_main(cli_args(command, tmp_path) + ["--encoder", str(tmp_path / "ghost.pt")])
    assert stop.value.code == 2 and "--encoder " + str(tmp_path / "ghost.pt") in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_bad_config_exits_2_in_one_line_from_a_shell(encoder, tmp_path):
    out = run_dir_with(encoder, tmp_path / "run")
    result = subprocess.run([sys.executable, "-m", "pemae.cli", *cli_args("finetune", out, "finetune.epoch=2")],
                            env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "finetune.epoch: unknown key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (out / "finetune").exists()
