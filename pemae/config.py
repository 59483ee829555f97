"""Typed configuration.

Every knob lives in a dataclass below. The dataclass defaults *are* the `default` preset (the
embedded Fashion-MNIST run that `dvc repro` trains); `pemae.presets` holds the `tiny` (CI) and
`paper` (ImageNet ViT-B/16) presets as overrides on top of them. A config is resolved as

    preset  <-  params.yaml sections  <-  the run's own overrides (params.yaml `runs.<name>`)

and validated once, before any work starts: an unknown key, a value of the wrong type or a value
out of range raises one `ConfigError` that names every offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key(s)."""


# --------------------------------------------------------------------------------------------
# Range checks, attached to fields as metadata
# --------------------------------------------------------------------------------------------
def _check(predicate: Callable[[Any], bool], what: str) -> dict:
    return {"check": predicate, "what": what}


POSITIVE = _check(lambda v: v > 0, "must be > 0")
NON_NEGATIVE = _check(lambda v: v >= 0, "must be >= 0")
OPEN_UNIT = _check(lambda v: 0 < v < 1, "must lie strictly between 0 and 1")
UNIT = _check(lambda v: 0 <= v <= 1, "must lie in [0, 1]")
HALF_OPEN_UNIT = _check(lambda v: 0 < v <= 1, "must lie in (0, 1]")


def one_of(*choices) -> dict:
    return _check(lambda v: v in choices, f"must be one of {', '.join(map(str, choices))}")


def knob(default: Any, meta: dict | None = None):
    """A config field; lists get a fresh copy per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta or {})
    return field(default=default, metadata=meta or {})


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    dataset: str = knob("fashion_mnist", one_of("fashion_mnist", "cifar10", "imagefolder"))
    root: str = ""  # folder with the dataset's files; "" = the dataset's usual places
    download: bool = True  # let torchvision download when the files are nowhere on disk
    img_size: int = knob(28, POSITIVE)  # images are cropped/resized to img_size x img_size
    in_chans: int = knob(1, one_of(1, 3))  # 1 = grayscale, 3 = RGB (images are converted)
    mean: list[float] = knob([])  # [] = the dataset's own statistics
    std: list[float] = knob([])
    train_subset: int = knob(0, NON_NEGATIVE)  # a fixed random subset of N images; 0 = all
    test_subset: int = knob(0, NON_NEGATIVE)
    # the validation split: this fraction of the (subset of the) training images, drawn once by
    # split_seed, is held out of every training step (pretraining, fine-tuning, probes) and is
    # what every choice of knob is made on; the test split is read for the final table only
    val_fraction: float = knob(0.1, _check(lambda v: 0 <= v < 1, "must lie in [0, 1)"))
    split_seed: int = knob(0, NON_NEGATIVE)
    crop_min_scale: float = knob(0.2, HALF_OPEN_UNIT)  # MAE's RandomResizedCrop(scale=(0.2, 1))
    hflip: bool = True
    num_workers: int = knob(0, NON_NEGATIVE)
    skip_bad: bool = False  # an unreadable image: false = stop with its path; true = skip, count


@dataclass
class ModelConfig:
    patch_size: int = knob(4, POSITIVE)
    embed_dim: int = knob(128, POSITIVE)
    depth: int = knob(4, POSITIVE)
    num_heads: int = knob(4, POSITIVE)
    mlp_ratio: float = knob(4.0, POSITIVE)
    decoder_dim: int = knob(96, POSITIVE)
    decoder_depth: int = knob(2, POSITIVE)
    decoder_heads: int = knob(4, POSITIVE)
    mask_ratio: float = knob(0.75, OPEN_UNIT)
    norm_pix_loss: bool = True  # MAE: regress per-patch normalised pixels


@dataclass
class MethodConfig:
    """The pretraining method. `mae`: pixel targets, no teachers (only `name` matters).

    `pemae`: token reconstruction and CLS / data-token pseudo labels from EMA teachers
    (docs/method.md says which choices are the paper's and which are ours).
    """

    name: str = knob("pemae", one_of("mae", "pemae"))
    teachers: str = knob("dual", one_of("dual", "single"))  # labelling + reconstruction, or one
    recon_target: str = knob("token", one_of("token", "pixel"))
    recon_loss: str = knob("mse", one_of("mse", "cosine"))
    teacher_view: str = knob("full", one_of("full", "multifold"))  # multifold: masked patches only
    folds: int = knob(4, POSITIVE)  # teacher_view multifold: masked patches split in F folds
    views: int = knob(1, one_of(1, 2))  # 2: the CLS pseudo label comes from a second view (ours)
    balancing: str = knob("centering", one_of("centering", "sinkhorn"))
    sinkhorn_iterations: int = knob(3, POSITIVE)
    lambda_rec: float = knob(1.0, NON_NEGATIVE)
    lambda_cls: float = knob(1.0, NON_NEGATIVE)  # 0 = no CLS pseudo labels
    lambda_tok: float = knob(1.0, NON_NEGATIVE)  # 0 = no data-token pseudo labels
    num_prototypes: int = knob(1024, POSITIVE)  # K
    head_hidden_dim: int = knob(256, POSITIVE)
    head_bottleneck_dim: int = knob(64, POSITIVE)
    head_layers: int = knob(3, POSITIVE)
    student_temp: float = knob(0.1, POSITIVE)
    teacher_temp: float = knob(0.07, POSITIVE)
    teacher_temp_start: float = knob(0.04, POSITIVE)  # linear warm-up from here to teacher_temp ...
    teacher_temp_warmup: float = knob(0.3, UNIT)  # ... over this fraction of the steps
    center_momentum: float = knob(0.9, UNIT)
    momentum_rec: float = knob(0.999, UNIT)  # reconstruction teacher: cosine m0 -> 1
    momentum_lab: float = knob(0.996, UNIT)  # labelling teacher: cosine m0 -> 1
    freeze_last_layer_epochs: float = knob(0.25, NON_NEGATIVE)  # prototypes frozen this long


@dataclass
class PretrainConfig:
    epochs: int = knob(2, NON_NEGATIVE)  # 0 = no training: the randomly initialised baseline
    batch_size: int = knob(256, POSITIVE)  # the global batch: all processes x accum_steps
    min_steps_per_epoch: int = knob(20, NON_NEGATIVE)  # small data: halve the batch until met
    accum_steps: int = knob(1, POSITIVE)  # micro-batches per step: batch_size / (world x accum) each
    # images per process per forward pass; > 0 derives accum_steps = batch_size / (world x this),
    # so one recipe (the global batch) runs on any number of GPUs; 0 = use accum_steps as given
    micro_batch_size: int = knob(0, NON_NEGATIVE)
    base_lr: float = knob(1.5e-3, NON_NEGATIVE)  # lr = base_lr * batch_size / 256
    min_lr: float = knob(0.0, NON_NEGATIVE)
    warmup_epochs: float = knob(0.3, NON_NEGATIVE)
    weight_decay: float = knob(0.05, NON_NEGATIVE)
    betas: list[float] = knob([0.9, 0.95])
    seed: int = 0
    device: str = knob("auto", one_of("auto", "cpu", "cuda"))
    # the precision of every loop on the device (pretraining, fine-tuning, evaluation): auto = bf16
    # on a GPU with bf16 tensor cores (compute capability >= 8.0), fp16 (loss-scaled) on older
    # GPUs, off (fp32) on the CPU
    amp: str = knob("auto", one_of("auto", "off", "bf16", "fp16"))
    # torch.compile the training forward (student, heads, teachers, losses); the compile time is in
    # summary.json. Not bit-identical to eager (fused kernels); results/bench/bench.md measures it
    compile: bool = False
    log_every: int = knob(10, POSITIVE)  # steps between logged rows
    checkpoint_every: int = knob(100, NON_NEGATIVE)  # steps between `last.pt` saves; 0 = end only
    resume: bool = True  # continue from `last.pt` of an interrupted run with the same config
    # a folder that holds a completed run (its checkpoint.pt): false = nothing to do with the same
    # config, refused with another; true (`--force`) = train again and replace it
    overwrite: bool = False


# timm's auto-augment policies (the first part of the policy string): RandAugment, AugMix,
# AutoAugment, 3-Augment; "" = none
AUTO_AUGMENT_POLICIES = ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a")


def _auto_augment_ok(value: str) -> bool:
    return value == "" or value.split("-")[0] in AUTO_AUGMENT_POLICIES


@dataclass
class FinetuneConfig:
    """Chosen on the validation split for the default preset (results/search/finetune.jsonl).

    The augmentation knobs (auto_augment, re_prob) and the mixing knobs (mixup, cutmix) switch
    to timm's implementations, MAE's fine-tuning recipe; at their defaults (off) the light
    crop + flip path and the plain label-smoothed cross-entropy run unchanged.
    """

    epochs: int = knob(1, POSITIVE)
    batch_size: int = knob(128, POSITIVE)  # the global batch: all processes x accumulation steps
    # images per process per forward pass; > 0 accumulates batch_size / (world x this) micro-batches
    # per step (the same update on any number of GPUs); 0 = the batch split over the processes
    micro_batch_size: int = knob(0, NON_NEGATIVE)
    base_lr: float = knob(4e-3, NON_NEGATIVE)  # lr = base_lr * batch_size / 256
    min_lr: float = knob(1e-6, NON_NEGATIVE)
    warmup_epochs: float = knob(0.1, NON_NEGATIVE)  # at least 5% of the steps (schedules.py)
    weight_decay: float = knob(0.05, NON_NEGATIVE)
    betas: list[float] = knob([0.9, 0.999])  # AdamW's (MAE: torch's default)
    layer_decay: float = knob(0.75, HALF_OPEN_UNIT)  # 1 = none (training from scratch)
    drop_path: float = knob(0.1, UNIT)
    label_smoothing: float = knob(0.1, UNIT)  # with mixup/cutmix: smooths the mixed targets
    global_pool: str = knob("avg", one_of("avg", "token"))
    crop_min_scale: float = knob(1.0, HALF_OPEN_UNIT)  # RandomResizedCrop(scale=(this, 1))
    # timm's policy string, e.g. rand-m9-mstd0.5-inc1 (RandAugment 9, 0.5: MAE); "" = none
    auto_augment: str = knob("", _check(_auto_augment_ok, "must be '' or a timm policy starting "
                                        f"with one of {', '.join(AUTO_AUGMENT_POLICIES)}"))
    re_prob: float = knob(0.0, UNIT)  # random erasing probability (timm, per-pixel noise)
    mixup: float = knob(0.0, NON_NEGATIVE)  # mixup's Beta alpha (timm Mixup); 0 = off
    cutmix: float = knob(0.0, NON_NEGATIVE)  # cutmix's Beta alpha; 0 = off
    mixup_prob: float = knob(1.0, UNIT)  # chance that a batch is mixed (mixup or cutmix > 0)
    mixup_switch_prob: float = knob(0.5, UNIT)  # chance of cutmix rather than mixup (both > 0)
    train_subset: int = knob(0, NON_NEGATIVE)  # labelled images used; 0 = the whole train split
    seed: int = 0
    # steps between `last.pt` saves (a rerun resumes from it; checkpoint.pt at the end); 0 = no
    # checkpoint files (an interrupted run starts over)
    checkpoint_every: int = knob(0, NON_NEGATIVE)

    @property
    def mixes(self) -> bool:
        """True when mixup or cutmix is on (soft targets, an even batch)."""
        return self.mixup > 0 or self.cutmix > 0


@dataclass
class EvalConfig:
    batch_size: int = knob(128, POSITIVE)  # feature extraction (and accuracy): 128 runs 1.6x faster than 512 on a 2-core CPU, same bits
    knn_k: int = knob(20, POSITIVE)
    knn_temperature: float = knob(0.07, POSITIVE)
    linear_optimizer: str = knob("adamw", one_of("adamw", "lars"))  # lars: MAE's (timm's)
    linear_epochs: int = knob(100, POSITIVE)
    linear_warmup_epochs: float = knob(0.0, NON_NEGATIVE)  # linear warm-up, then cosine decay
    linear_lr: float = knob(1e-3, POSITIVE)  # the peak lr, unless linear_base_lr > 0
    linear_base_lr: float = knob(0.0, NON_NEGATIVE)  # > 0: lr = this * batch / 256 (MAE's rule)
    linear_batch_size: int = knob(1024, POSITIVE)
    linear_weight_decay: float = knob(0.0, NON_NEGATIVE)
    seed: int = 0


@dataclass
class DenseConfig:
    """The dense (segmentation) linear probe of `pemae.dense`: composed multi-object scenes, a
    linear classifier per patch token of the frozen encoder. Its training seed is
    `evaluation.seed` (the pipeline seed drives every probe); the scenes are drawn by
    `scene_seed` alone, so every run and seed is scored on the same scenes."""

    train_scenes: int = knob(2000, POSITIVE)  # composed from the train split's items
    val_scenes: int = knob(500, POSITIVE)  # from the validation split's items
    test_scenes: int = knob(1000, POSITIVE)  # from the test split's items
    canvas_scale: int = knob(2, POSITIVE)  # the scene is canvas_scale * data.img_size square
    min_items: int = knob(2, POSITIVE)  # items pasted per scene: uniform in [min_items, max_items]
    max_items: int = knob(4, POSITIVE)
    # an item's silhouette: its pixels whose intensity (in [0, 1], mean over channels) exceeds this
    threshold: float = knob(0.1, _check(lambda v: 0 <= v < 1, "must lie in [0, 1)"))
    scene_seed: int = knob(0, NON_NEGATIVE)
    epochs: int = knob(5, POSITIVE)  # of the linear probe, on cached patch features
    lr: float = knob(3e-2, POSITIVE)  # AdamW's peak lr, cosine decay to 0
    weight_decay: float = knob(0.0, NON_NEGATIVE)
    batch_size: int = knob(128, POSITIVE)  # scenes per probe step


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (kept beside every output)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


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
    from pemae.presets import PRESETS

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
