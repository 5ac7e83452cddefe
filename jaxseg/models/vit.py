"""The ViT encoder of UNETR (MONAI's ``ViT`` with ``classification=False``), channels-last."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.models.layers import stats_dtype

Dtype = Any

# MONAI initialises Linear weights and position embeddings with trunc_normal(std=0.02).
_trunc02 = nn.initializers.truncated_normal(0.02)


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """(B, D, H, W, C) -> (B, N, p*p*p*C), patches in row-major (d, h, w) order, features in
    (pd, ph, pw, c) order: MONAI's token order, and its 'perceptron' feature order."""
    b, d, h, w, c = x.shape
    p = patch_size
    x = x.reshape(b, d // p, p, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, (d // p) * (h // p) * (w // p), p * p * p * c)


class PatchEmbedding(nn.Module):
    """Non-overlapping patch projection as one matmul (a stride-p conv is the same map)."""

    hidden_size: int
    patch_size: int
    n_patches: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        tokens = patchify(x.astype(self.dtype), self.patch_size)
        patch_dim = tokens.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
            (patch_dim, self.hidden_size),
        )
        bias = self.param("bias", nn.initializers.zeros, (self.hidden_size,))
        pos = self.param("position_embeddings", _trunc02, (1, self.n_patches, self.hidden_size))
        y = tokens @ kernel.astype(self.dtype) + bias.astype(self.dtype) + pos.astype(self.dtype)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class SelfAttention(nn.Module):
    """MONAI's SABlock: combined qkv Linear, features ordered (qkv, head, dim)."""

    hidden_size: int
    num_heads: int
    dropout_rate: float = 0.0
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        b, n, _ = x.shape
        dense = lambda f, name, bias=True: nn.Dense(
            f, use_bias=bias, dtype=self.dtype, kernel_init=_trunc02, name=name
        )
        qkv = dense(3 * self.hidden_size, "qkv", self.qkv_bias)(x)
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.hidden_size // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # Dropout on the weights needs them; float64 (the parity tests) too, as
        # jax.nn.dot_product_attention takes its softmax in float32 whatever the dtype.
        if (self.dropout_rate > 0.0 and not deterministic) or jnp.dtype(self.dtype) == jnp.float64:
            scale = q.shape[-1] ** -0.5
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(stats_dtype(self.dtype)) * scale
            weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
            weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        else:
            # Lets XLA/cuDNN pick a fused attention kernel on accelerators.
            out = jax.nn.dot_product_attention(q, k, v)
        out = dense(self.hidden_size, "out_proj")(out.reshape(b, n, self.hidden_size))
        return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)


class MLPBlock(nn.Module):
    hidden_size: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_trunc02, name="linear1")(x)
        x = nn.Dropout(self.dropout_rate)(nn.gelu(x, approximate=False), deterministic=deterministic)
        x = nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=_trunc02, name="linear2")(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class TransformerBlock(nn.Module):
    hidden_size: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=stats_dtype(self.dtype), name=name)
        h = ln("norm1")(x).astype(self.dtype)
        x = x + SelfAttention(
            self.hidden_size, self.num_heads, self.dropout_rate, self.qkv_bias, self.dtype, name="attn"
        )(h, deterministic)
        h = ln("norm2")(x).astype(self.dtype)
        return x + MLPBlock(self.hidden_size, self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(
            h, deterministic
        )


class ViT(nn.Module):
    """Patch embedding + ``num_layers`` transformer blocks + final LayerNorm.

    Returns ``(normed_last, hidden_states)``; hidden_states[i] is block i's output, (B, N, hidden).
    ``num_blocks`` < ``num_layers`` stops early (used when only early features are needed).
    """

    hidden_size: int
    mlp_dim: int
    num_layers: int
    num_heads: int
    patch_size: int
    n_patches: int
    dropout_rate: float = 0.0
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True, num_blocks: int | None = None):
        x = PatchEmbedding(
            self.hidden_size, self.patch_size, self.n_patches, self.dropout_rate, self.dtype,
            name="patch_embedding",
        )(x, deterministic)
        hidden_states: list[jax.Array] = []
        n = self.num_layers if num_blocks is None else num_blocks
        for i in range(n):
            x = TransformerBlock(
                self.hidden_size, self.mlp_dim, self.num_heads, self.dropout_rate, self.qkv_bias,
                self.dtype, name=f"blocks_{i}",
            )(x, deterministic)
            hidden_states.append(x)
        if n < self.num_layers:
            return None, hidden_states
        normed = nn.LayerNorm(epsilon=1e-5, dtype=stats_dtype(self.dtype), name="norm")(x).astype(self.dtype)
        return normed, hidden_states
