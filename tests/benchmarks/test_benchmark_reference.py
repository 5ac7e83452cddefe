"""The PyTorch reference losses used by the benchmarks compute what jaxseg computes."""

import itertools

import numpy as np
import torch

from benchmarks.torch_reference import (comparative_loop, comparative_vectorised, contrastive_loop,
                                        contrastive_vectorised, partition_slices)
from jaxseg import losses as L


def test_torch_reference_losses_match_jaxseg():
    s = np.random.default_rng(0).standard_normal((4, 4, 3, 10)).astype(np.float32)
    t = torch.from_numpy(s)
    np.testing.assert_allclose(float(comparative_vectorised(t, 0.1)), float(L.comparative_paper(s, 0.1)), rtol=1e-5)
    np.testing.assert_allclose(float(contrastive_vectorised(t, 0.1)), float(L.contrastive_paper(s, 0.1)), rtol=1e-5)
    # The loop sums the authors' 576 triplets; jaxseg's comparative_code averages them.
    np.testing.assert_allclose(float(comparative_loop(t, 0.1)), 576 * float(L.comparative_code(s, 0.1)), rtol=1e-4)


def test_torch_partition_slices_match_jaxseg():
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 12, 4)).astype(np.float32)  # (M, C, D, H, W)
    offs = [1, 0, 1, 0]
    for axis in range(3):
        got = partition_slices(torch.from_numpy(x), axis, offs).numpy()
        want = np.asarray(L.partition_slices(np.moveaxis(x, 1, -1), axis, np.array(offs)))
        np.testing.assert_array_equal(got, want)


def _np_cos(a, b):  # per channel over the flattened slice
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_torch_contrastive_loop_matches_a_numpy_loop():
    """The authors' contrastive code, term by term: for each (partition a, ordered pair r != m,
    dissimilar (m2, b != a)) entry, -mean_C log(e^{s(r,m)/T} / (e^{s(r,m)/T} + sum over ALL entries'
    dissimilar slices e^{s(r,(m2,b))/T})); summed over the first ``entries`` entries."""
    s = np.random.default_rng(2).standard_normal((3, 3, 2, 6))
    n, p, t = 3, 3, 0.1
    entries = [(a, r, m, m2, b) for a in range(p) for r, m in itertools.permutations(range(n), 2)
               for m2, b in itertools.product(range(n), range(p)) if b != a]
    want = 0.0
    for a, r, m, _, _ in entries[:5]:
        pos = np.exp(_np_cos(s[r, a], s[m, a]) / t)
        neg = sum(np.exp(_np_cos(s[r, a], s[m2, b]) / t) for (_, _, _, m2, b) in entries)
        want += float(np.mean(-np.log(pos / (pos + neg))))
    got = float(contrastive_loop(torch.from_numpy(s), t, entries=5))
    np.testing.assert_allclose(got, want, rtol=1e-6)
