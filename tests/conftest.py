"""Session-wide setup and shared fixtures. The suite uses jaxseg's own persistent compilation
cache, in a fresh folder shared with the entry points it runs as subprocesses, so that a program
compiled by one test (the tiny UNETR's init, fine-tuning step, evaluation forward...) loads in the
next; and one small phantom dataset with its preprocessing cache serves every test that reads
cached cases; and the tiny Table 1 run that several test files read."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jaxseg.compilation_cache import enable_compilation_cache
from tests.runs import ROOT, TINY_TABLE1, cpu_env

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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> list[str]:
    """``--data_dir`` / ``--cache_dir`` of one 6-subject phantom, prepared once for every run
    that passes them (each would otherwise make its own)."""
    from jaxseg.config import get_config
    from jaxseg.data import load_dataset_json, write_phantom_dataset
    from jaxseg.data.cache import prepared_cache

    root = tmp_path_factory.mktemp("tiny_data")
    cfg = get_config("tiny", phantom_subjects=6)
    data = write_phantom_dataset(root / "phantom", "spleen", 6, seed=cfg.data.seed)
    prepared_cache(load_dataset_json(data), root / "cache", cfg.prepare(), progress=False)
    return [f"--data_dir={data}", f"--cache_dir={root / 'cache'}"]


@pytest.fixture(scope="session")
def table1_one_process(tiny_data, tmp_path_factory) -> tuple[Path, str]:
    """(work dir, output) of ``experiments.table1`` at tiny size over 2 seeds on one process with
    4 CPU devices: the main job's smoke test, and the reference the 2-process run must equal."""
    wd = tmp_path_factory.mktemp("table1_1")
    proc = subprocess.run([sys.executable, "-m", "experiments.table1", *TINY_TABLE1, *tiny_data, "--seeds=2",
                           f"--workdir={wd}"], cwd=ROOT, env=cpu_env(4), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return wd, proc.stdout + proc.stderr
