"""Starting a multi-process run (explicit flags, or SLURM / Open MPI auto-detection), which
process writes shared outputs, barriers that give up, settings that every process must share,
and work split over the processes and gathered back. A single-process run pays for none of it:
every helper is a no-op or a local check there."""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading

import jax

from jaxseg.distributed import jax_shim
from jaxseg.errors import UserError, first_line

# JAX's own heartbeat: the coordinator gives up on a process this long after it stops. Ours
# (``PeerWatchdog``) fires first, with one line that names the process.
HEARTBEAT_TIMEOUT_S = 100
INIT_TIMEOUT_S = 300  # how long the processes wait for each other at start (JAX's default)
BARRIER_TIMEOUT_S = 1800  # process 0 may be preparing a large dataset while the others wait
PEER_EXIT_CODE = 3  # this process is fine, another one (or the coordinator) is not


class DistributedError(RuntimeError):
    """A multi-process run cannot go on (a peer is gone, a barrier timed out)."""


def is_primary() -> bool:
    """Process 0 writes the outputs shared by all processes of a multi-host run."""
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax_shim.client() is not None and jax.process_count() > 1


def cluster_size_from_env() -> int:
    """How many processes a scheduler started for this job (SLURM, Open MPI); 1 outside one."""
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _say_and_exit(message: str, code: int = PEER_EXIT_CODE) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(code)


def check_start(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Refuse, before anything starts, what cannot make a run: ``--coordinator`` without the
    other two, a process id outside ``[0, num_processes)``, an address that is not host:port,
    and (process 0, which serves it) a coordinator port another program holds."""
    if not coordinator:
        return
    if num_processes is None or process_id is None:
        raise UserError("--coordinator needs --num_processes and --process_id "
                        "(on SLURM / Open MPI leave all three unset: they are detected)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UserError(f"--process_id must be in [0, {num_processes}) for --num_processes={num_processes}, "
                        f"got {process_id}")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--coordinator must be host:port (process 0's address), got {coordinator!r}")
    if process_id == 0:
        _check_port_free(int(port), coordinator)


def _check_port_free(port: int, coordinator: str) -> None:
    """JAX's coordinator binds every address on ``port``; another program there would crash it."""
    for family, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: a port in TIME_WAIT is free
                s.bind((addr, port))
            return
        except OSError as e:
            if family == socket.AF_INET6 and e.errno != errno.EADDRINUSE:  # no IPv6 here: try IPv4
                continue
            raise UserError(f"--coordinator {coordinator}: port {port} is in use by another program on this host "
                            f"({e.strerror}); choose a free port (the same on every process)") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S, init_timeout_s: int = INIT_TIMEOUT_S) -> bool:
    """Start ``jax.distributed`` when a coordinator is given, or when a SLURM / Open MPI job
    runs several tasks (JAX detects the rest there). Returns whether this is a multi-process
    run, and starts the peer watchdog in that case.

    Whatever goes wrong at start ends in one line and an exit status, never a crash or a dump:
    a bad setting raises ``UserError`` before anything starts; processes that do not all join
    within ``init_timeout_s`` exit with status 3 saying so."""
    from jaxseg.distributed.watchdog import PeerWatchdog

    if jax_shim.client() is not None:
        return True
    if not coordinator and cluster_size_from_env() <= 1:
        return False
    check_start(coordinator, num_processes, process_id)
    me = "?" if process_id is None else process_id
    where = coordinator or "the address SLURM / Open MPI gives"
    timer = threading.Timer(init_timeout_s, _say_and_exit, args=(
        f"error: process {me}: the {num_processes or cluster_size_from_env()} processes did not all join the run at "
        f"{where} within {init_timeout_s} s; start every process with the same --coordinator (process 0's "
        f"host:port) and --num_processes, and each --process_id once",))
    timer.daemon = True
    timer.start()
    try:
        # JAX's own timeout comes later than ours: it aborts the process with a stack dump.
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s,
                                   initialization_timeout=init_timeout_s + 60)
    except Exception as e:  # noqa: BLE001 - jaxlib raises plain RuntimeErrors / XlaRuntimeErrors
        raise DistributedError(f"could not join the multi-process run at {where} as process {me}: "
                               f"{first_line(e)}") from None
    finally:
        timer.cancel()
    if jax.process_count() > 1:
        PeerWatchdog(timeout_s=max(heartbeat_timeout_s // 3, 5)).start()
    return jax.process_count() > 1


def leaving() -> None:
    """This process is ending (its work done, or its own error reported): its watchdog says
    nothing more, so a peer that stops meanwhile adds no second line to this process's output."""
    from jaxseg.distributed.watchdog import PeerWatchdog

    if PeerWatchdog.active is not None:
        PeerWatchdog.active.stopped.set()


_barriers: dict[str, int] = {}


def _next_key(name: str) -> str:
    """A key unique to this run's ``n``-th use of ``name``: every process passes the same
    barriers and agreements in the same order, so a count makes each name unique."""
    n = _barriers[name] = _barriers.get(name, 0) + 1
    return f"jaxseg:{name}:{n}"


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """All processes wait here, at most ``timeout_s`` (a no-op in a single-process run). A
    coordination-service barrier, not ``multihost_utils.sync_global_devices``, which has no
    timeout and compiles a device program."""
    if not multi_process():
        return
    try:
        jax_shim.client().wait_at_barrier(_next_key(name), int(timeout_s * 1000))
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"process {jax.process_index()}: the other processes did not reach '{name}' within "
                               f"{timeout_s:.0f} s ({first_line(e)})") from None


def agree(what: str, values: dict, hint: str = "", timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Every process must hold the same ``values`` (JSON-able) as process 0: each publishes its
    own through the coordination service, process 0 compares all of them and the others theirs
    with process 0's. A difference raises ``UserError`` naming the process and each setting
    that differs (then ``hint``), on every process that sees it, before any work depends on it."""
    if not multi_process():
        return
    client, me = jax_shim.client(), jax.process_index()
    key = _next_key(f"agree {what}")
    mine = json.loads(json.dumps(values, sort_keys=True, default=str))
    client.key_value_set(f"{key}/{me}", json.dumps(mine))
    for p in (range(1, jax.process_count()) if me == 0 else (0,)):
        try:
            theirs = json.loads(client.blocking_key_value_get(f"{key}/{p}", int(timeout_s * 1000)))
        except Exception as e:  # noqa: BLE001
            raise DistributedError(f"process {me}: process {p} did not publish its {what} within {timeout_s:.0f} s "
                                   f"({first_line(e)})") from None
        diffs = [f"{k}: {theirs.get(k)!r} on process {p}, {mine.get(k)!r} on process {me}"
                 for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        if diffs:
            raise UserError(f"the processes disagree on their {what} ({'; '.join(diffs)}). {hint or ''}".rstrip())


def share(what: str, value, timeout_s: float = BARRIER_TIMEOUT_S):
    """Process 0's ``value`` (JSON-able) on every process: the others wait for it, at most
    ``timeout_s``, while process 0 computes it (prepares the data, say)."""
    if not multi_process():
        return value
    client, key = jax_shim.client(), _next_key(f"share {what}")
    if is_primary():
        client.key_value_set(key, json.dumps(value))
        return value
    try:
        return json.loads(client.blocking_key_value_get(key, int(timeout_s * 1000)))
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"process {jax.process_index()}: process 0 did not share its {what} within "
                               f"{timeout_s:.0f} s ({first_line(e)})") from None


def my_share(items) -> list:
    """This process's share of ``items`` (every ``process_count``-th, from its index): work that
    each process does for a part, e.g. the cases of an evaluation, gathered by ``allgather_json``."""
    return list(items)[jax.process_index()::jax.process_count()]


def allgather_json(obj) -> list:
    """Every process's ``obj`` (anything JSON can hold; NumPy scalars as Python numbers), in process
    order, on every process. A single-process run gets ``[obj]`` as it would read back from JSON,
    so that both kinds of run give the same values and types."""
    import numpy as np

    data = json.dumps(obj, default=_json_scalar).encode()
    if not multi_process():
        return [json.loads(data)]
    from jax.experimental import multihost_utils

    # Processes may arrive minutes apart (uneven shares of large cases); CPU collectives wait 30 s
    # for their peers when they first meet, a coordination-service barrier as long as it takes.
    barrier("allgather")
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(rows[i, :n].tobytes()) for i, n in enumerate(sizes)]


def _json_scalar(v):
    if hasattr(v, "item"):  # NumPy / JAX scalars
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def local_copy(tree):
    """``tree`` with every replicated array on this process's first device alone: a train state
    spread over every device (and host) made usable by a computation of this process only, on one
    device (evaluation: the same numbers, without repeating the work on every device)."""
    def one(a):
        if isinstance(a, jax.Array) and len(a.sharding.device_set) > 1 and a.sharding.is_fully_replicated:
            return a.addressable_data(0)
        return a

    return jax.tree.map(one, tree)
