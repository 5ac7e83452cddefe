"""TensorBoard event files: written with tensorboardX, without the torch import it would make."""

import subprocess
import sys

from tests.runs import ROOT, cpu_env

SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from jaxseg.train.tensorboard import Board

board = Board(Path(sys.argv[1]))
board.scalars(1, {"loss": 0.5})
board.image("validation/overlay", 1, np.zeros((4, 4, 3), np.uint8))
board.close()
print("torch imported:", "torch" in sys.modules)
import torch  # still importable afterwards
print("torch after:", torch.__version__)
"""


def test_board_writes_events_without_importing_torch(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=cpu_env(1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch imported: False" in proc.stdout and "torch after: 2." in proc.stdout
    (events,) = tmp_path.glob("events.out.tfevents.*")
    assert events.stat().st_size > 100  # a scalar and an image record beside the header
