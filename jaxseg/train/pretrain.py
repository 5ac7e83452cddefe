"""Staged comparative / contrastive pre-training (stage 1: enc4 features, stage 2: decoder
outputs; the three axes in turn at each step)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxseg import losses as L
from jaxseg.config import Config
from jaxseg.models.unetr import UNETR
from jaxseg.train.state import TrainState, create_state, make_optimizer, param_labels, stage_trainable

OBJECTIVE_NAMES = (*L.OBJECTIVES, "comparative_sampled")


def stage_features(model: UNETR, params, images, stage: str, output: str, multilabel: bool):
    """Stage 'feat': enc4 (M, s, s, s, 8F). Stage 'recon': class probabilities (softmax, or
    sigmoid for multi-label tasks) or raw logits."""
    if stage == "feat":
        return model.apply(params, images, method=UNETR.encode).astype(jnp.float32)
    logits = model.apply(params, images).astype(jnp.float32)
    if output == "logits":
        return logits
    return jax.nn.sigmoid(logits) if multilabel else jax.nn.softmax(logits, -1)


def axis_loss(feats, axis: int, offset_u, triplets, cfg: Config):
    """Objective over the P partition slices of ``feats`` along ``axis``; ``offset_u`` (P,)
    uniforms in [0, 1) become offsets within partitions of this map's size."""
    size = L.partition_size(feats.shape[1 + axis], cfg.num_partitions)
    offsets = jnp.minimum((offset_u * size).astype(jnp.int32), size - 1)
    slices = L.partition_slices(feats, axis, offsets)
    if cfg.objective == "comparative_sampled":
        return L.comparative_sampled(slices, triplets, cfg.temperature)
    return L.OBJECTIVES[cfg.objective](slices, cfg.temperature)


def make_pretrain_step(model: UNETR, tx, cfg: Config, stage: str, multilabel: bool):
    if cfg.objective not in OBJECTIVE_NAMES:
        raise ValueError(f"unknown objective {cfg.objective!r}; choose from {OBJECTIVE_NAMES}")

    def loss_fn(params, batch, axes):
        f = stage_features(model, params, batch["image"], stage, cfg.stage2_output, multilabel)
        tri = batch.get("triplets")
        losses = [axis_loss(f, a, batch["offset_u"][a], None if tri is None else tri[a], cfg) for a in axes]
        return sum(losses) / len(losses)

    def update(state: TrainState, batch, axes):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, axes)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
        return state.replace(params=params, opt_state=opt_state), loss

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, batch):
        if cfg.axis_mode == "joint":
            state, loss = update(state, batch, (0, 1, 2))
            axis_losses = [loss]
        elif cfg.axis_mode == "sequential":
            axis_losses = []
            for a in (0, 1, 2):  # p_1, p_2, p_3 in turn at each step (the paper)
                state, la = update(state, batch, (a,))
                axis_losses.append(la)
        else:
            raise ValueError(f"axis_mode must be 'sequential' or 'joint', got {cfg.axis_mode!r}")
        metrics = {"loss": sum(axis_losses) / len(axis_losses)}
        if len(axis_losses) == 3:
            metrics.update({f"loss_axis{a}": axis_losses[a] for a in range(3)})
        return state.replace(step=state.step + 1), metrics

    return step


def pretrain_state(model: UNETR, params, cfg: Config, stage: str) -> tuple[TrainState, Any]:
    labels = param_labels(params, stage_trainable(stage, model.num_layers, cfg.stage2_freeze_encoder))
    tx = make_optimizer(cfg.lr, cfg.weight_decay, labels)
    return create_state(params, tx), tx
