"""Whole jobs, wired data -> model -> train -> evaluate: data prepared once per work dir, staged
pre-training, fine-tuning, evaluation. The entry points and table1 call these; ``jaxseg.train``
itself only trains."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxseg.config import Config, job_settings
from jaxseg.data import (Cache, Task, finetune_dataset, label_budget, load_dataset_json, make_iterator, prepare,
                         pretrain_dataset, split_cases, write_phantom_dataset)
from jaxseg.data.cache import INDEX, prepared_cache
from jaxseg.errors import UserError
from jaxseg.predict import MODEL_CARD, model_card
from jaxseg.probe import representation_probe
from jaxseg.distributed import agree, barrier, is_primary, local_copy, share, sole_writer
from jaxseg.io import atomic_write_text, file_digest, load_weights, save_weights
from jaxseg.run_settings import claim_output_dir, precheck_output_dir
from jaxseg.evaluate import evaluate_cases, validation_dice
from jaxseg.figures import plot_loss_curves
from jaxseg.inference import make_predictor
from jaxseg.losses import DID_NOT_LEARN, chance_loss, learning_report
from jaxseg import models
from jaxseg.models import unetr_from_preset
from jaxseg.models.unetr import STAGES, UNETR
from jaxseg.train.best import BestModel
from jaxseg.train.checkpoint import check_workdir
from jaxseg.train.finetune import make_finetune_step
from jaxseg.train.loop import converged, run_loop
from jaxseg.train.pretrain import PretrainSpec, make_pretrain_step, pretrain_state
from jaxseg.train.sharding import data_mesh, host_shard, replicate, shard_batch
from jaxseg.train.state import create_state, make_optimizer


Data = tuple[Cache, dict[str, list[str]]]  # the cache and its train / val / test split


def ensure_data(cfg: Config, workdir: Path, progress: bool = True) -> Data:
    """The cache for ``cfg`` (a phantom dataset when ``cfg.data.dir`` is empty) and its seeded
    train / val / test split. The cache is the folder of this preprocessing and this version of
    the dataset under ``cfg.data.cache_dir`` (default ``workdir/cache``): validated and prepared
    once, never changed after, so jobs with other settings can share the root."""
    workdir = check_workdir(workdir)
    d = cfg.data
    data_dir = Path(d.dir) if d.dir else workdir / f"phantom_{d.phantom}_{d.phantom_subjects}_{d.seed}"
    folder = None
    if is_primary():  # the other processes wait, then read what process 0 prepared
        if not d.dir and not (data_dir / "dataset.json").is_file():
            write_phantom_dataset(data_dir, d.phantom, d.phantom_subjects, seed=d.seed)
        info = load_dataset_json(data_dir)
        folder = str(prepared_cache(info, Path(d.cache_dir) if d.cache_dir else workdir / "cache", cfg.prepare(),
                                    progress=progress))
    cache_dir = Path(share("data cache", folder))
    index = cache_dir / INDEX  # every host must read what process 0 prepared
    agree("view of the data cache", {str(index.absolute()): file_digest(index) if index.is_file() else "missing"},
          hint="The work dir and the data must be on a filesystem that every host shares, at the same path.")
    cache = Cache(cache_dir)
    split = split_cases(cache.training, d.val_fraction, d.test_fraction, d.seed)
    if len(split["train"]) < 2:
        raise UserError(f"need at least 2 training cases after the split, got {len(split['train'])} "
                        f"({len(cache.training)} cases, val_fraction {d.val_fraction}, test_fraction {d.test_fraction})")
    if is_primary():
        atomic_write_text(workdir / "split.json", json.dumps(split, indent=1))
    return cache, split


def make_model(cfg: Config, task: Task) -> UNETR:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.model.dtype]
    return unetr_from_preset(cfg.model.size, in_channels=task.in_channels, out_channels=task.num_classes,
                             img_size=cfg.model.crop_size, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Job:
    """One job, as ``start_job`` sets it up: its data, its claimed output folder, its model."""

    root: Path  # the work dir: phantom data, split.json, the default cache
    cache: Cache
    split: dict[str, list[str]]  # train / val / test case ids
    task: Task  # the cache's, computed once
    out: Path  # the output folder, claimed for this job's settings
    model: UNETR
    params: Any  # random init, or the input weights file's

    def predictor(self, cfg: Config):
        """``predict(params, image) -> probabilities``, one compilation for every case and round."""
        return make_predictor(self.model, self.task, cfg.model.crop_size, cfg.eval.sw_batch_size, cfg.eval.overlap)


@dataclasses.dataclass(frozen=True)
class InputWeights:
    """A job's input weights file (or None: random init), recorded under ``setting``."""

    setting: str  # 'init' (fine-tuning) or 'params' (evaluation)
    path: str | Path | None
    allow_unverified: bool = False  # a file without a checksum loads only when the user says so


def start_job(cfg: Config, workdir: str | Path, out_name: str, settings: dict, *, progress: bool = True,
              overwrite: bool = False, data: Data | None = None, weights: InputWeights | None = None,
              check: Callable[[Data], None] | None = None) -> Job:
    """Set up one job whose results depend on ``settings`` (``job_settings``, plus anything
    else that names them): refuse an output folder made with other settings before any data is
    (re)prepared; get the data (``data``: ``ensure_data``'s result when the caller has it);
    ``check`` it; load the input ``weights``, verified before the output folder is claimed,
    which records the settings, the cache's digest and the input file's."""
    root = check_workdir(workdir)
    name, path = (weights.setting, weights.path) if weights else (None, None)
    inputs = {} if name is None else {name: None if path is None else {"path": str(Path(path).absolute())}}
    precheck_output_dir(root / out_name, {**settings, **inputs}, overwrite, ignore=("data", *inputs))
    cache, split = data if data is not None else ensure_data(cfg, root, progress)
    if check is not None:
        check((cache, split))
    task = cache.task
    model = make_model(cfg, task)
    if path is None:
        params = models.init_params(model, cfg.seed)
    else:  # loaded into the model's shapes: no init to compile or run
        params = load_weights(path, models.param_shapes(model), weights.allow_unverified)
        inputs[name]["sha256"] = file_digest(path)
    out = claim_output_dir(root / out_name, {**settings, "data": file_digest(Path(cache.root) / "cache.json"),
                                             **inputs}, overwrite)
    return Job(root, cache, split, task, check_workdir(out), model, params)


def _write_model_card(job: Job, cfg: Config) -> None:
    """What ``jaxseg.predict.load_model`` needs beside a trained run's weights."""
    if is_primary():
        atomic_write_text(job.out / MODEL_CARD, json.dumps(model_card(cfg, job.cache), indent=1))


def run_pretraining(cfg: Config, workdir: str | Path, out_name: str = "pretrain",
                    progress: bool = True, overwrite: bool = False, data: Data | None = None) -> tuple[Any, dict]:
    """Stage 1 'encoder' (enc4 features) then stage 2 'decoder' (decoder outputs), each until convergence or its step
    limit, resuming if a run was interrupted. Data and cache live in ``workdir``; outputs in
    ``workdir/out_name``: ``params.msgpack``, per-stage metrics and summaries,
    ``pretrain_loss.png``, and in the summary a linear probe of the enc4 features at random
    init and after each stage (``jaxseg.probe``). Returns (params, summary)."""
    with sole_writer(Path(workdir) / out_name):
        job = start_job(cfg, workdir, out_name, job_settings(cfg, "pretrain"), progress=progress, overwrite=overwrite,
                        data=data)
        _write_model_card(job, cfg)
        mesh, params, split = data_mesh(), job.params, job.split
        dcfg, p, spec = cfg.pretrain_data(), cfg.pretrain, PretrainSpec.from_config(cfg)
        encode = jax.jit(functools.partial(job.model.apply, method=UNETR.encode))

        def probe(params):  # the same crops of the same volumes for every model compared
            return representation_probe(lambda x: encode(params, x), job.cache, split["train"],
                                        split["val"] + split["test"], cfg.model.crop_size, p.num_partitions,
                                        seed=cfg.data.seed)

        probes = {"random_init": probe(params)}
        summaries = {}
        for stage_idx, (stage, steps) in enumerate(zip(STAGES, (p.stage1_steps, p.stage2_steps))):
            state, tx = pretrain_state(job.model, params, cfg, stage)
            ds = pretrain_dataset(job.cache, split["train"], dcfg, seed=cfg.seed * 1000 + stage_idx, shard=host_shard())
            state, summary = run_loop(
                name=f"pretrain_{stage}", workdir=job.out / stage, state=replicate(state, mesh),
                step_fn=make_pretrain_step(job.model, tx, spec, stage, job.task.multilabel),
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
            save_weights(job.out / "params.msgpack", params)
            atomic_write_text(job.out / "pretrain_summary.json", json.dumps(total, indent=1))
            plot_loss_curves({f"stage {k + 1} ({s})": {p.objective: job.out / s / "metrics.jsonl"}
                              for k, s in enumerate(summaries)}, job.out / "pretrain_loss.png",
                             title=f"pre-training loss ({p.objective}, seed {cfg.seed})",
                             chance={p.objective: summaries[STAGES[0]].get("chance_loss")})
        return params, total


def _against_chance(summary: dict, cfg: Config, stage: str) -> dict:
    """The stage's loss at chance for its objective and settings, its final loss (mean of the
    last 10 steps) as a fraction of it, and a warning when it ends within 2% of chance."""
    p = cfg.pretrain
    chance = chance_loss(p.objective, p.volumes_per_step * p.crops_per_volume, p.num_partitions, p.temperature)
    report = learning_report(summary["final_mean_loss"], chance) if summary["final_mean_loss"] is not None else {}
    if report and not report["learned"] and is_primary():
        print(f"warning: pre-training stage {stage} ({p.objective}) ended at {100 * report['loss_vs_chance']:.1f}% of "
              f"the loss at chance ({chance:.3f}); above {100 * DID_NOT_LEARN:.0f}% it did not learn", file=sys.stderr,
              flush=True)
    return {**summary, **report}


def _check_label_budget(n: int, data: Data) -> None:
    train = data[1]["train"]
    if n > len(train):
        raise UserError(f"label_budget {n} exceeds the {len(train)} labelled training cases; use 1..{len(train)} "
                        f"(0: all)")


def run_finetuning(cfg: Config, workdir: str | Path, init: str | Path | None = None,
                   out_name: str = "finetune", progress: bool = True, overwrite: bool = False,
                   data: Data | None = None, allow_unverified_weights: bool = False) -> tuple[Any, dict]:
    """Dice+CE fine-tuning from random init or ``init`` (a params.msgpack), on the first
    ``cfg.finetune.label_budget`` labelled training cases (all when 0); validation Dice every
    ``cfg.finetune.eval_every`` steps keeps the best parameters in ``best.msgpack`` (never the test
    set). Data in ``workdir``, outputs in ``workdir/out_name``. Returns (best params, summary)."""
    with sole_writer(Path(workdir) / out_name):
        job = start_job(cfg, workdir, out_name, job_settings(cfg, "finetune"), progress=progress, overwrite=overwrite,
                        data=data, weights=InputWeights("init", init or None, allow_unverified_weights),
                        check=functools.partial(_check_label_budget, cfg.finetune.label_budget))
        _write_model_card(job, cfg)
        mesh, f, val = data_mesh(), cfg.finetune, job.split["val"]
        ids = label_budget(job.split["train"], f.label_budget or None, cfg.seed)
        tx = make_optimizer(cfg.lr, cfg.weight_decay)
        state = replicate(create_state(job.params, tx), mesh)
        best, predict = BestModel(job.out), job.predictor(cfg)

        def evaluate(state, step):
            d, rgb = validation_dice(functools.partial(predict, local_copy(state.params)), job.cache, val,
                                     figure=is_primary())
            best.offer(d, step, state.params)
            return {"val_dice": d, "images": {} if rgb is None else {"validation/overlay": rgb}}

        ds = finetune_dataset(job.cache, ids, cfg.finetune_data(), seed=cfg.seed, shard=host_shard())
        state, summary = run_loop(
            name="finetune", workdir=job.out, state=state,
            step_fn=make_finetune_step(job.model, tx, job.task.multilabel),
            data_iter=make_iterator(ds, cfg.data.threads), num_steps=f.steps,
            prepare_batch=functools.partial(shard_batch, mesh=mesh),
            crops_per_step=f.volumes_per_step * f.crops_per_volume, ckpt_every=cfg.ckpt_every,
            evaluate=evaluate if val else None, eval_every=f.eval_every, progress=progress, learning_rate=cfg.lr)
        summary.update(best=best.best, label_cases=ids)
        best.finish(state.params)
        if is_primary():
            atomic_write_text(job.out / "finetune_summary.json", json.dumps(summary, indent=1))
        barrier("finetune done")
        return best.load(state.params), summary


def run_evaluation(cfg: Config, workdir: str | Path, params_path: str | Path, out_name: str = "eval",
                   split_name: str = "test", progress: bool = True, overwrite: bool = False,
                   data: Data | None = None, allow_unverified_weights: bool = False) -> dict:
    """Evaluate ``params_path`` on the held-out ``split_name`` cases of ``workdir``'s data."""
    with sole_writer(Path(workdir) / out_name):
        job = start_job(cfg, workdir, out_name, {**job_settings(cfg, "evaluate"), "split": split_name},
                        progress=progress, overwrite=overwrite, data=data,
                        weights=InputWeights("params", params_path, allow_unverified_weights))
        return evaluate_cases(functools.partial(job.predictor(cfg), job.params), job.cache, job.split[split_name],
                              job.out, progress=progress)
