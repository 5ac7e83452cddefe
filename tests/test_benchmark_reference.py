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
    assert np.isfinite(float(contrastive_loop(t, 0.1, entries=3)))


def test_torch_partition_slices_match_jaxseg():
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 12, 4)).astype(np.float32)  # (M, C, D, H, W)
    offs = [1, 0, 1, 0]
    for axis in range(3):
        got = partition_slices(torch.from_numpy(x), axis, offs).numpy()
        want = np.asarray(L.partition_slices(np.moveaxis(x, 1, -1), axis, np.array(offs)))
        np.testing.assert_array_equal(got, want)
