"""What a dataset asks the model to predict, as one value computed once from its cache (or a
trained run's model.json) and passed on: the output channels' names, whether they are classes
(softmax, one label per voxel) or overlapping regions (sigmoid, BraTS' TC / WT / ET), and the
one decision rule that turns probabilities into a segmentation."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.data.preprocess import label_channels
from jaxseg.losses.segmentation import output_probabilities


Regions = tuple[tuple[str, tuple[int, ...]], ...]  # (region name, the label values it holds), in output order


@dataclasses.dataclass(frozen=True)
class Task:
    class_names: tuple[str, ...]  # one per model output channel
    in_channels: int
    multilabel: bool = False  # sigmoid outputs, one per (possibly overlapping) region, instead of softmax classes
    regions: Regions | None = None  # multi-label: each region's label values (None: not recorded)

    def __post_init__(self):
        if self.regions is not None and tuple(n for n, _ in self.regions) != self.class_names:
            raise ValueError(f"regions {[n for n, _ in self.regions]} do not match class names "
                             f"{list(self.class_names)}")

    @classmethod
    def of(cls, class_names: Sequence[str], in_channels: int, regions: Mapping[str, Sequence[int]] | None = None
           ) -> "Task":
        """Softmax classes, or with ``regions`` (name -> label values) sigmoid regions."""
        pairs = None if regions is None else tuple((k, tuple(int(v) for v in vs)) for k, vs in regions.items())
        return cls(tuple(class_names), int(in_channels), regions is not None, pairs)

    @property
    def num_classes(self) -> int:
        """Model output channels."""
        return len(self.class_names)

    def probabilities(self, logits: jax.Array) -> jax.Array:
        """Logits (..., K) -> probabilities: sigmoid per region, or softmax over classes."""
        return output_probabilities(logits, self.multilabel)

    def segment(self, probs) -> np.ndarray:
        """The decision rule, the only one in jaxseg: regions where p > 0.5 (multi-hot
        (..., K) uint8), else the most probable class (uint8 labels (...)). Decided where
        ``probs`` lives (on the device for a predictor's output), so only uint8 comes back."""
        seg = probs > 0.5 if self.multilabel else jnp.argmax(probs, -1)
        return np.asarray(seg).astype(np.uint8)

    def targets(self, label: np.ndarray) -> np.ndarray:
        """An integer label map as the model's targets: multi-hot regions (..., K) uint8, or the
        labels themselves (uint8 as the cache stores them, no copy: a quarter of int32's bytes
        through the input pipeline; other integer maps as int32)."""
        if not self.multilabel:
            label = np.asarray(label)
            return label if label.dtype == np.uint8 else label.astype(np.int32)
        if self.regions is None:
            raise ValueError("this model.json (from an older jaxseg) does not record which label values make each "
                             f"region of {list(self.class_names)}; label maps cannot be compared with its output")
        return label_channels(label, dict(self.regions))

    def masks(self, seg: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """(name, boolean mask) per output channel of a segmentation as ``segment`` returns it
        (for classes, background included)."""
        return [(n, seg[..., k] > 0 if self.multilabel else seg == k) for k, n in enumerate(self.class_names)]

    def foreground(self, seg: np.ndarray, label: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(name, predicted mask, true mask) per foreground channel: every region, or every
        class but background; ``seg`` as ``segment`` returns it, ``label`` an integer map."""
        truth = self.targets(label) if self.multilabel else label
        pairs = [(n, p, t) for (n, p), (_, t) in zip(self.masks(seg), self.masks(truth))]
        return pairs if self.multilabel else pairs[1:]

    def channels_first(self, seg: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(prediction, truth) in the layout ``jaxseg.metrics.case_metrics`` takes: (K, ...)
        multi-hot stacks for regions, integer label maps for classes."""
        if self.multilabel:
            return np.moveaxis(seg, -1, 0), np.moveaxis(self.targets(label), -1, 0)
        return np.asarray(seg).astype(np.int16), np.asarray(label).astype(np.int16)

    def card(self) -> dict:
        """As a trained run's model.json records it."""
        return {"class_names": list(self.class_names), "in_channels": self.in_channels,
                "multilabel": self.multilabel,
                "regions": None if self.regions is None else {k: list(v) for k, v in self.regions}}

    @classmethod
    def from_card(cls, card: Mapping) -> "Task":
        regions = card.get("regions")
        if regions is None:  # classes, or the regions of an older jaxseg's model.json: names only
            return cls(tuple(card["class_names"]), int(card["in_channels"]), bool(card.get("multilabel")))
        return cls.of(card["class_names"], card["in_channels"], regions)
