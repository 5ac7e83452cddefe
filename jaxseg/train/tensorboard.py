"""TensorBoard event files beside ``metrics.jsonl`` (which stays the record of truth).

Written with ``tensorboardX`` (the ``tensorboard`` extra: a small, well-kept writer with no
TensorFlow or torch dependency); without it, or on processes other than 0, a silent no-op.
"""

from __future__ import annotations

import math
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

from jaxseg.distributed import is_primary


def _quiet_tensorboard_threads(hook):
    """``threading.excepthook`` less tensorboardX's writer threads dying of a disk fault: TensorBoard
    is a view (metrics.jsonl is the record), and the run names the fault when it reaches its own
    files, in one line."""
    def excepthook(args):
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboardX"):
            return
        hook(args)

    excepthook.jaxseg_filter = True
    return excepthook


def _import_summary_writer():
    """tensorboardX's ``SummaryWriter``, imported without torch: tensorboardX imports torch
    whenever it is installed (only to accept torch tensors), 2.6 s of every job's start on a
    2-core CPU where MONAI's parity tests or benchmarks put torch beside jaxseg."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError; tensorboardX falls back to NumPy
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class Board:
    def __init__(self, logdir: str | Path, enabled: bool = True):
        self.writer = None
        if not (enabled and is_primary()):
            return
        try:
            SummaryWriter = _import_summary_writer()
        except ImportError:
            warnings.warn("tensorboardX is not installed (pip install 'jaxseg[tensorboard]'): "
                          "no TensorBoard logs, metrics.jsonl only", stacklevel=2)
            return
        if not getattr(threading.excepthook, "jaxseg_filter", False):
            threading.excepthook = _quiet_tensorboard_threads(threading.excepthook)
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
        if self.writer is None:
            return
        writer, self.writer = self.writer, None
        try:
            writer.close()
        except OSError:  # a full or vanished disk: give up the view, and tell tensorboardX's atexit not to retry
            for w in getattr(writer, "all_writers", {}).values():
                w.event_writer._closed = True
