"""One training-step builder for every job: gradients of a loss, an optax update, a jitted step."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import optax

from jaxseg.train.state import TrainState


def make_train_step(loss_fn: Callable[..., jax.Array], tx: optax.GradientTransformation, *,
                    count_step: bool = True) -> Callable[..., tuple[TrainState, dict]]:
    """``step(state, batch, *args) -> (state, {"loss": loss})``: one ``tx`` update along the
    gradient of ``loss_fn(params, batch, *args)``, jitted, with ``state`` donated. ``count_step``
    False leaves ``state.step`` alone (for a step made of several updates, which counts itself)."""

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, batch: Any, *args):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, *args)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + int(count_step), params=params, opt_state=opt_state), {"loss": loss}

    return step


def dropout_rngs(batch: dict, *fold: Any) -> dict:
    """``model.apply`` arguments for a training step: dropout on, keyed by the batch's ``rng``
    (seed, step) and ``fold`` (an axis), when the pipeline sent one (a model with dropout);
    else nothing (deterministic)."""
    if "rng" not in batch:
        return {}
    key = jax.random.key(0)
    for v in (batch["rng"][0], batch["rng"][1], *fold):
        key = jax.random.fold_in(key, v)
    return {"rngs": {"dropout": key}, "deterministic": False}
