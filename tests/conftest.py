"""Session-wide setup and shared fixtures. The suite uses jaxseg's own persistent compilation
cache, in a fresh folder shared with the entry points it runs as subprocesses, so that a program
compiled by one test (the tiny UNETR's init, fine-tuning step, evaluation forward...) loads in the
next; and one small phantom dataset with its preprocessing cache serves every test that reads
cached cases; and the long subprocess jobs that tests read (the tiny Table 1 runs, the GPU script
at toy size, the convergence benchmark) run in a background lane beside the others. Everything
compiles with XLA's backend optimisation off (``TEST_XLA_FLAGS``, tests/runs.py)."""

import concurrent.futures
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jaxseg.compilation_cache import enable_compilation_cache
from tests.runs import ROOT, TEST_XLA_FLAGS, TINY_TABLE1, job_commands, kill_live_jobs, run_job

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()  # before JAX starts its backend
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


# Long subprocess jobs that tests read: run one at a time in a background lane from the start of
# the session, on the core the mostly single-threaded tests leave idle, while the tests that
# read them are moved to the end (``pytest_collection_modifyitems``). Each: fixture name ->
# (its commands, run together, and the folder or file it leaves, from its own folder and the tiny
# data; its time limit).
def _table1_one_process(wd, data):
    return job_commands("experiments.table1", [*TINY_TABLE1, *data, "--seeds=2", f"--workdir={wd}"]), wd


def _table1_two(wd, data):
    return job_commands("experiments.table1", [*TINY_TABLE1, *data, "--seeds=1", f"--workdir={wd}"], n=2), wd


def _gpu_script(wd, data):
    env = {**os.environ, "JAXSEG_BENCH_SIZE": "tiny", "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu",
           "JAXSEG_CACHE_DIR": str(wd / "xla"), "PYTHONPATH": str(ROOT)}  # a cold cache, as on a GPU machine's first run
    return [(["bash", "benchmarks/run_gpu.sh", str(wd / "out")], env)], wd / "out"


def _convergence(wd, data):
    return job_commands("benchmarks.pretrain_throughput", ["--mode=convergence", "--config=tiny", "--max_steps=4",
                                                            "--stages=encoder", f"--workdir={wd / 'w'}",
                                                            f"--json_out={wd / 'conv.json'}"]), wd / "conv.json"


BACKGROUND = {  # in the lane's order: the Table 1 runs first, the tests reading them come last
    "table1_one_process": (_table1_one_process, 600),  # tiny Table 1, 2 seeds, 1 process x 4 devices
    "table1_two": (_table1_two, 600),  # the same, seed 0, on 2 processes x 2 devices (240 s alone; the lane shares the CPU)
    "gpu_script_out": (_gpu_script, 900),  # benchmarks/run_gpu.sh at toy size
    "convergence_json": (_convergence, 600),  # benchmarks.pretrain_throughput --mode=convergence, tiny
}
LANE = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tests-background")
JOBS: dict[str, concurrent.futures.Future] = {}
START = time.monotonic()
TOOK: dict[str, tuple[float, float]] = {}  # job -> (its start, its duration), in s from the session's start


def pytest_terminal_summary(terminalreporter):
    """When each background job ran: whether the lane or the tests beside it set the suite's time."""
    if TOOK:
        terminalreporter.write_line("background lane: " + ", ".join(
            f"{name} {took:.0f} s from {start:.0f} s" for name, (start, took) in TOOK.items()))


def _job(name, folder, data):
    """In the lane: the job's commands are made when it starts (a port picked minutes earlier may
    be taken by then), and a failure to make the shared data is the job's failure."""
    if isinstance(data, BaseException):
        raise RuntimeError("the tiny phantom data (fixture tiny_data) could not be made") from data
    make, timeout = BACKGROUND[name]
    commands, value = make(folder, data)
    t0 = time.monotonic()
    try:
        return run_job(commands, timeout), value
    finally:
        TOOK[name] = (t0 - START, time.monotonic() - t0)


def _submit(request, name):
    try:
        data = request.getfixturevalue("tiny_data")
    except Exception as e:  # noqa: BLE001 - the tests that read this job fail with it, not every test
        data = e
    JOBS[name] = LANE.submit(_job, name, request.getfixturevalue("tmp_path_factory").mktemp(name), data)


def pytest_collection_modifyitems(config, items):
    """The tests that read a background job run last, in the lane's order, so that the jobs run
    beside the other tests and each is done before a test waits for it. Before them, the tests
    that start processes of their own (marked slow) come after the in-process ones: the lane's
    jobs, which keep both cores busy, then run beside tests that mostly use one."""
    order = {name: i for i, name in enumerate(BACKGROUND)}

    def position(item):
        lane = max((order[f] for f in getattr(item, "fixturenames", ()) if f in order), default=-1)
        return lane, item.get_closest_marker("slow") is not None

    items.sort(key=position)  # stable: otherwise in the order collected


@pytest.fixture(scope="session", autouse=True)
def background_jobs(request):
    """Start the background jobs that the collected tests read (none: nothing is started); at the
    end (or on an interrupt) stop the lane and kill what runs in it."""
    wanted = {f for item in request.session.items for f in getattr(item, "fixturenames", ())} & BACKGROUND.keys()
    try:
        for name in BACKGROUND:
            if name in wanted:
                _submit(request, name)
        yield
    finally:
        LANE.shutdown(wait=False, cancel_futures=True)  # no queued job starts...
        kill_live_jobs()  # ... and the running one (and any that starts from now on) is killed
        LANE.shutdown(wait=True)


def background(request, name: str) -> tuple[Path, str]:
    """(its folder or file, its output) of background job ``name`` once it finished (started here
    if the session did not: a fixture reached another way); fails the test (with the job's
    output) if a process of it failed or hung."""
    if name not in JOBS:
        _submit(request, name)
    results, value = JOBS[name].result()
    for rc, text in results:
        assert rc == 0, f"background job {name}: exit {rc}\n{text[-4000:]}"
    return value, "".join(text for _, text in results)


@pytest.fixture(scope="session")
def table1_one_process(request) -> tuple[Path, str]:
    """(work dir, output) of ``experiments.table1`` at tiny size over 2 seeds on one process with
    4 CPU devices: the main job's smoke test, and the reference the 2-process run must equal."""
    return background(request, "table1_one_process")


@pytest.fixture(scope="session")
def table1_two(request) -> Path:
    """table1 at tiny size (pre-training, fine-tuning with validation and best-model keeping,
    evaluation) on 2 processes x 2 devices, one seed."""
    return background(request, "table1_two")[0]


@pytest.fixture(scope="session")
def gpu_script_out(request) -> Path:
    """The output folder of benchmarks/run_gpu.sh with JAXSEG_BENCH_SIZE=tiny, on this CPU."""
    return background(request, "gpu_script_out")[0]


@pytest.fixture(scope="session")
def convergence_json(request) -> Path:
    """benchmarks.pretrain_throughput --mode=convergence of the tiny config's encoder stage."""
    return background(request, "convergence_json")[0]
