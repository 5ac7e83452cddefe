"""Session-wide setup and shared fixtures. The suite uses jaxseg's own persistent compilation
cache, in a fresh folder shared with the entry points it runs as subprocesses, so that a program
compiled by one test (the tiny UNETR's init, fine-tuning step, evaluation forward...) loads in the
next; and one small phantom dataset with its preprocessing cache serves every test that reads
cached cases."""

import os
import tempfile

import pytest

from jaxseg.compilation_cache import enable_compilation_cache

os.environ.setdefault("JAXSEG_CACHE_DIR", tempfile.mkdtemp(prefix="jaxseg-tests-xla-"))
enable_compilation_cache(os.environ["JAXSEG_CACHE_DIR"])


@pytest.fixture(scope="session")
def spleen_dir(tmp_path_factory):
    """Six phantom spleen CT subjects (and one test image) in MSD layout, anisotropic spacing."""
    from jaxseg.data import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("spleen"), "spleen", 6, n_test=1, shape=(40, 40, 24),
                                 spacing=(1.2, 1.2, 2.0), seed=3)


@pytest.fixture(scope="session")
def spleen_cache(spleen_dir, tmp_path_factory):
    """``spleen_dir`` prepared (RAS, 1 mm, CT window, foreground crop) into a ``Cache``."""
    from jaxseg.data import Cache, load_dataset_json, prepare

    out = tmp_path_factory.mktemp("cache")
    prepare(load_dataset_json(spleen_dir), out, progress=False, workers=2)
    return Cache(out)
