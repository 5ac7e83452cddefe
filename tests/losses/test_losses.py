"""Pre-training objectives and segmentation losses against slow, obviously-correct NumPy loops."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import losses as L

RNG = np.random.default_rng(0)


def np_cos(a, b, eps=1e-6):
    """Per-channel cosine of two (C, F) slices -> (C,)."""
    out = []
    for c in range(a.shape[0]):
        na = max(np.sqrt(np.sum(a[c] ** 2)), eps)
        nb = max(np.sqrt(np.sum(b[c] ** 2)), eps)
        out.append(np.sum(a[c] * b[c]) / (na * nb))
    return np.array(out)


def np_softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def np_comparative_paper(s, t):
    n, p = s.shape[:2]
    terms = []
    for i, j, a, b in itertools.product(range(n), range(n), range(p), range(p)):
        if i != j and a != b:
            terms.append(np_softplus((np_cos(s[i, a], s[i, b]) - np_cos(s[i, a], s[j, a])) / t))
    return np.mean(terms)


def np_comparative_code(s, t):
    n, p = s.shape[:2]
    terms = []
    for a in range(p):
        for r, m in itertools.permutations(range(n), 2):
            for m2, b in itertools.product(range(n), range(p)):
                if b != a:
                    terms.append(np_softplus((np_cos(s[r, a], s[m2, b]) - np_cos(s[r, a], s[m, a])) / t))
    return np.mean(terms)


def np_infonce(ref, pos, negs, t):
    out = []
    for c in range(ref.shape[0]):
        sp = np_cos(ref, pos)[c] / t
        sn = [np_cos(ref, n)[c] / t for n in negs]
        out.append(-np.log(np.exp(sp) / (np.exp(sp) + np.sum(np.exp(sn)))))
    return np.mean(out)


def np_contrastive_paper(s, t):
    n, p = s.shape[:2]
    terms = [np_infonce(s[i, a], s[j, a], [s[i, b] for b in range(p) if b != a], t)
             for i, j, a in itertools.product(range(n), range(n), range(p)) if i != j]
    return np.mean(terms)


def np_contrastive_global(s, t):
    n, p = s.shape[:2]
    terms = []
    for a in range(p):
        for i, j in itertools.permutations(range(n), 2):
            negs = [s[m, b] for m in range(n) for b in range(p) if b != a]
            terms.append(np_infonce(s[i, a], s[j, a], negs, t))
    return np.mean(terms)


SHAPES = [(2, 2, 1, 5), (4, 4, 2, 7), (3, 5, 3, 4)]  # (N, P, C, F)
REFS = {
    "comparative": np_comparative_paper,
    "comparative_code": np_comparative_code,
    "contrastive": np_contrastive_paper,
    "contrastive_global": np_contrastive_global,
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(REFS))
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_objective_matches_numpy_loop(name, shape, temperature):
    s = RNG.standard_normal(shape).astype(np.float32)
    got = float(L.OBJECTIVES[name](jnp.asarray(s), temperature))
    want = np_comparative_paper(s, temperature) if name == "comparative" else REFS[name](s.astype(np.float64), temperature)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REFS))
def test_objective_jit_vmap_grad(name):
    fn = L.OBJECTIVES[name]
    s = jnp.asarray(RNG.standard_normal((3, 4, 2, 6)).astype(np.float32))
    eager = fn(s, 0.1)
    np.testing.assert_allclose(jax.jit(fn, static_argnums=1)(s, 0.1), eager, rtol=1e-6)
    batch = jnp.stack([s, s[::-1], 2 * s])
    vm = jax.vmap(lambda x: fn(x, 0.1))(batch)
    np.testing.assert_allclose(vm, [fn(b, 0.1) for b in batch], rtol=1e-5)
    g = jax.grad(lambda x: fn(x, 0.1))(s)
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0


def test_contrastive_stable_at_low_temperature():
    s = jnp.asarray(RNG.standard_normal((2, 4, 2, 6)).astype(np.float32))
    for fn in (L.contrastive_paper, L.contrastive_global):
        v, g = jax.value_and_grad(lambda x: fn(x, 0.01))(s)
        assert np.isfinite(float(v)) and bool(jnp.isfinite(g).all())


def test_pairwise_losses_match_numpy():
    ref, pos, neg = (RNG.standard_normal((5, 3, 8)) for _ in range(3))
    negs = RNG.standard_normal((5, 4, 3, 8))
    want = np.mean([np_softplus((np_cos(r, n) - np_cos(r, p)) / 0.5) for r, p, n in zip(ref, pos, neg)])
    np.testing.assert_allclose(L.comparative_loss(ref, pos, neg, 0.5), want, rtol=1e-5)
    want = np.mean([np_infonce(r, p, ns, 0.2) for r, p, ns in zip(ref, pos, negs)])
    np.testing.assert_allclose(L.contrastive_loss(ref, pos, negs, 0.2), want, rtol=1e-5)
    a, b = RNG.standard_normal((4, 2, 9)), RNG.standard_normal((9,))
    np.testing.assert_allclose(L.cosine_similarity(a, b), [[np_cos(x[c:c + 1], b[None])[0] for c in range(2)] for x in a], rtol=1e-5)
    assert float(L.cosine_similarity(jnp.zeros(4), jnp.ones(4))) == 0.0


def test_sampled_comparative_is_unbiased():
    s = jnp.asarray(RNG.standard_normal((4, 6, 2, 5)).astype(np.float32))
    full = float(L.comparative_paper(s, 0.5))
    keys = jax.random.split(jax.random.key(0), 400)

    @jax.jit
    def one(key):
        return L.comparative_sampled(s, L.sample_triplets(key, 4, 6, 16), 0.5)

    vals = np.asarray(jax.vmap(one)(keys))
    assert abs(vals.mean() - full) < 4 * vals.std() / np.sqrt(len(vals))
    assert vals.std() > 0  # it really samples
    tri = np.asarray(L.sample_triplets(jax.random.key(1), 4, 6, 5000))
    assert (tri[:, 0] != tri[:, 1]).all() and (tri[:, 2] != tri[:, 3]).all()
    assert set(tri[:, 0]) == set(range(4)) and set(tri[:, 3]) == set(range(6))


def test_every_objective_is_called_the_same_way():
    s = jnp.asarray(RNG.standard_normal((3, 4, 2, 5)).astype(np.float32))
    tri = L.sample_triplets(jax.random.key(0), 3, 4, 8)
    assert set(L.OBJECTIVE_NAMES) == set(L.OBJECTIVES) | set(L.SAMPLED_OBJECTIVES)
    for name in L.OBJECTIVE_NAMES:
        got = L.get_objective(name)(s, 0.5, triplets=tri)
        if name in L.OBJECTIVES:
            np.testing.assert_allclose(got, L.OBJECTIVES[name](s, 0.5), rtol=1e-6)
        else:
            np.testing.assert_allclose(got, L.comparative_sampled(s, tri, 0.5), rtol=1e-6)
    with pytest.raises(ValueError, match="needs triplets"):
        L.get_objective("comparative_sampled")(s, 0.5)
    with pytest.raises(ValueError, match="unknown objective 'triplet'"):
        L.get_objective("triplet")


def test_partition_slices_take_the_right_voxels():
    x = RNG.standard_normal((2, 8, 12, 6, 3)).astype(np.float32)
    offs = jnp.array([1, 0, 2, 1])
    for axis in range(3):
        got = np.asarray(L.partition_slices(jnp.asarray(x), axis, offs))
        size = x.shape[1 + axis] // 4
        for n in range(2):
            for p in range(4):
                sl = np.take(x[n], p * size + int(offs[p]), axis=axis)  # (a, b, C)
                np.testing.assert_array_equal(got[n, p], np.moveaxis(sl, -1, 0).reshape(3, -1))


def test_offsets_shared_or_per_partition():
    shared = np.asarray(L.sample_offsets(jax.random.key(0), 96, 4, shared=True))
    assert len(set(shared)) == 1 and 0 <= shared[0] < 24
    per = np.stack([np.asarray(L.sample_offsets(k, 96, 4, shared=False)) for k in jax.random.split(jax.random.key(1), 20)])
    assert per.max() < 24 and per.min() >= 0 and any(len(set(r)) > 1 for r in per)
    with pytest.raises(ValueError, match="cannot hold"):
        L.partition_size(3, 4)


# ---- segmentation losses ----

def np_dice_ce(logits, onehot, mode, include_background):
    if mode == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        ce = -np.mean(np.sum(onehot * np.log(probs), -1))
    else:
        probs = 1 / (1 + np.exp(-logits))
        ce = -np.mean(onehot * np.log(probs) + (1 - onehot) * np.log(1 - probs))
    dices = []
    for b in range(logits.shape[0]):
        for k in range(0 if include_background else 1, logits.shape[-1]):
            p, t = probs[b, ..., k], onehot[b, ..., k]
            dices.append(1 - (2 * np.sum(p * t) + 1e-5) / (np.sum(p) + np.sum(t) + 1e-5))
    return np.mean(dices) + ce


@pytest.mark.parametrize("include_background", [True, False])
def test_dice_ce_matches_numpy(include_background):
    logits = RNG.standard_normal((2, 5, 6, 4, 3))
    labels = RNG.integers(0, 3, (2, 5, 6, 4))
    onehot = np.eye(3)[labels]
    want = np_dice_ce(logits, onehot, "softmax", include_background)
    np.testing.assert_allclose(L.dice_ce_loss(logits, labels, "softmax", include_background), want, rtol=1e-5)
    np.testing.assert_allclose(L.dice_ce_loss(logits, onehot, "softmax", include_background), want, rtol=1e-5)
    multi = (RNG.random((2, 5, 6, 4, 3)) > 0.5).astype(np.float32)
    want = np_dice_ce(logits, multi, "sigmoid", True)
    np.testing.assert_allclose(L.dice_ce_loss(logits, multi, "sigmoid"), want, rtol=1e-5)


def test_dice_ce_errors():
    with pytest.raises(ValueError, match="mode"):
        L.dice_ce_loss(jnp.zeros((1, 2, 2, 2, 2)), jnp.zeros((1, 2, 2, 2), int), "relu")
    with pytest.raises(ValueError, match="multi-hot"):
        L.dice_ce_loss(jnp.zeros((1, 2, 2, 2, 2)), jnp.zeros((1, 2, 2, 2), int), "sigmoid")
    with pytest.raises(ValueError, match="matches neither"):
        L.dice_ce_loss(jnp.zeros((1, 2, 2, 2, 2)), jnp.zeros((1, 2, 2, 2, 3)))
    # where MONAI refuses too: softmax over one channel, labels outside the classes (silently all-zero one-hot)
    with pytest.raises(ValueError, match="one channel"):
        L.dice_loss(jnp.zeros((1, 2, 2, 2, 1)), jnp.zeros((1, 2, 2, 2), int))
    for bad in (2, -1):
        with pytest.raises(ValueError, match=r"target labels must lie in \[0, 1\]"):
            L.dice_ce_loss(jnp.zeros((1, 2, 2, 2, 2)), jnp.full((1, 2, 2, 2), bad))
    # under jit the values are unknown: no check, no error (the training step's labels come from the pipeline)
    assert jnp.isfinite(jax.jit(L.dice_ce_loss)(jnp.zeros((1, 2, 2, 2, 2)), jnp.zeros((1, 2, 2, 2), int)))


@pytest.mark.parametrize("n, p, t", [(4, 4, 1.0), (2, 8, 0.1), (6, 3, 0.5)])
def test_chance_levels_equal_the_closed_forms(n, p, t):
    from jaxseg.losses import chance_loss

    assert chance_loss("comparative", n, p, t) == pytest.approx(math.log(2), rel=1e-4)
    assert chance_loss("comparative_code", n, p, t) == pytest.approx(math.log(2), rel=1e-4)
    assert chance_loss("comparative_sampled", n, p, t) == pytest.approx(math.log(2), rel=1e-4)
    assert chance_loss("contrastive", n, p, t) == pytest.approx(math.log(p), rel=1e-4)  # 1 positive, P-1 negatives
    assert chance_loss("contrastive_global", n, p, t) == pytest.approx(math.log(1 + n * (p - 1)), rel=1e-4)


def test_a_constant_encoder_is_flagged_as_not_learning():
    from jaxseg.losses import chance_loss, get_objective, learning_report

    n, p = 4, 4
    constant = jnp.full((n, p, 8, 16), 0.3)  # what a collapsed encoder gives every slice
    rng = np.random.default_rng(0)
    parts = rng.normal(size=(1, p, 8, 16))
    informative = jnp.asarray(parts + 0.1 * rng.normal(size=(n, p, 8, 16)), jnp.float32)  # partitions told apart
    for name in ("comparative", "contrastive"):
        chance = chance_loss(name, n, p)
        flat = float(get_objective(name)(constant))
        assert flat == pytest.approx(chance, rel=1e-4)  # float32 rounding: 1.5e-5 apart with XLA's optimisation off
        assert learning_report(flat, chance)["learned"] is False
        assert learning_report(0.99 * chance, chance)["learned"] is False  # within 2%
        good = float(get_objective(name)(informative))
        rep = learning_report(good, chance)
        assert rep["learned"] is True and rep["loss_vs_chance"] == pytest.approx(good / chance)


def test_the_numpy_triplet_sampler_draws_the_same_valid_set():
    tri = L.sample_triplets(np.random.default_rng(0), 4, 6, 5000)
    assert isinstance(tri, np.ndarray) and tri.dtype == np.int32 and tri.shape == (5000, 4)
    assert (tri[:, 0] != tri[:, 1]).all() and (tri[:, 2] != tri[:, 3]).all()
    assert set(tri[:, 0]) == set(range(4)) and set(tri[:, 3]) == set(range(6))
    s = jnp.asarray(RNG.standard_normal((4, 6, 2, 5)).astype(np.float32))
    vals = [float(L.comparative_sampled(s, L.sample_triplets(np.random.default_rng(k), 4, 6, 16), 0.5))
            for k in range(300)]
    assert abs(np.mean(vals) - float(L.comparative_paper(s, 0.5))) < 4 * np.std(vals) / np.sqrt(len(vals))  # unbiased
