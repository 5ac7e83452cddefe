"""Run a list of jobs in this process while they are quick, in worker processes once that pays."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import time
from typing import Callable, Sequence

# A spawned worker takes 2-3 s to start (it imports the job's main module, JAX with it).
POOL_START_S = 3.0


def pays_to_pool(seconds_left_here: float, workers: int) -> bool:
    """Whether ``workers`` processes, started now, finish the rest sooner than this one would."""
    return workers > 1 and seconds_left_here * (1 - 1 / workers) > POOL_START_S


def run_here_then_pool(fn: Callable, jobs: Sequence, workers: int, on_result: Callable = lambda r: None) -> None:
    """Call ``fn(job)`` for each job: here, in order, until the rest (projected from the mean
    time of those done) would finish sooner in ``workers`` processes, then there. ``on_result``
    gets each result as it comes. Spawn, not fork: forking a process that runs JAX threads can
    deadlock."""
    jobs, t0 = list(jobs), time.perf_counter()
    for done in range(1, len(jobs) + 1):
        on_result(fn(jobs[done - 1]))
        rest = len(jobs) - done
        if rest and pays_to_pool((time.perf_counter() - t0) / done * rest, min(workers, rest)):
            break
    else:
        return
    with cf.ProcessPoolExecutor(min(workers, rest), mp_context=mp.get_context("spawn")) as pool:
        try:
            for fut in cf.as_completed([pool.submit(fn, job) for job in jobs[done:]]):
                on_result(fut.result())
        except BaseException:  # a failure or Ctrl-C: drop the jobs not started instead of waiting for them
            pool.shutdown(cancel_futures=True)
            raise
