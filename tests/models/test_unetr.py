"""UNETR shapes, errors, jit, bfloat16, features (no reference package needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.models import UNETR, count_params, init_params, skip_layers, unetr_from_preset
from jaxseg.models.layers import conv3d, upsample2x

TINY = dict(in_channels=1, out_channels=2, img_size=32, feature_size=4, hidden_size=32,
            mlp_dim=64, num_heads=4, num_layers=2)


@pytest.fixture(scope="module")
def tiny():
    model = UNETR(**TINY)
    return model, init_params(model)  # jitted: eager init/apply run op by op and take a minute on CPU


def test_skip_layers_spread():
    assert skip_layers(12) == (3, 6, 9)
    assert skip_layers(4) == (1, 2, 3)
    assert skip_layers(2) == (0, 1, 1)
    with pytest.raises(ValueError):
        skip_layers(0)


def test_output_and_feature_shapes(tiny):
    model, params = tiny
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 32, 1))
    logits, feats = jax.jit(lambda p, x: model.apply(p, x, return_features=True))(params, x)
    assert logits.shape == (2, 32, 32, 32, 2)
    assert feats["enc4"].shape == (2, 4, 4, 4, 32)  # 8 * feature_size at img/8
    assert len(feats["hidden_states"]) == 2 and feats["hidden_states"][0].shape == (2, 8, 32)
    enc4 = jax.jit(lambda p, x: model.apply(p, x, method=UNETR.encode))(params, x)
    np.testing.assert_allclose(enc4, feats["enc4"], rtol=1e-5, atol=1e-5)


def test_anisotropic_img_size_and_jit():
    model = UNETR(**{**TINY, "img_size": (32, 16, 48), "in_channels": 4, "out_channels": 3})
    x = jnp.ones((1, 32, 16, 48, 4))
    params = init_params(model)
    out = jax.jit(model.apply)(params, x)
    # its numbers on an anisotropic grid against MONAI's: test_monai_parity (32 x 16 x 32); an op-by-op
    # comparison here cost 16 s of dispatching (29.3 -> 13.2 s without it, 2026-12-03)
    assert out.shape == (1, 32, 16, 48, 3) and bool(jnp.isfinite(out).all())


def test_bfloat16_compute_keeps_float32_params(tiny):
    model, params = tiny
    bf = UNETR(**TINY, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (1, 32, 32, 32, 1))
    out_bf = jax.jit(bf.apply)(params, x)
    out_f32 = jax.jit(model.apply)(params, x)
    assert out_bf.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    err = jnp.abs(out_bf.astype(jnp.float32) - out_f32).max() / jnp.abs(out_f32).max()
    assert float(err) < 0.1
    # bfloat16 gradients: tests/train/test_steps.py's bfloat16 training step (the same update as float32's)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(img_size=40), "divisible by patch_size"),
        (dict(hidden_size=30), "divisible by num_heads"),
        (dict(proj_type="linear"), "proj_type"),
    ],
)
def test_bad_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNETR(**{**TINY, **kwargs})


def test_wrong_input_shape_names_expected(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 32, 1\)"):
        model.apply(params, jnp.zeros((1, 32, 32, 32, 2)))
    with pytest.raises(ValueError, match="channels-last"):
        model.apply(params, jnp.zeros((1, 1, 32, 32, 32)))


def test_presets_and_full_param_count():
    assert count_params(init_params(unetr_from_preset("tiny", in_channels=1, out_channels=2, img_size=32))) > 0
    full = unetr_from_preset("paper", in_channels=1, out_channels=2, img_size=96)
    shapes = jax.eval_shape(full.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 96, 96, 96, 1), jnp.float32))
    # MONAI reports 92,802,274, of which 18,432 are never-used norm_cross_attn LayerNorms.
    assert count_params(shapes) == 92_783_842
    with pytest.raises(ValueError, match="unknown UNETR size"):
        unetr_from_preset("huge")


@pytest.mark.parametrize("impl", ["xla", "taps2d"])
def test_conv3d_impls_agree_with_direct_sum(impl):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 4, 6, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 3, 2)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    ref = np.zeros((1, 5, 4, 6, 2), np.float32)
    for d in range(5):
        for h in range(4):
            for ww in range(6):
                ref[0, d, h, ww] = np.einsum("abci,abcio->o", xp[0, d:d + 3, h:h + 3, ww:ww + 3], w)
    np.testing.assert_allclose(conv3d(jnp.asarray(x), jnp.asarray(w), impl), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown conv impl"):
        conv3d(jnp.asarray(x), jnp.asarray(w), "fft")


@pytest.mark.parametrize("ksize", [(3, 3, 3), (1, 3, 5), (2, 2, 2), (4, 3, 2)])
def test_taps2d_matches_xla_conv_and_its_gradients_for_any_kernel(ksize):
    """'SAME' as XLA pads it (an even kernel: one more after than before) in depth too, where
    taps2d pads by hand; forward and both gradients within 1e-4 (relative, float32)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 7, 6, 5, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*ksize, 3, 4)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 7, 6, 5, 4)), jnp.float32)

    def out_and_grads(impl):
        y, vjp = jax.vjp(lambda x, w: conv3d(x, w, impl), x, w)
        return (y, *vjp(g))

    for a, b in zip(*(jax.jit(out_and_grads, static_argnums=0)(impl) for impl in ("taps2d", "xla"))):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) <= 1e-4, ksize


def test_upsample2x_places_each_tap():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 3, 1, 4)).astype(np.float32)
    w = rng.standard_normal((4, 2, 2, 2, 5)).astype(np.float32)
    y = np.asarray(upsample2x(jnp.asarray(x), jnp.asarray(w)))
    assert y.shape == (2, 4, 6, 2, 5)
    for a in range(2):
        for b in range(2):
            for c in range(2):
                np.testing.assert_allclose(y[:, a::2, b::2, c::2], x @ w[:, a, b, c], rtol=1e-5, atol=1e-5)
