"""Generation (``higgs_tune.generation``) against Boson's inference code.

Oracles:

- Boson's ``HiggsAudioModel.generate`` (greedy, KV cache, as the serve engine runs it) on the same weights
  (our export -> ``from_pretrained``): equal audio columns and equal text ids up to and including the
  ``<|audio_eos|>`` that closes the generated segment. After that point Boson's cached generate is NOT
  comparable: with a KV cache it never feeds the segment's LAST column (the all-EOS column) to the model,
  since the step that sampled it switches to text mode and feeds only ``<|audio_eos|>``. Its context after
  a segment therefore lacks one column compared with the training layout (where that column is present and
  predicts ``<|audio_eos|>``). We keep the training layout.
- A step-by-step loop over Boson's ``forward`` on the FULL prefix (no cache), choosing audio columns with
  Boson's own ``_sample_audio_tokens`` (delay and EOS rules from Boson's code): equal everything, greedy
  and sampled with the same seeded generator.

Both of our drivers are held to these oracles: the KV-cached one (default) and the cache-free reference
(``use_cache=False``); repetition-aware sampling (``ras_win_len``) on a model built to repeat.

The tiny model gets a planted end of speech (see :func:`plant_end_of_speech`) so that a segment really
ends inside the <= 40 generated columns.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from higgs_tune import generation
from higgs_tune.data.chatml import parse_sample
from higgs_tune.data.document import segment_input_codes
from higgs_tune.generation import (
    DelayState,
    GenerationError,
    SamplingConfig,
    build_prompt,
    force_delay_pattern,
    generate,
    revert_delay_pattern,
    segment_codes,
    warp_logits,
)
from higgs_tune.models.higgs_audio.builders import higgs_audio_tiny
from higgs_tune.models.higgs_audio.checkpoint import save_model
from higgs_tune.models.kv_cache import KVCache

pytest.importorskip("transformers")
pytest.importorskip("boson_multimodal")
from boson_generation import (  # noqa: E402
    BOS,
    EOS,
    LAYOUT,
    TOKENIZER,
    TOKENS,
    K,
    boson_full_prefix_generate,
    boson_generate_speech,
    boson_prompt_inputs,
)
from boson_multimodal.model.higgs_audio import HiggsAudioModel as BosonModel  # noqa: E402
from boson_multimodal.model.higgs_audio import utils as boson_utils  # noqa: E402
from generation_testing import (  # noqa: E402
    generate_seeded,
    plant_end_of_speech,
    plant_repetition,
    random_codes,
    silence_placeholders,
    text_prompt,
    voice_clone_prompt,
)
from transformers import GenerationConfig, LogitsProcessorList  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

MAX_NEW_COLUMNS = 30


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(1234)
    ours = higgs_audio_tiny(dtype=torch.float32).eval()
    plant_end_of_speech(ours)
    silence_placeholders(ours)
    export = save_model(ours, tmp_path_factory.mktemp("gen") / "hf")
    boson = BosonModel.from_pretrained(str(export), attn_implementation="eager").eval()
    return ours, boson


PROMPTS = {"text": text_prompt, "voice_clone": voice_clone_prompt}


def record_step_logits(monkeypatch) -> list[torch.Tensor]:
    """Record the logits every generation step chooses from (text [V] or audio [K * C]), in step order."""
    recorded: list[torch.Tensor] = []
    accept = generation._PromptDecoder.accept

    def recording_accept(self, text_logits, audio_logits):
        recorded.append((audio_logits if self.head == "audio" else text_logits).flatten().cpu())
        accept(self, text_logits, audio_logits)

    monkeypatch.setattr(generation._PromptDecoder, "accept", recording_accept)
    return recorded


def unmerge(tokens: torch.Tensor, audio: torch.Tensor) -> list[int]:
    """Merged tokens [S] with audio mask [S] -> one placeholder per audio run (Boson's input_ids)."""
    ids = []
    for i, (token, is_audio) in enumerate(zip(tokens.tolist(), audio.tolist())):
        if is_audio and i > 0 and audio[i - 1]:
            continue
        ids.append(token)
    return ids


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_prompt_layout_is_the_serve_engine_prompt(name):
    messages, codes = PROMPTS[name]()
    for force_audio in (False, True):
        prompt = build_prompt(messages, TOKENIZER, LAYOUT, codes, force_audio=force_audio)
        boson = boson_prompt_inputs(messages, codes, force_audio)
        audio = prompt.audio_in_mask | prompt.audio_out_mask
        assert unmerge(prompt.tokens, audio) == boson["input_ids"][0].tolist()
        assert torch.equal(prompt.audio_codes[:, prompt.audio_in_mask], boson["audio_in_ids"].reshape(K, -1))
        assert torch.equal(
            prompt.audio_codes[:, prompt.audio_out_mask], boson["audio_out_ids"].reshape(K, -1)
        )


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "full_prefix"])
@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_greedy_generation_equals_boson(models, name, use_cache, monkeypatch):
    ours, boson = models
    messages, codes = PROMPTS[name]()
    prompt = build_prompt(messages, TOKENIZER, LAYOUT, codes, force_audio=True)
    recorded = record_step_logits(monkeypatch)
    result = generate(ours, prompt, TOKENS, max_new_columns=MAX_NEW_COLUMNS, use_cache=use_cache)
    inputs = boson_prompt_inputs(messages, codes, force_audio=True)

    # The planted end of speech: one complete segment of 2K + 1 columns, K - 1 codes per codebook.
    assert len(result.audio_columns) >= 1
    first = result.audio_columns[0]
    assert first.shape == (K, 2 * K + 1)
    assert first[0, K + 1] == EOS and first[: K - 1, -1].tolist() == [EOS] * (K - 1)
    assert result.audio_codes[0].shape == (K, K)
    assert result.text_ids[:2].tolist() == [TOKENS.audio_out, TOKENS.audio_eos]

    # 1. Boson's own generate (KV cache, greedy): same columns, same text through <|audio_eos|>.
    speech = boson_generate_speech(boson, messages, codes, max_new_tokens=MAX_NEW_COLUMNS)
    assert torch.equal(speech.columns, first)
    assert speech.text_ids[:2] == result.text_ids[:2].tolist()
    assert torch.equal(speech.codes, result.audio_codes[0])

    # 2. Boson's forward on the full prefix, step by step: everything equal, to the last step, and the
    # logits of every step close (the context layout itself, not only the argmax).
    text, segments, boson_logits = boson_full_prefix_generate(
        boson, inputs, MAX_NEW_COLUMNS, do_sample=False, processors=LogitsProcessorList(), generator=None
    )
    assert text == result.text_ids.tolist()
    assert len(recorded) == len(boson_logits)
    for step, (mine, theirs) in enumerate(zip(recorded, boson_logits)):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")
    assert len(segments) == len(result.audio_columns)
    for theirs, mine in zip(segments, result.audio_columns):
        assert torch.equal(theirs, mine)
    assert result.num_steps == MAX_NEW_COLUMNS or result.stopped_by == "stop_token"


def test_sampled_generation_equals_boson_with_the_same_generator(models):
    ours, boson = models
    messages, codes = voice_clone_prompt()
    sampling = SamplingConfig(greedy=False, temperature=0.8, top_k=50, top_p=0.9)
    prompt = build_prompt(messages, TOKENIZER, LAYOUT, codes, force_audio=True)
    result = generate_seeded(ours, prompt, sampling, 7)
    processors = LogitsProcessorList(
        [TemperatureLogitsWarper(0.8), TopKLogitsWarper(50), TopPLogitsWarper(0.9)]
    )
    text, segments, _ = boson_full_prefix_generate(
        boson,
        boson_prompt_inputs(messages, codes, force_audio=True),
        30,
        do_sample=True,
        processors=processors,
        generator=torch.Generator().manual_seed(7),
    )
    assert text == result.text_ids.tolist()
    assert [s.tolist() for s in segments] == [c.tolist() for c in result.audio_columns]
    # Boson's own generate (KV cache) seeded alike: the same first segment and text through <|audio_eos|>
    speech = boson_generate_speech(
        boson, messages, codes, 30, do_sample=True, seed=7, temperature=0.8, top_k=50, top_p=0.9
    )
    assert torch.equal(speech.columns, result.audio_columns[0])
    assert speech.text_ids[:2] == result.text_ids[:2].tolist() == [TOKENS.audio_out, TOKENS.audio_eos]
    # sampling really sampled: another seed gives other codes
    other = generate_seeded(ours, prompt, sampling, 8)
    assert [c.tolist() for c in other.audio_columns] != [c.tolist() for c in result.audio_columns]


@pytest.fixture(scope="module")
def repeating_models(tmp_path_factory):
    """Ours and Boson's copy of a tiny model whose every codebook favours code 5 (it repeats)."""
    torch.manual_seed(1234)
    ours = higgs_audio_tiny(dtype=torch.float32).eval()
    silence_placeholders(ours)
    plant_repetition(ours, code=5)
    export = save_model(ours, tmp_path_factory.mktemp("ras") / "hf")
    return ours, BosonModel.from_pretrained(str(export), attn_implementation="eager").eval()


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_repetition_aware_sampling_equals_boson(repeating_models, greedy):
    ours, boson = repeating_models
    messages, codes = voice_clone_prompt()
    prompt = build_prompt(messages, TOKENIZER, LAYOUT, codes, force_audio=True)
    warpers = {} if greedy else {"temperature": 0.8, "top_k": 50}
    sampling = SamplingConfig(greedy=greedy, ras_win_len=7, **warpers)
    result = generate_seeded(ours, prompt, sampling, 3)
    columns = result.audio_columns[0]
    # built to repeat: greedy without RAS gives 5 for every code after the delay; RAS redraws some of them
    plain = generate(ours, prompt, TOKENS, max_new_columns=30)
    started = plain.audio_columns[0][:, 1:][plain.audio_columns[0][:, 1:] != BOS]
    assert set(started.tolist()) == {5}
    redrawn = int(((columns != 5) & (columns != BOS)).sum())
    assert redrawn >= 10, columns

    # 1. Boson's own generate (KV cache) with ras_win_len=7 and the same seed: the same columns
    speech = boson_generate_speech(
        boson, messages, codes, 30, do_sample=not greedy, ras_win_len=7, seed=3, top_p=1.0, **warpers
    )
    assert torch.equal(speech.columns, columns)
    assert speech.text_ids == result.text_ids.tolist()
    # 2. Boson's step-by-step protocol on the full prefix with its RAS: the same everything
    processors = LogitsProcessorList([] if greedy else [TemperatureLogitsWarper(0.8), TopKLogitsWarper(50)])
    text, segments, _ = boson_full_prefix_generate(
        boson,
        boson_prompt_inputs(messages, codes, force_audio=True),
        30,
        do_sample=not greedy,
        processors=processors,
        generator=torch.Generator().manual_seed(3),
        ras_win_len=7,
    )
    assert text == result.text_ids.tolist()
    assert [s.tolist() for s in segments] == [c.tolist() for c in result.audio_columns]


def test_warpers_equal_transformers():
    logits = torch.randn(8, 1026, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in [(1.0, None, None), (0.7, 50, None), (1.3, None, 0.8), (0.5, 5, 0.95)]:
        processors = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        processors += [TopKLogitsWarper(top_k)] if top_k else []
        processors += [TopPLogitsWarper(top_p)] if top_p else []
        expected = LogitsProcessorList(processors)(None, logits.clone())
        mine = warp_logits(
            logits.clone(), SamplingConfig(greedy=False, temperature=temperature, top_k=top_k, top_p=top_p)
        )
        assert torch.equal(torch.isinf(mine), torch.isinf(expected))
        torch.testing.assert_close(mine[~torch.isinf(mine)], expected[~torch.isinf(expected)])


def test_delay_and_eos_forcing_equal_boson_sample_audio_tokens(models):
    """Random columns with EOS planted at random codebooks and columns, through a whole segment."""
    _, boson = models
    config = GenerationConfig()
    config.generation_kwargs = {"audio_eos_token_id": TOKENS.audio_eos}
    rng = np.random.default_rng(0)
    for trial in range(200):
        state, boson_delay, boson_remaining = DelayState(), 0, None
        history = torch.full((K, 1), BOS, dtype=torch.long)
        eos_column = int(rng.integers(1, 3 * K))
        for column_index in range(1, 4 * K):
            column = torch.from_numpy(rng.integers(0, LAYOUT.codebook_size, size=K))
            if column_index >= eos_column:
                rows = rng.choice(K, size=int(rng.integers(1, 3)), replace=False)
                column[rows] = EOS
            if rng.random() < 0.1:
                column[int(rng.integers(0, K))] = BOS  # the model may also pick BOS freely
            logits = torch.full((1, K, LAYOUT.codebook_size + 2), -5.0)
            logits[0, torch.arange(K), column] = 5.0
            next_tokens, boson_column, _, _, boson_delay, boson_remaining = boson._sample_audio_tokens(
                hidden_states=None,
                audio_logits=logits,
                audio_out_ids=history,
                do_sample=False,
                logits_processor=LogitsProcessorList(),
                device=torch.device("cpu"),
                torch_generator=None,
                generation_config=config,
                num_delay=boson_delay,
                num_remaining_delays=boson_remaining,
            )
            forced, state, ended = force_delay_pattern(column, state, BOS, EOS)
            assert torch.equal(forced, boson_column), (trial, column_index)
            assert ended == (int(next_tokens[0]) == TOKENS.audio_eos), (trial, column_index)
            history = torch.cat([history, forced[:, None]], dim=1)
            if ended:
                break
        else:
            raise AssertionError(f"trial {trial}: the segment never ended")


def test_segment_codes_round_trip_the_training_layout():
    codes = torch.from_numpy(random_codes(3, 11))
    columns = segment_input_codes(codes, LAYOUT)  # [K, T + K + 1], what training feeds and generation emits
    assert torch.equal(segment_codes(columns, LAYOUT.codebook_size), codes)
    assert torch.equal(revert_delay_pattern(columns), boson_utils.revert_delay_pattern(columns))


# ------------------------------------------------------------------- a model whose logits we control
class ScriptedModel(nn.Module):
    """Stands in for HiggsAudioModel: the logits at a position come from a script keyed by the length of
    the prefix ending there (its position id + 1), with and without KV cache.

    ``text_script[L]`` / ``audio_script[L]`` give the argmax text token / audio column [K] at the last
    position of an L-position prefix (unscripted lengths, e.g. idle rows: all-zero logits); every batch it
    sees is recorded.
    """

    def __init__(self, text_script: dict[int, int], audio_script: dict[int, list[int]]):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.text_script, self.audio_script = text_script, audio_script
        self.batches: list[dict] = []

    def new_kv_cache(self, batch_size, max_positions):
        return KVCache(0, 1, 1, batch_size, max_positions, "cpu", torch.float32)

    def hidden_states(self, batch, kv_cache=None):
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return (batch["input_pos"] + 1).float()[..., None]  # [B, L, 1]

    def _scripted(self, hidden, script, shape):
        lengths = hidden[..., 0].long()
        logits = torch.zeros(*lengths.shape, *shape)
        for index in np.ndindex(*lengths.shape):
            if int(lengths[index]) in script:
                chosen = torch.tensor(script[int(lengths[index])])
                logits[index].view(-1, shape[-1])[torch.arange(chosen.numel()), chosen.flatten()] = 1.0
        return logits

    def text_head(self, hidden):
        return self._scripted(hidden, self.text_script, (TOKENIZER.vocab_size,))

    def audio_head(self, hidden):
        return self._scripted(hidden, self.audio_script, (K, LAYOUT.codebook_size + 2))


def fed_positions(model: ScriptedModel, use_cache: bool) -> list[dict]:
    """What the model saw: without cache the whole prefix at every step; with it, one prefill and then
    one position per decode step (checked: slots follow the positions)."""
    if not use_cache:
        return model.batches
    prefill, *steps = model.batches
    assert torch.equal(prefill["input_pos"][0], torch.arange(prefill["tokens"].shape[1]))
    for offset, step in enumerate(steps):
        assert (
            step["tokens"].shape == (1, 1) and int(step["input_pos"]) == prefill["tokens"].shape[1] + offset
        )
    return [prefill] + steps


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "full_prefix"])
def test_delay_eos_and_audio_eos_forcing_on_a_scripted_model(use_cache):
    messages, _ = text_prompt()
    prompt = build_prompt(messages, TOKENIZER, LAYOUT)
    start = len(prompt)
    # step 1: text <|audio_out_bos|>; step 2: forced BOS column (no model call); then audio columns
    # sampled at lengths start+2 ...; codebook 2 emits EOS in the 6th sampled column (and codebook 5
    # too, which the delay forces to BOS anyway); after <|audio_eos|> the text head says <|eot_id|>.
    codes = [[100 + 10 * c + k for k in range(K)] for c in range(12)]
    codes[5][2] = EOS
    codes[5][5] = EOS
    codes[10][K - 1] = EOS  # the last codebook ends on its own (the rules never force it)
    audio_script = {start + 2 + c: codes[c] for c in range(12)}
    eot = TOKENIZER.token_to_id("<|eot_id|>")
    text_script = {start: TOKENS.audio_out_bos}
    model = ScriptedModel(text_script, audio_script)
    # sampled columns 1..6, then K-1-2 = 5 closing columns -> 12 columns; <|audio_eos|> forced with the last
    segment_length = 1 + 6 + (K - 1 - 2)
    text_script[start + 1 + segment_length + 1] = eot
    result = generate(model, prompt, TOKENS, max_new_columns=50, use_cache=use_cache)

    columns = result.audio_columns[0]
    expected = torch.full((K, segment_length), BOS, dtype=torch.long)
    for c in range(1, segment_length):
        for k in range(K):
            if k >= c:
                expected[k, c] = BOS  # delay: codebook k's first code comes at column k + 1
            elif c == 6 and k <= 2:
                expected[k, c] = EOS  # lowest EOS codebook 2 -> rows 0..2 EOS
            elif c > 6 and k < K - (K - 1 - 2 - (c - 7)):
                expected[k, c] = EOS  # closing columns: one more row of EOS each
            else:
                expected[k, c] = codes[c - 1][k]
    assert columns.tolist() == expected.tolist()
    assert columns[:, -1].tolist() == [EOS] * K
    assert result.text_ids.tolist() == [TOKENS.audio_out_bos, TOKENS.audio_out, TOKENS.audio_eos, eot]
    assert result.stopped_by == "stop_token"
    assert result.num_steps == 1 + segment_length + 1
    # codes for the decoder: delay reverted, BOS and EOS columns dropped
    assert torch.equal(result.audio_codes[0], segment_codes(columns, LAYOUT.codebook_size))
    # the model saw the whole sequence but its final <|eot_id|>: the segment's last column, then <|audio_eos|>
    seen = fed_positions(model, use_cache)
    tokens = seen[-1]["tokens"][0] if not use_cache else torch.cat([b["tokens"][0] for b in seen])
    audio_out = (
        torch.cat([b["audio_out_mask"][0] for b in seen]) if use_cache else seen[-1]["audio_out_mask"][0]
    )
    codes_seen = (
        torch.cat([b["audio_codes"][0] for b in seen], 1) if use_cache else seen[-1]["audio_codes"][0]
    )
    assert tokens.shape == (start + 1 + segment_length + 1,)
    assert audio_out.sum() == segment_length
    assert tokens[-1] == TOKENS.audio_eos
    assert torch.equal(codes_seen[:, start + 1 : start + 1 + segment_length], columns)
    # without cache: one call per model step (text steps and sampled columns), each with the full prefix;
    # with it: one prefill, then one decode call per position
    assert len(model.batches) == (
        1 + (segment_length - 1) + 1 if not use_cache else 1 + 1 + segment_length + 1
    )


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "full_prefix"])
def test_generation_stops_at_max_new_columns_and_rejects_bare_placeholders(use_cache):
    messages, _ = text_prompt()
    prompt = build_prompt(messages, TOKENIZER, LAYOUT, force_audio=True)
    start = len(prompt)
    model = ScriptedModel({}, {start + 1 + c: [7] * K for c in range(10)})
    result = generate(model, prompt, TOKENS, max_new_columns=5, use_cache=use_cache)
    assert result.stopped_by == "max_new_columns" and result.num_steps == 5
    assert result.audio_columns[0].shape == (K, 5)
    assert result.text_ids.tolist() == [TOKENS.audio_out]

    bad = ScriptedModel({len(build_prompt(messages, TOKENIZER, LAYOUT)): TOKENS.audio_out}, {})
    with pytest.raises(GenerationError, match="placeholder"):
        generate(
            bad, build_prompt(messages, TOKENIZER, LAYOUT), TOKENS, max_new_columns=3, use_cache=use_cache
        )


def test_prompt_ending_with_an_assistant_turn_keeps_its_eot():
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]
    prompt = build_prompt(messages, TOKENIZER, LAYOUT)
    boson = boson_prompt_inputs(messages, [], force_audio=False)
    assert prompt.tokens.tolist() == boson["input_ids"][0].tolist()
    assert parse_sample({"messages": messages})  # the messages themselves are a valid sample
