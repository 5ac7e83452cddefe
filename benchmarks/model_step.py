"""Time UNETR forward and forward+backward+AdamW: jaxseg and (if installed) MONAI, alternately.

    python -m benchmarks.model_step --preset=paper --img_size=96 --batch=1 --steps=5

Compile time is reported apart; step times are medians over --steps after --warmup calls; the
two frameworks run alternately (A B A B ...) in one process so that the ratio is fair.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks.timing import machine, summarize, time_call, write_json
from jaxseg.models import UNETR, count_params, unetr_from_preset

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "paper", "UNETR preset: tiny, small, paper")
flags.DEFINE_integer("img_size", 96, "cubic crop size")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("in_channels", 1, "input channels")
flags.DEFINE_integer("out_channels", 2, "output channels")
flags.DEFINE_integer("steps", 5, "timed steps per framework")
flags.DEFINE_integer("warmup", 1, "untimed steps after compilation")
flags.DEFINE_enum("against", "monai", ["monai", "none"], "reference to time alongside")
flags.DEFINE_string("conv_impl", "auto", "jaxseg 3x3x3 conv algorithm: auto, xla, taps2d")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "jaxseg compute dtype")
flags.DEFINE_string("json_out", None, "write results here")
flags.DEFINE_bool("breakdown", False, "also time each 3x3x3 conv shape of the model, jaxseg vs torch")


def _loss(logits, onehot):
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot))


def jaxseg_fns(model: UNETR, x, y):
    params = model.init(jax.random.key(0), x)
    tx = optax.adamw(1e-4, weight_decay=1e-5)
    opt_state = tx.init(params)

    @jax.jit
    def forward(params, x):
        return model.apply(params, x)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: _loss(model.apply(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = {"params": params, "opt": opt_state}

    def run_forward():
        return forward(state["params"], x)

    onehot = jax.nn.one_hot(y, model.out_channels)

    def run_step():
        state["params"], state["opt"], loss = step(state["params"], state["opt"], x, onehot)
        return loss

    return run_forward, run_step, count_params(params)


def monai_fns(model: UNETR, x, y):
    import torch
    from monai.networks.nets import UNETR as MonaiUNETR

    torch.manual_seed(0)
    net = MonaiUNETR(model.in_channels, model.out_channels, model.img_size, model.feature_size,
                     model.hidden_size, model.mlp_dim, model.num_heads)
    xt = torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())
    yt = torch.from_numpy(np.array(y, dtype=np.int64))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)

    def run_forward():
        with torch.no_grad():
            return net(xt)

    def run_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(xt), yt)
        loss.backward()
        opt.step()
        return loss

    n_used = sum(p.numel() for n, p in net.named_parameters() if "norm_cross_attn" not in n)
    return run_forward, run_step, n_used


def conv_breakdown(model: UNETR, batch: int, steps: int) -> list[dict]:
    """Forward and forward+backward time of each distinct 3x3x3 conv in the model, jaxseg vs torch."""
    import torch

    from jaxseg.models.layers import conv3d

    s, fs = model.feat_size[0] * model.patch_size, model.feature_size
    shapes = [(s, model.in_channels, fs), (s, fs, fs), (s, 2 * fs, fs), (s // 2, 4 * fs, 2 * fs),
              (s // 2, 2 * fs, 2 * fs), (s // 4, 8 * fs, 4 * fs), (s // 4, 4 * fs, 4 * fs),
              (s // 8, 16 * fs, 8 * fs), (s // 8, 8 * fs, 8 * fs)]
    rows = []
    for size, ci, co in shapes:
        x = jax.random.normal(jax.random.key(0), (batch, size, size, size, ci))
        w = jax.random.normal(jax.random.key(1), (3, 3, 3, ci, co)) * 0.1
        fwd = jax.jit(lambda x, w: conv3d(x, w, model.conv_impl))
        bwd = jax.jit(jax.grad(lambda x, w: jnp.sum(conv3d(x, w, model.conv_impl)), argnums=(0, 1)))
        conv = torch.nn.Conv3d(ci, co, 3, padding=1, bias=False)
        xt = torch.randn(batch, ci, size, size, size, requires_grad=True)

        def t_fwd():
            with torch.no_grad():
                return conv(xt)

        def t_bwd():
            conv(xt).sum().backward()

        row = {"size": size, "in": ci, "out": co}
        for name, fn, sync in (("jax_fwd", lambda: fwd(x, w), jax.block_until_ready),
                               ("jax_fwd_bwd", lambda: bwd(x, w), jax.block_until_ready),
                               ("torch_fwd", t_fwd, lambda t: t), ("torch_fwd_bwd", t_bwd, lambda t: t)):
            time_call(fn, sync)
            row[name] = summarize([time_call(fn, sync) for _ in range(steps)])["median_s"]
        rows.append(row)
        print(f"conv {size}^3 {ci:>3}->{co:<3} fwd jax {row['jax_fwd']:.3f}s torch {row['torch_fwd']:.3f}s | "
              f"fwd+bwd jax {row['jax_fwd_bwd']:.3f}s torch {row['torch_fwd_bwd']:.3f}s", flush=True)
    return rows


def main(argv):
    del argv
    dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
    model = unetr_from_preset(FLAGS.preset, in_channels=FLAGS.in_channels, out_channels=FLAGS.out_channels,
                              img_size=FLAGS.img_size, conv_impl=FLAGS.conv_impl, dtype=dtype)
    if FLAGS.against == "monai" and FLAGS.preset != "paper":
        print("note: MONAI fixes 12 layers and patch 16; comparing against --preset=paper only")
        FLAGS.against = "none"
    s = FLAGS.img_size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((FLAGS.batch, s, s, s, FLAGS.in_channels), np.float32))
    y = jnp.asarray(rng.integers(0, FLAGS.out_channels, (FLAGS.batch, s, s, s)), jnp.int32)
    if FLAGS.breakdown and FLAGS.against != "monai":
        raise app.UsageError("--breakdown compares against torch: use it with --against=monai")

    frameworks = {"jaxseg": jaxseg_fns(model, x, y)}
    if FLAGS.against == "monai":
        frameworks["monai"] = monai_fns(model, x, y)
    sync = {"jaxseg": jax.block_until_ready, "monai": lambda t: t}

    results: dict = {"machine": machine(), "config": {k: FLAGS[k].value for k in
                     ("preset", "img_size", "batch", "in_channels", "out_channels", "steps", "warmup", "conv_impl", "dtype")}}
    for kind in ("forward", "train_step"):
        idx = 0 if kind == "forward" else 1
        compile_s = {}
        for name, fns in frameworks.items():  # first call (compilation for jaxseg)
            compile_s[name] = time_call(fns[idx], sync[name])
            for _ in range(FLAGS.warmup):
                time_call(fns[idx], sync[name])
        times = {name: [] for name in frameworks}
        ratios = []
        for _ in range(FLAGS.steps):  # A B A B
            pair = {name: time_call(fns[idx], sync[name]) for name, fns in frameworks.items()}
            for name, t in pair.items():
                times[name].append(t)
            if "monai" in pair:
                ratios.append(pair["jaxseg"] / pair["monai"])
        entry = {name: {"first_call_s": compile_s[name], **summarize(times[name])} for name in frameworks}
        if ratios:
            entry["ratio_jaxseg_over_monai"] = {"median": float(np.median(ratios)), "pairs": ratios}
        results[kind] = entry
        line = ", ".join(f"{n} {entry[n]['median_s']:.3f}s (first call {entry[n]['first_call_s']:.1f}s)" for n in frameworks)
        extra = f", ratio jaxseg/monai {entry['ratio_jaxseg_over_monai']['median']:.2f}" if ratios else ""
        print(f"{kind:>10}: {line}{extra}", flush=True)
    results["params"] = {name: fns[2] for name, fns in frameworks.items()}
    if FLAGS.breakdown:
        results["conv_breakdown"] = conv_breakdown(model, FLAGS.batch, FLAGS.steps)
    print(json.dumps(results["params"]))
    write_json(FLAGS.json_out, results)


if __name__ == "__main__":
    app.run(main)
