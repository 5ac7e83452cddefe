"""grain input pipelines for pre-training and fine-tuning, read from the preprocessing cache.

Element k of each pipeline is one step's batch, or in a multi-process run this host's rows of
it; each row is made by a function of (seed, k, row) alone, so the global batch is the same
whatever the number of processes or threads, each host reads and augments only its own rows,
and the stream's position is one integer: the iterator state that checkpoints save and restore. Host work
overlaps device steps through grain's thread prefetch (``ReadOptions``). Worker processes were
slower than threads on 2 cores for arrays this size (see benchmarks/README.md), so threads are
the default.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from jaxseg.config import Config
from jaxseg.data.augment import apply, augment, centred_start, crop_at, draw, random_start
from jaxseg.data.cache import Cache, crop_background, crop_foreground, crop_rows
from jaxseg.losses import SAMPLED_OBJECTIVES
from jaxseg.losses.partition import sample_triplets

_MAX_STEPS = 2**40  # "infinite" stream; the training loop decides when to stop
_SHARED_AUGMENT = 2**31  # the stream of a step's shared augmentation (rows use 1 + row)


class _Volumes:
    """Memory-mapped arrays opened once per pipeline (threads share them), and each labelled
    volume's ``CropCentres``, made on its first use."""

    def __init__(self, cache: Cache, case_ids: Sequence[str], labels: bool, order_seed: int = 0):
        if not case_ids:
            raise ValueError("no cases to read: the case list is empty")
        self.ids = list(case_ids)
        self.cache = cache
        self.images = [cache.image(c) for c in self.ids]
        self.labels = [cache.label(c) for c in self.ids] if labels else None
        self.order_seed = order_seed
        self._centres: dict[int, CropCentres] = {}

    def centres(self, v: int) -> "CropCentres":
        if v not in self._centres:  # two threads may both build it: same result, one kept
            self._centres[v] = CropCentres(self.images[v], self.labels[v], self.cache.crop_rows(self.ids[v]))
        return self._centres[v]


class CropCentres:
    """Where fine-tuning crops of one volume may be centred, from the running counts per (d, h)
    row that the cache stores with the case (``jaxseg.data.cache.crop_rows``: computed once when
    the case is prepared, not by scanning the volume at every step), so memory is bounded by the
    number of rows whatever the organ's size. ``foreground(i)`` / ``background(i)`` are the i-th
    such voxel in C order, the voxels ``np.argwhere`` of the masks gives, so a seed gives the
    crops it gave before."""

    def __init__(self, image: np.ndarray, label: np.ndarray, rows: np.ndarray | None = None):
        self.image, self.label = image, label
        self.shape = np.shape(label)
        self.fg_cum, self.bg_cum = crop_rows(image, label) if rows is None else rows
        self.num_fg = int(self.fg_cum[-1]) if self.fg_cum.size else 0
        self.num_bg = int(self.bg_cum[-1]) if self.bg_cum.size else 0

    def _foreground(self, rows) -> np.ndarray:
        return crop_foreground(np.asarray(self.label)[rows])

    def _background(self, rows) -> np.ndarray:
        return crop_background(np.asarray(self.image)[rows], np.asarray(self.label)[rows])

    def _voxel(self, cum: np.ndarray, mask, i: int) -> tuple[int, int, int]:
        row = int(np.searchsorted(cum, i, side="right"))  # the row holding the i-th voxel
        d, h = divmod(row, self.shape[1])
        before = int(cum[row - 1]) if row else 0
        return d, h, int(np.flatnonzero(mask((d, h)))[i - before])

    def foreground(self, i: int) -> tuple[int, int, int]:
        return self._voxel(self.fg_cum, self._foreground, i)

    def background(self, i: int) -> tuple[int, int, int]:
        return self._voxel(self.bg_cum, self._background, i)


def host_rows(total: int, shard: tuple[int, int]) -> range:
    """The rows of a global batch of ``total`` that process ``index`` of ``count`` builds: a
    contiguous block, in the order of the devices of a 1-D data mesh."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    if total % count:
        raise ValueError(f"a global batch of {total} crops does not split over {count} processes; "
                         f"make volumes_per_step x crops_per_volume a multiple of {count}")
    n = total // count
    return range(index * n, (index + 1) * n)


def _step_rng(seed: int, k: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, k, *stream])


def _row_rng(seed: int, k: int, row: int) -> np.random.Generator:
    """Each row of step ``k`` has its own stream, so a host can make its rows without the others'."""
    return np.random.default_rng([seed, k, 1 + row])


def _pretrain_element(vols: _Volumes, cfg: Config, seed: int, shard: tuple[int, int], k: int) -> dict:
    p, n, size = cfg.pretrain, len(vols.ids), (cfg.model.crop_size,) * 3
    step = _step_rng(seed, k)  # what every host shares: volumes, partition offsets, triplet seed
    chosen = step.choice(n, size=p.volumes_per_step, replace=n < p.volumes_per_step)
    u = step.random((3, 1 if p.shared_offset else p.num_partitions))
    # per_step: one spatial draw for every crop of the step (from its own stream, so that the
    # other draws stay as they are), so partition p is the same anatomy in all of them
    shared = draw(_step_rng(seed, k, _SHARED_AUGMENT), flip_prob=p.flip_prob, rot90_prob=p.rot90_prob,
                  shift_prob=0.0) if p.augment == "per_step" else None
    crops = []
    for r in host_rows(p.volumes_per_step * p.crops_per_volume, shard):  # order [v1a, v1b, v2a, v2b]
        rng, img = _row_rng(seed, k, r), vols.images[chosen[r // p.crops_per_volume]]
        c = crop_at(img, random_start(rng, img.shape[:3], size), size)
        own = draw(rng, flip_prob=p.flip_prob if p.augment == "per_crop" else 0.0,
                   rot90_prob=p.rot90_prob if p.augment == "per_crop" else 0.0, shift_prob=p.shift_prob)
        if shared is not None:
            own = dataclasses.replace(shared, offset=own.offset)
        crops.append(apply(own, c)[0])
    out = {"image": np.stack(crops), "volume": chosen.astype(np.int32),
           "offset_u": np.broadcast_to(u, (3, p.num_partitions)).astype(np.float32), **_dropout_key(cfg, seed, k)}
    if p.objective in SAMPLED_OBJECTIVES:  # the one sampler of jaxseg's training: the step draws nothing itself
        rows = p.volumes_per_step * p.crops_per_volume
        out["triplets"] = np.stack([sample_triplets(step, rows, p.num_partitions, p.sampled_triplets)
                                    for _ in range(3)])
    return out


def _dropout_key(cfg: Config, seed: int, k: int) -> dict:
    """``rng``: (seed, step) as uint32, the dropout key's source in a training step (a function
    of the step alone, so a resumed run draws the same masks), for models with dropout."""
    return {"rng": np.asarray([seed % 2**32, k % 2**32], np.uint32)} if cfg.model.dropout_rate > 0 else {}


def _finetune_element(vols: _Volumes, cfg: Config, task, seed: int, shard: tuple[int, int], k: int) -> dict:
    f, n, size = cfg.finetune, len(vols.ids), (cfg.model.crop_size,) * 3
    chosen = []
    for slot in range(f.volumes_per_step):
        epoch, pos = divmod(k * f.volumes_per_step + slot, n)  # epoch-wise permutations: every case once per epoch
        chosen.append(int(_epoch_order(vols, epoch)[pos]))
    images, labels = [], []
    for r in host_rows(f.volumes_per_step * f.crops_per_volume, shard):
        v = chosen[r // f.crops_per_volume]
        img, lab, where = vols.images[v], vols.labels[v], vols.centres(v)
        rng = _row_rng(seed, k, r)
        if where.num_fg and rng.random() < f.pos_fraction:
            centre = where.foreground(rng.integers(where.num_fg))
        elif where.num_bg:
            centre = where.background(rng.integers(where.num_bg))
        else:  # no background inside the image: anywhere
            centre = [int(rng.integers(n)) for n in where.shape]
        start = centred_start(centre, img.shape[:3], size)
        ci, cl = augment(rng, crop_at(img, start, size), crop_at(lab, start, size), flip_prob=f.flip_prob,
                         rot90_prob=f.rot90_prob, shift_prob=f.shift_prob)
        images.append(ci)
        labels.append(task.targets(cl))
    return {"image": np.stack(images), "label": np.stack(labels), "volume": np.asarray(chosen, np.int32),
            **_dropout_key(cfg, seed, k)}


def _epoch_order(vols: _Volumes, epoch: int) -> np.ndarray:
    return np.random.default_rng([vols.order_seed, epoch]).permutation(len(vols.ids))


def pretrain_dataset(cache: Cache, case_ids: Sequence[str], cfg: Config, seed: int,
                     shard: tuple[int, int] = (0, 1)) -> grain.MapDataset:
    """Element k of ``cfg``'s pre-training input (``cfg.pretrain``, ``cfg.model.crop_size``):
    ``image`` (V*Cv / count, S, S, S, C) float32, this host's rows of the global batch ordered
    [v1a, v1b, v2a, ...] (``shard`` = (process index, process count); every row is a function of
    (seed, k, row) alone, so the global batch is the same for any process count), and, the same
    on every host: ``offset_u`` (3, P) uniforms in [0, 1) for each axis' partition offsets (the
    step scales them by the partition size of the map it slices, so one draw serves encoder and
    decoder stages), ``volume`` (V,), for a sampled objective ``triplets`` (3, K, 4): each axis'
    (i, j, p, p~), drawn here in NumPy (``jaxseg.losses.sample_triplets`` with a Generator) as a
    function of (seed, k), and for a model with dropout ``rng`` (``_dropout_key``)."""
    vols = _Volumes(cache, case_ids, labels=False)
    host_rows(cfg.pretrain.volumes_per_step * cfg.pretrain.crops_per_volume, shard)  # refuse a batch that cannot split, now
    return grain.MapDataset.range(_MAX_STEPS).map(lambda k: _pretrain_element(vols, cfg, seed, shard, k))


def finetune_dataset(cache: Cache, case_ids: Sequence[str], cfg: Config, seed: int,
                     shard: tuple[int, int] = (0, 1)) -> grain.MapDataset:
    """Element k of ``cfg``'s fine-tuning input (``cfg.finetune``): this host's rows (see
    ``pretrain_dataset``) of ``image`` (V*Cv, S, S, S, C) and ``label``: integer (V*Cv, S, S, S) class labels (uint8 from a cache)
    for softmax tasks, multi-hot (V*Cv, S, S, S, 3) TC/WT/ET for BraTS-like caches; ``volume``
    (V,) the case indices used, and ``rng`` for a model with dropout. Volumes follow a seeded
    permutation per epoch (every case once per epoch); a crop is centred on a foreground voxel
    with probability ``cfg.finetune.pos_fraction``, else on background."""
    vols, task = _Volumes(cache, case_ids, labels=True, order_seed=seed), cache.task
    host_rows(cfg.finetune.volumes_per_step * cfg.finetune.crops_per_volume, shard)
    return grain.MapDataset.range(_MAX_STEPS).map(lambda k: _finetune_element(vols, cfg, task, seed, shard, k))


def make_iterator(ds: grain.MapDataset, num_threads: int = 2, prefetch: int = 4):
    """A checkpointable iterator (``get_state`` / ``set_state``) with thread prefetching."""
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))
