"""The experiment's design over the cached cases: a seeded train / val / test split, and the
labelled subset a fine-tuning run uses."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def split_cases(case_ids: Sequence[str], val_fraction: float, test_fraction: float, seed: int
                ) -> dict[str, list[str]]:
    """Seeded train / val / test split (the test part is never used for model selection)."""
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = int(round(test_fraction * len(ids)))
    n_val = int(round(val_fraction * len(ids)))
    test = [ids[i] for i in order[:n_test]]
    val = [ids[i] for i in order[n_test:n_test + n_val]]
    train = [ids[i] for i in order[n_test + n_val:]]
    return {"train": train, "val": val, "test": test}


def labelled_subset(train_ids: Sequence[str], n: int | None, seed: int) -> list[str]:
    """The first ``n`` labelled training cases in a seeded order (all when ``n`` is None)."""
    ids = sorted(train_ids)
    order = np.random.default_rng(seed + 1).permutation(len(ids))
    chosen = [ids[i] for i in order]
    return chosen if n is None else chosen[:n]
