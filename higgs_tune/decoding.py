"""Prefill and decode step over a static KV cache: the fast path of :mod:`higgs_tune.generation`.

:class:`CachedDecoder` owns one :class:`~higgs_tune.models.kv_cache.KVCache` of ``batch_size`` rows and
``max_positions`` slots and runs the model in two shapes only:

- :meth:`CachedDecoder.prefill`: the prompts, one per row, right-padded to the longest ([B, S]), in ONE
  forward (eager); the heads are read at each row's last prompt position;
- :meth:`CachedDecoder.decode`: one new position per row ([B, 1]) against the cache, the audio head (and
  the text head when some row needs it) at that position. With ``compile=True`` this step is one
  ``torch.compile(fullgraph=True, dynamic=False)`` graph per head set (two at most: audio, text + audio)
  whose shapes never change across steps or prompts; with ``cuda_graphs=True`` (CUDA) each is captured
  once as a CUDA graph and replayed (inputs copied into static buffers).

The model side is the :class:`CachedAudioModel` protocol (``hidden_states(batch, kv_cache)``, the two
heads, ``new_kv_cache``): it holds for Higgs Audio v2 (:class:`~higgs_tune.models.higgs_audio.model.
HiggsAudioModel`) and is all another backbone with the same audio protocol needs to provide.

Shapes: B rows, S prompt positions (longest), K codebooks, C = codebook_size + 2, V text vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from higgs_tune.models.kv_cache import KVCache


class CachedAudioModel(Protocol):
    """What generation needs from a model (Higgs Audio v2 here; a later backbone implements the same)."""

    def hidden_states(self, batch: Any, kv_cache: KVCache | None = None) -> torch.Tensor: ...

    def text_head(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def audio_head(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def new_kv_cache(self, batch_size: int, max_positions: int) -> KVCache: ...


StepLogits = tuple[torch.Tensor | None, torch.Tensor]  # text [B, V] (or None), audio [B, K, C]


class CachedDecoder:
    """Generation state of up to ``batch_size`` sequences of at most ``max_positions`` positions.

    Args:
        model: a :class:`CachedAudioModel` in eval mode.
        batch_size: rows decoded together (fewer prompts: the spare rows idle at the sink slot).
        max_positions: cache slots per row (prompt + generated positions).
        compile: compile the decode step (static shapes; no recompilation across steps and prompts).
        cuda_graphs: capture the decode step as CUDA graphs (model on a CUDA device).
        backend: ``torch.compile`` backend (tests may pass a counting one).
    """

    def __init__(
        self,
        model: CachedAudioModel,
        *,
        batch_size: int,
        max_positions: int,
        compile: bool = False,
        cuda_graphs: bool = False,
        backend: str | Callable = "inductor",
    ) -> None:
        self.model = model
        self.batch_size, self.max_positions = batch_size, max_positions
        self.cache = model.new_kv_cache(batch_size, max_positions)
        self.device = self.cache.slots.device
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on {self.device}")
        self._step = self._decode_forward
        if compile:
            self._step = torch.compile(self._decode_forward, fullgraph=True, dynamic=False, backend=backend)
        self._graphs: dict[bool, _CapturedStep] | None = {} if cuda_graphs else None

    @property
    def sink(self) -> int:
        """The slot idle rows write to (:attr:`KVCache.sink`)."""
        return self.cache.sink

    @torch.no_grad()
    def prefill(self, batch: dict[str, torch.Tensor], last_index: torch.Tensor) -> StepLogits:
        """Run the prompts through the model once, filling the cache.

        Args:
            batch: [B, S] fields of :mod:`higgs_tune.data.batch`, one sequence per row from position 0
                (``input_pos`` = cache slot, also on the padding after a shorter prompt).
            last_index: [B] each row's last prompt position.

        Returns:
            text logits [B, V] and audio logits [B, K, C] at ``last_index``.
        """
        if batch["tokens"].shape != (self.batch_size, batch["tokens"].shape[1]):
            raise ValueError(f"prefill batch {tuple(batch['tokens'].shape)}: expected {self.batch_size} rows")
        if batch["tokens"].shape[1] > self.max_positions:
            raise ValueError(
                f"prompt of {batch['tokens'].shape[1]} positions > cache of {self.max_positions}"
            )
        batch = {name: value.to(self.device) for name, value in batch.items()}
        hidden = self.model.hidden_states(batch, kv_cache=self.cache)  # [B, S, H]
        last = hidden[torch.arange(self.batch_size, device=self.device), last_index.to(self.device)]  # [B, H]
        return self.model.text_head(last), self.model.audio_head(last)

    @torch.no_grad()
    def decode(
        self,
        tokens: torch.Tensor,
        columns: torch.Tensor,
        audio_out: torch.Tensor,
        input_pos: torch.Tensor,
        with_text: bool,
    ) -> StepLogits:
        """Feed one position per row and read the heads there.

        Args:
            tokens: [B] int64 text token (``<|AUDIO_OUT|>`` at audio columns).
            columns: [B, K] int64 audio codes (any value at text positions).
            audio_out: [B] bool, the position is an audio-out column.
            input_pos: [B] int64 position = cache slot (the sink for idle rows).
            with_text: also compute the text head.

        Returns:
            text logits [B, V] (None unless ``with_text``) and audio logits [B, K, C]; fresh tensors.
        """
        if int(input_pos.max()) > self.sink:
            raise ValueError(
                f"decode position {int(input_pos.max())} beyond the cache of {self.max_positions}"
            )
        inputs = (tokens[:, None], columns[:, :, None], audio_out[:, None], input_pos[:, None])
        if self._graphs is None:
            return self._step(*(x.to(self.device) for x in inputs), with_text)
        if with_text not in self._graphs:
            self._graphs[with_text] = _CapturedStep(self._step, inputs, with_text, self.device)
        return self._graphs[with_text](inputs)

    def _decode_forward(
        self,
        tokens: torch.Tensor,
        audio_codes: torch.Tensor,
        audio_out_mask: torch.Tensor,
        input_pos: torch.Tensor,
        with_text: bool,
    ) -> StepLogits:
        """The decode step itself: tokens [B, 1], audio_codes [B, K, 1], audio_out_mask [B, 1], input_pos
        [B, 1] -> text logits [B, V] or None, audio logits [B, K, C]."""
        batch = {
            "tokens": tokens,
            "audio_codes": audio_codes,
            "audio_in_mask": torch.zeros_like(audio_out_mask),
            "audio_out_mask": audio_out_mask,
            "input_pos": input_pos,
            # sink-padded FFN routing of one position: index 0 if it takes that path, else the sink 1
            "text_ffn_index": audio_out_mask.long(),
            "audio_ffn_index": (~audio_out_mask).long(),
        }
        hidden = self.model.hidden_states(batch, kv_cache=self.cache)[:, 0]  # [B, H]
        text = self.model.text_head(hidden) if with_text else None
        return text, self.model.audio_head(hidden)


class _CapturedStep:
    """One decode-step variant captured as a CUDA graph: static input buffers, replay, cloned outputs.

    Capture happens at the first call, with that call's inputs: the warm-up runs (side stream, as CUDA
    graph capture requires) write the same keys/values at the same slots as the replay that follows,
    so they leave the cache as one step would.
    """

    def __init__(
        self, step: Callable[..., StepLogits], inputs: tuple[torch.Tensor, ...], with_text: bool, device
    ) -> None:
        self.static_inputs = tuple(x.to(device).clone() for x in inputs)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step(*self.static_inputs, with_text)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = step(*self.static_inputs, with_text)

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> StepLogits:
        for static, value in zip(self.static_inputs, inputs):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        text, audio = self.static_outputs
        return (None if text is None else text.clone()), audio.clone()
