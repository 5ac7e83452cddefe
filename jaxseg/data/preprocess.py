"""Preprocessing: RAS reorientation, resampling to a target spacing, intensity normalisation,
label conversion and foreground cropping, with the bookkeeping to map predictions back."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt
from scipy import ndimage


def spacing_of(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient the first three axes to RAS. Returns (data, new affine, orientation transform)."""
    transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt("RAS"))
    out = ornt.apply_orientation(data, transform)
    new_affine = affine @ ornt.inv_ornt_aff(transform, data.shape[:3])
    return np.ascontiguousarray(out), new_affine, transform


def from_ras(data: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """Undo ``to_ras``: RAS-oriented data back to the orientation of ``original_affine``."""
    inverse = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.io_orientation(original_affine))
    return np.ascontiguousarray(ornt.apply_orientation(data, inverse))


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resample(data: np.ndarray, affine: np.ndarray, target_spacing: Sequence[float], order: int,
             out_shape: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Resample the first three axes to ``target_spacing`` (order 1 for images, 0 for labels).

    Voxel 0 keeps its physical position; output voxel j samples input coordinate
    ``j * target / spacing``, so the new affine is ``affine @ diag(target / spacing)``."""
    spacing = spacing_of(affine)
    scale = np.asarray(target_spacing, float) / spacing
    shape = tuple(out_shape) if out_shape is not None else resampled_shape(data.shape[:3], spacing, target_spacing)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * scale[None, :]
    if np.allclose(scale, 1.0) and shape == data.shape[:3]:
        return data, new_affine

    def one(vol):
        return ndimage.affine_transform(vol, scale, output_shape=shape, order=order, mode="nearest",
                                        prefilter=False)

    if data.ndim == 4:
        out = np.stack([one(data[..., c]) for c in range(data.shape[3])], axis=-1)
    else:
        out = one(data)
    return out.astype(data.dtype, copy=False), new_affine


def ct_window(x: np.ndarray, lo: float = -175.0, hi: float = 250.0) -> np.ndarray:
    """Clip to [lo, hi] and scale to [0, 1] (spleen: [-175, 250] HU)."""
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def zscore_nonzero(x: np.ndarray) -> np.ndarray:
    """Per channel (last axis), z-score over non-zero voxels; zeros stay zero (MRI)."""
    out = np.zeros_like(x, dtype=np.float32)
    for c in range(x.shape[-1]):
        v = x[..., c]
        nz = v != 0
        if nz.any():
            mu, sd = v[nz].mean(), v[nz].std()
            out[..., c][nz] = (v[nz] - mu) / (sd if sd > 0 else 1.0)
    return out


def brats_regions(labels: Mapping[int, str]) -> dict[str, list[int]]:
    """TC / WT / ET as sets of label values, from dataset.json's label NAMES (MSD Task01:
    1 edema, 2 non-enhancing tumour, 3 enhancing tumour; other numberings work the same).
    Raises if the names do not describe enhancing tumour and edema."""
    fg = {k: v.lower() for k, v in labels.items() if k != 0}
    enh = [k for k, v in fg.items() if "enhanc" in v and "non" not in v]
    non = [k for k, v in fg.items() if ("non" in v and "enhanc" in v) or "necro" in v]
    edema = [k for k, v in fg.items() if "edema" in v or "oedema" in v]
    if not enh or not edema:
        raise ValueError(f"labels {dict(labels)} do not name enhancing tumour and edema: not a BraTS label set")
    return {"TC": sorted(enh + non), "WT": sorted(fg), "ET": sorted(enh)}


def label_channels(label: np.ndarray, regions: Mapping[str, Sequence[int]]) -> np.ndarray:
    """Integer label map -> multi-hot channels (last axis) in ``regions`` order."""
    return np.stack([np.isin(label, list(v)) for v in regions.values()], axis=-1).astype(np.uint8)


def foreground_box(image: np.ndarray, margin: int = 0) -> tuple[tuple[int, int], ...]:
    """Box of voxels where any channel is non-zero: ((lo, hi) per spatial axis), hi exclusive."""
    mask = np.any(image != 0, axis=-1) if image.ndim == 4 else image != 0
    if not mask.any():
        return tuple((0, n) for n in mask.shape)
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    return tuple((int(a), int(b)) for a, b in zip(lo, hi))


def crop(x: np.ndarray, box) -> np.ndarray:
    return x[tuple(slice(a, b) for a, b in box)]


def uncrop(x: np.ndarray, box, shape: Sequence[int], fill=0) -> np.ndarray:
    out = np.full(tuple(shape) + x.shape[3:], fill, dtype=x.dtype)
    out[tuple(slice(a, b) for a, b in box)] = x
    return out


def preprocess_case(image: np.ndarray, affine: np.ndarray, label: np.ndarray | None, *,
                    target_spacing: Sequence[float] = (1.0, 1.0, 1.0), ct: bool = False,
                    ct_range: tuple[float, float] = (-175.0, 250.0)) -> dict:
    """Full preprocessing of one case. image: (X, Y, Z) or (X, Y, Z, C). Returns a dict with
    ``image`` (X', Y', Z', C) float32, ``label`` (X', Y', Z') uint8 or None, and ``meta``: what
    ``restore_label`` needs to map a prediction back to the original grid."""
    if image.ndim == 3:
        image = image[..., None]
    ras_img, ras_aff, _ = to_ras(image, affine)
    res_img, res_aff = resample(ras_img, ras_aff, target_spacing, order=1)
    res_img = ct_window(res_img, *ct_range) if ct else zscore_nonzero(res_img)
    res_lab = None
    if label is not None:
        ras_lab, _, _ = to_ras(label, affine)
        res_lab, _ = resample(ras_lab.astype(np.float32), ras_aff, target_spacing, order=0,
                              out_shape=res_img.shape[:3])
        res_lab = np.rint(res_lab).astype(np.uint8)
    box = foreground_box(res_img)
    meta = {
        "original_shape": list(image.shape[:3]), "original_affine": affine.tolist(),
        "ras_shape": list(ras_img.shape[:3]),
        "ras_affine": ras_aff.tolist(), "resampled_shape": list(res_img.shape[:3]),
        "resampled_affine": res_aff.tolist(), "spacing": list(map(float, target_spacing)),
        "crop_box": [list(b) for b in box],
    }
    return {"image": np.ascontiguousarray(crop(res_img, box)),
            "label": None if res_lab is None else np.ascontiguousarray(crop(res_lab, box)),
            "meta": meta}


def restore_label(pred: np.ndarray, meta: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Map a label map (or channels-last stack) predicted on the cached grid back to the
    original image grid: uncrop, resample (nearest) to the RAS grid, undo the reorientation.
    Returns (data, original affine)."""
    full = uncrop(pred, meta["crop_box"], meta["resampled_shape"])
    res_aff = np.asarray(meta["resampled_affine"])
    ras_aff = np.asarray(meta["ras_affine"])
    # Output (RAS grid) voxel i samples resampled voxel i * spacing_ras / spacing_target.
    scale = spacing_of(ras_aff) / spacing_of(res_aff)
    shape = tuple(meta["ras_shape"])

    def one(vol):
        return ndimage.affine_transform(vol, scale, output_shape=shape, order=0, mode="nearest")

    ras = np.stack([one(full[..., c]) for c in range(full.shape[3])], -1) if full.ndim == 4 else one(full)
    affine = np.asarray(meta["original_affine"])
    return from_ras(ras, affine), affine


def save_nifti(path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI file atomically (a reader sees the old file or the new one, never half)."""
    import os

    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"  # nibabel picks the format by the name
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        nib.save(nib.Nifti1Image(data, affine), str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
