"""Experiment configuration: a frozen, nested dataclass (model / data / pretrain / finetune /
eval) with named presets. Each setting also has one flat name (``FLAT_NAMES``: the flag, the key
in settings.json, what ``Config.replace`` takes).

``tiny``: tests (32^3 crops, 2-layer ViT); ``small``: the CPU main job (32^3 crops at 3 mm, 4 layers);
``small_long``: small at 64^3 crops and 1.5 mm (a 4x4x4 token grid), fine-tuning stopped on validation;
``gpu``: the same protocol at the paper's shapes for one GPU; ``paper``: the paper's sizes (UNETR
full size, 96^3 spleen crops, P = 4, 10,000 steps, 25,000 fine-tuning steps). Experiments select
one with ``--config`` and override single settings with flags.
"""

from __future__ import annotations

import dataclasses
import types

from jaxseg.errors import UserError
from jaxseg.losses.objectives import OBJECTIVE_NAMES
from jaxseg.models.unetr import SIZES

CHOICES = {
    "model": tuple(SIZES),  # UNETR sizes
    "dtype": ("float32", "bfloat16"),
    "phantom": ("spleen", "braintumour"),
    "objective": OBJECTIVE_NAMES,  # resolved in one place: jaxseg.losses.get_objective
    "stage2_output": ("probs", "logits"),
    "axis_mode": ("sequential", "joint"),
    "pretrain_augment": ("per_crop", "per_step", "none"),
}
AT_LEAST_ONE = ("crop_size", "phantom_subjects", "data_threads", "sampled_triplets", "volumes_per_step",
                "crops_per_volume", "stage1_steps", "stage2_steps", "convergence_window", "finetune_steps",
                "finetune_volumes_per_step", "finetune_crops_per_volume", "eval_every", "sw_batch_size", "ckpt_every")
# Settings that change no result (where the cache lives: its digest is recorded instead).
NO_RESULT_FIELDS = ("data_threads", "ckpt_every", "sw_batch_size", "cache_dir", "profile_steps")
# The config groups each job's result depends on, beside model, data and the top-level settings
# (kept with its outputs, see jaxseg.run_settings).
JOB_GROUPS = {"pretrain": ("pretrain",), "finetune": ("finetune", "eval"), "evaluate": ("eval",)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    size: str = "small"  # UNETR size: tiny | small | paper (jaxseg.models.SIZES)
    crop_size: int = 64
    dtype: str = "float32"  # compute dtype; bfloat16 on accelerators
    dropout_rate: float = 0.0  # ViT dropout in training steps (MONAI's UNETR default); never in evaluation


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dir: str = ""  # MSD folder; empty: generate a phantom dataset in the work dir
    phantom: str = "spleen"  # spleen | braintumour
    phantom_subjects: int = 24
    target_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mm; one number means the same on each axis
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0  # the phantom dataset and the train / val / test split
    threads: int = 2
    cache_dir: str = ""  # the cache root (one folder per preparation); empty: workdir/cache


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    objective: str = "comparative"  # see jaxseg.losses.OBJECTIVE_NAMES
    temperature: float = 1.0  # the paper's equations; the authors' code used 0.1
    num_partitions: int = 4
    shared_offset: bool = True
    sampled_triplets: int = 64
    volumes_per_step: int = 2
    crops_per_volume: int = 2
    stage1_steps: int = 10000  # step limits; convergence usually stops earlier
    stage2_steps: int = 10000
    stage2_output: str = "probs"  # probs (the paper) | logits (the authors' code)
    stage2_freeze_encoder: bool = False  # the authors' code froze the encoder in stage 2
    axis_mode: str = "sequential"  # sequential: one update per axis each step (paper) | joint
    convergence_window: int = 10
    convergence_rtol: float = 0.01
    min_steps: int = 0  # opt-in warm-up: the convergence rule cannot end a stage before this step
    # Augmentation of the crops (MONAI's RandFlip per axis / RandRotate90 / RandShiftIntensity).
    # augment: per_crop (the authors': each crop its own flips and rotation, which reverses the
    # partition order of some crops against the others of its step), per_step (one draw for all
    # crops of a step: partition p stays the same anatomy in every crop), none (no flips or rotation).
    # per_step is the default: on the main job (3 seeds, 2026-12-03, docs/results.md) it had the best
    # validation Dice for both objectives (0.277 / 0.272 against per_crop's 0.224 / 0.202, none's 0.147 / 0.239).
    augment: str = "per_step"
    flip_prob: float = 0.1
    rot90_prob: float = 0.1
    shift_prob: float = 0.5  # intensity shift, per crop in every mode


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 25000
    volumes_per_step: int = 1
    crops_per_volume: int = 4
    label_budget: int = 0  # 0: all labelled training cases
    eval_every: int = 500
    pos_fraction: float = 0.5  # crops centred on foreground : background (MONAI's pos=neg=1)
    patience: int = 0  # early stopping: stop after this many evaluations without a better validation Dice (0: off)
    flip_prob: float = 0.1  # per axis; >= 0.5 makes a model that predict --tta may average over flips
    rot90_prob: float = 0.1
    shift_prob: float = 0.5


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    sw_batch_size: int = 4
    overlap: float = 0.25
    tta: bool = False  # evaluation: the mean over the 8 axis flips (only for models fine-tuned with flips of p >= 0.5)


GROUPS = {"model": ModelConfig, "data": DataConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig,
          "eval": EvalConfig}
# Every setting has one flat name: its flag, its key in settings.json, and what ``replace``
# takes. Mostly the field's own name; where a group's field name would be ambiguous alone, this
# table gives the flat one.
_RENAMED = {("model", "size"): "model", ("data", "dir"): "data_dir", ("data", "seed"): "data_seed",
            ("data", "threads"): "data_threads", ("finetune", "steps"): "finetune_steps",
            ("finetune", "volumes_per_step"): "finetune_volumes_per_step",
            ("finetune", "crops_per_volume"): "finetune_crops_per_volume",
            **{(g, f): f"{g}_{f}" for g in ("pretrain", "finetune") for f in ("flip_prob", "rot90_prob", "shift_prob")},
            ("pretrain", "augment"): "pretrain_augment"}
FLAT_NAMES: dict[str, tuple[str, str] | tuple[str]] = {
    **{_RENAMED.get((g, f.name), f.name): (g, f.name) for g, cls in GROUPS.items() for f in dataclasses.fields(cls)},
    **{n: (n,) for n in ("seed", "lr", "weight_decay", "ckpt_every", "profile_steps")},
}


@dataclasses.dataclass(frozen=True)
class Config:
    """model / data / pretrain / finetune / eval settings, plus what every job shares. Read
    ``cfg.pretrain.objective``; set with flat names, ``cfg.replace(objective=...)``
    (``FLAT_NAMES``), which is also how flags and settings.json name them."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    eval: EvalConfig = EvalConfig()
    seed: int = 0  # initialisation, the labelled subset, crops: what table1 --seeds varies
    lr: float = 1e-4
    weight_decay: float = 1e-5
    ckpt_every: int = 100
    profile_steps: str = ""  # 'FIRST:LAST': a jax.profiler trace of those steps of every training stage ('' off)

    def __post_init__(self):
        problems = config_problems(self.flat())
        if problems:
            raise UserError("invalid settings: " + "; ".join(problems))

    @classmethod
    def from_flat(cls, **flat) -> "Config":
        return cls().replace(**flat)

    def replace(self, **flat) -> "Config":
        """A copy with settings changed by flat name (``crop_size=32, objective='contrastive'``)."""
        unknown = sorted(set(flat) - set(FLAT_NAMES))
        if unknown:
            raise UserError(f"unknown setting(s) {unknown}")
        if "target_spacing" in flat:
            flat = {**flat, "target_spacing": spacing(flat["target_spacing"])}
        top = {k: v for k, v in flat.items() if len(FLAT_NAMES[k]) == 1}
        for g in GROUPS:
            sub = {FLAT_NAMES[k][1]: v for k, v in flat.items() if FLAT_NAMES[k][0] == g and len(FLAT_NAMES[k]) == 2}
            if sub:
                top[g] = dataclasses.replace(getattr(self, g), **sub)
        return dataclasses.replace(self, **top)

    def flat(self) -> dict:
        """Every setting by its flat name."""
        return {k: getattr(getattr(self, p[0]), p[1]) if len(p) == 2 else getattr(self, p[0])
                for k, p in FLAT_NAMES.items()}

    def prepare(self):
        """The preprocessing cache's settings."""
        from jaxseg.data import PrepareConfig

        return PrepareConfig(target_spacing=self.data.target_spacing)


def spacing(value) -> tuple[float, ...]:
    """A voxel spacing from a number (every axis), three numbers, or a flag's text ('1.5' or
    '0.8,0.8,2.5'); refused in one line when it is none of these."""
    values = value.replace(" ", "").split(",") if isinstance(value, str) else value
    values = values if isinstance(values, (list, tuple)) else [values]
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise UserError(f"target_spacing must be one or three numbers in mm, got {value!r}") from None
    return out * 3 if len(out) == 1 else out


def profile_range(text: str) -> tuple[int, int] | None:
    """``--profile_steps`` as (first, last) steps, or None when off; ValueError when malformed.
    The first step is compilation, so a trace starts at step 2 at the earliest."""
    if not text:
        return None
    try:
        first, last = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"profile_steps must be FIRST:LAST (two step numbers, say 5:8), got {text!r}") from None
    if not 2 <= first <= last:
        raise ValueError(f"profile_steps must have 2 <= FIRST <= LAST (step 1 is compilation), got {text!r}")
    return first, last


def job_settings(c: Config, job: str) -> dict:
    """The settings (flat names) that the result of ``job`` ('pretrain', 'finetune', 'evaluate')
    depends on: every setting outside the job-specific groups, and those of its own groups."""
    skip = {"pretrain", "finetune", "eval"} - set(JOB_GROUPS[job])
    return {"job": job, **{k: v for k, v in c.flat().items()
                           if FLAT_NAMES[k][0] not in skip and k not in NO_RESULT_FIELDS}}


def config_problems(flat: dict) -> list[str]:
    """Every impossible setting (by flat name), one short phrase each, checked before any data or
    compile work."""
    c = types.SimpleNamespace(**flat)
    out = [f"{k} must be one of {', '.join(v)}, got {flat[k]!r}" for k, v in CHOICES.items() if flat[k] not in v]
    out += [f"{k} must be >= 1, got {flat[k]}" for k in AT_LEAST_ONE if flat[k] < 1]
    patch = SIZES.get(c.model, {}).get("patch_size", 16)
    if c.crop_size >= 1 and c.crop_size % patch:
        out.append(f"crop_size must be a multiple of {patch} (the ViT patch of {c.model}), got {c.crop_size}")
    if c.num_partitions < 2:
        out.append(f"num_partitions must be >= 2, got {c.num_partitions}")
    if c.min_steps < 0:
        out.append(f"min_steps must be >= 0, got {c.min_steps}")
    if c.label_budget < 0:
        out.append(f"label_budget must be >= 0 (0: all labelled training cases), got {c.label_budget}")
    if len(c.target_spacing) != 3 or not all(v > 0 for v in c.target_spacing):
        out.append(f"target_spacing must be three positive numbers in mm (or one, for all axes), got "
                   f"{list(c.target_spacing)}")
    for k in ("temperature", "lr"):
        if not flat[k] > 0:
            out.append(f"{k} must be > 0, got {flat[k]}")
    for k in ("weight_decay", "convergence_rtol"):
        if not flat[k] >= 0:
            out.append(f"{k} must be >= 0, got {flat[k]}")
    probs = [k for k in FLAT_NAMES if k.endswith("_prob") or k in ("dropout_rate", "pos_fraction")]
    out += [f"{k} must be in [0, 1], got {flat[k]}" for k in probs if not 0 <= flat[k] <= 1]
    try:
        profile_range(c.profile_steps)
    except ValueError as e:
        out.append(str(e))
    if c.patience < 0:
        out.append(f"patience must be >= 0 (0: no early stopping), got {c.patience}")
    if not 0 <= c.overlap < 1:
        out.append(f"overlap must be in [0, 1), got {c.overlap}")
    if not (0 <= c.val_fraction < 1 and 0 <= c.test_fraction < 1 and c.val_fraction + c.test_fraction < 1):
        out.append(f"val_fraction and test_fraction must be >= 0 and sum below 1, got {c.val_fraction} and "
                   f"{c.test_fraction}")
    return out


PRESETS: dict[str, Config] = {
    "tiny": Config.from_flat(model="tiny", crop_size=32, phantom_subjects=8, stage1_steps=3, stage2_steps=3,
                   finetune_steps=4, eval_every=2, ckpt_every=2, sampled_triplets=8),
    # The CPU main job (11-13 min on 2 cores, 3 seeds): at 3 mm a 32^3 crop holds the whole
    # foreground-cropped phantom, so crop partitions are the same anatomy in every image (the
    # paper's premise) and training from scratch learns within the budget (val Dice 0.41 after
    # 150 steps; 0.00 at 2 mm). Stage 2 takes one update for the three axes ('joint') on one
    # crop of each of 2 volumes: 1/6 of the paper's step cost, so both stages can run until the
    # convergence rule stops them. A warm-up of 100 steps before the rule may stop a stage
    # (min_steps): with the rule alone stage 2 stopped after 13-24 steps at 94-96% of its loss at
    # chance; with it, at 67-73%, and the best validation Dice of the sweep in README. 32 phantom
    # subjects: 16 train, 4 validation, 12 test (more test cases for the intervals; each costs ~1 s).
    "small": Config.from_flat(model="small", crop_size=32, target_spacing=3.0, phantom_subjects=32, val_fraction=0.125,
                    test_fraction=0.375, axis_mode="joint",
                    volumes_per_step=2, crops_per_volume=1, stage1_steps=500, stage2_steps=300, min_steps=100,
                    finetune_steps=150, finetune_crops_per_volume=2, eval_every=50, ckpt_every=50, lr=1e-3),
    # small at twice the resolution: 64^3 crops at 1.5 mm (the same 96 mm field of view), so
    # the ViT sees a 4x4x4 grid of 64 tokens instead of small's 2x2x2 = 8 and each stage-1
    # partition is a 2-slice slab of the 8x8x8 enc4 map. Not a 10-minute job on 2 cores. At this
    # size 150 fine-tuning steps were too few (validation Dice 0 at step 50 for every run):
    # fine-tuning runs up to 600 steps and stops after 3 evaluations (150 steps) without a better
    # validation Dice.
    "small_long": Config.from_flat(model="small", crop_size=64, target_spacing=1.5, phantom_subjects=32,
                         val_fraction=0.125, test_fraction=0.375, axis_mode="joint", volumes_per_step=2,
                         crops_per_volume=1, stage1_steps=500, stage2_steps=300, min_steps=100, finetune_steps=600,
                         patience=3, finetune_crops_per_volume=2, eval_every=50, ckpt_every=50, lr=1e-3),
    # The same protocol at the paper's shapes for one H100/H200 (full UNETR, 96^3 crops at 1 mm,
    # which hold the whole phantom as small's 32^3 at 3 mm do; bf16; the paper's sequential axes,
    # batch and learning rate). Sized from estimates of the step times (not yet run on a GPU):
    # ~10 min for table1 --seeds=3 with a warm compilation cache.
    "gpu": Config.from_flat(model="paper", crop_size=96, target_spacing=1.0, phantom_subjects=20, dtype="bfloat16",
                  stage1_steps=500, stage2_steps=300, finetune_steps=500, eval_every=100, ckpt_every=100,
                  sw_batch_size=8),
    "paper": Config.from_flat(model="paper", crop_size=96),
}


def get_config(name: str, **overrides) -> Config:
    """Preset ``name`` with settings changed by flat name."""
    if name not in PRESETS:
        raise UserError(f"unknown config {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
