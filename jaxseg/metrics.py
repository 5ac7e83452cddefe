"""Segmentation metrics per case and class on binary masks, with voxel spacing; aggregation.

Host-side NumPy/SciPy on purpose: metrics run once per evaluated case on full-size volumes,
need exact Euclidean distance transforms (``scipy.ndimage.distance_transform_edt``) and
variable-size surface point sets, none of which jit well, and keeping them off the device
leaves accelerator memory to the model.

Conventions (MONAI's, so numbers are comparable with MONAI's ``monai.metrics``):
- Surfaces are mask voxels removed by one binary erosion (6-connectivity, outside = 0).
  Surface distances are Euclidean in physical units (``spacing``), from each surface voxel of
  one mask to the nearest surface voxel of the other.
- Dice = 2|P.G| / (|P| + |G|); NaN when the truth is empty (``ignore_empty``), else 1 for two
  empty masks. At the voxel level F1 equals Dice (reported under both names).
- Precision = TP / (TP + FP), NaN for an empty prediction; recall = TP / (TP + FN), NaN for an
  empty truth. ``pooled_precision_recall`` pools TP/FP/FN over cases, as the authors did.
- Hausdorff (``hd``, the maximum) and ``hd95`` are symmetric: max over both directions of the
  max (resp. 95th percentile, linear interpolation) of the directed distances. One empty mask
  against a non-empty one: ``hd`` = inf and ``hd95`` = NaN (MONAI's torch.quantile of infs);
  two empty masks: NaN.
- ``asd``: mean distance from the prediction's surface to the truth's (MONAI's default,
  ``symmetric=False``); inf when exactly one mask is empty, NaN when both are.
- ``surface_dice`` at tolerance tau: fraction of both surfaces within tau of the other; 0 when
  exactly one mask is empty, NaN when both are.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

METRICS = ("dice", "f1", "precision", "recall", "hd", "hd95", "asd", "surface_dice")


def _bbox_with_margin(mask: np.ndarray, margin: int = 1):
    """Slices of the box around ``mask`` grown by ``margin`` (may extend beyond the array)."""
    idx = np.argwhere(mask)
    lo, hi = idx.min(0) - margin, idx.max(0) + margin + 1
    return lo, hi


def _crop_pad(x: np.ndarray, lo, hi) -> np.ndarray:
    pad = [(max(0, -l), max(0, h - s)) for l, h, s in zip(lo, hi, x.shape)]
    sl = tuple(slice(max(0, l), min(s, h)) for l, h, s in zip(lo, hi, x.shape))
    return np.pad(x[sl], pad)


def surfaces(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surface voxels of both masks, cropped to their union's box with a 1-voxel margin."""
    union = pred | truth
    if not union.any():
        return np.zeros((0,) * pred.ndim, bool), np.zeros((0,) * pred.ndim, bool)
    lo, hi = _bbox_with_margin(union)
    p, t = _crop_pad(pred, lo, hi), _crop_pad(truth, lo, hi)
    return p ^ ndimage.binary_erosion(p), t ^ ndimage.binary_erosion(t)


def directed_distances(src: np.ndarray, dst: np.ndarray, spacing) -> np.ndarray:
    """Distance from each ``src`` surface voxel to the nearest ``dst`` surface voxel; inf for
    every ``src`` voxel when ``dst`` is empty."""
    if not src.any():
        return np.zeros(0)
    if not dst.any():
        return np.full(int(src.sum()), np.inf)
    return ndimage.distance_transform_edt(~dst, sampling=spacing)[src]


def _percentile(d: np.ndarray, q: float | None) -> float:
    if d.size == 0:
        return math.nan
    if q is None:
        return float(d.max())
    if np.isinf(d).any():
        return math.nan  # torch.quantile interpolates inf - inf = nan; MONAI reports that
    return float(np.quantile(d, q / 100.0))


def surface_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None,
                    tolerance: float = 1.0) -> dict[str, float]:
    """hd, hd95, asd and surface_dice for one pair of binary masks."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite distance >= 0 (in the spacing's unit), got {tolerance}")
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * pred.ndim
    ep, et = surfaces(pred, truth)
    if not ep.any() and not et.any():
        return {"hd": math.nan, "hd95": math.nan, "asd": math.nan, "surface_dice": math.nan}
    if ep.any() != et.any():
        one = ep if ep.any() else et
        inf = np.full(int(one.sum()), np.inf)
        d_pt, d_tp = inf, inf
    else:
        d_pt = directed_distances(ep, et, spacing)
        d_tp = directed_distances(et, ep, spacing)
    hd = max(_percentile(d_pt, None), _percentile(d_tp, None))
    hd95 = max(_percentile(d_pt, 95), _percentile(d_tp, 95))
    if math.isnan(_percentile(d_pt, 95)) or math.isnan(_percentile(d_tp, 95)):
        hd95 = math.nan
    within = np.sum(d_pt <= tolerance) + np.sum(d_tp <= tolerance)
    return {
        "hd": hd,
        "hd95": hd95,
        "asd": float(d_pt.mean()),
        "surface_dice": float(within / (ep.sum() + et.sum())),
    }


def overlap_metrics(pred: np.ndarray, truth: np.ndarray, ignore_empty: bool = True) -> dict[str, float]:
    """dice, f1 (= dice, but 0 rather than NaN for a prediction on an empty truth), precision,
    recall and the raw tp / fp / fn counts."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp = int(np.sum(pred & truth))
    fp = int(np.sum(pred & ~truth))
    fn = int(np.sum(~pred & truth))
    denom = 2 * tp + fp + fn
    if not truth.any() and ignore_empty:
        dice = math.nan
    else:
        dice = 2 * tp / denom if denom else 1.0
    return {
        "dice": dice,
        "f1": 2 * tp / denom if denom else math.nan,  # MONAI's confusion-matrix F1: 0 for a false alarm
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": tp / (tp + fn) if tp + fn else math.nan,
        "tp": tp, "fp": fp, "fn": fn,
    }


def case_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None,
                 class_names: Sequence[str] | None = None, include_background: bool = False,
                 tolerance: float = 1.0, ignore_empty: bool = True,
                 num_classes: int | None = None) -> dict[str, dict[str, float]]:
    """Every metric for every class of one case.

    pred, truth: either integer label maps ``(D, H, W)`` (classes 0..K-1, 0 the background) or
    binary channel stacks ``(K, D, H, W)`` (e.g. BraTS TC/WT/ET, which overlap; then every
    channel is a class and ``include_background`` is ignored). For label maps the classes are
    ``num_classes``, else ``len(class_names)``, else max label + 1 (at least 2). Returns
    ``{class: {metric: v}}``.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    if pred.dtype == bool or (pred.ndim == 4):
        masks = [(pred[k].astype(bool), truth[k].astype(bool)) for k in range(pred.shape[0])]
        ids = list(range(len(masks)))
    else:
        k = num_classes or (len(class_names) if class_names is not None else
                            max(2, int(max(pred.max(initial=0), truth.max(initial=0))) + 1))
        for name, x in (("pred", pred), ("truth", truth)):
            if x.size and (x.min() < 0 or x.max() >= k):
                raise ValueError(f"{name} labels must lie in [0, {k - 1}] for {k} classes, got values in "
                                 f"[{x.min()}, {x.max()}]")
        ids = list(range(0 if include_background else 1, k))
        masks = [(pred == c, truth == c) for c in ids]
    names = [class_names[c] if class_names is not None else str(c) for c in ids]
    out = {}
    for name, (p, t) in zip(names, masks):
        out[name] = {**overlap_metrics(p, t, ignore_empty), **surface_metrics(p, t, spacing, tolerance)}
    return out


def pooled_precision_recall(cases: Iterable[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """The authors' variant: TP/FP/FN summed over cases before dividing, per class."""
    sums: dict[str, list[int]] = {}
    for case in cases:
        for cls, m in case.items():
            s = sums.setdefault(cls, [0, 0, 0])
            s[0] += m["tp"]; s[1] += m["fp"]; s[2] += m["fn"]
    return {cls: {"precision": tp / (tp + fp) if tp + fp else math.nan,
                  "recall": tp / (tp + fn) if tp + fn else math.nan}
            for cls, (tp, fp, fn) in sums.items()}


def aggregate(cases: Iterable[Mapping[str, Mapping[str, float]]],
              metrics: Sequence[str] = METRICS) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and std per class and metric over cases, skipping NaN (counted in ``n_nan``);
    inf values are kept (a mean of inf says a structure was missed) and counted in ``n_inf``.
    A metric with no valid case has mean 0 and ``n`` 0, as MONAI's ``do_metric_reduction``."""
    values: dict[str, dict[str, list[float]]] = {}
    for case in cases:
        for cls, m in case.items():
            for name in metrics:
                values.setdefault(cls, {}).setdefault(name, []).append(float(m[name]))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for cls, per in values.items():
        out[cls] = {}
        for name, vals in per.items():
            a = np.asarray(vals, float)
            ok = a[~np.isnan(a)]
            out[cls][name] = {
                "mean": float(ok.mean()) if ok.size else 0.0,
                "std": float(ok.std()) if ok.size and np.isfinite(ok).all() else (math.nan if not ok.size else math.inf),
                "n": int(ok.size), "n_nan": int(a.size - ok.size), "n_inf": int(np.isinf(ok).sum()),
            }
    return out
