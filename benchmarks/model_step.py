"""Time UNETR forward and forward+backward+AdamW: jaxseg and MONAI on the same device, alternately.

    python -m benchmarks.model_step --model=paper --img_size=96 --batch=4 --dtypes=bfloat16,float32 \
        --against=monai --torch_dtypes=float32,bfloat16

Compile time is reported apart (first call); step times are medians over --steps after --warmup
calls; every variant (jaxseg per compute dtype, MONAI per dtype and cudnn.benchmark setting,
bf16 under torch.autocast) runs once per round, round after round in one process, so the ratios
(medians of per-round ratios, against MONAI's faster cudnn setting) are fair. TFLOP/s, MFU and
the roofline come from the analytic count in ``jaxseg.models.flops``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks.timing import (Results, efficiency, jax_peak_mib, monai_unetr, paired_ratio, run_variants, setup,
                               summarize, time_call, torch_device, torch_modes, torch_peak_mib, torch_sync)
from jaxseg.models import UNETR, count_params, init_params, unetr_from_preset
from jaxseg.models.flops import unetr_cost

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "paper", "UNETR size: tiny, small, paper (with --against=monai: 12 layers)")
flags.DEFINE_integer("img_size", 96, "cubic crop size")
flags.DEFINE_integer("batch", 4, "batch size")
flags.DEFINE_integer("in_channels", 1, "input channels")
flags.DEFINE_integer("out_channels", 2, "output channels")
flags.DEFINE_integer("steps", 10, "timed rounds")
flags.DEFINE_integer("warmup", 2, "untimed calls after the first (compiling) one")
flags.DEFINE_enum("against", "monai", ["monai", "none"], "reference to time alongside")
flags.DEFINE_list("dtypes", ["float32"], "jaxseg compute dtypes (float32, bfloat16)")
flags.DEFINE_list("torch_dtypes", ["float32", "bfloat16"], "MONAI dtypes (bfloat16: torch.autocast)")
flags.DEFINE_list("kinds", ["forward", "train_step"], "what to time")
flags.DEFINE_string("conv_impl", "auto", "jaxseg 3x3x3 conv algorithm: auto, xla, taps2d")
flags.DEFINE_string("json_out", None, "write results here (rewritten after every row)")
flags.DEFINE_bool("breakdown", False, "also time each 3x3x3 conv shape of the model, jaxseg vs torch (CPU)")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _loss(logits, onehot):
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot))


def jaxseg_fns(model: UNETR, x, y):
    """(forward, train step) closures over jaxseg's jitted functions, and the parameter count."""
    params = init_params(model)
    tx = optax.adamw(1e-4, weight_decay=1e-5)
    state = {"params": params, "opt": tx.init(params)}
    onehot = jax.nn.one_hot(y, model.out_channels)
    forward = jax.jit(model.apply)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: _loss(model.apply(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def run_step():
        state["params"], state["opt"], loss = step(state["params"], state["opt"], x, onehot)
        return loss

    return {"forward": lambda: forward(state["params"], x), "train_step": run_step}, count_params(params)


def monai_fns(model: UNETR, x, y):
    import torch

    dev = torch_device()
    net = monai_unetr(model, dev)
    xt = torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy()).to(dev)
    yt = torch.from_numpy(np.array(y, dtype=np.int64)).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)

    def run_forward():
        with torch.no_grad():
            return net(xt)

    def run_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(xt).float(), yt)
        loss.backward()
        opt.step()
        return loss

    n_used = sum(p.numel() for n, p in net.named_parameters() if "norm_cross_attn" not in n)
    return {"forward": run_forward, "train_step": run_step}, n_used


def _variants(model_for, x, y):
    """name -> (callable per kind, sync, torch mode, dtype, framework, cudnn_benchmark)."""
    out = {}
    for dt in FLAGS.dtypes:
        fns, n = jaxseg_fns(model_for(dt), x, y)
        out[f"jaxseg {dt}"] = dict(fns=fns, sync=jax.block_until_ready, mode=None, dtype=dt,
                                   framework="jaxseg", params=n, mem=jax_peak_mib)
    if FLAGS.against == "monai":
        fns, n = monai_fns(model_for("float32"), x, y)
        for dt, bench in torch_modes(FLAGS.torch_dtypes):
            out[f"monai {dt} cudnn.benchmark={'on' if bench else 'off'}"] = dict(
                fns=fns, sync=torch_sync, mode=(dt, bench), dtype=dt,
                framework="monai", cudnn_benchmark=bench, params=n, mem=torch_peak_mib)
    return out


def time_kind(kind: str, variants: dict, cost, results: Results) -> None:
    run_variants(variants, FLAGS.steps, FLAGS.warmup, call=lambda v: v["fns"][kind])
    for name, v in variants.items():
        med = float(np.median(v["times"]))
        c = cost(v["dtype"])
        row = {"kind": kind, "variant": name, "framework": v["framework"], "dtype": v["dtype"],
               "cudnn_benchmark": v.get("cudnn_benchmark"), "first_call_s": v["first_call_s"],
               **summarize(v["times"]), **efficiency(c.flops, c.bytes, med), "peak_mib": v["mem"]()}
        results.add(row)
        eff = f", {row['tflops_per_s']:.1f} TFLOP/s" + (f", MFU {row['mfu']:.1%}" if "mfu" in row else "")
        print(f"{kind:>10} {name:36s} {med * 1e3:9.2f} ms (first call {v['first_call_s']:.1f} s{eff})", flush=True)
    for dt in FLAGS.dtypes:  # jaxseg over the faster MONAI setting, same dtype, per round
        ours = variants.get(f"jaxseg {dt}")
        refs = [v for v in variants.values() if v["framework"] == "monai" and v["dtype"] == dt]
        if ours and refs:
            ref = min(refs, key=lambda v: np.median(v["times"]))
            ratio = paired_ratio(ours["times"], ref["times"])
            results.add({"kind": kind, "ratio": f"jaxseg {dt} / monai {dt}", "median": ratio,
                         "cudnn_benchmark": ref.get("cudnn_benchmark")})
            print(f"{kind:>10} ratio jaxseg/MONAI ({dt}): {ratio:.3f}", flush=True)


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
    setup()
    overrides = dict(in_channels=FLAGS.in_channels, out_channels=FLAGS.out_channels, img_size=FLAGS.img_size,
                     conv_impl=FLAGS.conv_impl)
    if FLAGS.against == "monai":
        overrides.update(num_layers=12, patch_size=16)  # MONAI's fixed depth and patch

    def model_for(dt):
        return unetr_from_preset(FLAGS.model, dtype=DTYPES[dt], **overrides)

    s = FLAGS.img_size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((FLAGS.batch, s, s, s, FLAGS.in_channels), np.float32))
    y = jnp.asarray(rng.integers(0, FLAGS.out_channels, (FLAGS.batch, s, s, s)), jnp.int32)
    results = Results(FLAGS.json_out, config={k: FLAGS[k].value for k in (
        "model", "img_size", "batch", "in_channels", "out_channels", "steps", "warmup", "conv_impl", "dtypes",
        "torch_dtypes", "against")})
    variants = _variants(model_for, x, y)
    results.payload["params"] = {name: v["params"] for name, v in variants.items()}
    for kind in FLAGS.kinds:
        part_kind = "forward" if kind == "forward" else "train"
        time_kind(kind, variants, lambda dt: unetr_cost(model_for(dt), FLAGS.batch, part_kind), results)
    if FLAGS.breakdown:
        results.payload["conv_breakdown"] = conv_breakdown(model_for("float32"), FLAGS.batch, FLAGS.steps)
        results.write()


if __name__ == "__main__":
    app.run(main)
