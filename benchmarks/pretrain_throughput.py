"""Pre-training step throughput: comparative (all triplets, sampled-K) and contrastive, stages 1
and 2, jaxseg vs a PyTorch/MONAI reference (vectorised losses, and the authors' loop losses).

    python -m benchmarks.pretrain_throughput --preset=paper --steps=10 --against=monai
    python -m benchmarks.pretrain_throughput --mode=convergence --preset=small   # time to convergence

Rows 'device' reuse one batch already on the device; rows 'pipeline' pull every batch from the
grain pipeline over a phantom cache. Compile time apart; medians over --steps after --warmup;
jaxseg and torch rows alternate step by step (A B A B) and ratios are per pair. On GPU the
FLOPs come from XLA's cost analysis of the compiled step and MFU uses --peak_tflops.
"""

from __future__ import annotations

import functools
import json
import resource
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.timing import machine, summarize, write_json
from jaxseg.config import get_config
from jaxseg.data import Cache, PretrainDataConfig, load_dataset_json, make_iterator, prepare, pretrain_dataset, \
    write_phantom_dataset
from jaxseg.models import unetr_from_preset
from jaxseg.train.loop import converged
from jaxseg.train.pretrain import make_pretrain_step, pretrain_state

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "throughput", ["throughput", "convergence"], "what to measure")
flags.DEFINE_enum("preset", "paper", ["tiny", "small", "paper"], "UNETR preset")
flags.DEFINE_integer("crop_size", 96, "crop size (throughput mode)")
flags.DEFINE_list("objectives", ["comparative", "comparative_sampled", "contrastive"], "objectives")
flags.DEFINE_list("stages", ["feat", "recon"], "stages")
flags.DEFINE_list("sources", ["device", "pipeline"], "batch sources")
flags.DEFINE_integer("steps", 10, "timed steps per row")
flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "jaxseg compute dtype")
flags.DEFINE_enum("against", "none", ["none", "monai"], "also time the PyTorch/MONAI reference")
flags.DEFINE_integer("loop_entries", 36, "contrastive loop reference: entries timed (of 576), extrapolated")
flags.DEFINE_float("peak_tflops", 0.0, "device peak TFLOP/s for MFU (e.g. 989 for H100/H200 dense bf16)")
flags.DEFINE_integer("max_steps", 300, "convergence mode: step limit per stage")
flags.DEFINE_string("work_dir", None, "phantom data + cache (default: temp dir)")
flags.DEFINE_string("json_out", None, "write results here")


def phantom_cache(work: Path, subjects: int = 8) -> Cache:
    if not (work / "cache" / "cache.json").is_file():
        data = write_phantom_dataset(work / "data", "spleen", subjects)
        prepare(load_dataset_json(data), work / "cache", progress=False)
    return Cache(work / "cache")


def peak_memory() -> dict:
    out = {"host_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    return out


def jax_row(cfg, cache, objective, stage, source, s, torch_fn=None):
    model = unetr_from_preset(cfg.model, in_channels=1, out_channels=2, img_size=s,
                              dtype=jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, s, s, s, 1)))
    c = cfg.replace(objective=objective, crop_size=s)
    state, tx = pretrain_state(model, params, c, stage)
    step = make_pretrain_step(model, tx, c, stage, multilabel=False)
    dcfg = PretrainDataConfig(crop_size=s, sampled_triplets=c.sampled_triplets if objective == "comparative_sampled" else 0)
    ds = pretrain_dataset(cache, cache.training, dcfg, seed=0)
    it = make_iterator(ds, 2)
    fixed = jax.device_put({k: jnp.asarray(v) for k, v in ds[0].items()})

    def batch():
        return fixed if source == "device" else jax.device_put({k: jnp.asarray(v) for k, v in next(it).items()})

    t0 = time.perf_counter()
    lowered = step.lower(state, fixed)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    flops = None
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        flops = float(ca.get("flops", 0.0)) or None
    except Exception:  # cost analysis is backend-dependent
        pass
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], batch())
        return float(m["loss"])

    for _ in range(FLAGS.warmup):
        run()
    jt, tt = [], []
    for _ in range(FLAGS.steps):
        t = time.perf_counter(); run(); jt.append(time.perf_counter() - t)
        if torch_fn is not None:
            t = time.perf_counter(); torch_fn(); tt.append(time.perf_counter() - t)
    row = {"objective": objective, "stage": stage, "source": source, "compile_s": compile_s, **summarize(jt),
           "crops_per_s": 4 / float(np.median(jt)), "flops_per_step": flops, **peak_memory()}
    if flops and jax.default_backend() != "cpu":
        row["tflops_per_s"] = flops / row["median_s"] / 1e12
        if FLAGS.peak_tflops:
            row["mfu"] = row["tflops_per_s"] / FLAGS.peak_tflops
    if tt:
        row["torch"] = summarize(tt)
        row["ratio_jaxseg_over_torch"] = float(np.median([a / b for a, b in zip(jt, tt)]))
    return row


def torch_step_fn(cfg, objective, stage, impl, s):
    import torch
    from monai.networks.nets import UNETR

    from benchmarks.torch_reference import make_step

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = unetr_from_preset(cfg.model, in_channels=1, out_channels=2, img_size=s)
    net = UNETR(1, 2, s, m.feature_size, m.hidden_size, m.mlp_dim, m.num_heads).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)
    x = torch.randn(4, 1, s, s, s, device=dev)
    offsets = [[0] * 4] * 3
    step = make_step(net, opt, objective, stage, impl, 4, 0.1, FLAGS.loop_entries)
    return lambda: step(x, offsets)


def throughput(cfg, cache):
    rows = []
    s = FLAGS.crop_size
    for stage in FLAGS.stages:
        for objective in FLAGS.objectives:
            for source in FLAGS.sources:
                ref = None
                if FLAGS.against == "monai" and source == "device" and objective in ("comparative", "contrastive") \
                        and cfg.model == "paper":
                    ref = torch_step_fn(cfg, objective, stage, "vectorised", s)
                row = jax_row(cfg, cache, objective, stage, source, s, ref)
                rows.append(row)
                msg = (f"{stage:5s} {objective:20s} {source:8s} jaxseg {row['median_s']:.3f}s "
                       f"({row['crops_per_s']:.2f} crops/s, compile {row['compile_s']:.1f}s)")
                if "torch" in row:
                    msg += f" | torch {row['torch']['median_s']:.3f}s ratio {row['ratio_jaxseg_over_torch']:.2f}"
                if "tflops_per_s" in row:
                    msg += f" | {row['tflops_per_s']:.1f} TFLOP/s" + (f" MFU {row['mfu']:.1%}" if "mfu" in row else "")
                print(msg, flush=True)
    if FLAGS.against == "monai" and cfg.model == "paper":  # the authors' loop-style losses
        for stage in FLAGS.stages:
            base = None
            for objective in ("comparative", "contrastive"):
                fn = torch_step_fn(cfg, objective, stage, "loop", s)
                fn()
                times = [(lambda t0: (fn(), time.perf_counter() - t0)[1])(time.perf_counter())
                         for _ in range(max(1, FLAGS.steps // 5))]
                med = float(np.median(times))
                scale = 576 / FLAGS.loop_entries if objective == "contrastive" else 1.0
                if objective == "comparative":
                    base = med  # model forward/backward + the (cheap) comparative loop
                    step_s = med
                else:  # only the loss part scales with the number of entries
                    step_s = base + (med - base) * scale
                row = {"objective": objective, "stage": stage, "source": "torch_loop", "median_s": med,
                       "extrapolated_step_s": step_s,
                       "note": (f"{FLAGS.loop_entries} of 576 entries timed; step = comparative-loop step + "
                                f"{scale:g} x the extra time") if scale != 1 else ""}
                rows.append(row)
                print(f"{stage:5s} {objective:20s} torch loop {row['extrapolated_step_s']:.2f}s/step {row['note']}", flush=True)
    return rows


def time_to_convergence(cfg, cache):
    """Comparative then contrastive pre-training from the same init, each stage until the
    paper's convergence rule fires or --max_steps; wall time excludes compilation."""
    out = {}
    for objective in ("comparative", "contrastive"):
        c = cfg.replace(objective=objective)
        model = unetr_from_preset(c.model, in_channels=1, out_channels=2, img_size=c.crop_size)
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *(c.crop_size,) * 3, 1)))
        res = {"stages": {}}
        for k, stage in enumerate(("feat", "recon")):
            state, tx = pretrain_state(model, params, c, stage)
            step = make_pretrain_step(model, tx, c, stage, False)
            it = make_iterator(pretrain_dataset(cache, cache.training, PretrainDataConfig(crop_size=c.crop_size), seed=k), 2)
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
                if converged(hist, c.convergence_window, c.convergence_rtol):
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
    work = Path(FLAGS.work_dir or tempfile.mkdtemp(prefix="jaxseg-bench-"))
    cache = phantom_cache(work)
    cfg = get_config(FLAGS.preset)
    result = {"machine": machine(), "flags": {k: FLAGS[k].value for k in (
        "mode", "preset", "crop_size", "steps", "warmup", "dtype", "against", "peak_tflops")}}
    if FLAGS.mode == "throughput":
        result["rows"] = throughput(cfg, cache)
    else:
        result["convergence"] = time_to_convergence(cfg, cache)
    write_json(FLAGS.json_out, result)


if __name__ == "__main__":
    app.run(main)
