"""The training loop shared by pre-training and fine-tuning: resume, progress with ETA, metrics
file, careful timing (compile step apart, data wait measured, paused during eval/checkpoint),
NaN stop that keeps the last good checkpoint, periodic checkpoints."""

from __future__ import annotations

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


def run_loop(*, name: str, workdir: Path, state: Any, step_fn: Callable, data_iter: Any, num_steps: int,
             prepare_batch: Callable[[dict], dict], crops_per_step: int, ckpt_every: int = 100,
             should_stop: Callable[[list[float]], bool] | None = None,
             evaluate: Callable[[Any, int], dict] | None = None, eval_every: int = 0,
             progress: bool = True, learning_rate: float | None = None) -> tuple[Any, dict]:
    """Run ``step_fn(state, batch) -> (state, metrics with 'loss')`` up to ``num_steps`` total
    steps, resuming from ``workdir/checkpoints`` if present. Metrics go to ``metrics.jsonl`` and
    TensorBoard (``workdir/tensorboard``; ``evaluate`` may return ``images``: tag -> RGB array,
    logged there only). Returns (state, summary);
    ``train_s`` counts training time across resumed runs, without compilation (``compile_s``,
    the first step's time less a median step), evaluation or checkpointing."""
    workdir = Path(workdir)
    ckpt = Checkpointer(workdir / "checkpoints")
    history: list[float] = []
    extra: dict = {}
    restored = ckpt.restore(state, data_iter)
    if restored is not None:
        state, extra = restored
        history = list(extra.get("history", []))
    prior_train_s = float(extra.get("train_s", 0.0))  # training time of earlier (killed) runs
    start = int(jax.device_get(state.step))
    metrics_path = workdir / "metrics.jsonl"
    if is_primary():
        _truncate_metrics(metrics_path, start)  # a killed run may have logged steps past its checkpoint
    step_times, data_waits, compile_s = [], [], None
    wall_start = time.perf_counter()
    excluded = 0.0  # eval + checkpoint time, not counted as training time
    converged_at = extra.get("converged_at")

    def compile_only() -> float:  # the first step's time less a typical step
        if compile_s is None:
            return 0.0
        return max(compile_s - statistics.median(step_times), 0.0) if step_times else compile_s

    board = Board(workdir / "tensorboard")
    bar = tqdm(total=num_steps, initial=start, desc=name, unit="step", disable=not progress, dynamic_ncols=True)
    step = start
    with open(metrics_path if is_primary() else os.devnull, "a") as log:
        while step < num_steps and converged_at is None:
            t0 = time.perf_counter()
            batch = prepare_batch(next(data_iter))
            t1 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            loss = float(metrics["loss"])  # syncs the device
            t2 = time.perf_counter()
            if not math.isfinite(loss):
                last = ckpt.latest_step()
                ckpt.close()
                raise NonFiniteLossError(
                    f"{name}: non-finite loss ({loss}) at step {step}; stopped. The last good checkpoint "
                    f"({'step ' + str(last) if last is not None else 'none'}) in {ckpt.directory} is intact.")
            if compile_s is None:
                compile_s = t2 - t1
            else:
                step_times.append(t2 - t1)
                data_waits.append(t1 - t0)
            history.append(loss)
            step += 1
            rec = {"step": step, "loss": loss, "step_time_s": t2 - t1, "data_wait_s": t1 - t0,
                   "crops_per_s": crops_per_step / max(t2 - t1, 1e-9)}
            rec.update({k: float(v) for k, v in metrics.items() if k != "loss" and jax.numpy.ndim(v) == 0})
            if should_stop is not None and should_stop(history):
                converged_at = step
                rec["converged"] = True
            te = time.perf_counter()
            if evaluate is not None and eval_every and (step % eval_every == 0 or step == num_steps):
                ev = dict(evaluate(state, step))
                for tag, rgb in ev.pop("images", {}).items():
                    board.image(tag, step, rgb)
                rec.update(ev)
            if step % ckpt_every == 0 or step == num_steps or converged_at is not None:
                trained = prior_train_s + (te - wall_start) - excluded - compile_only()
                ckpt.save(step, state, data_iter, {"history": history, "converged_at": converged_at,
                                                   "train_s": trained})
            excluded += time.perf_counter() - te
            log.write(json.dumps(rec) + "\n")
            log.flush()
            board.scalars(step, {**{k: v for k, v in rec.items() if k != "step"},
                                 **({"learning_rate": learning_rate} if learning_rate is not None else {})})
            bar.set_postfix(loss=f"{loss:.4f}", crops_s=f"{rec['crops_per_s']:.1f}",
                            wait=f"{rec['data_wait_s'] * 1e3:.0f}ms")
            bar.update(1)
    bar.close()
    board.close()
    ckpt.close()
    total = time.perf_counter() - wall_start
    summary = {
        "name": name, "start_step": start, "end_step": step, "converged_at": converged_at,
        "compile_s": compile_only(), "wall_s": total, "train_s": prior_train_s + total - excluded - compile_only(),
        "median_step_s": statistics.median(step_times) if step_times else None,
        "median_data_wait_s": statistics.median(data_waits) if data_waits else None,
        "crops_per_s": crops_per_step / statistics.median(step_times) if step_times else None,
        "final_loss": history[-1] if history else None,
    }
    if is_primary():
        atomic_write_text(workdir / f"{name}_summary.json", json.dumps(summary, indent=1))
    return state, summary


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


def converged(history: list[float], window: int = 10, rtol: float = 0.01) -> bool:
    """The paper's rule: the current loss lies within ``rtol`` x |mean| of the running mean of
    the ``window`` losses before it."""
    if len(history) <= window:
        return False
    mean = sum(history[-window - 1:-1]) / window
    return abs(history[-1] - mean) < rtol * abs(mean)
