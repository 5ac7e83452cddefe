"""What the tests that run jaxseg's entry points as subprocesses share."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The tiny Table 1 protocol the 1- and 2-process runs share. Pre-training as tests/distributed/test_distributed.py's
# PRETRAIN (16 + 3 steps, comparative, a checkpoint every 8): its 2-process run is also the
# uninterrupted reference that a preempted and killed pre-training must equal.
TINY_TABLE1 = ["--config=tiny", "--noprogress", "--phantom_subjects=6", "--objectives=comparative",
               "--stage1_steps=16", "--stage2_steps=3", "--finetune_steps=4", "--eval_every=2", "--ckpt_every=8"]


def cpu_env(devices: int) -> dict:
    """The environment of a subprocess on ``devices`` CPU devices that imports this checkout."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
