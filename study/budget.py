"""Train the budget study's jobs (pemae/studies/budget.py), several at a time, resumably:

    python study/budget.py [--jobs N] [--set section.key=value ...] [--until-minutes M] [--dry-run]

Each job (one run, budget and seed: `mae-e6-s0`) runs in its own process, `--jobs` at once (one on
a CPU; several on a GPU, whose small steps leave it idle most of the time), in the order of
`pemae.studies.budget.jobs`; a finished job is skipped, an interrupted one resumes. Its output goes to
`<root>/logs/<job>.log`, and one line per finished job to `<root>/jobs.jsonl` (wall-clock seconds,
device, how many jobs shared the machine). `--set` goes into every job's config (e.g.
`--set data.num_workers=2`). No job starts once `--until-minutes` have passed. Exit code 1 when
a job failed (the others run on).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pemae.studies.budget import Job, job_config, jobs, load, run_job  # noqa: E402
from pemae.cli import parse_sets  # noqa: E402
from pemae.config.schema import ConfigError  # noqa: E402

ROOT = REPO / "results" / "study" / "budget" / "train"


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def child_command(job: Job, args: argparse.Namespace) -> list[str]:
    sets = [arg for s in args.set for arg in ("--set", s)]
    return [sys.executable, str(Path(__file__).resolve()), "--job", job.name, "--params",
            str(args.params), "--root", str(args.root), *sets]


def record(root: Path, job: Job, seconds: float, concurrent: int, returncode: int) -> None:
    line = {"job": job.name, "seconds": round(seconds, 1), "returncode": returncode,
            "device": device_name(), "concurrent_jobs": concurrent}
    with (root / "jobs.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")


def schedule(pending: list[Job], args: argparse.Namespace) -> int:
    """Run `pending` in order, `args.jobs` at a time; the number of failed jobs."""
    deadline = time.monotonic() + 60 * args.until_minutes
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs)),
           "PYTHONUNBUFFERED": "1"}
    (args.root / "logs").mkdir(parents=True, exist_ok=True)
    running: dict[subprocess.Popen, tuple[Job, float]] = {}
    failed = 0
    queue = list(pending)
    while queue or running:
        while queue and len(running) < args.jobs and time.monotonic() < deadline:
            job = queue.pop(0)
            log = (args.root / "logs" / f"{job.name}.log").open("a")
            proc = subprocess.Popen(child_command(job, args), stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=REPO)
            running[proc] = (job, time.monotonic())
            print(f"{time.strftime('%H:%M:%S')} start {job.name}", flush=True)
        if time.monotonic() >= deadline and queue:
            print(f"--until-minutes reached: {len(queue)} job(s) not started "
                  f"({', '.join(j.name for j in queue)})", flush=True)
            queue = []
        time.sleep(1)
        for proc in [p for p in running if p.poll() is not None]:
            job, start = running.pop(proc)
            seconds = time.monotonic() - start
            record(args.root, job, seconds, min(args.jobs, len(pending)), proc.returncode)
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see logs/{job.name}.log)"
            failed += proc.returncode != 0
            print(f"{time.strftime('%H:%M:%S')} {status} {job.name} in {seconds:.0f} s", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--root", type=Path, default=ROOT, help="where the jobs write")
    parser.add_argument("--jobs", type=int, default=1, help="jobs at once")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--until-minutes", type=float, default=float("inf"))
    parser.add_argument("--dry-run", action="store_true", help="list the jobs left, run nothing")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # one job, in this process
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    try:  # a bad params file, --set or run: one line naming it, before any training
        params, bc = load(args.params)
        overrides = parse_sets(args.set)
        todo = jobs(bc)
        for job in todo:
            job_config(params, bc, job, overrides)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if args.job is not None:
        run_job(params, bc, next(j for j in todo if j.name == args.job), args.root, overrides)
        return 0
    pending = [job for job in todo if not job.done(args.root)]
    print(f"{len(todo) - len(pending)} of {len(todo)} jobs done; {len(pending)} to run "
          f"({args.jobs} at a time)", flush=True)
    if args.dry_run:
        print("\n".join(job.name for job in pending))
        return 0
    return 1 if schedule(pending, args) else 0


if __name__ == "__main__":
    sys.exit(main())
