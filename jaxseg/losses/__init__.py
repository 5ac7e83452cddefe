"""Pure losses: pre-training objectives over partition slices, and segmentation losses."""

from jaxseg.losses.objectives import (
    OBJECTIVE_NAMES, OBJECTIVES, SAMPLED_OBJECTIVES, comparative_code, comparative_loss, comparative_paper, comparative_sampled,
    contrastive_global, contrastive_loss, contrastive_paper, cosine_similarity, get_objective, similarity_tensor,
)
from jaxseg.losses.partition import partition_size, partition_slices, sample_offsets, sample_triplets
from jaxseg.losses.segmentation import dice_ce_loss, dice_loss

__all__ = [
    "OBJECTIVE_NAMES", "OBJECTIVES", "SAMPLED_OBJECTIVES", "comparative_code", "comparative_loss", "comparative_paper", "comparative_sampled",
    "contrastive_global", "contrastive_loss", "contrastive_paper", "cosine_similarity", "dice_ce_loss",
    "dice_loss", "get_objective", "partition_size", "partition_slices", "sample_offsets", "sample_triplets",
    "similarity_tensor",
]
