"""Files that never lose work and never load silently wrong: atomic writes (one function),
digests, weights files that carry their own checksum, and disk faults named in one line.

A jaxseg weights file (``params.msgpack``, ``best.msgpack``) is one msgpack map:
``{"format": "jaxseg-weights/1", "sha256": <hex of the params bytes>, "params": <flax msgpack
bytes of the params>}``; one file, replaced atomically by one rename, verified on every load.
Without jaxseg: ``flax.serialization.msgpack_restore(data)["params"]`` is flax's own format.
"""

from __future__ import annotations

import errno
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

from jaxseg.errors import UserError

WEIGHTS_FORMAT = "jaxseg-weights/1"


class WeightsError(UserError):
    """A weights file that is missing, damaged or does not fit the model."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``path`` so that a reader (or a crash) sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Make ``folder`` and prove it can be written, before any work is done for it; one probe
    file per process (hosts may share the folder)."""
    import socket
    import uuid

    path = Path(folder).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"  # threads too
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} {path} is not writable: {e.strerror or e}") from None
    return path


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(path: str | os.PathLike, params: Any) -> None:
    """Write params with their checksum, atomically."""
    import jax
    from flax import serialization

    blob = serialization.to_bytes(jax.device_get(params))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, serialization.msgpack_serialize(
        {"format": WEIGHTS_FORMAT, "sha256": hashlib.sha256(blob).hexdigest(), "params": blob}))


def read_weights_blob(path: str | os.PathLike) -> bytes:
    """The verified params bytes of a weights file; ``WeightsError`` (one line, naming the file)
    when it is missing, unreadable, truncated or its checksum does not match."""
    from flax import serialization

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no weights file there")
    try:
        outer = serialization.msgpack_restore(path.read_bytes())
    except OSError as e:
        raise WeightsError(f"{path}: cannot be read ({e.strerror or e})") from None
    except Exception:  # noqa: BLE001 - msgpack raises several kinds for cut or garbage input
        raise WeightsError(f"{path}: damaged (truncated or not a weights file); it cannot be loaded") from None
    if isinstance(outer, dict) and "format" not in outer and "params" in outer and data_is_legacy(outer):
        warnings.warn(f"{path}: written by an older jaxseg, without a checksum: loaded unverified (saving it again "
                      f"with jaxseg.io.save_weights adds one)", stacklevel=3)
        return path.read_bytes()
    if not isinstance(outer, dict) or outer.get("format") != WEIGHTS_FORMAT:
        raise WeightsError(f"{path}: not a jaxseg weights file (no checksum header); it cannot be trusted")
    blob = outer.get("params")
    if not isinstance(blob, bytes) or hashlib.sha256(blob).hexdigest() != outer.get("sha256"):
        raise WeightsError(f"{path}: checksum mismatch: the file is damaged; it cannot be trusted")
    return blob


def data_is_legacy(state: dict) -> bool:
    """A plain flax msgpack of UNETR params (jaxseg before checksums): {"params": {module: ...}}."""
    return len(state) == 1 and isinstance(state["params"], dict)


def load_weights(path: str | os.PathLike, template: Any) -> Any:
    """Params from a verified weights file, in ``template``'s structure; a file for another
    model (other sizes or layers) is refused naming it."""
    from flax import serialization

    import numpy as np
    from flax import traverse_util

    state = serialization.msgpack_restore(read_weights_blob(path))
    want = traverse_util.flatten_dict(serialization.to_state_dict(template), sep="/")
    got = traverse_util.flatten_dict(state, sep="/") if isinstance(state, dict) else {}
    wrong = sorted(set(want) ^ set(got)) + [k for k in sorted(set(want) & set(got))
                                            if np.shape(want[k]) != np.shape(got[k])]
    if wrong:
        raise WeightsError(f"{path}: intact, but made for another model ({len(wrong)} parameter(s) missing, extra or "
                           f"of another shape, e.g. {', '.join(wrong[:3])})")
    return serialization.from_state_dict(template, state)


_FAULTS = ((errno.ENOSPC, "No space left on device", "the disk is full"),
           (errno.EDQUOT, "Disk quota exceeded", "the disk quota is exceeded"),
           (errno.EROFS, "Read-only file system", "the file system is read-only"),
           (errno.EACCES, "Permission denied", "permission was denied"),
           (errno.ENOENT, "No such file or directory", "the folder vanished"))


def disk_fault(e: BaseException) -> str | None:
    """What went wrong with the disk, in a few words, if ``e`` (or what caused it) is a disk
    fault; orbax / tensorstore bury the OS error in text, so the text counts too."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for code, text, words in _FAULTS:
            if getattr(e, "errno", None) == code or text in str(e):
                return words
        e = e.__cause__ or e.__context__
    return None
