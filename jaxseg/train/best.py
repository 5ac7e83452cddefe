"""Model selection beside the loop: the parameters with the best validation score so far."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxseg.distributed import is_primary
from jaxseg.io import atomic_write_text, load_weights, save_weights


class BestModel:
    """Keeps ``folder/best.msgpack`` (weights) and ``folder/best.json`` (``val_dice``, ``step``)
    for the highest score offered, so a resumed run goes on comparing against the best before
    it was stopped (``best.json`` is read once, at the start, from the shared work dir, as
    checkpoints are). After that every process decides alike from the scores it computes, never
    from files, which other hosts may see late; only process 0 writes."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.weights, self.record = folder / "best.msgpack", folder / "best.json"
        self.best = json.loads(self.record.read_text()) if self.record.is_file() else {"val_dice": -1.0, "step": 0}

    def offer(self, score: float, step: int, params: Any) -> bool:
        """Keep ``params`` if ``score`` beats the best so far (NaN never does)."""
        if not score > self.best["val_dice"]:
            return False
        self.best = {"val_dice": float(score), "step": int(step)}
        if is_primary():
            save_weights(self.weights, params)
            atomic_write_text(self.record, json.dumps(self.best))
        return True

    def finish(self, params: Any) -> None:
        """With nothing kept (no validation cases), the final ``params`` are the best."""
        if is_primary() and not self.weights.exists():
            save_weights(self.weights, params)

    def load(self, like: Any) -> Any:
        return load_weights(self.weights, like)
