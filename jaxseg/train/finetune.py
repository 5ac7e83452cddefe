"""Supervised fine-tuning with Dice + cross-entropy."""

from __future__ import annotations

from jaxseg.losses import dice_ce_loss
from jaxseg.models.unetr import UNETR
from jaxseg.train.step import make_train_step


def make_finetune_step(model: UNETR, tx, multilabel: bool):
    """``(state, batch with image and label) -> (state, {"loss"})``: softmax (or, for
    multi-label tasks, sigmoid) Dice + CE."""
    mode = "sigmoid" if multilabel else "softmax"

    def loss_fn(params, batch):
        return dice_ce_loss(model.apply(params, batch["image"]), batch["label"], mode)

    return make_train_step(loss_fn, tx)
