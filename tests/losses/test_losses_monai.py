"""Dice+CE parity with monai.losses."""

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from jaxseg.losses import dice_ce_loss, dice_loss

RNG = np.random.default_rng(1)


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


@pytest.mark.parametrize("include_background", [True, False])
def test_softmax_dice_ce_equals_monai(include_background):
    logits = RNG.standard_normal((2, 8, 6, 5, 3)).astype(np.float32)
    labels = RNG.integers(0, 3, (2, 8, 6, 5))
    ref = DiceCELoss(to_onehot_y=True, softmax=True, include_background=include_background)(
        _t(logits), torch.from_numpy(labels[:, None]))
    got = dice_ce_loss(logits, labels, "softmax", include_background)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)


def test_sigmoid_multilabel_equals_monai_dice_plus_bce():
    logits = RNG.standard_normal((2, 8, 6, 5, 3)).astype(np.float32)
    target = (RNG.random((2, 8, 6, 5, 3)) > 0.6).astype(np.float32)
    ref = DiceLoss(sigmoid=True)(_t(logits), _t(target)) + torch.nn.BCEWithLogitsLoss()(_t(logits), _t(target))
    np.testing.assert_allclose(float(dice_ce_loss(logits, target, "sigmoid")), float(ref), rtol=1e-5)
    # One channel: MONAI's own DiceCELoss(sigmoid=True) uses exactly this (Dice + BCE).
    ref1 = DiceCELoss(sigmoid=True)(_t(logits[..., :1]), _t(target[..., :1]))
    np.testing.assert_allclose(float(dice_ce_loss(logits[..., :1], target[..., :1], "sigmoid")), float(ref1), rtol=1e-5)
    np.testing.assert_allclose(float(dice_loss(logits, target, "sigmoid")),
                               float(DiceLoss(sigmoid=True)(_t(logits), _t(target))), rtol=1e-5)
