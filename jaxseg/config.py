"""Experiment configuration: one frozen dataclass with named presets.

``tiny``: tests (32^3 crops, 2-layer ViT); ``small``: the CPU main job (32^3 crops at 3 mm, 4 layers);
``gpu``: the same protocol at the paper's shapes for one GPU; ``paper``: the paper's sizes (UNETR full size, 96^3 spleen crops, P = 4, 10,000 steps, 25,000 fine-tuning
steps). Experiments select one with ``--config`` and override single fields with flags.
"""

from __future__ import annotations

import dataclasses

from jaxseg.errors import UserError
from jaxseg.losses.objectives import OBJECTIVE_NAMES

CHOICES = {
    "model": ("tiny", "small", "paper"),  # UNETR sizes (jaxseg.models.unetr.PRESETS)
    "dtype": ("float32", "bfloat16"),
    "phantom": ("spleen", "braintumour"),
    "objective": OBJECTIVE_NAMES,  # resolved in one place: jaxseg.losses.get_objective
    "stage2_output": ("probs", "logits"),
    "axis_mode": ("sequential", "joint"),
}
AT_LEAST_ONE = ("crop_size", "phantom_subjects", "data_threads", "sampled_triplets", "volumes_per_step",
                "crops_per_volume", "stage1_steps", "stage2_steps", "convergence_window", "finetune_steps",
                "finetune_volumes_per_step", "finetune_crops_per_volume", "eval_every", "sw_batch_size", "ckpt_every")
# Which fields each job's result depends on (kept with its outputs, see jaxseg.run_settings);
# the rest (model, data, seed, optimiser) matter to every job; data_threads, ckpt_every and
# sw_batch_size change no result.
PRETRAIN_FIELDS = ("objective", "temperature", "num_partitions", "shared_offset", "sampled_triplets",
                   "volumes_per_step", "crops_per_volume", "stage1_steps", "stage2_steps", "stage2_output",
                   "stage2_freeze_encoder", "axis_mode", "convergence_window", "convergence_rtol", "min_steps")
FINETUNE_FIELDS = ("finetune_steps", "finetune_volumes_per_step", "finetune_crops_per_volume", "label_budget",
                   "eval_every")
EVAL_FIELDS = ("overlap",)
NO_RESULT_FIELDS = ("data_threads", "ckpt_every", "sw_batch_size")


@dataclasses.dataclass(frozen=True)
class Config:
    # model
    model: str = "small"  # UNETR preset: tiny | small | paper
    crop_size: int = 64
    dtype: str = "float32"  # compute dtype; bfloat16 on accelerators
    # data
    data_dir: str = ""  # MSD folder; empty: generate a phantom dataset in the work dir
    phantom: str = "spleen"  # spleen | braintumour
    phantom_subjects: int = 24
    target_spacing: float = 1.0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    data_seed: int = 0  # the phantom dataset and the train / val / test split
    seed: int = 0  # initialisation, the labelled subset, crops: what table1 --seeds varies
    data_threads: int = 2
    # pre-training
    objective: str = "comparative"  # comparative | comparative_code | comparative_sampled | contrastive | contrastive_global
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
    # fine-tuning
    finetune_steps: int = 25000
    finetune_volumes_per_step: int = 1
    finetune_crops_per_volume: int = 4
    label_budget: int = 0  # 0: all labelled training cases
    eval_every: int = 500
    sw_batch_size: int = 4
    overlap: float = 0.25
    # optimisation and bookkeeping
    lr: float = 1e-4
    weight_decay: float = 1e-5
    ckpt_every: int = 100

    def __post_init__(self):
        problems = config_problems(self)
        if problems:
            raise UserError("invalid settings: " + "; ".join(problems))

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def job_settings(c: Config, job: str) -> dict:
    """The fields of ``c`` that the result of ``job`` ('pretrain', 'finetune', 'evaluate') depends on."""
    own = {"pretrain": PRETRAIN_FIELDS, "finetune": FINETUNE_FIELDS + EVAL_FIELDS, "evaluate": EVAL_FIELDS}[job]
    others = set(PRETRAIN_FIELDS + FINETUNE_FIELDS + EVAL_FIELDS + NO_RESULT_FIELDS) - set(own)
    return {"job": job, **{k: v for k, v in c.as_dict().items() if k not in others}}


def config_problems(c: Config) -> list[str]:
    """Every impossible setting, one short phrase each (checked before any data or compile work)."""
    out = [f"{k} must be one of {', '.join(v)}, got {getattr(c, k)!r}" for k, v in CHOICES.items()
           if getattr(c, k) not in v]
    out += [f"{k} must be >= 1, got {getattr(c, k)}" for k in AT_LEAST_ONE if getattr(c, k) < 1]
    if c.crop_size >= 1 and c.crop_size % 16:
        out.append(f"crop_size must be a multiple of 16 (the ViT patch), got {c.crop_size}")
    if c.num_partitions < 2:
        out.append(f"num_partitions must be >= 2, got {c.num_partitions}")
    if c.min_steps < 0:
        out.append(f"min_steps must be >= 0, got {c.min_steps}")
    if c.label_budget < 0:
        out.append(f"label_budget must be >= 0 (0: all labelled training cases), got {c.label_budget}")
    for k in ("target_spacing", "temperature", "lr"):
        if not getattr(c, k) > 0:
            out.append(f"{k} must be > 0, got {getattr(c, k)}")
    for k in ("weight_decay", "convergence_rtol"):
        if not getattr(c, k) >= 0:
            out.append(f"{k} must be >= 0, got {getattr(c, k)}")
    if not 0 <= c.overlap < 1:
        out.append(f"overlap must be in [0, 1), got {c.overlap}")
    if not (0 <= c.val_fraction < 1 and 0 <= c.test_fraction < 1 and c.val_fraction + c.test_fraction < 1):
        out.append(f"val_fraction and test_fraction must be >= 0 and sum below 1, got {c.val_fraction} and "
                   f"{c.test_fraction}")
    return out


PRESETS: dict[str, Config] = {
    "tiny": Config(model="tiny", crop_size=32, phantom_subjects=8, stage1_steps=3, stage2_steps=3,
                   finetune_steps=4, eval_every=2, ckpt_every=2, sampled_triplets=8),
    # The CPU main job (~10 min on 2 cores, 3 seeds): at 3 mm a 32^3 crop holds the whole
    # foreground-cropped phantom, so crop partitions are the same anatomy in every image (the
    # paper's premise) and training from scratch learns within the budget (val Dice 0.41 after
    # 150 steps; 0.00 at 2 mm). Stage 2 takes one update for the three axes ('joint') on one
    # crop of each of 2 volumes: 1/6 of the paper's step cost, so both stages can run until the
    # convergence rule stops them.
    "small": Config(model="small", crop_size=32, target_spacing=3.0, phantom_subjects=20, axis_mode="joint",
                    volumes_per_step=2, crops_per_volume=1, stage1_steps=500, stage2_steps=300,
                    finetune_steps=150, finetune_crops_per_volume=2, eval_every=50, ckpt_every=50, lr=1e-3),
    # The same protocol at the paper's shapes for one H100/H200 (full UNETR, 96^3 crops at 1 mm,
    # which hold the whole phantom as small's 32^3 at 3 mm do; bf16; the paper's sequential axes,
    # batch and learning rate). Sized from estimates of the step times (not yet run on a GPU):
    # ~10 min for table1 --seeds=3 with a warm compilation cache.
    "gpu": Config(model="paper", crop_size=96, target_spacing=1.0, phantom_subjects=20, dtype="bfloat16",
                  stage1_steps=500, stage2_steps=300, finetune_steps=500, eval_every=100, ckpt_every=100,
                  sw_batch_size=8),
    "paper": Config(model="paper", crop_size=96),
}


def get_config(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown config {name!r}; choose from {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise UserError(f"unknown setting(s) {unknown}")
    return PRESETS[name].replace(**overrides)
