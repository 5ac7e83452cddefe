"""Staged comparative / contrastive pre-training (stage 1: enc4 features, stage 2: decoder
outputs; the three axes in turn at each step)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

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


def traced_axis_loss(feats, axis, offset_u, triplets, cfg: Config):
    """``axis_loss`` for a traced ``axis`` (0, 1 or 2): ``lax.switch`` picks the slicing, so one
    graph of the model serves all three axes."""
    branches = [lambda f, o, t, a=a: axis_loss(f, a, o, t, cfg) for a in range(3)]
    return jax.lax.switch(axis, branches, feats, offset_u, triplets)


class PretrainStep:
    """One pre-training step, ``(state, batch) -> (state, metrics)``, built on ONE jitted update
    whatever the axis mode. 'sequential' (the paper: three updates, one per axis in turn) calls
    the update three times with the axis as a traced argument, so the model's forward/backward
    is compiled once, not unrolled three times (3x the compile time). A ``lax.scan`` over the
    axes would also compile once, but XLA:CPU runs a UNETR step ~8x slower inside a loop."""

    def __init__(self, update, sequential: bool):
        self.update, self.sequential = update, sequential

    def compile(self, state, batch) -> float:
        """Compile ahead of time (for benchmarks); returns the seconds it took."""
        import time

        t0 = time.perf_counter()
        args = (state, batch, jnp.int32(0)) if self.sequential else (state, batch)
        self.update = self.update.lower(*args).compile()
        return time.perf_counter() - t0

    def __call__(self, state, batch):
        if not self.sequential:
            state, loss = self.update(state, batch)
            return state, {"loss": loss}
        losses = []
        for a in range(3):
            state, loss = self.update(state, batch, jnp.int32(a))
            losses.append(loss)
        return state, {"loss": sum(losses) / 3, **{f"loss_axis{a}": losses[a] for a in range(3)}}


def make_pretrain_step(model: UNETR, tx, cfg: Config, stage: str, multilabel: bool) -> PretrainStep:
    """The pre-training step for ``stage`` ('feat': enc4 features, 'recon': decoder outputs)."""
    if cfg.objective not in OBJECTIVE_NAMES:
        raise ValueError(f"unknown objective {cfg.objective!r}; choose from {OBJECTIVE_NAMES}")
    if cfg.axis_mode not in ("sequential", "joint"):
        raise ValueError(f"axis_mode must be 'sequential' or 'joint', got {cfg.axis_mode!r}")

    def features(params, batch):
        return stage_features(model, params, batch["image"], stage, cfg.stage2_output, multilabel)

    def triplets(batch, a):
        tri = batch.get("triplets")
        return None if tri is None else tri[a]

    def apply_grads(state: TrainState, loss_fn, done):
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + done, params=params, opt_state=opt_state), loss

    @functools.partial(jax.jit, donate_argnums=0)
    def axis_update(state: TrainState, batch, axis):
        def loss_fn(params):
            return traced_axis_loss(features(params, batch), axis, batch["offset_u"][axis], triplets(batch, axis), cfg)

        return apply_grads(state, loss_fn, (axis == 2).astype(state.step.dtype))  # a step ends with its last axis

    @functools.partial(jax.jit, donate_argnums=0)
    def joint_update(state: TrainState, batch):
        def loss_fn(params):
            f = features(params, batch)
            return sum(axis_loss(f, a, batch["offset_u"][a], triplets(batch, a), cfg) for a in range(3)) / 3

        return apply_grads(state, loss_fn, 1)

    sequential = cfg.axis_mode == "sequential"
    return PretrainStep(axis_update if sequential else joint_update, sequential)


def pretrain_state(model: UNETR, params, cfg: Config, stage: str) -> tuple[TrainState, Any]:
    labels = param_labels(params, stage_trainable(stage, model.num_layers, cfg.stage2_freeze_encoder))
    tx = make_optimizer(cfg.lr, cfg.weight_decay, labels)
    return create_state(params, tx), tx
