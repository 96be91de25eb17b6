"""Evaluation: loss components and teacher-forced accuracies of a model over a whole data set.

The definitions are the training ones (docs/higgs_audio_v2.md §6.4, :class:`higgs_tune.loss.AlignedLoss`) with GLOBAL
denominators: every number is a token mean over the whole data set, not a mean of per-batch means::

    text_loss          = sum over all text targets of CE / n_text
    codebook_losses[k] = sum over all targets of codebook k of CE / n_audio[k]
    audio_loss         = the codebook losses combined as the loss is configured (reference: plain mean)
    loss               = the loss's total (text_weight * text_loss + audio_loss + z_loss)
    text_accuracy, codebook_accuracies[k]: argmax hits / the same counts

A first pass over the loader sums the batches' count tensors (``num_text_targets``,
``num_audio_targets``); the second pass runs the model and hands those manifest-wide counts to the
loss, whose per-batch results then simply add up to the global values (the loss returns SUM(CE) / N for
its batch). Both passes must see the same rows, in any order (the sums do not depend on it); use
``drop_last=False`` so that every row is evaluated.

:func:`evaluate` is the loop the recipe reuses for validation. Under data parallelism each rank passes its
own shard of the rows and the ``process_group``: the counts and the sums are SUM-all-reduced, so every
rank returns the numbers of the whole data set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from higgs_tune.loss import AlignedLoss


def count_targets(loader: Iterable[Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Valid targets over every batch of ``loader`` (cheap: no model call).

    Returns:
        (n_text [] int64, n_audio [K] int64, number of batches), on the CPU.
    """
    n_text: torch.Tensor | None = None
    n_audio: torch.Tensor | None = None
    num_batches = 0
    for batch in loader:
        text = batch["num_text_targets"].sum().cpu()
        audio = batch["num_audio_targets"].sum(0).cpu()
        n_text = text if n_text is None else n_text + text
        n_audio = audio if n_audio is None else n_audio + audio
        num_batches += 1
    if n_text is None or n_audio is None:
        raise ValueError("the evaluation loader yielded no batch")
    return n_text, n_audio, num_batches


def _all_reduce_sum(
    values: torch.Tensor, process_group: torch.distributed.ProcessGroup | None
) -> torch.Tensor:
    """SUM over the ranks of ``process_group`` (identity without one)."""
    if process_group is None:
        return values
    values = values.clone()
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM, group=process_group)
    return values


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    loss_fn: AlignedLoss,
    device: torch.device | str,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Loss components and accuracies of ``model`` over every batch of ``loader``, as token means over the
    whole data set (module docstring).

    Args:
        model: returns the training outputs (``text_logits`` at ``text_target_index``, ``audio_logits`` at
            ``audio_target_index``) for a packed batch. It is put in eval mode and restored afterwards.
        loader: packed batches (``higgs_tune/data/batch.py``), iterated TWICE; both passes must yield the
            same rows (e.g. ``build_dataloader(..., shuffle=False, drop_last=False)``).
        loss_fn: the aligned loss (its weights and reduction define ``loss`` and ``audio_loss``).
        device: where the model runs.
        process_group: data-parallel group whose ranks evaluate disjoint shards (None: one process).

    Returns:
        plain Python numbers: ``loss``, ``text_loss``, ``audio_loss``, ``codebook_losses`` (list of K),
        ``z_loss``, ``text_accuracy``, ``codebook_accuracies`` (list of K), ``n_text`` (int),
        ``n_audio`` (list of K ints, targets per codebook), ``num_batches``.

    Raises:
        ValueError: an empty loader, or a second pass that did not see the same targets as the first
            (checked on the target counts).
    """
    device = torch.device(device)
    local_text, local_audio, num_batches = count_targets(loader)
    counts = _all_reduce_sum(torch.cat([local_text.view(1), local_audio]).to(device), process_group)
    n_text_device, n_audio_device = counts[0], counts[1:]
    n_text, n_audio = n_text_device.cpu(), n_audio_device.cpu()
    # Per batch: loss, text_loss, audio_loss, z_loss, text_accuracy, then K codebook losses and K
    # codebook accuracies, each already divided by the global counts, so they add up over batches.
    sums: torch.Tensor | None = None
    seen_text = torch.zeros((), dtype=torch.long)
    seen_audio = torch.zeros_like(local_audio)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            batch = {name: value.to(device, non_blocking=True) for name, value in batch.items()}
            out = loss_fn(model(batch), batch, n_text_device, n_audio_device)
            scalars = torch.stack(
                [out.loss.detach(), out.text_loss, out.audio_loss, out.z_loss, out.text_accuracy]
            )
            values = torch.cat([scalars, out.codebook_losses, out.codebook_accuracies]).double()
            sums = values if sums is None else sums + values
            seen_text += out.num_text_targets.cpu()
            seen_audio += out.num_audio_targets.cpu()
    finally:
        model.train(was_training)
    if sums is None or not torch.equal(seen_text, local_text) or not torch.equal(seen_audio, local_audio):
        raise ValueError(
            f"the two passes over the loader saw different targets (text {int(local_text)} then "
            f"{int(seen_text)}, audio {local_audio.tolist()} then {seen_audio.tolist()}): evaluate needs a "
            "loader that yields the same rows on every pass"
        )
    sums = _all_reduce_sum(sums, process_group).cpu()
    num_codebooks = local_audio.numel()
    loss, text_loss, audio_loss, z_loss, text_accuracy = sums[:5].tolist()
    codebook_losses, codebook_accuracies = sums[5 : 5 + num_codebooks], sums[5 + num_codebooks :]
    return {
        "loss": loss,
        "text_loss": text_loss,
        "audio_loss": audio_loss,
        "codebook_losses": codebook_losses.tolist(),
        "z_loss": z_loss,
        "text_accuracy": text_accuracy,
        "codebook_accuracies": codebook_accuracies.tolist(),
        "n_text": int(n_text),
        "n_audio": [int(x) for x in n_audio],
        "num_batches": num_batches,
    }
