"""Checkpoints: orbax ``CheckpointManager`` holding the train state, the grain iterator state
and a small JSON of run metadata together. Orbax writes each step to a temporary folder and
renames it when complete, so a killed save never replaces the last good checkpoint.

Two formats on purpose: resumable training state is an orbax checkpoint (several items, kept
per step, restored together); the final weights a run hands on (``params.msgpack``,
``best.msgpack``) are one flax-msgpack file each, because a single file is replaced atomically
by one rename however often it is rewritten (``best`` at every better validation), can be
copied or shared as is, and reads back without orbax. ``jaxseg.load_model`` reads them.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxseg.errors import UserError


def check_workdir(workdir: str | Path, min_free_bytes: int = 200 * 2**20) -> Path:
    """Fail before training if the work dir cannot be written or its disk is (nearly) full."""
    path = Path(workdir).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{socket.gethostname()}.{os.getpid()}"  # one per process: hosts share work dirs
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise UserError(f"work dir {path} is not writable: {e}") from None
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise UserError(f"work dir {path}: only {free / 2**20:.0f} MiB free on its disk, "
                           f"need at least {min_free_bytes / 2**20:.0f} MiB for checkpoints")
    return path


class Checkpointer:
    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any | None, extra: dict) -> None:
        items = {"state": ocp.args.StandardSave(state), "extra": ocp.args.JsonSave(extra)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore(self, state_template: Any, data_iter: Any | None):
        """(state, extra) from the latest step, restoring ``data_iter`` in place; None when there
        is no checkpoint."""
        step = self.latest_step()
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_template)
        items = {"state": ocp.args.StandardRestore(abstract), "extra": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["extra"]

    def close(self) -> None:
        self.manager.close()


def save_params(path: str | Path, params: Any) -> None:
    """Write params atomically (temporary file + rename) with flax's msgpack serialisation."""
    from flax import serialization

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(serialization.to_bytes(jax.device_get(params)))
    os.replace(tmp, path)


def load_params(path: str | Path, template: Any) -> Any:
    from flax import serialization

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no parameters file")
    return serialization.from_bytes(template, path.read_bytes())
