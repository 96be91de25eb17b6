"""Generation with Boson's own model (``boson_multimodal``), the oracle of the generation tests.

Shared by tests/generation/test_generation.py (parity of ``higgs_tune.generation`` with Boson's protocol on
random models) and tests/recipes/test_demo_generation.py (the demo's trained export, spoken by Boson's
model). Every id comes from the project's tiny tokenizer and the tiny model's audio settings
(``tiny_model_args``: 8 codebooks of 1024 codes, stream BOS 1024 / EOS 1025, delay pattern on).

- :func:`boson_prompt_inputs`: the serve engine's prompt (``prepare_chatml_sample`` + assistant header
  [+ ``<|audio_out_bos|>``]) through Boson's collator.
- :func:`boson_generate_speech`: Boson's ``HiggsAudioModel.generate`` (KV cache; greedy, or sampled /
  repetition-aware with a seed), as the serve engine runs it; the first audio segment as decoder codes.
- :func:`boson_full_prefix_generate`: Boson's protocol step by step, ``forward`` on the whole prefix at
  every step (no cache), audio columns from Boson's ``_sample_audio_tokens`` (its RAS included).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample
from boson_multimodal.model.higgs_audio import utils as boson_utils
from transformers import GenerationConfig

from higgs_tune.data.document import AudioLayout
from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.generation import GenerationTokens
from higgs_tune.models.higgs_audio.builders import tiny_model_args

TINY_TOKENIZER = Path(__file__).resolve().parents[2] / "higgs_tune" / "assets" / "tiny_tokenizer"
TOKENIZER = HiggsTokenizer.from_path(TINY_TOKENIZER)
BOSON_TOKENIZER = transformers.PreTrainedTokenizerFast(tokenizer_file=str(TINY_TOKENIZER / "tokenizer.json"))
LAYOUT = AudioLayout()
K = LAYOUT.num_codebooks
BOS, EOS = LAYOUT.stream_bos_id, LAYOUT.stream_eos_id
TOKENS = GenerationTokens.from_tokenizer(TOKENIZER, tiny_model_args())


def boson_prompt_inputs(messages: list[dict], codes: list[np.ndarray], force_audio: bool) -> dict:
    """Boson's serve-engine prompt (prepare_chatml_sample + assistant header) through its collator
    (audio-in codes fed, as examples/generation.py and the config's encode_audio_in_tokens do).

    Args:
        messages: ChatML messages; audio items name their codes in ``audio_codes``.
        codes: raw codes [K, T_i] of every audio item of ``messages``, in order of appearance.
        force_audio: end the prompt with ``<|audio_out_bos|>``.

    Returns:
        ``input_ids`` [1, S], ``attention_mask`` [1, S], ``audio_in_ids`` [K, N_in], ``audio_in_ids_start``
        [n_in], ``audio_out_ids`` [K, N_out], ``audio_out_ids_start`` [n_out] (Boson's collator output).
    """
    boson_messages = copy.deepcopy(messages)
    for message in boson_messages:
        content = message["content"]
        for item in content if isinstance(content, list) else [content]:
            if isinstance(item, dict) and item.get("type") == "audio":
                item["audio_url"] = item.pop("audio_codes")
    input_tokens, _, audio_contents, _ = prepare_chatml_sample({"messages": boson_messages}, BOSON_TOKENIZER)
    postfix = "<|start_header_id|>assistant<|end_header_id|>\n\n" + (
        "<|audio_out_bos|>" if force_audio else ""
    )
    input_tokens = input_tokens + BOSON_TOKENIZER.encode(postfix, add_special_tokens=False)
    assert len(audio_contents) == len(codes)
    lengths = [c.shape[1] for c in codes]
    sample = ChatMLDatasetSample(
        input_ids=torch.tensor(input_tokens, dtype=torch.long),
        label_ids=None,
        audio_ids_concat=torch.from_numpy(np.concatenate(codes, axis=1)).long() if codes else None,
        audio_ids_start=torch.tensor(np.cumsum([0] + lengths[:-1]), dtype=torch.long) if codes else None,
        audio_waveforms_concat=None,
        audio_waveforms_start=None,
        audio_sample_rate=None,
        audio_speaker_indices=None,
    )
    collator = HiggsAudioSampleCollator(
        whisper_processor=None,
        audio_in_token_id=TOKENS.audio_in,
        audio_out_token_id=TOKENS.audio_out,
        pad_token_id=TOKENS.pad,
        audio_stream_bos_id=BOS,
        audio_stream_eos_id=EOS,
        encode_whisper_embed=False,
        return_audio_in_tokens=True,
        use_delay_pattern=True,
        audio_num_codebooks=K,
        round_to=1,
    )
    batch = asdict(collator([sample]))
    keys = "input_ids attention_mask audio_in_ids audio_in_ids_start audio_out_ids audio_out_ids_start"
    return {key: batch[key] for key in keys.split()}


@dataclass
class BosonSpeech:
    """What Boson's ``generate`` produced after a speech-forcing prompt.

    Attributes:
        text_ids: [n] the generated ``input_ids`` tail (``<|AUDIO_OUT|>``, ``<|audio_eos|>``, ...).
        columns: [K, N] the first generated audio segment with the delay pattern (first column all BOS).
        codes: [K, N - K - 1] that segment as the serve engine hands it to the audio decoder: delay
            reverted (Boson's ``revert_delay_pattern``), clipped to the codebook, BOS and EOS columns cut.
    """

    text_ids: list[int]
    columns: torch.Tensor
    codes: torch.Tensor


def boson_generate_speech(
    boson, messages: list[dict], codes: list[np.ndarray], max_new_tokens: int, **options
) -> BosonSpeech:
    """Speech for ``messages`` with Boson's ``HiggsAudioModel.generate`` (KV cache), the call the serve
    engine makes, after a prompt that forces speech (``<|audio_out_bos|>``): greedy with ``ras_win_len``
    off unless ``options`` (``generate`` keywords: ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``ras_win_len``, ``seed``, ...) say otherwise.

    Args:
        boson: a ``boson_multimodal`` ``HiggsAudioModel`` in eval mode.
        messages, codes: the prompt, as :func:`boson_prompt_inputs`.
        max_new_tokens: Boson's step budget (one text token or one audio column per step).
    """
    inputs = boson_prompt_inputs(messages, codes, force_audio=True)
    sequences, audio_sequences = boson.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        use_cache=True,
        eos_token_id=list(TOKENS.stop),
        pad_token_id=TOKENS.pad,
        **{"do_sample": False, **options},
    )
    columns = audio_sequences[0]
    decoder_codes = boson_utils.revert_delay_pattern(columns).clip(0, LAYOUT.codebook_size - 1)[:, 1:-1]
    return BosonSpeech(
        text_ids=sequences[0, inputs["input_ids"].shape[1] :].tolist(), columns=columns, codes=decoder_codes
    )


def boson_full_prefix_generate(
    boson, inputs: dict, max_new_columns: int, do_sample: bool, processors, generator, ras_win_len=None
) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
    """Boson's protocol (``_sample``) step by step, but every step runs ``forward`` on the WHOLE prefix
    (no cache); audio columns come from Boson's ``_sample_audio_tokens`` (its delay/EOS rules).

    Args:
        boson: a ``boson_multimodal`` ``HiggsAudioModel`` in eval mode.
        inputs: from :func:`boson_prompt_inputs`.
        max_new_columns: step budget (one text token or one audio column per step).
        do_sample: sample (else argmax) after ``processors`` (a transformers ``LogitsProcessorList``).
        generator: ``torch.Generator`` of the sampling.
        ras_win_len: Boson's repetition-aware sampling window (None: off; ``ras_win_max_num_repeat`` 2).

    Returns:
        (generated text ids, audio columns [K, N_i] per segment, the logits each step chose from: text
        [V] or audio [K * C], in step order).
    """
    step_logits: list[torch.Tensor] = []
    input_ids = inputs["input_ids"][0].tolist()
    prompt_length = len(input_ids)
    audio_out_ids = inputs["audio_out_ids"]
    if audio_out_ids.numel() == 0:
        audio_out_ids = torch.zeros(K, 0, dtype=torch.long)
    starts = inputs["audio_out_ids_start"].tolist()
    config = GenerationConfig()
    config.generation_kwargs = {"audio_eos_token_id": TOKENS.audio_eos, "ras_win_len": ras_win_len}
    segments: list[torch.Tensor] = []
    num_delay, num_remaining = 0, None
    for _ in range(max_new_columns):
        last = input_ids[-1]
        if last == TOKENS.audio_out_bos:
            column = torch.full((K, 1), BOS, dtype=torch.long)
            starts.append(audio_out_ids.shape[1])
            audio_out_ids = torch.cat([audio_out_ids, column], dim=1)
            segments.append(column)
            input_ids.append(TOKENS.audio_out)
            continue
        with torch.no_grad():
            out = boson(
                input_ids=torch.tensor([input_ids]),
                attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
                audio_in_ids=inputs["audio_in_ids"],
                audio_in_ids_start=inputs["audio_in_ids_start"],
                audio_out_ids=audio_out_ids,
                audio_out_ids_start=torch.tensor(starts, dtype=torch.long),
                use_cache=False,
            )
        if last == TOKENS.audio_out:
            step_logits.append(out.audio_logits[-1].flatten())
            next_tokens, column, _, _, num_delay, num_remaining = boson._sample_audio_tokens(
                hidden_states=None,
                audio_logits=out.audio_logits[-1:],
                audio_out_ids=audio_out_ids,
                do_sample=do_sample,
                logits_processor=processors,
                device=torch.device("cpu"),
                torch_generator=generator,
                generation_config=config,
                num_delay=num_delay,
                num_remaining_delays=num_remaining,
            )
            audio_out_ids = torch.cat([audio_out_ids, column[:, None]], dim=1)
            segments[-1] = torch.cat([segments[-1], column[:, None]], dim=1)
            if int(next_tokens[0]) != TOKENS.audio_out:
                input_ids.append(int(next_tokens[0]))
            continue
        step_logits.append(out.logits[0, -1])
        scores = processors(None, out.logits[:, -1].float())
        if do_sample:
            token = int(torch.multinomial(scores.softmax(-1), 1, generator=generator)[0, 0])
        else:
            token = int(scores.argmax(-1)[0])
        input_ids.append(token)
        if token in TOKENS.stop:
            break
    return input_ids[prompt_length:], segments, step_logits
