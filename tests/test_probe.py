"""The representation probe, the seed statistics and table1's paired summaries, against
obviously-correct loops written here."""

import itertools
import math

import numpy as np
import pytest

from jaxseg.probe import collapse_stats, partition_labels, pooled_slices, representation_probe, probe_accuracy
from jaxseg.report import summary_rows
from jaxseg.stats import bootstrap_ci, crossed_bootstrap_ci, mean_sd


def test_pooled_slices_match_a_loop():
    f = np.random.default_rng(0).standard_normal((2, 4, 4, 4, 3))
    got = pooled_slices(f)
    for n, a, t in itertools.product(range(2), range(3), range(4)):
        want = np.take(f[n], t, axis=a).reshape(-1, 3).mean(0)
        np.testing.assert_allclose(got[n, a, t], want, rtol=1e-12)


def test_partition_labels_crop_and_anatomy():
    starts, shapes = np.array([[-8, 8, 30]]), np.array([[32, 64, 48]])
    lab = partition_labels(grid=4, crop_size=32, num_partitions=4, starts=starts, shapes=shapes)
    np.testing.assert_array_equal(lab["crop"][0], [[0, 1, 2, 3]] * 3)
    for a in range(3):  # slice t covers voxels start + [8t, 8t + 8); centre start + 8t + 4
        centres = [starts[0, a] + 8 * t + 4 for t in range(4)]
        want = [int(c / shapes[0, a] * 4) if 0 <= c < shapes[0, a] else -1 for c in centres]
        np.testing.assert_array_equal(lab["anatomy"][0, a], want)
    np.testing.assert_array_equal(lab["anatomy"][0], [[-1, 0, 1, 2], [0, 1, 1, 2], [2, 3, -1, -1]])


def test_logistic_probe_separable_and_random():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    x = np.eye(4)[y] * 3 + 0.1 * rng.standard_normal((400, 4))
    x = np.concatenate([x, rng.standard_normal((400, 6))], 1)
    assert probe_accuracy(x[:200], y[:200], x[200:], y[200:], 4) == 1.0
    t = rng.integers(0, 4, 400).astype(float)[:, None]  # one ordered feature: intervals, which least squares misses
    assert probe_accuracy(t[:200], t[:200, 0].astype(int), t[200:], t[200:, 0].astype(int), 4) == 1.0
    noise = rng.standard_normal((400, 10))
    assert abs(probe_accuracy(noise[:200], y[:200], noise[200:], y[200:], 4) - 0.25) < 0.12


def test_collapse_stats_extremes_and_a_loop():
    same = np.ones((5, 8))
    assert collapse_stats(same) == pytest.approx({"mean_cosine": 1.0, "feature_spread": 0.0}, abs=1e-9)
    assert collapse_stats(np.eye(6))["mean_cosine"] == pytest.approx(0.0)
    x = np.random.default_rng(1).standard_normal((7, 5))
    cos = [x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j]) for i in range(7) for j in range(7) if i != j]
    assert collapse_stats(x)["mean_cosine"] == pytest.approx(np.mean(cos))


def test_probe_reads_position_and_flags_collapse(spleen_cache):
    cache = spleen_cache
    ids = cache.training

    def position_encoder(images):  # features that are the crop position: crop probe perfect
        n, s = len(images), images.shape[1] // 8
        grid = np.stack(np.meshgrid(*[np.arange(s)] * 3, indexing="ij"), -1).astype(np.float32)
        return np.broadcast_to(grid, (n, s, s, s, 3)) + 0.01 * images[:, ::8, ::8, ::8, :1]

    res = representation_probe(position_encoder, cache, ids[:4], ids[4:], crop_size=32, num_partitions=4)
    assert res["crop_accuracy"] == 1.0 and res["chance"] == 0.25 and len(res["crop_accuracy_per_axis"]) == 3
    assert 0 <= res["anatomy_accuracy"] <= 1 and res["mean_cosine"] < 0.99

    collapsed = representation_probe(lambda im: np.ones((len(im), 4, 4, 4, 8), np.float32), cache, ids[:4], ids[4:],
                                     crop_size=32, num_partitions=4)
    assert collapsed["mean_cosine"] == pytest.approx(1.0) and collapsed["feature_spread"] < 1e-6
    assert collapsed["crop_accuracy"] == pytest.approx(0.25)  # constant features: one class predicted


def test_mean_sd_and_bootstrap():
    assert mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert math.isnan(mean_sd([4.0])[1]) and mean_sd([1.0, math.nan, 3.0]) == pytest.approx((2.0, math.sqrt(2)))
    assert mean_sd([1.0, math.inf])[0] == math.inf
    assert bootstrap_ci([0.2] * 9) == pytest.approx((0.2, 0.2, 0.2))
    x = np.random.default_rng(0).normal(0.5, 1.0, 200)
    m, lo, hi = bootstrap_ci(x)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert m == pytest.approx(x.mean()) and lo < m < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)  # the normal interval, for a mean of 200
    assert bootstrap_ci(x) == bootstrap_ci(x)  # seeded


def test_crossed_bootstrap_resamples_seeds_and_cases_as_a_loop_would():
    rng = np.random.default_rng(1)
    d = rng.normal(0.1, 0.05, (3, 4)) + rng.normal(0, 0.2, (3, 1))  # a seed effect larger than the case noise
    d[1, 2] = math.nan
    m, lo, hi = crossed_bootstrap_ci(d, resamples=2000, seed=7)
    draws = np.random.default_rng(7)  # the same draws, by the obvious loop
    rows, cols = draws.integers(0, 3, (2000, 3)), draws.integers(0, 4, (2000, 4))
    means = []
    for r, c in zip(rows, cols):
        vals = [d[i, j] for i in r for j in c if not math.isnan(d[i, j])]
        if vals:  # a draw of nothing but the NaN cell has no mean
            means.append(sum(vals) / len(vals))
    assert m == pytest.approx(np.nanmean(d))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    # seeds count: the naive interval over the 11 pairs is much narrower than the crossed one
    _, nlo, nhi = bootstrap_ci(d[np.isfinite(d)])
    assert hi - lo > 1.5 * (nhi - nlo)
    # one seed: the case bootstrap; identical seeds: no extra width
    one = d[:1]
    assert crossed_bootstrap_ci(one)[1:] == pytest.approx(bootstrap_ci(one[0])[1:], abs=0.01)
    same = np.repeat(d[:1], 3, axis=0)
    assert crossed_bootstrap_ci(same)[2] - crossed_bootstrap_ci(same)[1] == pytest.approx(
        bootstrap_ci(d[0])[2] - bootstrap_ci(d[0])[1], abs=0.02)
    assert all(math.isnan(v) for v in crossed_bootstrap_ci(np.full((2, 2), math.nan)))


def test_summary_rows_pair_by_seed_and_case():
    rng = np.random.default_rng(0)
    cases = ["a", "b", "c"]
    runs = [{"seed": s, "init": init, "budget": 2, "labels": 2, "pretrain_s": 1.0 if init != "none" else 0.0,
             "best_val_dice": 0.0,
             "cases": {c: {"spleen": {"dice": float(rng.random()), "hd95": float(rng.random())}} for c in cases}}
            for s in (0, 1) for init in ("none", "comparative")]
    rows = {r["init"]: r for r in summary_rows(runs)}
    comp = [r for r in runs if r["init"] == "comparative"]
    per_seed = [np.mean([r["cases"][c]["spleen"]["dice"] for c in cases]) for r in comp]
    assert rows["comparative"]["metrics"]["spleen"]["dice"] == pytest.approx((np.mean(per_seed), np.std(per_seed, ddof=1)))
    diffs = []
    for s in (0, 1):
        mine = next(r for r in runs if (r["seed"], r["init"]) == (s, "comparative"))
        base = next(r for r in runs if (r["seed"], r["init"]) == (s, "none"))
        diffs += [mine["cases"][c]["spleen"]["dice"] - base["cases"][c]["spleen"]["dice"] for c in cases]
    paired = rows["comparative"]["paired_dice"]["spleen"]
    assert paired["n"] == 6 and paired["mean"] == pytest.approx(np.mean(diffs)) and paired["low"] <= paired["high"]
    assert rows["none"]["paired_dice"] == {}


def test_label_efficiency_table_and_figure(tmp_path):
    from jaxseg.report import label_efficiency_markdown, label_efficiency_png

    rng = np.random.default_rng(2)
    runs = [{"seed": s, "init": init, "budget": b, "labels": b, "pretrain_s": 0.0, "best_val_dice": 0.0,
             "cases": {c: {"spleen": {"dice": float(rng.random()), "hd95": 1.0}} for c in "abc"}}
            for b in (1, 2, 4) for s in (0, 1) for init in ("none", "contrastive")]
    rows = summary_rows(runs)
    md = "\n".join(label_efficiency_markdown(rows))
    assert "| labelled cases | none | contrastive |" in md and md.count("\n| ") == 4  # header + 3 budgets
    one = next(r for r in rows if (r["labels"], r["init"]) == (2, "none"))
    table = [[r["cases"][c]["spleen"]["dice"] for c in "abc"] for r in runs if (r["labels"], r["init"]) == (2, "none")]
    assert one["dice_ci"]["spleen"]["mean"] == pytest.approx(np.mean(table))
    assert label_efficiency_png(rows, tmp_path / "le.png") and (tmp_path / "le.png").stat().st_size > 1000
    assert not label_efficiency_png([r for r in rows if r["labels"] == 2], tmp_path / "one.png")  # one budget: no curve
