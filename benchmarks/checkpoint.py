"""What a checkpoint save costs the training loop: the paper's UNETR train state (params and
AdamW moments, ~1.1 GB in float32) saved by ``jaxseg.train.checkpoint.Checkpointer``.

    python -m benchmarks.checkpoint --json_out=benchmarks/results_checkpoint_cpu.json

Handoff ``host`` is what the Checkpointer does (the replicated state fetched to NumPy, then
written by orbax); ``device`` hands orbax the jax arrays as they are (jaxseg before
2026-12-03), which makes orbax compile a slicing program per array shape on the first save.
Every save waits until the checkpoint is on disk, so its time is what the loop stalls. The
first save (compilation included) and the median of the later ones, ``--saves`` in all, into a
fresh folder per handoff (orbax keeps 2).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from absl import app, flags

from benchmarks.timing import machine, write_json

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "paper", "UNETR size: tiny | small | paper")
flags.DEFINE_integer("img_size", 96, "crop size the model is built for")
flags.DEFINE_list("handoffs", ["device", "host"], "device: jax arrays to orbax; host: NumPy (jaxseg's)")
flags.DEFINE_integer("saves", 4, "saves per handoff (the first apart)", lower_bound=2)
flags.DEFINE_string("workdir", None, "where to write (default: a temp dir, removed after)")
flags.DEFINE_string("json_out", None, "write results here")


def train_state(model_name: str, img_size: int):
    """A train state of the real shapes and dtypes, replicated on the data mesh (no compile)."""
    import jax
    import jax.numpy as jnp

    from jaxseg.models.unetr import param_shapes, unetr_from_preset
    from jaxseg.train.sharding import data_mesh, replicate
    from jaxseg.train.state import create_state, make_optimizer

    model = unetr_from_preset(model_name, in_channels=1, out_channels=2, img_size=img_size)
    params = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01, s.dtype), param_shapes(model))
    return replicate(create_state(params, make_optimizer()), data_mesh())


def time_saves(state, folder: Path, handoff: str) -> list[float]:
    import jaxseg.train.checkpoint as ck

    keep = ck._replicated_to_host
    if handoff == "device":
        ck._replicated_to_host = lambda tree: tree
    try:
        ckpt, times = ck.Checkpointer(folder), []
        for i in range(FLAGS.saves):
            t0 = time.perf_counter()
            ckpt.save(i + 1, state, None, {"history": []})
            times.append(time.perf_counter() - t0)
        ckpt.close()
    finally:
        ck._replicated_to_host = keep
    return times


def main(argv):
    del argv
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO

    work = Path(FLAGS.workdir or tempfile.mkdtemp(prefix="jaxseg-ckpt-"))
    state = train_state(FLAGS.model, FLAGS.img_size)
    gb = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state)) / 1e9
    rows = []
    try:
        for handoff in FLAGS.handoffs:
            times = time_saves(state, work / handoff, handoff)
            rows.append({"handoff": handoff, "state_gb": gb, "first_s": times[0],
                         "median_later_s": statistics.median(times[1:]), "all_s": times})
            print(f"{handoff:6s} {gb:.2f} GB: first save {times[0]:.2f} s, later saves median "
                  f"{statistics.median(times[1:]):.2f} s ({', '.join(f'{t:.2f}' for t in times[1:])})", flush=True)
            write_json(FLAGS.json_out, {"machine": machine(), "model": FLAGS.model, "devices": len(jax.devices()),
                                        "rows": rows})  # after every row: a part cut short keeps what it measured
            shutil.rmtree(work / handoff, ignore_errors=True)
    finally:  # GBs of checkpoints: never left behind
        for folder in [work / h for h in FLAGS.handoffs] + ([] if FLAGS.workdir else [work]):
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
