"""Cold compile time of each training step: fine-tuning, pre-training stage 1 and stage 2.

    python -m benchmarks.compile_time --config=small --crop_size=64 --json_out=benchmarks/results_compile_cpu.json

Each step is lowered and compiled ahead of time with the persistent compilation cache off, so
the times are what a first run pays. Stage 1/2 use the paper's axis mode (three updates per
step, one per axis) with comparative loss.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.timing import Results
from jaxseg.config import PRESETS, get_config
from jaxseg.models import STAGES, init_params, unetr_from_preset
from jaxseg.train.finetune import make_finetune_step
from jaxseg.train.pretrain import make_pretrain_step, pretrain_state
from jaxseg.train.state import create_state, make_optimizer

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "small", sorted(PRESETS), "config preset (jaxseg.config.PRESETS)")
flags.DEFINE_integer("crop_size", 64, "crop size")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
flags.DEFINE_string("json_out", None, "write results here")


def main(argv):
    del argv
    jax.config.update("jax_enable_compilation_cache", False)
    s = FLAGS.crop_size
    cfg = get_config(FLAGS.config, crop_size=s)
    model = unetr_from_preset(cfg.model.size, in_channels=1, out_channels=2, img_size=s,
                              dtype=jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32)
    params = init_params(model)
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.standard_normal((4, s, s, s, 1)), jnp.float32)
    results = Results(FLAGS.json_out, flags={"config": FLAGS.config, "crop_size": s, "dtype": FLAGS.dtype})

    tx = make_optimizer(cfg.lr, cfg.weight_decay)
    ft = make_finetune_step(model, tx, multilabel=False)
    batch = {"image": image, "label": jnp.asarray(rng.integers(0, 2, (4, s, s, s)), jnp.int32)}
    t0 = time.perf_counter()
    ft.lower(create_state(params, tx), batch).compile()
    rows = {"finetune": time.perf_counter() - t0}
    pbatch = {"image": image, "offset_u": jnp.asarray(rng.uniform(size=(3, 4)), jnp.float32)}
    for stage in STAGES:
        state, tx = pretrain_state(model, params, cfg, stage)
        rows[f"pretrain_{stage}"] = make_pretrain_step(model, tx, cfg.pretrain, stage, False).compiled(state, pbatch)[1]
    for name, sec in rows.items():
        results.add({"step": name, "compile_s": sec, "ratio_to_finetune": sec / rows["finetune"]})
        print(f"{name:16s} compile {sec:6.1f} s ({sec / rows['finetune']:.2f}x the fine-tuning step)", flush=True)


if __name__ == "__main__":
    app.run(main)
