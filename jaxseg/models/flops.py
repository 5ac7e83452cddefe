"""Analytic FLOP and memory-traffic count of UNETR, per layer, for honest MFU and roofline figures.

Why by hand: on GPUs XLA's ``cost_analysis()`` does not count cuDNN convolutions (custom calls),
so it under-reports a UNETR step several-fold. Here a multiply-add is 2 FLOPs and only the
matrix work is counted (patch embedding, attention, MLP, convolutions, transposed
convolutions): norms, activations and the optimizer update add a few percent of FLOPs and run at
memory speed, not at the matmul peak. A 3x3x3 'SAME' convolution counts the multiply-adds that
touch real (non-padding) input, as XLA does: ``(3S - 2)^3`` (output, tap) pairs per channel pair
instead of ``27 S^3``.

Bytes are the compulsory traffic of each matrix layer: its input and output activations once
each (in the compute dtype) and its float32 weights once; norms and activations are taken as
fused into them. So ``bytes / bandwidth`` is a lower bound on a layer's memory time, and
``max(flops / peak, bytes / bandwidth)`` its roofline time.

A training step is forward + backward; the backward of a matmul or convolution costs twice its
forward in FLOPs and bytes (gradients of the input and of the weights), less the input gradient
of the layers that read the image (nobody needs it).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple


class Cost(NamedTuple):
    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other):  # type: ignore[override]
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, k):  # type: ignore[override]
        return Cost(self.flops * k, self.bytes * k)


def _sum(costs) -> Cost:
    total = Cost()
    for c in costs:
        total = total + c
    return total


def _conv(size, ci: int, co: int, k: int, act: int) -> Cost:
    """One stride-1 'SAME' conv on one sample, padding taps excluded."""
    pairs = math.prod(k * s - 2 * sum(range(1, k // 2 + 1)) for s in size)  # valid (output, tap) pairs
    vox = math.prod(size)
    return Cost(2.0 * pairs * ci * co, act * vox * (ci + co) + 4.0 * k ** 3 * ci * co)


def _upconv(size, ci: int, co: int, act: int) -> Cost:
    """Kernel-2 stride-2 transposed conv from ``size``: one (ci x 8co) matmul per input voxel."""
    vox = math.prod(size)
    return Cost(2.0 * vox * ci * 8 * co, act * vox * (ci + 8 * co) + 4.0 * ci * 8 * co)


def _scaled(size, k: int) -> tuple[int, int, int]:
    return tuple(s * k for s in size)  # type: ignore[return-value]


def layer_costs(model: Any, part: str = "full", act_bytes: int | None = None) -> dict[str, Cost]:
    """Forward cost of one sample, by layer (``'vit.blocks'``, ``'decoder2'``, ...).

    ``part``: ``'full'`` (``model.apply``) or ``'encode'`` (``UNETR.encode``: the ViT up to the
    enc4 skip and encoder4, the stage-1 pre-training features). ``act_bytes``: bytes per
    activation element (default: the model's compute dtype)."""
    import jax.numpy as jnp

    from jaxseg.models.unetr import skip_layers

    if part not in ("full", "encode"):
        raise ValueError(f"part must be 'full' or 'encode', got {part!r}")
    a = act_bytes or jnp.dtype(model.dtype).itemsize
    g = model.feat_size
    n = math.prod(g)
    h, m, f = model.hidden_size, model.mlp_dim, model.feature_size
    img = _scaled(g, model.patch_size)

    def dense(ci, co):
        return Cost(2.0 * n * ci * co, a * n * (ci + co) + 4.0 * ci * co)

    attention = Cost(2 * 2.0 * n * n * h, a * 4 * n * h)  # QK^T and AV, fused (q, k, v in, out)
    block = dense(h, 3 * h) + attention + dense(h, h) + dense(h, m) + dense(m, h)
    s4 = skip_layers(model.num_layers)[2]
    blocks = model.num_layers if part == "full" else s4 + 1
    patch = model.patch_size ** 3 * model.in_channels
    out: dict[str, Cost] = {
        "vit.patch_embedding": dense(patch, h),
        "vit.blocks": block * blocks,
        "encoder4": _upconv(g, h, 8 * f, a),
    }
    if part == "encode":
        return out

    def conv_block(size, ci, co) -> Cost:
        costs = [_conv(size, ci, co, 3, a), _conv(size, co, co, 3, a)]
        if model.res_block and ci != co:
            costs.append(_conv(size, ci, co, 1, a))
        return _sum(costs)

    def pr_up(features: int, num_layer: int) -> Cost:
        total, size = _upconv(g, h, features, a), _scaled(g, 2)
        for _ in range(num_layer):
            total = total + _upconv(size, features, features, a)
            size = _scaled(size, 2)
            if model.conv_block:
                total = total + conv_block(size, features, features)
        return total

    def up(size, ci: int, co: int) -> Cost:  # upsample, concatenate the skip (co), block 2co -> co
        return _upconv(size, ci, co, a) + conv_block(_scaled(size, 2), 2 * co, co)

    out["encoder1"] = conv_block(img, model.in_channels, f)
    out["encoder2"] = pr_up(2 * f, 2)
    out["encoder3"] = pr_up(4 * f, 1)
    out["decoder5"] = up(g, h, 8 * f)
    out["decoder4"] = up(_scaled(g, 2), 8 * f, 4 * f)
    out["decoder3"] = up(_scaled(g, 4), 4 * f, 2 * f)
    out["decoder2"] = up(_scaled(g, 8), 2 * f, f)
    out["out"] = _conv(img, f, model.out_channels, 1, a)
    return out


def _input_layers(model: Any, part: str, a: int) -> Cost:
    """Forward cost of the layers reading the image, whose input gradient is never computed."""
    img = _scaled(model.feat_size, model.patch_size)
    n = math.prod(model.feat_size)
    patch = model.patch_size ** 3 * model.in_channels
    total = Cost(2.0 * n * patch * model.hidden_size, a * n * (patch + model.hidden_size))
    if part == "full":
        total = total + _conv(img, model.in_channels, model.feature_size, 3, a)
        if model.res_block and model.in_channels != model.feature_size:
            total = total + _conv(img, model.in_channels, model.feature_size, 1, a)
    return total


def unetr_cost(model: Any, batch: int = 1, kind: str = "forward", part: str = "full",
               act_bytes: int | None = None) -> Cost:
    """Total cost of ``batch`` samples: ``kind='forward'`` or ``'train'`` (forward + backward)."""
    import jax.numpy as jnp

    a = act_bytes or jnp.dtype(model.dtype).itemsize
    fwd = _sum(layer_costs(model, part, a).values())
    if kind == "forward":
        return fwd * batch
    if kind == "train":
        back = fwd * 2
        back = Cost(back.flops - _input_layers(model, part, a).flops, back.bytes)
        return (fwd + back) * batch
    raise ValueError(f"kind must be 'forward' or 'train', got {kind!r}")


def unetr_flops(model: Any, batch: int = 1, kind: str = "forward", part: str = "full") -> float:
    return unetr_cost(model, batch, kind, part).flops


def pretrain_step_cost(model: Any, batch: int, stage: str, axis_mode: str = "sequential") -> Cost:
    """One pre-training step: stage ``'encoder'`` trains through ``encode``, stage ``'decoder'``
    through the whole network; 'sequential' runs three updates (one per axis)."""
    from jaxseg.models.unetr import pretraining_stage

    part = {"encoder": "encode", "decoder": "full"}[pretraining_stage(stage)]
    return unetr_cost(model, batch, "train", part) * (3 if axis_mode == "sequential" else 1)


def roofline_s(cost: Cost, peak_flops: float, bandwidth: float) -> float:
    """Lower bound on the time of ``cost``: compute at ``peak_flops`` or traffic at ``bandwidth``."""
    return max(cost.flops / peak_flops, cost.bytes / bandwidth)
