"""Experiment configuration: one frozen dataclass with named presets.

``tiny``: tests (32^3 crops, 2-layer ViT); ``small``: the CPU demo (32^3 crops at 2 mm, 4 layers); ``paper``:
the paper's sizes (UNETR full size, 96^3 spleen crops, P = 4, 10,000 steps, 25,000 fine-tuning
steps). Experiments select one with ``--config`` and override single fields with flags.
"""

from __future__ import annotations

import dataclasses


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
    seed: int = 0
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

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, Config] = {
    "tiny": Config(model="tiny", crop_size=32, phantom_subjects=8, stage1_steps=3, stage2_steps=3,
                   finetune_steps=4, eval_every=2, ckpt_every=2, sampled_triplets=8),
    "small": Config(model="small", crop_size=32, target_spacing=2.0, phantom_subjects=16, stage1_steps=40,
                    stage2_steps=20, finetune_steps=300, eval_every=100, ckpt_every=50, lr=1e-3),
    "paper": Config(model="paper", crop_size=96),
}


def get_config(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
