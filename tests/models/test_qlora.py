"""QLoRA (higgs_tune/models/higgs_audio/qlora.py): NF4 bases under the LoRA adapters, on CPU.

Tolerances: QLoRA's forward dequantizes the NF4 weight and runs the same matmul as LoRA on that
dequantized weight, so losses and gradients agree to float rounding: fp32 within rtol 1e-5 / atol 1e-6,
bf16 within rtol 1e-2 / atol 1e-3 (observed: identical in both). The export test compares with Boson's
model at the parity tolerance (max abs diff < 1e-4, fp32).
"""

from __future__ import annotations

import copy

import pytest
import torch
from boson_multimodal.model.higgs_audio import HiggsAudioModel as BosonModel
from higgs_model_testing import boson_config, boson_model, make_boson_sample, pack_batch, run_boson
from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4

from higgs_tune.models.higgs_audio.builders import higgs_audio_tiny
from higgs_tune.models.higgs_audio.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from higgs_tune.models.higgs_audio.lora import (
    LORA_TARGETS,
    apply_lora,
    lora_modules,
    merged_state_dict,
    set_trainable,
)
from higgs_tune.models.higgs_audio.qlora import (
    NF4Options,
    nf4_bytes,
    quantize_lora_base_,
    quantized_modules,
    state_dict_with_dequantized_base,
)
from higgs_tune.training.activation_checkpointing import apply_activation_checkpointing

# The tiny model's smallest linear (k_proj, 32 x 64) has 32 blocks of 64: scales in blocks of 16.
TINY_NF4 = dict(block_size=64, scaler_block_size=16)
SEGMENTS = [("text", 5), ("audio_in", 3), ("text", 4), ("audio_out", 5), ("text", 3), ("audio_out", 2)]


@pytest.fixture(scope="module")
def batch():
    boson = boson_model(boson_config(num_layers=1))
    docs = [run_boson(boson, make_boson_sample(SEGMENTS, seed=i)) for i in range(3)]
    return pack_batch([[docs[0], docs[1]], [docs[2]]], seq_len=128)


def _scalar(output) -> torch.Tensor:
    """A scalar that depends on every logit (stand-in for the loss)."""
    return output.text_logits.float().logsumexp(-1).mean() + output.audio_logits.float().square().mean()


def _lora_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Tiny model with LoRA on every target and non-zero adapters (so they change the outputs)."""
    torch.manual_seed(0)
    model = higgs_audio_tiny(dtype=dtype)
    apply_lora(model, list(LORA_TARGETS), rank=4, alpha=8.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_b" in name:
                param.normal_(std=0.05)
    return model


def _on_dequantized_base(qlora: torch.nn.Module, lora: torch.nn.Module) -> None:
    """Give ``lora``'s bf16/fp32 bases the dequantized NF4 values of ``qlora``."""
    with torch.no_grad():
        for name, module in quantized_modules(qlora).items():
            lora.get_submodule(name).weight.copy_(module.weight.get_original_weight())


@pytest.mark.parametrize(
    "dtype, rtol, atol", [(torch.float32, 1e-5, 1e-6), (torch.bfloat16, 1e-2, 1e-3)], ids=["fp32", "bf16"]
)
def test_forward_backward_matches_lora_on_the_dequantized_base(batch, dtype, rtol, atol):
    qlora = _lora_model(dtype)
    lora = copy.deepcopy(qlora)
    quantized = quantize_lora_base_(qlora, **TINY_NF4)
    original = {name: lora.get_submodule(name).weight.detach().clone() for name in quantized}
    assert set(quantized) == set(lora_modules(lora))  # every LoRA module, audio_mlp included
    assert any(".audio_mlp." in name for name in original)
    _on_dequantized_base(qlora, lora)
    for name, weight in original.items():  # quantization really rounds, by at most one NF4 step
        dequantized = quantized_modules(qlora)[name].weight.get_original_weight()
        assert not torch.equal(dequantized, weight), name
        assert (dequantized.float() - weight.float()).abs().max() <= 0.2 * weight.float().abs().max(), name
    set_trainable(qlora, "lora")
    set_trainable(lora, "lora")

    loss_q, loss_l = _scalar(qlora(batch)), _scalar(lora(batch))
    loss_q.backward()
    loss_l.backward()
    torch.testing.assert_close(loss_q, loss_l, rtol=rtol, atol=atol)
    grads_q = {n: p.grad for n, p in qlora.named_parameters() if p.grad is not None}
    grads_l = {n: p.grad for n, p in lora.named_parameters() if p.grad is not None}
    assert grads_q.keys() == grads_l.keys()
    for name, grad in grads_l.items():
        torch.testing.assert_close(grads_q[name], grad, rtol=rtol, atol=atol, msg=name)


def test_only_adapters_get_gradients_and_the_nf4_base_never_changes(batch):
    model = _lora_model()
    quantized = quantize_lora_base_(model, **TINY_NF4)
    apply_activation_checkpointing(model, enabled=True)
    trainable = set(set_trainable(model, "lora"))
    assert trainable == {f"{name}.lora_{ab}.weight" for name in quantized for ab in "ab"}
    # the NF4 bases are buffers, not parameters: no mode can hand them to an optimizer
    parameters = {name.replace("_checkpoint_wrapped_module.", "") for name, _ in model.named_parameters()}
    assert not parameters & {f"{name}.weight" for name in quantized}
    assert not set(set_trainable(model, "full")) & {f"{name}.weight" for name in quantized}
    set_trainable(model, "lora")

    before = {n: m.weight.quantized_data.clone() for n, m in quantized_modules(model).items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        _scalar(model(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert {n.replace("_checkpoint_wrapped_module.", "") for n in with_grad} == trainable
    for name, module in quantized_modules(model).items():
        assert isinstance(module.weight, NF4Tensor) and module.weight.grad is None, name
        assert torch.equal(module.weight.quantized_data, before[name]), name
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen[name]), name


def test_state_dict_holds_no_quantized_base_and_the_export_holds_it_dequantized():
    model = _lora_model(torch.bfloat16)
    plain_keys = set(higgs_audio_tiny().state_dict())
    quantized = quantize_lora_base_(model, **TINY_NF4)
    state = model.state_dict()
    assert not {f"{name}.weight" for name in quantized} & set(state)  # never checkpointed
    assert not any(isinstance(v, NF4Tensor) for v in state.values())
    full = state_dict_with_dequantized_base(model)
    assert set(merged_state_dict(model, full)) == plain_keys  # Boson's keys, nothing else
    assert all(type(v) is torch.Tensor and v.dtype == torch.bfloat16 for v in full.values())
    model.to("cpu")  # a device move keeps the bases in NF4
    assert len(quantized_modules(model)) == len(quantized)


def test_merged_export_loads_in_boson_with_the_logits_of_the_dequantized_base_model(tmp_path):
    boson = boson_model(boson_config(num_layers=2))
    boson.save_pretrained(tmp_path / "boson")
    ours = load_hf_checkpoint(tmp_path / "boson", dtype=torch.float32).eval()
    apply_lora(ours, list(LORA_TARGETS), rank=4, alpha=8.0)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_b" in name:
                param.normal_(std=0.05)
    quantize_lora_base_(ours, **TINY_NF4)
    reference = run_boson(boson, make_boson_sample(SEGMENTS))
    batch = pack_batch([[reference]], reference.tokens.shape[0])
    with torch.no_grad():
        qlora = ours.forward_full(batch)

    export = save_hf_checkpoint(
        merged_state_dict(ours, state_dict_with_dequantized_base(ours)), ours.args, tmp_path / "merged"
    )
    merged, info = BosonModel.from_pretrained(export, output_loading_info=True, attn_implementation="eager")
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    boson_out = run_boson(merged.eval(), make_boson_sample(SEGMENTS))
    text_diff = (qlora.text_logits[0] - boson_out.text_logits).abs().max().item()
    audio_diff = (qlora.audio_logits[0][reference.audio_out_mask] - boson_out.audio_logits).abs().max().item()
    assert text_diff < 1e-4 and audio_diff < 1e-4, (text_diff, audio_diff)
    # the NF4 rounding is in the export: it differs from the original base + adapters
    assert (boson_out.text_logits - reference.text_logits).abs().max() > 1e-3


def test_nf4_bytes_is_what_torchao_stores():
    for shape, options in (
        ((3072, 8192), NF4Options()),
        ((8208, 64), NF4Options(64, 16)),
        ((32, 64), NF4Options(64, 16)),
    ):
        weight = to_nf4(
            torch.randn(shape, dtype=torch.bfloat16), options.block_size, options.scaler_block_size
        )
        inner = (
            weight.quantized_data,
            weight.quantized_scalers,
            weight.quantization_factor,
            weight.scaler_mean,
        )
        stored = sum(t.numel() * t.element_size() for t in (*inner, weight.nf4))
        assert nf4_bytes(weight.numel(), options) == stored, shape
    assert nf4_bytes(3072 * 8192) / (3072 * 8192) < 0.52  # vs 2 bytes per bf16 weight


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="needs LoRA modules"):
        quantize_lora_base_(higgs_audio_tiny())
    model = higgs_audio_tiny()
    apply_lora(model, ["k_proj"], rank=2, alpha=4.0)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.k_proj\.weight \(32, 64\).*64 x 256"):
        quantize_lora_base_(model)  # 2048 elements: 32 blocks, fewer than one block of 256 scales
    with pytest.raises(ValueError, match="scaler_block_size must be a positive int"):
        NF4Options(scaler_block_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_export_state_of_a_cuda_qlora_model_is_merged_on_the_cpu():
    """The recipe's export path on a GPU: the dequantized bases and the adapters both on the CPU."""
    model = _lora_model(torch.bfloat16).cuda()
    quantize_lora_base_(model, **TINY_NF4)
    assert all(m.weight.device.type == "cuda" for m in quantized_modules(model).values())
    full = state_dict_with_dequantized_base(model)
    assert {v.device.type for v in full.values()} == {"cpu"}
    merged = merged_state_dict(model, full)
    assert set(merged) == set(higgs_audio_tiny().state_dict())
