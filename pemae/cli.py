"""Command line: pretraining outside the notebooks, in one process or under torchrun.

    python -m pemae.cli pretrain --run pemae --out runs/pemae                  # params.yaml
    python -m pemae.cli pretrain --preset paper --set data.root=/data/imagenet \\
        --set method.name=pemae --out runs/paper_pemae                          # a preset
    torchrun --standalone --nproc_per_node 8 -m pemae.cli pretrain ...         # 8 processes

`--set section.key=value` (repeatable; the value is read as YAML) goes on top of the run's
own overrides. Restarting the same command after an interruption resumes the run; rerunning it
after the run completed has nothing to do (`--force` trains it again). A mistake in the input (a
key, a value, a file, an image) is reported on stderr without a traceback, with exit code 2;
`--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from pemae.config import Config, ConfigError, build_config, deep_merge, load_params, yaml_error

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
    if args.force:
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
    for module, name in (("pemae.data", "BadImageError"), ("pemae.checkpoint", "DamagedCheckpointError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def error_message(err: BaseException) -> str:
    """The message of a user error; a YAML error names its file (where known), line and column."""
    if isinstance(err, yaml.YAMLError):
        source = getattr(getattr(err, "problem_mark", None), "name", "") or ""
        return str(yaml_error(source if not source.startswith("<") else "YAML input", err))
    return str(err)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pemae.cli", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pretrain", help="pretrain one run (resumes an interrupted one)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="DVC params file")
    p.add_argument("--run", default=None, help="a run under `runs:` in the params file")
    p.add_argument("--preset", default=None, help="tiny, default or paper (instead of --params)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--force", action="store_true",
                   help="train again over a completed run in --out (sets pretrain.overwrite)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    return parser


def run(args: argparse.Namespace) -> None:
    """Run the command of `args`; errors propagate."""
    config = resolve(args)
    from pemae.pretrain import pretrain  # after the config errors, which need no torch

    pretrain(config, args.out, progress=not args.no_progress)


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
