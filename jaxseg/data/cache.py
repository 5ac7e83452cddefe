"""Preprocessed-case cache: one folder per case with ``image.npy`` (X, Y, Z, C) float32,
``label.npy`` (X, Y, Z) uint8 and ``meta.json``; read back memory-mapped.

A case folder is written under a temporary name and renamed into place, so a run killed midway
never leaves a folder that looks complete; re-running skips complete, readable cases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path

import numpy as np

from jaxseg.distributed.locks import locked
from jaxseg.errors import UserError
from jaxseg.io import atomic_write_text, check_writable

from jaxseg.data.msd import Case, DatasetInfo, DataValidationError, check_case, load_nifti
from jaxseg.data.preprocess import brats_regions, preprocess_case
from jaxseg.data.task import Task
from jaxseg.data.workers import run_here_then_pool

INDEX = "cache.json"


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    target_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ct_range: tuple[float, float] = (-175.0, 250.0)

    def __post_init__(self):
        sp = tuple(self.target_spacing)
        if len(sp) != 3 or not all(float(v) > 0 for v in sp):
            raise UserError(f"spacing must be three positive numbers (mm), got {list(sp)}")
        if len(self.ct_range) != 2 or not self.ct_range[0] < self.ct_range[1]:
            raise UserError(f"ct_range must be (low, high) with low < high, got {list(self.ct_range)}")


CROP_ROWS = "crop_rows.npy"  # where fine-tuning crops may be centred (crop_rows); not in meta.json's terms


def crop_rows(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Where a fine-tuning crop of this case may be centred (as MONAI's ``FgBgToIndicesd``, as
    nnU-Net's stored class locations), in bounded memory: row 0, the running count of foreground
    voxels (label > 0) over the (d, h) rows of the volume in C order; row 1, the same for
    background (label 0 where any image channel is non-zero). ``jaxseg.data.pipelines.CropCentres``
    finds the i-th such voxel from them. (2, D*H) int32 (int64 past 2**31 voxels)."""
    label = np.asarray(label)
    dtype = np.int32 if label.size < 2**31 else np.int64
    fg, bg = crop_foreground(label).sum(axis=-1), crop_background(image, label).sum(axis=-1)
    return np.stack([np.cumsum(fg, axis=None, dtype=dtype), np.cumsum(bg, axis=None, dtype=dtype)])


def crop_foreground(label: np.ndarray) -> np.ndarray:
    """Voxels a foreground crop may be centred on (of a volume, or of rows of it)."""
    return np.asarray(label) > 0


def crop_background(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Voxels a background crop may be centred on: label 0 where any image channel is non-zero."""
    return (np.asarray(label) == 0) & np.any(np.asarray(image) != 0, axis=-1)


def case_dir(out_dir: Path, case_id: str) -> Path:
    return Path(out_dir) / "cases" / case_id


def dataset_fingerprint(info: DatasetInfo) -> str:
    """Changes when dataset.json or any file it names changes (name, size, modification time)."""
    h = hashlib.sha256((Path(info.root) / "dataset.json").read_bytes())
    for case in (*info.training, *info.test):
        for f in (case.image, case.label):
            if f is not None:
                try:
                    st = os.stat(f)
                    h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                except OSError:
                    h.update(f"{f}|missing\n".encode())
    return h.hexdigest()


def dataset_terms(info: DatasetInfo) -> dict:
    """What of dataset.json a cached case depends on beside its own files: the modalities (CT
    windowing or z-scoring, the channel count) and the labels (which values are valid, regions)."""
    return {"modality": {str(k): v for k, v in info.modality.items()},
            "labels": {str(k): v for k, v in info.labels.items()}}


def cache_key(info: DatasetInfo, cfg: PrepareConfig) -> str:
    """The folder name of ``info`` prepared with ``cfg`` inside a cache root: the spacing, and a
    digest of the preprocessing settings and of the dataset (``dataset_fingerprint``). Another
    setting or an edited dataset is another folder, so a prepared cache never changes in place."""
    digest = hashlib.sha256(json.dumps([_settings(cfg), dataset_fingerprint(info)]).encode()).hexdigest()
    return "x".join(f"{v:g}" for v in cfg.target_spacing) + f"mm-{digest[:12]}"


def prepared_cache(info: DatasetInfo, root: str | Path, cfg: PrepareConfig = PrepareConfig(),
                   workers: int | None = None, progress: bool = True) -> Path:
    """The folder under ``root`` that holds ``info`` prepared with ``cfg`` (``cache_key``),
    prepared first if it is not complete; returns at once when it is."""
    folder = Path(root) / cache_key(info, cfg)
    prepare(info, folder, cfg, workers=workers, progress=progress)
    return folder


def is_current(info: DatasetInfo, out_dir: str | Path, cfg: PrepareConfig) -> bool:
    """Whether ``out_dir`` already holds ``info`` prepared with ``cfg`` (then nothing to do)."""
    index = _read_index(out_dir)
    return index.get("prepare") == _settings(cfg) and index.get("fingerprint") == dataset_fingerprint(info)


def _read_index(out_dir: str | Path) -> dict:
    try:
        index = json.loads((Path(out_dir) / INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _settings(cfg: PrepareConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _source_stamp(case: Case) -> list:
    return [[str(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in (case.image, case.label) if f is not None]


def is_complete(path: Path) -> bool:
    """A case folder is complete when meta.json says so and the arrays' headers match it."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        img = np.load(path / "image.npy", mmap_mode="r")
        if list(img.shape) != meta["cached_shape"]:
            return False
        if meta["has_label"]:
            lab = np.load(path / "label.npy", mmap_mode="r")
            return list(lab.shape) == meta["cached_shape"][:3]
        return True
    except (OSError, ValueError, KeyError):
        return False


def _same_preparation(path: Path, expect: dict) -> bool:
    """Whether the complete case folder ``path`` was prepared from the same files, settings and
    dataset terms as ``expect`` says."""
    if not is_complete(path):
        return False
    meta = json.loads((path / "meta.json").read_text())
    return all(meta.get(k) == v for k, v in expect.items())


def _reuse(case_id: str, out_dir: Path, expect: dict) -> bool:
    """Hard-link (or copy) the case from another preparation under the same cache root made
    from the same files and settings (the dataset edited elsewhere, a case added): no work
    done twice, and the other folder untouched."""
    final = case_dir(out_dir, case_id)
    for other in sorted(out_dir.parent.glob(f"*/cases/{case_id}")):
        if other.parent.parent == out_dir or not _same_preparation(other, expect):
            continue
        tmp = final.parent / f".tmp-{case_id}-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(other, tmp, copy_function=_link_or_copy)
            os.replace(tmp, final)
            return True
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return False


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # cached files are never modified, only replaced: safe to share
    except OSError:
        shutil.copy2(src, dst)


def _prepare_one(case: Case, info: DatasetInfo, out_dir: Path, cfg: PrepareConfig) -> tuple[str, list[str]]:
    final = case_dir(out_dir, case.case_id)
    try:
        stamp = _source_stamp(case)
    except OSError:
        stamp = None  # a missing file: reported below
    expect = {"prepare": _settings(cfg), "source": stamp, "dataset": dataset_terms(info)}
    if stamp is not None and (_same_preparation(final, expect) or _reuse(case.case_id, out_dir, expect)):
        return "skipped", []
    try:
        image, affine = load_nifti(case.image)
    except DataValidationError as e:
        return "failed", e.problems
    label = lab_aff = None
    if case.label is not None:
        try:
            label, lab_aff = load_nifti(case.label)
        except DataValidationError as e:
            return "failed", e.problems
    problems = check_case(case, info, True, image, affine, label, lab_aff)
    if problems:
        return "failed", problems
    out = preprocess_case(image, affine, label, target_spacing=cfg.target_spacing, ct=info.is_ct,
                          ct_range=cfg.ct_range)
    tmp = final.parent / f".tmp-{case.case_id}-{os.getpid()}"
    meta = {**out["meta"], "case_id": case.case_id, "image_file": str(case.image),
            "label_file": str(case.label) if case.label else None, "has_label": out["label"] is not None,
            "cached_shape": list(out["image"].shape), **expect}
    target = tmp
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        target = tmp / "image.npy"
        np.save(target, out["image"])
        if out["label"] is not None:
            target = tmp / "label.npy"
            np.save(target, out["label"])
            target = tmp / CROP_ROWS
            np.save(target, crop_rows(out["image"], out["label"]))
        target = tmp / "meta.json"
        target.write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)  # an outdated or incomplete leftover
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = e.errno == errno.ENOSPC or shutil.disk_usage(final.parent).free < 64 * 2**20
        return "failed", [f"{target}: could not write the cached case" + (": the disk is full" if full else "")
                          + f" ({type(e).__name__}: {e})"]
    return "done", []


def prepare(info: DatasetInfo, out_dir: str | Path, cfg: PrepareConfig = PrepareConfig(),
            workers: int | None = None, progress: bool = True) -> dict:
    """Preprocess every training case into ``out_dir``: in this process while the cases are
    quick (phantoms, small scans), in parallel processes once that pays (``run_here_then_pool``). Cases with
    problems are not cached; all problems are raised together at the end as
    ``DataValidationError`` (valid cases stay cached, no work is lost; a rerun goes on). A
    complete cache of other settings or of another version of the dataset is never changed:
    ``UserError`` (jobs use ``prepared_cache``, one folder per preparation)."""
    out_dir = Path(out_dir)
    if workers is not None and workers < 1:
        raise UserError(f"workers must be >= 1 (or None: one per core), got {workers}")
    check_writable(out_dir, "cache folder")  # before any case is read
    if is_current(info, out_dir, cfg):  # nothing changed: no lock, no pool, no case re-read
        return {"done": 0, "skipped": len(info.training), "failed": 0}
    with locked(out_dir / ".lock"):
        _refuse_other_complete_cache(info, out_dir, cfg)
        return _prepare_locked(info, out_dir, cfg, workers, progress)


def _refuse_other_complete_cache(info: DatasetInfo, out_dir: Path, cfg: PrepareConfig) -> None:
    index = _read_index(out_dir)
    if not index.get("fingerprint") or is_current(info, out_dir, cfg):
        return  # empty, unfinished (killed or with problems), or just finished by another process
    what = (f"target spacing {index.get('prepare', {}).get('target_spacing')} mm, not "
            f"{list(cfg.target_spacing)} mm" if index.get("prepare") != _settings(cfg) else
            "another version of the dataset (dataset.json or its files have changed since)")
    raise UserError(f"{out_dir}: holds a complete cache prepared with {what}; a prepared cache is never "
                    f"changed in place (a running job may read it). Use another folder, or the cache root, "
                    f"where each preparation has its own folder")


def _prepare_locked(info, out_dir: Path, cfg: PrepareConfig, workers, progress: bool) -> dict:
    (out_dir / "cases").mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / "cases").glob(".tmp-*"):  # left by a killed run (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    fingerprint = dataset_fingerprint(info)
    status: dict[str, int] = {"done": 0, "skipped": 0, "failed": 0}
    problems: list[str] = []
    from tqdm import tqdm

    bar = tqdm(total=len(info.training), desc="prepare", unit="case", disable=not progress)

    def record(result: tuple[str, list[str]]) -> None:
        status[result[0]] += 1
        problems.extend(result[1])
        bar.update(1)
        bar.set_postfix(status)

    run_here_then_pool(functools.partial(_prepare_one, info=info, out_dir=out_dir, cfg=cfg), info.training,
                       workers or os.cpu_count() or 1, record)  # it starts no more workers than jobs left
    bar.close()
    index = {
        "name": info.name, "modality": {str(k): v for k, v in info.modality.items()},
        "labels": {str(k): v for k, v in info.labels.items()},
        "training": [c.case_id for c in info.training if is_complete(case_dir(out_dir, c.case_id))],
        "target_spacing": list(cfg.target_spacing), "is_ct": info.is_ct,
        "prepare": _settings(cfg), "fingerprint": fingerprint if not problems else None,
    }
    try:
        index["regions"] = brats_regions(info.labels)
    except ValueError:
        index["regions"] = None
    atomic_write_text(out_dir / INDEX, json.dumps(index, indent=1))
    if problems:
        raise DataValidationError(sorted(problems))
    return status


class Cache:
    """Read side of a prepared cache: case ids, memory-mapped arrays, metadata."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / INDEX
        if not path.is_file():
            raise UserError(f"{path}: missing; run `python -m experiments.prepare` first")
        self.index = json.loads(path.read_text())
        self.labels = {int(k): v for k, v in self.index["labels"].items()}
        self.regions: dict[str, list[int]] | None = self.index.get("regions")
        self.num_channels = len(self.index["modality"])

    @property
    def training(self) -> list[str]:
        return list(self.index["training"])

    @property
    def class_names(self) -> list[str]:
        return list(self.regions) if self.regions else [self.labels[k] for k in sorted(self.labels)]

    @functools.cached_property
    def task(self) -> Task:
        """What the model predicts for this data, computed once."""
        return Task.of(self.class_names, self.num_channels, self.regions)

    def image(self, case_id: str) -> np.ndarray:
        return np.load(case_dir(self.root, case_id) / "image.npy", mmap_mode="r")

    def label(self, case_id: str) -> np.ndarray:
        return np.load(case_dir(self.root, case_id) / "label.npy", mmap_mode="r")

    def crop_rows(self, case_id: str) -> np.ndarray:
        """The case's ``crop_rows``, stored when it was prepared. A cache prepared before they
        were gains them here, on first use: a function of the case's arrays, which are never
        rewritten in place, so the file is added beside them (atomically; two processes write
        the same bytes) and not to the settings digest. A read-only cache computes them each time."""
        path = case_dir(self.root, case_id) / CROP_ROWS
        label = self.label(case_id)
        try:
            rows = np.load(path)
            if rows.shape == (2, label.shape[0] * label.shape[1]):
                return rows
        except Exception:  # noqa: BLE001 - not there (an older cache) or unreadable (cut short): made again
            pass
        rows = crop_rows(self.image(case_id), label)
        # unique across the hosts that may share the cache folder, and the threads of each
        tmp = path.with_name(f".{CROP_ROWS}.{socket.gethostname()}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, rows)
            os.replace(tmp, path)
        except OSError:  # a read-only cache: computed, not kept
            with contextlib.suppress(OSError):  # on a read-only mount even a missing file's unlink fails
                tmp.unlink()
        return rows

    def meta(self, case_id: str) -> dict:
        return json.loads((case_dir(self.root, case_id) / "meta.json").read_text())
