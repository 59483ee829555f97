"""Reading the configuration: presets, `params.yaml` and a run's overrides, merged and checked.

Every knob lives in a dataclass of `pemae.config.schema`. The dataclass defaults *are* the `default` preset (the
embedded Fashion-MNIST run that `dvc repro` trains); `pemae.config.presets` holds the `tiny` (CI) and
`paper` (ImageNet ViT-B/16) presets as overrides on top of them. A config is resolved as

    preset  <-  params.yaml sections  <-  the run's own overrides (params.yaml `runs.<name>`)

and validated once, before any work starts: an unknown key, a value of the wrong type or a value
out of range raises one `ConfigError` that names every offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from pemae.config.schema import Config, ConfigError


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


# --------------------------------------------------------------------------------------------
# Resolution and validation
# --------------------------------------------------------------------------------------------
def deep_merge(base: dict, override: dict | None) -> dict:
    """Return `base` with `override` merged in, recursively for nested dicts."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _coerce(key: str, value: Any, annotation: Any, errors: list[str]) -> Any:
    """Check `value` against a field annotation, appending "key = value: expected ..." to `errors`
    on a mismatch. Ints are accepted (and converted) for floats, as are YAML 1.1's number strings
    such as `1e-3`; a bool is never taken for a number, nor a number for a bool."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            errors.append(f"{key} = {value!r}: expected a list, got {value!r}")
            return value
        return [_coerce(f"{key}[{i}]", v, item_type, errors) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in TYPE_NAMES and not _is_a(value, annotation):
        errors.append(f"{key} = {value!r}: expected {TYPE_NAMES[annotation]}, got {value!r}")
    return value


def _is_a(value: Any, annotation: type) -> bool:
    """isinstance, except that a bool is not a number (YAML's `true` is no count)."""
    if isinstance(value, bool):
        return annotation is bool
    return isinstance(value, annotation)


def _build_section(name: str, cls: type, values: dict, errors: list[str]):
    if not isinstance(values, dict):
        errors.append(f"{name}: expected a mapping of keys to values, got {values!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            errors.append(f"{name}.{key}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for key, f in fields.items():
        if key not in values:
            continue
        reported = len(errors)
        value = _coerce(f"{name}.{key}", values[key], hints[key], errors)
        check = f.metadata.get("check")
        if check is not None and len(errors) == reported and not isinstance(value, list):
            try:  # only values of the right type get here: a type error is reported alone
                ok = check(value)
            except TypeError:
                ok = False
            if not ok:
                errors.append(f"{name}.{key} = {value!r}: {f.metadata['what']}")
        kwargs[key] = value
    return cls(**kwargs)


def _cross_checks(cfg: Config, errors: list[str]) -> None:
    d, m = cfg.data, cfg.model
    if d.img_size % m.patch_size:
        errors.append(
            f"model.patch_size = {m.patch_size} does not divide data.img_size = {d.img_size}"
        )
    if m.embed_dim % m.num_heads:
        errors.append(f"model.num_heads = {m.num_heads} does not divide model.embed_dim = {m.embed_dim}")
    if m.decoder_dim % m.decoder_heads:
        errors.append(
            f"model.decoder_heads = {m.decoder_heads} does not divide "
            f"model.decoder_dim = {m.decoder_dim}"
        )
    for key in ("mean", "std"):
        values = getattr(d, key)
        if values and len(values) != d.in_chans:
            errors.append(f"data.{key} has {len(values)} values but data.in_chans = {d.in_chans}")
    if any(s <= 0 for s in d.std):
        errors.append("data.std: every value must be > 0")
    for section in ("pretrain", "finetune"):
        betas = getattr(cfg, section).betas
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            errors.append(f"{section}.betas = {betas}: expected two values in [0, 1)")
    fc = cfg.finetune
    if fc.mixes and fc.batch_size % 2:
        errors.append(f"finetune.batch_size = {fc.batch_size}: mixup/cutmix (finetune.mixup = "
                      f"{fc.mixup}, finetune.cutmix = {fc.cutmix}) need an even batch")
    me = cfg.method
    if me.name == "pemae" and me.recon_target == "pixel" and me.lambda_tok > 0:
        errors.append("method.lambda_tok needs method.recon_target = 'token' (data-token pseudo "
                      "labels are predicted from the reconstructed tokens); set it to 0")
    if me.name == "pemae" and me.lambda_rec + me.lambda_cls + me.lambda_tok == 0:
        errors.append("method: lambda_rec, lambda_cls and lambda_tok are all 0: nothing to learn")
    if d.dataset == "imagefolder" and not d.root:
        errors.append("data.root: required for dataset 'imagefolder' (a folder with train/ and val/)")
    if cfg.dense.min_items > cfg.dense.max_items:
        errors.append(f"dense.min_items = {cfg.dense.min_items} exceeds "
                      f"dense.max_items = {cfg.dense.max_items}")
    if cfg.pretrain.micro_batch_size and cfg.pretrain.accum_steps != 1:
        errors.append(f"pretrain.accum_steps = {cfg.pretrain.accum_steps} and pretrain.micro_batch_size = "
                      f"{cfg.pretrain.micro_batch_size}: set one (micro_batch_size derives the accumulation)")
    if cfg.pretrain.batch_size % cfg.pretrain.accum_steps:
        errors.append(f"pretrain.accum_steps = {cfg.pretrain.accum_steps} does not divide "
                      f"pretrain.batch_size = {cfg.pretrain.batch_size}")
    for section in ("pretrain", "finetune"):
        sec = getattr(cfg, section)
        if sec.min_lr > sec.base_lr * sec.batch_size / 256 and sec.epochs > 0:
            errors.append(f"{section}.min_lr = {sec.min_lr} exceeds the peak lr")


def build_config(
    preset: str = "default",
    sections: dict | None = None,
    run_overrides: dict | None = None,
) -> Config:
    """Resolve preset <- sections <- run overrides into a validated `Config`.

    `sections` maps section names (data, model, ...) to dicts of keys; a section given as
    None keeps the preset's values (so notebooks can pass their injected parameters through).
    """
    from pemae.config.presets import PRESETS

    if preset not in PRESETS:
        raise ConfigError(f"preset = {preset!r}: unknown (known: {', '.join(PRESETS)})")
    merged = deep_merge(PRESETS[preset], {k: v for k, v in (sections or {}).items() if v is not None})
    merged = deep_merge(merged, run_overrides)

    errors: list[str] = []
    for key in merged:
        if key not in SECTIONS:
            errors.append(f"{key}: unknown section (known: {', '.join(SECTIONS)})")
    hints = typing.get_type_hints(Config)
    built = {name: _build_section(name, hints[name], merged.get(name, {}), errors) for name in SECTIONS}
    cfg = Config(**built)
    if not errors:
        _cross_checks(cfg, errors)
    if errors:  # one error on one line, several one per line
        raise ConfigError("invalid configuration:" + ("\n  " if len(errors) > 1 else " ")
                          + "\n  ".join(errors))
    return cfg


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(old: dict, new: dict, sections: tuple[str, ...] = SECTIONS,
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys of `sections` whose values differ, as "key: old -> new" lines."""
    a = flatten({k: old.get(k, {}) for k in sections})
    b = flatten({k: new.get(k, {}) for k in sections})
    absent = "<absent>"
    return [f"{k}: {a.get(k, absent)!r} -> {b.get(k, absent)!r}"
            for k in sorted(a.keys() | b.keys()) if k not in ignore and a.get(k) != b.get(k)]


PIPELINE_KEYS = ("preset", "runs", "seeds", "extra_seeds", "comparisons", "claims", "ablations", "small_data",
                 "budget")  # params.yaml's keys besides SECTIONS


def with_seed(overrides: dict | None, seed: int | None) -> dict:
    """`overrides` with `seed` as the seed of pretraining, fine-tuning and the probes (one
    pipeline seed drives all three); `seed` None leaves them as they are."""
    if seed is None:
        return dict(overrides or {})
    seeds = {section: {"seed": seed} for section in ("pretrain", "finetune", "evaluation")}
    return deep_merge(overrides or {}, seeds)


def config_for_run(preset: str, sections: dict, runs: dict | None, run: str | None,
                   seed: int | None = None, overrides: dict | None = None,
                   where: str = "") -> Config:
    """The config of one named run: `runs[run]` holds that run's overrides (params.yaml `runs:`),
    then `overrides` (nested sections) on top, then the pipeline `seed`.

    With `runs` None (a notebook run on its own) the run has no overrides of its own.
    """
    if runs is not None and run is not None and run not in runs:
        raise ConfigError(f"run {run!r} is not defined under `runs:` or `ablations:`{where} "
                          f"(known: {', '.join(runs)})")
    run_overrides = deep_merge((runs or {}).get(run) or {} if run else {}, overrides)
    return build_config(preset, sections, with_seed(run_overrides, seed))


def named_runs(runs: dict | None, ablations: dict | None = None) -> dict | None:
    """Every run a stage may name: params.yaml `runs:` (the pipeline's) and `ablations:` (trained
    by study/dvc.yaml); None when both are None (a notebook run on its own)."""
    if runs is None and ablations is None:
        return None
    return {**(ablations or {}), **(runs or {})}


def yaml_error(source: str, err: yaml.YAMLError) -> ConfigError:
    """A YAML syntax error as one line naming `source` (a file, or a --set), line and column."""
    mark = getattr(err, "problem_mark", None)
    where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    return ConfigError(f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else ""))


def read_params(path: str | Path = "params.yaml") -> dict:
    """The params file as a dict, its top-level keys checked; a missing file, broken YAML or a
    file that is not a mapping raise a ConfigError naming the file (and the line and column)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist (run from the repository root, or "
                          "name the file with --params)")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise yaml_error(str(path), err) from err
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (preset, data, model, ...), "
                          f"got a {type(params).__name__}")
    unknown = sorted(set(params) - set(SECTIONS) - set(PIPELINE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(PIPELINE_KEYS + SECTIONS)})")
    return params


def load_params(path: str | Path = "params.yaml", run: str | None = None,
                overrides: dict | None = None, seed: int | None = None) -> Config:
    """Resolve the config of one run from a DVC params file (preset, sections, `runs`), with
    `overrides` (nested sections) on top of the run's own, and the pipeline `seed`."""
    params = read_params(path)
    sections = {k: params.get(k) for k in SECTIONS}
    return config_for_run(params.get("preset", "default"), sections,
                          named_runs(params.get("runs") or {}, params.get("ablations")), run,
                          seed, overrides, where=f" in {path}")
