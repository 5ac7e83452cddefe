"""Sliding-window inference for channels-last volumes (MONAI's ``sliding_window_inference``).

The predictor runs on fixed-shape window batches (the last batch is padded, so a jitted
predictor never retraces); weighted predictions are accumulated on the device by a small jitted update whose
only shape dependence is the image size.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    out = []
    for n, r in zip(image_size, roi_size):
        out.append(int(r) if r == n else max(int(r * (1 - overlap)), 1))
    return tuple(out)


def window_starts(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> np.ndarray:
    """Window start corners, (num_windows, 3), in MONAI's order (last axis fastest)."""
    interval = scan_interval(image_size, roi_size, overlap)
    per_dim = []
    for n, r, s in zip(image_size, roi_size, interval):
        num = next(d for d in range(int(math.ceil(n / s)) + 1) if d * s + r >= n) + 1
        per_dim.append([i * s - max(i * s + r - n, 0) for i in range(num)])
    grid = np.meshgrid(*per_dim, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1)


def importance_map(roi_size: Sequence[int], mode: str = "constant", sigma_scale: float = 0.125) -> np.ndarray:
    """Window weights: ones ('constant') or a separable Gaussian with sigma = sigma_scale * size,
    clamped below at max(min, 1e-3) as MONAI does ('gaussian')."""
    if mode == "constant":
        return np.ones(tuple(roi_size), np.float32)
    if mode != "gaussian":
        raise ValueError(f"mode must be 'constant' or 'gaussian', got {mode!r}")
    w = np.ones((), np.float32)
    for r in roi_size:
        x = np.arange(-(r - 1) / 2.0, (r - 1) / 2.0 + 1, dtype=np.float32)
        g = np.exp(x**2 / (-2 * (r * sigma_scale) ** 2)).astype(np.float32)
        w = w[..., None] * g
    return np.maximum(w, max(float(w.min()), 1e-3)).astype(np.float32)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _accumulate(out, count, preds, weight, starts, valid):
    def body(i, carry):
        o, c = carry
        s = starts[i]
        p = preds[i].astype(jnp.float32) * weight[..., None] * valid[i]
        o = jax.lax.dynamic_update_slice(o, jax.lax.dynamic_slice(o, (*s, 0), p.shape) + p, (*s, 0))
        w = weight * valid[i]
        c = jax.lax.dynamic_update_slice(c, jax.lax.dynamic_slice(c, tuple(s), w.shape) + w, tuple(s))
        return o, c

    return jax.lax.fori_loop(0, preds.shape[0], body, (out, count))


def sliding_window_inference(predict_fn: Callable[[jax.Array], jax.Array], image, roi_size: Sequence[int] | int,
                             sw_batch_size: int = 4, overlap: float = 0.25, mode: str = "constant",
                             sigma_scale: float = 0.125) -> jax.Array:
    """Predict a whole volume from overlapping windows.

    image: ``(B, D, H, W, C)``; predict_fn maps ``(sw_batch_size, *roi_size, C)`` to
    ``(sw_batch_size, *roi_size, K)`` and is called as given: pass a jitted function (e.g.
    ``lambda w: jitted_apply(params, w)``); the window batch shape is fixed, so it compiles once.
    Images smaller than the ROI are zero-padded symmetrically and the result cropped back.
    Returns float32 ``(B, D, H, W, K)``.
    """
    image = np.asarray(image)
    if image.ndim != 5:
        raise ValueError(f"expected (B, D, H, W, C), got shape {image.shape}")
    roi = (roi_size,) * 3 if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
    size = image.shape[1:4]
    pad = [(max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for r, n in zip(roi, size)]
    padded = np.pad(image, [(0, 0), *pad, (0, 0)])
    psize = padded.shape[1:4]
    starts = window_starts(psize, roi, overlap)
    n_win = len(starts)
    n_batches = -(-n_win // sw_batch_size)
    total = n_batches * sw_batch_size
    starts_padded = np.concatenate([starts, np.repeat(starts[-1:], total - n_win, 0)])
    valid = (np.arange(total) < n_win).astype(np.float32)
    weight = jnp.asarray(importance_map(roi, mode, sigma_scale))
    outs = []
    for b in range(padded.shape[0]):
        out = count = None
        for k in range(n_batches):
            sl = starts_padded[k * sw_batch_size:(k + 1) * sw_batch_size]
            windows = np.stack([padded[b, s[0]:s[0] + roi[0], s[1]:s[1] + roi[1], s[2]:s[2] + roi[2]] for s in sl])
            preds = predict_fn(jnp.asarray(windows))
            if out is None:
                out = jnp.zeros((*psize, preds.shape[-1]), jnp.float32)
                count = jnp.zeros(psize, jnp.float32)
            out, count = _accumulate(out, count, preds, weight, jnp.asarray(sl, jnp.int32),
                                     jnp.asarray(valid[k * sw_batch_size:(k + 1) * sw_batch_size]))
        res = out / count[..., None]
        outs.append(res[pad[0][0]:pad[0][0] + size[0], pad[1][0]:pad[1][0] + size[1], pad[2][0]:pad[2][0] + size[2]])
    return jnp.stack(outs)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
    return jax.jit(model.apply)  # one compilation per model and process: every job's predictor shares it


_FLIPS = ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))


def make_predictor(model, task, roi: int, sw_batch_size: int = 4, overlap: float = 0.25, flip_tta: bool = False
                   ) -> Callable[[Any, np.ndarray], np.ndarray]:
    """``predict(params, image (X, Y, Z, C)) -> probabilities (X, Y, Z, K)`` (a float32 device
    array: ``task.segment`` decides there and brings back uint8; ``np.asarray`` for the
    probabilities themselves), the one way jaxseg predicts a volume:
    validation during fine-tuning, evaluation and ``experiments.predict``. Made once per job:
    the jitted ``model.apply`` takes params as an argument, so every case and every validation
    round reuses one compilation. ``flip_tta``: the mean over the 8 flips of the three axes (for
    a model trained to be flip-invariant: see ``jaxseg.predict.check_flip_tta``)."""
    apply = _jitted_apply(model)

    def probs(params, image):
        logits = sliding_window_inference(lambda w: apply(params, w), image[None], roi, sw_batch_size, overlap)[0]
        return task.probabilities(logits)

    def predict(params, image):
        if not flip_tta:
            return probs(params, image)
        acc = 0.0
        for axes in _FLIPS:
            p = probs(params, np.flip(image, axes) if axes else image)
            acc = acc + (jnp.flip(p, axes) if axes else p)
        return acc / len(_FLIPS)

    return predict
