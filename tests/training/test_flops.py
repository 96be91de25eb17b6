"""PaLM model FLOPs of the released 3B architecture, from the parameter shapes of docs/higgs_audio_v2.md §2."""

import torch

from higgs_tune.models.higgs_audio.config import HiggsAudioModelArgs
from higgs_tune.training.flops import matmul_params_per_token, mfu, training_flops_per_token


def test_3b_matmul_parameters_count_one_ffn_per_token():
    args = HiggsAudioModelArgs()  # the released 3B architecture
    per_layer_attention, per_layer_ffn = (
        25_165_824,
        75_497_472,
    )  # docs/higgs_audio_v2.md §2 (q,k,v,o and gate,up,down)
    text_head, audio_head = 394_002_432, 25_214_976
    expected = 28 * (per_layer_attention + per_layer_ffn) + text_head + audio_head
    assert matmul_params_per_token(args) == expected
    assert training_flops_per_token(args, 4096) == 6 * expected + 12 * 28 * 3072 * 4096


def test_no_mfu_without_a_known_cuda_peak():
    assert mfu(HiggsAudioModelArgs(), 4096, 1000.0, torch.device("cpu")) is None
