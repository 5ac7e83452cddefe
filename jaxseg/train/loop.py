"""The training loop shared by pre-training and fine-tuning, and its small parts: resume, a
``Clock`` (compile step apart, data wait measured, paused during evaluation and checkpoints),
periodic actions (evaluate, checkpoint, log: metrics file, TensorBoard, progress with ETA), a
NaN stop that keeps the last good checkpoint, and the convergence rule."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
from tqdm import tqdm

from jaxseg.run_settings import atomic_write_text, is_primary
from jaxseg.train.checkpoint import Checkpointer
from jaxseg.train.tensorboard import Board


class NonFiniteLossError(FloatingPointError):
    pass


class Clock:
    """Training time the careful way: the first step (compilation) apart, evaluation and
    checkpoints paused out, earlier (killed) runs' training time carried over."""

    def __init__(self, prior_train_s: float = 0.0):
        self.prior, self.start, self.paused_s = prior_train_s, time.perf_counter(), 0.0
        self.first_step_s: float | None = None
        self.step_times: list[float] = []
        self.data_waits: list[float] = []

    def record(self, data_wait: float, step_time: float) -> None:
        if self.first_step_s is None:
            self.first_step_s = step_time
        else:
            self.step_times.append(step_time)
            self.data_waits.append(data_wait)

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    @property
    def compile_s(self) -> float:  # the first step's time less a typical step
        if self.first_step_s is None:
            return 0.0
        return max(self.first_step_s - statistics.median(self.step_times), 0.0) if self.step_times else self.first_step_s

    def train_s(self) -> float:
        return self.prior + (time.perf_counter() - self.start) - self.paused_s - self.compile_s

    def summary(self, crops_per_step: int) -> dict:
        med = statistics.median(self.step_times) if self.step_times else None
        return {"compile_s": self.compile_s, "wall_s": time.perf_counter() - self.start, "train_s": self.train_s(),
                "median_step_s": med,
                "median_data_wait_s": statistics.median(self.data_waits) if self.data_waits else None,
                "crops_per_s": crops_per_step / med if med else None}


def due(step: int, every: int, last: int) -> bool:
    """A periodic action runs every ``every`` steps and at the last step (``every`` 0: never)."""
    return bool(every) and (step % every == 0 or step == last)


def run_loop(*, name: str, workdir: Path, state: Any, step_fn: Callable, data_iter: Any, num_steps: int,
             prepare_batch: Callable[[dict], dict], crops_per_step: int, ckpt_every: int = 100,
             should_stop: Callable[[list[float]], bool] | None = None, min_steps: int = 0,
             evaluate: Callable[[Any, int], dict] | None = None, eval_every: int = 0,
             progress: bool = True, learning_rate: float | None = None) -> tuple[Any, dict]:
    """Run ``step_fn(state, batch) -> (state, metrics with 'loss')`` up to ``num_steps`` total
    steps, resuming from ``workdir/checkpoints`` if present. Periodic actions: ``evaluate``
    every ``eval_every`` steps (it may return ``images``: tag -> RGB array, for TensorBoard
    only), a checkpoint every ``ckpt_every`` steps, a log row (``metrics.jsonl``, TensorBoard in
    ``workdir/tensorboard``, the progress bar) every step. ``should_stop(losses)`` ends the run
    once it holds at or after step ``min_steps`` (a warm-up); the first step where it held is
    kept either way (``rule_met_at``). Returns (state, summary); ``train_s`` counts training time
    across resumed runs, without compilation (``compile_s``), evaluation or checkpointing."""
    workdir = Path(workdir)
    ckpt = Checkpointer(workdir / "checkpoints")
    restored = ckpt.restore(state, data_iter)
    state, extra = restored if restored is not None else (state, {})
    history: list[float] = list(extra.get("history", []))
    converged_at, rule_met_at = extra.get("converged_at"), extra.get("rule_met_at")
    start = step = int(jax.device_get(state.step))
    metrics_path = workdir / "metrics.jsonl"
    if is_primary():
        _truncate_metrics(metrics_path, start)  # a killed run may have logged steps past its checkpoint
    clock = Clock(float(extra.get("train_s", 0.0)))
    board = Board(workdir / "tensorboard")
    bar = tqdm(total=num_steps, initial=start, desc=name, unit="step", disable=not progress, dynamic_ncols=True)
    with open(metrics_path if is_primary() else os.devnull, "a") as log:
        while step < num_steps and converged_at is None:
            t0 = time.perf_counter()
            batch = prepare_batch(next(data_iter))
            t1 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            loss = float(metrics["loss"])  # syncs the device
            t2 = time.perf_counter()
            if not math.isfinite(loss):
                _stop_non_finite(name, loss, step, ckpt)
            clock.record(t1 - t0, t2 - t1)
            history.append(loss)
            step += 1
            rec = {"step": step, "loss": loss, "step_time_s": t2 - t1, "data_wait_s": t1 - t0,
                   "crops_per_s": crops_per_step / max(t2 - t1, 1e-9),
                   **{k: float(v) for k, v in metrics.items() if k != "loss" and jax.numpy.ndim(v) == 0}}
            if should_stop is not None and should_stop(history):
                rule_met_at = step if rule_met_at is None else rule_met_at
                if step >= min_steps:
                    converged_at, rec["converged"] = step, True
            trained = clock.train_s()  # up to this step, before this step's evaluation
            with clock.paused():
                if evaluate is not None and due(step, eval_every, num_steps):
                    rec.update(_evaluate(evaluate, state, step, board))
                if due(step, ckpt_every, num_steps) or converged_at is not None:
                    ckpt.save(step, state, data_iter, {"history": history, "converged_at": converged_at,
                                                       "rule_met_at": rule_met_at, "train_s": trained})
            _log(rec, log, board, bar, learning_rate)
    bar.close()
    board.close()
    ckpt.close()
    summary = {"name": name, "start_step": start, "end_step": step, "converged_at": converged_at,
               "rule_met_at": rule_met_at, "min_steps": min_steps, "loss_trend": loss_trend(history),
               **clock.summary(crops_per_step), "final_loss": history[-1] if history else None}
    if is_primary():
        atomic_write_text(workdir / f"{name}_summary.json", json.dumps(summary, indent=1))
    return state, summary


def _stop_non_finite(name: str, loss: float, step: int, ckpt: Checkpointer):
    last = ckpt.latest_step()
    ckpt.close()
    raise NonFiniteLossError(
        f"{name}: non-finite loss ({loss}) at step {step}; stopped. The last good checkpoint "
        f"({'step ' + str(last) if last is not None else 'none'}) in {ckpt.directory} is intact.")


def _evaluate(evaluate, state, step: int, board: Board) -> dict:
    ev = dict(evaluate(state, step))
    for tag, rgb in ev.pop("images", {}).items():
        board.image(tag, step, rgb)
    return ev


def _log(rec: dict, log, board: Board, bar, learning_rate: float | None) -> None:
    log.write(json.dumps(rec) + "\n")
    log.flush()
    board.scalars(rec["step"], {**{k: v for k, v in rec.items() if k != "step"},
                                **({"learning_rate": learning_rate} if learning_rate is not None else {})})
    bar.set_postfix(loss=f"{rec['loss']:.4f}", crops_s=f"{rec['crops_per_s']:.1f}",
                    wait=f"{rec['data_wait_s'] * 1e3:.0f}ms")
    bar.update(1)


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
