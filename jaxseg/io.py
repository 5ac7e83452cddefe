"""Files that never lose work and never load silently wrong: atomic writes (one function),
digests, weights files that carry their own checksum, and disk faults named in one line.

A jaxseg weights file (``params.msgpack``, ``best.msgpack``) is one msgpack map:
``{"format": "jaxseg-weights/1", "sha256": <hex of the params bytes>, "params": <flax msgpack
bytes of the params>}``; one file, replaced atomically by one rename, verified on every load.
Without jaxseg: ``flax.serialization.msgpack_restore(data)["params"]`` is flax's own format.
"""

from __future__ import annotations

import contextlib
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


def unverified(path: str | os.PathLike, why: str, allow: bool) -> None:
    """A weights file that cannot be verified (``why``): refused unless the user allows it, and
    then loaded with a warning."""
    if not allow:
        raise WeightsError(f"{path}: {why}, so it cannot be verified and is refused. If you trust it: "
                           f"--allow_unverified_weights (allow_unverified=True) loads it once, or "
                           f"`python -m experiments.accept_weights --path={path}` gives it a checksum for good")
    warnings.warn(f"{path}: {why}: loaded UNVERIFIED (--allow_unverified_weights)", stacklevel=3)


def read_weights_blob(path: str | os.PathLike, allow_unverified: bool = False) -> bytes:
    """The verified params bytes of a weights file; ``WeightsError`` (one line, naming the file)
    when it is missing, unreadable, truncated or its checksum does not match. A file without a
    checksum (written by an older jaxseg, or with its header cut off) loads only with
    ``allow_unverified``."""
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
        unverified(path, "a weights file without a checksum (an older jaxseg's, or its header cut off)",
                   allow_unverified)
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


def load_weights(path: str | os.PathLike, template: Any, allow_unverified: bool = False) -> Any:
    """Params from a verified weights file, in ``template``'s structure; a file for another
    model (other sizes or layers) is refused naming it; one without a checksum unless
    ``allow_unverified``."""
    from flax import serialization

    import numpy as np
    from flax import traverse_util

    state = serialization.msgpack_restore(read_weights_blob(path, allow_unverified))
    want = traverse_util.flatten_dict(serialization.to_state_dict(template), sep="/")
    got = traverse_util.flatten_dict(state, sep="/") if isinstance(state, dict) else {}
    wrong = sorted(set(want) ^ set(got)) + [k for k in sorted(set(want) & set(got))
                                            if np.shape(want[k]) != np.shape(got[k])]
    if wrong:
        raise WeightsError(f"{path}: intact, but made for another model ({len(wrong)} parameter(s) missing, extra or "
                           f"of another shape, e.g. {', '.join(wrong[:3])})")
    return serialization.from_state_dict(template, state)


def accept_weights(path: str | os.PathLike) -> str:
    """Give a trusted weights file without a checksum one, in place: a jaxseg weights file
    (``.msgpack``) is rewritten with its header (atomically, the params bytes unchanged); a
    MONAI checkpoint (``.pt``) gets ``NAME.pt.sha256`` beside it. Returns what was done."""
    from flax import serialization

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no weights file there")
    if path.suffix in (".pt", ".pth"):
        atomic_write_text(Path(f"{path}.sha256"), f"{file_digest(path)}  {path.name}\n")
        return f"wrote {path}.sha256"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_weights_blob(path, allow_unverified=True)  # intact msgpack of params, or refused saying why
    blob = path.read_bytes()
    outer = serialization.msgpack_restore(blob)
    if isinstance(outer, dict) and outer.get("format") == WEIGHTS_FORMAT:
        return f"{path} already carries a checksum (verified)"
    atomic_write_bytes(path, serialization.msgpack_serialize(
        {"format": WEIGHTS_FORMAT, "sha256": hashlib.sha256(blob).hexdigest(), "params": blob}))
    return f"{path}: checksum added"


_FAULT_WORDS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission was denied",
                errno.ENOENT: "the folder vanished"}
FULL_BELOW_BYTES = 64 * 2**20  # a disk with less free space than this counts as full


def disk_fault(e: BaseException, folder: str | os.PathLike) -> str | None:
    """What went wrong with the disk under ``folder``, in a few words, when ``e`` is a disk fault
    there; None when it is not (then it is the caller's to raise). An OS error (or one that
    caused ``e``) about a file under ``folder`` tells by its errno; libraries that bury the OS
    error in text (orbax, tensorstore) leave the folder itself to tell (``folder_fault``)."""
    folder, seen = Path(folder).absolute(), set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FAULT_WORDS:
            name = e.filename if isinstance(e.filename, (str, os.PathLike)) else None
            if name is None or Path(name).absolute().is_relative_to(folder):
                return _FAULT_WORDS[e.errno]
        e = e.__cause__ or e.__context__
    return folder_fault(folder)


def folder_fault(folder: str | os.PathLike) -> str | None:
    """What is wrong with the disk under ``folder``, found by trying it: vanished, read-only,
    full, no permission; None when a small file can be written there and space is left."""
    folder = Path(folder)
    if not folder.is_dir():
        return "the folder vanished"
    probe = folder / f".fault_probe.{os.getpid()}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink()
        return _FAULT_WORDS.get(e.errno, f"it cannot be written ({e.strerror})")
    import shutil

    return "the disk is full" if shutil.disk_usage(folder).free < FULL_BELOW_BYTES else None
