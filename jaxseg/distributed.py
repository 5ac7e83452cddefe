"""Everything about processes in one place: starting a multi-process run (explicit flags, or
SLURM / Open MPI auto-detection), which process writes shared outputs, barriers that give up,
a watchdog that ends the run with one line when a peer process is gone, one writer per output
folder, and preemption (SIGTERM) as a request to checkpoint and stop.

A single-process run pays for none of it: every helper is a no-op or a local check there.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import jax

from jaxseg.errors import UserError, first_line

# JAX's own heartbeat: the coordinator aborts every process this long after one stops. Ours
# (``PeerWatchdog``) fires first, with one line that names the process.
HEARTBEAT_TIMEOUT_S = 100
BARRIER_TIMEOUT_S = 1800  # process 0 may be preparing a large dataset while the others wait
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: what schedulers expect of a job stopped by SIGTERM


class DistributedError(RuntimeError):
    """A multi-process run cannot go on (a peer is gone, a barrier timed out)."""


def is_primary() -> bool:
    """Process 0 writes the outputs shared by all processes of a multi-host run."""
    return jax.process_index() == 0


def multi_process() -> bool:
    return _client() is not None and jax.process_count() > 1


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def cluster_size_from_env() -> int:
    """How many processes a scheduler started for this job (SLURM, Open MPI); 1 outside one."""
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> bool:
    """Start ``jax.distributed`` when a coordinator is given, or when a SLURM / Open MPI job
    runs several tasks (JAX detects the rest there). Returns whether this is a multi-process
    run; starts the peer watchdog in that case."""
    if _client() is not None:
        return True
    if not coordinator and cluster_size_from_env() <= 1:
        return False
    if coordinator and (num_processes is None or process_id is None):
        raise UserError("--coordinator needs --num_processes and --process_id "
                        "(on SLURM / Open MPI leave all three unset: they are detected)")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s,
                                   initialization_timeout=max(heartbeat_timeout_s, 60))
    except Exception as e:  # noqa: BLE001 - jaxlib raises plain RuntimeErrors / XlaRuntimeErrors
        raise DistributedError(f"could not join the multi-process run at {coordinator or 'the detected address'} "
                               f"as process {process_id}: {first_line(e)}") from None
    if jax.process_count() > 1:
        PeerWatchdog(timeout_s=max(heartbeat_timeout_s // 3, 5)).start()
    return jax.process_count() > 1


_barriers: dict[str, int] = {}


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """All processes wait here, at most ``timeout_s`` (a no-op in a single-process run). Every
    process passes the same barriers in the same order, so a count makes each name unique."""
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    n = _barriers[name] = _barriers.get(name, 0) + 1
    try:
        client.wait_at_barrier(f"jaxseg:{name}:{n}", int(timeout_s * 1000))
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"process {jax.process_index()}: the other processes did not reach '{name}' within "
                               f"{timeout_s:.0f} s ({first_line(e)})") from None


class PeerWatchdog(threading.Thread):
    """Each process bumps a counter in the coordinator's key-value store every second and reads
    the others'. A counter that stops for ``timeout_s`` means its process is gone (killed,
    crashed, out of memory); an unreachable store means process 0, which hosts it, is gone; a
    process that failed cleanly says so (``announce_failure``) and the others stop at once.
    Either way this process prints one line and exits with status 3, instead of waiting in a
    collective or a barrier until JAX's heartbeat aborts it with a stack trace. A process that
    finished (``stop``) is not waited for."""

    active: "PeerWatchdog | None" = None

    def __init__(self, timeout_s: float = 30.0, interval_s: float = 1.0):
        super().__init__(name="jaxseg-peer-watchdog", daemon=True)
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.me, self.n = jax.process_index(), jax.process_count()
        self.stopped = threading.Event()

    def start(self) -> None:
        PeerWatchdog.active = self
        atexit.register(self.stop)  # runs before jax.distributed's own shutdown (registered earlier)
        super().start()

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        with contextlib.suppress(Exception):
            _client().key_value_set(f"jaxseg/done/{self.me}", "1", allow_overwrite=True)
        if self.is_alive() and threading.current_thread() is not self:
            # A daemon thread still inside a key-value call when the interpreter finalizes
            # aborts the process ("FATAL: exception not rethrown", status -6) after its work is done.
            self.join(timeout=max(5 * self.interval_s, 5))

    def run(self) -> None:
        client = _client()
        seen = {p: (None, time.monotonic()) for p in range(self.n) if p != self.me}
        beat, failing_since = 0, None
        while not self.stopped.wait(self.interval_s if beat else 0):
            beat += 1
            now = time.monotonic()
            try:
                client.key_value_set(f"jaxseg/alive/{self.me}", str(beat), allow_overwrite=True)
                flags = dict(client.key_value_dir_get("jaxseg/failed/")) | dict(client.key_value_dir_get("jaxseg/done/"))
                values = {p: _try_get(client, f"jaxseg/alive/{p}") for p in seen}
                failing_since = None
            except Exception as e:  # noqa: BLE001
                failing_since = failing_since or now
                if now - failing_since >= min(self.timeout_s, 10) and not self.stopped.is_set():
                    self._gone(f"lost the coordinator (process 0) ({first_line(e)})")
                continue
            for p in list(seen):
                failed = flags.get(f"jaxseg/failed/{p}")
                if failed is not None:
                    self._gone(f"process {p} of {self.n} stopped: {failed}")
                if f"jaxseg/done/{p}" in flags:
                    del seen[p]  # finished: it waits for us at shutdown
                elif values[p] != seen[p][0]:
                    seen[p] = (values[p], now)
                elif values[p] is not None and now - seen[p][1] > self.timeout_s:
                    self._gone(f"process {p} of {self.n} stopped responding {now - seen[p][1]:.0f} s ago "
                               f"(killed, crashed or out of memory?)")

    def _gone(self, why: str) -> None:
        if self.stopped.is_set():
            return
        print(f"error: process {self.me}: {why}; this process exits too. Rerun the same command on every "
              f"host to resume from the last checkpoint.", file=sys.stderr, flush=True)
        os._exit(3)


def _try_get(client, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception as e:  # noqa: BLE001
        if "NOT_FOUND" in str(e):
            return None
        raise


def announce_failure(message: str) -> None:
    """Tell the other processes this one is stopping with ``message``, so they stop at once
    (their watchdogs read it) instead of waiting for it at the next barrier."""
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    with contextlib.suppress(Exception):
        client.key_value_set(f"jaxseg/failed/{jax.process_index()}", message[:500], allow_overwrite=True)


def await_peer_verdict() -> None:
    """After a collective failed: give the watchdog time to name the process that is gone (it
    then exits this process); returns if it names none."""
    dog = PeerWatchdog.active
    if dog is not None and dog.is_alive():
        dog.join(dog.timeout_s + 5 * dog.interval_s)


# --- one writer per output folder -------------------------------------------------------------

_held: dict[Path, tuple[int, int]] = {}  # folder -> (fd, how many times this process holds it)


def acquire_folder(folder: str | os.PathLike) -> None:
    """Make this process the only writer of ``folder`` until ``release_folder`` (re-entrant).
    Another live run holding it is refused at once, naming its pid and host; a lock left by a
    killed run is taken over (the kernel drops a dead process's ``flock``). In a multi-process
    run only process 0 locks: the others write nothing there."""
    if not is_primary():
        return
    folder = Path(folder).resolve()  # one folder however it is spelled (.., symlinks)
    if folder in _held:
        fd, count = _held[folder]
        _held[folder] = (fd, count + 1)
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f".{folder.name}.lock"  # beside the folder: --overwrite may remove the folder itself
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise
        try:
            other = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            other = {}
        os.close(fd)
        raise UserError(f"{folder} is in use by another run (pid {other.get('pid', '?')} on host "
                        f"{other.get('host', '?')}, started {other.get('started', '?')}); wait for it to finish, "
                        f"or use another --workdir / --out_name") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    _held[folder] = (fd, 1)


def release_folder(folder: str | os.PathLike) -> None:
    folder = Path(folder).resolve()
    if folder not in _held:
        return
    fd, count = _held[folder]
    if count > 1:
        _held[folder] = (fd, count - 1)
        return
    del _held[folder]
    os.close(fd)  # releases the flock; the file stays (removing it would race a new holder)


@contextlib.contextmanager
def sole_writer(folder: str | os.PathLike):
    acquire_folder(folder)
    try:
        yield
    finally:
        release_folder(folder)


# --- preemption --------------------------------------------------------------------------------

class Preempted(Exception):
    """SIGTERM arrived; the run saved a checkpoint at ``step`` and stopped. Rerun to resume."""

    def __init__(self, name: str, step: int, directory: Path):
        super().__init__(f"{name}: stopped by SIGTERM after step {step}; checkpoint saved in {directory}. "
                         f"Rerun the same command to resume.")
        self.step = step


class StopRequest:
    """Asks a training loop to stop at a step every process agrees on. Multi-process: JAX's
    preemption service catches SIGTERM on any process and picks the step
    (``reached_preemption_sync_point``, which every process must call at every step).
    Single-process: a SIGTERM handler of our own sets a flag the loop reads after each step."""

    def __init__(self):
        self.requested = False
        self.multi = jax.process_count() > 1
        self._old = None

    def __enter__(self):
        if not self.multi and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False

    def _on_sigterm(self, signum, frame):
        self.requested = True

    _sync_id = 0  # one count for the whole process: JAX's sync point needs ids that only grow

    def at_step(self) -> bool:
        """Whether to stop after the step just dispatched: call once per step, on every process."""
        if self.multi:
            from jax.experimental import multihost_utils

            StopRequest._sync_id += 1
            return multihost_utils.reached_preemption_sync_point(StopRequest._sync_id)
        return self.requested
