"""A static key/value cache for generation: inference state, never part of the training path.

One cache row per sequence; in every row the sequence sits from slot 0 and a position's cache slot IS
its position id (``input_pos``), as in gpt-fast. The cache is preallocated for ``max_positions`` slots
plus one sink slot (index ``max_positions``) that rows with nothing to feed write to, so every forward
over the cache has the same shapes (prefill: [B, S]; decode: [B, 1]).

A forward with the cache (``HiggsAudioModel.hidden_states(batch, kv_cache=cache)``):

1. :meth:`KVCache.begin_forward` records which slots the forward writes and whether they are audio
   positions, and returns the attention masks over the whole cache;
2. each attention layer stores its keys/values at those slots (:meth:`LayerKVCache.update`) and attends
   over all ``T = max_positions + 1`` slots under the mask.

The masks: a query at position p reads slots 0..p of its own row (slots above p are stale or unwritten);
the fast-forward mask (Boson's fast-forward layers) additionally drops audio slots for text queries and
lets an audio query see only its own slot (its output is discarded by the layer). Boolean, True = may
attend, as the training masks; every query keeps its own slot, so no row is empty.

Nothing here depends on the layer type (DualFFN or not): any model whose attention calls
:meth:`LayerKVCache.update` with [B, nkv, L, D] keys and values can use it.

Shapes: B rows, L positions per forward, T = max_positions + 1 slots, nkv key/value heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerKVCache:
    """One attention layer's keys/values, bound to the slots of the current forward.

    Attributes:
        keys, values: [B, T, nkv, D] the layer's cache (written in place).
        input_pos: [B, L] int64, the slots the current forward writes.
    """

    keys: torch.Tensor
    values: torch.Tensor
    input_pos: torch.Tensor

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, nkv, L, D] at ``input_pos``; return the layer's whole cache [B, nkv, T, D]."""
        rows = torch.arange(self.keys.shape[0], device=self.keys.device)[:, None]  # [B, 1]
        self.keys[rows, self.input_pos] = k.transpose(1, 2).to(self.keys.dtype)
        self.values[rows, self.input_pos] = v.transpose(1, 2).to(self.values.dtype)
        return self.keys.transpose(1, 2), self.values.transpose(1, 2)


class KVCache:
    """Keys and values of every attention layer for ``batch_size`` rows of ``max_positions`` slots (+ sink).

    Args:
        num_layers, num_kv_heads, head_dim: the attention geometry.
        batch_size: rows (sequences decoded together).
        max_positions: longest sequence a row may hold (prompt + generated positions).
        device, dtype: of the keys/values (the model's).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        batch_size: int,
        max_positions: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if batch_size < 1 or max_positions < 1:
            raise ValueError(f"batch_size and max_positions must be >= 1, got {batch_size}, {max_positions}")
        self.batch_size, self.max_positions = batch_size, max_positions
        shape = (batch_size, max_positions + 1, num_kv_heads, head_dim)
        # zeros, not empty: the sink slot and stale slots are read (masked) and must stay finite
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.audio_slots = torch.zeros(batch_size, max_positions + 1, dtype=torch.bool, device=device)
        self.slots = torch.arange(max_positions + 1, device=device)  # [T]

    @property
    def sink(self) -> int:
        """The slot that rows with nothing to feed write to (never read by a live position)."""
        return self.max_positions

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache writes in place (for CUDA-graph static addresses)."""
        return [*self.keys, *self.values, self.audio_slots]

    def begin_forward(
        self, input_pos: torch.Tensor, audio_mask: torch.Tensor, with_fast_forward: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Record the slots of this forward and return the attention masks over the cache.

        Args:
            input_pos: [B, L] int64 slots (= position ids) written by this forward.
            audio_mask: [B, L] bool, audio-in or audio-out position.
            with_fast_forward: also build the fast-forward mask.

        Returns:
            mask [B, 1, L, T] and fast-forward mask [B, 1, L, T] or None (bool, True = may attend).
        """
        rows = torch.arange(self.batch_size, device=input_pos.device)[:, None]  # [B, 1]
        self.audio_slots[rows, input_pos] = audio_mask
        allowed = self.slots <= input_pos[..., None]  # [B, L, T]
        fast_forward = None
        if with_fast_forward:
            text_query = ~audio_mask[..., None]  # [B, L, 1]
            text_key = ~self.audio_slots[:, None, :]  # [B, 1, T]
            own_slot = self.slots == input_pos[..., None]
            fast_forward = (allowed & ((text_query & text_key) | own_slot))[:, None]
        return allowed[:, None], fast_forward

    def layer(self, index: int, input_pos: torch.Tensor) -> LayerKVCache:
        """Layer ``index``'s cache bound to the slots ``input_pos`` [B, L] of the current forward."""
        return LayerKVCache(self.keys[index], self.values[index], input_pos)
