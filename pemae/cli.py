"""Command line: pretraining outside the notebooks, in one process or under torchrun.

    python -m pemae.cli pretrain --run pemae --out runs/pemae                  # params.yaml
    python -m pemae.cli pretrain --preset paper --set data.root=/data/imagenet \\
        --set method.name=pemae --out runs/paper_pemae                          # a preset
    torchrun --standalone --nproc_per_node 8 -m pemae.cli pretrain ...         # 8 processes

`--set section.key=value` (repeatable; the value is read as YAML) goes on top of the run's
own overrides. Restarting the same command after an interruption resumes the run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from pemae.config import Config, ConfigError, build_config, load_params


def parse_sets(items: list[str]) -> dict:
    """["pretrain.epochs=3", "data.root=/x"] -> {"pretrain": {"epochs": 3}, "data": {"root": "/x"}}."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. pretrain.epochs=3")
        out.setdefault(parts[0], {})[parts[1]] = yaml.safe_load(value)
    return out


def resolve(args: argparse.Namespace) -> Config:
    """The config of the command: a preset, or a params file (and run), then the --set values."""
    overrides = parse_sets(args.set)
    if args.preset is not None:
        if args.run is not None:
            raise ConfigError("--run names a run of a params file; it does not combine with --preset")
        return build_config(args.preset, overrides)
    return load_params(args.params, args.run, overrides)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pemae.cli", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pretrain", help="pretrain one run (resumes an interrupted one)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="DVC params file")
    p.add_argument("--run", default=None, help="a run under `runs:` in the params file")
    p.add_argument("--preset", default=None, help="tiny, default or paper (instead of --params)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from pemae.pretrain import pretrain  # after argument errors, which need no torch

    pretrain(resolve(args), args.out, progress=not args.no_progress)


if __name__ == "__main__":
    main()
