"""Data parallelism: a 1-D mesh over all devices (all hosts), batch sharded, params replicated."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ROW_KEYS = ("image", "label")  # per-crop arrays, split over the devices; the rest is per step


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh with each process's devices contiguous, in process order: host i's rows of a
    global batch (``jaxseg.data.pipelines.host_rows``) are then block i of the batch."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id))), ("data",))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` on every device of ``mesh``. Across hosts each process supplies its own copy (the
    same on all: settings agree, see ``jaxseg.distributed.agree``), without ``device_put``'s
    cross-host comparison, which compiles a program per array shape."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(a):
        a = np.asarray(jax.device_get(a))
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(one, tree)


def host_shard() -> tuple[int, int]:
    """(process index, process count): which rows of each global batch this host builds."""
    return jax.process_index(), jax.process_count()


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """A global batch from this host's part: ``image`` / ``label`` hold this host's rows (see
    ``jaxseg.data.pipelines.host_rows``) and are split over the devices; the per-step arrays
    (offsets, seeds, volume indices), the same on every host, are replicated. With one process
    and a batch that does not divide over the devices, the rows are replicated instead."""
    n, hosts = mesh.devices.size, jax.process_count()
    arrays, shardings, shapes = {}, {}, {}
    for k, v in batch.items():
        v = arrays[k] = np.asarray(v)
        if k not in ROW_KEYS or (hosts == 1 and v.shape[0] % n):
            shardings[k], shapes[k] = NamedSharding(mesh, P()), v.shape
            continue
        global_rows = v.shape[0] * hosts
        if global_rows % n:
            raise ValueError(f"a global batch of {global_rows} crops does not split over the {n} devices; make "
                             f"volumes_per_step x crops_per_volume a multiple of {n}")
        shardings[k], shapes[k] = NamedSharding(mesh, P("data")), (global_rows, *v.shape[1:])
    if hosts == 1:
        return jax.device_put(arrays, shardings)  # one call for the whole batch: less host time per step
    return {k: jax.make_array_from_process_local_data(shardings[k], v, shapes[k]) for k, v in arrays.items()}
