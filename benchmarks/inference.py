"""Sliding-window inference of whole volumes: jaxseg vs MONAI on the same device, same weights
(via from_monai), same ROI, overlap and window batch; alternated in one process, ratio per pair.

    python -m benchmarks.inference --model=paper --dtype=bfloat16 --json_out=benchmarks/results_inference_cpu.json

MONAI runs per dtype (bf16 under torch.autocast) and, on CUDA, per cudnn.benchmark setting;
ratios are against its faster setting of jaxseg's dtype. TFLOP/s and MFU count the padded
window batches' forward passes analytically (``jaxseg.models.flops``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.timing import (Results, efficiency, jax_peak_mib, monai_unetr, paired_ratio, run_variants, setup,
                               summarize, torch_device, torch_modes, torch_sync)
from jaxseg.inference import sliding_window_inference, window_starts
from jaxseg.models import from_monai, init_params, unetr_from_preset
from jaxseg.models.flops import unetr_cost

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "paper", ["tiny", "small", "paper"], "UNETR size (with --against=monai: 12 layers)")
flags.DEFINE_integer("roi", 96, "ROI (window) size")
flags.DEFINE_integer("sw_batch_size", 4, "windows per predictor call")
flags.DEFINE_float("overlap", 0.25, "window overlap")
flags.DEFINE_integer("repeats", 2, "timed repeats per variant (after one warm-up each)")
flags.DEFINE_enum("against", "monai", ["monai", "none"], "reference")
flags.DEFINE_list("torch_dtypes", ["float32", "bfloat16"], "MONAI dtypes (bfloat16: torch.autocast)")
flags.DEFINE_list("cases", ["spleen:192x192x192x1x2", "brats:240x240x155x4x3"], "name:DxHxWxCinxCout")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "jaxseg compute dtype")
flags.DEFINE_string("json_out", None, "write results here (rewritten after every row)")


def run_case(spec: str, results: Results) -> None:
    name, dims = spec.split(":")
    d, h, w, cin, cout = map(int, dims.split("x"))
    extra = dict(num_layers=12, patch_size=16) if FLAGS.against == "monai" else {}
    model = unetr_from_preset(FLAGS.model, in_channels=cin, out_channels=cout, img_size=FLAGS.roi,
                              dtype=jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32, **extra)
    x = np.random.default_rng(0).standard_normal((1, d, h, w, cin)).astype(np.float32)
    variants = {}
    if FLAGS.against == "monai":
        import torch
        from monai.inferers import sliding_window_inference as monai_swi

        net = monai_unetr(model, torch_device()).eval()
        params = from_monai({k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}, model)
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).to(torch_device())

        def ref_fn():
            with torch.no_grad():
                return monai_swi(xt, FLAGS.roi, FLAGS.sw_batch_size, net, overlap=FLAGS.overlap)

        for dt, bench in torch_modes(FLAGS.torch_dtypes):
            variants[f"monai {dt} cudnn.benchmark={'on' if bench else 'off'}"] = dict(
                fn=ref_fn, sync=torch_sync, mode=(dt, bench), dtype=dt)
    else:
        params = init_params(model)
    apply = jax.jit(model.apply)  # params as an argument: compiled once, not embedded as constants

    def ours():
        return sliding_window_inference(lambda win: apply(params, win), x, FLAGS.roi, FLAGS.sw_batch_size,
                                        FLAGS.overlap)

    variants = {f"jaxseg {FLAGS.dtype}": dict(fn=ours, sync=jax.block_until_ready, mode=None, dtype=FLAGS.dtype),
                **variants}
    run_variants(variants, FLAGS.repeats, warmup=0)  # each first call's output is kept for the comparison
    n_win = len(window_starts((d, h, w), (FLAGS.roi,) * 3, FLAGS.overlap))
    padded = -(-n_win // FLAGS.sw_batch_size) * FLAGS.sw_batch_size
    cost = unetr_cost(model, padded, "forward")
    jx = variants.pop(f"jaxseg {FLAGS.dtype}")
    jx_out = np.asarray(jx["out"])
    row = {"case": name, "shape": [d, h, w, cin], "out_channels": cout, "windows": n_win, "dtype": FLAGS.dtype,
           "first_call_s": jx["first_call_s"], **summarize(jx["times"]),
           **efficiency(cost.flops, cost.bytes, float(np.median(jx["times"]))), "peak_mib": jax_peak_mib()}
    if variants:
        row["monai"] = {}
        for vname, v in variants.items():
            ref = np.moveaxis(v["out"].float().cpu().numpy(), 1, -1)
            row["monai"][vname] = {**summarize(v["times"]), "first_call_s": v["first_call_s"],
                                   "max_rel_diff": float(np.abs(jx_out - ref).max() / np.abs(ref).max())}
        same = [(n, v) for n, v in variants.items() if v["dtype"] == FLAGS.dtype]
        if same:
            best = min(same, key=lambda nv: np.median(nv[1]["times"]))
            row["ratio_jaxseg_over_monai"] = paired_ratio(jx["times"], best[1]["times"])
            row["ratio_against"] = best[0]
    results.add(row)
    msg = f"{name} {d}x{h}x{w}x{cin} ({n_win} windows): jaxseg {row['median_s'] * 1e3:.1f} ms (first call {jx['first_call_s']:.1f} s)"
    for vname, m in row.get("monai", {}).items():
        msg += f" | {vname} {m['median_s'] * 1e3:.1f} ms (max rel diff {m['max_rel_diff']:.1e})"
    if "ratio_jaxseg_over_monai" in row:
        msg += f" | ratio {row['ratio_jaxseg_over_monai']:.2f}"
    print(msg, flush=True)


def main(argv):
    del argv
    setup()
    results = Results(FLAGS.json_out, flags={k: FLAGS[k].value for k in (
        "model", "roi", "sw_batch_size", "overlap", "repeats", "dtype", "against", "torch_dtypes")})
    for spec in FLAGS.cases:
        run_case(spec, results)


if __name__ == "__main__":
    app.run(main)
