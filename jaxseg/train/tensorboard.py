"""TensorBoard event files beside ``metrics.jsonl`` (which stays the record of truth).

Written with ``tensorboardX`` (the ``tensorboard`` extra: a small, well-kept writer with no
TensorFlow or torch dependency); without it, or on processes other than 0, a silent no-op.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from jaxseg.distributed import is_primary


class Board:
    def __init__(self, logdir: str | Path, enabled: bool = True):
        self.writer = None
        if not (enabled and is_primary()):
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            warnings.warn("tensorboardX is not installed (pip install 'jaxseg[tensorboard]'): "
                          "no TensorBoard logs, metrics.jsonl only", stacklevel=2)
            return
        self.writer = SummaryWriter(str(logdir))

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def image(self, tag: str, step: int, rgb: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
