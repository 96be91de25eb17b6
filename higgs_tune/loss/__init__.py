"""The aligned loss (text CE + per-codebook audio CE), Boson's reference formula and the alignment guard."""

from higgs_tune.loss.aligned_loss import AlignedLoss, LossOutput, global_target_counts
from higgs_tune.loss.alignment_guard import (
    AlignmentError,
    AlignmentLayout,
    check_batch_alignment,
    warn_if_implausibly_low,
)
from higgs_tune.loss.reference import ReferenceLossOutput, reference_loss

__all__ = [
    "AlignedLoss",
    "AlignmentError",
    "AlignmentLayout",
    "LossOutput",
    "ReferenceLossOutput",
    "check_batch_alignment",
    "global_target_counts",
    "reference_loss",
    "warn_if_implausibly_low",
]
