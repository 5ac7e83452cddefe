"""Staged comparative / contrastive pre-training (stage 'encoder': enc4 features, stage
'decoder': decoder outputs; the three axes in turn at each step)."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxseg import losses as L
from jaxseg.config import Config, PretrainConfig
from jaxseg.models.unetr import UNETR, param_shapes, pretraining_stage, trainable_in_stage
from jaxseg.train.state import TrainState, create_state, make_optimizer, param_labels
from jaxseg.train.step import dropout_rngs, make_train_step


def stage_features(model: UNETR, params, images, stage: str, output: str, multilabel: bool, **apply_kw):
    """Stage 'encoder': enc4 (M, s, s, s, 8F). Stage 'decoder': class probabilities (softmax,
    or sigmoid for multi-label tasks) or raw logits. ``apply_kw``: dropout (``dropout_rngs``)."""
    if pretraining_stage(stage) == "encoder":
        return model.apply(params, images, method=UNETR.encode, **apply_kw).astype(jnp.float32)
    logits = model.apply(params, images, **apply_kw).astype(jnp.float32)
    if output == "logits":
        return logits
    return L.output_probabilities(logits, multilabel)


def axis_loss(feats, axis: int, offset_u, triplets, spec: PretrainConfig):
    """Objective ``spec.objective`` (``cfg.pretrain``) over the P partition slices of ``feats`` along ``axis``;
    ``offset_u`` (P,) uniforms in [0, 1) become offsets within partitions of this map's size;
    ``triplets`` (K, 4) are a sampled objective's (from the batch), else None."""
    size = L.partition_size(feats.shape[1 + axis], spec.num_partitions)
    offsets = jnp.minimum((offset_u * size).astype(jnp.int32), size - 1)
    slices = L.partition_slices(feats, axis, offsets)
    return L.get_objective(spec.objective)(slices, spec.temperature, triplets=triplets)


def traced_axis_loss(feats, axis, offset_u, triplets, spec: PretrainConfig):
    """``axis_loss`` for a traced ``axis`` (0, 1 or 2): ``lax.switch`` picks the slicing, so one
    graph of the model serves all three axes."""
    branches = [lambda f, o, t, a=a: axis_loss(f, a, o, t, spec) for a in range(3)]
    return jax.lax.switch(axis, branches, feats, offset_u, triplets)


class PretrainStep:
    """One pre-training step, ``(state, batch) -> (state, metrics)``, built on ONE jitted update
    whatever the axis mode. 'sequential' (the paper: three updates, one per axis in turn) calls
    the update three times with the axis as a traced argument, so the model's forward/backward
    is compiled once, not unrolled three times (3x the compile time). A ``lax.scan`` over the
    axes would also compile once, but XLA:CPU runs a UNETR step ~8x slower inside a loop."""

    def __init__(self, update, sequential: bool):
        self.update, self.sequential = update, sequential

    def compiled(self, state, batch) -> tuple["PretrainStep", float]:
        """This step compiled ahead of time for ``state`` and ``batch`` (for benchmarks), and the
        seconds that took."""
        t0 = time.perf_counter()
        args = (state, batch, jnp.int32(0)) if self.sequential else (state, batch)
        update = self.update.lower(*args).compile()
        return PretrainStep(update, self.sequential), time.perf_counter() - t0

    def __call__(self, state, batch):
        if not self.sequential:
            return self.update(state, batch)
        losses = []
        for a in range(3):
            state, m = self.update(state, batch, jnp.int32(a))
            losses.append(m["loss"])
        state = state.replace(step=state.step + 1)  # the three updates are one step
        return state, {"loss": sum(losses) / 3, **{f"loss_axis{a}": losses[a] for a in range(3)}}


@functools.lru_cache(maxsize=None)
def make_pretrain_step(model: UNETR, tx, spec: PretrainConfig, stage: str, multilabel: bool) -> PretrainStep:
    """The pre-training step for ``stage`` ('encoder': enc4 features, 'decoder': decoder
    outputs). Batches carry ``image``, ``offset_u`` (3, P) and, for a sampled objective,
    ``triplets`` (3, K, 4) (see ``jaxseg.data.pretrain_dataset``). One per model, optimizer,
    spec and stage in a process: table1's seeds reuse one compiled step."""
    sampled = spec.objective in L.SAMPLED_OBJECTIVES  # (names and modes are the config's to validate)
    stage = pretraining_stage(stage)

    def features(params, batch, *fold):
        return stage_features(model, params, batch["image"], stage, spec.stage2_output, multilabel,
                              **dropout_rngs(batch, *fold))

    def triplets(batch, axis):
        if not sampled:
            return None
        if "triplets" not in batch:
            raise ValueError(f"{spec.objective} needs the batch's 'triplets' (3, K, 4): build the pipeline with "
                             f"sampled_triplets=K (Config.pretrain_data does)")
        return batch["triplets"][axis]

    def one_axis(params, batch, axis):
        return traced_axis_loss(features(params, batch, axis), axis, batch["offset_u"][axis], triplets(batch, axis),
                                spec)

    def all_axes(params, batch):
        f = features(params, batch)
        return sum(axis_loss(f, a, batch["offset_u"][a], triplets(batch, a), spec) for a in range(3)) / 3

    if spec.axis_mode == "sequential":
        return PretrainStep(make_train_step(one_axis, tx, count_step=False), sequential=True)
    return PretrainStep(make_train_step(all_axes, tx), sequential=False)


def pretrain_state(model: UNETR, params, cfg: Config, stage: str) -> tuple[TrainState, Any]:
    """Train state and optimizer of ``stage``: AdamW on what the stage trains, the rest frozen."""
    tx = stage_optimizer(model, stage, cfg.pretrain.stage2_freeze_encoder, cfg.lr, cfg.weight_decay)
    return create_state(params, tx), tx


@functools.lru_cache(maxsize=None)
def stage_optimizer(model: UNETR, stage: str, freeze_encoder: bool, lr: float, weight_decay: float):
    """AdamW on what ``stage`` trains, the rest frozen: one object per setting (steps are cached by it)."""
    labels = param_labels(param_shapes(model), trainable_in_stage(stage, model.num_layers, freeze_encoder))
    return make_optimizer(lr, weight_decay, labels)
