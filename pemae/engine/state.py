"""What pretraining and fine-tuning share to save and resume a run: the training state a checkpoint
holds (`training_state`), the last readable checkpoint of an interrupted run (`interrupted_state`),
a ConfigError naming every key where it was written with another config (`refuse_other_config`),
loading it back (`load_training_state`), and the optimiser update through the grad scaler."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch
from torch import nn

from pemae.config.params import config_differences
from pemae.config.schema import Config, ConfigError
from pemae.engine import checkpoint


def interrupted_state(paths: list[Path]) -> tuple[Path, dict] | None:
    """The state of an interrupted run: the first of `paths` (last.pt, then last.prev.pt) that
    exists and loads, with its path; None when none exists.

    An unreadable file is named with its reason in a warning and the next one is tried; when every
    file that exists is unreadable, DamagedCheckpointError gives the command that starts over.
    """
    damaged: list[Path] = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            state = checkpoint.load(path)
        except checkpoint.DamagedCheckpointError as err:
            print(f"WARNING: {err}", file=sys.stderr)
            damaged.append(path)
            continue
        if damaged:
            print(f"WARNING: resuming from the previous checkpoint, {path} (step {state['step']})",
                  file=sys.stderr)
        return path, state
    if damaged:
        names, several = " and ".join(p.name for p in damaged), len(damaged) > 1
        raise checkpoint.DamagedCheckpointError(
            f"cannot resume the run in {damaged[0].parent}: {names} {'are' if several else 'is'} "
            "unreadable (see the warnings above) and no earlier checkpoint is left; to start the "
            f"run over, delete {'them' if several else 'it'}: "
            f"rm {' '.join(shlex.quote(str(p)) for p in damaged)}")
    return None


def refuse_other_config(state: dict, cfg: Config, what: str, remedy: str,
                        sections: tuple[str, ...], resumable: tuple[str, ...]) -> None:
    """A ConfigError naming every key of `sections` (but `resumable`) where the checkpoint `state`
    was written with another config than `cfg`: "<what> with a different config ...", then
    `remedy`."""
    differences = config_differences(state["config"], cfg.to_dict(), sections, resumable)
    if differences:
        raise ConfigError(f"{what} with a different config (checkpoint -> now):\n  "
                          + "\n  ".join(differences) + f"\n{remedy}")


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, step: int,
                   steps_per_epoch: int, seconds: float, restore: dict,
                   totals: dict | None = None) -> dict:
    """Everything a run needs to continue exactly, tensors and plain values only: the model and
    optimiser, each loop's `restore` (pretraining: the grad scaler and RNG state; fine-tuning: every
    process's RNG states and the shuffling generator), the step, each loop's fixed `totals`
    (pretraining: total_steps), the steps per epoch, the seconds trained and the config. The key
    order is the file's byte layout: the committed checkpoints were written in this order."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **restore, "step": step,
            **(totals or {}), "steps_per_epoch": steps_per_epoch, "seconds": seconds,
            "config": cfg.to_dict()}


def load_training_state(path: Path, state: dict, steps_per_epoch: int, model: nn.Module,
                        optimizer: torch.optim.Optimizer) -> None:
    """The model and optimiser of an interrupted run's `state` (read from `path`, its config
    already checked by `refuse_other_config`); a ConfigError when the data now gives another
    number of steps per epoch."""
    if state["steps_per_epoch"] != steps_per_epoch:
        raise ConfigError(f"{path} was written with {state['steps_per_epoch']} steps per epoch, the "
                          f"data now gives {steps_per_epoch}: the training set changed (data.root?)")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


def optimizer_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """The optimiser step on the summed gradients, through the grad scaler when there is one."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
