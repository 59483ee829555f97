"""A dense (segmentation) linear probe on frozen patch tokens, over composed multi-object scenes.

The paper claims gains in semantic segmentation; the pipeline's other evaluations read one label
per image. This probe reads one label per pixel, at a cost a 2-core CPU affords:

1. **Scenes** (`pemae.eval.scenes.build_scenes`): items of the data set pasted at random on a
   black canvas, labelled per pixel, the train / val / test scenes from the matching split only;
   every run and seed is scored on the same scenes.
2. **Features** (`resize_encoder`, `patch_features`): the frozen encoder, rebuilt for the canvas
   with its sine-cosine position embedding regenerated for the larger grid (not interpolated),
   runs once over every scene, under `pretrain.amp` (bf16 on a GPU by default, fp32 on the
   CPU); its final-norm patch tokens `[S, G, G, D]` are cached, in float32, on its device.
3. **Probe** (`train_dense_probe`): per-feature standardisation (train statistics), then one
   linear layer to 1 + num_classes logits per patch, upsampled bilinearly to the pixels and
   trained with per-pixel cross-entropy (the standard linear segmentation probe), AdamW with a
   cosine schedule, seeded by `evaluation.seed` (the pipeline seed), on the encoder's device.
   The upsampled logits `[B, K, H, W]` are made at most `LOGIT_BUDGET_BYTES` at a time
   (`logit_chunks`: whole images, else bands of patch rows), for the loss (`pixel_loss`) and
   the predicted maps (`predict_maps`) alike; a batch that fits takes the plain path, so small
   configurations compute exactly what they always did.
4. **Scores** (`dense_probe`): mIoU and pixel accuracy (%) on the test scenes, and on the
   validation scenes (what choices are made on).

The pipeline runs `dense_probe(cfg, encoder.pt)` per run and seed, the random encoder included,
and writes the dict beside `evaluate.json`; `draw_dense_predictions` draws a few test scenes,
their ground truth and each encoder's predicted map.

Under `torchrun` (`python -m pemae.cli dense`) every process composes the same scenes, extracts
the patch features of a contiguous run of whole batches of them (`pemae.engine.distributed.batch_shard`),
and the features are all-gathered, in scene order, on every process; each process then fits the
same probe on them. Scores equal one process's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pemae.config.schema import Config, DataConfig, DenseConfig
from pemae.data.transforms import normalisation
from pemae.engine import checkpoint, distributed
from pemae.engine.runtime import autocast
from pemae.engine.schedules import warmup_cosine
from pemae.eval.probes import fit_on_cached
from pemae.eval.scenes import build_scenes, canvas_size
from pemae.models.pos_embed import sincos_2d


# float32 pixel logits [n, K, h, W] made at a time, for the loss and the maps (the paper preset's
# batch of 128 scenes at 448 px with 1001 labels would take 103 GB at once; one scene: 0.8 GB)
LOGIT_BUDGET_BYTES = 1 << 30


def normalise(pixels: Tensor, data: DataConfig) -> Tensor:
    """Scenes in [0, 1] [B, C, H, W] normalised as the pipeline normalises its images."""
    mean, std = normalisation(data)
    kind = {"dtype": pixels.dtype, "device": pixels.device}
    mean_t = torch.tensor(mean, **kind).view(-1, 1, 1)  # [C, 1, 1]
    std_t = torch.tensor(std, **kind).view(-1, 1, 1)  # [C, 1, 1]
    return (pixels - mean_t) / std_t  # [B, C, H, W]


# --------------------------------------------------------------------------------------------
# The encoder on the larger canvas
# --------------------------------------------------------------------------------------------
def resize_encoder(encoder: nn.Module, img_size: int) -> nn.Module:
    """A copy of a timm ViT for `img_size` x `img_size` images, with the same weights and its
    sine-cosine patch position embedding regenerated for the new grid (pemae's encoders carry
    MAE's fixed embedding; interpolating it would blur what the weights were trained with). The
    class token keeps its own position embedding. The original is left untouched.

    An encoder whose patch position embedding is not the sine-cosine one (e.g. learned while
    fine-tuning) raises ValueError: regenerating it would discard what it learned.
    """
    patch = encoder.patch_embed.patch_size[0]
    if img_size % patch:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch}")
    prefix = encoder.num_prefix_tokens
    grid = encoder.patch_embed.grid_size[0]
    own = encoder.pos_embed.detach()[0, prefix:]  # [N, D]
    if not torch.allclose(own, sincos_2d(encoder.embed_dim, grid).to(own), atol=1e-5):
        raise ValueError("the encoder's patch position embedding is not the fixed sine-cosine one: "
                         "it cannot be regenerated for another image size")
    resized = copy.deepcopy(encoder)
    resized.set_input_size(img_size=(img_size, img_size))  # patch grid, timm's bookkeeping
    patches = sincos_2d(encoder.embed_dim, img_size // patch).to(own)  # [N', D]
    pos_embed = torch.cat([encoder.pos_embed.detach()[:, :prefix], patches[None]], dim=1)  # [1, P+N', D]
    resized.pos_embed = nn.Parameter(pos_embed, requires_grad=encoder.pos_embed.requires_grad)
    return resized


@torch.no_grad()
def patch_features(encoder: nn.Module, pixels: Tensor, data: DataConfig, batch_size: int,
                   device: torch.device, progress: bool = False, desc: str = "patch features",
                   amp: str = "auto") -> Tensor:
    """The encoder's final-norm patch tokens of every scene, on a grid: [S, C, H, W] in [0, 1]
    -> [S, G, G, D] (float32, on `device`); the encoder runs under `amp`
    (`pemae.engine.runtime.autocast`: fp32 on the CPU)."""
    grid = encoder.patch_embed.grid_size[0]
    out = []
    for start in tqdm(range(0, len(pixels), batch_size), disable=not progress, desc=desc):
        x = normalise(pixels[start:start + batch_size], data).to(device)  # [B, C, H, W]
        with autocast(device, amp):
            tokens = encoder.forward_features(x)[:, encoder.num_prefix_tokens:]  # [B, G*G, D]
        out.append(tokens.float().unflatten(1, (grid, grid)))  # [B, G, G, D]
    return torch.cat(out)  # [S, G, G, D]


# --------------------------------------------------------------------------------------------
# The linear probe
# --------------------------------------------------------------------------------------------
class DenseProbe(nn.Module):
    """Standardise each feature (fixed train statistics), then a linear map to label logits per
    patch: [B, G, G, D] -> [B, K, G, G]."""

    def __init__(self, mean: Tensor, std: Tensor, num_labels: int):
        super().__init__()
        self.register_buffer("mean", mean)  # [D]
        self.register_buffer("std", std)  # [D]
        # initialised on the CPU (the same weights whatever the device), then beside the statistics
        self.linear = nn.Linear(len(mean), num_labels, device=torch.device("cpu"))
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)
        self.linear.to(mean.device)

    def standardise(self, features: Tensor) -> Tensor:
        return (features - self.mean) / self.std  # [B, G, G, D]

    def classify(self, standardised: Tensor) -> Tensor:
        return self.linear(standardised).permute(0, 3, 1, 2)  # [B, K, G, G]

    def forward(self, features: Tensor) -> Tensor:
        return self.classify(self.standardise(features))  # [B, K, G, G]


def pixel_logits(patch_logits: Tensor, size: int) -> Tensor:
    """Patch logits [B, K, G, G] upsampled bilinearly to the pixels: [B, K, size, size]."""
    return F.interpolate(patch_logits, size=(size, size), mode="bilinear", align_corners=False)


def logit_chunks(num_images: int, num_labels: int, grid: int, size: int,
                 budget: int = LOGIT_BUDGET_BYTES) -> list[tuple[slice, slice]]:
    """How to make the pixel logits [B, K, size, size] (float32) of `num_images` images of
    `grid` x `grid` patches in pieces of at most `budget` bytes: (images, patch rows) per piece.
    One piece, everything, when it fits; else runs of whole images; else (one image alone is
    over budget, and each patch covers whole pixels) one image at a time in bands of patch rows,
    each band's upsampling reading one margin row above and below (`band_logits`). The floor,
    whatever the budget: a band of one patch row, made with its two margin rows (3 patch rows of
    one image's logits: 86 MB at the paper preset's 448 px and 1001 labels)."""
    per_image = 4 * num_labels * size * size  # bytes of one image's pixel logits
    every_row = slice(0, grid)
    if num_images * per_image <= budget:
        return [(slice(0, num_images), every_row)]
    if per_image <= budget or size % grid:
        n = max(1, budget // per_image)
        return [(slice(i, min(i + n, num_images)), every_row) for i in range(0, num_images, n)]
    per_row = 4 * num_labels * (size // grid) * size  # bytes of one patch row's pixel logits
    rows = max(1, budget // per_row - 2)  # patch rows per band, besides its two margin rows
    return [(slice(i, i + 1), slice(r, min(r + rows, grid)))
            for i in range(num_images) for r in range(0, grid, rows)]


def pixel_rows(rows: slice, grid: int, size: int) -> slice:
    """The pixel rows of the patch rows `rows` (all of them: every pixel row)."""
    return slice(rows.start * size // grid, rows.stop * size // grid)


def band_logits(patch_logits: Tensor, rows: slice, size: int) -> Tensor:
    """The pixel logits of the patch rows `rows` alone: [B, K, G, G] -> [B, K, h, size], the
    rows `pixel_rows(rows)` of `pixel_logits(patch_logits, size)`. Every row: `pixel_logits`
    itself. A band is upsampled with one margin patch row above and below (what bilinear
    interpolation reads at its edges), at the same scale, then cropped: equal to the whole map's
    rows (bit for bit when the patch size is a power of two: the interpolation weights are then
    exact)."""
    grid = patch_logits.shape[-2]
    if rows.start == 0 and rows.stop == grid:
        return pixel_logits(patch_logits, size)  # [B, K, size, size]
    scale = size // grid  # pixels per patch
    low, high = max(rows.start - 1, 0), min(rows.stop + 1, grid)  # with the margin rows
    band = F.interpolate(patch_logits[:, :, low:high], size=((high - low) * scale, size),
                         mode="bilinear", align_corners=False)  # [B, K, (high-low)*scale, size]
    top = (rows.start - low) * scale
    return band[:, :, top:top + (rows.stop - rows.start) * scale]  # [B, K, h, size]


class ChunkedPixelLoss(torch.autograd.Function):
    """`F.cross_entropy(pixel_logits(patch_logits, H), labels)` made piece by piece
    (`logit_chunks`): the forward pass takes each piece's loss and its gradient with respect to
    the patch logits, and frees the piece; the backward pass hands back the summed gradients.
    Patch logits [B, K, G, G], labels [B, H, W] -> the mean loss [].

    Each piece is upsampled channels last, the labels innermost, and scored as rows of K logits:
    the upsampling's backward then gathers each patch's pixels instead of scattering into the
    patches with atomic adds (on an H200, 3 ms instead of 36 ms for one 448 px scene of 1001
    labels)."""

    @staticmethod
    def forward(ctx, patch_logits: Tensor, labels: Tensor, chunks: list[tuple[slice, slice]]
                ) -> Tensor:
        grid, size, num_labels = patch_logits.shape[-1], labels.shape[-1], patch_logits.shape[1]
        grad = torch.zeros_like(patch_logits)  # [B, K, G, G]
        total = patch_logits.new_zeros(())  # []
        with torch.enable_grad():
            for images, rows in chunks:
                piece = patch_logits[images].detach().contiguous(memory_format=torch.channels_last)
                piece.requires_grad_()  # [n, K, G, G], stored [n, G, G, K]
                logits = band_logits(piece, rows, size)  # [n, K, h, W], stored [n, h, W, K]
                rows_of_logits = logits.permute(0, 2, 3, 1).reshape(-1, num_labels)  # [n*h*W, K]
                target = labels[images, pixel_rows(rows, grid, size)].reshape(-1)  # [n*h*W]
                loss = F.cross_entropy(rows_of_logits, target, reduction="sum")  # []
                loss = loss / labels.numel()  # [] this piece's share of the mean
                loss.backward()
                grad[images] += piece.grad
                total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None  # [B, K, G, G]


def pixel_loss(patch_logits: Tensor, labels: Tensor, budget: int = LOGIT_BUDGET_BYTES) -> Tensor:
    """Per-pixel cross-entropy (mean) of the upsampled patch logits [B, K, G, G] against label
    maps [B, H, W]: all at once when the pixel logits [B, K, H, W] fit `budget` bytes (exactly
    `F.cross_entropy(pixel_logits(...), labels)`), else piece by piece (`ChunkedPixelLoss`: the
    same loss and gradient up to float rounding, at most `budget` bytes of logits at a time)."""
    grid, size = patch_logits.shape[-1], labels.shape[-1]
    chunks = logit_chunks(len(patch_logits), patch_logits.shape[1], grid, size, budget)
    if len(chunks) == 1:
        return F.cross_entropy(pixel_logits(patch_logits, size), labels)  # logits [B, K, H, W]
    return ChunkedPixelLoss.apply(patch_logits, labels, chunks)


def feature_statistics(features: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std over every patch of every scene: [S, G, G, D] -> [D], [D]."""
    flat = features.flatten(0, 2)  # [S*G*G, D]
    return flat.mean(0), flat.std(0) + eps  # [D], [D]


def train_dense_probe(features: Tensor, labels: Tensor, num_labels: int, cfg: DenseConfig,
                      seed: int, progress: bool = False, budget: int = LOGIT_BUDGET_BYTES
                      ) -> DenseProbe:
    """Fit a `DenseProbe` on cached features [S, G, G, D] against label maps [S, H, W]: per-pixel
    cross-entropy of the upsampled logits (`pixel_loss`, at most `budget` bytes of them at a
    time), AdamW, cosine decay from `cfg.lr`, `cfg.epochs`; on the features' device."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    labels = labels.to(features.device)  # [S, H, W]
    probe = DenseProbe(*feature_statistics(features), num_labels)
    standardised = probe.standardise(features)  # [S, G, G, D], once rather than every step
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = min(cfg.batch_size, len(features))
    steps_per_epoch = len(features) // batch
    total = cfg.epochs * steps_per_epoch
    return fit_on_cached(probe, opt, len(features), batch, cfg.epochs, generator,
                         lambda step: warmup_cosine(step, total, cfg.lr, 0.0, 0),
                         lambda idx: pixel_loss(probe.classify(standardised[idx]), labels[idx],
                                                budget),  # patch logits [B, K, G, G]
                         progress, "dense probe epochs")


@torch.no_grad()
def predict_maps(probe: DenseProbe, features: Tensor, size: int, batch_size: int = 256,
                 budget: int = LOGIT_BUDGET_BYTES) -> Tensor:
    """Predicted label maps: features [S, G, G, D] -> [S, size, size] int64, on their device;
    `batch_size` scenes through the probe at a time (fewer where their patch logits would pass
    `budget` bytes), upsampled in pieces of at most `budget` bytes (`logit_chunks`; each map is
    its own, whatever the pieces)."""
    grid, num_labels = features.shape[1], probe.linear.out_features
    batch = max(1, min(batch_size, budget // (4 * num_labels * grid * grid)))
    maps = torch.empty(len(features), size, size, dtype=torch.int64,
                       device=features.device)  # [S, H, W]
    for start in range(0, len(features), batch):
        patch_logits = probe(features[start:start + batch])  # [B, K, G, G]
        for images, rows in logit_chunks(len(patch_logits), num_labels, grid, size, budget):
            logits = band_logits(patch_logits[images], rows, size)  # [n, K, h, W]
            maps[start + images.start:start + images.stop, pixel_rows(rows, grid, size)] = \
                logits.argmax(1)  # [n, h, W]
    return maps  # [S, H, W]


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
def confusion_matrix(pred: Tensor, truth: Tensor, num_labels: int) -> Tensor:
    """Pixel counts [K, K]: row = true label, column = predicted label."""
    index = truth.flatten() * num_labels + pred.flatten()  # [P]
    return torch.bincount(index, minlength=num_labels ** 2).view(num_labels, num_labels)  # [K, K]


def mean_iou(confusion: Tensor) -> float:
    """mIoU (%): IoU = TP / (TP + FP + FN) per label, averaged over the labels present in the
    ground truth, background included. A label predicted but absent from the truth is left out
    of the mean (its false positives still lower the IoU of the labels they were taken from)."""
    tp = confusion.diag().double()  # [K]
    truth = confusion.sum(1).double()  # [K] TP + FN
    predicted = confusion.sum(0).double()  # [K] TP + FP
    present = truth > 0  # [K]
    iou = tp[present] / (truth + predicted - tp)[present]  # [K present]
    return 100.0 * iou.mean().item()


def pixel_accuracy(confusion: Tensor) -> float:
    """Pixel accuracy (%): the share of pixels whose label is predicted right."""
    return 100.0 * confusion.diag().sum().item() / confusion.sum().item()


def dense_scores(pred: Tensor, truth: Tensor, num_labels: int) -> dict[str, float]:
    """{"miou", "pixel_acc"} (%, 2 decimals) of predicted maps [S, H, W] (on their device)."""
    confusion = confusion_matrix(pred, truth.to(pred.device), num_labels)  # [K, K]
    return {"miou": round(mean_iou(confusion), 2), "pixel_acc": round(pixel_accuracy(confusion), 2)}


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
@dataclass
class DenseProbeRun:
    """A fitted dense probe: its scores, the resized encoder and the probe, to predict more maps."""

    metrics: dict[str, dict[str, float]]  # {split: {"miou", "pixel_acc"}}
    encoder: nn.Module  # at the canvas size, eval mode
    probe: DenseProbe
    cfg: Config
    device: torch.device

    def predict(self, pixels: Tensor) -> Tensor:
        """Predicted label maps of scenes [S, C, H, W] in [0, 1]: [S, H, W], on the CPU."""
        features = patch_features(self.encoder, pixels, self.cfg.data,
                                  self.cfg.evaluation.batch_size, self.device,
                                  amp=self.cfg.pretrain.amp)  # [S, G, G, D]
        return predict_maps(self.probe, features, pixels.shape[-1]).cpu()  # [S, H, W]


def sharded_patch_features(encoder: nn.Module, pixels: Tensor, cfg: Config, device: torch.device,
                           procs: distributed.Processes, progress: bool = False,
                           desc: str = "patch features") -> Tensor:
    """`patch_features` of every scene [S, C, H, W] (under `pretrain.amp`), whatever the
    processes: each extracts its run of whole batches, and every process gets all of them, in
    order, on `device`: [S, G, G, D]."""
    batch = cfg.evaluation.batch_size
    rows = distributed.batch_shard(len(pixels), batch, procs)
    if len(rows) == 0:  # more processes than batches
        grid = encoder.patch_embed.grid_size[0]
        none = torch.zeros(0, grid, grid, encoder.embed_dim, device=device)  # [0, G, G, D]
        return distributed.gather_rows(none, procs)
    mine = patch_features(encoder, pixels[rows.start:rows.stop], cfg.data, batch, device,
                          progress and procs.is_main, desc, cfg.pretrain.amp)  # [s, G, G, D]
    return distributed.gather_rows(mine, procs)  # [S, G, G, D]


def dense_probe_encoder(cfg: Config, encoder: nn.Module, device: torch.device,
                        progress: bool = True,
                        procs: distributed.Processes = distributed.Processes()) -> DenseProbeRun:
    """Fit the dense probe on the train scenes of a frozen encoder (built for `data.img_size`)
    and score it on the val scenes (when data.val_fraction > 0) and the test scenes; with `procs`
    distributed, the processes share the feature extraction (the same run on every process)."""
    canvas = canvas_size(cfg)
    encoder = resize_encoder(encoder, canvas).eval().to(device)
    splits = ("train", "val", "test") if cfg.data.val_fraction > 0 else ("train", "test")
    scenes, features = {}, {}
    for split in splits:
        scenes[split] = build_scenes(cfg, split)
        features[split] = sharded_patch_features(encoder, scenes[split].pixels, cfg, device, procs,
                                                 progress, f"{split} patch features")  # [S, G, G, D]
    num_labels = scenes["train"].num_labels
    probe = train_dense_probe(features["train"], scenes["train"].labels, num_labels, cfg.dense,
                              cfg.evaluation.seed, progress and procs.is_main)
    metrics = {split: dense_scores(predict_maps(probe, features[split], canvas),  # [S, H, W]
                                   scenes[split].labels, num_labels)
               for split in splits[1:]}
    return DenseProbeRun(metrics, encoder, probe, cfg, device)


def dense_probe(cfg: Config, encoder_path: str | Path, progress: bool = True
                ) -> dict[str, dict[str, float]]:
    """The dense probe of an exported encoder (`encoder.pt`): {split: {"miou", "pixel_acc"}} (%)
    on the validation scenes ("val", when data.val_fraction > 0) and the test scenes ("test").

    mIoU averages the labels present in the ground truth, background included (`mean_iou`). On
    the default scenes about 73% of the pixels are background: a probe that predicts background
    everywhere scores that pixel accuracy and an mIoU near 73 / 11, so read mIoU first."""
    procs, device = distributed.start(cfg.pretrain.device)
    try:
        encoder = checkpoint.load_encoder(encoder_path).eval()
        return dense_probe_encoder(cfg, encoder, device, progress, procs).metrics
    finally:
        distributed.stop(procs)
