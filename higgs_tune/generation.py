"""Generation of text and audio codes with Boson's inference protocol (spec §7), on OUR model.

The protocol is the one of ``HiggsAudioModel.generate`` / ``_sample`` in ``boson_multimodal`` (serve engine
and ``examples/generation.py``), step by step:

- prompt = the ``prepare_chatml_sample`` layout of the messages + ``<|start_header_id|>assistant
  <|end_header_id|>\\n\\n`` (+ ``<|audio_out_bos|>`` to force speech), built with
  :mod:`higgs_tune.data.chatml` / :mod:`higgs_tune.data.document` (audio items merged as code columns);
- TEXT mode: the next text token comes from the text head at the last position;
- after a ``<|audio_out_bos|>``: a new audio segment starts with a forced all-BOS column (no model call is
  needed for it: Boson's forward at that step is discarded);
- AUDIO mode: each next column comes from the audio logits of the previous column, then
  :func:`force_delay_pattern` applies the delay and end-of-stream rules; when the stream has ended the
  text token ``<|audio_eos|>`` is forced;
- generation stops when the text head produces ``<|eot_id|>`` or ``<|end_of_text|>`` (kept in the
  output, as Boson keeps it) or after ``max_new_columns`` steps (one step = one text token or one audio
  column, Boson's ``max_new_tokens``).

Context after an audio segment: the segment's LAST column (the one whose sampling ended the stream) is
part of the prefix, followed by ``<|audio_eos|>`` -- the training layout (spec §5.4, §6.2: that column's
text logit is trained to predict ``<|audio_eos|>``) and what Boson's ``forward`` sees on the full prefix.
Boson's KV-cached ``generate`` never feeds that column (the step that samples it switches to text mode
and feeds only ``<|audio_eos|>``), so its text AFTER a segment can differ from ours; everything up to
and including that ``<|audio_eos|>`` is identical (tests/generation/test_generation.py).

Without the delay pattern (``use_delay_pattern`` false) Boson's protocol has no end-of-stream rule: a
segment then runs until ``max_new_columns``, here as there.

There is NO KV cache: every step re-runs the whole prefix (prompt + everything generated so far) as a
one-row packed batch of :mod:`higgs_tune.data.batch` and reads the heads at the last position only. That
costs O(L^2) per sequence: fine for tiny models and short prompts (tests, smoke checks, listening to a
checkpoint), not a serving engine.

Not implemented: Boson's repetition-aware sampling (RAS, ``ras_win_len``); results equal Boson's with
``ras_win_len=None``. Sampling uses the same warpers as transformers (temperature, then top-k, then top-p)
and one ``torch.multinomial`` call per step on the same shapes as Boson, so with the same seeded
generator the samples are the same.
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
from higgs_tune.models.higgs_audio.config import HiggsAudioModelArgs
from higgs_tune.models.higgs_audio.model import HiggsAudioModel

ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
STOP_TOKEN_NAMES = ("<|eot_id|>", "<|end_of_text|>")


class GenerationError(RuntimeError):
    """Generation cannot continue under Boson's protocol (names the offending token or setting)."""


# ------------------------------------------------------------------------------------------ sampling
@dataclass(frozen=True)
class SamplingConfig:
    """How the next token / code is chosen from logits.

    ``greedy=True``: argmax (transformers' ``do_sample=False``; the other fields are ignored). Otherwise
    sampling after the transformers warpers in their order: temperature, top-k (``None`` = off), top-p
    (``None`` or 1.0 = off).
    """

    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")


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

    def batch(self, pad_id: int) -> dict[str, torch.Tensor]:
        """The sequence as a one-row packed batch (capacities = L), targets all -100."""
        length = len(self)
        num_codebooks = self.audio_codes.shape[0]
        num_audio = int((self.audio_in_mask | self.audio_out_mask).sum())
        document = Document(
            tokens=self.tokens,
            audio_codes=self.audio_codes,
            audio_in_mask=self.audio_in_mask,
            audio_out_mask=self.audio_out_mask,
            text_targets=torch.full((length,), IGNORE_INDEX, dtype=torch.long),
            audio_targets=torch.full((num_codebooks, length), IGNORE_INDEX, dtype=torch.long),
            stats=DocStats(length, length - num_audio, num_audio, 0, 0),
        )
        spec = PackingSpec(seq_len=length, batch_size=1, num_codebooks=num_codebooks)
        return collate_rows([[document]], spec, pad_id)


# --------------------------------------------------------------------------------------- generation
@dataclass
class GenerationOutput:
    """What :func:`generate` produced.

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


def _last_hidden(
    model: HiggsAudioModel, sequence: _Sequence, pad_id: int, device: torch.device
) -> torch.Tensor:
    """Run the whole prefix; the residual stream at its last position: [1, H] (the heads apply the norm)."""
    batch = {name: value.to(device) for name, value in sequence.batch(pad_id).items()}
    return model.hidden_states(batch)[:, -1]


@torch.no_grad()
def generate(
    model: HiggsAudioModel,
    prompt: Document,
    tokens: GenerationTokens,
    *,
    max_new_columns: int,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Generate text and audio after ``prompt`` with Boson's protocol (module docstring).

    Args:
        model: our model (any device/dtype; put it in eval mode).
        prompt: from :func:`build_prompt`; must end with a text token.
        tokens: ids from :meth:`GenerationTokens.from_tokenizer`.
        max_new_columns: at most this many decoding steps (one text token or one audio column each).
        sampling: greedy or sampled choice, for text and audio alike.
        generator: random generator for sampling (``torch.multinomial``), on the model's device.

    Returns:
        :class:`GenerationOutput` (tensors on the CPU).

    Raises:
        GenerationError: the prompt ends inside audio, or the text head produced an audio placeholder
            token (``<|AUDIO|>`` / ``<|AUDIO_OUT|>``) outside the ``<|audio_out_bos|>`` protocol.
    """
    if max_new_columns < 1:
        raise ValueError(f"max_new_columns must be >= 1, got {max_new_columns}")
    if bool(prompt.audio_in_mask[-1] | prompt.audio_out_mask[-1]):
        raise GenerationError("the prompt ends with an audio column; it must end with a text token")
    device = next(model.parameters()).device
    sequence = _Sequence(prompt)
    last_token = int(prompt.tokens[-1])
    text_ids: list[int] = []
    segments: list[list[torch.Tensor]] = []
    in_audio = False
    delay = DelayState()
    stopped_by: Literal["stop_token", "max_new_columns"] = "max_new_columns"
    step = 0
    while step < max_new_columns:
        step += 1
        if not in_audio and last_token == tokens.audio_out_bos:
            # AUDIO_INIT: <|AUDIO_OUT|> and an all-BOS first column, no sampling.
            column = torch.full((tokens.num_codebooks,), tokens.stream_bos, dtype=torch.long)
            sequence.append(tokens.audio_out, column)
            text_ids.append(tokens.audio_out)
            segments.append([column])
            in_audio, delay, last_token = True, DelayState(), tokens.audio_out
            continue
        hidden = _last_hidden(model, sequence, tokens.pad, device)  # [1, H]
        if in_audio:
            audio_logits = model.audio_head(hidden)[0]  # [K, C]
            column = choose_tokens(audio_logits, sampling, generator).cpu()  # [K]
            ended = False
            if tokens.use_delay_pattern:
                column, delay, ended = force_delay_pattern(
                    column, delay, tokens.stream_bos, tokens.stream_eos
                )
            sequence.append(tokens.audio_out, column)
            segments[-1].append(column)
            if ended:
                sequence.append(tokens.audio_eos, None)
                text_ids.append(tokens.audio_eos)
                in_audio, last_token = False, tokens.audio_eos
            continue
        text_logits = model.text_head(hidden)  # [1, V]
        token = int(choose_tokens(text_logits, sampling, generator)[0])
        if token in (tokens.audio_out, tokens.audio_in):
            raise GenerationError(
                f"the text head produced the audio placeholder id {token} at step {step}; audio starts "
                "only after <|audio_out_bos|> (is the checkpoint trained with this tokenizer?)"
            )
        sequence.append(token, None)
        text_ids.append(token)
        last_token = token
        if token in tokens.stop:
            stopped_by = "stop_token"
            break

    audio_columns = [torch.stack(columns, dim=1) for columns in segments]
    return GenerationOutput(
        text_ids=torch.tensor(text_ids, dtype=torch.long),
        audio_columns=audio_columns,
        audio_codes=[
            segment_codes(columns, tokens.codebook_size, tokens.use_delay_pattern)
            for columns in audio_columns
        ],
        stopped_by=stopped_by,
        num_steps=step,
    )


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
