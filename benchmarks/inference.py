"""Sliding-window inference of whole volumes: jaxseg vs MONAI, same weights (via from_monai),
same ROI, overlap and window batch; alternated in one process, ratio per pair.

    python -m benchmarks.inference --preset=paper --json_out=benchmarks/results_inference_cpu.json
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.timing import machine, summarize, write_json
from jaxseg.inference import sliding_window_inference
from jaxseg.models import from_monai, unetr_from_preset

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "paper", ["tiny", "small", "paper"], "UNETR preset (MONAI comparison needs paper)")
flags.DEFINE_integer("roi", 96, "ROI (window) size")
flags.DEFINE_integer("sw_batch_size", 4, "windows per predictor call")
flags.DEFINE_float("overlap", 0.25, "window overlap")
flags.DEFINE_integer("repeats", 2, "timed repeats per framework (after one warm-up each)")
flags.DEFINE_enum("against", "monai", ["monai", "none"], "reference")
flags.DEFINE_list("cases", ["spleen:192x192x192x1x2", "brats:240x240x155x4x3"], "name:DxHxWxCinxCout")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "jaxseg compute dtype")
flags.DEFINE_string("json_out", None, "write results here")


def main(argv):
    del argv
    rows = []
    for spec in FLAGS.cases:
        name, dims = spec.split(":")
        d, h, w, cin, cout = map(int, dims.split("x"))
        model = unetr_from_preset(FLAGS.preset, in_channels=cin, out_channels=cout, img_size=FLAGS.roi,
                                  dtype=jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32)
        x = np.random.default_rng(0).standard_normal((1, d, h, w, cin)).astype(np.float32)
        ref_fn = None
        if FLAGS.against == "monai" and FLAGS.preset == "paper":
            import torch
            from monai.inferers import sliding_window_inference as monai_swi
            from monai.networks.nets import UNETR

            torch.manual_seed(0)
            net = UNETR(cin, cout, FLAGS.roi, model.feature_size, model.hidden_size, model.mlp_dim,
                        model.num_heads).eval()
            params = from_monai({k: v.numpy() for k, v in net.state_dict().items()}, model)
            xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))

            def ref_fn():
                with torch.no_grad():
                    return monai_swi(xt, FLAGS.roi, FLAGS.sw_batch_size, net, overlap=FLAGS.overlap)
        else:
            params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *(FLAGS.roi,) * 3, cin)))
        predict = jax.jit(lambda win: model.apply(params, win))

        def ours():
            return jax.block_until_ready(sliding_window_inference(predict, x, FLAGS.roi, FLAGS.sw_batch_size,
                                                                  FLAGS.overlap))

        t0 = time.perf_counter(); out = ours(); first = time.perf_counter() - t0
        if ref_fn is not None:
            ref = np.moveaxis(ref_fn().numpy(), 1, -1)
            rel = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
        jt, tt = [], []
        for _ in range(FLAGS.repeats):
            t0 = time.perf_counter(); ours(); jt.append(time.perf_counter() - t0)
            if ref_fn is not None:
                t0 = time.perf_counter(); ref_fn(); tt.append(time.perf_counter() - t0)
        row = {"case": name, "shape": [d, h, w, cin], "out_channels": cout, "first_call_s": first, **summarize(jt)}
        msg = f"{name} {d}x{h}x{w}x{cin}: jaxseg {row['median_s']:.2f}s (first call {first:.1f}s)"
        if tt:
            row.update(monai=summarize(tt), ratio_jaxseg_over_monai=float(np.median([a / b for a, b in zip(jt, tt)])),
                       max_rel_diff=rel)
            msg += f", MONAI {row['monai']['median_s']:.2f}s, ratio {row['ratio_jaxseg_over_monai']:.2f}, max rel diff {rel:.1e}"
        print(msg, flush=True)
        rows.append(row)
    write_json(FLAGS.json_out, {"machine": machine(), "flags": {k: FLAGS[k].value for k in (
        "preset", "roi", "sw_batch_size", "overlap", "repeats", "dtype")}, "rows": rows})


if __name__ == "__main__":
    app.run(main)
