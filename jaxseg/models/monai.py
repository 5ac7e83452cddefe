"""MONAI UNETR ``state_dict`` -> jaxseg params, so MONAI users can bring their weights.

``from_monai`` takes a mapping of names to NumPy arrays (no torch import needed);
``load_monai_checkpoint`` reads a ``.pt`` file and imports torch only when called.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxseg.models.unetr import UNETR

_UNUSED_SUFFIXES = ("norm_cross_attn.weight", "norm_cross_attn.bias")


def _linear(sd, key, bias=True):
    out = {"kernel": np.asarray(sd.pop(key + ".weight")).T}
    if bias:
        out["bias"] = np.asarray(sd.pop(key + ".bias"))
    return out


def _layernorm(sd, key):
    return {"scale": np.asarray(sd.pop(key + ".weight")), "bias": np.asarray(sd.pop(key + ".bias"))}


def _conv(sd, key, bias=False):
    # torch Conv3d (Co, Ci, kd, kh, kw) -> (kd, kh, kw, Ci, Co)
    out = {"kernel": np.asarray(sd.pop(key + ".conv.weight")).transpose(2, 3, 4, 1, 0)}
    if bias:
        out["bias"] = np.asarray(sd.pop(key + ".conv.bias"))
    return out


def _upconv(sd, key):
    # torch ConvTranspose3d (Ci, Co, 2, 2, 2) -> (Ci, 2, 2, 2, Co)
    return {"kernel": np.asarray(sd.pop(key + ".conv.weight")).transpose(0, 2, 3, 4, 1)}


def _conv_block(sd, key, res_block):
    out = {name: _conv(sd, f"{key}.{name}") for name in ("conv1", "conv2")}
    if res_block and f"{key}.conv3.conv.weight" in sd:
        out["conv3"] = _conv(sd, f"{key}.conv3")
    return out


def from_monai(state_dict: Mapping[str, Any], config: UNETR) -> dict:
    """Convert a MONAI ``UNETR.state_dict()`` (values: NumPy arrays or anything ``np.asarray``
    accepts) into ``{'params': ...}`` for ``config``. Raises ``ValueError`` on missing,
    unexpected or mis-shaped entries."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith(_UNUSED_SUFFIXES)}
    try:
        params = _convert(sd, config)
    except KeyError as e:
        raise ValueError(f"MONAI state_dict lacks {e.args[0]!r} needed for this UNETR config") from None
    if sd:
        raise ValueError(f"MONAI state_dict has entries this UNETR config does not use: {sorted(sd)[:8]}")
    _check_shapes(params, config)
    return {"params": params}


def _convert(sd: dict, c: UNETR) -> dict:
    pe = "vit.patch_embedding"
    if c.proj_type == "conv":
        w = np.asarray(sd.pop(f"{pe}.patch_embeddings.weight"))  # (hidden, C, p, p, p)
        kernel = w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0])
        bias = np.asarray(sd.pop(f"{pe}.patch_embeddings.bias"))
    else:  # perceptron: Linear on features ordered (p1 p2 p3 c), as patchify produces
        lin = _linear(sd, f"{pe}.patch_embeddings.1")
        kernel, bias = lin["kernel"], lin["bias"]
    vit: dict[str, Any] = {
        "patch_embedding": {
            "kernel": kernel, "bias": bias,
            "position_embeddings": np.asarray(sd.pop(f"{pe}.position_embeddings")),
        }
    }
    for i in range(c.num_layers):
        b = f"vit.blocks.{i}"
        vit[f"blocks_{i}"] = {
            "norm1": _layernorm(sd, f"{b}.norm1"),
            "norm2": _layernorm(sd, f"{b}.norm2"),
            "attn": {
                "qkv": _linear(sd, f"{b}.attn.qkv", bias=c.qkv_bias),
                "out_proj": _linear(sd, f"{b}.attn.out_proj"),
            },
            "mlp": {"linear1": _linear(sd, f"{b}.mlp.linear1"), "linear2": _linear(sd, f"{b}.mlp.linear2")},
        }
    vit["norm"] = _layernorm(sd, "vit.norm")
    params: dict[str, Any] = {"vit": vit}
    params["encoder1"] = {"layer": _conv_block(sd, "encoder1.layer", c.res_block)}
    for name, n in (("encoder2", 2), ("encoder3", 1), ("encoder4", 0)):
        enc = {"transp_conv_init": _upconv(sd, f"{name}.transp_conv_init")}
        for i in range(n):
            enc[f"blocks_{i}_0"] = _upconv(sd, f"{name}.blocks.{i}.0" if c.conv_block else f"{name}.blocks.{i}")
            if c.conv_block:
                enc[f"blocks_{i}_1"] = _conv_block(sd, f"{name}.blocks.{i}.1", c.res_block)
        params[name] = enc
    for name in ("decoder5", "decoder4", "decoder3", "decoder2"):
        params[name] = {
            "transp_conv": _upconv(sd, f"{name}.transp_conv"),
            "conv_block": _conv_block(sd, f"{name}.conv_block", c.res_block),
        }
    params["out"] = _conv(sd, "out.conv", bias=True)
    return params


def _check_shapes(params: dict, config: UNETR) -> None:
    import jax
    import jax.numpy as jnp

    size = tuple(s * config.patch_size for s in config.feat_size)
    x = jax.ShapeDtypeStruct((1, *size, config.in_channels), jnp.float32)
    expected = jax.eval_shape(config.init, jax.random.key(0), x)["params"]
    flat_e = dict(jax.tree_util.tree_leaves_with_path(expected))
    flat_g = dict(jax.tree_util.tree_leaves_with_path(params))
    if set(flat_e) != set(flat_g):
        missing = sorted(map(jax.tree_util.keystr, set(flat_e) - set(flat_g)))
        extra = sorted(map(jax.tree_util.keystr, set(flat_g) - set(flat_e)))
        raise ValueError(f"converted params do not match the config: missing {missing[:5]}, extra {extra[:5]}")
    for path, e in flat_e.items():
        if tuple(flat_g[path].shape) != tuple(e.shape):
            raise ValueError(
                f"shape mismatch at {jax.tree_util.keystr(path)}: MONAI gives {flat_g[path].shape}, "
                f"config expects {e.shape}"
            )


def load_monai_checkpoint(path: str, config: UNETR) -> dict:
    """Load a MONAI UNETR ``.pt`` checkpoint (a bare state_dict, or a dict holding one under
    'state_dict' / 'model' / 'model_state_dict') and convert it. Imports torch lazily."""
    import torch  # optional dependency: only needed to read .pt files

    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    return from_monai({k: v.detach().cpu().numpy() for k, v in obj.items()}, config)
