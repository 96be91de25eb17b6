"""The aligned loss: text cross-entropy + per-codebook audio cross-entropy, with no shifting.

The packer builds the targets once (``higgs_tune/data/batch.py``; docs/architecture.md, "Data flow and the one shift"): ``text_targets[b, t]``
is the label of position t+1 and ``audio_targets[b, k, t]`` the label of codebook k at column t+1. The
model returns logits only at the positions listed in ``batch["text_target_index"]`` and
``batch["audio_target_index"]``; this loss gathers the targets at the SAME index tensors and compares
``logits[i]`` with ``targets[i]``. Leading shapes must be identical: a mismatch is a ``ValueError`` naming
both shapes (never trimmed).

Default formula (Boson's reference, ``higgs_tune/loss/reference.py``)::

    loss = text_loss + mean_k codebook_loss[k]
    text_loss        = sum of text CE over valid text targets / N_text
    codebook_loss[k] = sum of CE of codebook k over its valid targets / N_k

Normalisation is a true per-token mean over the GLOBAL batch. The caller passes the global denominators
``N_text`` (scalar) and ``N_k`` ([K]) = the counts of valid targets summed over every micro-batch of the
optimizer step and over every data-parallel rank; the loss returns ``SUM(CE) / N`` for its own
micro-batch. Summing the returned losses over the micro-batches (what ``backward`` per micro-batch into
accumulated ``.grad`` does) and SUM-reducing gradients across ranks then gives exactly the gradient of
the global token mean (with an AVG-reducing data-parallel wrapper, multiply the loss by the world size).
Without explicit denominators the micro-batch's own counts are used (= the reference formula on one
micro-batch).

A denominator of zero (no text targets, or no targets for codebook k, in the whole global batch) is
clamped to 1: that term is exactly 0, not NaN, and gradients of the other terms are unaffected.

The step stays a static tensor program: no ``.item()``, no boolean-mask indexing, no data-dependent
branches, so ``torch.compile(fullgraph=True)`` traces it. Memory: text CE is computed over fixed-size
chunks of the gathered positions, each chunk upcast to fp32 inside an activation checkpoint, so the fp32
logits of all ``V`` classes are never held for more than one chunk (forward or backward). Audio CE runs
in fp32 on the whole ``[B * C_at, K, C]`` block (C = 1026 is small).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from higgs_tune.data.batch import IGNORE_INDEX, gather_at

CODEBOOK_REDUCTIONS = ("mean", "sum")


class LossOutput(NamedTuple):
    """Everything the aligned loss computes for one micro-batch. All entries are tensors.

    ``loss`` is the only entry attached to the autograd graph; the others are detached metrics.
    Losses and accuracies are normalised by the GLOBAL denominators, so each of them sums over the
    micro-batches of a step to the global value.

    Fields:
        loss:                 []    text_weight * text_loss + audio_loss + z_loss (differentiable).
        text_loss:            []    text CE sum / N_text (label smoothing included when configured).
        audio_loss:           []    codebook losses combined with the codebook weights.
        codebook_losses:      [K]   CE sum of codebook k / N_k.
        z_loss:               []    z_loss_weight * (text + weighted audio) mean of logsumexp^2; 0 when off.
        text_accuracy:        []    teacher-forced argmax hits over valid text targets / N_text.
        codebook_accuracies:  [K]   argmax hits of codebook k / N_k.
        num_text_targets:     []    int64, valid text targets in THIS micro-batch (gathered).
        num_audio_targets:    [K]   int64, valid targets per codebook in THIS micro-batch (gathered).
    """

    loss: torch.Tensor
    text_loss: torch.Tensor
    audio_loss: torch.Tensor
    codebook_losses: torch.Tensor
    z_loss: torch.Tensor
    text_accuracy: torch.Tensor
    codebook_accuracies: torch.Tensor
    num_text_targets: torch.Tensor
    num_audio_targets: torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision logits, the logits' own dtype when wider (fp64 in tests)."""
    return torch.promote_types(dtype, torch.float32)


def _cross_entropy_and_z_sums(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float, with_z: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """CE and squared-logsumexp summed over the valid rows of one chunk, computed in fp32 (or wider).

    Args:
        logits: [N, V] any float dtype.
        targets: [N] int64, ``IGNORE_INDEX`` where not trained.
        label_smoothing: as in ``F.cross_entropy``.
        with_z: compute the squared-logsumexp sum (else it is 0).

    Returns:
        (ce_sum [], z_sum []) fp32 (fp64 for fp64 logits).
    """
    logits_fp32 = logits.to(_compute_dtype(logits.dtype))
    ce_sum = F.cross_entropy(
        logits_fp32, targets, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing
    )
    if not with_z:
        return ce_sum, ce_sum.new_zeros(())
    valid = (targets != IGNORE_INDEX).to(logits_fp32.dtype)
    z_sum = (torch.logsumexp(logits_fp32, dim=-1).square() * valid).sum()
    return ce_sum, z_sum


def chunked_text_cross_entropy(
    text_logits: torch.Tensor,
    text_targets: torch.Tensor,
    chunk_size: int,
    label_smoothing: float = 0.0,
    with_z: bool = True,
    checkpoint_chunks: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums of text CE, squared logsumexp and argmax hits over valid targets, chunk by chunk.

    Each chunk of ``chunk_size`` rows is upcast to fp32 inside a non-reentrant activation checkpoint:
    the forward keeps only the (model-dtype) chunk, the backward recomputes the fp32 chunk, so at most
    one chunk of fp32 ``[chunk_size, V]`` logits is alive at a time. Chunk sizes are static (the last
    chunk may be shorter), so the loop unrolls under ``torch.compile``. When all N rows fit in one
    chunk there is nothing to save and no checkpoint is used.

    Args:
        text_logits: [N, V] model dtype (bf16 or fp32).
        text_targets: [N] int64, ``IGNORE_INDEX`` where not trained.
        chunk_size: rows per chunk (>= 1).
        label_smoothing: as in ``F.cross_entropy``.
        with_z: compute the squared-logsumexp sum (else ``z_sum`` is 0).
        checkpoint_chunks: recompute each fp32 chunk in the backward (the memory saving). ``False`` for
            ``torch.func`` transforms, which do not support the checkpoint's saved-tensor hooks; the
            chunks' fp32 logits are then kept for the backward.

    Returns:
        (ce_sum [], z_sum [], hits []) — ``hits`` is a detached fp32 count of argmax == target.
    """
    if text_logits.dim() != 2 or text_targets.shape != text_logits.shape[:1]:
        raise ValueError(
            f"text logits {tuple(text_logits.shape)} and text targets {tuple(text_targets.shape)} "
            "must be [N, V] and [N]"
        )
    if text_logits.shape[0] <= chunk_size:
        # One chunk: a checkpoint would only add the recompute (the fp32 block is the same size).
        ce_sum, z_sum = _cross_entropy_and_z_sums(text_logits, text_targets, label_smoothing, with_z)
        hits = (text_logits.detach().argmax(-1) == text_targets).sum().to(ce_sum.dtype)
        return ce_sum, z_sum, hits
    ce_sum = text_logits.new_zeros((), dtype=_compute_dtype(text_logits.dtype))
    z_sum = text_logits.new_zeros((), dtype=_compute_dtype(text_logits.dtype))
    for logits_chunk, targets_chunk in zip(
        torch.split(text_logits, chunk_size), torch.split(text_targets, chunk_size)
    ):
        if checkpoint_chunks:
            # No random ops inside: skipping the RNG-state stash keeps it CUDA-graph capturable.
            chunk_ce, chunk_z = checkpoint(
                _cross_entropy_and_z_sums,
                logits_chunk,
                targets_chunk,
                label_smoothing,
                with_z,
                use_reentrant=False,
                preserve_rng_state=False,
            )
        else:
            chunk_ce, chunk_z = _cross_entropy_and_z_sums(
                logits_chunk, targets_chunk, label_smoothing, with_z
            )
        ce_sum = ce_sum + chunk_ce
        z_sum = z_sum + chunk_z
    # argmax of the model-dtype logits equals argmax of their exact fp32 upcast: no fp32 copy needed.
    hits = (text_logits.detach().argmax(-1) == text_targets).sum().to(ce_sum.dtype)
    return ce_sum, z_sum, hits


def audio_cross_entropy(
    audio_logits: torch.Tensor, audio_targets: torch.Tensor, label_smoothing: float = 0.0, with_z: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-codebook sums of audio CE, squared logsumexp and argmax hits, in fp32.

    Args:
        audio_logits: [N, K, C] model dtype, C = codebook_size + 2 classes per codebook.
        audio_targets: [N, K] int64 in 0..C-1 or ``IGNORE_INDEX``.
        label_smoothing: as in ``F.cross_entropy``.
        with_z: compute the squared-logsumexp sums (else ``z_sums`` are 0).

    Returns:
        (ce_sums [K], z_sums [K], hits [K]) fp32 (fp64 for fp64 logits); ``hits`` detached.
    """
    num_rows, num_codebooks, num_classes = audio_logits.shape
    logits_fp32 = audio_logits.to(_compute_dtype(audio_logits.dtype)).reshape(
        num_rows * num_codebooks, num_classes
    )
    flat_targets = audio_targets.reshape(num_rows * num_codebooks)
    ce = F.cross_entropy(
        logits_fp32,
        flat_targets,
        ignore_index=IGNORE_INDEX,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    hits = (audio_logits.detach().argmax(-1) == audio_targets).to(logits_fp32.dtype).sum(0)
    if not with_z:
        return ce.view(num_rows, num_codebooks).sum(0), ce.new_zeros(num_codebooks), hits
    valid = (audio_targets != IGNORE_INDEX).to(logits_fp32.dtype)
    z = torch.logsumexp(logits_fp32, dim=-1).square().view(num_rows, num_codebooks) * valid
    return ce.view(num_rows, num_codebooks).sum(0), z.sum(0), hits


def _logits_from(outputs: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(text_logits, audio_logits) from a model output given as a mapping or an object with attributes
    (text_logits may be None: the model skipped the text head)."""
    if isinstance(outputs, Mapping):
        missing = [name for name in ("text_logits", "audio_logits") if name not in outputs]
        if missing:
            raise KeyError(f"model outputs lack {missing}; got keys {sorted(outputs)}")
        return outputs["text_logits"], outputs["audio_logits"]
    for name in ("text_logits", "audio_logits"):
        if not hasattr(outputs, name):
            raise AttributeError(f"model outputs of type {type(outputs).__name__} have no '{name}'")
    return outputs.text_logits, outputs.audio_logits


class AlignedLoss(nn.Module):
    """Text CE + per-codebook audio CE on logits that the model computed at the target positions.

    YAML::

        loss:
          _component_: higgs_tune.loss.AlignedLoss
          text_weight: 1.0
          codebook_weights: null        # -> uniform
          codebook_reduction: mean      # mean: Boson's reference; sum: HF transformers' port
          label_smoothing: 0.0
          z_loss_weight: 0.0
          text_chunk_size: 256

    Args:
        text_weight: weight of the text term (reference: 1.0). 0: the training step does not compute
            the text head at all (the recipe freezes it; validation still measures the text loss).
        codebook_weights: K non-negative relative weights, or None for uniform.
        codebook_reduction: ``"mean"``: ``audio_loss = sum_k w_k L_k / sum_k w_k`` (uniform -> the plain
            mean over codebooks of Boson's reference); ``"sum"``: ``audio_loss = sum_k w_k L_k``
            (uniform -> the sum over codebooks of HF transformers' port).
        label_smoothing: label smoothing of both cross-entropies (``F.cross_entropy`` semantics).
        z_loss_weight: weight of the z-loss ``logsumexp(logits)^2`` (PaLM), averaged over valid targets
            like the CE: ``z_loss = z_loss_weight * (text_z + audio_z)``, ``audio_z`` combining the
            per-codebook means with the codebook weights and reduction. Not part of ``text_loss`` /
            ``audio_loss``; added to ``loss``.
        text_chunk_size: gathered text positions per fp32 chunk of the text CE. One chunk's transient
            is about 3 x chunk x V x 4 bytes in the backward (fp32 logits, log-probs, gradient): 375 MiB
            for 256 x 128256.
        checkpoint_text_chunks: recompute each text chunk's fp32 logits in the backward (default). Set
            False for ``torch.func`` transforms (functional step, per-sample scores), which do not support
            activation checkpoints.

    Call: ``loss_fn(outputs, batch, num_text_targets_global=None, num_audio_targets_global=None)``;
    see :meth:`forward`.
    """

    def __init__(
        self,
        text_weight: float = 1.0,
        codebook_weights: Sequence[float] | None = None,
        codebook_reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss_weight: float = 0.0,
        text_chunk_size: int = 256,
        checkpoint_text_chunks: bool = True,
    ) -> None:
        super().__init__()
        if codebook_reduction not in CODEBOOK_REDUCTIONS:
            raise ValueError(
                f"codebook_reduction must be one of {CODEBOOK_REDUCTIONS}, got {codebook_reduction!r}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if z_loss_weight < 0.0:
            raise ValueError(f"z_loss_weight must be >= 0, got {z_loss_weight}")
        if text_chunk_size < 1:
            raise ValueError(f"text_chunk_size must be >= 1, got {text_chunk_size}")
        if codebook_weights is not None:
            weights = [float(w) for w in codebook_weights]
            if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(
                    f"codebook_weights must be non-empty, non-negative and not all zero, got {weights}"
                )
            self.register_buffer(
                "codebook_weights", torch.tensor(weights, dtype=torch.float32), persistent=False
            )
        else:
            self.codebook_weights = None
        self.text_weight = float(text_weight)
        self.codebook_reduction = codebook_reduction
        self.label_smoothing = float(label_smoothing)
        self.z_loss_weight = float(z_loss_weight)
        self.text_chunk_size = int(text_chunk_size)
        self.checkpoint_text_chunks = bool(checkpoint_text_chunks)

    def extra_repr(self) -> str:
        weights = None if self.codebook_weights is None else self.codebook_weights.tolist()
        return (
            f"text_weight={self.text_weight}, codebook_weights={weights}, "
            f"codebook_reduction={self.codebook_reduction!r}, label_smoothing={self.label_smoothing}, "
            f"z_loss_weight={self.z_loss_weight}, text_chunk_size={self.text_chunk_size}, "
            f"checkpoint_text_chunks={self.checkpoint_text_chunks}"
        )

    def _combine_codebooks(self, per_codebook: torch.Tensor) -> torch.Tensor:
        """[K] -> []: weighted mean or sum over codebooks, as configured."""
        num_codebooks = per_codebook.shape[0]
        if self.codebook_weights is None:
            weights = per_codebook.new_ones(num_codebooks)
        else:
            if self.codebook_weights.shape[0] != num_codebooks:
                raise ValueError(
                    f"codebook_weights has {self.codebook_weights.shape[0]} entries but the audio logits "
                    f"have {num_codebooks} codebooks"
                )
            weights = self.codebook_weights.to(per_codebook)
        weighted = (weights * per_codebook).sum()
        return weighted / weights.sum() if self.codebook_reduction == "mean" else weighted

    def forward(
        self,
        outputs: Any,
        batch: Mapping[str, torch.Tensor],
        num_text_targets_global: torch.Tensor | None = None,
        num_audio_targets_global: torch.Tensor | None = None,
    ) -> LossOutput:
        """Compute the aligned loss of one micro-batch.

        Args:
            outputs: the model's training output (mapping or object) with
                ``text_logits`` [B, C_tt, V] at ``batch["text_target_index"]`` (None: not computed, only
                with ``text_weight`` 0; the text loss and accuracy are then 0) and
                ``audio_logits`` [B, C_at, K, C] at ``batch["audio_target_index"]``, model dtype.
            batch: the packed batch (``higgs_tune.data.batch``); reads ``text_targets`` [B, L],
                ``audio_targets`` [B, K, L], ``text_target_index`` [B, C_tt], ``audio_target_index``
                [B, C_at], and, without explicit denominators, ``num_text_targets`` [B] and
                ``num_audio_targets`` [B, K].
            num_text_targets_global: [] valid text targets of the whole optimizer step (all
                micro-batches, all ranks). Default: this micro-batch's ``num_text_targets.sum()``.
            num_audio_targets_global: [K] valid targets per codebook of the whole step. Default: this
                micro-batch's ``num_audio_targets.sum(0)``.

        Returns:
            :class:`LossOutput`.

        Raises:
            ValueError: when the logits' leading shapes differ from the gathered targets' shapes.
        """
        text_logits, audio_logits = _logits_from(outputs)
        text_targets = gather_at(batch["text_targets"], batch["text_target_index"])  # [B, C_tt]
        audio_targets = gather_at(batch["audio_targets"], batch["audio_target_index"])  # [B, K, C_at]
        audio_targets = audio_targets.transpose(1, 2)  # [B, C_at, K], the layout of the logits

        if text_logits is None:
            if self.text_weight != 0.0:
                raise ValueError(
                    f"the model computed no text logits but loss.text_weight is {self.text_weight}; only a "
                    "loss with text_weight 0 may skip the text head"
                )
        elif text_logits.dim() != 3 or text_logits.shape[:2] != text_targets.shape:
            raise ValueError(
                f"text logits of shape {tuple(text_logits.shape)} do not match the text targets gathered "
                f"at text_target_index, shape {tuple(text_targets.shape)} (expected [B, C_tt, V] with "
                "[B, C_tt] leading)"
            )
        if audio_logits.dim() != 4 or audio_logits.shape[:3] != audio_targets.shape:
            raise ValueError(
                f"audio logits of shape {tuple(audio_logits.shape)} do not match the audio targets gathered "
                f"at audio_target_index, shape {tuple(audio_targets.shape)} as [B, C_at, K] (expected "
                "[B, C_at, K, C] with [B, C_at, K] leading)"
            )

        num_codebooks = audio_logits.shape[2]
        if num_text_targets_global is None:
            num_text_targets_global = batch["num_text_targets"].sum()
        if num_audio_targets_global is None:
            num_audio_targets_global = batch["num_audio_targets"].sum(0)
        if num_text_targets_global.dim() != 0:
            raise ValueError(
                f"num_text_targets_global must be a scalar tensor, got shape {tuple(num_text_targets_global.shape)}"
            )
        if num_audio_targets_global.shape != (num_codebooks,):
            raise ValueError(
                f"num_audio_targets_global must have shape ({num_codebooks},) (one count per codebook), "
                f"got {tuple(num_audio_targets_global.shape)}"
            )
        # Zero targets in the global batch: the term is SUM(nothing) / 1 = 0 (no NaN), still in the graph.
        if text_logits is None:  # no text head computed (text_weight 0): the text terms are 0, unmeasured
            text_ce_sum = text_z_sum = text_hits = audio_logits.new_zeros(
                (), dtype=_compute_dtype(audio_logits.dtype)
            )
        else:
            text_ce_sum, text_z_sum, text_hits = chunked_text_cross_entropy(
                text_logits.flatten(0, 1),
                text_targets.flatten(),
                self.text_chunk_size,
                self.label_smoothing,
                with_z=self.z_loss_weight > 0.0,
                checkpoint_chunks=self.checkpoint_text_chunks,
            )
        audio_ce_sums, audio_z_sums, audio_hits = audio_cross_entropy(
            audio_logits.flatten(0, 1),
            audio_targets.flatten(0, 1),
            self.label_smoothing,
            with_z=self.z_loss_weight > 0.0,
        )

        text_denominator = num_text_targets_global.to(text_ce_sum.dtype).clamp_min(1.0)
        audio_denominator = num_audio_targets_global.to(audio_ce_sums.dtype).clamp_min(1.0)
        text_loss = text_ce_sum / text_denominator
        codebook_losses = audio_ce_sums / audio_denominator
        audio_loss = self._combine_codebooks(codebook_losses)
        loss = audio_loss if text_logits is None else self.text_weight * text_loss + audio_loss
        if self.z_loss_weight > 0.0:
            z_loss = self.z_loss_weight * (
                text_z_sum / text_denominator + self._combine_codebooks(audio_z_sums / audio_denominator)
            )
            loss = loss + z_loss
        else:
            z_loss = loss.new_zeros(())

        return LossOutput(
            loss=loss,
            text_loss=text_loss.detach(),
            audio_loss=audio_loss.detach(),
            codebook_losses=codebook_losses.detach(),
            z_loss=z_loss.detach(),
            text_accuracy=text_hits / text_denominator,
            codebook_accuracies=audio_hits / audio_denominator,
            num_text_targets=(text_targets != IGNORE_INDEX).sum(),
            num_audio_targets=(audio_targets != IGNORE_INDEX).sum((0, 1)),
        )


def global_target_counts(
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    process_group: torch.distributed.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Denominators of the global token mean for one optimizer step.

    Sums ``num_text_targets`` [B] and ``num_audio_targets`` [B, K] over the micro-batches; with a
    ``process_group`` also SUM-all-reduces across its ranks (the counts are small tensors, one
    collective per step).

    Returns:
        (num_text_targets_global [] int64, num_audio_targets_global [K] int64) on the batches' device.
    """
    if not micro_batches:
        raise ValueError("global_target_counts needs at least one micro-batch")
    num_text = torch.stack([mb["num_text_targets"].sum() for mb in micro_batches]).sum()
    num_audio = torch.stack([mb["num_audio_targets"].sum(0) for mb in micro_batches]).sum(0)
    if process_group is not None:
        counts = torch.cat([num_text.view(1), num_audio])
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM, group=process_group)
        num_text, num_audio = counts[0], counts[1:]
    return num_text, num_audio
