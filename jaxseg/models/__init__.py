"""Networks: UNETR and its MONAI weight converters (both ways)."""

from jaxseg.models.monai import from_monai, load_monai_checkpoint, save_monai_checkpoint, to_monai
from jaxseg.models.unetr import (SIZES, STAGES, UNETR, count_params, init_params, param_shapes, pretraining_stage,
                                 skip_layers,
                                 trainable_in_stage, unetr_from_preset)

__all__ = [
    "SIZES", "STAGES", "UNETR", "count_params", "from_monai", "init_params", "load_monai_checkpoint",
    "param_shapes", "pretraining_stage", "save_monai_checkpoint", "skip_layers", "to_monai", "trainable_in_stage", "unetr_from_preset",
]
