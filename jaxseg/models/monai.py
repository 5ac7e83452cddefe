"""MONAI UNETR ``state_dict`` <-> jaxseg params, so MONAI users can bring their weights and take
trained ones back into their pipelines. One declared ``layout`` serves both directions.

``from_monai`` / ``to_monai`` work on NumPy arrays (no torch import needed);
``load_monai_checkpoint`` / ``save_monai_checkpoint`` read and write ``.pt`` files and import
torch only when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxseg.models.unetr import UNETR

_UNUSED_SUFFIXES = ("norm_cross_attn.weight", "norm_cross_attn.bias")

# How a MONAI tensor becomes a jaxseg leaf (and back): torch Linear (out, in) vs Dense (in, out);
# Conv3d (Co, Ci, kd, kh, kw) vs (kd, kh, kw, Ci, Co); ConvTranspose3d (Ci, Co, 2, 2, 2) vs
# (Ci, 2, 2, 2, Co); the conv patch embedding (hidden, C, p, p, p) vs a (p*p*p*C, hidden) matmul.
_TO_JAX = {
    "id": lambda w: w,
    "linear": lambda w: w.T,
    "conv": lambda w: w.transpose(2, 3, 4, 1, 0),
    "upconv": lambda w: w.transpose(0, 2, 3, 4, 1),
    "patch": lambda w: w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0]),
}


def _patch_to_torch(k, c):
    p = c.patch_size
    return k.reshape(p, p, p, c.in_channels, k.shape[-1]).transpose(4, 3, 0, 1, 2)


_TO_MONAI = {
    "id": lambda w, c: w,
    "linear": lambda w, c: w.T,
    "conv": lambda w, c: w.transpose(4, 3, 0, 1, 2),
    "upconv": lambda w, c: w.transpose(0, 4, 1, 2, 3),
    "patch": _patch_to_torch,
}


def layout(c: UNETR, has_conv3=None) -> list[tuple[str, tuple[str, ...], str]]:
    """(MONAI state_dict key, jaxseg params path, transform) for every weight of UNETR ``c``.
    ``has_conv3(key)`` says whether a res block has the 1x1 residual conv (its input and output
    widths differ); by default it is derived from the config."""
    out: list[tuple[str, tuple[str, ...], str]] = []

    def add(key, path, kind):
        out.append((key, tuple(path), kind))

    def linear(key, path, bias=True):
        add(f"{key}.weight", (*path, "kernel"), "linear")
        if bias:
            add(f"{key}.bias", (*path, "bias"), "id")

    def norm(key, path):
        add(f"{key}.weight", (*path, "scale"), "id")
        add(f"{key}.bias", (*path, "bias"), "id")

    def conv(key, path, bias=False):
        add(f"{key}.conv.weight", (*path, "kernel"), "conv")
        if bias:
            add(f"{key}.conv.bias", (*path, "bias"), "id")

    def block(key, path, residual: bool):
        for name in ("conv1", "conv2"):
            conv(f"{key}.{name}", (*path, name))
        if c.res_block and (has_conv3(key) if has_conv3 else residual):
            conv(f"{key}.conv3", (*path, "conv3"))

    pe, vit = "vit.patch_embedding", ("vit",)
    if c.proj_type == "conv":
        add(f"{pe}.patch_embeddings.weight", (*vit, "patch_embedding", "kernel"), "patch")
        add(f"{pe}.patch_embeddings.bias", (*vit, "patch_embedding", "bias"), "id")
    else:  # perceptron: Linear on features ordered (p1 p2 p3 c), as patchify produces
        add(f"{pe}.patch_embeddings.1.weight", (*vit, "patch_embedding", "kernel"), "linear")
        add(f"{pe}.patch_embeddings.1.bias", (*vit, "patch_embedding", "bias"), "id")
    add(f"{pe}.position_embeddings", (*vit, "patch_embedding", "position_embeddings"), "id")
    for i in range(c.num_layers):
        b, path = f"vit.blocks.{i}", (*vit, f"blocks_{i}")
        norm(f"{b}.norm1", (*path, "norm1"))
        norm(f"{b}.norm2", (*path, "norm2"))
        linear(f"{b}.attn.qkv", (*path, "attn", "qkv"), bias=c.qkv_bias)
        linear(f"{b}.attn.out_proj", (*path, "attn", "out_proj"))
        linear(f"{b}.mlp.linear1", (*path, "mlp", "linear1"))
        linear(f"{b}.mlp.linear2", (*path, "mlp", "linear2"))
    norm("vit.norm", (*vit, "norm"))
    fs = c.feature_size
    block("encoder1.layer", ("encoder1", "layer"), c.in_channels != fs)
    for name, n, width in (("encoder2", 2, 2 * fs), ("encoder3", 1, 4 * fs), ("encoder4", 0, 8 * fs)):
        add(f"{name}.transp_conv_init.conv.weight", (name, "transp_conv_init", "kernel"), "upconv")
        for i in range(n):
            key = f"{name}.blocks.{i}.0" if c.conv_block else f"{name}.blocks.{i}"
            add(f"{key}.conv.weight", (name, f"blocks_{i}_0", "kernel"), "upconv")
            if c.conv_block:
                block(f"{name}.blocks.{i}.1", (name, f"blocks_{i}_1"), False)
    for name in ("decoder5", "decoder4", "decoder3", "decoder2"):
        add(f"{name}.transp_conv.conv.weight", (name, "transp_conv", "kernel"), "upconv")
        block(f"{name}.conv_block", (name, "conv_block"), True)  # the skip doubles the input width
    conv("out.conv", ("out",), bias=True)
    return out


def from_monai(state_dict: Mapping[str, Any], config: UNETR) -> dict:
    """Convert a MONAI ``UNETR.state_dict()`` (values: NumPy arrays or anything ``np.asarray``
    accepts) into ``{'params': ...}`` for ``config``. Raises ``ValueError`` on missing,
    unexpected or mis-shaped entries."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith(_UNUSED_SUFFIXES)}
    params: dict[str, Any] = {}
    for key, path, kind in layout(config, has_conv3=lambda k: f"{k}.conv3.conv.weight" in sd):
        if key not in sd:
            raise ValueError(f"MONAI state_dict lacks {key!r} needed for this UNETR config")
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = _TO_JAX[kind](np.asarray(sd.pop(key)))
    if sd:
        raise ValueError(f"MONAI state_dict has entries this UNETR config does not use: {sorted(sd)[:8]}")
    _check_shapes(params, config)
    return {"params": params}


def to_monai(params: Any, config: UNETR) -> dict[str, np.ndarray]:
    """The inverse of ``from_monai``: a MONAI ``UNETR.state_dict()`` as NumPy arrays (load it with
    ``net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``), including the
    ``norm_cross_attn`` LayerNorms MONAI creates but never uses (at their initial 1 / 0)."""
    import jax

    tree = jax.device_get(params)
    tree = tree.get("params", tree)
    _check_shapes(tree, config)
    sd: dict[str, np.ndarray] = {}
    for key, path, kind in layout(config):
        leaf = tree
        for name in path:
            leaf = leaf[name]
        sd[key] = np.array(_TO_MONAI[kind](np.asarray(leaf, np.float32), config), order="C")  # writable, for torch
    for i in range(config.num_layers):
        sd[f"vit.blocks.{i}.norm_cross_attn.weight"] = np.ones(config.hidden_size, np.float32)
        sd[f"vit.blocks.{i}.norm_cross_attn.bias"] = np.zeros(config.hidden_size, np.float32)
    return sd


def save_monai_checkpoint(params: Any, config: UNETR, path: str) -> None:
    """Write ``to_monai(params, config)`` as a ``.pt`` state_dict (imports torch only then)."""
    import io

    import torch

    from jaxseg.io import atomic_write_bytes, atomic_write_text, file_digest

    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in to_monai(params, config).items()}, buf)
    atomic_write_bytes(path, buf.getvalue())
    # MONAI's loaders read the .pt as it is; the checksum beside it lets load_monai_checkpoint verify it
    atomic_write_text(f"{path}.sha256", f"{file_digest(path)}  {Path(path).name}\n")


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


def load_monai_checkpoint(path: str, config: UNETR, allow_unverified: bool = False) -> dict:
    """Load a MONAI UNETR ``.pt`` checkpoint (a bare state_dict, or a dict holding one under
    'state_dict' / 'model' / 'model_state_dict') and convert it, verified against
    ``NAME.pt.sha256`` (``save_monai_checkpoint`` writes it; ``jaxseg.io.accept_weights`` for a
    file from elsewhere); without one only with ``allow_unverified``. Imports torch lazily."""
    import torch  # optional dependency: only needed to read .pt files

    from jaxseg.errors import first_line
    from jaxseg.io import WeightsError, file_digest, unverified

    if not Path(path).is_file():
        raise WeightsError(f"{path}: no checkpoint file there")
    sidecar = Path(f"{path}.sha256")
    if not sidecar.is_file():
        unverified(path, f"a checkpoint without {sidecar.name} beside it", allow_unverified)
    elif sidecar.read_text().split()[:1] != [file_digest(path)]:
        raise WeightsError(f"{path}: checksum mismatch against {sidecar.name}: the file is damaged")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several kinds for cut or garbage files
        raise WeightsError(f"{path}: damaged or not a PyTorch checkpoint ({first_line(e, 120)})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    return from_monai({k: v.detach().cpu().numpy() for k, v in obj.items()}, config)
