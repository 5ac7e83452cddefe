"""What the training loop does beside stepping, one small hook each (as clu's periodic actions
or MONAI's handlers): the convergence rule, evaluation, best-model keeping with early stopping,
the metrics log, checkpoints. Every hook has the same methods (``Hook``); the loop
(``jaxseg.train.loop``) calls them in order after each step."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from jaxseg.distributed import is_primary
from jaxseg.io import atomic_write_text
from jaxseg.train.best import BestModel
from jaxseg.train.checkpoint import Checkpointer
from jaxseg.train.tensorboard import Board


@dataclasses.dataclass
class Step:
    """What a hook sees of one finished step."""

    index: int
    loss: float
    history: list[float]  # every loss so far, this one last (across resumed runs)
    record: dict  # this step's row of metrics.jsonl: hooks add their numbers before it is written
    state: Any | None  # the train state after this step, where the loop waited for it (``Hook.wants_state``)
    train_s: float  # training time up to this step, before any evaluation or checkpoint
    images: dict = dataclasses.field(default_factory=dict)  # tag -> RGB (H, W, 3), for TensorBoard


class Control:
    """How a hook asks the loop to stop after the step in hand (the first reason given wins)."""

    def __init__(self):
        self.reason: str | None = None

    def stop(self, reason: str) -> None:
        self.reason = self.reason or reason

    @property
    def stopping(self) -> bool:
        return self.reason is not None


class Hook:
    """One concern of the training loop. ``restore`` takes what a resumed checkpoint kept of it
    (``extra``); ``wants_state(step)`` says it needs that step's train state (the loop then waits
    for the step); ``after_step`` runs after every step, in the order the hooks are given;
    ``summary`` adds to the run's summary."""

    def restore(self, extra: dict) -> None:
        pass

    def wants_state(self, step: int) -> bool:
        return False

    def after_step(self, step: Step, control: Control) -> None:
        pass

    def extra(self) -> dict:
        return {}

    def summary(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def due(step: int, every: int, last: int) -> bool:
    """A periodic action runs every ``every`` steps and at the last step (``every`` 0: never)."""
    return bool(every) and (step % every == 0 or step == last)


class Convergence(Hook):
    """The paper's stopping rule on the loss history (``rule(history)``), applied from step
    ``min_steps`` on (a warm-up); where it first held is kept either way (``rule_met_at``). The
    loop reads a step's loss after dispatching the next one, so the run ends one step later."""

    def __init__(self, rule: Callable[[list[float]], bool], min_steps: int = 0):
        self.rule, self.min_steps = rule, min_steps
        self.converged_at = self.rule_met_at = None

    def restore(self, extra: dict) -> None:
        self.converged_at, self.rule_met_at = extra.get("converged_at"), extra.get("rule_met_at")

    def after_step(self, step: Step, control: Control) -> None:
        if not self.rule(step.history):
            return
        self.rule_met_at = step.index if self.rule_met_at is None else self.rule_met_at
        if step.index >= self.min_steps and self.converged_at is None:
            self.converged_at = step.record["converged"] = step.index
            control.stop("converged")

    def extra(self) -> dict:
        return {"converged_at": self.converged_at, "rule_met_at": self.rule_met_at}

    def summary(self) -> dict:
        return {"converged_at": self.converged_at, "rule_met_at": self.rule_met_at, "min_steps": self.min_steps}


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What an evaluation returns: numbers for the metrics row, and images for TensorBoard."""

    scores: dict[str, float]
    images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class Evaluate(Hook):
    """``evaluate(state, step) -> Evaluation`` every ``every`` steps and at the last one."""

    def __init__(self, evaluate: Callable[[Any, int], Evaluation], every: int, num_steps: int):
        self.evaluate, self.every, self.num_steps = evaluate, every, num_steps

    def wants_state(self, step: int) -> bool:
        return due(step, self.every, self.num_steps)

    def after_step(self, step: Step, control: Control) -> None:
        if step.state is not None and self.wants_state(step.index):
            result = self.evaluate(step.state, step.index)
            step.record.update(result.scores)
            step.images.update(result.images)


class KeepBest(Hook):
    """The parameters with the best ``metric`` so far (``BestModel``: ``best.msgpack``), and with
    ``patience`` > 0 early stopping: the run ends once ``patience`` evaluations, ``every`` steps
    apart, have passed without a better score. Derived from ``best.json``, so a resumed run
    counts from the same best step."""

    def __init__(self, best: BestModel, metric: str = "val_dice", patience: int = 0, every: int = 1):
        self.best, self.metric, self.patience, self.every = best, metric, patience, every
        self.stopped_at = None

    def after_step(self, step: Step, control: Control) -> None:
        if self.metric not in step.record:
            return
        self.best.offer(step.record[self.metric], step.index, step.state.params)
        if self.patience and step.index - self.best.best["step"] >= self.patience * self.every:
            self.stopped_at = step.index
            control.stop(f"no better {self.metric} in {self.patience} evaluations")

    def summary(self) -> dict:
        return {"best": self.best.best, "patience": self.patience, "early_stopped_at": self.stopped_at}


class Facts(Hook):
    """Facts about a run for its summary (which cases it used, say)."""

    def __init__(self, **facts):
        self.facts = facts

    def summary(self) -> dict:
        return dict(self.facts)


class MetricsLog(Hook):
    """Every step's row in ``metrics.jsonl`` (process 0), TensorBoard scalars and images, and the
    progress bar. Rows are written by a background thread: the loop hands a row over and goes
    on; ``flush`` waits until every row handed over is on disk. Rows of steps past ``start`` (a
    killed run's, logged after its last checkpoint) are dropped first."""

    def __init__(self, workdir: Path, name: str, start: int, num_steps: int, progress: bool = True,
                 constants: dict | None = None):
        path = Path(workdir) / "metrics.jsonl"
        if is_primary():
            _truncate_metrics(path, start)
        self.board = Board(Path(workdir) / "tensorboard")
        self.constants = constants or {}
        self.bar = tqdm(total=num_steps, initial=start, desc=name, unit="step", disable=not progress,
                        dynamic_ncols=True)
        self.file = open(path if is_primary() else os.devnull, "a")
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="jaxseg-metrics", daemon=True)
        self.thread.start()

    def after_step(self, step: Step, control: Control) -> None:
        for tag, rgb in step.images.items():
            self.queue.put(("image", (tag, step.index, rgb)))
        self.queue.put(("row", step.record))
        rec = step.record
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", crops_s=f"{rec['crops_per_s']:.1f}",
                             wait=f"{rec['data_wait_s'] * 1e3:.0f}ms", refresh=False)
        self.bar.update(1)

    def flush(self) -> None:
        self.queue.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.file.close()
        self.bar.close()
        self.board.close()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                kind, value = item
                if kind == "image":
                    self.board.image(*value)
                else:
                    self.file.write(json.dumps(value) + "\n")
                    self.file.flush()
                    self.board.scalars(value["step"], {**{k: v for k, v in value.items() if k != "step"},
                                                       **self.constants})
            except BaseException as e:  # noqa: BLE001 - raised in the loop's thread at the next flush
                self.error = self.error or e
            finally:
                self.queue.task_done()
        self.queue.task_done()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the rows of steps up to ``last_step`` (the restored checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError):
            continue  # a line cut by the kill
    atomic_write_text(path, "".join(f"{l}\n" for l in keep))


class Checkpoints(Hook):
    """A checkpoint (train state, the input's position, ``extras()``) every ``every`` steps, at
    the last step, and wherever the run stops early (converged, early-stopped, preempted); the
    metrics log is flushed first, so a resumed run has every row up to its step."""

    def __init__(self, ckpt: Checkpointer, feed: Any, every: int, num_steps: int, log: MetricsLog,
                 extras: Callable[[Step, Control], dict]):
        self.ckpt, self.feed, self.every, self.num_steps, self.log, self.extras = ckpt, feed, every, num_steps, log, extras

    def wants_state(self, step: int) -> bool:
        return due(step, self.every, self.num_steps)

    def after_step(self, step: Step, control: Control) -> None:
        if step.state is not None and (self.wants_state(step.index) or control.stopping):
            self.log.flush()
            self.ckpt.save(step.index, step.state, self.feed, self.extras(step, control))


class Profile(Hook):
    """A ``jax.profiler`` trace of steps ``first``..``last`` (1-based, ``first`` >= 2: after the
    compilation of step 1) into ``folder`` (TensorBoard's profile plugin reads it). The loop waits
    for step ``first - 1`` before the trace starts and for ``last`` before it stops, so the trace
    holds those steps' device work whole (and an evaluation or checkpoint due at ``last``). A run
    resumed inside the range traces from its first step on; a trace that cannot be taken or
    written is a warning, never the run's end."""

    def __init__(self, folder: Path, first: int, last: int, num_steps: int):
        self.folder, self.first, self.last, self.num_steps = Path(folder), first, last, num_steps
        self.tracing = self.traced = self.failed = False

    def wants_state(self, step: int) -> bool:
        return step in (self.first - 1, self.last)

    def after_step(self, step: Step, control: Control) -> None:
        import jax

        idle = not (self.tracing or self.traced or self.failed)
        if idle and self.first - 1 <= step.index < min(self.last, self.num_steps) and not control.stopping:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                jax.profiler.start_trace(str(self.folder))
            except (OSError, RuntimeError) as e:
                warnings.warn(f"--profile_steps: no trace ({e})", stacklevel=2)
                self.failed = True
                return
            self.tracing = True
        elif self.tracing and (step.index >= self.last or control.stopping):
            self.close()

    def close(self) -> None:
        if self.tracing:
            import jax

            self.tracing = False
            try:
                jax.profiler.stop_trace()
                self.traced = True
            except (OSError, RuntimeError) as e:
                warnings.warn(f"--profile_steps: the trace could not be written to {self.folder} ({e})", stacklevel=2)

    def summary(self) -> dict:
        return {"profile": str(self.folder)} if self.traced else {}


def loss_trend(history: list[float], window: int = 10) -> float | None:
    """Relative change of the mean loss over the last ``window`` steps against the ``window``
    before (negative: still falling); None with fewer than ``2 * window`` steps."""
    if len(history) < 2 * window:
        return None
    last, before = history[-window:], history[-2 * window:-window]
    mean_before = sum(before) / window
    return (sum(last) / window - mean_before) / abs(mean_before) if mean_before else None


def converged(history: list[float], window: int = 10, rtol: float = 0.01) -> bool:
    """The paper's rule: the current loss lies within ``rtol`` x |mean| of the running mean of
    the ``window`` losses before it."""
    if len(history) <= window:
        return False
    mean = sum(history[-window - 1:-1]) / window
    return abs(history[-1] - mean) < rtol * abs(mean)


def final_losses(history: list[float]) -> dict:
    return {"loss_trend": loss_trend(history), "final_loss": history[-1] if history else None,
            "final_mean_loss": sum(history[-10:]) / len(history[-10:]) if history else None}

