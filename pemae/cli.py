"""Command line: pretrain, evaluate, finetune and dense, in one process or under torchrun.

    python -m pemae.cli pretrain --run pemae --out runs/pemae                  # params.yaml
    python -m pemae.cli pretrain --preset paper --set data.root=/data/imagenet \\
        --set method.name=pemae --out runs/paper_pemae                          # a preset
    torchrun --standalone --nproc_per_node 8 -m pemae.cli pretrain ...         # 8 processes
    python -m pemae.cli evaluate --run pemae --out runs/pemae   # k-NN, linear probe: evaluate.json
    python -m pemae.cli finetune --run pemae --out runs/pemae   # finetune/log.csv, summary.json
    python -m pemae.cli dense --run pemae --out runs/pemae      # dense probe: dense.json

`--out` is the run's folder: `pretrain` writes its encoder.pt there, which `evaluate`, `finetune`
and `dense` read (`--encoder PATH` reads another), writing beside it the files the notebooks
write (`evaluate --pixels`: the raw-pixel baseline, no encoder). Each takes the same `--preset`,
`--params`/`--run` and `--set` as `pretrain`, and runs under torchrun as it does.

`--set section.key=value` (repeatable; the value is read as YAML) goes on top of the run's
own overrides. Restarting the same command after an interruption resumes the run (`finetune`:
with `finetune.checkpoint_every` > 0); rerunning `pretrain` after the run completed has nothing to
do (`--force` trains it again). A mistake in the input (a key, a value, a file, an image, a
missing encoder) and a diverged run (a non-finite loss: the step, the terms and the last good
checkpoint) are reported on stderr in one line without a traceback, with exit code 2; `--debug`
shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from pemae.config.params import build_config, deep_merge, load_params, yaml_error
from pemae.config.schema import Config, ConfigError


USAGE_ERROR = 2  # argparse's exit code for a bad command line; the same for a bad input


def parse_sets(items: list[str]) -> dict:
    """["pretrain.epochs=3", "data.root=/x"] -> {"pretrain": {"epochs": 3}, "data": {"root": "/x"}}."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. pretrain.epochs=3")
        try:
            out.setdefault(parts[0], {})[parts[1]] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise yaml_error(f"--set {item!r}", err) from err
    return out


def resolve(args: argparse.Namespace) -> Config:
    """The config of the command: a preset, or a params file (and run), then the --set values,
    then --force (pretrain.overwrite)."""
    overrides = parse_sets(args.set)
    if getattr(args, "force", False):
        overrides = deep_merge(overrides, {"pretrain": {"overwrite": True}})
    if args.preset is not None:
        if args.run is not None:
            raise ConfigError("--run names a run of a params file; it does not combine with --preset")
        return build_config(args.preset, overrides)
    return load_params(args.params, args.run, overrides)


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that a user fixes in the input (a key, a value, a file, an image, a damaged
    checkpoint): reported as their message alone. Those of modules not imported yet cannot have
    been raised, so they are not imported (with torch) just to be checked."""
    found: list[type[BaseException]] = [ConfigError, yaml.YAMLError, FileNotFoundError]
    for module, name in (("pemae.data.images", "BadImageError"),
                         ("pemae.engine.checkpoint", "DamagedCheckpointError"),
                         ("pemae.engine.pretrain", "NonFiniteLossError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def error_message(err: BaseException) -> str:
    """The message of a user error; a YAML error names its file (where known), line and column."""
    if isinstance(err, yaml.YAMLError):
        source = getattr(getattr(err, "problem_mark", None), "name", "") or ""
        return str(yaml_error(source if not source.startswith("<") else "YAML input", err))
    return str(err)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every command shares: where the config comes from, --out, and the output."""
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="DVC params file")
    p.add_argument("--run", default=None, help="a run under `runs:` in the params file")
    p.add_argument("--preset", default=None, help="tiny, default or paper (instead of --params)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", type=Path, required=True, help="the run's output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error")


def add_encoder_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", type=Path, default=None,
                   help="the exported encoder to read (default: OUT/encoder.pt, from pretrain)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pemae.cli", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pretrain", help="pretrain one run (resumes an interrupted one)")
    add_config_arguments(p)
    p.add_argument("--force", action="store_true",
                   help="train again over a completed run in --out (sets pretrain.overwrite)")
    p = commands.add_parser("evaluate", help="k-NN and linear probe of the frozen encoder "
                                             "(CLS and average readouts): OUT/evaluate.json")
    add_config_arguments(p)
    source = p.add_mutually_exclusive_group()
    add_encoder_argument(source)
    source.add_argument("--pixels", action="store_true",
                        help="evaluate the raw pixels (the baseline) instead of an encoder")
    for name, text in (("finetune", "fine-tune the encoder: OUT/finetune/log.csv and summary.json "
                                    "(resumes an interrupted run)"),
                       ("dense", "the dense probe of the frozen encoder: OUT/dense.json (and "
                                 "dense_maps.pt, for the figures)")):
        p = commands.add_parser(name, help=text)
        add_config_arguments(p)
        add_encoder_argument(p)
    return parser


def encoder_path(args: argparse.Namespace) -> Path:
    """--encoder, or the encoder.pt that `pretrain --out OUT` wrote into OUT; a missing file is
    an input error that names it."""
    if args.encoder is not None:
        if not args.encoder.is_file():
            raise FileNotFoundError(f"--encoder {args.encoder} does not exist")
        return args.encoder
    path = args.out / "encoder.pt"
    if not path.is_file():
        raise FileNotFoundError(f"encoder {path} does not exist: pretrain into {args.out} first "
                                f"(python -m pemae.cli pretrain ... --out {args.out}) or name an "
                                "encoder with --encoder")
    return path


def write_json(path: Path, values: dict) -> None:
    """Write `values` as the notebooks do, from rank 0 only, and say where."""
    from pemae.engine.distributed import is_main_process

    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values, indent=2) + "\n")
        print(f"wrote {path}: {json.dumps(values)}")


def run_evaluate(cfg: Config, args: argparse.Namespace) -> None:
    """k-NN and linear probe of the encoder (or the pixels) into OUT/evaluate.json."""
    encoder = None if args.pixels else encoder_path(args)  # before torch is imported
    from pemae.eval.probes import evaluate_encoder, evaluate_pixels

    progress = not args.no_progress
    if encoder is None:
        metrics = evaluate_pixels(cfg, progress)
    else:
        metrics = evaluate_encoder(cfg, encoder, progress)
    write_json(args.out / "evaluate.json", metrics)


def run_finetune(cfg: Config, args: argparse.Namespace) -> None:
    """Fine-tune the encoder into OUT/finetune (log.csv, summary.json, checkpoints)."""
    encoder = encoder_path(args)
    from pemae.engine.distributed import is_main_process
    from pemae.engine.finetune import finetune

    summary = finetune(cfg, encoder, args.out / "finetune", progress=not args.no_progress)
    if is_main_process():
        print(f"fine-tuned into {args.out / 'finetune'}: {json.dumps(summary)}")


def run_dense(cfg: Config, args: argparse.Namespace) -> None:
    """The dense probe of the encoder into OUT/dense.json, and OUT/dense_maps.pt for the figures."""
    encoder = encoder_path(args)
    from pemae.engine import checkpoint, distributed
    from pemae.eval.dense import dense_probe_encoder
    from pemae.report.dense_maps import figure_maps

    procs, device = distributed.start(cfg.pretrain.device)
    try:
        probe = dense_probe_encoder(cfg, checkpoint.load_encoder(encoder).eval(), device,
                                    not args.no_progress, procs)
        write_json(args.out / "dense.json", probe.metrics)
        if procs.is_main:
            checkpoint.save_atomic(figure_maps(probe), args.out / "dense_maps.pt")
    finally:
        distributed.stop(procs)


def run(args: argparse.Namespace) -> None:
    """Run the command of `args`; errors propagate."""
    config = resolve(args)
    if args.command == "pretrain":
        from pemae.engine.pretrain import pretrain  # after the config errors, which need no torch

        pretrain(config, args.out, progress=not args.no_progress)
    else:
        command = {"evaluate": run_evaluate, "finetune": run_finetune, "dense": run_dense}
        command[args.command](config, args)


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` and run it; an input error exits with code 2 and its message on stderr (the
    traceback too with --debug)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except Exception as err:
        if args.debug or not isinstance(err, user_errors()):
            raise
        parser.exit(USAGE_ERROR, f"{parser.prog}: error: {error_message(err)}\n")


if __name__ == "__main__":
    main()
