"""Build a UNETR preset, count its parameters and time one jitted forward pass on a synthetic volume.

    python -m experiments.model_summary --model=small --img_size=64
"""

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxseg.models import count_params, init_params, unetr_from_preset

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "small", ["tiny", "small", "paper"], "UNETR size")
flags.DEFINE_integer("img_size", 64, "cubic input size (a multiple of 16)")
flags.DEFINE_integer("in_channels", 1, "input channels")
flags.DEFINE_integer("out_channels", 2, "output channels")


def main(argv):
    del argv
    model = unetr_from_preset(FLAGS.model, in_channels=FLAGS.in_channels,
                              out_channels=FLAGS.out_channels, img_size=FLAGS.img_size)
    x = jax.random.normal(jax.random.key(0), (1, *(FLAGS.img_size,) * 3, FLAGS.in_channels))
    params = init_params(model, 1)
    apply = jax.jit(model.apply)
    t0 = time.perf_counter()
    logits = jax.block_until_ready(apply(params, x))
    t1 = time.perf_counter()
    jax.block_until_ready(apply(params, x))
    t2 = time.perf_counter()
    print(f"UNETR[{FLAGS.model}] {count_params(params):,} parameters on {jax.default_backend()}")
    print(f"input {tuple(x.shape)} -> logits {tuple(logits.shape)}, finite: {bool(jnp.isfinite(logits).all())}")
    print(f"first call (compile + run) {t1 - t0:.2f}s, second call {t2 - t1:.3f}s")


if __name__ == "__main__":
    app.run(main)
