"""Medical Segmentation Decathlon layout: ``dataset.json`` + ``imagesTr/``, ``labelsTr/``,
``imagesTs/`` NIfTI files; parsing and validation that reports every problem, naming the file."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from jaxseg.errors import UserError


class DataValidationError(UserError):
    """Raised with every problem found; ``problems`` lists them, each naming its file."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:  # the problem names its file: that is the heading
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems, each naming its file:\n  - " + "\n  - ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path | None = None


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    root: Path
    name: str
    modality: dict[int, str]
    labels: dict[int, str]
    training: tuple[Case, ...]
    test: tuple[Case, ...]

    @property
    def num_channels(self) -> int:
        return len(self.modality)

    @property
    def is_ct(self) -> bool:
        return any(m.strip().upper() == "CT" for m in self.modality.values())


def case_id_from_path(path: str | Path) -> str:
    name = Path(path).name
    return re.sub(r"(_0000)?\.nii(\.gz)?$", "", name)


def _resolve(root: Path, rel: str) -> Path:
    rel = rel[2:] if rel.startswith("./") else rel
    return root / rel


def dataset_json_problems(meta) -> list[str]:
    """Every way ``meta`` (dataset.json as parsed) is not an MSD description, one phrase each:
    the keys and the type of each, before anything reads them."""
    if not isinstance(meta, dict):
        return [f"must be a JSON object with \"modality\", \"labels\" and \"training\", not {type(meta).__name__}"]
    missing = [k for k in ("modality", "labels", "training") if k not in meta]
    if missing:
        return [f"missing key(s) {missing}"]
    out = []
    for key in ("modality", "labels"):
        if not isinstance(meta[key], dict) or not meta[key]:
            out.append(f"\"{key}\" must be a non-empty object of index -> name, not {json.dumps(meta[key])[:60]}")
            continue
        out += [f"{key} key {k!r} is not an integer" for k in meta[key] if not str(k).lstrip("-").isdigit()]
        out += [f"{key} {k!r}: the name must be a string, not {json.dumps(v)[:40]}" for k, v in meta[key].items()
                if not isinstance(v, str)]
    if not isinstance(meta["training"], list):
        out.append(f"\"training\" must be a list of {{\"image\", \"label\"}} entries, not "
                   f"{type(meta['training']).__name__}")
    else:
        out += [f"training entry {i} has no \"image\" path" for i, e in enumerate(meta["training"])
                if not isinstance(e, dict) or not isinstance(e.get("image"), str)]
        out += [f"training entry {i}: \"label\" must be a path, not {json.dumps(e['label'])[:40]}"
                for i, e in enumerate(meta["training"])
                if isinstance(e, dict) and e.get("label") is not None and not isinstance(e["label"], str)]
    test = meta.get("test", [])
    if not isinstance(test, list) or not all(isinstance(t, str) for t in test):
        out.append("\"test\" must be a list of image paths (strings)")
    if "name" in meta and not isinstance(meta["name"], str):
        out.append(f"\"name\" must be a string, not {json.dumps(meta['name'])[:40]}")
    return out


def load_dataset_json(root: str | Path) -> DatasetInfo:
    """Parse ``root/dataset.json`` (keys ``name``, ``modality``, ``labels``, ``training`` as a
    list of ``{"image", "label"}``, ``test`` as a list of paths)."""
    root = Path(root)
    path = root / "dataset.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; an MSD dataset folder needs a dataset.json")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataValidationError([f"{path}: not valid JSON ({e})"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataValidationError([f"{path}: cannot be read ({e})"]) from None
    problems = dataset_json_problems(meta)
    if problems:
        raise DataValidationError([f"{path}: {p}" for p in problems])
    training = tuple(
        Case(case_id_from_path(e["image"]), _resolve(root, e["image"]),
             _resolve(root, e["label"]) if e.get("label") else None)
        for e in meta["training"]
    )
    test = tuple(Case(case_id_from_path(p), _resolve(root, p)) for p in meta.get("test", []))
    ids = [c.case_id for c in training]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:  # two entries would share one cache folder
        raise DataValidationError([f"{path}: duplicate case ids {dup}"])
    return DatasetInfo(
        root=root, name=str(meta.get("name", root.name)),
        modality={int(k): str(v) for k, v in meta["modality"].items()},
        labels={int(k): str(v) for k, v in meta["labels"].items()},
        training=training, test=test,
    )


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data as float32, affine); raises ``DataValidationError`` naming the file if unreadable."""
    if not Path(path).is_file():
        raise DataValidationError([f"{path}: missing file"])
    try:
        img = nib.load(str(path))
        return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises many types for truncated / corrupt files
        raise DataValidationError([f"{path}: unreadable or corrupt NIfTI ({type(e).__name__}: {e})"]) from None


def check_case(case: Case, info: DatasetInfo, require_label: bool = True,
               image: np.ndarray | None = None, image_affine: np.ndarray | None = None,
               label: np.ndarray | None = None, label_affine: np.ndarray | None = None) -> list[str]:
    """Every problem of one case (loads the files unless arrays are given)."""
    problems: list[str] = []
    if image is None:
        try:
            image, image_affine = load_nifti(case.image)
        except DataValidationError as e:
            problems += e.problems
    if image is not None:
        channels = image.shape[3] if image.ndim == 4 else 1
        if image.ndim not in (3, 4):
            problems.append(f"{case.image}: expected a 3D or 4D image, got shape {image.shape}")
        elif channels != info.num_channels:
            problems.append(f"{case.image}: {channels} channel(s) but dataset.json lists "
                            f"{info.num_channels} modalities {list(info.modality.values())}")
        bad = int(np.count_nonzero(~np.isfinite(image)))
        if bad:
            problems.append(f"{case.image}: {bad} NaN/inf voxel(s)")
    if case.label is None:
        if require_label:
            problems.append(f"{case.image}: training case without a label file")
        return problems
    if label is None:
        try:
            label, label_affine = load_nifti(case.label)
        except DataValidationError as e:
            return problems + e.problems
    if image is not None and label.shape != image.shape[:3]:
        problems.append(f"{case.label}: label shape {label.shape} differs from image shape {image.shape[:3]} ({case.image.name})")
    if image_affine is not None and not np.allclose(label_affine, image_affine, atol=1e-3):
        problems.append(f"{case.label}: affine differs from the image's ({case.image.name})")
    if not np.all(np.isfinite(label)):
        problems.append(f"{case.label}: NaN/inf in the label map")
    elif (fractional := np.unique(label[label != np.rint(label)])).size:
        problems.append(f"{case.label}: non-integer label value(s) {fractional[:5].tolist()} (a label map holds "
                        f"class indices; was it resampled with interpolation?)")
    else:
        values = set(np.unique(label).astype(int).tolist())
        unknown = sorted(values - set(info.labels))
        if unknown:
            problems.append(f"{case.label}: label value(s) {unknown} not in dataset.json labels {sorted(info.labels)}")
        if require_label and values <= {0}:
            problems.append(f"{case.label}: empty label map (background only)")
    return problems
