"""The settings that made an output, kept beside it (``settings.json``), so that a rerun in the
same place resumes only when they match, and otherwise says what differs instead of returning
the old result under the new name."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from jaxseg.distributed import barrier, is_primary
from jaxseg.errors import UserError
from jaxseg.io import atomic_write_text

SETTINGS_FILE = "settings.json"


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def _problem(out: Path, settings: dict, ignore: tuple[str, ...] = ()) -> str | None:
    """Why ``out`` is not the home of ``settings`` (keys in ``ignore`` aside), or None."""
    record = out / SETTINGS_FILE
    if record.is_file():
        old = {k: v for k, v in json.loads(record.read_text()).items() if k not in ignore}
        new = {k: v for k, v in settings.items() if k not in ignore}
        return None if old == new else \
            f"{out} holds results made with other settings ({'; '.join(_differences(old, new))})"
    if out.is_dir() and any(p.name != SETTINGS_FILE for p in out.iterdir()):
        return f"{out} holds results with no record of their settings (made by an older jaxseg?)"
    return None


def _refuse(problem: str) -> None:
    raise UserError(f"{problem}. Use a new --workdir (or --out_name), or --overwrite to replace them.")


def precheck_output_dir(out_dir: str | os.PathLike, settings: dict[str, Any], overwrite: bool = False,
                        ignore: tuple[str, ...] = ("data",)) -> None:
    """Refuse early, before any data is (re)prepared, an output folder made with other settings;
    ``ignore`` the keys not yet known (the data cache's digest). Changes nothing."""
    problem = _problem(Path(out_dir).absolute(), json.loads(json.dumps(settings, default=str)), ignore)
    if problem and not overwrite:
        _refuse(problem)


def claim_output_dir(out_dir: str | os.PathLike, settings: dict[str, Any], overwrite: bool = False) -> Path:
    """Make ``out_dir`` the home of the outputs of ``settings``: a new folder records them; a
    folder made with the same settings is resumed; one made with other settings (or with no
    record) is refused with what differs, unless ``overwrite``, which empties it first."""
    out = Path(out_dir).absolute()
    settings = json.loads(json.dumps(settings, default=str))  # as it will read back
    same = (out / SETTINGS_FILE).is_file() and json.loads((out / SETTINGS_FILE).read_text()) == settings
    problem = None if same else _problem(out, settings)
    if problem and not overwrite:
        _refuse(problem)
    barrier(f"claim {out}")  # every process has checked before process 0 changes anything (and all pass both)
    if is_primary() and not same:
        if problem:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / SETTINGS_FILE, json.dumps(settings, indent=1, sort_keys=True))
    barrier(f"claimed {out}")
    return out
