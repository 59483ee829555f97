"""Figures of the pipeline, drawn with matplotlib and saved as PNG (they work offline)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pemae.config import DataConfig  # noqa: E402
from pemae.data import denormalise  # noqa: E402
from pemae.mae import MaskedAutoencoder, patch_stats, random_masking  # noqa: E402
from pemae.model import COLLAPSED_PERPLEXITY  # noqa: E402
from pemae.results import format_cell  # noqa: E402
from pemae.runtime import read_log  # noqa: E402


def save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    return path


def curves(logs: dict[str, str | Path], columns: list[str]) -> plt.Figure:
    """One panel per logged column, one curve per run, against the global step.

    Runs whose log lacks a column (e.g. MAE has no pseudo labels) are left out of that panel.
    Perplexity panels are log-scaled and show the collapse threshold.
    """
    tables = {run: read_log(path) for run, path in logs.items() if Path(path).is_file()}
    fig, axes = plt.subplots(1, len(columns), figsize=(4.6 * len(columns), 3.4), squeeze=False)
    for ax, column in zip(axes[0], columns):
        for run, log in tables.items():
            if column in log:
                ax.plot(log["step"], log[column], label=run)
        if column.endswith("perplexity"):
            ax.set_yscale("log")
            ax.axhline(COLLAPSED_PERPLEXITY, color="red", linestyle=":", label="collapse")
        ax.set_xlabel("step")
        ax.set_title(column)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def loss_curves(logs: dict[str, str | Path], column: str = "loss") -> plt.Figure:
    """One curve of `column` against the global step per run."""
    return curves(logs, [column])


@torch.no_grad()
def reconstructions(model: MaskedAutoencoder, imgs: torch.Tensor, seed: int = 0):
    """Original, masked input, reconstruction (visible patches pasted back) and the mask.

    Images are [B, C, H, W] in the normalised input space; the mask is [B, N, 1] (1 = masked).
    A norm-pix prediction is mapped back with each patch's own mean and std.
    """
    model.eval()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    masking = random_masking(imgs.shape[0], model.num_patches, model.mask_ratio)
    torch.random.set_rng_state(gen_state)
    pred = model.decoder_pred(model.forward_decoder(model.forward_encoder(imgs, masking), masking))  # [B, N, p*p*C]
    patches = model.patchify(imgs)  # [B, N, p*p*C]
    if model.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
        mean, std = patch_stats(patches)  # [B, N, 1] each
        pred = pred * std + mean  # [B, N, p*p*C]
    mask = masking.mask.unsqueeze(-1)  # [B, N, 1]
    masked = model.unpatchify(patches * (1 - mask))  # [B, C, H, W], masked patches zeroed
    pasted = model.unpatchify(patches * (1 - mask) + pred * mask)  # [B, C, H, W]
    return imgs, masked, pasted, mask


def reconstruction_grid(model: MaskedAutoencoder, imgs: torch.Tensor, data: DataConfig,
                        seed: int = 0) -> plt.Figure:
    """Rows of original / masked / reconstruction, de-normalised to pixels."""
    original, masked, pasted, mask = reconstructions(model, imgs, seed)
    masked_px = denormalise(masked, data)  # [B, C, H, W]
    # show masked patches as mid-grey rather than the de-normalised zero
    grey = model.unpatchify(mask.expand(-1, -1, model.patch_size**2 * model.in_chans))  # [B, C, H, W]
    masked_px = masked_px * (1 - grey) + 0.5 * grey
    columns = {"original": denormalise(original, data), "masked (75%)": masked_px,
               "reconstruction": denormalise(pasted, data)}
    n = imgs.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(3 * 1.6, n * 1.6), squeeze=False)
    for j, (title, batch) in enumerate(columns.items()):
        for i in range(n):
            img = batch[i].permute(1, 2, 0).cpu().numpy()  # [H, W, C]
            axes[i, j].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            axes[i, j].axis("off")
        axes[0, j].set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def table_figure(rows: list[dict], columns: list[str], title: str = "") -> plt.Figure:
    """A results table drawn as a figure (for the README)."""
    cells = [[format_cell(row.get(c)) for c in columns] for row in rows]
    fig, ax = plt.subplots(figsize=(1.5 * len(columns), 0.45 * (len(rows) + 1.5)))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=columns, loc="center", cellLoc="center")
    table.scale(1, 1.4)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def grouped_bars(rows: list[dict], metrics: list[str], label: str = "run") -> plt.Figure:
    """Accuracy per run, one group of bars per run and one bar per metric.

    A run whose pseudo labels collapsed is marked "(collapsed)" under its bars.
    """
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(rows), 3.6))
    width = 0.8 / len(metrics)
    x = np.arange(len(rows))
    for i, metric in enumerate(metrics):
        values = [row.get(metric) or 0.0 for row in rows]
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, values, width, label=metric)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, [row[label] + ("\n(collapsed)" if row.get("collapsed") else "") for row in rows])
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def cost_figure(rows: list[dict]) -> plt.Figure:
    """Training-step throughput and peak memory per variant, with the ratio to MAE on each bar."""
    names = [r["variant"] for r in rows]
    panels = [("images_per_s", "throughput_vs_mae", "images / s (higher is better)"),
              ("peak_memory_mb", "memory_vs_mae", f"peak memory, MB ({rows[0]['memory_kind']})")]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (value, ratio, title) in zip(axes, panels):
        bars = ax.bar(names, [r[value] for r in rows], color=["0.6", "tab:blue", "tab:orange"][:len(rows)])
        ax.bar_label(bars, labels=[f"×{r[ratio]:.2f}" for r in rows], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"one pretraining step, batch {rows[0]['batch_size']} on {rows[0]['device']} "
                 "(ratios to MAE)", fontsize=9)
    fig.tight_layout()
    return fig
