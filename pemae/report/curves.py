"""Training curves from a run's log.csv (pretraining or fine-tuning), one panel per logged column
and one curve per run against the global step, saved as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from pemae.engine.runtime import read_log  # noqa: E402


def save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    return path


def curves(logs: dict[str, str | Path], columns: list[str],
           thresholds: dict[str, tuple[float, str]] | None = None) -> plt.Figure:
    """One panel per logged column, one curve per run, against the global step.

    Runs whose log lacks a column (e.g. MAE has no pseudo labels) are left out of that panel.
    Perplexity panels are log-scaled. `thresholds` maps a column to a horizontal reference line
    (value, label), e.g. `collapse_thresholds(K)`.
    """
    thresholds = thresholds or {}
    tables = {run: read_log(path) for run, path in logs.items() if Path(path).is_file()}
    fig, axes = plt.subplots(1, len(columns), figsize=(4.6 * len(columns), 3.4), squeeze=False)
    for ax, column in zip(axes[0], columns):
        for run, log in tables.items():
            if column in log:
                ax.plot(log["step"], log[column], label=run)
        if column.endswith("perplexity"):
            ax.set_yscale("log")
        if column in thresholds:
            value, label = thresholds[column]
            ax.axhline(value, color="red", linestyle=":", label=label)
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
