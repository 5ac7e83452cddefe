"""What a checkpoint save costs the training loop: the paper's UNETR train state (params and
AdamW moments, ~1.1 GB in float32) saved by ``jaxseg.train.checkpoint.Checkpointer``.

    python -m benchmarks.checkpoint --json_out=benchmarks/results_checkpoint_cpu.json

Three ways, each into a fresh folder (orbax keeps 2), ``--saves`` saves each, the first apart
(orbax's first save sets things up; ``device`` compiles there):

- ``device``: orbax handed the jax arrays as they are, waiting for the write (jaxseg before
  2026-12-03), which makes orbax compile a slicing program per array shape on the first save;
- ``host``: the replicated state fetched to NumPy, then written by orbax, waiting for it;
- ``background`` (jaxseg's now): fetched to NumPy in the loop, written by the Checkpointer's
  writer thread while the loop goes on.

``save_s`` is how long ``save`` holds the loop (for ``background``, with the previous write
finished, as when saves are further apart than a write takes); ``written_s`` is until the step
is on disk.
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
flags.DEFINE_list("handoffs", ["device", "host", "background"],
                  "device: jax arrays to orbax; host: NumPy, waited for; background: NumPy, written by a thread")
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


def time_saves(state, folder: Path, handoff: str) -> tuple[list[float], list[float]]:
    """(save_s, written_s) of each save."""
    import jaxseg.train.checkpoint as ck

    keep = ck._replicated_to_host
    if handoff == "device":
        ck._replicated_to_host = lambda tree, own_copy=False: tree
    try:
        ckpt, held, written = ck.Checkpointer(folder, background=handoff == "background"), [], []
        for i in range(FLAGS.saves):
            t0 = time.perf_counter()
            ckpt.save(i + 1, state, None, {"history": []})
            held.append(time.perf_counter() - t0)
            ckpt.wait()
            written.append(time.perf_counter() - t0)
        ckpt.close()
    finally:
        ck._replicated_to_host = keep
    return held, written


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
            held, written = time_saves(state, work / handoff, handoff)
            rows.append({"handoff": handoff, "state_gb": gb, "first_s": held[0],
                         "median_later_s": statistics.median(held[1:]), "all_s": held,
                         "first_written_s": written[0], "median_later_written_s": statistics.median(written[1:])})
            print(f"{handoff:10s} {gb:.2f} GB: the loop held {held[0]:.2f} s by the first save, "
                  f"{statistics.median(held[1:]):.2f} s by later ones (median; {', '.join(f'{t:.2f}' for t in held[1:])}); "
                  f"on disk after {written[0]:.2f} / {statistics.median(written[1:]):.2f} s", flush=True)
            write_json(FLAGS.json_out, {"machine": machine(), "model": FLAGS.model, "devices": len(jax.devices()),
                                        "rows": rows})  # after every row: a part cut short keeps what it measured
            shutil.rmtree(work / handoff, ignore_errors=True)
    finally:  # GBs of checkpoints: never left behind
        for folder in [work / h for h in FLAGS.handoffs] + ([] if FLAGS.workdir else [work]):
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
