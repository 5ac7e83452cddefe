"""Segment new scans with a trained run: ``load_model`` (one call) and ``predict_file``.

A training run's output folder holds ``model.json`` (the model config, the preprocessing of its
data cache, class names) beside its weights (``best.msgpack`` after fine-tuning,
``params.msgpack`` after pre-training). Prediction applies the same preprocessing (RAS, target
spacing, CT window or z-score, foreground crop), sliding-window inference, optional flip
test-time augmentation, and writes the segmentation in the input's own geometry (shape,
affine, orientation).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from jaxseg.data.msd import load_nifti
from jaxseg.data.preprocess import preprocess_case, restore_label, save_nifti
from jaxseg.data.task import Task
from jaxseg.errors import UserError
from jaxseg.inference import make_predictor

MODEL_CARD = "model.json"
WEIGHTS = ("best.msgpack", "params.msgpack")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a trained run's scans were prepared and predicted, from its model.json."""

    target_spacing: tuple[float, float, float]
    is_ct: bool
    ct_range: tuple[float, float]
    task: Task  # class names, input channels, classes or regions and the decision rule
    roi: int
    overlap: float = 0.25
    sw_batch_size: int = 4
    train_flip_prob: float | None = None  # per-axis flip probability in fine-tuning (None: not recorded)


def model_card(cfg, cache) -> dict:
    """What ``load_model`` needs, from a run's config and its data cache."""
    prep = cache.index.get("prepare", {})
    task = cache.task
    return {"model": cfg.model.size, "crop_size": cfg.model.crop_size, "dtype": cfg.model.dtype,
            "out_channels": task.num_classes, **task.card(),
            "target_spacing": list(cache.index["target_spacing"]), "is_ct": bool(cache.index.get("is_ct")),
            "ct_range": list(prep.get("ct_range", (-175.0, 250.0))), "overlap": cfg.eval.overlap,
            "sw_batch_size": cfg.eval.sw_batch_size, "train_flip_prob": cfg.finetune.flip_prob,
            "dropout_rate": cfg.model.dropout_rate,
            "augmentation": {k: v for k, v in cfg.flat().items() if k.startswith(("pretrain_", "finetune_"))
                             and k.endswith(("_prob", "_augment"))}}


# The settings (flat config names) a trained model fixes: its network and the grid it was trained on.
CARD_SETTINGS = ("model", "crop_size", "target_spacing")


def card_settings(card: dict) -> dict:
    """The settings a model card fixes, by flat config name."""
    return {"model": card["model"], "crop_size": card["crop_size"],
            "target_spacing": tuple(float(v) for v in card["target_spacing"])}


def card_beside(weights: str | Path) -> dict | None:
    """The model card in the folder of a weights file, if there is one."""
    path = Path(weights).parent / MODEL_CARD
    return json.loads(path.read_text()) if path.is_file() else None


def load_model(run: str | Path, dtype: str | None = None, allow_unverified: bool = False
               ) -> tuple[Any, Any, Preprocessing]:
    """``(model, params, preprocessing)`` of a trained run: its output folder, or one weights file
    inside it. ``dtype`` overrides the compute dtype (e.g. 'bfloat16' on a GPU); a weights file
    without a checksum loads only with ``allow_unverified``."""
    from jaxseg.io import load_weights
    from jaxseg.models import param_shapes, unetr_from_preset

    run = Path(run)
    folder, weights = (run.parent, run) if run.is_file() else (run, next(
        (run / w for w in WEIGHTS if (run / w).is_file()), None))
    card_path = folder / MODEL_CARD
    if not card_path.is_file() or weights is None:
        raise UserError(f"{run}: not a trained run (needs {MODEL_CARD} and one of {', '.join(WEIGHTS)}); "
                        "pass the output folder of experiments.finetune or experiments.pretrain")
    card = json.loads(card_path.read_text())
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype or card["dtype"]]
    model = unetr_from_preset(card["model"], in_channels=card["in_channels"], out_channels=card["out_channels"],
                              img_size=card["crop_size"], dtype=dt)
    params = load_weights(weights, param_shapes(model), allow_unverified)
    prep = Preprocessing(tuple(card["target_spacing"]), card["is_ct"], tuple(card["ct_range"]), Task.from_card(card),
                         card["crop_size"], card["overlap"], card["sw_batch_size"], card.get("train_flip_prob"))
    return model, params, prep


TTA_MIN_FLIP_PROB = 0.5  # flipped views are in distribution only for a model trained on them this often


def check_flip_tta(train_flip_prob: float | None) -> None:
    """Refuse flip test-time augmentation for a model not trained to be flip-invariant (flips of
    p < 0.5 per axis; None: not recorded, an older model trained at 0.1): a run of the main job
    (p = 0.1) averaged into an EMPTY segmentation where the plain prediction found the spleen,
    since 7 of the 8 flipped views are out of its distribution. ``--finetune_flip_prob=0.5``
    trains a model that may use it (nnU-Net's mirroring)."""
    p = train_flip_prob
    if p is None or p < TTA_MIN_FLIP_PROB:
        raise UserError(f"--tta averages the 8 flips of the scan, but this model was trained with flips of "
                        f"p = {p if p is not None else 0.1} per axis, so flipped views are out of its distribution "
                        f"(on the main job's model they gave an empty segmentation); predict without --tta, or "
                        f"fine-tune with --finetune_flip_prob=0.5")


def model_predictor(model, params, prep: Preprocessing, flip_tta: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """image on the model's grid (X, Y, Z, C) -> probabilities (X, Y, Z, K) of a loaded model
    (``jaxseg.inference.make_predictor`` with the run's own window settings); ``flip_tta`` only
    for a model trained with flips of p >= 0.5 (``check_flip_tta``)."""
    if flip_tta:
        check_flip_tta(prep.train_flip_prob)
    return functools.partial(make_predictor(model, prep.task, prep.roi, prep.sw_batch_size, prep.overlap, flip_tta),
                             params)


def read_scan(path: Path, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """(image (X, Y, Z, C), affine), refusing what cannot match the model, naming the file."""
    image, affine = load_nifti(path)
    if image.ndim == 3:
        image = image[..., None]
    if image.ndim != 4:
        raise UserError(f"{path}: a {image.ndim}-D image; the model takes 3-D scans (X, Y, Z) or (X, Y, Z, C)")
    if image.shape[-1] != prep.task.in_channels:
        raise UserError(f"{path}: {image.shape[-1]} channel(s); the model was trained on {prep.task.in_channels}")
    if not np.isfinite(image).all():
        raise UserError(f"{path}: contains NaN or infinite values")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    if not (zooms > 0).all() or not np.isfinite(zooms).all():
        raise UserError(f"{path}: its affine gives a voxel spacing of {zooms.tolist()}, which cannot be resampled")
    return image, affine


def output_name(path: Path) -> str:
    """``scan.nii.gz`` and ``scan.nii`` -> ``scan``: its outputs are ``scan.nii.gz`` and so on."""
    return Path(path).name.removesuffix(".gz").removesuffix(".nii")


def check_outputs(scans: list[Path], label: str | Path | None, out: Path) -> None:
    """Refuse, before any work, a run that would overwrite an input or write two scans to one
    name (each scan's outputs: ``<name>.nii.gz``, ``<name>_probs.nii.gz``, ``<name>.png``)."""
    taken: dict[str, Path] = {}
    for path in scans:
        name = output_name(path)
        if name in taken:
            raise UserError(f"{taken[name]} and {path} would both be written as {out / name}.nii.gz; "
                            f"rename one of them or segment them into separate --output folders")
        taken[name] = path
    inputs = {p.resolve() for p in scans} | ({Path(label).resolve()} if label else set())
    for name in taken:
        for target in (f"{name}.nii.gz", f"{name}_probs.nii.gz", f"{name}.png", "predictions.json"):
            if (out / target).resolve() in inputs:
                raise UserError(f"--output {out}: writing {target} there would overwrite the input "
                                f"{out / target}; choose another --output folder")


def predict_file(path: str | Path, predict: Callable[[np.ndarray], np.ndarray], prep: Preprocessing,
                 out_dir: str | Path, probabilities: bool = False, figure: bool = False,
                 label: str | Path | None = None) -> dict:
    """Segment one NIfTI scan into ``out_dir/<name>.nii.gz`` (uint8 labels, or one channel per
    region for multi-label models) in the scan's own geometry; optionally
    ``<name>_probs.nii.gz`` (float32, nearest-resampled) and ``<name>.png`` (image and
    prediction, and the truth when ``label``, the scan's label map, is given)."""
    path, out_dir = Path(path), Path(out_dir)
    image, affine = read_scan(path, prep)
    truth = None
    if label is not None:
        truth, label_affine = load_nifti(label)
        if truth.shape != image.shape[:3] or not np.allclose(label_affine, affine, atol=1e-4):
            raise UserError(f"{label}: its shape {truth.shape} or affine does not match the scan {path.name} "
                            f"({image.shape[:3]})")
    case = preprocess_case(image, affine, truth, target_spacing=prep.target_spacing, ct=prep.is_ct,
                           ct_range=prep.ct_range)
    task = prep.task
    probs = predict(case["image"])
    seg = task.segment(probs)
    name = output_name(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    restored, orig_affine = restore_label(seg, case["meta"])
    out = {"input": str(path), "segmentation": str(out_dir / f"{name}.nii.gz"),
           "voxels": {c: int(m.sum()) for c, m in task.masks(restored)}}
    save_nifti(out["segmentation"], restored.astype(np.uint8), orig_affine)
    if probabilities:
        p, _ = restore_label(np.asarray(probs, np.float32), case["meta"])
        out["probabilities"] = str(out_dir / f"{name}_probs.nii.gz")
        save_nifti(out["probabilities"], p.astype(np.float32), orig_affine)
    if figure:
        from jaxseg.figures import overlay_png

        grid_truth = None if label is None else np.asarray(case["label"])
        overlay_png(case["image"], grid_truth, seg, task.multilabel, out_dir / f"{name}.png", title=name)
    return out
