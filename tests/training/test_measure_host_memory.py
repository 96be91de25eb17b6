"""tools/measure_host_memory.py: the per-phase resident peak sees an allocation made inside the phase,
and the random base's tokenizer has the released model's token ids."""

from __future__ import annotations

import torch
from training_testing import load_tool

from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.models.higgs_audio.config import HiggsAudioModelArgs

tool = load_tool("measure_host_memory")


def test_a_phase_peak_includes_memory_allocated_and_freed_inside_it():
    meter = tool.HostMemoryMeter()
    with meter.phase("quiet"):
        pass
    with meter.phase("allocates"):
        block = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, touched
        del block
    quiet, allocates = meter.phases["quiet"], meter.phases["allocates"]
    assert allocates.peak_gib - quiet.peak_gib > 0.24
    assert allocates.calls == 1 and len(allocates.wall_s) == 1


def test_the_random_base_tokenizer_matches_the_released_config(tmp_path):
    tool.write_llama3_layout_tokenizer(tmp_path, bpe_vocab_size=128000)
    tokenizer = HiggsTokenizer.from_path(str(tmp_path))
    assert tokenizer.vocab_size == 128256 and tokenizer.special.audio_out == 128016
    tokenizer.check_against_model_config(HiggsAudioModelArgs().to_hf_config())  # the 3B defaults
    tiny = HiggsTokenizer.from_path(str(tool.TINY_TOKENIZER))
    text = "The quick brown fox."
    ids = tokenizer.encode(text)
    assert ids == tiny.encode(text) and max(ids) < 768  # the same BPE ids for text
