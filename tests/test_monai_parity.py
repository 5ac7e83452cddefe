"""UNETR numerical parity with MONAI's own implementation (needs torch + monai: the test extra)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxseg.models import UNETR, from_monai, load_monai_checkpoint
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


@pytest.mark.parametrize("cfg", CONFIGS, ids=["L2-in1-out2", "L4-in4-out3-qkvbias", "L3-perceptron-basic"])
@pytest.mark.parametrize("conv_impl", ["xla", "taps2d"])
def test_forward_and_input_grad_match_monai(cfg, conv_impl):
    num_layers = cfg["num_layers"]
    mkw = {k: v for k, v in cfg.items() if k != "num_layers"}
    net = monai_unetr(num_layers, **mkw)
    model = UNETR(**cfg, conv_impl=conv_impl)
    params = from_monai(state_dict_numpy(net), model)
    size = cfg["img_size"] if isinstance(cfg["img_size"], tuple) else (cfg["img_size"],) * 3
    x = np.random.default_rng(0).standard_normal((2, *size, cfg["in_channels"])).astype(np.float32)

    # MONAI in float64 is the reference: its float32 input gradient is itself ~3e-3 off the
    # float64 one on the L4 config (instance norm of near-constant maps), ours ~1e-6.
    net = net.double()
    xt = to_torch(x.astype(np.float64)).requires_grad_(True)
    ref = net(xt)
    (ref.square().mean()).backward()
    ref_out, ref_grad = to_channels_last(ref), to_channels_last(xt.grad)

    out = jax.jit(model.apply)(params, jnp.asarray(x))
    grad = jax.jit(jax.grad(lambda x: jnp.mean(jnp.square(model.apply(params, x)))))(jnp.asarray(x))
    assert _rel(np.asarray(out), ref_out) <= 1e-4
    assert _rel(np.asarray(grad), ref_grad) <= 1e-4


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
    params = load_monai_checkpoint(str(path), model)
    x = np.random.default_rng(1).standard_normal((1, 32, 32, 32, 1)).astype(np.float32)
    with torch.no_grad():
        ref = to_channels_last(net(to_torch(x)))
    assert _rel(np.asarray(model.apply(params, jnp.asarray(x))), ref) <= 1e-4
