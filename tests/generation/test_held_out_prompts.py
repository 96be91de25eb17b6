"""Held-out prompts for the recipe's end-of-run generation, and the code accuracy it reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from higgs_tune.generation import code_accuracy, held_out_prompt, held_out_speech_prompts


@pytest.fixture
def manifest(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "codes").mkdir()
    for name, frames in (("ref", 3), ("answer", 4)):
        np.save(tmp_path / "codes" / f"{name}.npy", rng.integers(0, 1024, (8, frames)))
    samples = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {
            "messages": [
                {"role": "user", "content": "reference"},
                {"role": "assistant", "content": {"type": "audio", "audio_codes": "codes/ref.npy"}},
                {"role": "user", "content": "say it"},
                {"role": "assistant", "content": {"type": "audio", "audio_codes": "codes/answer.npy"}},
            ],
            "start_index": 2,
        },
    ]
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    return path


def test_held_out_prompt_splits_context_and_answer(manifest):
    held_out = held_out_prompt(manifest, 1)
    assert [m["content"] for m in held_out.messages if m["role"] == "user"] == ["reference", "say it"]
    assert len(held_out.context_codes) == 1 and held_out.context_codes[0].shape == (8, 3)
    assert len(held_out.reference_codes) == 1
    np.testing.assert_array_equal(
        held_out.reference_codes[0], np.load(manifest.parent / "codes" / "answer.npy")
    )
    with pytest.raises(ValueError, match="outside the 2 samples"):
        held_out_prompt(manifest, 2)


def test_speech_prompts_pass_over_text_answers(manifest):
    prompts = held_out_speech_prompts(manifest, 1)
    assert prompts[0].reference_codes[0].shape == (8, 4)
    with pytest.raises(ValueError, match="1 samples answered with speech, 2 were asked for"):
        held_out_speech_prompts(manifest, 2)


def test_code_accuracy_counts_missing_and_extra_frames_as_wrong():
    reference = torch.arange(16).view(2, 8)
    assert code_accuracy(reference, reference) == 1.0
    assert code_accuracy(reference[:, :4], reference) == 0.5  # stopped too early
    longer = torch.cat([reference, reference], 1)
    assert code_accuracy(longer, reference) == 0.5  # did not stop
    wrong_row = reference.clone()
    wrong_row[1] += 1
    assert code_accuracy(wrong_row, reference) == 0.5
