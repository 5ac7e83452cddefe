"""Convolutional building blocks of UNETR's decoder, channels-last, written for XLA speed.

Names mirror MONAI's ``dynunet_block`` / ``unetr_block`` so that ``from_monai`` can map weights
one to one. Parameters are float32; ``dtype`` is the compute dtype.

Why not ``flax.linen.Conv``/``ConvTranspose``: on CPU, XLA's 3D convolution is ~3x slower than
the same convolution written as three 2D convolutions over the depth taps, and its transposed
convolution for kernel 2 / stride 2 is ~37x slower than one matmul plus a depth-to-space
reshape (see ``benchmarks/README.md``). On GPU the native 3D convolution (cuDNN) is used.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any

# torch.nn.Conv3d's default init (kaiming_uniform with a=sqrt(5)) is uniform(+-1/sqrt(fan_in)).
_torch_like_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _conv_backend_impl(impl: str) -> str:
    if impl != "auto":
        return impl
    return "taps2d" if jax.default_backend() == "cpu" else "xla"


def conv3d(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
    """'SAME' stride-1 3D convolution. x: (B, D, H, W, Ci); kernel: (kd, kh, kw, Ci, Co).

    impl: 'xla' (lax 3D conv), 'taps2d' (the depth taps stacked into channels, then one 2D conv:
    ~2-3x faster on XLA:CPU), 'auto' ('taps2d' on CPU, 'xla' elsewhere). A third form, one 2D
    conv per depth tap summed, was faster still forward but its jitted gradient lost accuracy
    (1.6e-3 relative) on XLA:CPU, so it is not offered.
    """
    kd = kernel.shape[0]
    if kd == 1 and kernel.shape[1] == 1 and kernel.shape[2] == 1:
        return jnp.einsum("bdhwi,io->bdhwo", x, kernel[0, 0, 0])
    impl = _conv_backend_impl(impl)
    if impl == "xla":
        return lax.conv_general_dilated(
            x, kernel, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
        )
    if impl != "taps2d":
        raise ValueError(f"unknown conv impl {impl!r}; expected 'auto', 'xla' or 'taps2d'")
    b, d, h, w, c = x.shape
    pad = (kd - 1) // 2  # XLA's 'SAME': an even kernel pads one more after than before, as in H and W
    xp = jnp.pad(x, ((0, 0), (pad, kd - 1 - pad), (0, 0), (0, 0), (0, 0)))
    stacked = jnp.concatenate([xp[:, k : k + d] for k in range(kd)], axis=-1)
    k2d = jnp.moveaxis(kernel, 0, 2).reshape(kernel.shape[1], kernel.shape[2], kd * c, -1)
    y = lax.conv_general_dilated(
        stacked.reshape(b * d, h, w, kd * c), k2d, (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y.reshape(b, d, h, w, -1)


def upsample2x(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Transposed conv, kernel 2, stride 2, no padding, as one matmul + depth-to-space.

    x: (B, D, H, W, Ci); kernel: (Ci, 2, 2, 2, Co) (PyTorch's (Ci, Co, 2, 2, 2) with Co last).
    Returns (B, 2D, 2H, 2W, Co). Each output voxel (2i+a, 2j+b, 2k+c) receives x[i, j, k] @ W[:, a, b, c].
    """
    b, d, h, w, ci = x.shape
    co = kernel.shape[-1]
    y = jnp.dot(x.reshape(-1, ci), kernel.reshape(ci, 8 * co))
    y = y.reshape(b, d, h, w, 2, 2, 2, co)
    y = y.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return y.reshape(b, 2 * d, 2 * h, 2 * w, co)


def stats_dtype(dtype: Dtype) -> Dtype:
    """Norm statistics and softmax: float32 under a narrower compute dtype (bfloat16), else the
    compute dtype itself (float64 in the MONAI parity tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """InstanceNorm without affine (MONAI's 'instance'): per sample and channel over space,
    statistics in ``stats_dtype``."""
    xf = x.astype(stats_dtype(x.dtype))
    mean = xf.mean(axis=(1, 2, 3), keepdims=True)
    var = jnp.square(xf - mean).mean(axis=(1, 2, 3), keepdims=True)
    return ((xf - mean) * lax.rsqrt(var + eps)).astype(x.dtype)


def _check_norm(norm_name: str) -> None:
    if norm_name != "instance":
        raise ValueError(f"norm_name={norm_name!r} is not supported; jaxseg implements 'instance'")


class Conv(nn.Module):
    """Bias-free (by default) stride-1 'SAME' conv; MONAI's ``get_conv_layer(conv_only=True)``."""

    features: int
    kernel_size: int = 3
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", _torch_like_init, (k, k, k, x.shape[-1], self.features))
        y = conv3d(x.astype(self.dtype), kernel.astype(self.dtype), self.impl)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            y = y + bias.astype(self.dtype)
        return y


class UpConv(nn.Module):
    """Kernel-2 stride-2 transposed conv without bias (MONAI's ``transp_conv``)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _torch_like_init, (x.shape[-1], 2, 2, 2, self.features))
        return upsample2x(x.astype(self.dtype), kernel.astype(self.dtype))


class UnetResBlock(nn.Module):
    """conv-norm-lrelu-conv-norm + (1x1 conv-norm) residual, then lrelu."""

    features: int
    kernel_size: int = 3
    norm_name: str = "instance"
    dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        _check_norm(self.norm_name)
        conv = lambda k, name: Conv(self.features, k, dtype=self.dtype, impl=self.impl, name=name)
        out = nn.leaky_relu(instance_norm(conv(self.kernel_size, "conv1")(x)), 0.01)
        out = instance_norm(conv(self.kernel_size, "conv2")(out))
        residual = x
        if x.shape[-1] != self.features:
            residual = instance_norm(conv(1, "conv3")(x))
        return nn.leaky_relu(out + residual.astype(out.dtype), 0.01)


class UnetBasicBlock(nn.Module):
    """conv-norm-lrelu twice."""

    features: int
    kernel_size: int = 3
    norm_name: str = "instance"
    dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        _check_norm(self.norm_name)
        for name in ("conv1", "conv2"):
            x = Conv(self.features, self.kernel_size, dtype=self.dtype, impl=self.impl, name=name)(x)
            x = nn.leaky_relu(instance_norm(x), 0.01)
        return x


def _conv_block(res_block: bool):
    return UnetResBlock if res_block else UnetBasicBlock


class UnetrBasicBlock(nn.Module):
    """encoder1: a res (or basic) block on the input image."""

    features: int
    norm_name: str = "instance"
    res_block: bool = True
    dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        block = _conv_block(self.res_block)
        return block(self.features, 3, self.norm_name, self.dtype, self.impl, name="layer")(x)


class UnetrPrUpBlock(nn.Module):
    """encoder2-4: upsample a ViT hidden state ``num_layer + 1`` times."""

    features: int
    num_layer: int
    norm_name: str = "instance"
    conv_block: bool = True
    res_block: bool = True
    dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        x = UpConv(self.features, self.dtype, name="transp_conv_init")(x)
        for i in range(self.num_layer):
            x = UpConv(self.features, self.dtype, name=f"blocks_{i}_0")(x)
            if self.conv_block:
                block = _conv_block(self.res_block)
                x = block(self.features, 3, self.norm_name, self.dtype, self.impl, name=f"blocks_{i}_1")(x)
        return x


class UnetrUpBlock(nn.Module):
    """decoder2-5: upsample, concatenate the skip, res (or basic) block."""

    features: int
    norm_name: str = "instance"
    res_block: bool = True
    dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, skip):
        x = UpConv(self.features, self.dtype, name="transp_conv")(x)
        x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        block = _conv_block(self.res_block)
        return block(self.features, 3, self.norm_name, self.dtype, self.impl, name="conv_block")(x)
