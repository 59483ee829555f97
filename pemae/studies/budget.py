"""The budget study: the runs of the claims pretrained for longer (study/dvc.yaml:budget).

MAE and PEMAE (params.yaml `budget.runs`) pretrained for each number of epochs in
`budget.epochs`, once per seed of `budget.seeds`, each read exactly as the pipeline reads its
runs: k-NN and linear probe on the CLS and average readouts, one fine-tuning epoch, the dense
probe. The pipeline's own budget (`budget.base_epochs`) is not trained again: its runs, and the
flat references (the random encoder, the raw pixels), are the pipeline's (results/runs and
results/extra_seeds, the same configs on the same machine). The largest budget's encoders, and the
random encoder (training from scratch), are also fine-tuned for `budget.long_finetune_epochs`
epochs on the seeds of `budget.long_finetune_seeds`, scored on validation after each epoch.

What scales with the budget: the schedules counted in epochs (`pretrain.warmup_epochs`,
`method.freeze_last_layer_epochs`) are multiplied by epochs / `budget.base_epochs`, so that each
stays the fraction of the run it is in the pipeline; the schedules written as fractions of the run
(τ warm-up, the teachers' momenta, the lr's cosine) scale by themselves. Everything else is the
run's own config from params.yaml.

Layout: `<root>/e<epochs>/runs/<run>/seed<k>/` (`RunPaths`), the random encoder's long fine-tune
under `e0/`. A job (one run, budget and seed) resumes where it stopped: each of its parts is
skipped once its file exists. A finished job keeps its small files (config, logs, summaries,
scores) and deletes its weights, so that the study's folder is committed to git; retrain a job to
get its encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pemae.config.params import (SECTIONS, build_config, config_for_run, deep_merge, named_runs,
                                 read_params)
from pemae.config.schema import Config, ConfigError
from pemae.report.gather import RunPaths


REFERENCE_RUN = "random"  # no pretraining: the random-encoder rows and the from-scratch fine-tune
PIXELS = "pixels"         # the raw-pixel baseline: no encoder at all (the pipeline's)
WEIGHT_FILES = ("*.pt",)  # what a finished job deletes


@dataclass(frozen=True)
class BudgetConfig:
    """params.yaml `budget:`."""
    runs: tuple[str, ...] = ("mae", "pemae")
    epochs: tuple[int, ...] = (2, 6, 18)   # pretraining budgets, each its own schedule
    seeds: tuple[int, ...] = (0, 1, 2)
    base_epochs: int = 2                   # the budget the epoch-counted schedules are written for
    long_finetune_epochs: int = 12         # the longer fine-tune of the largest budget's encoders
    long_finetune_seeds: tuple[int, ...] = (0,)  # ... and of the random encoder, on these seeds

    @classmethod
    def from_params(cls, params: dict, where: str = "params.yaml") -> "BudgetConfig":
        """The `budget:` section of a params dict; a missing or wrong key is a ConfigError that
        names it."""
        section = params.get("budget")
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: no `budget:` section (runs, epochs, seeds, ...)")
        unknown = sorted(set(section) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) budget.{', budget.'.join(unknown)} "
                              f"(known: {', '.join(cls.__dataclass_fields__)})")
        cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in section.items()})
        if not cfg.epochs or any(not isinstance(e, int) or e < 1 for e in cfg.epochs):
            raise ConfigError(f"{where}: budget.epochs must be whole numbers >= 1, got {list(cfg.epochs)}")
        if not cfg.seeds:
            raise ConfigError(f"{where}: budget.seeds is empty")
        if cfg.base_epochs < 1 or cfg.long_finetune_epochs < 0:
            raise ConfigError(f"{where}: budget.base_epochs must be >= 1 and "
                              "budget.long_finetune_epochs >= 0")
        known_runs = named_runs(params.get("runs") or {}, params.get("ablations")) or {}
        for run in cfg.runs:
            if run not in known_runs:
                raise ConfigError(f"{where}: budget.runs names {run!r}, which is not a run of "
                                  f"`runs:` or `ablations:` (known: {', '.join(known_runs)})")
        if REFERENCE_RUN not in known_runs:
            raise ConfigError(f"{where}: the budget study needs the run {REFERENCE_RUN!r} under `runs:`")
        pipeline = build_config(params.get("preset", "default"), {k: params.get(k) for k in SECTIONS})
        if cfg.base_epochs != pipeline.pretrain.epochs:
            raise ConfigError(f"{where}: budget.base_epochs = {cfg.base_epochs} must be the pipeline's "
                              f"pretrain.epochs = {pipeline.pretrain.epochs} (its runs are the "
                              "study's base budget)")
        if cfg.base_epochs not in cfg.epochs:
            raise ConfigError(f"{where}: budget.epochs {list(cfg.epochs)} must hold the pipeline's "
                              f"budget, budget.base_epochs = {cfg.base_epochs} (pretrain.epochs)")
        if not set(cfg.long_finetune_seeds) <= set(cfg.seeds):
            raise ConfigError(f"{where}: budget.long_finetune_seeds {list(cfg.long_finetune_seeds)} "
                              f"must be among budget.seeds {list(cfg.seeds)}")
        return cfg


PARTS = ("pretrain", "evaluate", "finetune", "dense", "finetune_long")  # in the order they run


@dataclass(frozen=True)
class Job:
    """One run at one budget and seed, and the parts of PARTS it runs (epochs 0: the random
    encoder, whose pretraining only initialises it)."""
    run: str
    epochs: int
    seed: int
    parts: tuple[str, ...] = PARTS[:4]

    @property
    def name(self) -> str:
        return f"{self.run}-e{self.epochs}-s{self.seed}"

    def paths(self, root: str | Path) -> RunPaths:
        return RunPaths(Path(root) / f"e{self.epochs}", self.run, self.seed)

    def files(self, root: str | Path) -> list[Path]:
        """The file each part writes last, in the order of `parts`."""
        written = part_files(self.paths(root))
        return [written[part] for part in self.parts]

    def done(self, root: str | Path) -> bool:
        return all(path.is_file() for path in self.files(root))


def long_finetune_dir(paths: RunPaths) -> Path:
    return paths.root / "finetune_long"


def part_files(paths: RunPaths) -> dict[str, Path]:
    """{part: the file it writes last} for a run and seed's folders."""
    return {"pretrain": paths.pretrain / "summary.json", "evaluate": paths.evaluation,
            "finetune": paths.finetune / "summary.json", "dense": paths.dense,
            "finetune_long": long_finetune_dir(paths) / "summary.json"}


def jobs(bc: BudgetConfig) -> list[Job]:
    """Every job, in the order to train them: each budget other than the pipeline's, the smallest
    first, every seed of one before the next; the largest last, seed by seed (the one a stopped
    study has fewest seeds of), with the long fine-tune on the seeds of `long_finetune_seeds`;
    then the random encoder's long fine-tunes."""
    budgets = sorted(set(bc.epochs) - {bc.base_epochs})
    order: list[Job] = []
    for epochs in budgets:
        last = epochs == budgets[-1]
        for seed in bc.seeds:
            long = last and bc.long_finetune_epochs > 0 and seed in bc.long_finetune_seeds
            order += [Job(run, epochs, seed, PARTS if long else PARTS[:4]) for run in bc.runs]
    if bc.long_finetune_epochs > 0:
        order += [Job(REFERENCE_RUN, 0, seed, ("pretrain", "finetune_long"))
                  for seed in bc.long_finetune_seeds]
    return order


def budget_overrides(base: Config, epochs: int, base_epochs: int) -> dict:
    """The overrides that give the run `epochs` of pretraining, with its epoch-counted schedules
    scaled by epochs / base_epochs (each stays the same fraction of the run)."""
    scale = epochs / base_epochs
    return {"pretrain": {"epochs": epochs, "warmup_epochs": base.pretrain.warmup_epochs * scale},
            "method": {"freeze_last_layer_epochs": base.method.freeze_last_layer_epochs * scale}}


def job_config(params: dict, bc: BudgetConfig, job: Job, overrides: dict | None = None) -> Config:
    """The config of a job: the run of params.yaml at the job's seed and budget, with
    `overrides` (the runner's --set: device, workers) on top."""
    sections = {k: params.get(k) for k in SECTIONS}
    runs = named_runs(params.get("runs") or {}, params.get("ablations"))
    preset = params.get("preset", "default")
    base = config_for_run(preset, sections, runs, job.run, job.seed, overrides)
    if job.epochs == 0:  # the random encoder, as params.yaml defines it
        return base
    return config_for_run(preset, sections, runs, job.run, job.seed,
                          deep_merge(budget_overrides(base, job.epochs, bc.base_epochs), overrides))


def write_json(path: Path, values: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=2) + "\n")
    tmp.replace(path)


def run_job(params: dict, bc: BudgetConfig, job: Job, root: str | Path,
            overrides: dict | None = None, progress: bool = False) -> None:
    """Train and read one job into `root` (each part skipped once its file exists), then delete
    its weights. Errors propagate; what was written stays for the next try."""
    if job.done(root):
        return
    long_cfg = None
    if "finetune_long" in job.parts:
        long_cfg = job_config(params, bc, job, deep_merge(
            overrides or {}, {"finetune": {"epochs": bc.long_finetune_epochs}}))
    train_and_read(job_config(params, bc, job, overrides), job.paths(root),
                   [part for part, path in zip(job.parts, job.files(root)) if not path.is_file()],
                   long_cfg, progress)


def train_and_read(cfg: Config, paths: RunPaths, parts: list[str], long_cfg: Config | None = None,
                   progress: bool = False) -> None:
    """The `parts` (of PARTS) of one run and seed into `paths`, as the pipeline's notebooks run
    them; then its weights are deleted."""
    from pemae.engine import checkpoint, distributed
    from pemae.eval.dense import dense_probe_encoder
    from pemae.eval.probes import evaluate_encoder
    from pemae.engine.finetune import finetune
    from pemae.engine.pretrain import pretrain

    if "pretrain" in parts or not paths.encoder.is_file():
        pretrain(cfg, paths.pretrain, progress)  # a completed run with its weights: nothing to do
    if "evaluate" in parts:
        write_json(paths.evaluation, evaluate_encoder(cfg, paths.encoder, progress))
    if "finetune" in parts:
        finetune(cfg, paths.encoder, paths.finetune, progress)
    if "dense" in parts:
        procs, device = distributed.start(cfg.pretrain.device)
        try:
            encoder = checkpoint.load_encoder(paths.encoder).eval()
            write_json(paths.dense, dense_probe_encoder(cfg, encoder, device, progress, procs).metrics)
        finally:
            distributed.stop(procs)
    if "finetune_long" in parts:
        finetune(long_cfg, paths.encoder, long_finetune_dir(paths), progress)
    for pattern in WEIGHT_FILES:
        for path in paths.root.rglob(pattern):
            path.unlink()


def train_pipeline_runs(params: dict, bc: BudgetConfig, folder: str | Path, progress: bool = False) -> None:
    """What the study reads from the pipeline, trained into `folder` in the pipeline's layout: its
    runs at the base budget and the random encoder (each read as the pipeline does), and the raw
    pixels, on every seed of the study. For a study run on its own (the notebook's defaults); the
    pipeline's stages make them otherwise. Done runs are skipped."""
    from pemae.eval.probes import evaluate_pixels

    sections = {k: params.get(k) for k in SECTIONS}
    runs = named_runs(params.get("runs") or {}, params.get("ablations"))
    for seed in bc.seeds:
        for run in [*bc.runs, REFERENCE_RUN]:
            paths = RunPaths(folder, run, seed)
            cfg = config_for_run(params.get("preset", "default"), sections, runs, run, seed)
            written = part_files(paths)
            parts = [part for part in PARTS[:4] if not written[part].is_file()]
            if parts:
                train_and_read(cfg, paths, parts, progress=progress)
        pixels = RunPaths(folder, PIXELS, seed).evaluation
        if not pixels.is_file():
            write_json(pixels, evaluate_pixels(config_for_run(params.get("preset", "default"), sections,
                                                              runs, REFERENCE_RUN, seed), progress))


def load(params_path: str | Path = "params.yaml") -> tuple[dict, BudgetConfig]:
    """The params file and its checked `budget:` section."""
    params = read_params(params_path)
    return params, BudgetConfig.from_params(params, str(params_path))
MONITORS = ("cls_perplexity", "tok_perplexity", "cls_information", "tok_information")


def pretrain_log(bc: BudgetConfig, root: str | Path, pipeline_dirs: list[str | Path], run: str,
                 epochs: int, seed: int) -> Path | None:
    folders = ([Path(d) for d in pipeline_dirs] if epochs == bc.base_epochs else [Path(root) / f"e{epochs}"])
    for folder in folders:
        path = folder / "runs" / run / f"seed{seed}" / "pretrain" / "log.csv"
        if path.is_file() and (epochs == bc.base_epochs or Job(run, epochs, seed).done(root)):
            return path
    return None


# --------------------------------------------------------------------------------------------
# Tables and text
# --------------------------------------------------------------------------------------------
def metric_values(rows: list[dict], run: str, epochs: int, readout: str | None, metric: str) -> list[float]:
    """One value per seed (a run metric repeats on each readout row: taken once)."""
    chosen = {r["seed"]: r[metric] for r in rows if r["run"] == run and r["epochs"] == epochs
              and readout in (None, r["readout"]) and r.get(metric) is not None}
    return list(chosen.values())
