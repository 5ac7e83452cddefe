"""Whole jobs, wired data -> model -> train -> evaluate: data prepared once per work dir, staged
pre-training, fine-tuning, evaluation. The entry points and table1 call these; ``jaxseg.train``
itself only trains. Every job has one skeleton: ``Job.prepare`` (refuse an output folder of other
settings, get the data, make the model, load input weights: nothing written yet), the job's own
checks, ``Job.claim`` (the output folder records the settings), then its work."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxseg.config import Config, job_settings, profile_range
from jaxseg.data import (Cache, Task, finetune_dataset, labelled_subset, load_dataset_json, make_iterator,
                         pretrain_dataset, split_cases, write_phantom_dataset)
from jaxseg.data.cache import INDEX, prepared_cache
from jaxseg.errors import UserError
from jaxseg.predict import MODEL_CARD, card_beside, check_flip_tta, model_card
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
from jaxseg.train.hooks import Convergence, Evaluate, Evaluation, Facts, KeepBest, converged
from jaxseg.train.loop import DeviceFeed, Run, run_loop
from jaxseg.train.pretrain import make_pretrain_step, pretrain_state
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
                             img_size=cfg.model.crop_size, dtype=dtype, dropout_rate=cfg.model.dropout_rate)


@dataclasses.dataclass(frozen=True)
class InputWeights:
    """A job's input weights file (or None: random init), recorded under ``setting``."""

    setting: str  # 'init' (fine-tuning) or 'params' (evaluation)
    path: str | Path | None
    allow_unverified: bool = False  # a file without a checksum loads only when the user says so


@dataclasses.dataclass(frozen=True)
class Job:
    """One job: its config, data, model and input parameters, and the output folder it writes
    (``out``), whose settings record (``settings``) ``claim`` writes."""

    cfg: Config
    root: Path  # the work dir: phantom data, split.json, the default cache root
    cache: Cache
    split: dict[str, list[str]]  # train / val / test case ids
    task: Task  # the cache's, computed once
    model: UNETR
    params: Any  # random init, or the input weights file's
    out: Path  # the output folder
    settings: dict  # what its results depend on: the job's settings, the data's digest, input files' digests

    @classmethod
    def prepare(cls, cfg: Config, workdir: str | Path, out_name: str, kind: str, *, extra: dict | None = None,
                progress: bool = True, overwrite: bool = False, data: Data | None = None,
                weights: InputWeights | None = None) -> "Job":
        """Refuse an output folder made with other settings (``job_settings(cfg, kind)`` and
        ``extra``) before any data is (re)prepared; get the data (``data``: ``ensure_data``'s
        result when the caller has it); make the model; load and verify the input ``weights``.
        Nothing is written in the output folder yet."""
        root = check_workdir(workdir)
        settings = {**job_settings(cfg, kind), **(extra or {})}
        name, path = (weights.setting, weights.path) if weights else (None, None)
        inputs = {} if name is None else {name: None if path is None else {"path": str(Path(path).absolute())}}
        precheck_output_dir(root / out_name, {**settings, **inputs}, overwrite, ignore=("data", *inputs))
        cache, split = data if data is not None else ensure_data(cfg, root, progress)
        model = make_model(cfg, cache.task)
        if path is None:
            params = models.init_params(model, cfg.seed)
        else:  # loaded into the model's shapes: no init to compile or run
            params = load_weights(path, models.param_shapes(model), weights.allow_unverified)
            inputs[name]["sha256"] = file_digest(path)
        settings = {**settings, "data": file_digest(Path(cache.root) / INDEX), **inputs}
        return cls(cfg, root, cache, split, cache.task, model, params, root / out_name, settings)

    def claim(self, overwrite: bool = False, card: bool = False) -> "Job":
        """Make ``out`` the home of these settings (resume one made with the same; refuse one made
        with others unless ``overwrite``); ``card``: write ``model.json``, what
        ``jaxseg.predict.load_model`` needs beside a trained run's weights."""
        out = check_workdir(claim_output_dir(self.out, self.settings, overwrite))
        if card and is_primary():
            atomic_write_text(out / MODEL_CARD, json.dumps(model_card(self.cfg, self.cache), indent=1))
        return dataclasses.replace(self, out=out)

    def predictor(self, tta: bool = False):
        """``predict(params, image) -> probabilities``, one compilation for every case and round;
        ``tta``: the mean over the 8 axis flips."""
        e = self.cfg.eval
        return make_predictor(self.model, self.task, self.cfg.model.crop_size, e.sw_batch_size, e.overlap, tta)

    def feed(self, dataset) -> DeviceFeed:
        """``dataset``'s batches on this job's devices (all hosts' rows as one global batch)."""
        return DeviceFeed(make_iterator(dataset, self.cfg.data.threads),
                          functools.partial(shard_batch, mesh=data_mesh()))


def check_label_budget(n: int, train_ids: list[str]) -> None:
    """A label budget the training split can meet (0: all)."""
    if n > len(train_ids):
        raise UserError(f"label_budget {n} exceeds the {len(train_ids)} labelled training cases; use "
                        f"1..{len(train_ids)} (0: all)")


def run_pretraining(cfg: Config, workdir: str | Path, out_name: str = "pretrain",
                    progress: bool = True, overwrite: bool = False, data: Data | None = None) -> tuple[Any, dict]:
    """Stage 1 'encoder' (enc4 features) then stage 2 'decoder' (decoder outputs), each until
    convergence or its step limit, resuming if a run was interrupted. Data and cache live in
    ``workdir``; outputs in ``workdir/out_name``: ``params.msgpack``, per-stage metrics and
    summaries, ``pretrain_loss.png``, and in the summary a linear probe of the enc4 features at
    random init and after each stage (``jaxseg.probe``). Returns (params, summary)."""
    with sole_writer(Path(workdir) / out_name):
        job = Job.prepare(cfg, workdir, out_name, "pretrain", progress=progress, overwrite=overwrite,
                          data=data).claim(overwrite, card=True)
        p, params, mesh = cfg.pretrain, job.params, data_mesh()
        encode = jax.jit(functools.partial(job.model.apply, method=UNETR.encode))

        def probe(params):  # the same crops of the same volumes for every model compared
            return representation_probe(lambda x: encode(params, x), job.cache, job.split["train"],
                                        job.split["val"] + job.split["test"], cfg.model.crop_size, p.num_partitions,
                                        seed=cfg.data.seed)

        probes = {"random_init": probe(params)}
        summaries = {}
        for stage_idx, (stage, steps) in enumerate(zip(STAGES, (p.stage1_steps, p.stage2_steps))):
            state, tx = pretrain_state(job.model, params, cfg, stage)
            state = replicate(state, mesh)  # not kept unreplicated beside it for the whole stage
            ds = pretrain_dataset(job.cache, job.split["train"], cfg, seed=cfg.seed * 1000 + stage_idx,
                                  shard=host_shard())
            run = Run(f"pretrain_{stage}", job.out / stage, steps, cfg.ckpt_every,
                      p.volumes_per_step * p.crops_per_volume, progress, cfg.lr, profile_range(cfg.profile_steps))
            rule = functools.partial(converged, window=p.convergence_window, rtol=p.convergence_rtol)
            state, summary = run_loop(run, state,
                                      make_pretrain_step(job.model, tx, p, stage, job.task.multilabel),
                                      job.feed(ds), [Convergence(rule, p.min_steps)])
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
        barrier("pretrain done")  # params.msgpack is on disk before any process reads it (table1's --init)
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


def run_finetuning(cfg: Config, workdir: str | Path, init: str | Path | None = None,
                   out_name: str = "finetune", progress: bool = True, overwrite: bool = False,
                   data: Data | None = None, allow_unverified_weights: bool = False) -> tuple[Any, dict]:
    """Dice+CE fine-tuning from random init or ``init`` (a params.msgpack), on the first
    ``cfg.finetune.label_budget`` labelled training cases (all when 0); validation Dice every
    ``cfg.finetune.eval_every`` steps keeps the best parameters in ``best.msgpack`` (never the test
    set), and with ``cfg.finetune.patience`` stops once that many evaluations bring no better
    one. Data in ``workdir``, outputs in ``workdir/out_name``. Returns (best params, summary)."""
    with sole_writer(Path(workdir) / out_name):
        job = Job.prepare(cfg, workdir, out_name, "finetune", progress=progress, overwrite=overwrite, data=data,
                          weights=InputWeights("init", init or None, allow_unverified_weights))
        check_label_budget(cfg.finetune.label_budget, job.split["train"])
        job = job.claim(overwrite, card=True)
        f, val = cfg.finetune, job.split["val"]
        ids = labelled_subset(job.split["train"], f.label_budget or None, cfg.seed)
        tx = make_optimizer(cfg.lr, cfg.weight_decay)
        best, predict = BestModel(job.out), job.predictor()

        def evaluate(state, step) -> Evaluation:
            d, rgb = validation_dice(functools.partial(predict, local_copy(state.params)), job.cache, val,
                                     figure=is_primary())
            return Evaluation({"val_dice": d}, {} if rgb is None else {"validation/overlay": rgb})

        hooks = [*([Evaluate(evaluate, f.eval_every, f.steps)] if val else []),
                 KeepBest(best, "val_dice", f.patience, f.eval_every), Facts(label_cases=ids)]
        ds = finetune_dataset(job.cache, ids, cfg, seed=cfg.seed, shard=host_shard())
        run = Run("finetune", job.out, f.steps, cfg.ckpt_every, f.volumes_per_step * f.crops_per_volume, progress,
                  cfg.lr, profile_range(cfg.profile_steps))
        state, summary = run_loop(run, replicate(create_state(job.params, tx), data_mesh()),
                                  make_finetune_step(job.model, tx, job.task.multilabel), job.feed(ds), hooks)
        best.finish(state.params)
        barrier("finetune done")  # best.msgpack is on disk before any process reads it
        return best.load(state.params), summary


def run_evaluation(cfg: Config, workdir: str | Path, params_path: str | Path, out_name: str = "eval",
                   split_name: str = "test", progress: bool = True, overwrite: bool = False,
                   data: Data | None = None, allow_unverified_weights: bool = False) -> dict:
    """Evaluate ``params_path`` on the held-out ``split_name`` cases of ``workdir``'s data."""
    with sole_writer(Path(workdir) / out_name):
        job = Job.prepare(cfg, workdir, out_name, "evaluate", extra={"split": split_name}, progress=progress,
                          overwrite=overwrite, data=data,
                          weights=InputWeights("params", params_path, allow_unverified_weights))
        if cfg.eval.tta:  # what the model was fine-tuned with: its card, else this config
            check_flip_tta((card_beside(params_path) or {}).get("train_flip_prob", cfg.finetune.flip_prob))
        job = job.claim(overwrite)
        return evaluate_cases(functools.partial(job.predictor(cfg.eval.tta), job.params), job.cache,
                              job.split[split_name], job.out, progress=progress)
