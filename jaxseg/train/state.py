"""Train state and AdamW with truly frozen parameters (which ones: the model declares them,
see ``jaxseg.models.unetr.trainable_in_stage``)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any


def param_labels(params: Any, trainable: Callable[[tuple[str, ...]], bool]) -> Any:
    """'train' / 'frozen' for every leaf, from a predicate on its path of module names."""
    def label(path, _):
        names = tuple(getattr(k, "key", str(k)) for k in path)
        return "train" if trainable(names) else "frozen"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(lr: float = 1e-4, weight_decay: float = 1e-5, labels: Any = None) -> optax.GradientTransformation:
    """AdamW; with ``labels``, leaves labelled 'frozen' get ``set_to_zero`` updates, so neither
    momentum nor weight decay moves them (the authors' frozen weights drifted under AdamW)."""
    adamw = _adamw(lr, weight_decay)
    if labels is None:
        return adamw
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


@functools.lru_cache(maxsize=None)
def _adamw(lr: float, weight_decay: float) -> optax.GradientTransformation:
    # One object per setting: train steps built on it are cached by it (one compilation per process).
    return optax.adamw(lr, weight_decay=weight_decay)


def create_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    # tx.init jitted: run op by op it dispatches (and compiles) two zeros per leaf, ~1.7 s of a tiny job on CPU
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params))
