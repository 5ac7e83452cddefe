"""What the tests that run jaxseg's entry points as subprocesses share."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The tiny Table 1 protocol the 1- and 2-process runs share. Pre-training as tests/distributed/test_distributed.py's
# PRETRAIN (16 + 3 steps, comparative, a checkpoint every 8): its 2-process run is also the
# uninterrupted reference that a preempted and killed pre-training must equal.
TINY_TABLE1 = ["--config=tiny", "--noprogress", "--phantom_subjects=6", "--objectives=comparative",
               "--stage1_steps=16", "--stage2_steps=3", "--finetune_steps=4", "--eval_every=2", "--ckpt_every=8"]


# The suite compiles far more than it runs (tiny models, a few steps each): with XLA's backend
# optimisation off, a tiny UNETR training step compiles in half the time (14 -> 7 s on 2 cores)
# and the model and step tests take a third less CPU, their results within the same tolerances.
# Set for the test session and every process it starts; users and benchmarks keep XLA's defaults.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def cpu_env(devices: int) -> dict:
    """The environment of a subprocess on ``devices`` CPU devices that imports this checkout."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def job_commands(module: str, args, n: int = 1, heartbeat: int = 30, port: int | None = None,
                 per_process=None) -> list[tuple[list[str], dict]]:
    """(argv, env) of each process of ``module`` run on ``n`` processes on localhost (2 CPU
    devices each; one process: 4 devices, the same devices in all); ``per_process(i)``: extra
    flags of process i only."""
    cmd = [sys.executable, "-m", module, *args]
    if n == 1:
        return [(cmd, cpu_env(4))]
    port = port or free_port()
    return [([*cmd, f"--coordinator=localhost:{port}", f"--num_processes={n}", f"--process_id={i}",
              f"--heartbeat_timeout={heartbeat}", *(per_process(i) if per_process else ())], cpu_env(2))
            for i in range(n)]


LIVE: set = set()  # processes of running jobs (each leads its own session), killed if the test session ends first
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``: a job's children too (run_gpu.sh's ``timeout``
    puts its command in a process group of its own, which a group kill would miss)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # the 6th field of /proc/PID/stat, after pid and (comm)
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile


def _kill(p: subprocess.Popen) -> None:
    _kill_session(p.pid)
    with contextlib.suppress(OSError):
        p.kill()


def kill_live_jobs() -> None:
    """Kill the jobs running now and every job started from now on (the session is ending)."""
    with _LIVE_LOCK:
        _STOPPING.set()
        for p in list(LIVE):
            _kill(p)


def run_job(commands, timeout: float) -> list[tuple[int | None, str]]:
    """Start every (argv, env) of ``commands`` together and wait for all: (return code, output)
    of each; a process still running after ``timeout`` s is killed with its children (return code
    None, and the output says so), so a hang ends the job instead of the test session. Output goes
    to files, not pipes: a process blocked on a full pipe while its peer waits for it would hang the job."""
    with tempfile.TemporaryDirectory(prefix="jaxseg-job-") as tmp:
        logs = [open(Path(tmp) / f"{i}.log", "w+") for i in range(len(commands))]
        with _LIVE_LOCK:
            procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True)
                     for (argv, env), log in zip(commands, logs)]
            LIVE.update(procs)
            if _STOPPING.is_set():
                for p in procs:
                    _kill(p)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                break
        out = []
        for p, log in zip(procs, logs):
            hung = p.poll() is None
            _kill_session(p.pid)  # what it left running (a hung job's, or a finished script's stray children)
            if hung:
                p.kill()
                p.wait()
            log.seek(0)
            text = log.read()
            log.close()
            LIVE.discard(p)
            out.append((None, f"{text}\n[did not finish within {timeout} s (hang): killed]") if hung
                       else (p.returncode, text))
        return out

