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
