"""Summaries over repeated runs: mean +- sd, and a bootstrap interval for paired differences."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for one value) of the non-NaN values;
    an inf among them makes the mean inf and the sd NaN."""
    a = np.asarray([v for v in values if not math.isnan(v)], float)
    if not a.size:
        return math.nan, math.nan
    if not np.isfinite(a).all():
        return float(a.mean()), math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` (e.g. paired differences, one per seed x test
    case) and the percentile bootstrap interval of the mean at ``level``. NaNs are dropped;
    seeded, so a report is reproducible."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a = np.asarray([v for v in values if not math.isnan(v)], float)
    if not a.size:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, (resamples, a.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(a.mean()), float(lo), float(hi)


def crossed_bootstrap_ci(diffs, level: float = 0.95, resamples: int = 10_000,
                         seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of a seeds x cases table of paired differences (one row per seed, one
    column per test case; the same cases in every seed): the mean over all entries and the
    percentile bootstrap interval of it when seeds AND cases are resampled, each with
    replacement and independently of the other (a crossed design: either can carry the
    spread). With one seed only cases vary, with one case only seeds. NaNs are left out of
    each mean; seeded, so a report is reproducible."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = np.asarray(diffs, float)
    if d.ndim != 2:
        raise ValueError(f"diffs must be a (seeds, cases) table, got shape {d.shape}")
    if not np.isfinite(d).any():
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, d.shape[0], (resamples, d.shape[0]))
    cols = rng.integers(0, d.shape[1], (resamples, d.shape[1]))
    picked = d[rows[:, :, None], cols[:, None, :]]  # (resamples, seeds, cases)
    ok = np.isfinite(picked)
    counts = ok.sum((1, 2))
    means = np.where(ok, picked, 0.0).sum((1, 2))[counts > 0] / counts[counts > 0]
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(np.nanmean(d)), float(lo), float(hi)
