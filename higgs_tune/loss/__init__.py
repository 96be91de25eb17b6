"""The aligned loss (text CE + per-codebook audio CE) and Boson's reference formula. The batch checks
(alignment guard) live with the batch contract, in :mod:`higgs_tune.data.alignment_guard`."""

from higgs_tune.loss.aligned_loss import AlignedLoss, LossOutput, global_target_counts
from higgs_tune.loss.reference import ReferenceLossOutput, reference_loss

__all__ = [
    "AlignedLoss",
    "LossOutput",
    "ReferenceLossOutput",
    "global_target_counts",
    "reference_loss",
]
