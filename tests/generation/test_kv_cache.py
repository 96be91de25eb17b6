"""The KV cache (``higgs_tune.models.kv_cache``) and the cached decoder (``higgs_tune.decoding``).

- Cached forward = full forward: a prompt prefilled, then the rest of the sequence fed one position at a
  time, gives the logits of one forward over the whole sequence at every position, for every layer kind
  (DualFFN, fast-forward, text-only) and with a FlexAttention model.
- Batched generation = one prompt at a time (greedy and sampled, each prompt with its own generator),
  with prompts of different lengths and a spare row.
- The compiled decode step compiles once per head set and never again across steps and prompts, and
  gives the eager codes.
- CUDA only: the CUDA-graph decode step gives the eager codes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch._dynamo import lookup_backend

from higgs_tune.data.batch import PackingSpec
from higgs_tune.data.document import DocStats, Document
from higgs_tune.data.packer import collate_rows
from higgs_tune.decoding import CachedDecoder
from higgs_tune.generation import (
    SamplingConfig,
    build_prompt,
    cache_positions_needed,
    generate,
    generate_batch,
)
from higgs_tune.models.higgs_audio.builders import higgs_audio_tiny

pytest.importorskip("transformers")
from boson_generation import LAYOUT, TOKENIZER, TOKENS, K  # noqa: E402
from generation_testing import (  # noqa: E402
    plant_end_of_speech,
    silence_placeholders,
    text_prompt,
    voice_clone_prompt,
)

LAYER_VARIANTS = {
    "dual_ffn": {},
    "fast_forward": {"num_layers": 3, "audio_dual_ffn_layers": (1,)},
    "text_only": {"audio_adapter_type": "stack"},
    "flex": {"num_layers": 3, "audio_dual_ffn_layers": (0, 2), "attention": "flex"},
}


def prompts() -> list:
    """Three speech-forcing prompts of different lengths (text only, voice cloning x2)."""
    result = [build_prompt(text_prompt()[0], TOKENIZER, LAYOUT, force_audio=True)]
    for sentence in ("the moon sings", "a big red dog sees the small blue bird"):
        messages, codes = voice_clone_prompt(sentence)
        result.append(build_prompt(messages, TOKENIZER, LAYOUT, codes, force_audio=True))
    assert len({len(p) for p in result}) == 3
    return result


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1234)
    model = higgs_audio_tiny(dtype=torch.float32).eval()
    plant_end_of_speech(model)
    silence_placeholders(model)
    return model


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
@pytest.mark.parametrize("variant", sorted(LAYER_VARIANTS))
def test_cached_forward_equals_the_full_forward(variant):
    torch.manual_seed(0)
    model = higgs_audio_tiny(dtype=torch.float32, **LAYER_VARIANTS[variant]).eval()
    messages, codes = voice_clone_prompt("the moon sings")
    document = build_prompt(messages, TOKENIZER, LAYOUT, codes, force_audio=True)
    length = len(document)
    audio = document.audio_in_mask | document.audio_out_mask
    assert audio.any() and (~audio).any()
    spec = PackingSpec(seq_len=length, batch_size=1, num_codebooks=K)
    full = collate_rows([[document]], spec, TOKENS.pad)
    with torch.no_grad():
        expected = model.forward_full(full)  # [1, L, V], [1, L, K, C]

    # prefill the first part (a row of 2: the second row is padding), then decode one position at a time
    split = int(torch.nonzero(document.audio_out_mask)[0]) + 2  # inside the assistant audio reference
    decoder = CachedDecoder(model, batch_size=2, max_positions=length + 3)
    prefix = collate_rows(
        [[_head(document, split)], []], PackingSpec(seq_len=split, batch_size=2), TOKENS.pad
    )
    prefix["input_pos"] = torch.arange(split).expand(2, split).clone()
    text, audio_logits = decoder.prefill(prefix, torch.tensor([split - 1, 0]))
    torch.testing.assert_close(text[0], expected.text_logits[0, split - 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(audio_logits[0], expected.audio_logits[0, split - 1], atol=1e-5, rtol=1e-5)
    for position in range(split, length):
        text, audio_logits = decoder.decode(
            torch.tensor([int(document.tokens[position]), TOKENS.pad]),
            torch.stack([document.audio_codes[:, position], torch.zeros(K, dtype=torch.long)]),
            torch.tensor([bool(document.audio_out_mask[position]), False]),
            torch.tensor([position, decoder.sink]),
            with_text=True,
        )
        torch.testing.assert_close(text[0], expected.text_logits[0, position], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(audio_logits[0], expected.audio_logits[0, position], atol=1e-5, rtol=1e-5)


def _head(document: Document, length: int) -> Document:
    """The first ``length`` positions of a document."""
    audio = int((document.audio_in_mask[:length] | document.audio_out_mask[:length]).sum())
    return replace(
        document,
        tokens=document.tokens[:length],
        audio_codes=document.audio_codes[:, :length],
        audio_in_mask=document.audio_in_mask[:length],
        audio_out_mask=document.audio_out_mask[:length],
        text_targets=document.text_targets[:length],
        audio_targets=document.audio_targets[:, :length],
        stats=DocStats(length, length - audio, audio, 0, 0),
    )


@pytest.mark.parametrize(
    "sampling",
    [SamplingConfig(), SamplingConfig(greedy=False, temperature=0.9, top_k=40, ras_win_len=7)],
    ids=["greedy", "sampled_ras"],
)
def test_batched_generation_equals_one_prompt_at_a_time(model, sampling):
    batch = prompts()
    seeds = [11, 12, 13]
    alone = [
        generate(
            model,
            p,
            TOKENS,
            max_new_columns=40,
            sampling=sampling,
            generator=torch.Generator().manual_seed(s),
        )
        for p, s in zip(batch, seeds)
    ]
    reference = generate(
        model,
        batch[1],
        TOKENS,
        max_new_columns=40,
        sampling=sampling,
        generator=torch.Generator().manual_seed(seeds[1]),
        use_cache=False,
    )
    decoder = CachedDecoder(model, batch_size=4, max_positions=cache_positions_needed(batch, 40))  # 1 spare
    together = generate_batch(
        model,
        batch,
        TOKENS,
        max_new_columns=40,
        sampling=sampling,
        generators=[torch.Generator().manual_seed(s) for s in seeds],
        decoder=decoder,
    )
    for one, other in zip(alone, together):
        assert one.text_ids.tolist() == other.text_ids.tolist()
        assert [c.tolist() for c in one.audio_columns] == [c.tolist() for c in other.audio_columns]
        assert (one.stopped_by, one.num_steps) == (other.stopped_by, other.num_steps)
    assert [c.tolist() for c in reference.audio_columns] == [c.tolist() for c in alone[1].audio_columns]
    assert reference.text_ids.tolist() == alone[1].text_ids.tolist()
    # each prompt really ended its speech and went on in text, each at its own step
    assert all(TOKENS.audio_eos in out.text_ids.tolist() for out in together)


def test_a_decoder_too_small_for_the_request_is_refused(model):
    batch = prompts()
    decoder = CachedDecoder(model, batch_size=2, max_positions=len(batch[0]) + 10)
    with pytest.raises(ValueError, match="may be needed"):
        generate_batch(model, batch[:1], TOKENS, max_new_columns=40, decoder=decoder)


def test_the_compiled_decode_step_never_recompiles_across_steps_and_prompts(model):
    graphs = []

    def counting_inductor(graph_module, example_inputs):
        graphs.append(graph_module)
        return lookup_backend("inductor")(graph_module, example_inputs)

    torch._dynamo.reset()
    batch = prompts()
    decoder = CachedDecoder(
        model,
        batch_size=2,
        max_positions=cache_positions_needed(batch, 40),
        compile=True,
        backend=counting_inductor,
    )
    first = generate_batch(model, batch[:2], TOKENS, max_new_columns=40, decoder=decoder)
    assert len(graphs) == 2  # audio head only; text + audio heads
    second = generate_batch(model, batch[1:], TOKENS, max_new_columns=40, decoder=decoder)  # other lengths
    later = generate_batch(model, batch[::-1], TOKENS, max_new_columns=40, decoder=decoder)
    assert len(graphs) == 2
    eager = generate_batch(model, batch, TOKENS, max_new_columns=40)
    for compiled, expected in zip(first + second[1:], eager):
        assert [c.tolist() for c in compiled.audio_columns] == [c.tolist() for c in expected.audio_columns]
        assert compiled.text_ids.tolist() == expected.text_ids.tolist()
    assert [c.tolist() for c in later[0].audio_columns] == [c.tolist() for c in eager[2].audio_columns]
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decode_step_gives_the_eager_codes():
    torch.manual_seed(1234)
    model = higgs_audio_tiny(dtype=torch.float32, device="cuda").eval()
    plant_end_of_speech(model)
    silence_placeholders(model)
    batch = prompts()
    needed = cache_positions_needed(batch, 40)
    eager = generate_batch(model, batch, TOKENS, max_new_columns=40)
    for compile in (False, True):
        decoder = CachedDecoder(model, batch_size=3, max_positions=needed, compile=compile, cuda_graphs=True)
        for _ in range(2):  # the captured graphs replay for a second batch
            graphed = generate_batch(model, batch, TOKENS, max_new_columns=40, decoder=decoder)
            for one, other in zip(graphed, eager):
                assert [c.tolist() for c in one.audio_columns] == [c.tolist() for c in other.audio_columns]
                assert one.text_ids.tolist() == other.text_ids.tolist()
    torch._dynamo.reset()
