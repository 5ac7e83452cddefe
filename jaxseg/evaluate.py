"""Evaluation on held-out cases: per-case metrics CSV, summary table, predictions written back
as NIfTI in the original image geometry, and PNG figures (overlays, loss curves)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from jaxseg import metrics as M
from jaxseg.data.cache import Cache
from jaxseg.data.preprocess import label_channels, restore_label, save_nifti

SUMMARY_METRICS = ("dice", "f1", "precision", "recall", "hd", "hd95", "asd", "surface_dice")


def evaluate_cases(predict, cache: Cache, case_ids: Sequence[str], out_dir: str | Path,
                   write_nifti: bool = True, figures: int = 4, progress: bool = True, write: bool = True) -> dict:
    """``predict(image (X, Y, Z, C)) -> labels (X, Y, Z)`` or multi-hot (X, Y, Z, K) on the cached
    grid. Metrics twice: on the cached grid and its spacing (``per_case``: what training saw,
    and what table1 reports), and in each scan's own geometry against its original label file
    (``per_case_native``: the prediction mapped back, as clinicians and nnU-Net measure; None
    for a case whose label file is gone). Writes (unless ``write`` is False: the other processes
    of a multi-host run) ``cases.csv`` (a ``grid`` column), ``summary.json``, ``summary.md``,
    ``predictions/<case>.nii.gz`` (original geometry) and ``figures/*.png``."""
    from tqdm import tqdm

    out = Path(out_dir)
    write_nifti, figures = write_nifti and write, figures if write else 0
    if write:
        (out / "predictions").mkdir(parents=True, exist_ok=True)
    multilabel = cache.regions is not None
    names = cache.class_names
    rows, per_case, per_native = [], [], []
    for i, cid in enumerate(tqdm(case_ids, desc="evaluate", unit="case", disable=not progress)):
        image = np.asarray(cache.image(cid))
        truth = np.asarray(cache.label(cid))
        pred = predict(image)
        meta = cache.meta(cid)
        spacing = meta["spacing"]
        if multilabel:
            m = M.case_metrics(np.moveaxis(pred, -1, 0), np.moveaxis(label_channels(truth, cache.regions), -1, 0),
                               spacing, class_names=names)
        else:
            m = M.case_metrics(pred, truth, spacing, class_names=names, num_classes=cache.num_classes)
        per_case.append(m)
        restored, affine = restore_label(pred, meta)
        native = _native_metrics(restored, affine, meta, cache, names)
        per_native.append(native)
        for grid, metrics in (("cache", m), ("native", native or {})):
            for cls, vals in metrics.items():
                rows.append({"case": cid, "grid": grid, "class": cls,
                             **{k: vals[k] for k in (*SUMMARY_METRICS, "tp", "fp", "fn")}})
        if write_nifti:
            save_nifti(out / "predictions" / f"{cid}.nii.gz", restored.astype(np.uint8), affine)
        if i < figures:
            overlay_png(image, truth, pred, multilabel, out / "figures" / f"{cid}.png", title=cid)
    natives = [n for n in per_native if n is not None]
    summary = {"aggregate": M.aggregate(per_case, SUMMARY_METRICS),
               "pooled": M.pooled_precision_recall(per_case), "cases": list(case_ids),
               "per_case": dict(zip(case_ids, per_case)),
               "aggregate_native": M.aggregate(natives, SUMMARY_METRICS) if natives else None,
               "per_case_native": dict(zip(case_ids, per_native))}
    if write:
        with open(out / "cases.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case"])
            w.writeheader()
            w.writerows(rows)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        md = "Cached grid (the training resolution and spacing):\n\n" + summary_table(summary["aggregate"])
        if natives:
            md += (f"\nEach scan's own geometry ({len(natives)} of {len(per_native)} cases; prediction mapped back, "
                   f"against the original label file):\n\n" + summary_table(summary["aggregate_native"]))
        (out / "summary.md").write_text(md)
    return summary


def _native_metrics(restored, affine, meta: Mapping, cache: Cache, names) -> dict | None:
    """Metrics of a prediction mapped back to its scan's grid, against the original label file
    (listed in the cache's ``meta['source']``), with the scan's own voxel spacing."""
    from jaxseg.data.msd import load_nifti
    from jaxseg.data.preprocess import spacing_of

    source = meta.get("source") or []
    if len(source) < 2 or not Path(source[1][0]).is_file():
        return None
    truth, _ = load_nifti(source[1][0])
    truth = np.rint(truth).astype(np.int16)
    spacing = tuple(float(v) for v in spacing_of(np.asarray(affine)))
    if cache.regions is not None:
        return M.case_metrics(np.moveaxis(restored, -1, 0), np.moveaxis(label_channels(truth, cache.regions), -1, 0),
                              spacing, class_names=names)
    return M.case_metrics(restored.astype(np.int16), truth, spacing, class_names=names, num_classes=cache.num_classes)


def mean_foreground_dice(predict, cache: Cache, case_ids: Sequence[str], figure: bool = False):
    """Mean foreground Dice (``metrics.overlap_metrics``) over the classes and ``case_ids`` whose
    truth is not empty; ``predict`` as in ``evaluate_cases``. With ``figure``, returns
    (Dice, RGB overlay of the first case), for validation during training."""
    multilabel = cache.regions is not None
    scores, rgb = [], None
    for cid in case_ids:
        image, label = np.asarray(cache.image(cid)), np.asarray(cache.label(cid))
        pred = predict(image)
        if multilabel:
            truth = label_channels(label, cache.regions)
            pairs = [(pred[..., k], truth[..., k]) for k in range(truth.shape[-1])]
        else:
            pairs = [(pred == k, label == k) for k in range(1, cache.num_classes)]
        scores += [M.overlap_metrics(p.astype(bool), t.astype(bool))["dice"] for p, t in pairs]
        if figure and rgb is None:
            rgb = overlay_rgb(image, label, pred, multilabel, title=cid)
    vals = [s for s in scores if not math.isnan(s)]
    dice = float(np.mean(vals)) if vals else float("nan")
    return (dice, rgb) if figure else dice


def summary_table(agg: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    lines = ["| class | " + " | ".join(SUMMARY_METRICS) + " |", "|---" * (len(SUMMARY_METRICS) + 1) + "|"]
    for cls, per in agg.items():
        cells = [f"{per[m]['mean']:.3f} ± {per[m]['std']:.3f}" + (f" ({per[m]['n_nan']} NaN)" if per[m]["n_nan"] else "")
                 for m in SUMMARY_METRICS]
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
