"""Dice and Dice + cross-entropy for channels-last logits, following MONAI's definitions.

logits: ``(B, D, H, W, K)``. target: integer labels ``(B, D, H, W)`` (softmax mode: one-hot
encoded here, like MONAI's ``to_onehot_y``) or one-hot / multi-hot ``(B, D, H, W, K)``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp


def _concrete(x) -> bool:
    """True outside ``jit`` (values can be checked), False for a tracer."""
    return not isinstance(x, jax.core.Tracer)


def output_probabilities(logits, multilabel: bool) -> jax.Array:
    """A segmentation model's logits (..., K) as probabilities: a sigmoid per (overlapping)
    region for multi-label tasks, else a softmax over classes."""
    return jax.nn.sigmoid(logits) if multilabel else jax.nn.softmax(logits, -1)


def _probs_and_onehot(logits, target, mode):
    if mode not in ("softmax", "sigmoid"):
        raise ValueError(f"mode must be 'softmax' or 'sigmoid', got {mode!r}")
    logits = logits.astype(jnp.float32)
    k = logits.shape[-1]
    if mode == "softmax" and k == 1:
        raise ValueError("logits have one channel: a softmax over it is constant (the loss would not "
                         "train); use mode='sigmoid' or two output channels")
    if target.ndim == logits.ndim - 1:
        if mode == "sigmoid":
            raise ValueError("sigmoid mode needs multi-hot targets (B, D, H, W, K), got integer labels")
        if _concrete(target) and target.size and (int(jnp.min(target)) < 0 or int(jnp.max(target)) >= k):
            raise ValueError(f"target labels must lie in [0, {k - 1}] for {k} output channels, got values in "
                             f"[{int(jnp.min(target))}, {int(jnp.max(target))}]")
        out_of_range = jnp.any((target < 0) | (target >= k))  # under jit: poisons the loss (see dice_ce_loss)
        target = jax.nn.one_hot(target, k, dtype=jnp.float32)
    else:
        out_of_range = jnp.bool_(False)
    if target.shape != logits.shape:
        raise ValueError(f"target shape {target.shape} matches neither labels {logits.shape[:-1]} nor logits {logits.shape}")
    return logits, output_probabilities(logits, mode == "sigmoid"), target.astype(jnp.float32), out_of_range


def dice_loss(logits, target, mode: str = "softmax", include_background: bool = True,
              smooth_nr: float = 1e-5, smooth_dr: float = 1e-5) -> jax.Array:
    """MONAI ``DiceLoss``: ``1 - (2 |P.T| + smooth_nr) / (|P| + |T| + smooth_dr)`` per sample and
    class over space, averaged over samples and classes. ``include_background=False`` drops
    channel 0 (for softmax label maps)."""
    _, probs, onehot, bad = _probs_and_onehot(logits, target, mode)
    return jnp.where(bad, jnp.nan, _dice(probs, onehot, include_background, smooth_nr, smooth_dr))


def _dice(probs, onehot, include_background, smooth_nr, smooth_dr):
    if not include_background and probs.shape[-1] == 1:
        warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)  # as MONAI
    if not include_background and probs.shape[-1] > 1:
        probs, onehot = probs[..., 1:], onehot[..., 1:]
    axes = tuple(range(1, probs.ndim - 1))
    inter = jnp.sum(probs * onehot, axes)
    denom = jnp.sum(probs, axes) + jnp.sum(onehot, axes)
    return jnp.mean(1.0 - (2.0 * inter + smooth_nr) / (denom + smooth_dr))


def dice_ce_loss(logits, target, mode: str = "softmax", include_background: bool = True,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, lambda_dice: float = 1.0,
                 lambda_ce: float = 1.0) -> jax.Array:
    """``lambda_dice * Dice + lambda_ce * CE``.

    softmax: softmax Dice and categorical cross-entropy (MONAI ``DiceCELoss(to_onehot_y=True,
    softmax=True)``). sigmoid: per-channel sigmoid Dice and binary cross-entropy with logits,
    mean over voxels and channels: the multi-label loss for overlapping classes (BraTS TC/WT/ET).
    MONAI's ``DiceCELoss(sigmoid=True)`` uses BCE only for one channel and applies softmax
    cross-entropy to multi-hot targets otherwise; ours equals ``DiceLoss(sigmoid=True)`` +
    ``BCEWithLogitsLoss``. The CE term always includes every channel, as in MONAI.

    Integer labels outside [0, K-1] are refused with ``ValueError`` when the values can be seen
    (outside ``jit``); under ``jit`` the loss is NaN instead of a silently wrong number (no host
    check per step), which the training loop stops on."""
    logits, probs, onehot, bad = _probs_and_onehot(logits, target, mode)
    dice = _dice(probs, onehot, include_background, smooth_nr, smooth_dr)
    if mode == "softmax":
        ce = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits, -1), -1))
    else:
        ce = jnp.mean(jnp.maximum(logits, 0) - logits * onehot + jax.nn.softplus(-jnp.abs(logits)))
    return jnp.where(bad, jnp.nan, lambda_dice * dice + lambda_ce * ce)
