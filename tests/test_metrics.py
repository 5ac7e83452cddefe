"""Metrics against monai.metrics, conventions for empty masks, aggregation."""

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import (compute_average_surface_distance, compute_dice, compute_hausdorff_distance,
                           compute_surface_dice)
from scipy import ndimage

from jaxseg import metrics as M


def blob(seed, shape=(24, 28, 20), thr=0.6):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 3)
    return field > np.quantile(field, thr)


def monai_all(pred, truth, spacing, tol):
    p = torch.from_numpy(np.stack([~pred, pred])[None].astype(np.float32))
    t = torch.from_numpy(np.stack([~truth, truth])[None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "dice": float(compute_dice(p, t, include_background=False, ignore_empty=True)[0, 0]),
            "hd": float(compute_hausdorff_distance(p, t, spacing=spacing)[0, 0]),
            "hd95": float(compute_hausdorff_distance(p, t, percentile=95, spacing=spacing)[0, 0]),
            "asd": float(compute_average_surface_distance(p, t, spacing=spacing)[0, 0]),
            "surface_dice": float(compute_surface_dice(p, t, [tol], spacing=spacing)[0, 0]),
        }


def same(a, b, rtol=1e-5):
    if math.isnan(b):
        return math.isnan(a)
    if math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * max(1.0, abs(b))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.5, 3.0)])
@pytest.mark.parametrize("case", ["overlap", "shifted", "empty_pred", "empty_truth", "both_empty"])
def test_matches_monai(case, spacing):
    pred, truth = blob(1), blob(2)
    if case == "shifted":
        pred = np.roll(truth, 3, axis=0)
    elif case == "empty_pred":
        pred = np.zeros_like(pred)
    elif case == "empty_truth":
        truth = np.zeros_like(truth)
    elif case == "both_empty":
        pred, truth = np.zeros_like(pred), np.zeros_like(truth)
    ref = monai_all(pred, truth, spacing, tol=2.0)
    got = M.case_metrics(pred.astype(np.uint8), truth.astype(np.uint8), spacing, tolerance=2.0)["1"]
    if case == "both_empty":
        assert got["hd"] != got["hd"] and got["surface_dice"] != got["surface_dice"]
    for name, want in ref.items():
        assert same(got[name], want), (name, got[name], want)


def test_documented_empty_conventions():
    truth = blob(3)
    m = M.case_metrics(np.zeros_like(truth, np.uint8), truth.astype(np.uint8))["1"]
    assert m["hd"] == math.inf and math.isnan(m["hd95"]) and m["dice"] == 0.0 and m["recall"] == 0.0
    assert math.isnan(m["precision"])
    m = M.case_metrics(truth.astype(np.uint8), np.zeros_like(truth, np.uint8))["1"]
    assert math.isnan(m["dice"]) and math.isnan(m["recall"]) and m["precision"] == 0.0


def test_overlap_counts_by_hand():
    pred = np.zeros((4, 4, 4), np.uint8); truth = np.zeros_like(pred)
    pred[:2] = 1; truth[1:3] = 1  # 32 voxels each, 16 shared
    m = M.case_metrics(pred, truth)["1"]
    assert (m["tp"], m["fp"], m["fn"]) == (16, 16, 16)
    assert m["dice"] == m["f1"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5


def test_multichannel_and_labels_and_names():
    a, b = blob(4), blob(5)
    stack_p, stack_t = np.stack([a, a | b]), np.stack([b, a | b])
    out = M.case_metrics(stack_p, stack_t, class_names=["TC", "WT"])
    assert set(out) == {"TC", "WT"} and out["WT"]["dice"] == 1.0 and out["WT"]["hd"] == 0.0
    lab_p = a.astype(np.uint8) + 2 * (b & ~a)
    out = M.case_metrics(lab_p, lab_p, class_names=["bg", "x", "y"])
    assert set(out) == {"x", "y"} and out["y"]["dice"] == 1.0
    with pytest.raises(ValueError, match="differs"):
        M.case_metrics(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))
    with pytest.raises(ValueError, match=r"truth labels must lie in \[0, 2\]"):
        M.case_metrics(lab_p, lab_p + 1, num_classes=3)
    with pytest.raises(ValueError, match="pred labels"):
        M.case_metrics(lab_p.astype(int) - 1, lab_p, num_classes=3)


@pytest.mark.parametrize("tol", [float("inf"), float("nan"), -1.0])
def test_surface_dice_tolerance_must_be_a_finite_distance(tol):
    with pytest.raises(ValueError, match="tolerance"):
        M.surface_metrics(blob(4), blob(5), tolerance=tol)


def test_hausdorff_honours_spacing_exactly():
    p = np.zeros((20, 20, 20), bool); t = np.zeros_like(p)
    p[5:8, 5:8, 5:8] = True; t[5:8, 5:8, 11:14] = True  # same cube shifted 6 voxels along W
    m = M.surface_metrics(p, t, spacing=(1.0, 1.0, 2.5))
    assert m["hd"] == pytest.approx(6 * 2.5)


def test_aggregate_and_pooled():
    cases = [M.case_metrics(blob(s).astype(np.uint8), blob(s + 10).astype(np.uint8)) for s in range(3)]
    cases.append(M.case_metrics(blob(9).astype(np.uint8), np.zeros((24, 28, 20), np.uint8)))  # empty truth
    agg = M.aggregate(cases)
    dices = [c["1"]["dice"] for c in cases[:3]]
    assert agg["1"]["dice"]["mean"] == pytest.approx(np.mean(dices))
    assert agg["1"]["dice"]["std"] == pytest.approx(np.std(dices))
    assert agg["1"]["dice"]["n"] == 3 and agg["1"]["dice"]["n_nan"] == 1
    assert agg["1"]["hd"]["n_inf"] == 1 and agg["1"]["hd"]["mean"] == math.inf
    pooled = M.pooled_precision_recall(cases)["1"]
    tp = sum(c["1"]["tp"] for c in cases); fp = sum(c["1"]["fp"] for c in cases)
    assert pooled["precision"] == pytest.approx(tp / (tp + fp))


def test_empty_truth_f1_and_all_nan_aggregation_as_monai_decides():
    from monai.metrics import ConfusionMatrixMetric, HausdorffDistanceMetric

    pred, truth = np.zeros((1, 1, 8, 8, 8), np.float32), np.zeros((1, 1, 8, 8, 8), np.float32)
    pred[0, 0, 2:4, 2:4, 2:4] = 1  # a false alarm on an empty truth
    cm = ConfusionMatrixMetric(metric_name="f1 score", include_background=True)
    cm(torch.from_numpy(pred), torch.from_numpy(truth))
    ref_f1 = float(cm.aggregate()[0])
    m = M.overlap_metrics(pred[0, 0] > 0, truth[0, 0] > 0)
    assert m["f1"] == ref_f1 == 0.0 and math.isnan(m["dice"])  # Dice still ignores an empty truth
    # Hausdorff over cases that are all NaN (both masks empty): MONAI reduces to (0, not_nans 0)
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, get_not_nans=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd(torch.zeros(2, 1, 8, 8, 8), torch.zeros(2, 1, 8, 8, 8))
        ref_mean, ref_n = (float(v) for v in hd.aggregate())
    cases = [M.case_metrics(np.zeros((8, 8, 8), int), np.zeros((8, 8, 8), int), num_classes=2) for _ in range(2)]
    agg = M.aggregate(cases)["1"]["hd95"]
    assert (agg["mean"], agg["n"]) == (ref_mean, ref_n) == (0.0, 0)


def test_single_channel_dice_warns_as_monai_and_out_of_range_labels_poison_the_jitted_loss():
    import jax
    import jax.numpy as jnp
    from monai.losses import DiceLoss

    from jaxseg.losses import dice_ce_loss, dice_loss

    logits = np.random.default_rng(0).normal(size=(1, 4, 4, 4, 1)).astype(np.float32)
    with pytest.warns(UserWarning, match="single channel prediction, `include_background=False` ignored") as ours:
        dice_loss(jnp.asarray(logits), jnp.ones_like(jnp.asarray(logits)), "sigmoid", include_background=False)
    with pytest.warns(UserWarning, match="single channel prediction, `include_background=False` ignored"):
        DiceLoss(sigmoid=True, include_background=False)(torch.from_numpy(logits).permute(0, 4, 1, 2, 3),
                                                         torch.ones(1, 1, 4, 4, 4))
    assert len(ours) == 1
    two = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 4, 4, 2)).astype(np.float32))
    labels = np.zeros((1, 4, 4, 4), np.int32)
    labels[0, 0, 0, 0] = 5
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        dice_ce_loss(two, jnp.asarray(labels))  # eager: refused
    jitted = jax.jit(dice_ce_loss)
    assert math.isnan(float(jitted(two, jnp.asarray(labels))))  # under jit: NaN, never a plausible number
    assert math.isfinite(float(jitted(two, jnp.asarray(np.minimum(labels, 1)))))


def test_evaluation_reports_the_cached_grid_and_each_scans_own_geometry(spleen_cache, tmp_path):
    """The phantom scans have 1.2 x 1.2 x 2.0 mm voxels, the cache 1 mm: an oracle on the cached
    grid scores Dice 1 there; in the scan's own geometry (mapped back, against the original label
    file) the counts are the scan's own voxels, about 1 / (1.2 x 1.2 x 2.0) as many."""
    import csv

    from jaxseg.data.msd import load_nifti
    from jaxseg.evaluate import evaluate_cases

    ids = spleen_cache.training[:2]

    def oracle(image):  # the truth as probabilities
        cid = next(c for c in ids if np.array_equal(np.asarray(spleen_cache.image(c)), image))
        return np.eye(2, dtype=np.float32)[np.asarray(spleen_cache.label(cid))]

    res = evaluate_cases(oracle, spleen_cache, ids, tmp_path, figures=0, progress=False)
    for cid in ids:
        grid, native = res["per_case"][cid]["spleen"], res["per_case_native"][cid]["spleen"]
        assert grid["dice"] == 1.0 and grid["hd95"] == 0.0
        assert 0.8 < native["dice"] <= 1.0
        truth, affine = load_nifti(spleen_cache.meta(cid)["source"][1][0])
        assert native["tp"] + native["fn"] == int((np.rint(truth) == 1).sum())  # counted on the scan's own voxels
        assert 0.25 < native["tp"] / grid["tp"] < 0.5  # 1 / 2.88 of the 1 mm voxels
    rows = list(csv.DictReader(open(tmp_path / "cases.csv")))
    assert {r["grid"] for r in rows} == {"cache", "native"}
    md = (tmp_path / "summary.md").read_text()
    assert "Cached grid" in md and "own geometry (2 of 2 cases" in md
