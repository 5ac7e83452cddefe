"""Data parallelism: a 1-D mesh over all devices (all hosts), batch sharded, params replicated."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Multi-host: call ``jax.distributed.initialize`` when a coordinator address is given."""
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)


def data_mesh(devices=None) -> Mesh:
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Shard arrays whose leading axis divides over the mesh; replicate the rest (small index
    arrays). Every host builds the same global batch (pipelines are deterministic per step) and
    contributes the rows of its own devices."""
    n = mesh.devices.size
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        spec = P("data") if v.ndim and v.shape[0] % n == 0 and k in ("image", "label") else P()
        sharding = NamedSharding(mesh, spec)
        if jax.process_count() == 1:
            out[k] = jax.device_put(v, sharding)
        else:
            rows = np.array_split(v, jax.process_count())[jax.process_index()] if spec != P() else v
            out[k] = jax.make_array_from_process_local_data(sharding, rows, v.shape)
    return out
