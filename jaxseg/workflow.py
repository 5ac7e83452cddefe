"""Whole jobs, wired data -> model -> train -> evaluate: data prepared once per work dir, staged
pre-training, fine-tuning, evaluation. The entry points and table1 call these; ``jaxseg.train``
itself only trains."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxseg.config import Config, job_settings
from jaxseg.data import (Cache, finetune_dataset, label_budget, load_dataset_json, make_iterator, prepare,
                         pretrain_dataset, split_cases, write_phantom_dataset)
from jaxseg.data.cache import is_current
from jaxseg.errors import UserError
from jaxseg.predict import MODEL_CARD, model_card
from jaxseg.probe import representation_probe
from jaxseg.distributed import barrier, is_primary, sole_writer
from jaxseg.io import atomic_write_text, file_digest, load_weights, save_weights
from jaxseg.run_settings import claim_output_dir, precheck_output_dir
from jaxseg.evaluate import evaluate_cases, mean_foreground_dice, plot_loss_curves
from jaxseg.inference import predict_volume
from jaxseg import models
from jaxseg.models import unetr_from_preset
from jaxseg.models.unetr import STAGES, UNETR
from jaxseg.train.checkpoint import check_workdir
from jaxseg.train.finetune import make_finetune_step
from jaxseg.train.loop import converged, run_loop
from jaxseg.train.pretrain import PretrainSpec, make_pretrain_step, pretrain_state
from jaxseg.train.sharding import data_mesh, host_shard, replicate, shard_batch
from jaxseg.train.state import create_state, make_optimizer


Data = tuple[Cache, dict[str, list[str]]]  # the cache and its train / val / test split


def ensure_data(cfg: Config, workdir: Path, progress: bool = True) -> Data:
    """The cache for ``cfg`` (a phantom dataset when ``cfg.data.dir`` is empty) and its seeded
    train / val / test split."""
    workdir = check_workdir(workdir)
    d = cfg.data
    data_dir = Path(d.dir) if d.dir else workdir / f"phantom_{d.phantom}_{d.phantom_subjects}_{d.seed}"
    cache_dir = Path(d.cache_dir) if d.cache_dir else workdir / "cache"
    if is_primary():  # the other processes wait, then read what process 0 prepared
        if not d.dir and not (data_dir / "dataset.json").is_file():
            write_phantom_dataset(data_dir, d.phantom, d.phantom_subjects, seed=d.seed)
        info = load_dataset_json(data_dir)
        prep = cfg.prepare()
        if not is_current(info, cache_dir, prep):  # validated and prepared once, redone when data or settings change
            prepare(info, cache_dir, prep, progress=progress)
    barrier("prepare")
    cache = Cache(cache_dir)
    split = split_cases(cache.training, d.val_fraction, d.test_fraction, d.seed)
    if len(split["train"]) < 2:
        raise UserError(f"need at least 2 training cases after the split, got {len(split['train'])} "
                        f"({len(cache.training)} cases, val_fraction {d.val_fraction}, test_fraction {d.test_fraction})")
    if is_primary():
        atomic_write_text(workdir / "split.json", json.dumps(split, indent=1))
    return cache, split


def make_model(cfg: Config, cache: Cache) -> UNETR:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.model.dtype]
    return unetr_from_preset(cfg.model.size, in_channels=cache.num_channels, out_channels=cache.num_classes,
                             img_size=cfg.model.crop_size, dtype=dtype)


def init_params(model: UNETR, cfg: Config) -> Any:
    return models.init_params(model, cfg.seed)


def _job_setup(cfg: Config, workdir, out_name: str, progress: bool, job: str, overwrite: bool = False,
               extra: dict | None = None, data: Data | None = None, weights: tuple[str, str | Path | None] | None = None):
    """(root, cache, split, output dir, model, params) for one job; ``data`` is
    ``ensure_data``'s result when the caller has it already; ``weights`` = (name, path or None)
    an input weights file (``init``, ``params``), verified and loaded into ``params`` before the
    output folder is claimed. The output dir records the settings (and the input file, by digest)
    that its results depend on; other settings are refused before any data is (re)prepared."""
    root = check_workdir(workdir)
    name, path = weights or (None, None)
    inputs = {} if name is None else {name: None if path is None else {"path": str(Path(path).absolute())}}
    precheck_output_dir(root / out_name, {**job_settings(cfg, job), **inputs, **(extra or {})}, overwrite,
                        ignore=("data", *inputs))
    cache, split = data if data is not None else ensure_data(cfg, root, progress)
    if job == "finetune" and cfg.finetune.label_budget > len(split["train"]):
        raise UserError(f"label_budget {cfg.finetune.label_budget} exceeds the {len(split['train'])} labelled training "
                        f"cases; use 1..{len(split['train'])} (0: all)")
    model = make_model(cfg, cache)
    params = init_params(model, cfg)
    if path is not None:
        params = load_weights(path, params)
        inputs[name]["sha256"] = file_digest(path)
    settings = {**job_settings(cfg, job), "data": file_digest(Path(cache.root) / "cache.json"), **inputs,
                **(extra or {})}
    out = claim_output_dir(root / out_name, settings, overwrite)
    if is_primary() and job in ("pretrain", "finetune"):  # what load_model needs beside the weights
        atomic_write_text(out / MODEL_CARD, json.dumps(model_card(cfg, cache), indent=1))
    return root, cache, split, check_workdir(out), model, params


def run_pretraining(cfg: Config, workdir: str | Path, out_name: str = "pretrain",
                    progress: bool = True, overwrite: bool = False, data: Data | None = None) -> tuple[Any, dict]:
    """Stage 1 'encoder' (enc4 features) then stage 2 'decoder' (decoder outputs), each until convergence or its step
    limit, resuming if a run was interrupted. Data and cache live in ``workdir``; outputs in
    ``workdir/out_name``: ``params.msgpack``, per-stage metrics and summaries,
    ``pretrain_loss.png``, and in the summary a linear probe of the enc4 features at random
    init and after each stage (``jaxseg.probe``). Returns (params, summary)."""
    with sole_writer(Path(workdir) / out_name):
        _, cache, split, workdir, model, params = _job_setup(cfg, workdir, out_name, progress, "pretrain", overwrite,
                                                             data=data)
        mesh = data_mesh()
        multilabel = cache.regions is not None
        dcfg, p = cfg.pretrain_data(), cfg.pretrain
        encode = jax.jit(functools.partial(model.apply, method=UNETR.encode))

        def probe(params):  # the same crops of the same volumes for every model compared
            return representation_probe(lambda x: encode(params, x), cache, split["train"], split["val"] + split["test"],
                                        cfg.model.crop_size, p.num_partitions, seed=cfg.data.seed)

        probes = {"random_init": probe(params)}
        summaries = {}
        for stage_idx, (stage, steps) in enumerate(zip(STAGES, (p.stage1_steps, p.stage2_steps))):
            state, tx = pretrain_state(model, params, cfg, stage)
            ds = pretrain_dataset(cache, split["train"], dcfg, seed=cfg.seed * 1000 + stage_idx, shard=host_shard())
            state, summary = run_loop(
                name=f"pretrain_{stage}", workdir=workdir / stage, state=replicate(state, mesh),
                step_fn=make_pretrain_step(model, tx, PretrainSpec.from_config(cfg), stage, multilabel),
                data_iter=make_iterator(ds, cfg.data.threads), num_steps=steps,
                prepare_batch=functools.partial(shard_batch, mesh=mesh),
                crops_per_step=p.volumes_per_step * p.crops_per_volume, ckpt_every=cfg.ckpt_every,
                should_stop=functools.partial(converged, window=p.convergence_window, rtol=p.convergence_rtol),
                min_steps=p.min_steps, progress=progress, learning_rate=cfg.lr)
            params = state.params
            summaries[stage] = summary = _against_chance(summary, cfg, stage)
            probes[stage] = probe(params)
        total = {"objective": p.objective, "stages": summaries, "probe": probes,
                 "train_s": sum(s["train_s"] for s in summaries.values()),
                 "compile_s": sum(s["compile_s"] or 0.0 for s in summaries.values()),
                 "steps": sum(s["end_step"] for s in summaries.values())}
        if is_primary():
            save_weights(workdir / "params.msgpack", params)
            atomic_write_text(workdir / "pretrain_summary.json", json.dumps(total, indent=1))
            plot_loss_curves({f"stage {k + 1} ({s})": {p.objective: workdir / s / "metrics.jsonl"}
                              for k, s in enumerate(summaries)}, workdir / "pretrain_loss.png",
                             title=f"pre-training loss ({p.objective}, seed {cfg.seed})",
                             chance={p.objective: summaries[STAGES[0]].get("chance_loss")})
        return params, total


def _against_chance(summary: dict, cfg: Config, stage: str) -> dict:
    """The stage's loss at chance for its objective and settings, its final loss (mean of the
    last 10 steps) as a fraction of it, and a warning when it ends within 2% of chance."""
    from jaxseg.losses import DID_NOT_LEARN, chance_loss, learning_report

    p = cfg.pretrain
    chance = chance_loss(p.objective, p.volumes_per_step * p.crops_per_volume, p.num_partitions, p.temperature)
    report = learning_report(summary["final_mean_loss"], chance) if summary["final_mean_loss"] is not None else {}
    if report and not report["learned"] and is_primary():
        print(f"warning: pre-training stage {stage} ({p.objective}) ended at {100 * report['loss_vs_chance']:.1f}% of "
              f"the loss at chance ({chance:.3f}); above {100 * DID_NOT_LEARN:.0f}% it did not learn", file=sys.stderr,
              flush=True)
    return {**summary, **report}


def run_finetuning(cfg: Config, workdir: str | Path, init: str | Path | None = None,
                   out_name: str = "finetune", progress: bool = True, overwrite: bool = False,
                   data: Data | None = None) -> tuple[Any, dict]:
    """Dice+CE fine-tuning from random init or ``init`` (a params.msgpack), on the first
    ``cfg.finetune.label_budget`` labelled training cases (all when 0); validation Dice every
    ``cfg.finetune.eval_every`` steps keeps the best parameters in ``best.msgpack`` (never the test
    set). Data in ``workdir``, outputs in ``workdir/out_name``. Returns (best params, summary)."""
    with sole_writer(Path(workdir) / out_name):
        _, cache, split, workdir, model, params = _job_setup(cfg, workdir, out_name, progress, "finetune", overwrite,
                                                             data=data, weights=("init", init or None))
        mesh = data_mesh()
        multilabel = cache.regions is not None
        ids = label_budget(split["train"], cfg.finetune.label_budget or None, cfg.seed)
        dcfg = cfg.finetune_data()
        tx = make_optimizer(cfg.lr, cfg.weight_decay)
        state = replicate(create_state(params, tx), mesh)
        best_path, best_json = workdir / "best.msgpack", workdir / "best.json"
        best = json.loads(best_json.read_text()) if best_json.is_file() else {"val_dice": -1.0, "step": 0}

        apply_fn = jax.jit(model.apply)

        def evaluate(state, step):
            def predict(image):
                return predict_volume(apply_fn, state.params, image, cfg.model.crop_size, cfg.eval.sw_batch_size,
                                      cfg.eval.overlap,
                                      multilabel)

            d, rgb = mean_foreground_dice(predict, cache, split["val"], figure=is_primary())
            if d > best["val_dice"]:  # the same on every process (never a file check: hosts see files late)
                best.update(val_dice=d, step=step)
                if is_primary():
                    save_weights(best_path, state.params)
                    atomic_write_text(best_json, json.dumps(best))
            return {"val_dice": d, "images": {} if rgb is None else {"validation/overlay": rgb}}

        ds = finetune_dataset(cache, ids, dcfg, seed=cfg.seed, shard=host_shard())
        state, summary = run_loop(
            name="finetune", workdir=workdir, state=state, step_fn=make_finetune_step(model, tx, multilabel),
            data_iter=make_iterator(ds, cfg.data.threads), num_steps=cfg.finetune.steps,
            prepare_batch=functools.partial(shard_batch, mesh=mesh),
            crops_per_step=cfg.finetune.volumes_per_step * cfg.finetune.crops_per_volume,
            ckpt_every=cfg.ckpt_every, evaluate=evaluate if split["val"] else None, eval_every=cfg.finetune.eval_every,
            progress=progress, learning_rate=cfg.lr)
        summary.update(best=best, label_cases=ids)
        if is_primary():
            if not best_path.exists():
                save_weights(best_path, state.params)
            atomic_write_text(workdir / "finetune_summary.json", json.dumps(summary, indent=1))
        barrier("finetune done")
        return load_weights(best_path, state.params), summary


def run_evaluation(cfg: Config, workdir: str | Path, params_path: str | Path, out_name: str = "eval",
                   split_name: str = "test", progress: bool = True, overwrite: bool = False,
                   data: Data | None = None) -> dict:
    """Evaluate ``params_path`` on the held-out ``split_name`` cases of ``workdir``'s data."""
    with sole_writer(Path(workdir) / out_name):
        _, cache, split, out, model, params = _job_setup(cfg, workdir, out_name, progress, "evaluate", overwrite,
                                                         extra={"split": split_name}, data=data,
                                                         weights=("params", params_path))
        multilabel = cache.regions is not None
        apply_fn = jax.jit(model.apply)

        def predict(image):
            return predict_volume(apply_fn, params, image, cfg.model.crop_size, cfg.eval.sw_batch_size, cfg.eval.overlap,
                                  multilabel)

        return evaluate_cases(predict, cache, split[split_name], out, progress=progress, write=is_primary())

