"""UNETR (Hatamizadeh et al. 2022) in Flax linen: MONAI's ``monai.networks.nets.UNETR``, channels-last.

Usage (functional)::

    model = UNETR(in_channels=1, out_channels=2, img_size=96)
    params = model.init(jax.random.key(0), jnp.zeros((1, 96, 96, 96, 1)))
    logits = model.apply(params, x)                       # (B, 96, 96, 96, 2)
    logits, feats = model.apply(params, x, return_features=True)
    feats["enc4"]                                         # (B, 12, 12, 12, 8 * feature_size)
    enc4 = model.apply(params, x, method=UNETR.encode)    # stage-1 features only, cheaper
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.models.layers import Conv, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from jaxseg.models.vit import ViT

Dtype = Any


def skip_layers(num_layers: int) -> tuple[int, int, int]:
    """Indices of the hidden states feeding encoder2/3/4: (3, 6, 9) for 12 layers, spread the
    same way (L/4, L/2, 3L/4, floored, at least 0) for other depths."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return tuple(max(0, (num_layers * k) // 4) for k in (1, 2, 3))  # type: ignore[return-value]


def _as_3tuple(img_size: int | Sequence[int]) -> tuple[int, int, int]:
    t = (img_size,) * 3 if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    if len(t) != 3:
        raise ValueError(f"img_size must be an int or 3 ints, got {img_size!r}")
    return t  # type: ignore[return-value]


class UNETR(nn.Module):
    """UNETR with MONAI's field names and defaults.

    Input is channels-last ``(B, D, H, W, in_channels)`` with ``(D, H, W) == img_size``;
    output logits are ``(B, D, H, W, out_channels)``. ``dtype`` is the compute dtype
    (``jnp.bfloat16`` on accelerators); parameters stay float32. ``patch_size`` and
    ``num_layers`` are fixed at 16 and 12 in MONAI and configurable here. ``conv_impl`` picks
    the 3x3x3 convolution algorithm (see ``jaxseg.models.layers.conv3d``).
    """

    in_channels: int
    out_channels: int
    img_size: int | Sequence[int]
    feature_size: int = 16
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12
    proj_type: str = "conv"
    norm_name: str = "instance"
    conv_block: bool = True
    res_block: bool = True
    dropout_rate: float = 0.0
    qkv_bias: bool = False
    patch_size: int = 16
    num_layers: int = 12
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    def __post_init__(self):
        size = _as_3tuple(self.img_size)
        if any(s % self.patch_size for s in size):
            raise ValueError(f"img_size {size} must be divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout_rate <= 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1], got {self.dropout_rate}")
        if self.proj_type not in ("conv", "perceptron"):
            raise ValueError(f"proj_type must be 'conv' or 'perceptron', got {self.proj_type!r}")
        skip_layers(self.num_layers)
        super().__post_init__()

    @property
    def feat_size(self) -> tuple[int, int, int]:
        return tuple(s // self.patch_size for s in _as_3tuple(self.img_size))  # type: ignore[return-value]

    def _check_input(self, x: jax.Array) -> None:
        expected = (*_as_3tuple(self.img_size), self.in_channels)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"UNETR expects channels-last input (B, {', '.join(map(str, expected))}) "
                f"[(B, D, H, W, in_channels)], got shape {tuple(x.shape)}"
            )

    def setup(self):
        fs, common = self.feature_size, dict(norm_name=self.norm_name, dtype=self.dtype)
        self.vit = ViT(
            self.hidden_size, self.mlp_dim, self.num_layers, self.num_heads, self.patch_size,
            math.prod(self.feat_size), self.dropout_rate, self.qkv_bias, self.dtype,
        )
        pr = dict(conv_block=self.conv_block, res_block=self.res_block, impl=self.conv_impl, **common)
        up = dict(res_block=self.res_block, impl=self.conv_impl, **common)
        self.encoder1 = UnetrBasicBlock(fs, **up)
        self.encoder2 = UnetrPrUpBlock(fs * 2, num_layer=2, **pr)
        self.encoder3 = UnetrPrUpBlock(fs * 4, num_layer=1, **pr)
        self.encoder4 = UnetrPrUpBlock(fs * 8, num_layer=0, **pr)
        self.decoder5 = UnetrUpBlock(fs * 8, **up)
        self.decoder4 = UnetrUpBlock(fs * 4, **up)
        self.decoder3 = UnetrUpBlock(fs * 2, **up)
        self.decoder2 = UnetrUpBlock(fs, **up)
        self.out = Conv(self.out_channels, 1, use_bias=True, dtype=self.dtype)

    def _grid(self, tokens: jax.Array) -> jax.Array:
        return tokens.reshape(tokens.shape[0], *self.feat_size, tokens.shape[-1])

    def __call__(self, x: jax.Array, *, deterministic: bool = True, return_features: bool = False):
        """Logits ``(B, D, H, W, out_channels)`` in ``dtype``; with ``return_features``, also a
        dict with ``hidden_states`` (list of (B, N, hidden)) and ``enc4`` (the stage-1
        pre-training features, (B, D/2p*4, ..., 8*feature_size), i.e. 12^3 x 128 at 96^3)."""
        self._check_input(x)
        last, hidden = self.vit(x, deterministic)
        s2, s3, s4 = skip_layers(self.num_layers)
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(self._grid(hidden[s2]))
        enc3 = self.encoder3(self._grid(hidden[s3]))
        enc4 = self.encoder4(self._grid(hidden[s4]))
        dec3 = self.decoder5(self._grid(last), enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        logits = self.out(self.decoder2(dec1, enc1))
        if return_features:
            return logits, {"hidden_states": hidden, "enc4": enc4}
        return logits

    def encode(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Only the ``enc4`` features: runs the ViT up to the last skip block and encoder4."""
        self._check_input(x)
        s4 = skip_layers(self.num_layers)[2]
        _, hidden = self.vit(x, deterministic, num_blocks=s4 + 1)
        return self.encoder4(self._grid(hidden[s4]))


# ---- pre-training stages: what each one trains (the freezing masks live beside the model) ----

STAGES = ("encoder", "decoder")
_OLD_STAGE_NAMES = {"feat": "encoder", "recon": "decoder"}


def pretraining_stage(name: str) -> str:
    """'encoder' (stage 1: enc4 features) or 'decoder' (stage 2: decoder outputs); the old names
    'feat' and 'recon' still work, with a DeprecationWarning."""
    if name in _OLD_STAGE_NAMES:
        import warnings

        warnings.warn(f"stage name {name!r} is deprecated; use {_OLD_STAGE_NAMES[name]!r}", DeprecationWarning,
                      stacklevel=3)
        return _OLD_STAGE_NAMES[name]
    if name not in STAGES:
        raise ValueError(f"unknown pre-training stage {name!r}; choose from {STAGES}")
    return name


def trainable_in_stage(stage: str, num_layers: int, freeze_encoder: bool = False):
    """Predicate on a parameter's path of module names: does ``stage`` train it? 'encoder':
    patch embedding, the ViT blocks up to the enc4 skip, encoder4 (all that enc4 depends on).
    'decoder': everything (the paper) or, with ``freeze_encoder``, the decoder and output head
    only (the authors' code)."""
    stage = pretraining_stage(stage)
    last = skip_layers(num_layers)[2]
    decoder = {"decoder5", "decoder4", "decoder3", "decoder2", "out"}

    def top(path):
        return path[1] if path and path[0] == "params" else path[0]

    def encoder_stage(path):
        if top(path) == "encoder4":
            return True
        if top(path) == "vit":
            sub = path[path.index("vit") + 1]
            return sub == "patch_embedding" or (sub.startswith("blocks_") and int(sub.split("_")[1]) <= last)
        return False

    if stage == "encoder":
        return encoder_stage
    return lambda path: top(path) in decoder if freeze_encoder else True


# Named sizes (a Config's ``model``): `tiny` for tests, `small` for the CPU demo, `paper` for the paper's UNETR.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(feature_size=4, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2, patch_size=16),
    "small": dict(feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4, num_layers=4, patch_size=16),
    "paper": dict(feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12, patch_size=16),
}


def unetr_from_preset(name: str, **overrides: Any) -> UNETR:
    """``UNETR`` with a named size; ``overrides`` set the rest (in/out channels, img_size...)."""
    if name not in SIZES:
        raise ValueError(f"unknown UNETR size {name!r}; choose from {sorted(SIZES)}")
    return UNETR(**{**SIZES[name], **overrides})


@functools.lru_cache(maxsize=None)
def _jitted_init(model: UNETR):
    return jax.jit(model.init)  # one trace and compilation per model and process, however many jobs init it


def init_params(model: UNETR, seed: int | jax.Array = 0) -> Any:
    """``model.init`` on a zero batch of one, jitted. Uses the non-partitionable threefry PRNG:
    deterministic like the default, but XLA:CPU compiles UNETR's init ~4x faster with it (the
    partitionable form unrolls per parameter: 40 s vs 9 s for the tiny preset)."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    x = jnp.zeros((1, *_as_3tuple(model.img_size), model.in_channels))
    with jax.threefry_partitionable(False):
        return _jitted_init(model)(key, x)


def param_shapes(model: UNETR) -> Any:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves, with no compilation or init work:
    the template a weights file is loaded into, and what the optimizer's labels are made from."""
    x = jax.ShapeDtypeStruct((1, *_as_3tuple(model.img_size), model.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)


def count_params(params: Any) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
