"""Several processes for real: two on localhost (``--coordinator``, 2 CPU devices each), every
process under a timeout so a hang fails the test. A 2-process pre-training equals a 1-process
run over the same 4 devices; a killed rank ends the other in bounded time with one line naming
it; SIGTERM (preemption) and SIGKILL of both mid-run resume to the uninterrupted result; one
writer per output folder."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxseg.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# Tiny pre-training, long enough to be interrupted mid-stage; a checkpoint every 8 steps (each
# costs more than a tiny step), and one when preempted.
PRETRAIN = ["--config=tiny", "--noprogress", "--phantom_subjects=6", "--stage1_steps=16", "--stage2_steps=3",
            "--objective=comparative", "--ckpt_every=8"]
TIMEOUT_S = 240
DATA: list[str] = []  # --data_dir / --cache_dir of one dataset prepared for the whole module


@pytest.fixture(scope="module", autouse=True)
def shared_data(tmp_path_factory):
    """One phantom dataset and cache for every run here (each run would otherwise make its own)."""
    from jaxseg.config import get_config
    from jaxseg.data import load_dataset_json, prepare, write_phantom_dataset

    root = tmp_path_factory.mktemp("data")
    cfg = get_config("tiny", phantom_subjects=6)
    data = write_phantom_dataset(root / "phantom", "spleen", 6, seed=cfg.data.seed)
    prepare(load_dataset_json(data), root / "cache", cfg.prepare(), progress=False)
    DATA[:] = [f"--data_dir={data}", f"--cache_dir={root / 'cache'}"]
    yield
    DATA.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _free_slurm_port() -> int:
    """A free port among those JAX's SLURM support picks from (61440..65535); a port merely
    derived from a random one may be taken by another connection."""
    import random

    for port in random.sample(range(61440, 65536), 200):
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 61440..65535")


def _env(devices: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _start(workdir, n: int, *extra: str, heartbeat: int = 30) -> list[subprocess.Popen]:
    """n processes of experiments.pretrain (2 devices each); one process: 4 devices."""
    if n == 1:
        cmd = [sys.executable, "-m", "experiments.pretrain", *PRETRAIN, *DATA, f"--workdir={workdir}", *extra]
        return [subprocess.Popen(cmd, cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)]
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "experiments.pretrain", *PRETRAIN, *DATA, f"--workdir={workdir}",
                              *extra,
                              f"--coordinator=localhost:{port}", f"--num_processes={n}", f"--process_id={i}",
                              f"--heartbeat_timeout={heartbeat}"],
                             cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(n)]


def _wait(procs, timeout=TIMEOUT_S) -> list[tuple[int, str]]:
    out, deadline = [], time.monotonic() + timeout
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process of the run did not finish within {timeout} s (hang)")
        out.append((p.returncode, text))
    return out


def _run(workdir, n, *extra):
    results = _wait(_start(workdir, n, *extra))
    for rc, text in results:
        assert rc == 0, text[-4000:]
    return results


def _until_step(path: Path, step: int, procs, timeout=TIMEOUT_S) -> None:
    """Wait until ``path`` (a metrics.jsonl) has logged ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and sum(1 for _ in path.open()) >= step:
            return
        if any(p.poll() is not None for p in procs):
            pytest.fail("a process ended early:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
        time.sleep(0.1)
    for p in procs:
        p.kill()
    pytest.fail(f"{path} never reached step {step}")


def _losses(workdir: Path) -> dict[str, list[float]]:
    return {stage: [json.loads(l)["loss"] for l in (workdir / "pretrain" / stage / "metrics.jsonl").open()]
            for stage in ("encoder", "decoder")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-process pre-training (the result every interrupted run must give)."""
    wd = tmp_path_factory.mktemp("ref2")
    results = _run(wd, 2)
    return wd, results


def test_two_processes_equal_one_process_over_the_same_devices_and_write_once(reference, tmp_path):
    wd2, results = reference
    _run(tmp_path, 1)
    one, two = _losses(tmp_path), _losses(wd2)
    for stage in one:
        assert len(two[stage]) == len(one[stage]) >= 3
        np.testing.assert_allclose(two[stage], one[stage], rtol=1e-4, err_msg=stage)
    for stage in ("encoder", "decoder"):  # every metrics row once: only process 0 writes
        steps = [json.loads(l)["step"] for l in (wd2 / "pretrain" / stage / "metrics.jsonl").open()]
        assert steps == list(range(1, len(steps) + 1))
    out = wd2 / "pretrain"
    assert (out / "params.msgpack").is_file() and (out / "pretrain_summary.json").is_file()
    assert not list(wd2.rglob(".write_test*")) and not list(wd2.rglob("*.tmp"))
    assert all("pre-training (comparative)" in text for _, text in results)  # both processes finished


def test_a_killed_rank_ends_the_other_in_bounded_time_naming_it(tmp_path):
    procs = _start(tmp_path, 2, "--stage1_steps=500", heartbeat=15)
    _until_step(tmp_path / "pretrain" / "encoder" / "metrics.jsonl", 2, procs)
    procs[1].kill()
    t0 = time.monotonic()
    rc, text = _wait(procs[:1], timeout=90)[0]
    assert rc == 3, text[-3000:]
    assert time.monotonic() - t0 < 60
    assert "process 1 of 2 stopped responding" in text and "Traceback" not in text


def test_preempted_then_killed_runs_resume_to_the_uninterrupted_result(reference, tmp_path):
    """SIGTERM to one rank: both checkpoint at the same step and exit 143 within seconds. Then the
    resumed run loses both processes to SIGKILL mid-stage. The third run resumes and must give the
    reference's parameters bit for bit."""
    wd_ref, _ = reference
    procs = _start(tmp_path, 2)
    enc = tmp_path / "pretrain" / "encoder"
    _until_step(enc / "metrics.jsonl", 3, procs)
    procs[1].send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    results = _wait(procs, timeout=90)
    assert time.monotonic() - t0 < 30
    assert [rc for rc, _ in results] == [143, 143], "\n".join(t[-2000:] for _, t in results)
    stopped = {int(t.split("after step ")[1].split(";")[0]) for _, t in results}
    assert len(stopped) == 1  # the same step on both: JAX's preemption sync point
    assert str(stopped.pop()) in os.listdir(enc / "checkpoints")

    procs = _start(tmp_path, 2)
    _until_step(tmp_path / "pretrain" / "decoder" / "metrics.jsonl", 1, procs)
    for p in procs:
        p.kill()
    _wait(procs)
    _run(tmp_path, 2)
    assert (tmp_path / "pretrain" / "params.msgpack").read_bytes() == (wd_ref / "pretrain" / "params.msgpack").read_bytes()
    assert _losses(tmp_path) == _losses(wd_ref)


def test_one_writer_per_folder_and_a_dead_holder_is_taken_over(tmp_path):
    from jaxseg.distributed import acquire_folder, release_folder, sole_writer

    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from jaxseg.distributed import acquire_folder
acquire_folder({str(folder)!r})
print("held", flush=True)
time.sleep(120)
"""], cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by another run \\(pid {holder.pid} on host {socket.gethostname()}"):
            acquire_folder(folder)
    finally:
        holder.kill()
        holder.wait(30)
    with sole_writer(folder):  # the kernel dropped the dead holder's lock
        with sole_writer(folder):  # re-entrant within one process
            pass
        info = json.loads((tmp_path / ".run.lock").read_text())
        assert info["pid"] == os.getpid()
    release_folder(folder)  # releasing what is not held is harmless


def test_a_second_run_in_the_same_output_folder_is_refused_at_once(tmp_path):
    from jaxseg.distributed import sole_writer

    with sole_writer(tmp_path / "pretrain"):  # as a running pre-training holds it
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "experiments.pretrain", *PRETRAIN, f"--workdir={tmp_path}"],
                              cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and time.monotonic() - t0 < 60
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_slurm_environment_is_detected_without_flags():
    """Under SLURM (here its environment, faked for two local tasks) no multi-host flag is needed."""
    job = str(_free_slurm_port() - 61440)  # JAX derives the coordinator port from the job id: 61440 + id % 4096
    script = """
import jax
from jaxseg.distributed import barrier, initialize
assert initialize()
barrier("hello", timeout_s=60)
print("OK", jax.process_index(), jax.process_count(), len(jax.devices()), flush=True)
"""
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env={**_env(2), "SLURM_JOB_ID": job, "SLURM_STEP_NODELIST": "localhost",
                                   "SLURM_NTASKS": "2", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
             for i in range(2)]
    results = _wait(procs, timeout=120)
    for i, (rc, text) in enumerate(results):
        assert rc == 0 and f"OK {i} 2 4" in text, text[-3000:]


def test_a_crash_on_one_process_stops_the_others_at_once_naming_it():
    """An unexpected exception on process 1 (not a user error): process 0, waiting at a barrier,
    exits within seconds with one line naming process 1 and its error, not after the barrier's
    timeout."""
    port = _free_port()
    script = f"""
import os
from experiments import cli
from jaxseg.distributed import barrier, initialize

def main(argv):
    pid = int(os.environ["PID"])
    initialize("localhost:{port}", 2, pid, 30)
    barrier("start", timeout_s=60)
    if pid == 1:
        raise RuntimeError("boom on one host")
    barrier("never reached", timeout_s=600)

cli.run(main)
"""
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={**_env(1), "PID": str(i)}) for i in range(2)]
    t0 = time.monotonic()
    (rc0, out0), (rc1, out1) = _wait(procs, timeout=120)
    assert time.monotonic() - t0 < 60
    assert rc1 == 1 and "boom on one host" in out1
    assert rc0 == 3 and "process 1 of 2 stopped: error: crashed (RuntimeError: boom on one host)" in out0, out0
