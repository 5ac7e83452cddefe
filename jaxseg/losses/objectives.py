"""Pre-training objectives: pure functions, safe under ``jit``, ``vmap`` and ``grad``.

Slices are ``(..., C, F)``: the similarity of two slices is the cosine over F taken per channel
(a score per class or feature channel, as in the paper's Eq. 2-3 and the authors' code), and
losses average over channels. ``temperature`` divides every similarity; the paper's equations
use none (T = 1, the default); the authors' code and Chaitanya et al. use T = 0.1.

Whole-batch objectives take ``slices`` of shape ``(N, P, C, F)`` (N images or crops, P
partitions, see ``partition.partition_slices``), compute ONE similarity tensor
``(C, N, P, N, P)`` with an einsum, and select each objective's terms with static masks over
it: no Python loops over triplets, cost O((NP)^2 CF) for the einsum plus O(N^2 P^2 C) for the
terms (``comparative_sampled`` costs O(K C F) whatever P).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Cosine similarity over the last axis, broadcasting over leading axes:
    ``<a, b> / (max(|a|, eps) * max(|b|, eps))`` (zero for an all-zero input)."""
    return jnp.sum(_normalize(a, eps) * _normalize(b, eps), axis=-1)


def comparative_loss(ref, pos, neg, temperature: float = 1.0, eps: float = 1e-6) -> jax.Array:
    """Bradley-Terry triplet loss ``softplus((s(ref, neg) - s(ref, pos)) / T)``.

    ref, pos, neg: ``(..., C, F)`` (broadcastable). Similarity per channel over F; the result
    is averaged over channels and all leading axes (a scalar)."""
    s_pos = cosine_similarity(ref, pos, eps)
    s_neg = cosine_similarity(ref, neg, eps)
    return jnp.mean(jax.nn.softplus((s_neg - s_pos) / temperature))


def contrastive_loss(ref, pos, negs, temperature: float = 1.0, eps: float = 1e-6) -> jax.Array:
    """InfoNCE ``-log(e^{s(r,p)/T} / (e^{s(r,p)/T} + sum_k e^{s(r,n_k)/T}))`` via logsumexp.

    ref, pos: ``(..., C, F)``; negs: ``(..., K, C, F)``. Averaged over channels and leading axes."""
    s_pos = cosine_similarity(ref, pos, eps) / temperature  # (..., C)
    s_neg = cosine_similarity(ref[..., None, :, :], negs, eps) / temperature  # (..., K, C)
    logits = jnp.concatenate([s_pos[..., None, :], s_neg], axis=-2)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-2) - s_pos)


def similarity_tensor(slices: jax.Array, eps: float = 1e-6) -> jax.Array:
    """All pairwise per-channel cosines of ``(N, P, C, F)`` slices: ``(C, N, P, N, P)``."""
    u = _normalize(slices, eps)
    return jnp.einsum("npcf,mqcf->cnpmq", u, u)


# ---- static masks over (i, p, j, q) index space, built once per (N, P) at trace time ----

def _eye(n):
    return np.eye(n, dtype=bool)


def paper_triplet_mask(n: int, p: int) -> np.ndarray:
    """Eq. 2 triplets as a mask over (i, j, p, p~): i != j, p != p~ (ref (i,p), pos (j,p), neg (i,p~))."""
    return (~_eye(n))[:, :, None, None] & (~_eye(p))[None, None, :, :]


def _same_partition(sim):
    """(C, i, p, j, q) -> (C, i, j, p): similarities of partition p across image pairs."""
    p = jnp.arange(sim.shape[2])
    return jnp.moveaxis(sim[:, :, p, :, p], 0, -1)


def _same_image(sim):
    """(C, i, p, j, q) -> (C, i, p, q): similarities of partition pairs within image i."""
    return jnp.moveaxis(jnp.diagonal(sim, axis1=1, axis2=3), -1, 1)


def _masked_mean(values, mask):
    mask = np.broadcast_to(mask, values.shape)
    return jnp.sum(jnp.where(mask, values, 0.0)) / float(mask.sum())


def comparative_paper(slices: jax.Array, temperature: float = 1.0, eps: float = 1e-6) -> jax.Array:
    """Eq. 2 over ALL triplets: reference (i, p), similar (j, p) for j != i, dissimilar (i, p~)
    for p~ != p from the reference's own image. Mean over triplets and channels."""
    n, p = slices.shape[:2]
    sim = similarity_tensor(slices, eps)  # (C, i, p, j, q)
    s_pos, s_neg = _same_partition(sim), _same_image(sim)  # (C, i, j, p), (C, i, p, q)
    z = (s_neg[:, :, None, :, :] - s_pos[..., None]) / temperature  # (C, i, j, p, q)
    return _masked_mean(jax.nn.softplus(z), paper_triplet_mask(n, p)[None])


def comparative_code(slices: jax.Array, temperature: float = 1.0, eps: float = 1e-6) -> jax.Array:
    """The authors' code form: for each partition p, every ordered pair (n, m), n != m, of its
    slices is (reference, similar), and ANY slice (any image) of another partition is the
    dissimilar one: N(N-1) x N(P-1) triplets per partition (144 at N = P = 4).
    Mean over triplets and channels (the code summed over triplets)."""
    n, p = slices.shape[:2]
    sim = similarity_tensor(slices, eps)  # (C, n, p, m, q)
    s_pos = _same_partition(sim)  # (C, n, m, p)
    # terms over (n, m, p, m', q): s(ref (n,p), neg (m',q)) - s(ref (n,p), pos (m,p))
    zz = sim[:, :, None, :, :, :] - s_pos[:, :, :, :, None, None]  # (C, n, m, p, m', q)
    mask = ((~_eye(n))[:, :, None, None, None] & (~_eye(p))[None, None, :, None, :])
    return _masked_mean(jax.nn.softplus(zz / temperature), mask[None])


def comparative_sampled(slices: jax.Array, triplets: jax.Array, temperature: float = 1.0,
                        eps: float = 1e-6) -> jax.Array:
    """Eq. 2 on K sampled triplets ``(K, 4)`` = (i, j, p, p~) (see ``partition.sample_triplets``):
    cost O(K C F), independent of P; unbiased for ``comparative_paper``."""
    i, j, p, q = triplets[:, 0], triplets[:, 1], triplets[:, 2], triplets[:, 3]
    return comparative_loss(slices[i, p], slices[j, p], slices[i, q], temperature, eps)


def contrastive_paper(slices: jax.Array, temperature: float = 1.0, eps: float = 1e-6) -> jax.Array:
    """Eq. 3: for each (i, j != i, p), positive (j, p) against the P-1 negatives (i, p~), p~ != p,
    of the reference's own image. Mean over (i, j, p) and channels."""
    n, p = slices.shape[:2]
    sim = similarity_tensor(slices, eps) / temperature
    s_pos, s_neg = _same_partition(sim), _same_image(sim)  # (C, i, j, p), (C, i, p, q)
    neg = jnp.where(_eye(p)[None, None], -jnp.inf, s_neg)  # drop q == p
    lse_neg = jax.nn.logsumexp(neg, axis=-1)  # (C, i, p)
    lse = jnp.logaddexp(s_pos, lse_neg[:, :, None, :])  # (C, i, j, p)
    mask = (~_eye(n))[None, :, :, None] & np.ones((1, 1, 1, p), bool)
    return _masked_mean(lse - s_pos, mask)


def contrastive_global(slices: jax.Array, temperature: float = 1.0, eps: float = 1e-6) -> jax.Array:
    """Chaitanya et al.'s global loss: for every ordered positive pair (a, b) of slices of the
    same partition from different images (both directions), the negatives are every slice in
    the batch from a different partition. Mean over pairs and channels."""
    n, p = slices.shape[:2]
    sim = similarity_tensor(slices, eps) / temperature  # (C, n, p, m, q)
    diff_part = ~_eye(p)[None, :, None, :]  # (1, p, 1, q) broadcast over n, m
    neg = jnp.where(diff_part[None], sim, -jnp.inf)
    lse_neg = jax.nn.logsumexp(neg, axis=(3, 4))  # (C, n, p)
    s_pos = _same_partition(sim)  # (C, n, m, p)
    lse = jnp.logaddexp(s_pos, lse_neg[:, :, None, :])
    mask = (~_eye(n))[None, :, :, None] & np.ones((1, 1, 1, p), bool)
    return _masked_mean(lse - s_pos, mask)


OBJECTIVES = {
    "comparative": comparative_paper,
    "comparative_code": comparative_code,
    "contrastive": contrastive_paper,
    "contrastive_global": contrastive_global,
}

SAMPLED_OBJECTIVES = ("comparative_sampled",)
OBJECTIVE_NAMES = (*OBJECTIVES, *SAMPLED_OBJECTIVES)


def get_objective(name: str):
    """The objective ``name``, called the same way for all of them:
    ``f(slices (N, P, C, F), temperature, triplets=None) -> scalar``. Sampled objectives
    (``SAMPLED_OBJECTIVES``) need ``triplets`` ``(K, 4)`` (``partition.sample_triplets``); the
    others use every triplet or pair and ignore it."""
    if name in OBJECTIVES:
        fn = OBJECTIVES[name]
        return lambda slices, temperature=1.0, triplets=None: fn(slices, temperature)
    if name == "comparative_sampled":
        def sampled(slices, temperature=1.0, triplets=None):
            if triplets is None:
                raise ValueError("comparative_sampled needs triplets (K, 4) = (i, j, p, p~); see sample_triplets")
            return comparative_sampled(slices, triplets, temperature)
        return sampled
    raise ValueError(f"unknown objective {name!r}; choose from {OBJECTIVE_NAMES}")



def chance_loss(name: str, num_images: int, num_partitions: int, temperature: float = 1.0) -> float:
    """The loss of objective ``name`` when every similarity is equal: what a model that tells
    nothing apart scores (comparative: ln 2; contrastive: ln P; contrastive_global:
    ln(1 + N (P - 1))). Computed by the objective itself on constant slices."""
    from jaxseg.losses.partition import sample_triplets

    slices = jnp.ones((num_images, num_partitions, 1, 2), jnp.float32)
    triplets = sample_triplets(jax.random.key(0), num_images, num_partitions, 64) if name in SAMPLED_OBJECTIVES else None
    return float(get_objective(name)(slices, temperature, triplets=triplets))


DID_NOT_LEARN = 0.98  # a stage whose final loss stays above this fraction of chance learned nothing


def learning_report(final_loss: float, chance: float) -> dict:
    """A stage's final loss (e.g. the mean of its last 10) against ``chance``: the fraction, and
    ``learned`` (False within 2% of chance, or above it)."""
    frac = final_loss / chance if chance else float("nan")
    return {"chance_loss": chance, "loss_vs_chance": frac, "learned": bool(frac < DID_NOT_LEARN)}
