"""Slices from P partitions along a spatial axis, and the triplet samplers built on them.

Volumes or feature maps are channels-last ``(N, D, H, W, C)``. Partition p along an axis of
length L covers ``[p*s, (p+1)*s)`` with ``s = L // P``; one slice is taken per partition at
``p*s + offset[p]``. The authors shared one random offset across partitions; the paper's
description allows one per partition: both are offered by ``sample_offsets``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def partition_size(length: int, num_partitions: int) -> int:
    if num_partitions < 2:
        raise ValueError(f"need at least 2 partitions, got {num_partitions}")
    size = length // num_partitions
    if size < 1:
        raise ValueError(f"an axis of length {length} cannot hold {num_partitions} partitions")
    return size


def sample_offsets(key: jax.Array, length: int, num_partitions: int, shared: bool = True) -> jax.Array:
    """Random offsets within each partition, int32 ``(P,)``: one value repeated (``shared``, as
    the authors did) or one per partition."""
    size = partition_size(length, num_partitions)
    n = 1 if shared else num_partitions
    off = jax.random.randint(key, (n,), 0, size, dtype=jnp.int32)
    return jnp.broadcast_to(off, (num_partitions,))


def partition_slices(x: jax.Array, axis: int, offsets: jax.Array) -> jax.Array:
    """One slice per partition along spatial ``axis`` (0, 1, 2 for D, H, W).

    x: ``(N, D, H, W, C)``; offsets: int ``(P,)`` within-partition offsets (may be traced).
    Returns ``(N, P, C, F)`` with F the product of the two other spatial sizes: each slice
    flattened per channel, as the similarity is taken per channel over the slice.
    """
    if x.ndim != 5:
        raise ValueError(f"expected (N, D, H, W, C), got shape {x.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (D, H, W), got {axis}")
    num_partitions = offsets.shape[0]
    length = x.shape[1 + axis]
    idx = jnp.arange(num_partitions) * partition_size(length, num_partitions) + offsets
    s = jnp.take(x, idx, axis=1 + axis)  # (N, ..P.., C) with P at axis position
    s = jnp.moveaxis(s, 1 + axis, 1)  # (N, P, a, b, C)
    n, p, a, b, c = s.shape
    return jnp.moveaxis(s, -1, 2).reshape(n, p, c, a * b)


def sample_triplets(key, num_images: int, num_partitions: int, k: int):
    """K comparative triplets drawn uniformly from all (i, j != i, p, p~ != p): int32 ``(K, 4)``
    columns (i, j, p, p~). Uniform over the valid set, so the mean loss over them is an unbiased
    estimate of the all-triplet mean. ``key``: a JAX key (a jax array back), or a NumPy
    ``Generator`` (a NumPy array back: how jaxseg's input pipeline draws them for every step)."""
    if num_images < 2:
        raise ValueError("comparative triplets need at least 2 images")
    if isinstance(key, np.random.Generator):
        i = key.integers(0, num_images, k)
        j = (i + key.integers(1, num_images, k)) % num_images
        p = key.integers(0, num_partitions, k)
        q = (p + key.integers(1, num_partitions, k)) % num_partitions
        return np.stack([i, j, p, q], axis=1).astype(np.int32)
    ki, kj, kp, kq = jax.random.split(key, 4)
    i = jax.random.randint(ki, (k,), 0, num_images)
    j = (i + jax.random.randint(kj, (k,), 1, num_images)) % num_images
    p = jax.random.randint(kp, (k,), 0, num_partitions)
    q = (p + jax.random.randint(kq, (k,), 1, num_partitions)) % num_partitions
    return jnp.stack([i, j, p, q], axis=1).astype(jnp.int32)
