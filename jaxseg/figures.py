"""Every PNG figure jaxseg draws: segmentation overlays (evaluation, validation in TensorBoard,
``experiments.predict --figures``) and loss curves (pre-training, table1). Matplotlib is imported
only when a figure is drawn."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import numpy as np


def _overlay_figure(image, truth, pred, multilabel: bool, title: str = ""):
    """Axial slice through the largest ground-truth area (or, with no truth, predicted area):
    image, truth and prediction overlays; two panels when ``truth`` is None."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Multi-label predictions (TC/WT/ET) are shown as their union, like the label map's foreground.
    union = pred.max(-1) if multilabel else pred
    fg = (truth if truth is not None else union) > 0
    z = int(np.argmax(fg.sum((0, 1)))) if fg.any() else image.shape[2] // 2
    img = image[:, :, z, 0].T
    p = union[:, :, z].T
    panels = [(None, "image"), *([(truth[:, :, z].T, "ground truth")] if truth is not None else []), (p, "prediction")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6))
    for ax, (lab, name) in zip(axes, panels):
        ax.imshow(img, cmap="gray", origin="lower")
        if lab is not None:
            ax.imshow(np.ma.masked_equal(lab, 0), cmap="autumn", alpha=0.5, origin="lower", vmin=0, vmax=max(1, lab.max()))
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(f"{title} (slice {z})")
    fig.tight_layout()
    return fig


def overlay_png(image, truth, pred, multilabel: bool, path: Path, title: str = "") -> None:
    import matplotlib.pyplot as plt

    fig = _overlay_figure(image, truth, pred, multilabel, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def overlay_rgb(image, truth, pred, multilabel: bool, title: str = "") -> np.ndarray:
    """The overlay figure as an (H, W, 3) uint8 array (for TensorBoard image summaries)."""
    import matplotlib.pyplot as plt

    fig = _overlay_figure(image, truth, pred, multilabel, title)
    fig.set_dpi(60)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def plot_loss_curves(panels: Mapping[str, Mapping[str, str | Path]], path: str | Path, title: str = "",
                     chance: Mapping[str, float] | None = None, key: str = "loss") -> None:
    """One panel per entry of ``panels`` (panel title -> {line label -> metrics.jsonl}); lines
    whose labels share their first word (an objective) share a colour, so seeds show as a band;
    ``chance`` (first word -> loss at chance) is drawn dashed in every panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(label.split()[0] for curves in panels.values() for label in curves))
    colour = {g: f"C{i}" for i, g in enumerate(groups)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (name, curves) in zip(axes[0], panels.items()):
        for label, p in curves.items():
            p = Path(p)
            if not p.is_file():
                continue
            recs = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
            pts = [(r["step"], r[key]) for r in recs if key in r and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=label, color=colour[label.split()[0]], alpha=0.8, lw=1.2)
        for g, v in (chance or {}).items():
            if g in colour and v is not None:
                ax.axhline(v, color=colour[g], ls="--", lw=0.8, label=f"{g} at chance")
        ax.set(xlabel="step", ylabel=key, title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_label_efficiency(rows, path: str | Path) -> None:
    """Test Dice against labelled cases (log-spaced x), one line per start (none / each
    objective) with its 95% interval as error bars, one panel per class; ``rows`` are
    ``jaxseg.report.summary_rows``'."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(rows[0]["dice_ci"])
    fig, axes = plt.subplots(1, len(classes), figsize=(5 * len(classes), 4), squeeze=False)
    for ax, cls in zip(axes[0], classes):
        for i, init in enumerate(dict.fromkeys(r["init"] for r in rows)):
            pts = sorted((r["labels"], r["dice_ci"][cls]) for r in rows if r["init"] == init)
            x = [n * (1 + 0.03 * (i - 1)) for n, _ in pts]  # side by side, not on top of each other
            y = [c["mean"] for _, c in pts]
            err = [[c["mean"] - c["low"] for _, c in pts], [c["high"] - c["mean"] for _, c in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=init)
        seeds, cases = rows[0]["dice_ci"][cls]["seeds"], rows[0]["dice_ci"][cls]["cases"]
        ax.set(xscale="log", xlabel="labelled training cases", ylabel=f"test Dice ({cls})",
               title=f"{cls}: 95% CI over {seeds} seeds × {cases} test cases")
        ax.set_xticks(sorted({r["labels"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
