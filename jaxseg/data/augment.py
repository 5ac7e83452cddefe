"""Host-side crop sampling and augmentation on NumPy arrays (channels-last), driven by an
explicit ``np.random.Generator`` so pipelines are deterministic per element."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def crop_at(x: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Crop ``size`` from ``start`` over the first three axes, zero-padding where the crop
    leaves the volume (volumes smaller than the crop)."""
    out = np.zeros(tuple(size) + x.shape[3:], dtype=x.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, x.shape[:3]):
        a, b = max(s, 0), min(s + n, dim)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - s, a - s + max(0, b - a)))
    out[tuple(dst)] = x[tuple(src)]
    return out


def random_start(rng: np.random.Generator, shape: Sequence[int], size: Sequence[int]) -> list[int]:
    """Uniform crop start; centred (negative start = padding) when the volume is smaller."""
    return [int(rng.integers(0, n - s + 1)) if n >= s else -((s - n) // 2) for n, s in zip(shape, size)]


def centred_start(centre: Sequence[int], shape: Sequence[int], size: Sequence[int]) -> list[int]:
    """Start of a crop centred on ``centre`` and moved inside the volume (MONAI's pos/neg crop)."""
    out = []
    for c, n, s in zip(centre, shape, size):
        if n <= s:
            out.append(-((s - n) // 2))
        else:
            out.append(int(np.clip(c - s // 2, 0, n - s)))
    return out


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """One draw of the random transforms: which axes to flip, quarter turns in the first two
    axes (cubic crops), an intensity offset."""

    flips: tuple[bool, bool, bool] = (False, False, False)
    quarter_turns: int = 0
    offset: float | None = None


def draw(rng: np.random.Generator, *, flip_prob: float = 0.1, rot90_prob: float = 0.1, shift_prob: float = 0.5,
         shift: float = 0.1) -> Augmentation:
    """Flips per spatial axis, a rot90 and an intensity offset in [-shift, shift], each with its
    probability (MONAI's RandFlip / RandRotate90 / RandShiftIntensity)."""
    flips = tuple(bool(rng.random() < flip_prob) for _ in range(3))
    turns = int(rng.integers(1, 4)) if rng.random() < rot90_prob else 0
    offset = float(np.float32(rng.uniform(-shift, shift))) if rng.random() < shift_prob else None
    return Augmentation(flips, turns, offset)


def apply(t: Augmentation, image: np.ndarray, label: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray | None]:
    for axis, flip in enumerate(t.flips):
        if flip:
            image = np.flip(image, axis)
            label = None if label is None else np.flip(label, axis)
    if t.quarter_turns:
        image = np.rot90(image, t.quarter_turns, axes=(0, 1))
        label = None if label is None else np.rot90(label, t.quarter_turns, axes=(0, 1))
    if t.offset is not None:
        image = image + np.float32(t.offset)
    return np.ascontiguousarray(image, np.float32), None if label is None else np.ascontiguousarray(label)


def augment(rng: np.random.Generator, image: np.ndarray, label: np.ndarray | None = None, **probs
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """``apply(draw(rng, **probs), image, label)``: one crop's own random transforms."""
    return apply(draw(rng, **probs), image, label)
