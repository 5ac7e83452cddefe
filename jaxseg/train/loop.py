"""The training loop shared by pre-training and fine-tuning, and its small parts: resume, a
``Clock`` (step time only: compilation, setup, evaluation and checkpoints apart), a
``DeviceFeed`` that puts batches on the device ahead of use, periodic actions (evaluate,
checkpoint, log: metrics file, TensorBoard, progress with ETA), a NaN stop that keeps the last
good checkpoint, preemption (SIGTERM: checkpoint, then stop), and the convergence rule.

The loop never waits on the device for bookkeeping: step k+1 is dispatched before step k's
loss is read, so logging and the convergence rule run while the device computes. The rule
therefore decides one step late (a stage may run one step past ``rule_met_at``). Only steps
that evaluate or checkpoint, which need the state of that very step, wait for it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import queue
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
from tqdm import tqdm

from jaxseg.distributed import Preempted, StopRequest, is_primary
from jaxseg.errors import UserError
from jaxseg.io import atomic_write_text, disk_fault
from jaxseg.train.checkpoint import Checkpointer
from jaxseg.train.tensorboard import Board


class NonFiniteLossError(FloatingPointError):
    pass


class Clock:
    """Training time the careful way: the sum of step intervals (from one step's result to the
    next one's), with the first step's compilation apart and the time spent evaluating or
    checkpointing left out; earlier (killed) runs' training time carried over. A run that
    trains no step adds nothing."""

    def __init__(self, prior_train_s: float = 0.0):
        self.prior = prior_train_s
        self.start = self.mark = time.perf_counter()
        self.first_step_s: float | None = None
        self.step_times: list[float] = []
        self.data_waits: list[float] = []

    def restart(self) -> None:
        """Time from now on counts (after setup, evaluation or a checkpoint)."""
        self.mark = time.perf_counter()

    def step_done(self, data_wait: float) -> float:
        """A step's result is on the host: its interval since the last mark."""
        now = time.perf_counter()
        interval, self.mark = now - self.mark, now
        if self.first_step_s is None:
            self.first_step_s = interval
        else:
            self.step_times.append(interval)
            self.data_waits.append(data_wait)
        return interval

    @property
    def compile_s(self) -> float:  # the first step's time less a typical step
        if self.first_step_s is None:
            return 0.0
        return max(self.first_step_s - statistics.median(self.step_times), 0.0) if self.step_times else self.first_step_s

    def train_s(self) -> float:
        return self.prior + (self.first_step_s or 0.0) + sum(self.step_times) - self.compile_s

    def summary(self, crops_per_step: int) -> dict:
        med = statistics.median(self.step_times) if self.step_times else None
        return {"compile_s": self.compile_s, "wall_s": time.perf_counter() - self.start, "train_s": self.train_s(),
                "median_step_s": med,
                "median_data_wait_s": statistics.median(self.data_waits) if self.data_waits else None,
                "crops_per_s": crops_per_step / med if med else None}


class DeviceFeed:
    """Batches moved to the device (``put``) ``ahead`` steps before they are used. Its iterator
    state (what checkpoints save, through grain's handler) is the host iterator's state right
    after the last batch handed out, so a resumed run starts at the first batch not trained on,
    whatever sits in the queue."""

    def __init__(self, host_iter: Any, put: Callable[[dict], Any], ahead: int = 2):
        self.it, self.put, self.ahead = host_iter, put, ahead
        self.queue: collections.deque = collections.deque()
        self.state = host_iter.get_state()

    def __iter__(self):
        return self

    def __next__(self):
        if not self.queue:
            self.top_up()
        self.state, batch = self.queue.popleft()
        return batch

    def top_up(self) -> None:
        """Fill the queue (call after dispatching a step, so the transfer overlaps it)."""
        while len(self.queue) < self.ahead:
            host = next(self.it)
            self.queue.append((self.it.get_state(), self.put(host)))

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.queue.clear()
        self.state = json.loads(state)
        self.it.set_state(self.state)

    def start_prefetch(self) -> None:  # grain's checkpoint handler calls this after a restore
        if hasattr(self.it, "start_prefetch"):
            self.it.start_prefetch()


class MetricsWriter:
    """``metrics.jsonl`` and TensorBoard written by a background thread: the loop hands a row
    over and goes on. ``flush`` waits until every row handed over is written (before a
    checkpoint, so that a resumed run has every row up to its step)."""

    def __init__(self, path: Path, board: Board, learning_rate: float | None):
        self.board, self.lr = board, learning_rate
        self.file = open(path if is_primary() else os.devnull, "a")
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="jaxseg-metrics", daemon=True)
        self.thread.start()

    def row(self, rec: dict) -> None:
        self.queue.put(("row", rec))

    def image(self, tag: str, step: int, rgb) -> None:
        self.queue.put(("image", (tag, step, rgb)))

    def flush(self) -> None:
        self.queue.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.file.close()
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
                                                       **({"learning_rate": self.lr} if self.lr is not None else {})})
            except BaseException as e:  # noqa: BLE001 - raised in the loop's thread at the next flush
                self.error = self.error or e
            finally:
                self.queue.task_done()
        self.queue.task_done()


def due(step: int, every: int, last: int) -> bool:
    """A periodic action runs every ``every`` steps and at the last step (``every`` 0: never)."""
    return bool(every) and (step % every == 0 or step == last)


def run_loop(*, name: str, workdir: Path, state: Any, step_fn: Callable, data_iter: Any, num_steps: int,
             prepare_batch: Callable[[dict], dict], crops_per_step: int, ckpt_every: int = 100,
             should_stop: Callable[[list[float]], bool] | None = None, min_steps: int = 0,
             evaluate: Callable[[Any, int], dict] | None = None, eval_every: int = 0,
             progress: bool = True, learning_rate: float | None = None, prefetch: int = 2) -> tuple[Any, dict]:
    """Run ``step_fn(state, batch) -> (state, metrics with 'loss')`` up to ``num_steps`` total
    steps, resuming from ``workdir/checkpoints`` if present; ``prepare_batch`` moves a host batch
    to the device, ``prefetch`` batches ahead. Periodic actions: ``evaluate`` every
    ``eval_every`` steps (it may return ``images``: tag -> RGB array, for TensorBoard only), a
    checkpoint every ``ckpt_every`` steps, a log row (``metrics.jsonl``, TensorBoard in
    ``workdir/tensorboard``, the progress bar) every step. ``should_stop(losses)`` ends the run
    once it holds at or after step ``min_steps`` (a warm-up), one step later than it held (the
    loop does not wait for a loss before dispatching the next step); the first step where it held
    is kept either way (``rule_met_at``). SIGTERM checkpoints the step in hand and raises
    ``Preempted``. Returns (state, summary); ``train_s`` counts step time across resumed runs,
    without compilation (``compile_s``), setup, evaluation or checkpointing."""
    workdir = Path(workdir)
    with contextlib.ExitStack() as stack:  # writers, checkpoints and the bar closed however the run ends
        board = Board(workdir / "tensorboard")  # before the clock: creating it is not training
        stack.callback(board.close)
        ckpt = Checkpointer(workdir / "checkpoints")
        stack.callback(ckpt.close)
        feed = DeviceFeed(data_iter, prepare_batch, prefetch)
        restored = ckpt.restore(state, feed)
        state, extra = restored if restored is not None else (state, {})
        history: list[float] = list(extra.get("history", []))
        converged_at, rule_met_at = extra.get("converged_at"), extra.get("rule_met_at")
        start = step = int(jax.device_get(state.step))
        metrics_path = workdir / "metrics.jsonl"
        if is_primary():
            _truncate_metrics(metrics_path, start)  # a killed run may have logged steps past its checkpoint
        bar = tqdm(total=num_steps, initial=start, desc=name, unit="step", disable=not progress, dynamic_ncols=True)
        stack.callback(bar.close)
        clock = Clock(float(extra.get("train_s", 0.0)))
        done = converged_at is not None or step >= num_steps

        def finish(k: int, metrics: dict, data_wait: float, last: bool) -> None:
            """Step ``k``'s bookkeeping, from values brought to the host once; ``last``: no step
            after it was dispatched, so ``state`` is this step's and it may evaluate / checkpoint."""
            nonlocal converged_at, rule_met_at
            host = jax.device_get(metrics)  # waits for step k only: step k+1 may be running already
            interval = clock.step_done(data_wait)
            loss = float(host["loss"])
            if not math.isfinite(loss):
                _stop_non_finite(name, loss, k, ckpt)
            history.append(loss)
            rec = {"step": k, "loss": loss, "step_time_s": interval, "data_wait_s": data_wait,
                   "crops_per_s": crops_per_step / max(interval, 1e-9),
                   **{m: float(v) for m, v in host.items() if m != "loss" and getattr(v, "ndim", 0) == 0}}
            if should_stop is not None and should_stop(history):
                rule_met_at = k if rule_met_at is None else rule_met_at
                if k >= min_steps and converged_at is None:
                    converged_at, rec["converged"] = k, True
            if last:
                trained = clock.train_s()  # up to this step, before its evaluation
                if evaluate is not None and due(k, eval_every, num_steps):
                    rec.update(_evaluate(evaluate, state, k, writer))
            writer.row(rec)
            bar.set_postfix(loss=f"{loss:.4f}", crops_s=f"{rec['crops_per_s']:.1f}", wait=f"{data_wait * 1e3:.0f}ms",
                            refresh=False)
            bar.update(1)
            if last:
                if due(k, ckpt_every, num_steps) or converged_at is not None or stop.requested:
                    writer.flush()  # every row up to the checkpoint's step is on disk
                    ckpt.save(k, state, feed, {"history": history, "converged_at": converged_at,
                                               "rule_met_at": rule_met_at, "train_s": trained})
                clock.restart()  # evaluation and checkpoint time is not training

        pending = None  # (step, metrics still on the device, data wait)
        writer = MetricsWriter(metrics_path, board, learning_rate)
        with _disk_faults_named(workdir, ckpt), StopRequest() as stop, contextlib.closing(writer):
            clock.restart()
            while not done:
                t0 = time.perf_counter()
                batch = next(feed)
                t1 = time.perf_counter()
                state, metrics = step_fn(state, batch)  # dispatched; runs while step - 1 is logged
                step += 1
                t2 = time.perf_counter()
                feed.top_up()
                wait = (t1 - t0) + (time.perf_counter() - t2)  # host time spent waiting for input
                if pending is not None:
                    finish(*pending, last=False)
                pending = (step, metrics, wait)
                preempt = stop.at_step()  # every process, every step: the sync point needs it
                stop.requested = stop.requested or preempt
                done = step >= num_steps or converged_at is not None or stop.requested
                first = step == start + 1  # waited for, so that its time is compilation + one step, no more
                if done or first or due(step, ckpt_every, num_steps) or (evaluate is not None and due(step, eval_every,
                                                                                                     num_steps)):
                    finish(*pending, last=True)
                    pending = None
                    done = done or converged_at is not None
    if stop.requested and converged_at is None and step < num_steps:
        raise Preempted(name, step, ckpt.directory)
    summary = {"name": name, "start_step": start, "end_step": step, "converged_at": converged_at,
               "rule_met_at": rule_met_at, "min_steps": min_steps, "loss_trend": loss_trend(history),
               **clock.summary(crops_per_step), "final_loss": history[-1] if history else None,
               "final_mean_loss": sum(history[-10:]) / len(history[-10:]) if history else None}
    if is_primary():
        atomic_write_text(workdir / f"{name}_summary.json", json.dumps(summary, indent=1))
    return state, summary


@contextlib.contextmanager
def _disk_faults_named(workdir: Path, ckpt: Checkpointer):
    """A full, read-only or vanished work dir ends the run with one line naming it and the last
    good checkpoint, instead of a traceback from whichever write hit it first."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        fault = disk_fault(e, workdir)
        if fault is None:  # not the work dir's disk (a bug, or a cache file elsewhere): not ours to name
            raise
        last = ckpt.latest_step()
        raise UserError(f"{workdir}: {fault} ({type(e).__name__}); the last good checkpoint is "
                        f"{'step ' + str(last) if last is not None else 'none'}. Fix that and rerun the same "
                        f"command to resume") from None


def _stop_non_finite(name: str, loss: float, step: int, ckpt: Checkpointer):
    last = ckpt.latest_step()
    ckpt.close()
    raise NonFiniteLossError(
        f"{name}: non-finite loss ({loss}) at step {step}; stopped. The last good checkpoint "
        f"({'step ' + str(last) if last is not None else 'none'}) in {ckpt.directory} is intact.")


def _evaluate(evaluate, state, step: int, writer: MetricsWriter) -> dict:
    ev = dict(evaluate(state, step))
    for tag, rgb in ev.pop("images", {}).items():
        writer.image(tag, step, rgb)
    return ev


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
