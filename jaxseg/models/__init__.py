"""Networks: UNETR and its MONAI weight converters (both ways)."""

from jaxseg.models.monai import from_monai, load_monai_checkpoint, save_monai_checkpoint, to_monai
from jaxseg.models.unetr import PRESETS, UNETR, count_params, init_params, skip_layers, unetr_from_preset

__all__ = [
    "UNETR", "PRESETS", "count_params", "from_monai", "init_params", "load_monai_checkpoint",
    "save_monai_checkpoint", "skip_layers", "to_monai", "unetr_from_preset",
]
