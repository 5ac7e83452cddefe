"""One writer per output folder: an advisory lock file beside the folder, held for the run."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from jaxseg.distributed.processes import is_primary
from jaxseg.errors import UserError

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
    path = folder.parent / f".{folder.name}.lock"  # beside the folder: --overwrite may remove the folder itself
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{folder}: cannot be written ({e.strerror}); choose a --workdir (or --out_name) this "
                        f"process can write") from None
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




@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Hold an exclusive lock on the file ``path`` for the block, waiting for any other holder
    (one ``prepare`` at a time per cache folder: the others then find its work done)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
