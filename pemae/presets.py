"""Named presets, as overrides on top of the dataclass defaults in `pemae.config`.

- `tiny`: a few hundred images (512 to train, 57 for validation) and one epoch: seconds on a CPU (CI, nbval, notebook defaults).
- `default`: the embedded Fashion-MNIST run that `dvc repro` trains (the dataclass defaults).
- `paper`: ImageNet-1K, ViT-B/16 at 224 px, MAE's recipe (He et al. 2022, Tables 8-9); batch
  4096 is reached with gradient accumulation where fewer GPUs are available.
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
}

PAPER = {
    "data": {"dataset": "imagefolder", "img_size": 224, "in_chans": 3, "download": False,
             "num_workers": 10},
    "model": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12,
              "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16},
    "method": {"num_prototypes": 8192, "head_hidden_dim": 2048, "head_bottleneck_dim": 256,
               "freeze_last_layer_epochs": 1.0},
    # batch 4096 = 8 GPUs x 128 images x 4 accumulation steps (other GPU counts: see the README)
    "pretrain": {"epochs": 800, "batch_size": 4096, "accum_steps": 4, "base_lr": 1.5e-4,
                 "warmup_epochs": 40, "log_every": 50, "checkpoint_every": 1000},
    "finetune": {"epochs": 100, "batch_size": 1024, "base_lr": 5e-4, "warmup_epochs": 5,
                 "layer_decay": 0.65, "drop_path": 0.1, "crop_min_scale": 0.08},
    "evaluation": {"batch_size": 1024, "linear_epochs": 90, "linear_lr": 1e-3,
                   "linear_batch_size": 16384},
}

PRESETS = {"tiny": TINY, "default": {}, "paper": PAPER}
