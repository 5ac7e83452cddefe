"""Evaluation on held-out cases: per-case metrics (on the cache grid and in each scan's own
geometry), a CSV and summary table, predictions written back as NIfTI in the original image
geometry, and overlay figures (drawn by ``jaxseg.figures``)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from jaxseg import metrics as M
from jaxseg.data.cache import Cache
from jaxseg.data.preprocess import restore_label, save_nifti
from jaxseg.data.task import Task
from jaxseg.distributed import allgather_json, barrier, is_primary, my_share
from jaxseg.figures import overlay_png, overlay_rgb
from jaxseg.io import atomic_write_text

Probabilities = Callable[[np.ndarray], np.ndarray]  # image (X, Y, Z, C) on the cache grid -> (X, Y, Z, K)

SUMMARY_METRICS = ("dice", "f1", "precision", "recall", "hd", "hd95", "asd", "surface_dice")


def case_metrics(task: Task, seg: np.ndarray, label: np.ndarray, spacing) -> dict:
    """Every metric of ``jaxseg.metrics.case_metrics`` for each foreground channel of ``task``:
    ``seg`` as ``task.segment`` gives it, ``label`` an integer label map on the same grid."""
    pred, truth = task.channels_first(seg, label)
    classes = {} if task.multilabel else {"num_classes": task.num_classes}
    return M.case_metrics(pred, truth, spacing, class_names=list(task.class_names), **classes)


def evaluate_cases(probabilities: Probabilities, cache: Cache, case_ids: Sequence[str], out_dir: str | Path,
                   write_nifti: bool = True, figures: int = 4, progress: bool = True) -> dict:
    """Segment each case (``cache.task.segment`` of ``probabilities(image)`` on the cached grid)
    and measure it twice: on the cached grid and its spacing (``per_case``: what training saw,
    and what table1 reports), and in each scan's own geometry against its original label file
    (``per_case_native``: the prediction mapped back, as clinicians and nnU-Net measure; None
    for a case whose label file is gone). Writes ``cases.csv`` (a ``grid`` column),
    ``summary.json``, ``summary.md``, ``predictions/<case>.nii.gz`` (original geometry) and
    ``figures/*.png`` for the first ``figures`` cases.

    In a multi-process run every process segments its share of the cases (``distributed.my_share``)
    and writes their predictions and figures; the metrics are gathered, so every process returns
    the same summary, and process 0 writes the tables."""
    from tqdm import tqdm

    out = Path(out_dir)
    if write_nifti:
        (out / "predictions").mkdir(parents=True, exist_ok=True)
    task = cache.task
    mine = {}
    for i in tqdm(my_share(range(len(case_ids))), desc="evaluate", unit="case", disable=not progress):
        cid = case_ids[i]
        image = np.asarray(cache.image(cid))
        truth = np.asarray(cache.label(cid))
        seg = task.segment(probabilities(image))
        meta = cache.meta(cid)
        restored, affine = restore_label(seg, meta)
        mine[cid] = (case_metrics(task, seg, truth, meta["spacing"]), _native_metrics(task, restored, affine, meta))
        if write_nifti:
            save_nifti(out / "predictions" / f"{cid}.nii.gz", restored.astype(np.uint8), affine)
        if i < figures:
            overlay_png(image, truth, seg, task.multilabel, out / "figures" / f"{cid}.png", title=cid)
    gathered = {cid: v for part in allgather_json(mine) for cid, v in part.items()}
    per_case = [gathered[c][0] for c in case_ids]
    per_native = [gathered[c][1] for c in case_ids]
    rows = [{"case": cid, "grid": grid, "class": cls, **{k: vals[k] for k in (*SUMMARY_METRICS, "tp", "fp", "fn")}}
            for cid, m, native in zip(case_ids, per_case, per_native)
            for grid, metrics in (("cache", m), ("native", native or {})) for cls, vals in metrics.items()]
    natives = [n for n in per_native if n is not None]
    summary = {"aggregate": M.aggregate(per_case, SUMMARY_METRICS),
               "pooled": M.pooled_precision_recall(per_case), "cases": list(case_ids),
               "per_case": dict(zip(case_ids, per_case)),
               "aggregate_native": M.aggregate(natives, SUMMARY_METRICS) if natives else None,
               "per_case_native": dict(zip(case_ids, per_native))}
    if is_primary():
        table = io.StringIO(newline="")
        w = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else ["case"])
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(out / "cases.csv", table.getvalue())
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
        atomic_write_text(out / "summary.md", summary_markdown(summary))
    barrier(f"evaluated {out}")  # every prediction and table is on disk before any process reads one
    return summary


def summary_markdown(summary: Mapping) -> str:
    """summary.md: the metrics on the cached grid, and in each scan's own geometry where known."""
    md = "Cached grid (the training resolution and spacing):\n\n" + summary_table(summary["aggregate"])
    natives = [n for n in summary["per_case_native"].values() if n is not None]
    if natives:
        md += (f"\nEach scan's own geometry ({len(natives)} of {len(summary['per_case_native'])} cases; prediction "
               f"mapped back, against the original label file):\n\n" + summary_table(summary["aggregate_native"]))
    return md


def _native_metrics(task: Task, restored, affine, meta: Mapping) -> dict | None:
    """Metrics of a prediction mapped back to its scan's grid, against the original label file
    (listed in the cache's ``meta['source']``), with the scan's own voxel spacing."""
    from jaxseg.data.msd import load_nifti
    from jaxseg.data.preprocess import spacing_of

    source = meta.get("source") or []
    if len(source) < 2 or not Path(source[1][0]).is_file():
        return None
    truth, _ = load_nifti(source[1][0])
    spacing = tuple(float(v) for v in spacing_of(np.asarray(affine)))
    return case_metrics(task, restored, np.rint(truth).astype(np.int16), spacing)  # label files may hold floats


def validation_dice(probabilities: Probabilities, cache: Cache, case_ids: Sequence[str], figure: bool = False
                    ) -> tuple[float, np.ndarray | None]:
    """(mean foreground Dice, overlay): the mean of ``metrics.overlap_metrics``' Dice over the
    foreground channels and ``case_ids`` whose truth is not empty; ``probabilities`` as in
    ``evaluate_cases``. The overlay (RGB, the first case) is drawn when ``figure``, else None.
    Each process of a multi-process run segments its share of the cases; every process returns
    the same Dice, that of one process over all of them."""
    task = cache.task
    scores, rgb = {}, None
    for i in my_share(range(len(case_ids))):
        cid = case_ids[i]
        image, label = np.asarray(cache.image(cid)), np.asarray(cache.label(cid))
        seg = task.segment(probabilities(image))
        scores[cid] = [M.overlap_metrics(p, t)["dice"] for _, p, t in task.foreground(seg, label)]
        if figure and i == 0:
            rgb = overlay_rgb(image, label, seg, task.multilabel, title=cid)
    gathered = {cid: v for part in allgather_json(scores) for cid, v in part.items()}
    vals = [s for cid in case_ids for s in gathered[cid] if not math.isnan(s)]  # in case order: one sum for all
    return (float(np.mean(vals)) if vals else float("nan")), rgb


def summary_table(agg: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    lines = ["| class | " + " | ".join(SUMMARY_METRICS) + " |", "|---" * (len(SUMMARY_METRICS) + 1) + "|"]
    for cls, per in agg.items():
        cells = [f"{per[m]['mean']:.3f} ± {per[m]['std']:.3f}" + (f" ({per[m]['n_nan']} NaN)" if per[m]["n_nan"] else "")
                 for m in SUMMARY_METRICS]
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
