"""Supervised fine-tuning with Dice + cross-entropy, and validation by sliding-window Dice."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.inference import sliding_window_inference
from jaxseg.losses import dice_ce_loss
from jaxseg.models.unetr import UNETR
from jaxseg.train.state import TrainState


def make_finetune_step(model: UNETR, tx, multilabel: bool):
    mode = "sigmoid" if multilabel else "softmax"

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, batch):
        def loss_fn(params):
            return dice_ce_loss(model.apply(params, batch["image"]), batch["label"], mode)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), {"loss": loss}

    return step


def predict_volume(apply_fn, params, image: np.ndarray, roi: int, sw_batch_size: int = 4,
                   overlap: float = 0.25, multilabel: bool = False) -> np.ndarray:
    """Segmentation of one cached volume (X, Y, Z, C): integer labels (softmax) or a multi-hot
    (X, Y, Z, K) stack (sigmoid > 0.5). ``apply_fn`` is ``jax.jit(model.apply)``, made once per
    job: params are an argument, so every case and every validation round reuses one compilation
    (closing over params would embed them as constants and recompile for each call)."""
    logits = sliding_window_inference(lambda w: apply_fn(params, w), image[None], roi, sw_batch_size, overlap)[0]
    if multilabel:
        return np.asarray(jax.nn.sigmoid(logits) > 0.5).astype(np.uint8)
    return np.asarray(jnp.argmax(logits, -1)).astype(np.uint8)


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int, multilabel: bool) -> list[float]:
    """Foreground Dice per class (NaN where the truth is empty)."""
    out = []
    for k in range(num_classes) if multilabel else range(1, num_classes):
        p, t = (pred[..., k], truth[..., k]) if multilabel else (pred == k, truth == k)
        p, t = p.astype(bool), t.astype(bool)
        denom = p.sum() + t.sum()
        out.append(float(2 * (p & t).sum() / denom) if t.any() else float("nan"))
    return out
