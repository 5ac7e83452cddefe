"""UNETR numerical parity with MONAI's own implementation (needs torch + monai: the test extra)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxseg.models import UNETR, from_monai, init_params, load_monai_checkpoint, save_monai_checkpoint, to_monai
from tests.monai_ref import monai_unetr, state_dict_numpy, to_channels_last, to_torch

CONFIGS = [
    dict(in_channels=1, out_channels=2, img_size=32, feature_size=4, hidden_size=32, mlp_dim=64,
         num_heads=4, num_layers=2),
    dict(in_channels=4, out_channels=3, img_size=32, feature_size=8, hidden_size=48, mlp_dim=96,
         num_heads=4, num_layers=4, qkv_bias=True),
    dict(in_channels=2, out_channels=2, img_size=(32, 16, 32), feature_size=4, hidden_size=32,
         mlp_dim=64, num_heads=2, num_layers=3, proj_type="perceptron", res_block=False),
]


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("cfg, conv_impl", [
    (CONFIGS[0], "taps2d"), (CONFIGS[1], "taps2d"), (CONFIGS[2], "taps2d"),  # the CPU default, every config
    (CONFIGS[1], "xla"),  # the accelerator default, on the richest config
], ids=["L2-in1-out2-taps2d", "L4-in4-out3-qkvbias-taps2d", "L3-perceptron-basic-taps2d", "L4-in4-out3-qkvbias-xla"])
def test_forward_and_input_grad_match_monai(cfg, conv_impl):
    num_layers = cfg["num_layers"]
    mkw = {k: v for k, v in cfg.items() if k != "num_layers"}
    net = monai_unetr(num_layers, **mkw)
    model = UNETR(**cfg, conv_impl=conv_impl)
    params = from_monai(state_dict_numpy(net), model)
    size = cfg["img_size"] if isinstance(cfg["img_size"], tuple) else (cfg["img_size"],) * 3
    x = np.random.default_rng(0).standard_normal((1, *size, cfg["in_channels"])).astype(np.float32)

    net = net.double()
    xt = to_torch(x.astype(np.float64)).requires_grad_(True)
    ref = net(xt)
    (ref.square().mean()).backward()
    ref_out, ref_grad = to_channels_last(ref), to_channels_last(xt.grad)

    # Both in float64: the comparison measures the implementation (equal to ~1e-14), not float32 rounding.
    with jax.enable_x64(True):
        model64 = UNETR(**cfg, conv_impl=conv_impl, dtype=jnp.float64)
        params64 = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        out64 = jax.jit(model64.apply)(params64, x64)
        grad64 = jax.jit(jax.grad(lambda x: jnp.mean(jnp.square(model64.apply(params64, x)))))(x64)
        assert out64.dtype == grad64.dtype == jnp.float64
        assert _rel(np.asarray(out64), ref_out) <= 1e-12
        assert _rel(np.asarray(grad64), ref_grad) <= 1e-12

    # float32, as jaxseg runs: the forward is near float64. (Its input gradient goes through
    # instance norms of near-constant maps, which amplify rounding by orders of magnitude: MONAI's
    # own float32 gradient is ~3e-3 off on the L4 config, and ours moves between 1e-6 and 2e-3 with
    # XLA's compile options; the float64 check above is the one that shows the implementation.)
    out = jax.jit(model.apply)(params, jnp.asarray(x))
    assert _rel(np.asarray(out), ref_out) <= 1e-4


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2]], ids=["L2-in1-out2", "L3-perceptron-basic"])
def test_to_monai_round_trip_and_monai_forward_on_exported_weights(cfg, tmp_path):
    """jaxseg -> MONAI -> jaxseg is the identity, and MONAI's own forward on weights trained in
    jaxseg (here: a jaxseg init) equals jaxseg's."""
    model = UNETR(**cfg)
    rng = np.random.default_rng(3)  # random biases and norms too, so that a swapped leaf shows
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32),
                                    init_params(model, 3))
    sd = to_monai(params, model)
    net = monai_unetr(cfg["num_layers"], **{k: v for k, v in cfg.items() if k != "num_layers"})
    net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)  # every key, right shapes
    back = from_monai(sd, model)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
    size = cfg["img_size"] if isinstance(cfg["img_size"], tuple) else (cfg["img_size"],) * 3
    x = np.random.default_rng(1).standard_normal((1, *size, cfg["in_channels"])).astype(np.float32)
    with torch.no_grad():
        ref = to_channels_last(net.eval()(to_torch(x)))
    assert _rel(np.asarray(jax.jit(model.apply)(params, jnp.asarray(x))), ref) <= 1e-4
    save_monai_checkpoint(params, model, str(tmp_path / "unetr.pt"))
    again = load_monai_checkpoint(str(tmp_path / "unetr.pt"), model)
    np.testing.assert_array_equal(again["params"]["out"]["kernel"], np.asarray(params["params"]["out"]["kernel"]))
    # the checksum beside the export proves it: two flipped bytes are refused naming the file
    from jaxseg.io import WeightsError

    assert (tmp_path / "unetr.pt.sha256").read_text().endswith("  unetr.pt\n")
    data = bytearray((tmp_path / "unetr.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    data[len(data) // 2 + 3] ^= 0xFF
    (tmp_path / "unetr.pt").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="unetr.pt: checksum mismatch"):
        load_monai_checkpoint(str(tmp_path / "unetr.pt"), model)


def test_forward_matches_unmodified_monai_unetr_12_layers():
    """MONAI's own UNETR.forward, not the layer-count-generalised one of tests/monai_ref.py: the
    full 12-block depth and MONAI's hard-coded skips (blocks 3, 6, 9), at a small width."""
    from monai.networks.nets import UNETR as MonaiUNETR

    torch.manual_seed(0)
    net = MonaiUNETR(in_channels=1, out_channels=2, img_size=32, feature_size=8, hidden_size=96, mlp_dim=192,
                     num_heads=4).eval()
    with torch.no_grad():  # random biases and norms too (MONAI starts them at 0 / 1)
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = UNETR(in_channels=1, out_channels=2, img_size=32, feature_size=8, hidden_size=96, mlp_dim=192,
                  num_heads=4)
    params = from_monai({k: v.detach().numpy() for k, v in net.state_dict().items()}, model)
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 32, 1)).astype(np.float32)
    net = net.double()
    xt = to_torch(x.astype(np.float64)).requires_grad_(True)
    ref = net(xt)
    ref.square().mean().backward()
    out = jax.jit(model.apply)(params, jnp.asarray(x))
    grad = jax.jit(jax.grad(lambda x: jnp.mean(jnp.square(model.apply(params, x)))))(jnp.asarray(x))
    assert _rel(np.asarray(out), to_channels_last(ref)) <= 1e-4
    assert _rel(np.asarray(grad), to_channels_last(xt.grad)) <= 1e-4


def test_converter_rejects_mismatched_state_dict():
    cfg = CONFIGS[0]
    net = monai_unetr(2, **{k: v for k, v in cfg.items() if k != "num_layers"})
    sd = state_dict_numpy(net)
    with pytest.raises(ValueError, match="lacks"):
        from_monai({k: v for k, v in sd.items() if "decoder2" not in k}, UNETR(**cfg))
    with pytest.raises(ValueError, match="does not use"):
        from_monai(sd, UNETR(**{**cfg, "num_layers": 1}))
    with pytest.raises(ValueError, match="shape mismatch"):
        from_monai(sd, UNETR(**{**cfg, "out_channels": 3}))


def test_load_monai_checkpoint_file(tmp_path):
    cfg = CONFIGS[0]
    net = monai_unetr(2, **{k: v for k, v in cfg.items() if k != "num_layers"})
    path = tmp_path / "unetr.pt"
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, path)
    model = UNETR(**cfg)
    from jaxseg.io import WeightsError, accept_weights

    # a checkpoint from elsewhere has no checksum: refused unless the user allows it or accepts it once
    with pytest.raises(WeightsError, match="unetr.pt: a checkpoint without unetr.pt.sha256.*allow_unverified"):
        load_monai_checkpoint(str(path), model)
    with pytest.warns(UserWarning, match="UNVERIFIED"):
        load_monai_checkpoint(str(path), model, allow_unverified=True)
    assert accept_weights(path) == f"wrote {path}.sha256"
    params = load_monai_checkpoint(str(path), model)
    x = np.random.default_rng(1).standard_normal((1, 32, 32, 32, 1)).astype(np.float32)
    with torch.no_grad():
        ref = to_channels_last(net(to_torch(x)))
    assert _rel(np.asarray(jax.jit(model.apply)(params, jnp.asarray(x))), ref) <= 1e-4
