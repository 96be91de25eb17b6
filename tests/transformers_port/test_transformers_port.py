"""higgs_tune against transformers' HiggsAudioV2 port (second test virtualenv, transformers >= 5.3).

Same random weights on both sides (a checkpoint Boson's own code saved, loaded by higgs_tune and converted
by tools/convert.py for transformers), samples built by transformers' own processor (port_testing.py says
how, and why its audio tokenizer is a tiny DAC).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from port_testing import (
    SYSTEM,
    TINY_TOKENIZER,
    batch_from_port_inputs,
    boson_and_transformers_checkpoints,
    conversations,
    load_processor,
    load_transformers_model,
    process,
    tiny_dac,
)

from higgs_tune.data.batch import IGNORE_INDEX, PackingSpec
from higgs_tune.data.chatml import tokenize_sample
from higgs_tune.data.document import AudioLayout, build_document
from higgs_tune.data.packer import collate_rows
from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.generation import GenerationTokens, build_prompt, generate
from higgs_tune.loss import AlignedLoss
from higgs_tune.models.higgs_audio.checkpoint import load_hf_checkpoint

NUM_CODEBOOKS, CODEBOOK_VOCAB = 8, 1026


def model_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The processor outputs transformers' model takes (no labels)."""
    keys = ("input_ids", "attention_mask", "audio_input_ids", "audio_input_ids_mask")
    return {key: inputs[key] for key in keys}


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    """(our model from the Boson-layout dir, transformers' model, processor, transformers dir)."""
    tmp_path = tmp_path_factory.mktemp("port")
    dac_dir = tiny_dac(tmp_path / "dac")
    boson_dir, transformers_dir = boson_and_transformers_checkpoints(tmp_path, dac_dir)
    ours = load_hf_checkpoint(boson_dir, dtype=torch.float32).eval()
    theirs = load_transformers_model(transformers_dir)
    return ours, theirs, load_processor(transformers_dir, dac_dir), transformers_dir


def test_export_is_complete_for_transformers(port):
    """Config fields as transformers' conversion writes them; weights load with and without the text head
    (load_transformers_model asserts no missing/unexpected/mismatched keys)."""
    ours, theirs, processor, transformers_dir = port
    config = json.loads((transformers_dir / "config.json").read_text())
    assert config["model_type"] == "higgs_audio_v2"
    assert config["codebook_size"] == CODEBOOK_VOCAB  # stream BOS/EOS included
    tokenizer = HiggsTokenizer.from_path(TINY_TOKENIZER)
    assert config["audio_token_id"] == tokenizer.special.audio_out
    assert config["audio_bos_token_id"] == tokenizer.special.audio_out_bos
    assert config["audio_delay_token_id"] == tokenizer.token_to_id("<|reserved_special_token_6|>")
    assert theirs.text_lm_head is not None
    assert torch.equal(theirs.text_lm_head.weight, ours.audio_decoder_proj.text_lm_head.weight)
    from transformers import HiggsAudioV2ForConditionalGeneration

    _, info = HiggsAudioV2ForConditionalGeneration.from_pretrained(transformers_dir, output_loading_info=True)
    assert not any(info.values()), info  # without use_text_head its text_lm_head.weight is ignored by design
    assert processor.audio_token_id == tokenizer.special.audio_out
    assert processor.audio_delay_token_id == config["audio_delay_token_id"]


@pytest.mark.parametrize("kind", ["tts", "voice_cloning", "audio_in"])
def test_logits_match_transformers(port, kind):
    """transformers' model and ours on the processor's sample: audio logits and text logits at every
    position (fp32, 1e-4)."""
    ours, theirs, processor, _ = port
    inputs = process(processor, conversations()[kind])
    with torch.no_grad():
        out = theirs(**model_inputs(inputs))
        their_text = theirs.text_lm_head(theirs.model(**model_inputs(inputs)).last_hidden_state)
        batch = batch_from_port_inputs(inputs, processor.audio_token_id, processor.audio_delay_token_id)
        mine = ours.forward_full(batch)
    their_audio = out.logits.unflatten(-1, (NUM_CODEBOOKS, CODEBOOK_VOCAB))  # [1, L, K, C]
    audio_positions = batch["audio_out_mask"][0]
    assert audio_positions.sum() == inputs["audio_input_ids_mask"].sum()
    torch.testing.assert_close(mine.audio_logits, their_audio, atol=1e-4, rtol=0)
    torch.testing.assert_close(mine.text_logits, their_text, atol=1e-4, rtol=0)
    # not vacuous: the audio positions' logits differ from the text positions' ones
    assert audio_positions.any() and (~audio_positions).any()


def our_document(processor, conversation, start_index=None):
    """The same conversation through OUR pipeline (Boson's ChatML): codes from the processor's audio
    tokenizer, one code file per audio item; returns (document, tokens of transformers' processor)."""
    tokenizer = HiggsTokenizer.from_path(TINY_TOKENIZER)
    messages, codes = [], []
    for message in conversation:
        if message["role"] == "scene":
            continue  # Boson's ChatML has no scene turn; used only in test_audio_in_layout_differs
        content = []
        for item in message["content"]:
            if item["type"] == "text":
                content.append({"type": "text", "text": item["text"]})
            else:
                wav = torch.from_numpy(item["audio"])[None, None]
                codes.append(processor.audio_tokenizer.encode(wav).audio_codes[0].numpy())
                content.append({"type": "audio", "audio_codes": f"{len(codes)}.npy"})
        messages.append({"role": message["role"], "content": content})
    sample = {"messages": messages}
    if start_index is not None:
        sample["start_index"] = start_index
    document = build_document(tokenize_sample(sample, tokenizer), codes, AudioLayout())
    return document


@pytest.mark.parametrize("kind", ["tts", "voice_cloning"])
def test_same_sequence_as_our_pipeline(port, kind):
    """For TTS and voice cloning our ChatML pipeline gives transformers' processor's token sequence and
    codes, except that the port writes the last K-1 columns of a segment as <|reserved_special_token_6|>
    (delay placeholder) where Boson and we write <|AUDIO_OUT|>; the model replaces both by the codes."""
    _, _, processor, _ = port
    conversation = conversations()[kind]
    inputs = process(processor, conversation)
    document = our_document(processor, conversation)
    theirs = inputs["input_ids"][0].clone()
    theirs[theirs == processor.audio_delay_token_id] = processor.audio_token_id
    assert document.tokens.tolist() == theirs.tolist()
    codes = inputs["audio_input_ids"][inputs["audio_input_ids_mask"]].T  # [K, N_audio]
    assert torch.equal(document.audio_codes[:, document.audio_out_mask], codes)


def test_audio_in_layout_differs(port):
    """Pinned: transformers' chat template accepts input audio only in the scene, as AUDIO-OUT columns
    (<|audio_out_bos|> <|AUDIO_OUT|>... <|audio_eos|>, audio FFN, labelled like speech to generate) and
    refuses audio in user turns; Boson's layout writes input audio as <|audio_bos|> <|AUDIO|>...
    <|audio_eos|> (audio-in, never a target)."""
    _, _, processor, _ = port
    inputs = process(processor, conversations()["audio_in"])
    tokenizer = HiggsTokenizer.from_path(TINY_TOKENIZER)
    ids = inputs["input_ids"][0].tolist()
    assert tokenizer.special.audio_in not in ids and tokenizer.special.audio_bos not in ids
    scene_end = ids.index(tokenizer.token_to_id("<|scene_desc_end|>"))
    assert ids[:scene_end].count(tokenizer.special.audio_out_bos) == 1
    assert (inputs["audio_labels"][0, : inputs["audio_input_ids_mask"].sum()] != IGNORE_INDEX).any()
    user_audio = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": conversations()["tts"][2]["content"]},
    ]
    with pytest.raises(Exception, match="User messages cannot contain audio"):
        process(processor, user_audio)


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """transformers' ForCausalLMLoss: logits [L, V] at t against labels [L] at t+1, mean over valid."""
    logits, labels = logits[:-1].float(), labels[1:]
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX), int((labels != IGNORE_INDEX).sum())


def test_training_loss_differences(port):
    """transformers' own training loss (labels from its processor, output_labels=True) against ours.

    Pinned findings (README, comparison with the port):
    1. its loss is the SUM over the 8 codebooks of per-codebook means (shift inside loss_function), plus
       the text CE; Boson's reference (and our default) takes the mean over codebooks;
    2. its processor sets stream BOS (1024) and stream EOS (1025) labels to -100: the delay-pattern
       BOS fill is never a target in either, but the stream EOS that ends each codebook (the stop signal
       of generation) is never trained by the port, while we train it;
    3. every audio segment is labelled, the voice-cloning reference clip included (our start_index leaves
       it untrained);
    4. its text labels keep the K-1 delay placeholders of every segment as targets; ours never do.
    """
    ours, theirs, processor, _ = port
    conversation = conversations()["voice_cloning"]
    inputs = process(processor, conversation)
    with torch.no_grad():
        audio_only = theirs(**model_inputs(inputs), audio_labels=inputs["audio_labels"]).loss
        full = ours.forward_full(
            batch_from_port_inputs(inputs, processor.audio_token_id, processor.audio_delay_token_id)
        )
    audio_positions = (inputs["input_ids"][0] == processor.audio_token_id) | (
        inputs["input_ids"][0] == processor.audio_delay_token_id
    )
    their_labels = torch.full((NUM_CODEBOOKS, audio_positions.shape[0]), IGNORE_INDEX)
    their_labels[:, audio_positions] = inputs["audio_labels"][inputs["audio_input_ids_mask"]].T
    per_codebook = [shifted_ce(full.audio_logits[0, :, k], their_labels[k])[0] for k in range(NUM_CODEBOOKS)]
    # 1. the sum of per-codebook shifted means, reproduced from OUR logits
    torch.testing.assert_close(audio_only, torch.stack(per_codebook).sum(), atol=1e-5, rtol=0)

    # Our targets of the same sample (the reference turn untrained by start_index=3).
    document = our_document(processor, conversation, start_index=3)
    our_targets = document.audio_targets  # [K, L] label of column t+1 at t
    their_targets = torch.full_like(their_labels, IGNORE_INDEX)
    their_targets[:, :-1] = their_labels[:, 1:]  # the same convention: target at t
    ours_set = our_targets != IGNORE_INDEX
    theirs_set = their_targets != IGNORE_INDEX
    out_positions = torch.nonzero(audio_positions).flatten()
    segment_starts = [int(p) for p in out_positions if not audio_positions[p - 1]]
    assert len(segment_starts) == 2  # the reference clip and the answer
    answer = torch.zeros_like(audio_positions)
    answer[segment_starts[1] - 1 :] = True  # from the answer's <|audio_out_bos|> on
    # 2. in the answer: ours = theirs + exactly one stream-EOS target per codebook
    extra = ours_set & ~theirs_set & answer
    assert not (theirs_set & ~ours_set & answer).any()
    assert extra.sum(1).tolist() == [1] * NUM_CODEBOOKS
    assert (our_targets[extra] == 1025).all()
    assert not (our_targets[ours_set] == 1024).any() and not (their_targets[theirs_set] == 1024).any()
    # 3. the reference clip: trained by the port, not by us
    assert theirs_set[:, ~answer].any() and not ours_set[:, ~answer].any()
    # Our aligned loss (Boson's mean over codebooks) differs; the sum over the port's targets agrees.
    spec = PackingSpec(seq_len=len(document), batch_size=1)
    batch = collate_rows([[document]], spec, pad_id=HiggsTokenizer.from_path(TINY_TOKENIZER).special.pad)
    batch_port_targets = dict(batch, audio_targets=their_targets[None])
    batch_port_targets["num_audio_targets"] = theirs_set.sum(1)[None]
    batch_port_targets["audio_target_index"] = torch.arange(len(document))[None]  # every position
    with torch.no_grad():
        ours_out = ours(batch_port_targets)
    summed = AlignedLoss(text_weight=0.0, codebook_reduction="sum")(ours_out, batch_port_targets)
    torch.testing.assert_close(summed.audio_loss, audio_only, atol=1e-5, rtol=0)
    with torch.no_grad():
        ours_default = AlignedLoss()(ours(batch), batch)
    assert not torch.isclose(ours_default.audio_loss, audio_only, atol=1e-3)

    # 4. text labels around speech
    text_labels = inputs["labels"][0]
    assert (text_labels == processor.audio_delay_token_id).sum() == 2 * (NUM_CODEBOOKS - 1)
    assert not (document.text_targets == processor.audio_delay_token_id).any()


def test_transformers_generate_speaks_our_greedy_codes(port):
    """transformers' own generate (greedy, its delay-pattern logits processor, the exported generation
    config) on the export gives the columns of our greedy generation with Boson's protocol."""
    ours, theirs, processor, _ = port
    conversation = conversations()["tts"][:2]
    inputs = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    num_columns = 12
    with torch.no_grad():
        their_columns = theirs.generate(**inputs, max_new_tokens=num_columns, do_sample=False)[0]  # [N, K]
    tokenizer = HiggsTokenizer.from_path(TINY_TOKENIZER)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "a b c"}]
    prompt = build_prompt(messages, tokenizer, AudioLayout(), [], force_audio=True)
    assert prompt.tokens.tolist() == inputs["input_ids"][0].tolist()
    result = generate(
        ours, prompt, GenerationTokens.from_tokenizer(tokenizer, ours.args), max_new_columns=num_columns
    )
    our_columns = result.audio_columns[0].T  # [N, K], first column all stream BOS
    assert our_columns.shape[0] == num_columns
    assert torch.equal(our_columns, their_columns[:num_columns])
    assert (our_columns[-1] < 1024).all()  # past the delay ramp: real codes in every codebook
