"""The training loop shared by pre-training and fine-tuning: a small core that dispatches one
step ahead and hands every finished step to its hooks (``jaxseg.train.hooks``: convergence,
evaluation, best model and early stopping, the metrics log, checkpoints), plus resume, a
``Clock`` (step time only: compilation, setup, evaluation and checkpoints apart), a
``DeviceFeed`` that puts batches on the device ahead of use, a NaN stop that keeps the last
good checkpoint, preemption (SIGTERM: checkpoint, then stop), and disk faults in one line.

The loop never waits on the device for bookkeeping: step k+1 is dispatched before step k's
loss is read, so logging and the convergence rule run while the device computes. A stop asked
for by a hook at step k therefore ends the run at k+1. Only steps whose train state a hook wants
(evaluation, checkpoints; and the first, so that its time is compilation plus one step) wait.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from jaxseg.distributed import Preempted, StopRequest, barrier, is_primary, multi_process
from jaxseg.errors import UserError
from jaxseg.io import atomic_write_text, disk_fault
from jaxseg.train.checkpoint import Checkpointer
from jaxseg.train.hooks import Checkpoints, Control, Hook, MetricsLog, Profile, Step, final_losses


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass(frozen=True)
class Run:
    """A training run: its name (``metrics`` rows, summary file), folder, length and bookkeeping."""

    name: str
    workdir: Path
    num_steps: int
    ckpt_every: int = 100
    crops_per_step: int = 1  # for crops/s
    progress: bool = True
    learning_rate: float | None = None  # logged beside the metrics (TensorBoard)
    profile_steps: tuple[int, int] | None = None  # (first, last) step of a jax.profiler trace under workdir/profile


class Clock:
    """Training time the careful way: the sum of step intervals (from one step's result to the
    next one's), with the first step's compilation apart and the time spent evaluating or
    checkpointing left out; earlier (killed) runs' training time carried over. A run that
    trains no step adds nothing."""

    def __init__(self, prior_train_s: float = 0.0):
        self.prior = prior_train_s
        self.ahead_s = 0.0  # compiled before the first step (multi-process)
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
    def compile_s(self) -> float:  # compiled ahead, and the first step's time less a typical step
        if self.first_step_s is None:
            return self.ahead_s
        first = max(self.first_step_s - statistics.median(self.step_times), 0.0) if self.step_times else self.first_step_s
        return self.ahead_s + first

    def train_s(self) -> float:
        return self.prior + (self.first_step_s or 0.0) + sum(self.step_times) - (self.compile_s - self.ahead_s)

    def summary(self, crops_per_step: int) -> dict:
        med = statistics.median(self.step_times) if self.step_times else None
        return {"compile_s": self.compile_s, "wall_s": time.perf_counter() - self.start, "train_s": self.train_s(),
                "median_step_s": med,
                "median_data_wait_s": statistics.median(self.data_waits) if self.data_waits else None,
                "crops_per_s": crops_per_step / med if med else None}


class DeviceFeed:
    """Batches moved to the device (``put``) ``ahead`` steps before they are used. Its
    ``position`` (what checkpoints keep) is the host iterator's state right after the last
    batch handed out, so a resumed run starts at the first batch not trained on, whatever sits in
    the queue."""

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

    def peek(self) -> Any:
        """The next batch, on the device, without handing it out."""
        self.top_up()
        return self.queue[0][1]

    def position(self) -> dict:
        """Where the input stands (grain's ``{'next_index': k}``: a function of the step alone)."""
        return dict(self.state)

    def seek(self, position: dict) -> None:
        self.queue.clear()
        self.state = dict(position)
        self.it.set_state(self.state)


def run_loop(run: Run, state: Any, step_fn: Callable, feed: "DeviceFeed",
             hooks: Sequence[Hook] = ()) -> tuple[Any, dict]:
    """Run ``step_fn(state, batch) -> (state, metrics with 'loss')`` on ``feed``'s batches up to
    ``run.num_steps`` total steps, resuming from ``run.workdir/checkpoints`` if present. After
    each step ``hooks`` run in order, then the metrics log and the checkpoints; a hook may stop
    the run (``Control.stop``). SIGTERM checkpoints the step in hand and raises ``Preempted``.
    Returns (state, summary); the summary (also ``NAME_summary.json``) has the step range, the
    clock's times (``train_s`` across resumed runs, without compilation, setup, evaluation or
    checkpoints), the final losses, why the run stopped early if it did, and each hook's part."""
    workdir = Path(run.workdir)
    with contextlib.ExitStack() as stack:  # the log, checkpoints and hooks closed however the run ends
        ckpt = Checkpointer(workdir / "checkpoints")
        stack.push(_closer(ckpt))  # waits for the last save; quiet about it when the run is already failing
        restored = ckpt.restore(state, feed)
        state, extra = restored if restored is not None else (state, {})
        history: list[float] = list(extra.get("history", []))
        start = step = int(jax.device_get(state.step))
        log = MetricsLog(workdir, run.name, start, run.num_steps, run.progress,
                         {"learning_rate": run.learning_rate} if run.learning_rate is not None else None)
        control = Control()

        def extras(info: Step, control: Control) -> dict:
            stopped = None if control.reason == "preempted" else control.reason
            return {"history": history, "train_s": info.train_s, "stopped": stopped,
                    **{k: v for h in hooks for k, v in h.extra().items()}}

        hooks = [*hooks, log, Checkpoints(ckpt, feed, run.ckpt_every, run.num_steps, log, extras)]
        if run.profile_steps is not None:
            hooks.append(Profile(workdir / "profile" / _process_folder(), *run.profile_steps, run.num_steps))
        for h in hooks:
            stack.push(_closer(h))
            h.restore(extra)
        clock = Clock(float(extra.get("train_s", 0.0)))
        # a run that stopped early (converged, early-stopped) is done; older checkpoints kept converged_at
        done = step >= run.num_steps or bool(extra.get("stopped") or extra.get("converged_at") is not None)
        if multi_process() and not done:
            step_fn = compiled_together(step_fn, state, feed.peek(), run.name, clock)

        def finish(k: int, metrics: dict, data_wait: float, synced: Any | None) -> None:
            """Step ``k``'s bookkeeping from values brought to the host once; ``synced``: its train
            state, where the loop waited for it (no later step was dispatched)."""
            host = jax.device_get(metrics)  # waits for step k only: step k+1 may be running already
            interval = clock.step_done(data_wait)
            loss = float(host["loss"])
            if not math.isfinite(loss):
                _stop_non_finite(run.name, loss, k, ckpt)
            history.append(loss)
            rec = {"step": k, "loss": loss, "step_time_s": interval, "data_wait_s": data_wait,
                   "crops_per_s": run.crops_per_step / max(interval, 1e-9),
                   **{m: float(v) for m, v in host.items() if m != "loss" and getattr(v, "ndim", 0) == 0}}
            info = Step(k, loss, history, rec, synced, clock.train_s())
            for h in hooks:
                h.after_step(info, control)
            if synced is not None:
                clock.restart()  # evaluation and checkpoint time is not training

        pending = None  # (step, metrics still on the device, data wait)
        with _disk_faults_named(workdir, ckpt), StopRequest() as preemption:
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
                    finish(*pending, synced=None)
                pending = (step, metrics, wait)
                if preemption.at_step():  # every process, every step: the sync point needs it
                    control.stop("preempted")
                done = step >= run.num_steps or control.stopping
                if done or step == start + 1 or any(h.wants_state(step) for h in hooks):
                    finish(*pending, synced=state)
                    pending = None
                    done = done or control.stopping
            ckpt.wait()  # the last save on disk while SIGTERM is still the loop's, a fault still named here
    if control.reason == "preempted" and step < run.num_steps:
        raise Preempted(run.name, step, ckpt.directory)
    summary = {"name": run.name, "start_step": start, "end_step": step, "stopped": control.reason,
               **clock.summary(run.crops_per_step), **final_losses(history),
               **{k: v for h in hooks for k, v in h.summary().items()}}
    if is_primary():
        atomic_write_text(workdir / f"{run.name}_summary.json", json.dumps(summary, indent=1))
    return state, summary


def _process_folder() -> str:
    """Each process's own folder for files every process writes (its trace)."""
    return f"process_{jax.process_index()}" if multi_process() else ""


def compiled_together(step_fn: Callable, state: Any, batch: Any, name: str, clock: "Clock") -> Callable:
    """``step_fn`` compiled ahead of time on every process, which then wait for each other: a
    process that loads the program from the compilation cache must not start the first step's
    collectives while another still compiles (CPU collectives give up on a peer after 30 s). The
    compile time counts as ``compile_s``."""
    t0 = time.perf_counter()
    if hasattr(step_fn, "compiled"):  # a pre-training step: its update, compiled once for the three axes
        step_fn, _ = step_fn.compiled(state, batch)
    else:
        step_fn = step_fn.lower(state, batch).compile()
    clock.ahead_s += time.perf_counter() - t0
    barrier(f"compiled {name}")
    return step_fn


def _closer(hook: Hook):
    """An exit callback that closes ``hook``, and keeps quiet about a failure to close while the
    run is already failing (a full disk must not hide the one line that names it)."""
    def close(exc_type, exc, tb) -> bool:
        try:
            hook.close()
        except Exception:  # noqa: BLE001
            if exc_type is None:
                raise
        return False

    return close


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
