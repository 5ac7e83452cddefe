"""Pure losses: pre-training objectives over partition slices, and segmentation losses."""

from jaxseg.losses.objectives import (
    DID_NOT_LEARN, OBJECTIVE_NAMES, OBJECTIVES, SAMPLED_OBJECTIVES, chance_loss, comparative_code, comparative_loss, comparative_paper, comparative_sampled,
    contrastive_global, contrastive_loss, contrastive_paper, cosine_similarity, get_objective, learning_report,
    similarity_tensor,
)
from jaxseg.losses.partition import partition_size, partition_slices, sample_offsets, sample_triplets
from jaxseg.losses.segmentation import dice_ce_loss, dice_loss, output_probabilities

__all__ = [
    "DID_NOT_LEARN", "OBJECTIVE_NAMES", "OBJECTIVES", "chance_loss", "learning_report", "SAMPLED_OBJECTIVES", "comparative_code", "comparative_loss", "comparative_paper", "comparative_sampled",
    "contrastive_global", "contrastive_loss", "contrastive_paper", "cosine_similarity", "dice_ce_loss",
    "dice_loss", "get_objective", "output_probabilities", "partition_size", "partition_slices", "sample_offsets", "sample_triplets",
    "similarity_tensor",
]
