"""Host time the training loop exposes per step, with a device-bound step.

    python -m benchmarks.loop_overhead --step_ms=20 --json_out=benchmarks/results_loop_cpu.json

The step is a jitted chain of matmuls sized to take about --step_ms on this device, with a
train-state-like carry and the metrics a pre-training step returns (loss and three per-axis
losses); batches come from a grain pipeline through ``shard_batch``, as in a real run. The
loop (``jaxseg.train.loop.run_loop``: metrics file, TensorBoard, convergence rule, no
checkpoints or evaluation inside the timed steps) runs N1 and N2 steps in fresh work dirs; the
difference of the two wall times over N2 - N1 is the cost of one step in the loop, which cancels
setup. The same steps dispatched back to back and synced once give the device's own step time.
Exposed host time = loop step - device step (median of --repeats).

The "before" row of benchmarks/README.md (the loop before it stopped waiting for each loss) was
measured with this script copied into that older checkout, whose ``run_loop`` took keyword
arguments; today's takes a ``Run``, a ``DeviceFeed`` and hooks.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from benchmarks.timing import machine, setup, write_json
from jaxseg.data import make_iterator
from jaxseg.train.hooks import Convergence, converged
from jaxseg.train.loop import DeviceFeed, Run, run_loop
from jaxseg.train.sharding import data_mesh, replicate, shard_batch
from jaxseg.train.state import TrainState

FLAGS = flags.FLAGS
flags.DEFINE_float("step_ms", 20.0, "target device time of one step (ms)")
flags.DEFINE_integer("short", 20, "N1: steps of the short run")
flags.DEFINE_integer("long", 120, "N2: steps of the long run")
flags.DEFINE_integer("repeats", 3, "repeats (median)")
flags.DEFINE_integer("crop", 32, "batch: 2 crops of crop^3, as the small preset's pre-training")
flags.DEFINE_string("json_out", None, "write results here")


def make_step(size: int, reps: int):
    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, batch):
        w = state.params["w"]
        x = w + jnp.mean(batch["image"]) * 1e-6
        for _ in range(reps):
            x = jnp.tanh(x @ w) * 0.5
        loss = jnp.mean(x)
        return state.replace(step=state.step + 1, params={"w": w + 1e-6 * x}), {
            "loss": loss, **{f"loss_axis{a}": loss + a for a in range(3)}}

    state = TrainState(step=jnp.int32(0), params={"w": jnp.eye(size) * 0.9}, opt_state=())
    return step, state


def device_step_s(step, state, batch, n: int) -> float:
    state, m = step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(n):
        state, m = step(state, batch)
    jax.block_until_ready((state, m))
    return (time.perf_counter() - t0) / n


def calibrate(batch) -> tuple[int, int]:
    """Matrix size and chain length whose step takes about --step_ms."""
    size, reps = 1024, 1
    for _ in range(4):  # a step has a fixed cost beside its matmuls: refine the guess
        step, state = make_step(size, reps)
        per = device_step_s(step, jax.tree_util.tree_map(jnp.array, state), batch, 10)
        reps = max(1, round(reps * FLAGS.step_ms / 1e3 / per))
    return size, reps


def dataset():
    import grain

    shape = (2, FLAGS.crop, FLAGS.crop, FLAGS.crop, 1)
    return grain.MapDataset.range(2**30).map(
        lambda k: {"image": np.full(shape, k % 7, np.float32), "offset_u": np.full((3, 4), 0.5, np.float32),
                   "seed": np.int32(k)})


def loop_wall_s(step, state, mesh, n: int, workdir: Path) -> float:
    t0 = time.perf_counter()
    run_loop(Run("bench", workdir, n, ckpt_every=10**9, crops_per_step=2, progress=False), replicate(state, mesh),
             step, DeviceFeed(make_iterator(dataset(), 2), functools.partial(shard_batch, mesh=mesh)),
             [Convergence(lambda h: converged(h, rtol=0.0))])
    return time.perf_counter() - t0


def main(argv):
    del argv
    setup()
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    mesh = data_mesh()
    batch = shard_batch(dataset()[0], mesh)
    size, reps = calibrate(batch)
    step, state0 = make_step(size, reps)
    fresh = lambda: jax.tree_util.tree_map(jnp.array, state0)
    rows = []
    root = Path(tempfile.mkdtemp(prefix="jaxseg-loop-"))
    loop_wall_s(step, fresh(), mesh, 3, root / "warm")  # compile once
    for r in range(FLAGS.repeats):
        dev = device_step_s(step, replicate(fresh(), mesh), batch, FLAGS.long - FLAGS.short)
        t_short = loop_wall_s(step, fresh(), mesh, FLAGS.short, root / f"s{r}")
        t_long = loop_wall_s(step, fresh(), mesh, FLAGS.long, root / f"l{r}")
        per = (t_long - t_short) / (FLAGS.long - FLAGS.short)
        rows.append({"device_step_ms": dev * 1e3, "loop_step_ms": per * 1e3, "exposed_ms": (per - dev) * 1e3})
        print(f"repeat {r}: device step {dev * 1e3:.2f} ms, loop step {per * 1e3:.2f} ms, "
              f"exposed {(per - dev) * 1e3:+.2f} ms", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"median: device {med['device_step_ms']:.2f} ms, loop {med['loop_step_ms']:.2f} ms, "
          f"exposed host time {med['exposed_ms']:+.2f} ms per step")
    write_json(FLAGS.json_out, {"machine": machine(), "matrix": size, "chain": reps, "rows": rows, "median": med})


if __name__ == "__main__":
    app.run(main)
