"""Sliding-window inference equals MONAI's on the same predictor."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference as monai_swi

from jaxseg.inference import importance_map, sliding_window_inference, window_starts

W = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)


def predictor_np(x):  # a position-dependent, nonlinear per-window predictor
    ramp = np.linspace(0.5, 1.5, x.shape[1], dtype=np.float32)[None, :, None, None, None]
    return np.tanh(x @ W) * ramp + x.mean(axis=(1, 2, 3, 4), keepdims=True)


def predictor_jax(x):
    ramp = jnp.linspace(0.5, 1.5, x.shape[1], dtype=jnp.float32)[None, :, None, None, None]
    return jnp.tanh(x @ W) * ramp + x.mean(axis=(1, 2, 3, 4), keepdims=True)


def monai_predictor(t):  # torch NCDHW
    x = np.moveaxis(t.numpy(), 1, -1)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(predictor_np(x), -1, 1)))


@pytest.mark.parametrize("shape, roi, overlap, mode, sw", [
    ((2, 37, 30, 25, 2), (16, 16, 16), 0.25, "constant", 4),
    ((1, 40, 33, 20, 2), (16, 12, 16), 0.5, "gaussian", 3),
    ((1, 10, 20, 8, 2), (16, 16, 16), 0.25, "constant", 2),  # smaller than the ROI: padded
])
def test_matches_monai(shape, roi, overlap, mode, sw):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ref = monai_swi(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))), roi, sw, monai_predictor,
                    overlap=overlap, mode=mode)
    ref = np.moveaxis(ref.numpy(), 1, -1)
    got = np.asarray(sliding_window_inference(predictor_jax, x, roi, sw, overlap, mode))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_windows_cover_and_weights():
    starts = window_starts((37, 30, 25), (16, 16, 16), 0.25)
    cover = np.zeros((37, 30, 25), int)
    for s in starts:
        cover[s[0]:s[0] + 16, s[1]:s[1] + 16, s[2]:s[2] + 16] += 1
    assert cover.min() >= 1 and starts.min() >= 0 and (starts + 16 <= np.array([37, 30, 25])).all()
    g = importance_map((9, 9, 9), "gaussian")
    assert g.argmax() == np.ravel_multi_index((4, 4, 4), g.shape) and g.min() >= 1e-3
    with pytest.raises(ValueError, match="mode"):
        importance_map((4, 4, 4), "box")
