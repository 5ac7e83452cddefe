"""The settings that made an output, kept beside it (``settings.json``), so that a rerun in the
same place resumes only when they match, and otherwise says what differs instead of returning
the old result under the new name."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from jaxseg.distributed import barrier, is_primary
from jaxseg.errors import UserError

SETTINGS_FILE = "settings.json"


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def claim_output_dir(out_dir: str | os.PathLike, settings: dict[str, Any], overwrite: bool = False) -> Path:
    """Make ``out_dir`` the home of the outputs of ``settings``: a new folder records them; a
    folder made with the same settings is resumed; one made with other settings (or with no
    record) is refused with what differs, unless ``overwrite``, which empties it first."""
    out = Path(out_dir).absolute()
    settings = json.loads(json.dumps(settings, default=str))  # as it will read back
    record = out / SETTINGS_FILE
    if record.is_file():
        old = json.loads(record.read_text())
        if old == settings:
            return out
        problem = f"{out} holds results made with other settings ({'; '.join(_differences(old, settings))})"
    elif out.is_dir() and any(out.iterdir()):
        problem = f"{out} holds results with no record of their settings (made by an older jaxseg?)"
    else:
        problem = None
    if problem and not overwrite:
        raise UserError(f"{problem}. Use a new --workdir (or --out_name), or --overwrite to replace them.")
    barrier(f"claim {out}")  # every process has checked before process 0 changes anything
    if is_primary():
        if problem:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(settings, indent=1, sort_keys=True))
    barrier(f"claimed {out}")
    return out
