"""Generation of text and audio codes with Boson's inference protocol, on OUR model.

The protocol is the one of ``HiggsAudioModel.generate`` / ``_sample`` in ``boson_multimodal`` (serve engine
and ``examples/generation.py``), step by step:

- prompt = the ``prepare_chatml_sample`` layout of the messages + ``<|start_header_id|>assistant
  <|end_header_id|>\\n\\n`` (+ ``<|audio_out_bos|>`` to force speech), built with
  :mod:`higgs_tune.data.chatml` / :mod:`higgs_tune.data.document` (audio items merged as code columns);
- TEXT mode: the next text token comes from the text head at the last position;
- after a ``<|audio_out_bos|>``: a new audio segment starts with a forced all-BOS column (no model call is
  needed for it: Boson's forward at that step is discarded);
- AUDIO mode: each next column comes from the audio logits of the previous column (with repetition-aware
  resampling if ``ras_win_len`` is set, :func:`repetition_aware_resample`), then
  :func:`force_delay_pattern` applies the delay and end-of-stream rules; when the stream has ended the
  text token ``<|audio_eos|>`` is forced;
- generation stops when the text head produces ``<|eot_id|>`` or ``<|end_of_text|>`` (kept in the
  output, as Boson keeps it) or after ``max_new_columns`` steps (one step = one text token or one audio
  column, Boson's ``max_new_tokens``).

Context after an audio segment: the segment's LAST column (the one whose sampling ended the stream) is
part of the prefix, followed by ``<|audio_eos|>`` -- the training layout (the data pipeline trains that
column's text logit to predict ``<|audio_eos|>``, :mod:`higgs_tune.data.document`) and what Boson's
``forward`` sees on the full prefix. Boson's KV-cached ``generate`` never feeds that column (the step that
samples it switches to text mode and feeds only ``<|audio_eos|>``), so its text AFTER a segment can differ
from ours; everything up to and including that ``<|audio_eos|>`` is identical
(tests/generation/test_generation.py).

Without the delay pattern (``use_delay_pattern`` false) Boson's protocol has no end-of-stream rule: a
segment then runs until ``max_new_columns``, here as there.

Two drivers run the same per-prompt state machine (:class:`_PromptDecoder`):

- with a KV cache (default, :mod:`higgs_tune.decoding`): several prompts at once, right-padded into the
  rows of one prefill forward, then one decode step per position (the heads read at that position only);
  each prompt stops on its own. The decode step can be compiled (and on CUDA captured as a CUDA graph):
  ``CachedDecoder(model, ..., compile=True, cuda_graphs=True)``;
- without (``use_cache=False``), the reference: every step re-runs the whole prefix as a one-row packed
  batch of :mod:`higgs_tune.data.batch`, O(L^2) per sequence.

Sampling uses the same warpers as transformers (temperature, then top-k, then top-p) and one
``torch.multinomial`` call per step on the same shapes as Boson (RAS: Boson's extra draw), so with the same
seeded generator the samples are the same. Every prompt has its own generator, so a prompt's result does
not depend on the others in its batch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from higgs_tune.data.batch import IGNORE_INDEX, PackingSpec
from higgs_tune.data.chatml import AudioItem, TokenizedSample, parse_sample, tokenize_sample
from higgs_tune.data.document import AudioLayout, DocStats, Document, build_document
from higgs_tune.data.manifest import read_codes, resolve_codes_path
from higgs_tune.data.packer import collate_rows
from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.decoding import CachedAudioModel, CachedDecoder
from higgs_tune.models.higgs_audio.config import HiggsAudioModelArgs

ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
STOP_TOKEN_NAMES = ("<|eot_id|>", "<|end_of_text|>")


class GenerationError(RuntimeError):
    """Generation cannot continue under Boson's protocol (names the offending token or setting)."""


# ------------------------------------------------------------------------------------------ sampling
@dataclass(frozen=True)
class SamplingConfig:
    """How the next token / code is chosen from logits.

    ``greedy=True``: argmax (transformers' ``do_sample=False``; temperature, top-k and top-p are ignored).
    Otherwise sampling after the transformers warpers in their order: temperature, top-k (``None`` = off),
    top-p (``None`` or 1.0 = off).

    ``ras_win_len`` (Boson's repetition-aware sampling, greedy or not; ``None`` = off, the default of
    Boson's ``HiggsAudioModel.generate``; Boson's serve engine and examples use 7): see
    :func:`repetition_aware_resample`, with ``ras_win_max_num_repeat`` (Boson's default 2).
    """

    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    ras_win_len: int | None = None
    ras_win_max_num_repeat: int = 2

    def __post_init__(self) -> None:
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        if self.ras_win_len is not None and self.ras_win_len < 1:
            raise ValueError(f"ras_win_len must be >= 1 or None (off), got {self.ras_win_len}")
        if self.ras_win_max_num_repeat < 1:
            raise ValueError(f"ras_win_max_num_repeat must be >= 1, got {self.ras_win_max_num_repeat}")


def warp_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p on the last dim, as transformers' logits warpers.

    Args:
        logits: [..., V] float32.

    Returns:
        [..., V] scores; removed entries are ``-inf``.
    """
    scores = logits
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k is not None:
        top_k = min(sampling.top_k, scores.shape[-1])
        kth_best = torch.topk(scores, top_k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth_best, -float("inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_scores, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cumulative <= (1 - sampling.top_p)
        sorted_remove[..., -1:] = False  # always keep the best entry
        remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores


def choose_tokens(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one id per row.

    Args:
        logits: [N, V] (a text row [1, V], or the K codebooks of one audio column [K, C]).
        sampling: greedy or sampling settings.
        generator: random generator of ``torch.multinomial`` (sampling only).

    Returns:
        [N] int64.
    """
    logits = logits.float()
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = warp_logits(logits, sampling).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def repetition_aware_resample(
    column: torch.Tensor,
    logits: torch.Tensor,
    recent_columns: torch.Tensor,
    max_num_repeat: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boson's repetition-aware sampling (``_sample_audio_tokens`` with ``ras_win_len``): every codebook
    whose chosen code already occurs ``max_num_repeat`` times or more in the window of recent audio-out
    columns is drawn again from the untempered, unfiltered distribution (softmax of the raw logits), with
    the same generator. Applied before the delay pattern's forcing; the window holds the forced columns
    of every audio-out segment so far, prompt references included (Boson's ``audio_out_ids``).

    Args:
        column: [K] int64 codes chosen from ``logits`` (greedy or sampled).
        logits: [K, C] the raw audio logits of this step.
        recent_columns: [K, W] the last W audio-out columns (W <= ``ras_win_len``).
        max_num_repeat: Boson's ``ras_win_max_num_repeat``.

    Returns:
        [K] int64, on ``logits``' device.
    """
    column = column.to(logits.device).clone()
    repeats = (recent_columns.to(logits.device) == column[:, None]).sum(dim=1)  # [K]
    rows = torch.nonzero(repeats >= max_num_repeat).squeeze(1)
    # drawn even when no row repeats (an empty draw), exactly as Boson does
    resampled = logits.float()[rows].softmax(dim=-1).multinomial(1, replacement=True, generator=generator)
    column[rows] = resampled.squeeze(1)
    return column


# ---------------------------------------------------------------------------- delay pattern and EOS
@dataclass(frozen=True)
class DelayState:
    """Where an audio segment stands in the delay pattern (Boson's ``num_delay``/``num_remaining_delays``).

    Attributes:
        num_delay: codebooks already started, minus one (0 for the first sampled column; a column
            forces rows ``num_delay + 1 .. K - 1`` to BOS while ``num_delay + 1 < K``).
        num_remaining_delays: None while no codebook has emitted EOS; afterwards the number of columns
            still to come, each forcing rows ``0 .. K - num_remaining_delays - 1`` to EOS.
    """

    num_delay: int = 0
    num_remaining_delays: int | None = None


def force_delay_pattern(
    column: torch.Tensor, state: DelayState, stream_bos_id: int, stream_eos_id: int
) -> tuple[torch.Tensor, DelayState, bool]:
    """Apply the delay and end-of-stream rules to a freshly chosen audio column (Boson's
    ``_sample_audio_tokens`` with ``use_delay_pattern``).

    1. Delay: while ``num_delay + 1 < K``, rows ``num_delay + 1 ..`` become BOS and ``num_delay`` grows.
    2. If an EOS was seen before: rows ``0 .. K - num_remaining_delays - 1`` become EOS and
       ``num_remaining_delays`` shrinks by one.
       Else, if some row is EOS: with ``e`` the LOWEST such codebook, rows ``0 .. e - 1`` become EOS and
       ``num_remaining_delays = K - 1 - e``.
    3. When ``num_remaining_delays`` reaches 0 the segment is over (the caller forces ``<|audio_eos|>``)
       and the state resets.

    Args:
        column: [K] int64 chosen codes (0..codebook_size+1); not modified.
        state: the segment's state before this column.

    Returns:
        (forced column [K], new state, segment_ended).
    """
    column = column.clone()
    num_codebooks = column.shape[0]
    num_delay, remaining = state.num_delay, state.num_remaining_delays
    if num_delay + 1 < num_codebooks:
        column[num_delay + 1 :] = stream_bos_id
        num_delay += 1
    if remaining is not None:
        column[: num_codebooks - remaining] = stream_eos_id
        remaining -= 1
    else:
        eos_rows = torch.nonzero(column == stream_eos_id).flatten()
        if eos_rows.numel() > 0:
            lowest = int(eos_rows[0])
            column[:lowest] = stream_eos_id
            remaining = num_codebooks - lowest - 1
    if remaining is not None and remaining <= 0:
        return column, DelayState(), True
    return column, DelayState(num_delay, remaining), False


def revert_delay_pattern(columns: torch.Tensor) -> torch.Tensor:
    """Undo the delay pattern: row k keeps columns ``k .. N - K + k`` (Boson's ``revert_delay_pattern``).

    Args:
        columns: [K, N] codes with the delay applied.

    Returns:
        [K, max(N - K + 1, 0)].
    """
    num_codebooks, length = columns.shape
    width = max(length - num_codebooks + 1, 0)
    return torch.stack([columns[k, k : k + width] for k in range(num_codebooks)])


def segment_codes(columns: torch.Tensor, codebook_size: int, use_delay_pattern: bool = True) -> torch.Tensor:
    """Codes of one generated segment as the serve engine hands them to the audio decoder: delay reverted,
    clipped to ``0 .. codebook_size - 1``, first (stream BOS) and last (stream EOS) column dropped.

    Args:
        columns: [K, N] generated columns of the segment, BOS column included.

    Returns:
        [K, T] int64 with T = N - K - 1 for a complete segment (possibly 0 for a cut one).
    """
    codes = revert_delay_pattern(columns) if use_delay_pattern else columns
    return codes.clip(0, codebook_size - 1)[:, 1:-1]


# ---------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class GenerationTokens:
    """The ids generation needs, looked up by name in the tokenizer and checked against the model."""

    audio_out_bos: int
    audio_out: int
    audio_in: int
    audio_eos: int
    pad: int
    stop: tuple[int, ...]
    stream_bos: int
    stream_eos: int
    num_codebooks: int
    codebook_size: int
    use_delay_pattern: bool

    @classmethod
    def from_tokenizer(cls, tokenizer: HiggsTokenizer, args: HiggsAudioModelArgs) -> GenerationTokens:
        """Raises ``ValueError`` naming every id where the tokenizer and the model config disagree."""
        tokenizer.check_against_model_config(args.to_hf_config())
        special = tokenizer.special
        return cls(
            audio_out_bos=special.audio_out_bos,
            audio_out=special.audio_out,
            audio_in=special.audio_in,
            audio_eos=special.audio_eos,
            pad=special.pad,
            stop=tuple(tokenizer.token_to_id(name) for name in STOP_TOKEN_NAMES),
            stream_bos=args.audio_stream_bos_id,
            stream_eos=args.audio_stream_eos_id,
            num_codebooks=args.num_codebooks,
            codebook_size=args.codebook_size,
            use_delay_pattern=args.use_delay_pattern,
        )


def build_prompt(
    messages: Sequence[Mapping],
    tokenizer: HiggsTokenizer,
    layout: AudioLayout,
    codes: Sequence[np.ndarray | torch.Tensor] = (),
    force_audio: bool = False,
) -> Document:
    """The prompt of Boson's serve engine as a merged document: ``prepare_chatml_sample(messages)`` +
    ``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` (+ ``<|audio_out_bos|>`` if ``force_audio``).

    Audio items (system/user audio-in, earlier assistant audio-out such as a voice-cloning reference)
    become their code columns (stream BOS/EOS, delay pattern), as in training. Labels play no role.

    Layout trick (the data functions want a sample with a label): the messages are tokenized with one
    extra, empty assistant turn, whose tokens are exactly the header above + ``<|eot_id|>``; the final
    ``<|eot_id|>`` is cut off. If the last prompt message is an assistant turn, its end token becomes
    ``<|eot_id|>`` again (the extra turn turned it into ``<|eom_id|>``).

    Args:
        messages: ChatML messages (``higgs_tune.data.chatml`` schema; audio items name ``audio_codes``).
        tokenizer: text tokenizer.
        layout: the model's audio settings.
        codes: raw codes [K, T_i] of every audio item of the messages, in order of appearance.
        force_audio: end the prompt with ``<|audio_out_bos|>`` so that the answer is speech.

    Returns:
        the prompt :class:`Document` (targets are meaningless and unused).
    """
    messages = list(messages)
    if not messages:
        raise ValueError("the prompt needs at least one message")
    sample = parse_sample({"messages": messages + [{"role": "assistant", "content": ""}]})
    tokenized = tokenize_sample(sample, tokenizer)
    special = tokenizer.special
    header = tokenizer.encode(ASSISTANT_HEADER)
    ids = tokenized.input_ids
    tail = ids[-len(header) - 1 :].tolist()
    if tail != header + [special.eot]:
        raise AssertionError(f"unexpected layout of the extra assistant turn: {tail}")
    keep = ids.numel() - 1
    input_ids = ids[:keep].clone()
    if messages[-1].get("role") == "assistant":
        last_end = keep - len(header) - 1
        if int(input_ids[last_end]) != special.eom:
            raise AssertionError(f"expected <|eom_id|> at {last_end}, found id {int(input_ids[last_end])}")
        input_ids[last_end] = special.eot
    label_ids = torch.full_like(input_ids, IGNORE_INDEX)
    if force_audio:
        input_ids = torch.cat([input_ids, input_ids.new_tensor([special.audio_out_bos])])
        label_ids = torch.cat([label_ids, label_ids.new_tensor([IGNORE_INDEX])])
    prompt = TokenizedSample(input_ids=input_ids, label_ids=label_ids, audio=tokenized.audio)
    return build_document(prompt, list(codes), layout)


class _Sequence:
    """The merged sequence so far (one position per text token or audio column), as growing tensors."""

    def __init__(self, prompt: Document) -> None:
        self.tokens = prompt.tokens.clone()  # [S]
        self.audio_codes = prompt.audio_codes.clone()  # [K, S]
        self.audio_in_mask = prompt.audio_in_mask.clone()  # [S]
        self.audio_out_mask = prompt.audio_out_mask.clone()  # [S]

    def __len__(self) -> int:
        return self.tokens.numel()

    def append(self, token: int, column: torch.Tensor | None) -> None:
        """A text token (``column`` None) or an audio-out column [K] with its placeholder ``token``."""
        is_audio = column is not None
        if column is None:
            column = self.audio_codes.new_zeros(self.audio_codes.shape[0])
        self.tokens = torch.cat([self.tokens, self.tokens.new_tensor([token])])
        self.audio_codes = torch.cat([self.audio_codes, column.to(self.audio_codes)[:, None]], dim=1)
        self.audio_in_mask = torch.cat([self.audio_in_mask, self.audio_in_mask.new_tensor([False])])
        self.audio_out_mask = torch.cat([self.audio_out_mask, self.audio_out_mask.new_tensor([is_audio])])

    def document(self) -> Document:
        """The sequence as a document (targets all -100)."""
        length = len(self)
        num_codebooks = self.audio_codes.shape[0]
        num_audio = int((self.audio_in_mask | self.audio_out_mask).sum())
        return Document(
            tokens=self.tokens,
            audio_codes=self.audio_codes,
            audio_in_mask=self.audio_in_mask,
            audio_out_mask=self.audio_out_mask,
            text_targets=torch.full((length,), IGNORE_INDEX, dtype=torch.long),
            audio_targets=torch.full((num_codebooks, length), IGNORE_INDEX, dtype=torch.long),
            stats=DocStats(length, length - num_audio, num_audio, 0, 0),
        )


# --------------------------------------------------------------------------------------- generation
@dataclass
class GenerationOutput:
    """What :func:`generate` produced for one prompt.

    Attributes:
        text_ids: [n] int64, the generated text stream after the prompt, as Boson's ``input_ids`` tail:
            one ``<|AUDIO_OUT|>`` per audio segment, the forced ``<|audio_eos|>``, the stop token if any.
        audio_columns: per segment, [K, N_i] the generated columns with the delay pattern (first column
            all BOS), as Boson's ``audio_sequences``.
        audio_codes: per segment, [K, T_i] the codes for the audio decoder (:func:`segment_codes`).
        stopped_by: ``"stop_token"`` or ``"max_new_columns"``.
        num_steps: decoding steps taken (text tokens + audio columns).
    """

    text_ids: torch.Tensor
    audio_columns: list[torch.Tensor]
    audio_codes: list[torch.Tensor]
    stopped_by: Literal["stop_token", "max_new_columns"]
    num_steps: int


class _PromptDecoder:
    """Boson's protocol (module docstring) for one prompt, one step at a time, model-free: :attr:`head`
    says which head the next step reads (``None``: finished); :meth:`accept` takes that head's logits at
    the sequence's last position, chooses, and appends the result to :attr:`sequence`. Both drivers
    (with and without KV cache) run this same state machine.

    Attributes:
        sequence: prompt + everything generated so far (one position per token or column).
        num_fed: positions of ``sequence`` already in the KV cache (cached driver only).
    """

    def __init__(
        self,
        prompt: Document,
        tokens: GenerationTokens,
        max_new_columns: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> None:
        if bool(prompt.audio_in_mask[-1] | prompt.audio_out_mask[-1]):
            raise GenerationError("the prompt ends with an audio column; it must end with a text token")
        self.tokens, self.max_new_columns = tokens, max_new_columns
        self.sampling, self.generator = sampling, generator
        self.sequence = _Sequence(prompt)
        self.num_fed = 0
        # every audio-out column so far, prompt references included (Boson's audio_out_ids): the RAS window
        self.audio_history = prompt.audio_codes[:, prompt.audio_out_mask]  # [K, N]
        self.last_token = int(prompt.tokens[-1])
        self.text_ids: list[int] = []
        self.segments: list[list[torch.Tensor]] = []
        self.in_audio = False
        self.delay = DelayState()
        self.num_steps = 0
        self.stopped_by: Literal["stop_token", "max_new_columns"] = "max_new_columns"
        self.done = False
        self._start_segment_if_due()

    @property
    def head(self) -> Literal["text", "audio"] | None:
        if self.done:
            return None
        return "audio" if self.in_audio else "text"

    def accept(self, text_logits: torch.Tensor | None, audio_logits: torch.Tensor | None) -> None:
        """One step from the logits at the last position: text [V] in text mode, audio [K, C] in audio
        mode (the other may be None); then the model-free steps that follow (a segment's BOS column)."""
        if self.done:
            raise RuntimeError("accept() on a finished prompt")
        self.num_steps += 1
        if self.in_audio:
            self._accept_column(audio_logits)
        else:
            self._accept_text(text_logits)
        self._end_step()
        self._start_segment_if_due()

    def output(self) -> GenerationOutput:
        audio_columns = [torch.stack(columns, dim=1) for columns in self.segments]
        return GenerationOutput(
            text_ids=torch.tensor(self.text_ids, dtype=torch.long),
            audio_columns=audio_columns,
            audio_codes=[
                segment_codes(columns, self.tokens.codebook_size, self.tokens.use_delay_pattern)
                for columns in audio_columns
            ],
            stopped_by=self.stopped_by,
            num_steps=self.num_steps,
        )

    def _end_step(self) -> None:
        if self.stopped_by == "stop_token" or self.num_steps >= self.max_new_columns:
            self.done = True

    def _start_segment_if_due(self) -> None:
        """AUDIO_INIT after ``<|audio_out_bos|>``: ``<|AUDIO_OUT|>`` and an all-BOS first column, a step
        without model call (Boson's forward at that step is discarded)."""
        if self.done or self.in_audio or self.last_token != self.tokens.audio_out_bos:
            return
        self.num_steps += 1
        column = torch.full((self.tokens.num_codebooks,), self.tokens.stream_bos, dtype=torch.long)
        self._append_column(column)
        self.text_ids.append(self.tokens.audio_out)
        self.segments.append([column])
        self.in_audio, self.delay, self.last_token = True, DelayState(), self.tokens.audio_out
        self._end_step()

    def _append_column(self, column: torch.Tensor) -> None:
        self.sequence.append(self.tokens.audio_out, column)
        self.audio_history = torch.cat([self.audio_history, column[:, None]], dim=1)

    def _accept_column(self, audio_logits: torch.Tensor) -> None:
        tokens, sampling = self.tokens, self.sampling
        column = choose_tokens(audio_logits, sampling, self.generator)  # [K]
        if sampling.ras_win_len is not None:
            column = repetition_aware_resample(
                column,
                audio_logits,
                self.audio_history[:, -sampling.ras_win_len :],
                sampling.ras_win_max_num_repeat,
                self.generator,
            )
        column = column.cpu()
        ended = False
        if tokens.use_delay_pattern:
            column, self.delay, ended = force_delay_pattern(
                column, self.delay, tokens.stream_bos, tokens.stream_eos
            )
        self._append_column(column)
        self.segments[-1].append(column)
        if ended:
            self.sequence.append(tokens.audio_eos, None)
            self.text_ids.append(tokens.audio_eos)
            self.in_audio, self.last_token = False, tokens.audio_eos

    def _accept_text(self, text_logits: torch.Tensor) -> None:
        token = int(choose_tokens(text_logits[None], self.sampling, self.generator)[0])
        if token in (self.tokens.audio_out, self.tokens.audio_in):
            raise GenerationError(
                f"the text head produced the audio placeholder id {token} at step {self.num_steps}; audio "
                "starts only after <|audio_out_bos|> (is the checkpoint trained with this tokenizer?)"
            )
        self.sequence.append(token, None)
        self.text_ids.append(token)
        self.last_token = token
        if token in self.tokens.stop:
            self.stopped_by = "stop_token"


def cache_positions_needed(prompts: Sequence[Document], max_new_columns: int) -> int:
    """KV-cache slots per row that generating ``max_new_columns`` steps after any of ``prompts`` can fill:
    one position per step, plus the ``<|audio_eos|>`` appended with each segment's last column (a
    segment takes at least two steps: its BOS column and one sampled column)."""
    return max(len(prompt) for prompt in prompts) + max_new_columns + (max_new_columns + 1) // 2


@torch.no_grad()
def generate_batch(
    model: CachedAudioModel,
    prompts: Sequence[Document],
    tokens: GenerationTokens,
    *,
    max_new_columns: int,
    sampling: SamplingConfig = SamplingConfig(),
    generators: Sequence[torch.Generator | None] | None = None,
    use_cache: bool = True,
    decoder: CachedDecoder | None = None,
    batch_size: int | None = None,
) -> list[GenerationOutput]:
    """Generate text and audio after each of ``prompts`` with Boson's protocol (module docstring).

    With the cache (default), ``decoder.batch_size`` prompts at a time share one prefill forward and one
    decode step per position; each prompt stops on its own (stop token or ``max_new_columns``), finished
    ones idle at the sink slot until the batch is done. Each prompt's result equals generating it alone.

    Args:
        model: our model (any device/dtype; put it in eval mode).
        prompts: from :func:`build_prompt`; each must end with a text token.
        tokens: ids from :meth:`GenerationTokens.from_tokenizer`.
        max_new_columns: at most this many decoding steps per prompt (one text token or one audio column).
        sampling: greedy or sampled choice (and repetition-aware resampling), text and audio alike.
        generators: one random generator per prompt (sampling and RAS draws), on the model's device;
            None: torch's global generator.
        use_cache: False runs the reference path: the whole prefix again at every step (O(L^2)).
        decoder: a :class:`CachedDecoder` to reuse (its cache must hold :func:`cache_positions_needed`
            slots); None builds an eager one for these prompts.
        batch_size: rows of the decoder built when ``decoder`` is None (default: all prompts at once).

    Returns:
        one :class:`GenerationOutput` per prompt, in order (tensors on the CPU).

    Raises:
        GenerationError: a prompt ends inside audio, or the text head produced an audio placeholder
            token (``<|AUDIO|>`` / ``<|AUDIO_OUT|>``) outside the ``<|audio_out_bos|>`` protocol.
    """
    if max_new_columns < 1:
        raise ValueError(f"max_new_columns must be >= 1, got {max_new_columns}")
    if not prompts:
        return []
    generators = [None] * len(prompts) if generators is None else list(generators)
    if len(generators) != len(prompts):
        raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts")
    decoders = [
        _PromptDecoder(prompt, tokens, max_new_columns, sampling, generator)
        for prompt, generator in zip(prompts, generators)
    ]
    if not use_cache:
        device = next(model.parameters()).device
        for prompt_decoder in decoders:
            _decode_without_cache(model, prompt_decoder, tokens.pad, device)
        return [prompt_decoder.output() for prompt_decoder in decoders]
    needed = cache_positions_needed(prompts, max_new_columns)
    if decoder is None:
        rows = min(batch_size or len(prompts), len(prompts))
        decoder = CachedDecoder(model, batch_size=rows, max_positions=needed)
    elif decoder.max_positions < needed:
        raise ValueError(
            f"the decoder's cache holds {decoder.max_positions} positions, {needed} may be needed"
        )
    for start in range(0, len(decoders), decoder.batch_size):
        _decode_with_cache(decoder, decoders[start : start + decoder.batch_size], tokens)
    return [prompt_decoder.output() for prompt_decoder in decoders]


def generate(
    model: CachedAudioModel,
    prompt: Document,
    tokens: GenerationTokens,
    *,
    max_new_columns: int,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    decoder: CachedDecoder | None = None,
) -> GenerationOutput:
    """:func:`generate_batch` for one prompt (same arguments; ``generator`` for that prompt)."""
    (output,) = generate_batch(
        model,
        [prompt],
        tokens,
        max_new_columns=max_new_columns,
        sampling=sampling,
        generators=[generator],
        use_cache=use_cache,
        decoder=decoder,
    )
    return output


def _decode_without_cache(
    model: CachedAudioModel, prompt_decoder: _PromptDecoder, pad_id: int, device: torch.device
) -> None:
    """The reference driver: every step runs the whole prefix as a one-row packed batch of
    :mod:`higgs_tune.data.batch` and reads the heads at its last position."""
    while prompt_decoder.head is not None:
        document = prompt_decoder.sequence.document()
        spec = PackingSpec(seq_len=len(document), batch_size=1, num_codebooks=document.audio_codes.shape[0])
        batch = {name: value.to(device) for name, value in collate_rows([[document]], spec, pad_id).items()}
        hidden = model.hidden_states(batch)[0, -1]  # [H]
        if prompt_decoder.head == "text":
            prompt_decoder.accept(model.text_head(hidden), None)
        else:
            prompt_decoder.accept(None, model.audio_head(hidden))


def _decode_with_cache(
    decoder: CachedDecoder, prompt_decoders: list[_PromptDecoder], tokens: GenerationTokens
) -> None:
    """The cached driver: one prefill of the rows' sequences, then one decode step per position until every
    row is finished. A row feeds its next unfed position each step (two positions wait after a segment's
    last column + ``<|audio_eos|>`` and after ``<|audio_out_bos|>`` + the BOS column) and chooses when it
    has fed them all; finished and spare rows feed a pad token at the sink slot."""
    rows: list[_PromptDecoder | None] = [
        *prompt_decoders,
        *[None] * (decoder.batch_size - len(prompt_decoders)),
    ]
    documents = [row.sequence.document() for row in prompt_decoders]
    num_codebooks = tokens.num_codebooks
    length = max(len(document) for document in documents)
    spec = PackingSpec(seq_len=length, batch_size=decoder.batch_size, num_codebooks=num_codebooks)
    batch = collate_rows(
        [[document] for document in documents] + [[]] * (len(rows) - len(documents)), spec, tokens.pad
    )
    batch["input_pos"] = torch.arange(length).expand(decoder.batch_size, length).clone()  # = cache slots
    last_index = torch.tensor(
        [len(document) - 1 for document in documents] + [0] * (len(rows) - len(documents))
    )
    text_logits, audio_logits = decoder.prefill(batch, last_index)
    for b, row in enumerate(prompt_decoders):
        row.num_fed = len(documents[b])
        if row.head is not None:
            row.accept(text_logits[b], audio_logits[b])

    while any(row.head is not None for row in prompt_decoders):
        step_tokens = torch.full((len(rows),), tokens.pad, dtype=torch.long)
        columns = torch.zeros(len(rows), num_codebooks, dtype=torch.long)
        audio_out = torch.zeros(len(rows), dtype=torch.bool)
        input_pos = torch.full((len(rows),), decoder.sink, dtype=torch.long)
        with_text = False
        for b, row in enumerate(rows):
            if row is None or row.head is None:
                continue
            position, sequence = row.num_fed, row.sequence
            step_tokens[b] = sequence.tokens[position]
            columns[b] = sequence.audio_codes[:, position]
            audio_out[b] = sequence.audio_out_mask[position]
            input_pos[b] = position
            with_text |= position + 1 == len(sequence) and row.head == "text"
        text_logits, audio_logits = decoder.decode(step_tokens, columns, audio_out, input_pos, with_text)
        for b, row in enumerate(rows):
            if row is None or row.head is None:
                continue
            row.num_fed += 1
            if row.num_fed == len(row.sequence):
                row.accept(None if text_logits is None else text_logits[b], audio_logits[b])


# ------------------------------------------------------------------------------------ held-out prompts
@dataclass
class HeldOutPrompt:
    """A manifest sample split into the context to prompt with and the answer it should produce.

    Attributes:
        messages: the sample's messages before its last assistant turn.
        context_codes: raw codes [K, T] of the audio items of ``messages``, in order.
        reference_codes: raw codes [K, T] of the audio items of the last assistant turn (the answer).
    """

    messages: list[dict]
    context_codes: list[np.ndarray]
    reference_codes: list[np.ndarray]


def held_out_prompt(manifest: str | Path, index: int) -> HeldOutPrompt:
    """Sample ``index`` (0-based, blank lines skipped) of a JSONL manifest as a prompt and its answer.

    Raises:
        ValueError: the index is out of range, or the sample has no assistant turn after some context.
    """
    manifest = Path(manifest)
    with open(manifest, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    if not 0 <= index < len(lines):
        raise ValueError(f"index {index} is outside the {len(lines)} samples of {manifest}")
    raw = json.loads(lines[index])
    parse_sample(raw)  # validates the whole sample, naming the offending field
    messages = list(raw["messages"])
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns or assistant_turns[-1] == 0:
        raise ValueError(f"{manifest} sample {index}: no assistant turn after some context to generate")
    last = assistant_turns[-1]

    def codes_of(selected: list[dict]) -> list[np.ndarray]:
        sample = parse_sample({"messages": selected})
        return [
            read_codes(resolve_codes_path(manifest, item.codes_path))
            for message in sample.messages
            for item in message.items
            if isinstance(item, AudioItem)
        ]

    return HeldOutPrompt(
        messages=messages[:last],
        context_codes=codes_of(messages[:last]),
        reference_codes=codes_of(messages[: last + 1])[len(codes_of(messages[:last])) :],
    )


def code_accuracy(generated: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """Share of the reference's codes reproduced at the same (codebook, frame); frames generated beyond
    the reference, or missing from it, count as wrong: matches / (K * max(T_generated, T_reference)).

    Args:
        generated: [K, T_generated]; reference: [K, T_reference].
    """
    generated, reference = torch.as_tensor(generated), torch.as_tensor(reference)
    if generated.shape[0] != reference.shape[0]:
        raise ValueError(
            f"codebook counts differ: generated {tuple(generated.shape)}, reference {tuple(reference.shape)}"
        )
    overlap = min(generated.shape[1], reference.shape[1])
    matches = (generated[:, :overlap].long() == reference[:, :overlap].long()).sum().item()
    return matches / (reference.shape[0] * max(generated.shape[1], reference.shape[1], 1))


def held_out_speech_prompts(manifest: str | Path, count: int) -> list[HeldOutPrompt]:
    """The first ``count`` samples of ``manifest`` whose answer (last assistant turn) is speech, in file
    order; samples answered with text only are passed over.

    Raises:
        ValueError: the manifest has fewer than ``count`` such samples.
    """
    with open(manifest, encoding="utf-8") as f:
        num_samples = sum(1 for line in f if line.strip())
    prompts = []
    for index in range(num_samples):
        if len(prompts) == count:
            break
        held_out = held_out_prompt(manifest, index)
        if held_out.reference_codes:
            prompts.append(held_out)
    if len(prompts) < count:
        raise ValueError(
            f"{manifest} has {len(prompts)} samples answered with speech, {count} were asked for"
        )
    return prompts
