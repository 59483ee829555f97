"""Figures of the pipeline's results, drawn with matplotlib and saved as PNG (they work offline):
MAE's reconstructions, the results table and bar charts with 95% CI error bars, the step cost.
Training curves are `pemae.report.curves`."""

from __future__ import annotations


import torch

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from pemae.config.schema import DataConfig  # noqa: E402
from pemae.data.transforms import denormalise  # noqa: E402
from pemae.models.mae import MaskedAutoencoder, patch_stats, random_masking  # noqa: E402
from pemae.report.gather import READOUT_NAMES, RUN_METRICS  # noqa: E402
from pemae.report.stats import ci_half_width  # noqa: E402
from pemae.report.tables import METRIC_NAMES, TABLE_COLUMNS, seeds_note, table_cells  # noqa: E402


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


def table_figure(summary_rows: list[dict], title: str = "") -> plt.Figure:
    """The long results table (mean ± std per run and readout) drawn as a figure (for the README)."""
    cells = [[row[c] for c in TABLE_COLUMNS] for row in table_cells(summary_rows)]
    fig, ax = plt.subplots(figsize=(1.6 * len(TABLE_COLUMNS), 0.3 * (len(cells) + 1)))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=TABLE_COLUMNS, bbox=[0, 0, 1, 1], cellLoc="center")  # fills the axes
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(list(range(len(TABLE_COLUMNS))))
    if title:
        ax.set_title(title, fontsize=10)
    ax.annotate(seeds_note(summary_rows), xy=(0.5, 0), xycoords="axes fraction", xytext=(0, -4),
                textcoords="offset points", ha="center", va="top", fontsize=8)
    return fig


READOUT_HATCHES = {"cls": "", "avg": "//", "pixels": ".."}


def _bar_series(summary_rows: list[dict], metric: str) -> list[int]:
    """Indices of the rows that get a bar for `metric`: those that have it, and for a run
    metric (the same on every readout row) only each run's first row."""
    seen, chosen = set(), []
    for i, row in enumerate(summary_rows):
        if f"{metric}_mean" in row and not (metric in RUN_METRICS and row["run"] in seen):
            chosen.append(i)
        seen.add(row["run"])
    return chosen


def _bar_label(row: dict) -> str:
    label = f"{row['run']} · {READOUT_NAMES.get(row['readout'], row['readout'])}"
    return label + " (collapsed)" if row.get("collapsed") else label


def error_bars_caption(counts: list[int]) -> str:
    """What the error bars of `grouped_bars` are, and how many seeds the bars rest on."""
    spread = [n for n in counts if n > 1]
    seeds = (f"n = {min(counts)} seeds per bar" if min(counts) == max(counts)
             else f"n = {min(counts)}–{max(counts)} seeds per bar")
    single = "; no error bar on a single seed" if len(spread) < len(counts) else ""
    return f"mean over seeds ± 95% CI of the mean (t, n − 1 df); {seeds}{single}"


def grouped_bars(summary_rows: list[dict], metrics: list[str],
                 ylabel: str = "top-1 accuracy (%)") -> plt.Figure:
    """Mean over seeds with its 95% confidence interval as the error bar (half-width
    t(0.975, n − 1)·std/√n; none for a single seed): one group per metric, one bar per run and
    readout; the title says so and how many seeds the bars rest on.

    Colour = run, hatch = readout; a run metric (fine-tune) gets one bar per run. Bars of a run
    whose pseudo labels collapsed (any seed) are marked "collapsed" under them.
    """
    runs = list(dict.fromkeys(row["run"] for row in summary_rows))
    colours = {run: plt.cm.tab10(i % 10) for i, run in enumerate(runs)}
    width = 0.8 / max(len(summary_rows), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 0.35 * len(summary_rows) * len(metrics), 3.8))
    handles, collapsed_x, counts = {}, [], []
    for group, metric in enumerate(metrics):
        chosen = _bar_series(summary_rows, metric)
        for slot, i in enumerate(chosen):
            row = summary_rows[i]
            x = group + (slot - (len(chosen) - 1) / 2) * width
            counts.append(row[f"{metric}_n"])
            bars = ax.bar(x, row[f"{metric}_mean"], width, capsize=2,
                          yerr=ci_half_width(row[f"{metric}_std"], row[f"{metric}_n"]),
                          color=colours[row["run"]], hatch=READOUT_HATCHES.get(row["readout"], ""),
                          edgecolor="white", label=_bar_label(row))
            ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=2)
            handles.setdefault(i, bars)
            if row.get("collapsed"):
                collapsed_x.append(x)
    ax.set_xticks(range(len(metrics)), [METRIC_NAMES.get(m, m) for m in metrics])
    if collapsed_x:  # a minor tick label under each collapsed bar; the metric names below them
        ax.set_xticks(collapsed_x, ["collapsed"] * len(collapsed_x), minor=True, rotation=90,
                      fontsize=6, color="red")
        ax.tick_params(axis="x", which="major", pad=40)
    ax.set_ylabel(ylabel)
    if counts:
        ax.set_title(error_bars_caption(counts), fontsize=8)
    ordered = [handles[i] for i in sorted(handles)]
    ax.legend(ordered, [h.get_label() for h in ordered], fontsize=7, loc="center left",
              bbox_to_anchor=(1.01, 0.5))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
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
