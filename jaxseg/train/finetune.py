"""Supervised fine-tuning with Dice + cross-entropy."""

from __future__ import annotations

import functools

from jaxseg.losses import dice_ce_loss
from jaxseg.models.unetr import UNETR
from jaxseg.train.step import dropout_rngs, make_train_step


@functools.lru_cache(maxsize=None)
def make_finetune_step(model: UNETR, tx, multilabel: bool):
    """``(state, batch with image and label) -> (state, {"loss"})``: softmax (or, for
    multi-label tasks, sigmoid) Dice + CE. One per model, optimizer and task kind in a process,
    so that every fine-tuning run of table1 reuses one compiled step."""
    mode = "sigmoid" if multilabel else "softmax"

    def loss_fn(params, batch):
        return dice_ce_loss(model.apply(params, batch["image"], **dropout_rngs(batch)), batch["label"], mode)

    return make_train_step(loss_fn, tx)
