"""Model behaviour beyond parity: config mapping, checkpoint errors, 3B meta build, attention backends,
compile, activation checkpointing, LoRA and fine-tuning modes."""

from __future__ import annotations

import json

import pytest
import torch
from boson_multimodal.model.higgs_audio import HiggsAudioConfig
from higgs_model_testing import boson_config, boson_model, make_boson_sample, pack_batch, run_boson
from safetensors.torch import load_file, save_file

from higgs_tune.models.higgs_audio.builders import higgs_audio_3b, higgs_audio_tiny, tiny_model_args
from higgs_tune.models.higgs_audio.checkpoint import (
    CheckpointKeyError,
    load_hf_checkpoint,
    save_model,
)
from higgs_tune.models.higgs_audio.config import HiggsAudioModelArgs, UnsupportedConfigError
from higgs_tune.models.higgs_audio.lora import (
    apply_lora,
    load_adapter,
    merge_lora_,
    merged_state_dict,
    save_adapter,
    set_trainable,
)
from higgs_tune.training.activation_checkpointing import apply_activation_checkpointing

SEGMENTS = [
    ("text", 5),
    ("audio_in", 3),
    ("text", 4),
    ("audio_out", 5),
    ("text", 3),
    ("audio_out", 2),
    ("text", 2),
]


@pytest.fixture(scope="module")
def docs():
    """Three merged documents (from Boson's merge) to pack into test batches."""
    boson = boson_model(boson_config(num_layers=1))
    return [run_boson(boson, make_boson_sample(SEGMENTS, seed=i)) for i in range(3)]


def _batch(docs):
    return pack_batch([[docs[0], docs[1]], [docs[2]]], seq_len=128)


def _scalar(output) -> torch.Tensor:
    """A scalar that depends on every logit (stand-in for the loss)."""
    return output.text_logits.float().logsumexp(-1).mean() + output.audio_logits.float().square().mean()


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------ config
def test_3b_meta_build_has_released_parameter_count():
    model = higgs_audio_3b(device="meta")
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert sum(p.numel() for p in params) == 5_771_283_456
    assert len(model.state_dict()) == 28 * 14 + 5


def test_builders_are_yaml_components():
    from omegaconf import OmegaConf
    from torchtune import config as tune_config

    cfg = OmegaConf.create(
        {
            "_component_": "higgs_tune.models.higgs_audio.builders.higgs_audio_tiny",
            "num_layers": 3,
            "dtype": "bf16",
        }
    )
    model = tune_config.instantiate(cfg)
    assert len(model.layers) == 3 and model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.args.audio_out_token_id == 784 and model.args.pad_token_id == 769


def test_hf_config_round_trip_through_boson_config():
    args = tiny_model_args(num_layers=3, audio_dual_ffn_layers=(0, 2), audio_embed_avg=True)
    boson = HiggsAudioConfig(**args.to_hf_config())
    assert boson.audio_dual_ffn_layers == [0, 2] and boson.text_config.num_key_value_heads == 2
    assert HiggsAudioModelArgs.from_hf_config(boson.to_dict()) == args
    from_boson = HiggsAudioModelArgs.from_hf_config(boson_config(num_layers=3, dual_ffn_layers=[1]).to_dict())
    assert from_boson.layer_kinds() == ["fast_forward", "dual_ffn", "fast_forward"]
    assert from_boson.pad_token_id == 769 and from_boson.audio_out_token_id == 784


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("skip_audio_tower", False, "skip_audio_tower"),
        ("encode_whisper_embed", True, "encode_whisper_embed"),
        ("use_audio_out_self_attention", True, "use_audio_out_self_attention"),
        ("use_audio_out_embed_projector", True, "use_audio_out_embed_projector"),
        ("audio_decoder_proj_num_layers", 2, "audio_decoder_proj_num_layers"),
        ("use_rq_transformer", True, "use_rq_transformer"),
    ],
)
def test_unsupported_config_options_raise(option, value, message):
    config = tiny_model_args().to_hf_config()
    config[option] = value
    with pytest.raises(UnsupportedConfigError, match=message):
        HiggsAudioModelArgs.from_hf_config(config)


def test_unsupported_text_options_and_bad_values_raise():
    config = tiny_model_args().to_hf_config()
    config["text_config"]["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(UnsupportedConfigError, match="yarn"):
        HiggsAudioModelArgs.from_hf_config(config)
    with pytest.raises(ValueError, match="audio_dual_ffn_layers"):
        tiny_model_args(audio_dual_ffn_layers=(0, 5))
    with pytest.raises(ValueError, match="attention"):
        tiny_model_args(attention="flash")


# ------------------------------------------------------------------------------------- checkpoints
def test_missing_and_unexpected_keys_are_listed(tmp_path):
    model = higgs_audio_tiny()
    export = save_model(model, tmp_path / "ckpt")
    tensors = load_file(export / "model.safetensors")
    del tensors["layers.1.audio_mlp.up_proj.weight"]
    tensors["layers.0.audio_attn.q_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, export / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointKeyError) as error:
        load_hf_checkpoint(export, dtype=torch.float32)
    assert "layers.1.audio_mlp.up_proj.weight" in str(error.value)
    assert "layers.0.audio_attn.q_proj.weight" in str(error.value)


def test_partially_frozen_splits_are_merged(tmp_path):
    model = higgs_audio_tiny()
    export = save_model(model, tmp_path / "ckpt")
    tensors = load_file(export / "model.safetensors")
    embed = tensors.pop("embed_tokens.weight")
    head = tensors.pop("audio_decoder_proj.text_lm_head.weight")
    tensors["embed_tokens.embedding_frozen.weight"], tensors["embed_tokens.embedding_trainable.weight"] = (
        embed.split([768, 256])
    )
    split = head.split([700, 324])
    tensors["audio_decoder_proj.text_lm_head.linear_frozen.weight"] = split[0]
    tensors["audio_decoder_proj.text_lm_head.linear_trainable.weight"] = split[1]
    save_file(tensors, export / "model.safetensors", metadata={"format": "pt"})
    loaded = load_hf_checkpoint(export, dtype=torch.float32)
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)
    assert torch.equal(
        loaded.audio_decoder_proj.text_lm_head.weight, model.audio_decoder_proj.text_lm_head.weight
    )


def test_load_in_bf16_keeps_bf16_and_rope_buffer_is_real(tmp_path):
    model = higgs_audio_tiny()
    export = save_model(model, tmp_path / "ckpt", dtype=torch.bfloat16)
    assert json.loads((export / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_hf_checkpoint(export, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.rotary_emb.inv_freq.device.type == "cpu"
    torch.testing.assert_close(loaded.rotary_emb.inv_freq, model.rotary_emb.inv_freq, rtol=0, atol=0)
    model.to(torch.bfloat16)  # a dtype cast must not round the RoPE frequencies
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.rotary_emb.inv_freq, loaded.rotary_emb.inv_freq, rtol=0, atol=0)


def test_bf16_training_forward_returns_model_dtype_close_to_fp32(docs):
    model = higgs_audio_tiny(num_layers=3, audio_dual_ffn_layers=(0, 2))
    batch = _batch(docs)
    with torch.no_grad():
        fp32 = model(batch)
    model.to(torch.bfloat16)
    out = model(batch)
    assert out.text_logits.dtype == out.audio_logits.dtype == torch.bfloat16
    assert out.text_logits.shape == (2, 128, 1024) and out.audio_logits.shape == (2, 128, 8, 1026)
    torch.testing.assert_close(out.text_logits.float(), fp32.text_logits, rtol=0.05, atol=0.05)
    _scalar(out).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


# -------------------------------------------------------------------------------------- attention
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
def test_flex_attention_forward_matches_sdpa(docs):
    """FlexAttention (BlockMask) gives the SDPA logits. Forward only: flex has no CPU backward."""
    sdpa = higgs_audio_tiny(num_layers=3, audio_dual_ffn_layers=(0, 2)).eval()
    flex = higgs_audio_tiny(num_layers=3, audio_dual_ffn_layers=(0, 2), attention="flex").eval()
    flex.load_state_dict(sdpa.state_dict())
    batch = _batch(docs)
    with torch.no_grad():
        expected = sdpa.forward_full(batch)
        try:
            actual = flex.forward_full(batch)
        except (RuntimeError, NotImplementedError) as error:  # pragma: no cover - depends on the torch build
            pytest.skip(f"flex_attention forward does not run on this CPU build: {error}")
    torch.testing.assert_close(actual.text_logits, expected.text_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual.audio_logits, expected.audio_logits, rtol=1e-5, atol=1e-5)


def test_documents_do_not_see_each_other(docs):
    """Changing document 0 of a row leaves the logits of document 1 unchanged (block-causal mask)."""
    model = higgs_audio_tiny(num_layers=3, audio_dual_ffn_layers=(1,)).eval()
    batch = _batch(docs)
    changed = {k: v.clone() for k, v in batch.items()}
    first_len = docs[0].tokens.shape[0]
    text_positions = ~(batch["audio_in_mask"][0, :first_len] | batch["audio_out_mask"][0, :first_len])
    changed["tokens"][0, :first_len] = torch.where(text_positions, 5, batch["tokens"][0, :first_len])
    changed["audio_codes"][0, :, :first_len] = (batch["audio_codes"][0, :, :first_len] + 1) % 1024
    with torch.no_grad():
        a, b = model.forward_full(batch), model.forward_full(changed)
    assert not torch.allclose(a.text_logits[0, :first_len], b.text_logits[0, :first_len])
    torch.testing.assert_close(a.text_logits[0, first_len:], b.text_logits[0, first_len:], rtol=0, atol=0)
    torch.testing.assert_close(a.text_logits[1], b.text_logits[1], rtol=0, atol=0)


# ------------------------------------------------------------------------------ compile and AC
@pytest.mark.slow
def test_compile_fullgraph_forward_backward_matches_eager(docs):
    """torch.compile(fullgraph=True) of forward+backward on CPU; loss and every gradient equal eager
    within rtol 1e-4 / atol 1e-6 (observed differences ~1e-9)."""
    model = higgs_audio_tiny(num_layers=3, audio_dual_ffn_layers=(0, 2))
    batch = _batch(docs)

    def step(module, batch):
        loss = _scalar(module(batch))
        loss.backward()
        return loss.detach()

    eager_loss = step(model, batch)
    eager_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True)
    compiled_loss = step(compiled, batch)
    compiled_grads = _grads(model)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_gives_same_gradients(docs):
    torch.manual_seed(0)
    plain = higgs_audio_tiny(num_layers=3, audio_dual_ffn_layers=(0, 2))
    checkpointed = higgs_audio_tiny(num_layers=3, audio_dual_ffn_layers=(0, 2))
    checkpointed.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(checkpointed, enabled=True) == 3
    assert apply_activation_checkpointing(plain, enabled=False) == 0
    assert set(checkpointed.state_dict()) == set(plain.state_dict())  # Boson key names kept
    batch = _batch(docs)
    loss_plain, loss_ckpt = _scalar(plain(batch)), _scalar(checkpointed(batch))
    loss_plain.backward()
    loss_ckpt.backward()
    assert torch.equal(loss_plain, loss_ckpt)
    ckpt_grads = {
        name.replace("_checkpoint_wrapped_module.", ""): g for name, g in _grads(checkpointed).items()
    }
    plain_grads = _grads(plain)
    assert ckpt_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------- LoRA
def test_lora_only_selected_params_train(docs):
    model = higgs_audio_tiny()
    wrapped = apply_lora(model, ["q_proj", "audio_mlp", "audio_lm_head"], rank=4, alpha=8.0)
    assert "layers.0.self_attn.q_proj" in wrapped and "layers.1.audio_mlp.down_proj" in wrapped
    assert "audio_decoder_proj.audio_lm_head" in wrapped and not any("k_proj" in w for w in wrapped)
    trainable = set(set_trainable(model, "lora"))
    assert trainable == {f"{w}.lora_{ab}.weight" for w in wrapped for ab in "ab"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _scalar(model(_batch(docs))).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_audio_adapter_mode_trains_only_the_audio_adapter():
    model = higgs_audio_tiny(num_layers=3, audio_dual_ffn_layers=(0, 2))
    trainable = set(set_trainable(model, "audio_adapter"))
    expected = {"audio_codebook_embeddings.weight", "audio_decoder_proj.audio_lm_head.weight"}
    for i in (0, 2):
        expected |= {f"layers.{i}.audio_mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {f"layers.{i}.audio_{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")}
    assert trainable == expected
    assert len(set_trainable(model, "full")) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="apply_lora"):
        set_trainable(model, "lora")


def test_lora_merge_equals_unmerged_and_adapter_round_trip(docs, tmp_path):
    model = higgs_audio_tiny(num_layers=3, audio_dual_ffn_layers=(1,)).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp", "audio_mlp", "text_lm_head", "audio_lm_head"]
    apply_lora(model, targets, rank=4, alpha=16.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_b" in name:
                param.normal_(std=0.05)
    batch = _batch(docs)
    with torch.no_grad():
        unmerged = model.forward_full(batch)

    # adapter-only save/load into a fresh LoRA model on the same base weights
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    assert set(load_file(path)) == {k for k in model.state_dict() if "lora_" in k}
    fresh = higgs_audio_tiny(num_layers=3, audio_dual_ffn_layers=(1,)).eval()
    fresh.load_state_dict(base_state)
    apply_lora(fresh, targets, rank=4, alpha=16.0)
    load_adapter(fresh, path)
    with torch.no_grad():
        reloaded = fresh.forward_full(batch)
    torch.testing.assert_close(reloaded.text_logits, unmerged.text_logits, rtol=0, atol=0)
    mismatched = higgs_audio_tiny(num_layers=3, audio_dual_ffn_layers=(1,))
    apply_lora(mismatched, ["q_proj"], rank=4, alpha=16.0)
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter(mismatched, path)

    # merged state dict (plain layout) and in-place merge give the unmerged outputs
    merged_plain = higgs_audio_tiny(num_layers=3, audio_dual_ffn_layers=(1,)).eval()
    merged_plain.load_state_dict(merged_state_dict(model))
    merge_lora_(model)
    assert set(model.state_dict()) == set(base_state)
    with torch.no_grad():
        for merged in (model.forward_full(batch), merged_plain.forward_full(batch)):
            torch.testing.assert_close(merged.text_logits, unmerged.text_logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(merged.audio_logits, unmerged.audio_logits, rtol=1e-5, atol=1e-5)
