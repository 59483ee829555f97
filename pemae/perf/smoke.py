"""The smoke check of the real loops: `python -m pemae.gpu_check --smoke`.

On a small image folder (scikit-learn's digits, written as PNGs: nothing is downloaded) and the
`tiny` model, through the command line under `torchrun` exactly as a user runs it, with 1 process
and, where there are two GPUs or more, 2:

1. pretrain PEMAE to the end (run A), and again killed once its first checkpoint is written, then
   restarted (run B, resumed): the weights of A and B are compared (max |A - B|, 0 = exact);
2. evaluate (k-NN, linear probe), fine-tune (with gradient accumulation) and the dense probe on A's
   encoder.

It prints one table and writes smoke.md and smoke.json into `--out`. Minutes on a GPU, about one
on a 2-core CPU (`--device cpu`, what the tests run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pemae.engine import checkpoint
from pemae.studies.small_data import write_digits_imagefolder


# the tiny preset on the digits: 16 px, 1.4k training images, ~20 steps an epoch
SMOKE_SETTINGS = ("data.dataset=imagefolder", "data.img_size=16", "data.in_chans=1",
                  "data.train_subset=0", "data.test_subset=0", "pretrain.epochs=3",
                  "pretrain.log_every=5", "pretrain.checkpoint_every=5",
                  "finetune.train_subset=512", "finetune.micro_batch_size=16",
                  "dense.train_scenes=64", "dense.val_scenes=16", "dense.test_scenes=32")


def torchrun(processes: int) -> list[str]:
    """The launcher: one process runs plainly, several under torch.distributed.run."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}"]


def cli_command(processes: int, command: str, out: Path, root: Path, device: str) -> list[str]:
    sets = [*SMOKE_SETTINGS, f"data.root={root}", f"pretrain.device={device}"]
    return [*torchrun(processes), "-m", "pemae.cli", command, "--preset", "tiny", "--out", str(out),
            *[arg for s in sets for arg in ("--set", s)]]


def run_timed(cmd: list[str], log: Path) -> float:
    """Run `cmd` to the end (its output appended to `log`); its seconds. A failure raises with
    the log's last lines."""
    start = time.perf_counter()
    with log.open("a") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (exit {done.returncode}):\n{tail}")
    return time.perf_counter() - start


def run_killed_at_first_checkpoint(cmd: list[str], run_dir: Path, log: Path) -> bool:
    """Start `cmd` and kill its whole process group (SIGKILL) as soon as last.pt appears; True
    when it was killed mid-run, False when it finished first."""
    with log.open("a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            if (run_dir / "last.pt").is_file():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.01)
    return False


def weight_difference(a: Path, b: Path) -> float:
    """max |a - b| over every floating-point tensor of two checkpoints' models."""
    wa, wb = checkpoint.load(a)["model"], checkpoint.load(b)["model"]
    return max((wa[k].double() - wb[k].double()).abs().max().item()
               for k in wa if wa[k].is_floating_point())


def smoke_one(processes: int, work: Path, root: Path, device: str) -> dict:
    """Steps 1-2 above with `processes` processes; the figures of one row."""
    base, log = work / f"processes{processes}", work / f"processes{processes}.log"
    base.mkdir(parents=True, exist_ok=True)
    row: dict = {"processes": processes}
    run_a, run_b = base / "a", base / "b"
    row["pretrain_s"] = run_timed(cli_command(processes, "pretrain", run_a, root, device), log)
    summary = json.loads((run_a / "summary.json").read_text())
    row.update(steps=summary["steps"], images_per_s=summary["images_per_s"],
               peak_memory_mb=summary["peak_memory_mb"], final_loss=summary["final_loss"],
               collapsed=summary.get("collapsed"))
    cmd_b = cli_command(processes, "pretrain", run_b, root, device)
    row["interrupted"] = run_killed_at_first_checkpoint(cmd_b, run_b, log)
    run_timed(cmd_b, log)  # resumes from last.pt
    row["resume_max_abs_diff"] = weight_difference(run_a / "checkpoint.pt", run_b / "checkpoint.pt")
    row["evaluate_s"] = run_timed(cli_command(processes, "evaluate", run_a, root, device), log)
    scores = json.loads((run_a / "evaluate.json").read_text())["test"]["cls"]
    row.update(test_knn_top1=scores["knn_top1"], test_linear_top1=scores["linear_top1"])
    row["finetune_s"] = run_timed(cli_command(processes, "finetune", run_a, root, device), log)
    row["finetune_test_top1"] = json.loads((run_a / "finetune" / "summary.json").read_text())["test_top1"]
    row["dense_s"] = run_timed(cli_command(processes, "dense", run_a, root, device), log)
    row["dense_test_miou"] = json.loads((run_a / "dense.json").read_text())["test"]["miou"]
    return row


def smoke_markdown(rows: list[dict], meta: dict) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"# Smoke check: {meta['device_name']}, torch {meta['torch']}", "",
             "The tiny model on scikit-learn's digits (16 px) through `python -m pemae.cli` "
             "(`torchrun` for 2 processes): pretraining (run A to the end; run B killed at its "
             "first checkpoint, then resumed: resume_max_abs_diff = max |A - B| of the weights), "
             "evaluation, fine-tuning with gradient accumulation, the dense probe. Seconds are "
             "wall-clock per command, start-up included.", "",
             "| key | " + " | ".join(f"{r['processes']} process(es)" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    lines += [f"| {k} | " + " | ".join(cell(r.get(k, "")) for r in rows) + " |" for k in keys]
    return "\n".join(lines) + "\n"


def smoke(out: str | Path, device: str = "auto", work: str | Path | None = None,
          processes: list[int] | None = None) -> list[dict]:
    """The smoke check (module docstring); rows of figures per process count, also written to
    `out`/smoke.md and smoke.json. `processes` None: [1], and 2 where two GPUs are there. The runs
    go to `work` (None: a temporary folder, removed at the end)."""
    out = Path(out)
    if work is None:  # scratch runs: gone afterwards
        with tempfile.TemporaryDirectory(prefix="pemae-smoke-") as scratch:
            return smoke(out, device, scratch, processes)
    work = Path(work)
    on_gpu = device in ("auto", "cuda") and torch.cuda.is_available()
    if processes is None:
        processes = [1, 2] if on_gpu and torch.cuda.device_count() >= 2 else [1]
    root = write_digits_imagefolder(work / "digits")
    meta = {"device_name": torch.cuda.get_device_name(0) if on_gpu else "cpu",
            "torch": torch.__version__}
    rows = []
    for n in processes:
        rows.append(smoke_one(n, work, root, "cuda" if on_gpu else "cpu"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "smoke.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (out / "smoke.md").write_text(smoke_markdown(rows, meta))
    print(smoke_markdown(rows, meta))
    return rows
