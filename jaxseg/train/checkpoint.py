"""Checkpoints: orbax ``CheckpointManager`` holding the train state and a small JSON of run
metadata together, the input's position among it (``DeviceFeed.position``: the next step's
index, the same on every process, so no per-process files). Orbax writes each step to a temporary folder and
renames it when complete, so a killed save never replaces the last good checkpoint.

Two formats on purpose: resumable training state is an orbax checkpoint (several items, kept
per step, restored together; a damaged newest step falls back to the one before); the final
weights a run hands on (``params.msgpack``, ``best.msgpack``) are one checksummed file each
(``jaxseg.io.save_weights``), because a single file is replaced atomically by one rename however
often it is rewritten (``best`` at every better validation), can be copied or shared as is, and
reads back without orbax. ``jaxseg.load_model`` reads them.

Saves run in the background on one process: ``save`` copies the train state (and the run's
metadata) to host memory and returns while one writer thread puts it on disk, so training goes
on during the write. Before anything that needs the checkpoints on disk (the next save,
``latest_step``, ``wait``, ``close``: the end of a run, a preemption's exit) the Checkpointer
waits for the write, and a fault it met is raised there, naming the step it was writing. On
several processes saves stay in the loop: orbax's barriers between processes are device
collectives (``sync_global_devices``), which must not run beside the training step's own.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxseg.distributed import multi_process
from jaxseg.errors import UserError, first_line
from jaxseg.io import check_writable, disk_fault


def check_workdir(workdir: str | Path, min_free_bytes: int = 200 * 2**20) -> Path:
    """Fail before training if the work dir cannot be written or its disk is (nearly) full."""
    path = check_writable(workdir, "work dir")
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise UserError(f"work dir {path}: only {free / 2**20:.0f} MiB free on its disk, "
                           f"need at least {min_free_bytes / 2**20:.0f} MiB for checkpoints")
    return path


def _closed_loop_noise(value: BaseException | None) -> bool:
    """After a failed orbax save or restore, tensorstore completes the remaining writes on its own
    threads and calls back into asyncio loops orbax has closed; each prints a traceback ('Event
    loop is closed', through ``sys.excepthook`` or, from a C++ thread, ``sys.unraisablehook``)
    that says nothing about the fault, which the run reports in one line."""
    return type(value) is RuntimeError and str(value) == "Event loop is closed"


def _drop_closed_loop_noise() -> None:
    """Install filters for that noise in both hooks, once per process (on whatever hooks are there)."""
    for name, value_of in (("excepthook", lambda kind, value, tb: value),
                           ("unraisablehook", lambda args: args.exc_value)):
        hook = getattr(sys, name)
        if not getattr(hook, "jaxseg_filter", False):
            setattr(sys, name, _without_closed_loop_noise(hook, value_of))


def _without_closed_loop_noise(hook, value_of):
    def filtered(*args):
        if not _closed_loop_noise(value_of(*args)):
            hook(*args)

    filtered.jaxseg_filter = True
    return filtered


class _DropOrbaxRecords(logging.Filter):
    """Drops what orbax logs (through absl's logger) and nothing else: grain's and the run's own
    absl messages from other threads go on while a write runs in the background."""

    def __init__(self):
        super().__init__()
        self.users, self.lock = 0, threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}orbax{os.sep}" not in record.pathname


_ORBAX_FILTER = _DropOrbaxRecords()


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs the exception of every failed write at ERROR with its traceback (hundreds of
    lines on a full disk); the run reports the fault itself, in one line."""
    logger = logging.getLogger("absl")
    with _ORBAX_FILTER.lock:
        _ORBAX_FILTER.users += 1
        logger.addFilter(_ORBAX_FILTER)
    try:
        yield
    finally:
        with _ORBAX_FILTER.lock:
            _ORBAX_FILTER.users -= 1
            if not _ORBAX_FILTER.users:  # the last write in flight (several Checkpointers may write at once)
                logger.removeFilter(_ORBAX_FILTER)


class Checkpointer:
    def __init__(self, directory: str | Path, max_to_keep: int = 2, background: bool | None = None):
        """``background``: write saves from a thread (default: on one process only)."""
        self.directory = Path(directory).absolute()
        _drop_closed_loop_noise()
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=max(max_to_keep, 2), create=True,
                                                     enable_async_checkpointing=False),
            )
        except Exception as e:  # noqa: BLE001
            fault = disk_fault(e, self.directory.parent)
            if fault is None:
                raise
            raise UserError(f"{self.directory}: {fault}; checkpoints cannot be written there") from None
        self._identity = {f: _identity(f) for f in (self.directory.parent, self.directory)}
        # Held open so that their inodes stay allocated: a folder deleted and made anew could
        # otherwise get the same inode number and pass for the old one.
        self._pins = [os.open(f, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) for f in self._identity]
        # One writer thread, one save in flight: orbax's manager is used by one thread at a time.
        if background is None:
            background = not multi_process()
        self._writer = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxseg-checkpoint")
                        if background else None)
        self._pending: concurrent.futures.Future | None = None

    def latest_step(self) -> int | None:
        """The newest step on disk (a save in flight finished first)."""
        self.wait()
        return self.manager.latest_step()

    def save(self, step: int, state: Any, feed: Any | None, extra: dict) -> None:
        """Save ``state``, ``extra`` and ``feed``'s position at ``step``: copied to host memory now,
        written in the background (``wait`` for it), after the previous save finished."""
        # a snapshot: the loop goes on appending to the lists it handed over (the loss history)
        extra = json.loads(json.dumps({**extra, "input": feed.position()} if feed is not None else extra))
        host = _replicated_to_host(state, own_copy=self._writer is not None)
        self._check_folder()
        last = self.latest_step()
        items = {"state": ocp.args.StandardSave(host), "extra": ocp.args.JsonSave(extra)}
        if self._writer is None:
            self._write(step, items, last)
        else:
            self._pending = self._writer.submit(self._write, step, items, last)

    def wait(self) -> None:
        """Until the save in flight (if any) is on disk; raises the fault it met, naming its step."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _vanished(self) -> str | None:
        """orbax would make a vanished folder anew, and the run's metrics are gone with it; one made
        anew (by a save that was writing when it went) is not the run's either."""
        gone = next((f for f, known in self._identity.items() if _identity(f) != known), None)
        if gone is not None:  # the run's folder first, then the checkpoints' own
            return (f"{gone}: the folder vanished during training (its checkpoints and metrics with it); "
                    f"rerun the same command to start again")
        return None

    def _check_folder(self) -> None:
        if (gone := self._vanished()) is not None:
            raise UserError(gone)

    def _write(self, step: int, items: dict, last: int | None) -> None:
        self._check_folder()  # again: the folder may have gone since ``save`` handed this over
        try:
            with _quiet_orbax():
                self.manager.save(step, args=ocp.args.Composite(**items), force=True)
                self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore bury the OS error in their own
            if (gone := self._vanished()) is not None:  # deleted under this save: whatever orbax raised
                raise UserError(gone) from None
            fault = disk_fault(e, self.directory)
            if fault is None:
                raise
            self._remove_temporaries()
            raise UserError(f"{self.directory}: {fault} while saving the checkpoint of step {step}; the last good "
                            f"checkpoint is {'step ' + str(last) if last is not None else 'none'}. Fix that and "
                            f"rerun the same command to resume") from None

    def _remove_temporaries(self) -> None:
        for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def restore(self, state_template: Any, feed: Any | None):
        """(state, extra) from the newest readable step, moving ``feed`` to its position; None
        when there is no checkpoint. A step that cannot be read (truncated, garbage, metadata
        gone) is reported in one line and set aside (renamed ``damaged-<step>-<time>``, never
        deleted), and the next older one is tried; none readable is a ``UserError`` naming the
        folder. In a multi-process run the processes cannot agree on a fallback without talking,
        so an unreadable step stops the run instead (one line, naming it)."""
        self.wait()
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_template)
        for i, step in enumerate(steps):
            items = {"state": ocp.args.StandardRestore(abstract), "extra": ocp.args.JsonRestore()}
            try:
                with _quiet_orbax():
                    out = self.manager.restore(step, args=ocp.args.Composite(**items))
                _check_finite(out["state"])
            except Exception as e:  # noqa: BLE001 - every kind of damage: cut files, garbage, lost metadata
                reason = first_line(e, 160)
                if jax.process_count() > 1:
                    raise UserError(f"{self.directory}: checkpoint step {step} cannot be read on process "
                                    f"{jax.process_index()} ({reason}); move that step folder away and rerun") from None
                older = f"resuming from step {steps[i + 1]}" if i + 1 < len(steps) else "no older step to fall back on"
                print(f"warning: checkpoint step {step} in {self.directory} cannot be read ({reason}); {older}",
                      file=sys.stderr, flush=True)
                continue
            if i:  # the unreadable newer steps would be in the way of the next saves: kept aside, not deleted
                for bad in steps[:i]:
                    with contextlib.suppress(OSError):
                        os.rename(self.directory / str(bad), self.directory / f"damaged-{bad}-{int(time.time())}")
                self.manager.reload()
            if feed is not None:
                feed.seek(out["extra"]["input"])
            return out["state"], out["extra"]
        raise UserError(f"{self.directory}: no readable checkpoint (steps {', '.join(map(str, steps))} cannot be "
                        f"read); move the folder away to start this stage over")

    def close(self) -> None:
        """Wait for the save in flight (raising its fault), then release orbax's manager."""
        if not getattr(self, "closed", False):
            self.closed = True
            try:
                self.wait()
            finally:
                if self._writer is not None:
                    self._writer.shutdown()
                self.manager.close()
                for fd in self._pins:
                    os.close(fd)


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _replicated_to_host(tree: Any, own_copy: bool = False) -> Any:
    """Replicated device arrays (the data-parallel train state) as NumPy arrays, which orbax writes
    from process 0 alone. Handed jax arrays, orbax compiles a slicing program per array shape to
    fetch one replica: 7.6 s on the first save of the tiny UNETR's state on 4 CPU devices, against
    0.2 s this way. Sharded arrays are left to orbax. Restoring into the device template is unchanged.
    ``own_copy``: arrays that view device memory (CPU devices) are copied: a view held by the
    writer thread would keep the next step from reusing (donating) that buffer."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    idx = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and x.is_fully_replicated]
    for i, host in zip(idx, jax.device_get([leaves[i] for i in idx])):
        host = np.asarray(host)
        leaves[i] = host.copy() if own_copy and not host.flags.owndata else host
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _check_finite(state: Any) -> None:
    """Garbage bytes can decode to numbers; a training state that held only finite values must."""
    for leaf in jax.tree_util.tree_leaves(state):
        arr = np.asarray(jax.device_get(leaf)) if getattr(leaf, "is_fully_addressable", True) else None
        if arr is not None and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError("non-finite values in the restored state")
