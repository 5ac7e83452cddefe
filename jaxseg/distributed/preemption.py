"""Preemption: SIGTERM (what SLURM and cloud schedulers send before stopping a job) as a
request to checkpoint at a step every process agrees on, then stop."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import jax

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: what schedulers expect of a job stopped by SIGTERM


class Preempted(Exception):
    """SIGTERM arrived; the run saved a checkpoint at ``step`` and stopped. Rerun to resume."""

    def __init__(self, name: str, step: int, directory: Path):
        super().__init__(f"{name}: stopped by SIGTERM after step {step}; checkpoint saved in {directory}. "
                         f"Rerun the same command to resume.")
        self.step = step


class StopRequest:
    """Asks a training loop to stop at a step every process agrees on. Multi-process: JAX's
    preemption service catches SIGTERM on any process and picks the step
    (``reached_preemption_sync_point``, which every process must call at every step).
    Single-process: a SIGTERM handler of our own sets a flag the loop reads after each step."""

    def __init__(self):
        self.requested = False
        self.multi = jax.process_count() > 1
        self._old = None

    def __enter__(self):
        if not self.multi and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False

    def _on_sigterm(self, signum, frame):
        self.requested = True

    _sync_id = 0  # one count for the whole process: JAX's sync point needs ids that only grow

    def at_step(self) -> bool:
        """Whether to stop after the step just dispatched: call once per step, on every process."""
        if self.multi:
            from jax.experimental import multihost_utils

            StopRequest._sync_id += 1
            return multihost_utils.reached_preemption_sync_point(StopRequest._sync_id)
        return self.requested
