"""The budget study's figures: each metric against the budget (epochs, and CPU-minutes) with 95%
CI bands and the references as flat lines (`budget_figure`), and PEMAE's collapse monitors along
training at every budget (`monitors_figure`)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from pemae.engine.runtime import read_log  # noqa: E402
from pemae.report.stats import mean_std  # noqa: E402
from pemae.report.tables import METRIC_NAMES  # noqa: E402
from pemae.studies.budget import PIXELS, REFERENCE_RUN, BudgetConfig  # noqa: E402
from pemae.studies.budget import MONITORS, metric_values, pretrain_log  # noqa: E402


FIGURE_METRICS = (("cls", "knn_top1"), ("cls", "linear_top1"), (None, "finetune_top1"), (None, "dense_miou"))


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def _band(ax, xs: list[float], values: list[list[float]], **style) -> None:
    """Mean over seeds with its 95% CI as a band; a budget with a single seed has no interval: the
    band leaves it out and its point is hollow."""
    stats = [mean_std(v) for v in values]
    means = [s["mean"] for s in stats]
    half = [math.nan if s["ci95"] is None else s["ci95"] for s in stats]
    line, = ax.plot(xs, means, marker="o", **style)
    color = line.get_color()
    single = [(x, m) for x, m, v in zip(xs, means, values) if len(v) < 2]
    if single:
        ax.plot(*zip(*single), linestyle="none", marker="o", markerfacecolor="white", markeredgecolor=color)
    ax.fill_between(xs, [m - h for m, h in zip(means, half)], [m + h for m, h in zip(means, half)],
                    color=color, alpha=0.2)


def budget_figure(rows: list[dict], bc: BudgetConfig, minutes: dict[tuple[str, int], float]) -> plt.Figure:
    """Each metric against the budget: top row in epochs, bottom row in pretraining CPU-minutes;
    one line per run with its 95% CI band, the random encoder (and the raw pixels, on the probes)
    as flat references with theirs."""
    fig, axes = plt.subplots(2, len(FIGURE_METRICS), figsize=(4.2 * len(FIGURE_METRICS), 6.6), squeeze=False)
    for col, (readout, metric) in enumerate(FIGURE_METRICS):
        for row_axes, axis_name in ((axes[0], "pretraining epochs"), (axes[1], "pretraining CPU-minutes")):
            ax = row_axes[col]
            for run in bc.runs:
                budgets = [e for e in sorted(bc.epochs) if metric_values(rows, run, e, readout, metric)]
                xs = [e if axis_name.endswith("epochs") else minutes.get((run, e), math.nan) for e in budgets]
                _band(ax, xs, [metric_values(rows, run, e, readout, metric) for e in budgets], label=run)
            for ref, ref_readout in ((REFERENCE_RUN, readout), (PIXELS, "pixels")):
                values = metric_values(rows, ref, 0, ref_readout if readout else None, metric)
                if values and (ref != PIXELS or readout):
                    stats = mean_std(values)
                    ax.axhline(stats["mean"], linestyle="--", color="grey" if ref == PIXELS else "black",
                               label=ref if ref != REFERENCE_RUN else "random encoder")
                    if stats["ci95"]:
                        ax.axhspan(stats["mean"] - stats["ci95"], stats["mean"] + stats["ci95"],
                                   color="grey", alpha=0.15)
            ax.set_xscale("log")
            if axis_name.endswith("epochs"):
                ax.set_xticks(sorted(bc.epochs), [str(e) for e in sorted(bc.epochs)])
            else:
                ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel(axis_name)
            ax.set_title(METRIC_NAMES.get(metric, metric) + (" (CLS)" if readout == "cls" else ""))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("mean over seeds ± 95% CI of the mean (t, n − 1 df); hollow point: one seed, no interval",
                 fontsize=9)
    fig.tight_layout()
    return fig


def monitors_figure(bc: BudgetConfig, root: str | Path, pipeline_dirs: list[str | Path], run: str,
                    seed: int) -> plt.Figure:
    """A run's collapse monitors along pretraining, one line per budget (x: fraction of the run);
    K = the number of prototypes is where the perplexity of uniform pseudo labels sits."""
    fig, axes = plt.subplots(1, len(MONITORS), figsize=(4.2 * len(MONITORS), 3.3), squeeze=False)
    for epochs in sorted(bc.epochs):
        path = pretrain_log(bc, root, pipeline_dirs, run, epochs, seed)
        if path is None:
            continue
        log = read_log(path)
        if not all(m in log for m in MONITORS):
            continue
        fraction = [s / log["step"][-1] for s in log["step"]]
        for ax, monitor in zip(axes[0], MONITORS):
            ax.plot(fraction, log[monitor], label=f"{epochs} ep")
    for ax, monitor in zip(axes[0], MONITORS):
        ax.set_title(f"{run} seed {seed}: {monitor}")
        ax.set_xlabel("fraction of pretraining")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
