"""The dense probe's figure: a few test scenes, their ground-truth maps and each encoder's
predicted map (`draw_dense_predictions`)."""

from __future__ import annotations

import torch
from torch import Tensor

import matplotlib

matplotlib.use("Agg")

import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from pemae.eval.dense import DenseProbeRun  # noqa: E402
from pemae.eval.scenes import build_scenes  # noqa: E402


FIGURE_SCENES = 6  # test scenes whose predicted maps the pipeline keeps for its figure


def figure_maps(run: DenseProbeRun) -> dict:
    """What the figures notebook draws for a run (`dense_maps.pt`): the first `FIGURE_SCENES`
    test scenes, their ground truth and the run's predicted maps (as notebook 04 saves them)."""
    test = build_scenes(run.cfg, "test")
    shown = test.pixels[:FIGURE_SCENES].clone()  # [S, C, H, W]; a copy: a slice saves every scene
    return {"scenes": shown, "truth": test.labels[:FIGURE_SCENES].to(torch.int16),
            "maps": run.predict(shown).to(torch.int16), "classes": test.class_names}


# --------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------
def label_colours(num_labels: int) -> Tensor:
    """A fixed RGB colour per label, [K, 3] in [0, 1]: background black, class c (label c + 1)
    the c-th colour of matplotlib's tab10 (then golden-ratio hues past ten classes)."""
    tab10 = matplotlib.colormaps["tab10"]
    hsv = matplotlib.colormaps["hsv"]
    colours = [(0.0, 0.0, 0.0)]
    for c in range(num_labels - 1):
        colours.append(tab10(c)[:3] if c < 10 else hsv((c * 0.618034) % 1.0)[:3])
    return torch.tensor(colours)  # [K, 3]


def colour_map(labels: Tensor, colours: Tensor) -> Tensor:
    """A label map [H, W] as an RGB image [H, W, 3]."""
    return colours[labels]  # [H, W, 3]


def _show_scene(ax: plt.Axes, scene: Tensor) -> None:
    """A scene [C, H, W] in [0, 1]: grayscale for one channel, RGB for three."""
    if scene.shape[0] == 1:
        ax.imshow(scene[0].numpy(), cmap="gray", vmin=0, vmax=1)  # [H, W]
    else:
        ax.imshow(scene.permute(1, 2, 0).clamp(0, 1).numpy())  # [H, W, C]


def draw_dense_predictions(scenes: Tensor, truth: Tensor, predictions: dict[str, Tensor],
                           class_names: list[str] | None = None) -> plt.Figure:
    """One column per scene; rows: the scene [S, C, H, W] in [0, 1], its ground truth [S, H, W],
    then each encoder's predicted map ({name: [S, H, W]}), with one fixed colour per class
    (`label_colours`) and a legend naming them (`class_names`, e.g. the data set's classes)."""
    scenes, truth = scenes.detach().cpu(), truth.detach().cpu().long()  # maps may be stored small
    predictions = {name: maps.detach().cpu().long() for name, maps in predictions.items()}
    num_labels = int(max([truth.max()] + [p.max() for p in predictions.values()])) + 1
    if class_names is not None:
        num_labels = max(num_labels, len(class_names) + 1)
    colours = label_colours(num_labels)  # [K, 3]
    rows = [("scene", None), ("truth", truth)] + list(predictions.items())
    fig, axes = plt.subplots(len(rows), len(scenes), figsize=(1.6 * len(scenes), 1.6 * len(rows)),
                             squeeze=False)
    for r, (name, maps) in enumerate(rows):
        for s in range(len(scenes)):
            ax = axes[r, s]
            if maps is None:
                _show_scene(ax, scenes[s])
            else:
                ax.imshow(colour_map(maps[s], colours).numpy())  # [H, W, 3]
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name)
    names = ["background"] + list(class_names or [f"class {c}" for c in range(num_labels - 1)])
    handles = [matplotlib.patches.Patch(color=colours[k].tolist(), label=names[k])
               for k in range(num_labels)]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, num_labels), fontsize="small",
               bbox_to_anchor=(0.5, -0.02 - 0.03 * ((num_labels - 1) // 6)))
    fig.tight_layout()
    return fig
