"""The typed config: one dataclass per section of `params.yaml` (data, model, method, pretrain,
finetune, evaluation, dense), each field checked as it is built, and `ConfigError`, the one error
a bad value raises (it names the key)."""

from __future__ import annotations

import dataclasses
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
    """The dense (segmentation) linear probe of `pemae.eval.dense`: composed multi-object scenes, a
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
