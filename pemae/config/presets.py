"""Named presets, as overrides on top of the dataclass defaults in `pemae.config.params`.

- `tiny`: a few hundred images (512 to train, 57 for validation) and one epoch: seconds on a CPU (CI, nbval, notebook defaults).
- `default`: the embedded Fashion-MNIST run that `dvc repro` trains (the dataclass defaults).
- `paper`: ImageNet-1K, ViT-B/16 at 224 px, MAE's recipe (He et al. 2022, Tables 8-10, with the
  ViT-B fine-tuning values of MAE's FINETUNE.md): pretraining, fine-tuning and linear probing;
  batch 4096 is reached with gradient accumulation where fewer GPUs are available.
  tests/test_paper_recipe.py checks it key by key against the published tables.
"""


TINY = {
    "data": {"train_subset": 569, "test_subset": 256},  # 512 train + 57 val (val_fraction 0.1)
    "model": {"embed_dim": 64, "depth": 2, "num_heads": 2, "decoder_dim": 32, "decoder_depth": 1,
              "decoder_heads": 2},
    "method": {"num_prototypes": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
    "pretrain": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0.5, "log_every": 1,
                 "min_steps_per_epoch": 0},
    "finetune": {"epochs": 1, "batch_size": 64, "train_subset": 256, "warmup_epochs": 0.2},
    "evaluation": {"batch_size": 256, "linear_epochs": 5},
    "dense": {"train_scenes": 64, "val_scenes": 16, "test_scenes": 32, "epochs": 2, "batch_size": 32},
}

PAPER = {
    # every value of MAE's recipe is set here, even where it equals the CPU default, so that
    # tuning the default preset cannot move the paper's
    "data": {"dataset": "imagefolder", "img_size": 224, "in_chans": 3, "download": False,
             "crop_min_scale": 0.2, "hflip": True, "num_workers": 10},
    "model": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0,
              "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16, "mask_ratio": 0.75,
              "norm_pix_loss": True},
    "method": {"num_prototypes": 8192, "head_hidden_dim": 2048, "head_bottleneck_dim": 256,
               "freeze_last_layer_epochs": 1.0},
    # MAE's Table 8; batch 4096 on any number of GPUs: at most 128 images per GPU per pass, the
    # rest accumulated (8 GPUs x 128 x 4 steps; 1 GPU x 128 x 32)
    "pretrain": {"epochs": 800, "batch_size": 4096, "micro_batch_size": 128, "base_lr": 1.5e-4,
                 "min_lr": 0.0, "warmup_epochs": 40, "weight_decay": 0.05, "betas": [0.9, 0.95],
                 "log_every": 50, "checkpoint_every": 1000},
    # MAE's Table 9 with FINETUNE.md's ViT-B values (blr 5e-4, layer decay 0.65); timm's
    # RandAugment (9, 0.5), random erasing, mixup and cutmix
    "finetune": {"epochs": 100, "batch_size": 1024, "micro_batch_size": 128, "base_lr": 5e-4,
                 "min_lr": 1e-6,
                 "warmup_epochs": 5, "weight_decay": 0.05, "betas": [0.9, 0.999],
                 "layer_decay": 0.65, "drop_path": 0.1, "label_smoothing": 0.1,
                 "global_pool": "avg", "crop_min_scale": 0.08,
                 "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "mixup": 0.8,
                 "cutmix": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5,
                 "checkpoint_every": 1000},
    # MAE's Table 10: LARS, base lr 0.1 at batch 16384 (lr 6.4), 90 epochs, 10 warm-up, no decay
    "evaluation": {"batch_size": 1024, "linear_optimizer": "lars", "linear_epochs": 90,
                   "linear_warmup_epochs": 10, "linear_base_lr": 0.1, "linear_batch_size": 16384,
                   "linear_weight_decay": 0.0},
    # the dense probe (pemae.eval.dense) at the CPU default's values, every one set: the paper's
    # segmentation (ADE20K, UperNet) is out of this project's scope. ImageNet items are photos, so
    # their silhouettes (pixels brighter than the threshold) are close to their bounding boxes
    "dense": {"train_scenes": 2000, "val_scenes": 500, "test_scenes": 1000, "canvas_scale": 2,
              "min_items": 2, "max_items": 4, "threshold": 0.1, "scene_seed": 0, "epochs": 5,
              "lr": 3e-2, "weight_decay": 0.0, "batch_size": 128},
}

PRESETS = {"tiny": TINY, "default": {}, "paper": PAPER}
