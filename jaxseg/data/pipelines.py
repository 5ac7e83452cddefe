"""grain input pipelines for pre-training and fine-tuning, read from the preprocessing cache.

Element k of each pipeline is a whole step's batch, made by a function of (seed, k) alone
(``MapDataset.random_map``), so the stream is deterministic, independent of thread count, and
its position is one integer: the iterator state that checkpoints save and restore. Host work
overlaps device steps through grain's thread prefetch (``ReadOptions``). Worker processes were
slower than threads on 2 cores for arrays this size (see benchmarks/README.md), so threads are
the default.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from jaxseg.data.augment import augment, centred_start, crop_at, random_start
from jaxseg.data.cache import Cache
from jaxseg.data.preprocess import label_channels

_MAX_STEPS = 2**40  # "infinite" stream; the training loop decides when to stop


@dataclasses.dataclass(frozen=True)
class PretrainDataConfig:
    crop_size: int = 96
    volumes_per_step: int = 2
    crops_per_volume: int = 2
    num_partitions: int = 4
    shared_offset: bool = True  # the authors' single offset for all partitions
    flip_prob: float = 0.1
    rot90_prob: float = 0.1
    shift_prob: float = 0.5


@dataclasses.dataclass(frozen=True)
class FinetuneDataConfig:
    crop_size: int = 96
    volumes_per_step: int = 1
    crops_per_volume: int = 4
    pos_fraction: float = 0.5  # positive : negative crop centres 1:1
    flip_prob: float = 0.1
    rot90_prob: float = 0.1
    shift_prob: float = 0.5


class _Volumes:
    """Memory-mapped arrays opened once per pipeline (threads share them)."""

    def __init__(self, cache: Cache, case_ids: Sequence[str], labels: bool, order_seed: int = 0):
        if not case_ids:
            raise ValueError("no cases to read: the case list is empty")
        self.ids = list(case_ids)
        self.images = [cache.image(c) for c in self.ids]
        self.labels = [cache.label(c) for c in self.ids] if labels else None
        self.order_seed = order_seed


def _pretrain_element(vols: _Volumes, cfg: PretrainDataConfig, k: int, rng: np.random.Generator) -> dict:
    del k
    n = len(vols.ids)
    chosen = rng.choice(n, size=cfg.volumes_per_step, replace=n < cfg.volumes_per_step)
    size = (cfg.crop_size,) * 3
    crops = []
    for v in chosen:  # order [v1a, v1b, v2a, v2b], as the authors
        img = vols.images[v]
        for _ in range(cfg.crops_per_volume):
            c = crop_at(img, random_start(rng, img.shape[:3], size), size)
            crops.append(augment(rng, c, flip_prob=cfg.flip_prob, rot90_prob=cfg.rot90_prob,
                                 shift_prob=cfg.shift_prob)[0])
    p = cfg.num_partitions
    u = rng.random((3, 1 if cfg.shared_offset else p))
    return {"image": np.stack(crops), "volume": chosen.astype(np.int32),
            "offset_u": np.broadcast_to(u, (3, p)).astype(np.float32),
            "seed": np.int32(rng.integers(0, 2**31 - 1))}


def _finetune_element(vols: _Volumes, cfg: FinetuneDataConfig, regions, k: int,
                      rng: np.random.Generator) -> dict:
    n = len(vols.ids)
    size = (cfg.crop_size,) * 3
    images, labels, chosen = [], [], []
    for slot in range(cfg.volumes_per_step):
        flat = k * cfg.volumes_per_step + slot  # epoch-wise permutations: every case once per epoch
        epoch, pos = divmod(flat, n)
        v = int(_epoch_order(vols, epoch)[pos])
        chosen.append(v)
        img, lab = vols.images[v], vols.labels[v]
        lab_arr = np.asarray(lab)
        fg = np.argwhere(lab_arr > 0)
        bg_mask = (lab_arr == 0) & np.any(np.asarray(img) != 0, axis=-1)
        for _ in range(cfg.crops_per_volume):
            if len(fg) and rng.random() < cfg.pos_fraction:
                centre = fg[rng.integers(len(fg))]
            else:
                centre = _random_voxel(rng, bg_mask)
            start = centred_start(centre, img.shape[:3], size)
            ci, cl = crop_at(img, start, size), crop_at(lab_arr, start, size)
            ci, cl = augment(rng, ci, cl, flip_prob=cfg.flip_prob, rot90_prob=cfg.rot90_prob,
                             shift_prob=cfg.shift_prob)
            images.append(ci)
            labels.append(label_channels(cl, regions) if regions else cl.astype(np.int32))
    return {"image": np.stack(images), "label": np.stack(labels), "volume": np.asarray(chosen, np.int32)}


def _random_voxel(rng, mask):
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return [int(rng.integers(n)) for n in mask.shape]
    return np.unravel_index(idx[rng.integers(idx.size)], mask.shape)


def _epoch_order(vols: _Volumes, epoch: int) -> np.ndarray:
    return np.random.default_rng([vols.order_seed, epoch]).permutation(len(vols.ids))


def pretrain_dataset(cache: Cache, case_ids: Sequence[str], cfg: PretrainDataConfig, seed: int) -> grain.MapDataset:
    """Element k: ``image`` (V*Cv, S, S, S, C) float32 crops ordered [v1a, v1b, v2a, ...],
    ``offset_u`` (3, P) uniforms in [0, 1) for each axis' partition offsets (the step scales
    them by the partition size of the map it slices, so one draw serves encoder and decoder
    stages), and ``seed``, from which the step draws the triplets of a sampled objective (one
    sampler, ``jaxseg.losses.sample_triplets``, inside the jitted step)."""
    vols = _Volumes(cache, case_ids, labels=False)
    return grain.MapDataset.range(_MAX_STEPS).random_map(
        lambda k, rng: _pretrain_element(vols, cfg, k, rng), seed=seed)


def finetune_dataset(cache: Cache, case_ids: Sequence[str], cfg: FinetuneDataConfig, seed: int) -> grain.MapDataset:
    """Element k: ``image`` (V*Cv, S, S, S, C) and ``label``: integer (V*Cv, S, S, S) for
    softmax tasks, multi-hot (V*Cv, S, S, S, 3) TC/WT/ET for BraTS-like caches, and ``volume``
    (V,) the case indices used. Volumes follow a seeded permutation per epoch (every case once
    per epoch); crop centres are foreground / background 1:1."""
    vols = _Volumes(cache, case_ids, labels=True, order_seed=seed)
    return grain.MapDataset.range(_MAX_STEPS).random_map(
        lambda k, rng: _finetune_element(vols, cfg, cache.regions, k, rng), seed=seed)


def make_iterator(ds: grain.MapDataset, num_threads: int = 2, prefetch: int = 4):
    """A checkpointable iterator (``get_state`` / ``set_state``) with thread prefetching."""
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))
