"""Loss + gradient time of each pre-training objective as P (partitions) and N (images) grow.

    python -m benchmarks.loss_scaling --json_out=benchmarks/results_loss_scaling_cpu.json \
        --png=benchmarks/loss_scaling.png

Inputs are slice stacks (N, P, C, F) the size of UNETR's stage-1 features (enc4: C=128 channels,
12x12 slices at 96^3 crops) and stage-2 outputs (C=2 classes, 96x96 slices). Each point is the
median of --steps jitted value_and_grad calls after one compiling call.
"""

from __future__ import annotations

import functools

import jax
from absl import app, flags

from benchmarks.timing import Results, setup, summarize, time_call
from jaxseg import losses as L

FLAGS = flags.FLAGS
flags.DEFINE_list("partitions", ["4", "8", "16", "32", "64", "128"], "P values (at N = --n_fixed)")
flags.DEFINE_list("images", ["2", "4", "8", "16"], "N values (at P = 4)")
flags.DEFINE_integer("n_fixed", 4, "N while P varies (4 crops per step, as the authors)")
flags.DEFINE_integer("k", 64, "triplets per step for comparative_sampled")
flags.DEFINE_integer("steps", 5, "timed calls per point")
flags.DEFINE_list("stages", ["enc4", "decoder"], "input sizes to run")
flags.DEFINE_float("temperature", 0.1, "temperature")
flags.DEFINE_string("json_out", None, "write results here")
flags.DEFINE_string("png", None, "write a plot here")

STAGES = {"enc4": (128, 12 * 12), "decoder": (2, 96 * 96)}


def objectives(n: int, p: int, k: int, t: float):
    fns = {name: functools.partial(fn, temperature=t) for name, fn in L.OBJECTIVES.items()}
    tri = L.sample_triplets(jax.random.key(0), n, p, k)
    fns["comparative_sampled"] = lambda s: L.comparative_sampled(s, tri, t)
    return fns


def time_point(fn, s, steps):
    g = jax.jit(jax.value_and_grad(fn))
    first = time_call(lambda: g(s))
    return {"first_call_s": first, **summarize([time_call(lambda: g(s)) for _ in range(steps)])}


def main(argv):
    del argv
    setup()
    results = Results(FLAGS.json_out, k=FLAGS.k)
    rows = results.payload["rows"]
    for stage in FLAGS.stages:
        c, f = STAGES[stage]
        points = [(FLAGS.n_fixed, int(p), "P") for p in FLAGS.partitions]
        points += [(int(n), 4, "N") for n in FLAGS.images]
        for n, p, sweep in points:
            s = jax.random.normal(jax.random.key(1), (n, p, c, f))
            for name, fn in objectives(n, p, FLAGS.k, FLAGS.temperature).items():
                r = time_point(fn, s, FLAGS.steps)
                results.add({"stage": stage, "sweep": sweep, "N": n, "P": p, "objective": name, **r})
                print(f"{stage:8s} N={n:3d} P={p:4d} {name:20s} {r['median_s'] * 1e3:9.2f} ms "
                      f"(first call {r['first_call_s']:.2f} s)", flush=True)
    if FLAGS.png:
        plot(rows, FLAGS.png)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({r["stage"] for r in rows})
    fig, axes = plt.subplots(2, len(stages), figsize=(6 * len(stages), 8), squeeze=False)
    for col, stage in enumerate(stages):
        for row, sweep in enumerate(("P", "N")):
            ax = axes[row, col]
            for name in sorted({r["objective"] for r in rows}):
                pts = [(r[sweep], r["median_s"] * 1e3) for r in rows
                       if r["stage"] == stage and r["sweep"] == sweep and r["objective"] == name]
                if pts:
                    xs, ys = zip(*sorted(pts))
                    ax.plot(xs, ys, marker="o", label=name)
            ax.set(xscale="log", yscale="log", xlabel=sweep, ylabel="loss+grad median (ms)",
                   title=f"{stage}: varying {sweep}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    app.run(main)
