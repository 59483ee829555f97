"""The bad-input catalogue: what a user can get wrong on `python -m pemae.cli pretrain` (a key, a
value, a file, an image folder, a rerun into a used folder, a damaged checkpoint), as one table of
input -> the message it must give -> what it may write. Every future error path gets a row here.

The rows run `pemae.cli.main` in this process (the same code as `python -m pemae.cli`, without
a new interpreter and torch import per row); two subprocess tests check that the real command
prints one line without a traceback, and the traceback with --debug.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import needs_fashion_mnist
from pemae.cli import build_parser, main as cli_main, parse_sets, resolve
from pemae.config.params import build_config, config_differences
from pemae.engine import checkpoint
from pemae.engine.pretrain import PRETRAIN_SECTIONS, RESUMABLE_KEYS, NonFiniteLossError, pretrain
from pemae.engine.runtime import read_log
from pemae.models.mae import MaskedAutoencoder

REPO = Path(__file__).resolve().parents[1]

# A tiny MAE run of 4 steps (128 images, batch 64, 2 epochs) with a checkpoint after every step
SETS = ("data.download=false", "pretrain.device=cpu", "method.name=mae", "data.train_subset=128",
        "data.val_fraction=0", "pretrain.epochs=2", "pretrain.checkpoint_every=1")
STEPS = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; restore the setting for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One bad input.

    args:    the command line after `pretrain --preset tiny --out {tmp}/out` and SETS (`--params`
             replaces `--preset tiny`); `{tmp}` is the test's own folder
    says:    a fragment of the output: stderr's error line (exit code 2), stdout + stderr otherwise
    code:    the exit code
    folder:  what `--out` holds before: "absent", "completed" (a finished run), "interrupted"
             (last.pt at step 3, last.prev.pt at step 2, no checkpoint.pt)
    damage:  "file:how" changes to the folder's files first (how: truncate, zero-fill, bit-flip,
             delete)
    files:   files written into {tmp} first (name -> text)
    outcome: "untouched" (the folder, or its absence, exactly as before: bytes and mtimes),
             "completed" (a finished run of the command's config) or "no checkpoint"
    """

    id: str
    args: tuple[str, ...]
    says: str
    code: int = 2
    folder: str = "absent"
    damage: tuple[str, ...] = ()
    files: dict = field(default_factory=dict)
    outcome: str = "untouched"


BROKEN_PARAMS = "preset: tiny\npretrain:\n  epochs: 2\n   batch_size: 3\n"  # line 4: bad indent
PARAMS_WITH_RUNS = "preset: tiny\nruns:\n  mae:\n    method:\n      name: mae\n"

CATALOGUE = [
    # the config
    Case("unknown key", ("--set", "pretrain.epoch=2"),
         "pretrain.epoch: unknown key (known: epochs, batch_size"),
    Case("bad choice", ("--set", "method.name=byol"),
         "method.name = 'byol': must be one of mae, pemae"),
    Case("wrong type", ("--set", "pretrain.epochs=two"),
         "invalid configuration: pretrain.epochs = 'two': expected an integer, got 'two'"),
    Case("bool for a number", ("--set", "pretrain.base_lr=true"),
         "pretrain.base_lr = True: expected a number, got True"),
    Case("out of range", ("--set", "model.mask_ratio=1.5"),
         "model.mask_ratio = 1.5: must lie strictly between 0 and 1"),
    Case("patch does not divide the image", ("--set", "model.patch_size=5"),
         "model.patch_size = 5 does not divide data.img_size = 28"),
    Case("--set without a section", ("--set", "epochs=2"),
         "--set 'epochs=2': expected section.key=value"),
    Case("broken YAML in --set", ("--set", "pretrain.betas=[0.9"),
         "--set 'pretrain.betas=[0.9', line 1, column 5: invalid YAML: expected ',' or ']', but got "
         "'<stream end>' (while parsing a flow sequence)"),
    # the params file
    Case("broken params.yaml", ("--params", "{tmp}/params.yaml"),
         "{tmp}/params.yaml, line 4, column 14: invalid YAML: mapping values are not allowed here",
         files={"params.yaml": BROKEN_PARAMS}),
    Case("missing params file", ("--params", "{tmp}/nowhere.yaml"),
         "params file {tmp}/nowhere.yaml does not exist (run from the repository root"),
    Case("unknown run", ("--params", "{tmp}/params.yaml", "--run", "ghost"),
         "run 'ghost' is not defined under `runs:` or `ablations:` in {tmp}/params.yaml (known: mae)",
         files={"params.yaml": PARAMS_WITH_RUNS}),
    # the data
    Case("missing image folder",
         ("--set", "data.dataset=imagefolder", "--set", "data.root={tmp}/nowhere"),
         "imagefolder: missing folder {tmp}/nowhere/train (data.root = '{tmp}/nowhere')"),
    Case("unreadable images",
         ("--set", "data.dataset=imagefolder", "--set", "data.root={tmp}/images",
          "--set", "pretrain.batch_size=8", "--set", "data.train_subset=0"),
         "cannot read image {tmp}/images/train/", outcome="no checkpoint"),
    # a rerun into a folder that holds a completed run
    Case("completed run, same config", (), f"is complete (step {STEPS}); nothing to do", code=0,
         folder="completed"),
    Case("completed run, other config", ("--set", "model.mask_ratio=0.5", "--set", "pretrain.seed=3"),
         "holds a completed run with a different config (checkpoint -> now):\n"
         "  model.mask_ratio: 0.75 -> 0.5\n  pretrain.seed: 0 -> 3\n", folder="completed"),
    Case("completed run, --force", ("--force", "--set", "pretrain.seed=3"),
         "pretrain.overwrite: training again over the completed run", code=0, folder="completed",
         outcome="completed"),
    Case("completed run, damaged checkpoint.pt", (), "checkpoint {tmp}/out/checkpoint.pt is unreadable",
         folder="completed", damage=("checkpoint.pt:truncate",)),
    # a rerun into a folder that holds an interrupted run
    Case("interrupted run, other config", ("--set", "model.mask_ratio=0.5"),
         "last.pt is an interrupted run with a different config (checkpoint -> now):\n"
         "  model.mask_ratio: 0.75 -> 0.5", folder="interrupted"),
    Case("truncated last.pt, good last.prev.pt", (),
         "last.pt is unreadable: not a valid checkpoint archive (File is not a zip file)", code=0,
         folder="interrupted", damage=("last.pt:truncate",), outcome="completed"),
    Case("zero-filled last.pt, good last.prev.pt", (),
         "last.pt is unreadable: not a valid checkpoint archive", code=0,
         folder="interrupted", damage=("last.pt:zero-fill",), outcome="completed"),
    Case("bit-flipped last.pt, good last.prev.pt", (),
         "fails its CRC-32 check: the bytes changed after they were written", code=0,
         folder="interrupted", damage=("last.pt:bit-flip",), outcome="completed"),
    Case("damaged last.pt and last.prev.pt", (),
         "cannot resume the run in {tmp}/out: last.pt and last.prev.pt are unreadable (see the "
         "warnings above) and no earlier checkpoint is left; to start the run over, delete them: "
         "rm {tmp}/out/last.pt {tmp}/out/last.prev.pt",
         folder="interrupted", damage=("last.pt:truncate", "last.prev.pt:bit-flip")),
    Case("damaged last.pt, no last.prev.pt", (),
         "last.pt is unreadable (see the warnings above) and no earlier checkpoint is left; to start "
         "the run over, delete it: rm {tmp}/out/last.pt",
         folder="interrupted", damage=("last.prev.pt:delete", "last.pt:zero-fill")),
]


# --------------------------------------------------------------------------------------------
# Folders to rerun into, files to damage
# --------------------------------------------------------------------------------------------
def command(case: Case, tmp: Path) -> list[str]:
    """The case's command line (after `python -m pemae.cli`), with {tmp} filled in."""
    source = [] if "--params" in case.args else ["--preset", "tiny"]
    sets = [arg for s in SETS for arg in ("--set", s)]
    args = ["pretrain", *source, "--out", str(tmp / "out"), "--no-progress", *sets, *case.args]
    return [a.replace("{tmp}", str(tmp)) for a in args]


def tiny_run_config():
    """The config of the catalogue's commands without extra arguments (the run folders' config)."""
    return build_config("tiny", parse_sets(list(SETS)))


@pytest.fixture(scope="module")
def run_folders(tmp_path_factory) -> dict[str, Path]:
    """A completed run, and the same run stopped by a NaN at its 4th step (last.pt at step 3,
    last.prev.pt at step 2): folders to copy, never to change."""
    root = tmp_path_factory.mktemp("runs")
    pretrain(tiny_run_config(), root / "completed", progress=False)
    forward = MaskedAutoencoder.forward

    def nan_at_step_4(self, imgs, step=0, **kwargs):
        out = forward(self, imgs, step, **kwargs)
        if step == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MaskedAutoencoder, "forward", nan_at_step_4)
        with pytest.raises(NonFiniteLossError):
            pretrain(tiny_run_config(), root / "interrupted", progress=False)
    steps = {p.name: checkpoint.load(p)["step"] for p in (root / "interrupted").glob("last*.pt")}
    assert steps == {"last.pt": 3, "last.prev.pt": 2}
    return {"completed": root / "completed", "interrupted": root / "interrupted"}


def damage_file(path: Path, how: str) -> None:
    """Truncate, zero-fill, flip one bit in the middle of, or delete `path`."""
    if how == "delete":
        path.unlink()
        return
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "zero-fill":
        path.write_bytes(bytes(len(raw)))
    elif how == "bit-flip":
        flipped = bytearray(raw)
        flipped[len(raw) // 2] ^= 0x04
        path.write_bytes(bytes(flipped))
    else:
        raise ValueError(f"unknown damage {how!r}")


def write_unreadable_images(root: Path, count: int = 8) -> None:
    """An ImageNet-layout folder whose train images are all garbage (val/ holds good ones)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        cls = f"c{i % 2}"
        for split in ("train", "val"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
        (root / "train" / cls / f"bad{i}.png").write_bytes(rng.bytes(300))
        pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)  # [H, W]
        Image.fromarray(pixels).save(root / "val" / cls / f"ok{i}.png")


def prepare(case: Case, tmp: Path, run_folders: dict[str, Path]) -> None:
    """The case's files, its --out folder and its damage."""
    for name, text in case.files.items():
        (tmp / name).write_text(text)
    if "{tmp}/images" in " ".join(case.args):
        write_unreadable_images(tmp / "images")
    if case.folder != "absent":
        shutil.copytree(run_folders[case.folder], tmp / "out")
    for spec in case.damage:
        name, how = spec.split(":")
        damage_file(tmp / "out" / name, how)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]] | None:
    """Every file under `folder` with its bytes and mtime; None when the folder does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str]) -> int:
    """`python -m pemae.cli argv` in this process: its exit code."""
    try:
        cli_main(argv)
    except SystemExit as stop:
        return stop.code
    return 0


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------
def needs_data(case: Case) -> bool:
    """Whether the case reaches Fashion-MNIST (a run folder to build, or a run to finish)."""
    return case.folder != "absent" or case.outcome == "completed"


def catalogue_params() -> list:
    return [pytest.param(case, id=case.id, marks=[needs_fashion_mnist] if needs_data(case) else [])
            for case in CATALOGUE]


def assert_completed_run_of(out: Path, argv: list[str]) -> None:
    """`out` holds a finished run of the command's config: checkpoint.pt at the last step, a log
    of every step once, and no checkpoint left to resume from."""
    state = checkpoint.load(out / "checkpoint.pt")
    wanted = resolve(build_parser().parse_args(argv)).to_dict()
    assert config_differences(state["config"], wanted, PRETRAIN_SECTIONS, RESUMABLE_KEYS) == []
    assert state["step"] == STEPS
    assert list(read_log(out / "log.csv")["step"]) == list(range(1, STEPS + 1))
    assert not (out / "last.pt").exists() and not (out / "last.prev.pt").exists()


@pytest.mark.parametrize("case", catalogue_params())
def test_bad_input(case, tmp_path, request, capsys):
    prepare(case, tmp_path, request.getfixturevalue("run_folders") if case.folder != "absent" else {})
    argv = command(case, tmp_path)
    before = snapshot(tmp_path / "out")

    code = run_cli(argv)

    out, err = capsys.readouterr()
    says = case.says.replace("{tmp}", str(tmp_path))
    assert code == case.code, out + err
    if case.code == 2:  # the error comes last, after any warnings
        assert "python -m pemae.cli: error: " in err, err
        assert says in err[err.index("python -m pemae.cli: error: "):], err
    else:
        assert says in out + err, out + err
    if case.outcome == "untouched":
        assert snapshot(tmp_path / "out") == before
    elif case.outcome == "completed":
        assert_completed_run_of(tmp_path / "out", argv)
        if case.folder == "interrupted":  # resumed from last.prev.pt: the uninterrupted result
            whole_run = request.getfixturevalue("run_folders")["completed"]
            resumed = checkpoint.load(tmp_path / "out" / "checkpoint.pt")["model"]
            whole = checkpoint.load(whole_run / "checkpoint.pt")["model"]
            assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    else:
        assert not list((tmp_path / "out").glob("*.pt"))


# --------------------------------------------------------------------------------------------
# The real command: one line on stderr, exit code 2; the traceback with --debug
# --------------------------------------------------------------------------------------------
def run_command(argv: list[str]) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pemae.cli", *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_the_command_prints_one_line_and_exits_2(tmp_path):
    (tmp_path / "params.yaml").write_text(BROKEN_PARAMS)
    case = Case("broken params.yaml", ("--params", "{tmp}/params.yaml"), "")
    result = run_command(command(case, tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"python -m pemae.cli: error: {tmp_path}/params.yaml, line 4, column 14: invalid YAML: "
        "mapping values are not allowed here"]
    assert not (tmp_path / "out").exists()


def test_debug_keeps_the_traceback_of_a_missing_image_folder(tmp_path):
    case = Case("missing image folder", ("--set", "data.dataset=imagefolder", "--set",
                                         "data.root={tmp}/nowhere"), "")
    plain = run_command(command(case, tmp_path))
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    lines = plain.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m pemae.cli: error: imagefolder: missing folder")
    debug = run_command(command(case, tmp_path) + ["--debug"])
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr
