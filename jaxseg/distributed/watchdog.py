"""A multi-process run that ends with one line when a process is gone: each process's
heartbeat in the coordinator's key-value store, read by the others; failures announced so the
others stop at once instead of waiting at the next barrier."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time

import jax

from jaxseg.distributed import jax_shim
from jaxseg.errors import first_line


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
        self.done_written = False

    def start(self) -> None:
        PeerWatchdog.active = self
        atexit.register(self.stop)  # runs before jax.distributed's own shutdown (registered earlier)
        super().start()

    def stop(self) -> None:
        """This process finished: the others stop watching it (it waits for them at shutdown)."""
        self.stopped.set()  # also set by ``leaving``, which keeps the thread quiet but writes nothing
        if self.done_written:
            return
        self.done_written = True
        with contextlib.suppress(Exception):
            jax_shim.client().key_value_set(f"jaxseg/done/{self.me}", "1", allow_overwrite=True)
        if self.is_alive() and threading.current_thread() is not self:
            # A daemon thread still inside a key-value call when the interpreter finalizes
            # aborts the process ("FATAL: exception not rethrown", status -6) after its work is done.
            self.join(timeout=max(5 * self.interval_s, 5))

    def run(self) -> None:
        client = jax_shim.client()
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
    client = jax_shim.client()
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


