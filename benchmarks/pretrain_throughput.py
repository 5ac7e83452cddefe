"""Pre-training step throughput: comparative (all triplets, sampled-K) and contrastive, stages 1
and 2, jaxseg vs a PyTorch/MONAI reference (vectorised losses, and the authors' loop losses).

    python -m benchmarks.pretrain_throughput --config=paper --steps=10 --against=monai
    python -m benchmarks.pretrain_throughput --mode=convergence --config=small   # time to convergence

Rows 'device' reuse one batch already on the device; rows 'pipeline' pull every batch from the
grain pipeline over a phantom cache. Compile time apart (ahead-of-time ``lower().compile()``);
medians over --steps after --warmup; jaxseg and the torch variants (on the same device; per
dtype, bf16 under autocast, and per cudnn.benchmark setting on CUDA) alternate step by step and
ratios are medians of per-step pairs against the faster torch setting of the same dtype. FLOPs
come from the analytic count (``jaxseg.models.flops``): XLA's cost analysis misses cuDNN
convolutions on GPUs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.timing import (Results, efficiency, jax_peak_mib, machine, monai_unetr, paired_ratio, run_variants,
                               setup, summarize, time_call, torch_device, torch_modes, torch_sync, write_json)
from jaxseg.config import PRESETS, get_config
from jaxseg.data import Cache, load_dataset_json, make_iterator, prepare, pretrain_dataset, \
    write_phantom_dataset
from jaxseg.models import STAGES, init_params, unetr_from_preset
from jaxseg.models.flops import pretrain_step_cost
from jaxseg.train.hooks import converged
from jaxseg.train.pretrain import make_pretrain_step, pretrain_state

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "throughput", ["throughput", "convergence"], "what to measure")
flags.DEFINE_enum("config", "paper", sorted(PRESETS), "config preset (jaxseg.config.PRESETS)")
flags.DEFINE_integer("crop_size", 96, "crop size (throughput mode)")
flags.DEFINE_list("objectives", ["comparative", "comparative_sampled", "contrastive"], "objectives")
flags.DEFINE_list("stages", ["encoder", "decoder"], "pre-training stages (encoder: enc4 features; decoder: outputs); "
                  "convergence mode runs them in the paper's order")
flags.register_validator("stages", lambda v: bool(v) and set(v) <= set(STAGES), f"--stages: a list of {STAGES}")
flags.DEFINE_list("sources", ["device", "pipeline"], "batch sources")
flags.DEFINE_integer("steps", 10, "timed steps per row")
flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "jaxseg compute dtype")
flags.DEFINE_enum("against", "none", ["none", "monai"], "also time the PyTorch/MONAI reference")
flags.DEFINE_list("torch_dtypes", ["float32", "bfloat16"], "torch reference dtypes (bfloat16: autocast)")
flags.DEFINE_bool("loop_reference", True, "with --against=monai: also the authors' loop-style losses")
flags.DEFINE_integer("loop_entries", 36, "contrastive loop reference: entries timed (of 576), extrapolated")
flags.DEFINE_integer("loop_steps", 1, "timed steps of each loop-reference row (after one untimed)")
flags.DEFINE_integer("max_steps", 300, "convergence mode: step limit per stage")
flags.DEFINE_string("workdir", None, "phantom data + cache (default: temp dir)")
flags.DEFINE_string("json_out", None, "write results here")


def phantom_cache(work: Path, subjects: int = 8) -> Cache:
    if not (work / "cache" / "cache.json").is_file():
        data = write_phantom_dataset(work / "data", "spleen", subjects)
        prepare(load_dataset_json(data), work / "cache", progress=False)
    return Cache(work / "cache")


def _model(cfg, s, dtype):
    extra = dict(num_layers=12, patch_size=16) if FLAGS.against == "monai" else {}  # MONAI's fixed sizes
    return unetr_from_preset(cfg.model.size, in_channels=1, out_channels=2, img_size=s, dtype=dtype, **extra)


def jax_step(cfg, cache, objective, stage, source, s):
    """(run one step, compile seconds, the model)."""
    model = _model(cfg, s, jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32)
    params = init_params(model)
    c = cfg.replace(objective=objective, crop_size=s)
    state, tx = pretrain_state(model, params, c, stage)
    step = make_pretrain_step(model, tx, c.pretrain, stage, multilabel=False)
    # 2 volumes x 2 crops as the paper; triplets for a sampled objective, as a run's pipeline gives
    ds = pretrain_dataset(cache, cache.training, c, seed=0)
    it = make_iterator(ds, 2)
    fixed = jax.device_put({k: jnp.asarray(v) for k, v in ds[0].items()})

    def batch():
        return fixed if source == "device" else jax.device_put({k: jnp.asarray(v) for k, v in next(it).items()})

    step, compile_s = step.compiled(state, fixed)
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], batch())
        return m["loss"]

    return run, compile_s, model


def torch_step_fn(model, objective, stage, impl, s, entries=None):
    """The PyTorch/MONAI reference step (three axes in turn) on jaxseg's device."""
    import torch

    from benchmarks.torch_reference import make_step

    dev = torch_device()
    net = monai_unetr(model, dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)
    x = torch.randn(4, 1, s, s, s, device=dev)
    step = make_step(net, opt, objective, stage, impl, 4, 0.1, entries)
    return lambda: step(x, [[0] * 4] * 3)


def throughput_row(cfg, cache, objective, stage, source, s, results):
    run, compile_s, model = jax_step(cfg, cache, objective, stage, source, s)
    variants = {"jaxseg": dict(fn=run, sync=jax.block_until_ready, mode=None)}  # compiled already (AOT)
    if FLAGS.against == "monai" and source == "device" and objective in ("comparative", "contrastive"):
        fn = torch_step_fn(model, objective, stage, "vectorised", s)
        for dt, bench in torch_modes(FLAGS.torch_dtypes):
            variants[f"torch {dt} cudnn.benchmark={'on' if bench else 'off'}"] = dict(
                fn=fn, sync=torch_sync, mode=(dt, bench), dtype=dt)
    run_variants(variants, FLAGS.steps, FLAGS.warmup)
    jt = variants.pop("jaxseg")["times"]
    cost = pretrain_step_cost(model, 4, stage)
    row = {"objective": objective, "stage": stage, "source": source, "dtype": FLAGS.dtype, "compile_s": compile_s,
           **summarize(jt), "crops_per_s": 4 / float(np.median(jt)),
           **efficiency(cost.flops, cost.bytes, float(np.median(jt))), "peak_mib": jax_peak_mib()}
    if variants:
        row["torch"] = {name: {**summarize(v["times"]), "first_call_s": v["first_call_s"], "peak_mib": v["peak_mib"],
                               **efficiency(cost.flops, cost.bytes, float(np.median(v["times"])))}
                        for name, v in variants.items()}
        for dt in FLAGS.torch_dtypes:
            same = [v for v in variants.values() if v["dtype"] == dt]
            if same:
                ref = min(same, key=lambda v: np.median(v["times"]))
                row[f"ratio_jaxseg_over_torch_{dt}"] = paired_ratio(jt, ref["times"])
    results.add(row)
    msg = (f"{stage:5s} {objective:20s} {source:8s} jaxseg {row['median_s'] * 1e3:.1f} ms "
           f"({row['crops_per_s']:.2f} crops/s, compile {compile_s:.1f} s, {row['tflops_per_s']:.2f} TFLOP/s"
           + (f", MFU {row['mfu']:.1%}" if "mfu" in row else "") + ")")
    for name, t in row.get("torch", {}).items():
        msg += f" | {name} {t['median_s'] * 1e3:.1f} ms"
    print(msg, flush=True)


def loop_rows(cfg, s, results):
    """The authors' loop-style losses in PyTorch (fp32, on the device): the contrastive one on
    --loop_entries of its 576 entries, extrapolated."""
    model = _model(cfg, s, jnp.float32)
    for stage in FLAGS.stages:
        base = None
        for objective in ("comparative", "contrastive"):
            fn = torch_step_fn(model, objective, stage, "loop", s, FLAGS.loop_entries)
            time_call(fn, torch_sync)
            med = float(np.median([time_call(fn, torch_sync) for _ in range(FLAGS.loop_steps)]))
            scale = 576 / FLAGS.loop_entries if objective == "contrastive" else 1.0
            if objective == "comparative":
                base = step_s = med  # model forward/backward + the (cheap) comparative loop
            else:  # only the loss part scales with the number of entries
                step_s = base + (med - base) * scale
            row = results.add({"objective": objective, "stage": stage, "source": "torch_loop", "median_s": med,
                               "extrapolated_step_s": step_s, "timed_steps": FLAGS.loop_steps,
                               "note": (f"{FLAGS.loop_entries} of 576 entries timed; step = comparative-loop step + "
                                        f"{scale:g} x the extra time") if scale != 1 else ""})
            print(f"{stage:5s} {objective:20s} torch loop {row['extrapolated_step_s']:.2f} s/step {row['note']}",
                  flush=True)


def throughput(cfg, cache, results):
    s = FLAGS.crop_size
    for stage in FLAGS.stages:
        for objective in FLAGS.objectives:
            for source in FLAGS.sources:
                throughput_row(cfg, cache, objective, stage, source, s, results)
    if FLAGS.against == "monai" and FLAGS.loop_reference:
        loop_rows(cfg, s, results)


def time_to_convergence(cfg, cache):
    """Comparative then contrastive pre-training from the same init, each of --stages in turn
    until the paper's convergence rule fires or --max_steps; wall time excludes compilation."""
    out = {}
    for objective in ("comparative", "contrastive"):
        c = cfg.replace(objective=objective)
        model = unetr_from_preset(c.model.size, in_channels=1, out_channels=2, img_size=c.model.crop_size)
        params = init_params(model)
        res = {"stages": {}}
        for k, stage in enumerate(STAGES):
            if stage not in FLAGS.stages:  # a stage left out: the next keeps its own data seed
                continue
            state, tx = pretrain_state(model, params, c, stage)
            step = make_pretrain_step(model, tx, c.pretrain, stage, False)
            it = make_iterator(pretrain_dataset(cache, cache.training, c, seed=k), 2)
            hist, wall, first = [], 0.0, None
            for n in range(FLAGS.max_steps):
                b = jax.device_put({kk: jnp.asarray(v) for kk, v in next(it).items()})
                t0 = time.perf_counter()
                state, m = step(state, b)
                hist.append(float(m["loss"]))
                dt = time.perf_counter() - t0
                if first is None:
                    first = dt
                else:
                    wall += dt
                if converged(hist, c.pretrain.convergence_window, c.pretrain.convergence_rtol):
                    break
            params = state.params
            res["stages"][stage] = {"steps": len(hist), "wall_s": wall, "compile_s": first,
                                    "converged": len(hist) < FLAGS.max_steps, "losses": hist}
            print(f"{objective:12s} {stage:5s}: {len(hist)} steps, {wall:.1f}s (+{first:.1f}s first step)", flush=True)
        res["wall_s"] = sum(v["wall_s"] for v in res["stages"].values())
        res["steps"] = sum(v["steps"] for v in res["stages"].values())
        out[objective] = res
    out["ratio_contrastive_over_comparative_wall"] = out["contrastive"]["wall_s"] / out["comparative"]["wall_s"]
    print(f"time to convergence: comparative {out['comparative']['wall_s']:.1f}s ({out['comparative']['steps']} steps), "
          f"contrastive {out['contrastive']['wall_s']:.1f}s ({out['contrastive']['steps']} steps), "
          f"ratio {out['ratio_contrastive_over_comparative_wall']:.2f}")
    return out


def main(argv):
    del argv
    setup()
    work = Path(FLAGS.workdir or tempfile.mkdtemp(prefix="jaxseg-bench-"))
    cache = phantom_cache(work)
    cfg = get_config(FLAGS.config)
    header = {"flags": {k: FLAGS[k].value for k in (
        "mode", "config", "crop_size", "steps", "warmup", "dtype", "against", "torch_dtypes", "loop_entries")}}
    if FLAGS.mode == "throughput":
        throughput(cfg, cache, Results(FLAGS.json_out, **header))
    else:
        write_json(FLAGS.json_out, {"machine": machine(), **header, "convergence": time_to_convergence(cfg, cache)})


if __name__ == "__main__":
    app.run(main)
