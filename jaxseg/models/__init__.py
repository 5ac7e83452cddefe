"""Networks: UNETR and its MONAI weight converter."""

from jaxseg.models.monai import from_monai, load_monai_checkpoint
from jaxseg.models.unetr import PRESETS, UNETR, count_params, skip_layers, unetr_from_preset

__all__ = [
    "UNETR", "PRESETS", "count_params", "from_monai", "load_monai_checkpoint", "skip_layers",
    "unetr_from_preset",
]
