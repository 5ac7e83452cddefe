"""Synthetic MSD-format datasets: a spleen-like CT task and a brain-tumour-like 4-channel MRI task.

What pre-training relies on holds by construction: anatomy sits at consistent positions across
subjects (each subject gets a random shift, per-axis scaling and a smooth deformation), so
slices from the same partition look alike across subjects and unlike other partitions. The
targets (a spleen; nested tumour regions edema ⊃ non-enhancing ⊃ enhancing, labels 1/2/3 as in
MSD Task01) vary in size and position, with intensities close to their surroundings, noise and
a bias field. Files use anisotropic spacing and a flipped (LPS-like) affine so that RAS
reorientation and resampling are exercised. Deterministic from a seed.

    python -c "from jaxseg.data.phantom import write_phantom_dataset as w; w('/tmp/spleen', 'spleen', 20)"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from jaxseg.data.workers import run_here_then_pool

KINDS = ("spleen", "braintumour")

# (center mm, radii mm, HU) in a canonical body frame centred on the volume.
_CT_ORGANS = [
    ("liver", (-17, 5, 8), (20, 17, 17), 62.0),
    ("stomach", (8, 16, 4), (11, 8, 9), 18.0),
    ("kidney_r", (-14, -15, -10), (6, 6, 10), 34.0),
    ("kidney_l", (15, -15, -8), (6, 6, 10), 34.0),
    ("aorta", (-2, -13, 0), (4, 4, 200), 125.0),
    ("spine", (0, -25, 0), (6.5, 6.5, 200), 420.0),
]
_SPLEEN = ((21, -7, 10), (9, 7, 12), 75.0)  # contrast-enhanced, brighter than liver
# Per channel (FLAIR, T1w, T1gd, T2w), arbitrary MR units.
_MR = {
    "scalp": (0.30, 0.85, 0.85, 0.40), "wm": (0.45, 0.78, 0.78, 0.35), "gm": (0.58, 0.56, 0.58, 0.58),
    "csf": (0.10, 0.20, 0.20, 0.95), "edema": (0.92, 0.46, 0.48, 0.86),
    "necrotic": (0.62, 0.30, 0.36, 0.72), "enhancing": (0.72, 0.50, 1.05, 0.62),
}


def _affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """LPS-like storage: x and y axes flipped, origin so that the volume centre is at 0 mm."""
    a = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    centre = (np.asarray(shape) - 1) / 2.0
    a[:3, 3] = -a[:3, :3] @ centre
    return a


def _canonical_coords(shape, affine, rng, deform_mm: float) -> np.ndarray:
    """World coordinates of every voxel mapped into the canonical frame of one subject:
    random scaling, shift and a smooth deformation. Returns (3, X, Y, Z) float32 mm."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    world = np.einsum("ij,j...->i...", affine[:3, :3].astype(np.float32), idx) + affine[:3, 3, None, None, None]
    scale = rng.uniform(0.9, 1.1, 3).astype(np.float32)
    shift = rng.normal(0, 3.0, 3).astype(np.float32)
    coarse = rng.normal(0, deform_mm, (3, 4, 4, 4)).astype(np.float32)
    zoom = [1] + [n / 4 for n in shape]
    warp = ndimage.zoom(coarse, zoom, order=1, grid_mode=True, mode="nearest")[:, : shape[0], : shape[1], : shape[2]]
    return (world - shift[:, None, None, None]) / scale[:, None, None, None] + warp


def _ellipsoid(c: np.ndarray, centre, radii) -> np.ndarray:
    q = sum(((c[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    return q


def _smooth_noise(rng, shape, sigma, amp) -> np.ndarray:
    return ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma) * amp * (sigma * 2.5)


def _bias_field(rng, shape, strength) -> np.ndarray:
    coarse = rng.normal(0, strength, (3, 3, 3)).astype(np.float32)
    return 1.0 + ndimage.zoom(coarse, [n / 3 for n in shape], order=1, grid_mode=True, mode="nearest")[: shape[0], : shape[1], : shape[2]]


def spleen_subject(rng: np.random.Generator, shape, affine) -> tuple[np.ndarray, np.ndarray]:
    """One CT subject: (HU int16 image (X, Y, Z), uint8 label with 1 = spleen)."""
    c = _canonical_coords(shape, affine, rng, deform_mm=3.0)
    body = (c[0] / 44) ** 2 + (c[1] / 34) ** 2
    img = np.full(shape, -1000.0, np.float32)
    img[body < 1.0] = -90.0  # subcutaneous fat
    img[body < 0.8] = 28.0  # soft tissue
    lungs = (_ellipsoid(c, (-17, 0, 44), (14, 17, 20)) < 1) | (_ellipsoid(c, (17, 0, 44), (14, 17, 20)) < 1)
    img[lungs & (body < 0.8)] = -840.0
    for _, centre, radii, hu in _CT_ORGANS:
        img[_ellipsoid(c, centre, radii) < 1.0] = hu
    vertebrae = (np.sin(c[2] / 4.0) > -0.6) & (_ellipsoid(c, (0, -25, 0), (6.5, 6.5, 1e4)) < 1)
    img[(_ellipsoid(c, (0, -25, 0), (6.5, 6.5, 1e4)) < 1) & ~vertebrae] = 60.0  # discs
    sc, sr, shu = _SPLEEN
    size = rng.uniform(0.6, 1.35)
    centre = np.asarray(sc) + rng.normal(0, 4.0, 3)
    radii = np.asarray(sr) * size * rng.uniform(0.85, 1.15, 3)
    spleen = (_ellipsoid(c, centre, radii) + 0.15 * _smooth_noise(rng, shape, 3, 1.0)) < 1.0
    spleen &= body < 0.8
    img[spleen] = shu + rng.normal(0, 4)
    img = img * _bias_field(rng, shape, 0.04)
    img += _smooth_noise(rng, shape, 1.0, 9.0) + rng.normal(0, 14.0, shape).astype(np.float32)
    return np.clip(img, -1024, 3000).astype(np.int16), spleen.astype(np.uint8)


def brain_subject(rng: np.random.Generator, shape, affine) -> tuple[np.ndarray, np.ndarray]:
    """One 4-channel MRI subject: (int16 image (X, Y, Z, 4), uint8 label 0-3, MSD Task01 codes)."""
    c = _canonical_coords(shape, affine, rng, deform_mm=2.5)
    head = _ellipsoid(c, (0, 0, 0), (40, 46, 40))
    brain = _ellipsoid(c, (0, -1, 1), (35, 41, 34))
    tissue = np.zeros(shape, np.uint8)  # 0 bg, 1 scalp, 2 gm, 3 wm, 4 csf
    tissue[head < 1] = 1
    tissue[brain < 1] = 2
    tissue[brain < 0.72] = 3
    vent = (_ellipsoid(c, (-6, 2, 6), (4, 13, 6)) < 1) | (_ellipsoid(c, (6, 2, 6), (4, 13, 6)) < 1)
    tissue[vent | ((brain < 1) & (brain > 0.97))] = 4
    # Tumour: nested regions R1 (edema) ⊃ R2 (non-enhancing) ⊃ R3 (enhancing); label = depth.
    while True:
        centre = rng.uniform(-1, 1, 3) * np.array([22, 26, 20])
        if _ellipsoid(centre[:, None], (0, -1, 1), (35, 41, 34))[0] < 0.5:
            break
    r1 = rng.uniform(10, 18)
    irregular = 0.25 * _smooth_noise(rng, shape, 3, 1.0)
    d = np.sqrt(_ellipsoid(c, centre, (r1, r1 * rng.uniform(0.8, 1.2), r1 * rng.uniform(0.8, 1.2)))) + irregular
    f2, f3 = rng.uniform(0.5, 0.75), rng.uniform(0.45, 0.7)
    label = np.zeros(shape, np.uint8)
    inside = brain < 1
    label[(d < 1) & inside] = 1
    label[(d < f2) & inside] = 2
    label[(d < f2 * f3) & inside] = 3
    names = [None, "scalp", "gm", "wm", "csf"]
    img = np.zeros(shape + (4,), np.float32)
    for t in range(1, 5):
        img[tissue == t] = _MR[names[t]]
    for lab, name in ((1, "edema"), (2, "necrotic"), (3, "enhancing")):
        img[label == lab] = _MR[name]
    bias = _bias_field(rng, shape, 0.12)
    fg = tissue > 0
    for ch in range(4):
        v = img[..., ch] * bias + _smooth_noise(rng, shape, 1.0, 0.03) + rng.normal(0, 0.05, shape)
        img[..., ch] = np.where(fg, np.maximum(v, 0.01), 0.0)
    return np.round(img * 1000).astype(np.int16), label


_META = {
    "spleen": dict(name="PhantomSpleen", description="synthetic spleen-like CT (jaxseg phantom)",
                   modality={"0": "CT"}, labels={"0": "background", "1": "spleen"}),
    "braintumour": dict(name="PhantomBrainTumour", description="synthetic brain-tumour-like MRI (jaxseg phantom)",
                        modality={"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                        labels={"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}),
}


def _write_subject(args):
    kind, seed, index, shape, spacing, img_path, lab_path = args
    rng = np.random.default_rng([seed, index])
    affine = _affine(shape, spacing)
    make = spleen_subject if kind == "spleen" else brain_subject
    image, label = make(rng, tuple(shape), affine)
    nib.save(nib.Nifti1Image(image, affine), str(img_path))
    if lab_path is not None:
        nib.save(nib.Nifti1Image(label, affine), str(lab_path))


def write_phantom_dataset(out_dir: str | Path, kind: str = "spleen", n_subjects: int = 20, *,
                          n_test: int = 0, shape: Sequence[int] = (80, 80, 48),
                          spacing: Sequence[float] = (1.2, 1.2, 2.0), seed: int = 0,
                          workers: int = 2) -> Path:
    """Write ``n_subjects`` labelled training subjects (+ ``n_test`` unlabelled test images) in
    MSD layout. The default grid (80 x 80 x 48 at 1.2 x 1.2 x 2.0 mm) spans 96 mm per axis,
    i.e. 96^3 after resampling to 1 mm. Returns the dataset folder."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    prefix = "spleen" if kind == "spleen" else "BRATS"
    jobs, training, test = [], [], []
    for i in range(n_subjects + n_test):
        name = f"{prefix}_{i:03d}.nii.gz"
        if i < n_subjects:
            jobs.append((kind, seed, i, tuple(shape), tuple(spacing), out / "imagesTr" / name, out / "labelsTr" / name))
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            jobs.append((kind, seed, i, tuple(shape), tuple(spacing), out / "imagesTs" / name, None))
            test.append(f"./imagesTs/{name}")
    run_here_then_pool(_write_subject, jobs, workers)
    meta = {**_META[kind], "tensorImageSize": "4D" if kind == "braintumour" else "3D",
            "numTraining": n_subjects, "numTest": n_test, "training": training, "test": test}
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return out
