"""transformers' HiggsAudioV2 checkpoint layout in and out.

transformers (>= 5.3) ships Higgs Audio v2 as ``HiggsAudioV2ForConditionalGeneration`` (``config.json``
with ``model_type: higgs_audio_v2``). Its weights are Boson's under other names (transformers'
``convert_higgs_audio_v2_to_hf.py``)::

    Boson / higgs_tune                            transformers
    embed_tokens.weight                           model.embed_tokens.weight
    layers.N.*                                    model.layers.N.*   (same sub-names, audio_* included)
    norm.weight                                   model.norm.weight
    audio_codebook_embeddings.weight              model.embed_audio_tokens.embed_audio_tokens.weight
    audio_decoder_proj.audio_lm_head.weight       audio_lm_head.weight
    audio_decoder_proj.text_lm_head.weight        text_lm_head.weight   (loaded with use_text_head=True)

and its config differs: ``codebook_size`` counts the stream BOS/EOS (1026 for 1024 payload codes),
``audio_token_id`` is ``<|AUDIO_OUT|>``, ``audio_bos_token_id`` is ``<|audio_out_bos|>``,
``audio_delay_token_id`` (``<|reserved_special_token_6|>``) fills the last K-1 audio positions of a
segment, RoPE is ``rope_parameters``. Its model has no fast-forward layers, no averaged codebook
embeddings and no audio-in token: every decoder layer is DualFFN and every audio position (audio-in
included, which its processor writes as audio-out) takes the audio FFN. Models that need more refuse to
convert, naming the option.

The two token ids a transformers config does not hold (``<|AUDIO|>``, ``<|audio_eos|>``) are looked up
by name in the tokenizer, which a transformers directory keeps next to its weights (its processor files).

Everything here is a pure mapping (names, config dicts) plus the writer of transformers' side files
(``config.json``, ``generation_config.json``, processor and tokenizer files), so it composes with any
safetensors writer: :func:`higgs_tune.models.higgs_audio.checkpoint.save_hf_checkpoint` takes
``layout="transformers"``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from higgs_tune.data.tokenizer import HiggsTokenizer

from .config import HiggsAudioModelArgs, UnsupportedConfigError

MODEL_TYPE = "higgs_audio_v2"
ARCHITECTURE = "HiggsAudioV2ForConditionalGeneration"
AUDIO_DELAY_TOKEN = "<|reserved_special_token_6|>"
# transformers' converted processor reads its audio tokenizer (HiggsAudioV2TokenizerModel) from here.
DEFAULT_AUDIO_TOKENIZER = "eustlb/higgs-audio-v2-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# (ours, transformers) prefixes; the first that matches renames the key.
_PREFIXES = (
    ("audio_codebook_embeddings.", "model.embed_audio_tokens.embed_audio_tokens."),
    ("audio_decoder_proj.", ""),
    ("embed_tokens.", "model.embed_tokens."),
    ("layers.", "model.layers."),
    ("norm.", "model.norm."),
)
_TRANSFORMERS_HEADS = ("audio_lm_head.", "text_lm_head.")

# HiggsAudioV2Config's defaults (transformers 5.x), for keys a config.json may omit.
_CONFIG_DEFAULTS: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "pad_token_id": 128001,
    "bos_token_id": 1,
    "eos_token_id": 128009,
    "rope_parameters": {
        "factor": 32.0,
        "rope_theta": 500000.0,
        "high_freq_factor": 0.5,
        "low_freq_factor": 0.125,
        "original_max_position_embeddings": 1024,
        "rope_type": "llama3",
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "head_dim": 128,
    "num_codebooks": 8,
    "codebook_size": 1024,
    "audio_token_id": 128016,
    "audio_bos_token_id": 128013,
    "audio_delay_token_id": 128014,
    "audio_stream_bos_id": 1024,
    "audio_stream_eos_id": 1025,
}

# transformers' chat template for Higgs Audio v2 (as its conversion script writes it): system prompt
# (required), optional scene with reference audio as audio-out, text user turns, audio-only assistant turns.
CHAT_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content']|trim %}
    {%- elif messages[0]['content'] is iterable and messages[0]['content'][0]['type'] == 'text' %}
        {%- set system_message = messages[0]['content'][0]['text']|trim %}
    {%- else %}
        {{- raise_exception("System message content must be a string or contain text type!") }}
    {%- endif %}
    {%- set messages = messages[1:] %}
{%- else %}
    {{- raise_exception("A system message is required but not provided!") }}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- system_message }}
{%- if messages and messages[0]['role'] == 'scene' %}
    {{- "\\n\\n<|scene_desc_start|>\\n" }}
    {%- if messages[0]['content'] is string %}
        {{- messages[0]['content'] | trim }}
    {%- elif messages[0]['content'] is iterable %}
        {%- for content_item in messages[0]['content'] %}
            {%- if content_item['type'] == 'text' %}
                {%- set text_content = content_item['text'] | trim %}
                {{- text_content }}
                {%- if loop.first and not loop.last %}
                    {{- "\\n\\n" }}
                {%- endif %}
                {%- if not loop.first and not loop.last and messages[0]['content'][loop.index]['type'] != 'audio' %}
                    {{- "\\n" }}
                {%- endif %}
            {%- elif content_item['type'] == 'audio' %}
                {{- ' <|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>' }}
                {%- if not loop.last %}
                    {{- "\\n" }}
                {%- endif %}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- "\\n<|scene_desc_end|>" }}
    {%- set messages = messages[1:] %}
{%- endif %}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- if message['content'] is not iterable or message['content'][0]['type'] != 'audio' %}
            {{- raise_exception("Assistant messages must contain audio content only!") }}
        {%- endif %}
        {{- '<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>' }}
    {%- else %}
        {%- if message['content'] is string %}
            {{- message['content'] | trim }}
        {%- elif message['content'] is iterable %}
            {%- for content_item in message['content'] %}
                {%- if content_item['type'] == 'text' %}
                    {{- content_item['text'] | trim }}
                {%- elif content_item['type'] == 'audio' and message['role'] == 'user' %}
                    {{- raise_exception("User messages cannot contain audio content!") }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n<|audio_out_bos|>' }}
{%- endif %}
"""


class TransformersLayoutError(ValueError):
    """A checkpoint or model that transformers' HiggsAudioV2 layout cannot express (or a bad key)."""


def is_transformers_config(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` (as a dict) is transformers' HiggsAudioV2 (``model_type: higgs_audio_v2``)."""
    return config.get("model_type") == MODEL_TYPE


# ------------------------------------------------------------------------------------------ key names
def to_transformers_key(key: str) -> str:
    """Our (Boson's) parameter name -> transformers' name; ``TransformersLayoutError`` for an unknown one."""
    for ours, theirs in _PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise TransformersLayoutError(f"no transformers HiggsAudioV2 name for parameter {key!r}")


def from_transformers_key(key: str) -> str:
    """transformers' parameter name -> ours (Boson's); ``TransformersLayoutError`` for an unknown one."""
    if key.startswith(_TRANSFORMERS_HEADS):
        return "audio_decoder_proj." + key
    for ours, theirs in _PREFIXES:
        if theirs and key.startswith(theirs):
            return ours + key[len(theirs) :]
    raise TransformersLayoutError(f"not a transformers HiggsAudioV2 parameter: {key!r}")


def rename_state_dict(
    state_dict: Mapping[str, torch.Tensor], to_transformers: bool
) -> dict[str, torch.Tensor]:
    """The same tensors (not copied) under the other layout's names."""
    rename = to_transformers_key if to_transformers else from_transformers_key
    return {rename(key): tensor for key, tensor in state_dict.items()}


# -------------------------------------------------------------------------------------------- config
def check_expressible(args: HiggsAudioModelArgs) -> None:
    """Raise ``TransformersLayoutError`` naming every option transformers' model cannot compute."""
    problems = []
    if any(kind != "dual_ffn" for kind in args.layer_kinds()):
        problems.append(
            f"audio_adapter_type={args.audio_adapter_type!r} with audio_dual_ffn_layers="
            f"{args.audio_dual_ffn_layers} (transformers' model has the audio FFN in every layer)"
        )
    if args.audio_embed_avg:
        problems.append("audio_embed_avg=True (transformers sums the codebook embeddings)")
    if not args.use_delay_pattern:
        problems.append("use_delay_pattern=False (transformers' processor always applies the delay pattern)")
    if args.hidden_size % args.num_heads:
        problems.append(f"hidden_size={args.hidden_size} not a multiple of num_heads={args.num_heads}")
    if problems:
        raise TransformersLayoutError(
            "this model cannot be written in transformers' HiggsAudioV2 layout: " + "; ".join(problems)
        )


def _rope_parameters(args: HiggsAudioModelArgs) -> dict[str, Any]:
    if args.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": args.rope_theta}
    scaling = {k: v for k, v in args.rope_scaling.items() if k != "type"}
    scaling["rope_type"] = args.rope_scaling.get("rope_type", args.rope_scaling.get("type"))
    return {**scaling, "rope_theta": args.rope_theta}


def transformers_config(args: HiggsAudioModelArgs, tokenizer: HiggsTokenizer, dtype: str) -> dict[str, Any]:
    """transformers' ``config.json`` for ``args``; ``HiggsAudioV2Config(**d)`` accepts it.

    Args:
        args: our architecture (checked with :func:`check_expressible`).
        tokenizer: supplies ``audio_delay_token_id`` (``<|reserved_special_token_6|>``).
        dtype: the stored weights' dtype name (``"bfloat16"``, ``"float32"``).
    """
    check_expressible(args)
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_parameters": _rope_parameters(args),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "pad_token_id": args.pad_token_id,
        "bos_token_id": args.text_bos_token_id,
        "eos_token_id": args.text_eos_token_id,
        "num_codebooks": args.num_codebooks,
        "codebook_size": args.codebook_vocab_size,
        "audio_token_id": args.audio_out_token_id,
        "audio_bos_token_id": args.audio_out_bos_token_id,
        "audio_delay_token_id": tokenizer.token_to_id(AUDIO_DELAY_TOKEN),
        "audio_stream_bos_id": args.audio_stream_bos_id,
        "audio_stream_eos_id": args.audio_stream_eos_id,
        "dtype": dtype,
    }


def args_from_transformers_config(
    config: Mapping[str, Any], tokenizer: HiggsTokenizer, **overrides: Any
) -> HiggsAudioModelArgs:
    """Our architecture from transformers' ``config.json`` (``HiggsAudioV2Config`` defaults for absent keys).

    Every layer becomes DualFFN (``dual_ffn_fast_forward`` over all layers, the released Boson config);
    ``<|AUDIO|>`` and ``<|audio_eos|>`` come from ``tokenizer``. The fields Boson's config records
    without using them take the released model's values: ``tie_word_embeddings=True`` (the text head is
    untied either way), audio FFN sizes equal to the text FFN's.

    Raises:
        TransformersLayoutError: not a higgs_audio_v2 config, or options our model does not compute.
    """
    if not is_transformers_config(config):
        raise TransformersLayoutError(f"expected model_type {MODEL_TYPE!r}, got {config.get('model_type')!r}")
    config = {**_CONFIG_DEFAULTS, **config}
    problems = [f"{key}=True" for key in ("attention_bias", "mlp_bias") if config[key]]
    if config["hidden_act"] != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r} (only 'silu')")
    if config["attention_dropout"]:
        problems.append(f"attention_dropout={config['attention_dropout']} (no dropout implemented)")
    if problems:
        raise TransformersLayoutError("unsupported HiggsAudioV2 config options: " + "; ".join(problems))
    rope = dict(config["rope_parameters"] or _CONFIG_DEFAULTS["rope_parameters"])
    rope_theta = float(rope.pop("rope_theta"))
    rope_scaling = None if rope.get("rope_type", "default") == "default" else rope
    num_layers = int(config["num_hidden_layers"])
    num_heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = config["head_dim"] or hidden // num_heads
    codebook_vocab = int(config["codebook_size"])
    eos = config["eos_token_id"]
    if not isinstance(eos, int):
        raise TransformersLayoutError(f"eos_token_id={eos!r}: expected one id")
    args = dict(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(config["num_key_value_heads"] or num_heads),
        head_dim=int(head_dim),
        intermediate_size=int(config["intermediate_size"]),
        rms_norm_eps=float(config["rms_norm_eps"]),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(config["max_position_embeddings"]),
        text_bos_token_id=int(config["bos_token_id"]),
        text_eos_token_id=eos,
        num_codebooks=int(config["num_codebooks"]),
        codebook_size=codebook_vocab - 2,
        audio_stream_bos_id=int(config["audio_stream_bos_id"]),
        audio_stream_eos_id=int(config["audio_stream_eos_id"]),
        tie_word_embeddings=True,
        audio_adapter_type="dual_ffn_fast_forward",
        audio_dual_ffn_layers=tuple(range(num_layers)),
        audio_ffn_hidden_size=hidden,
        audio_ffn_intermediate_size=int(config["intermediate_size"]),
        pad_token_id=int(config["pad_token_id"]),
        audio_in_token_id=tokenizer.special.audio_in,
        audio_out_token_id=int(config["audio_token_id"]),
        audio_out_bos_token_id=int(config["audio_bos_token_id"]),
        audio_eos_token_id=tokenizer.special.audio_eos,
    )
    args.update(overrides)
    try:
        return HiggsAudioModelArgs(**args)
    except UnsupportedConfigError as exc:
        raise TransformersLayoutError(str(exc)) from exc


# -------------------------------------------------------------------------------------- side files
def generation_config(args: HiggsAudioModelArgs, tokenizer: HiggsTokenizer) -> dict[str, Any]:
    """transformers' ``generation_config.json``: stop at ``<|eot_id|>``, Boson's repetition-aware sampling
    window (7 frames, at most 2 repeats), as transformers' conversion script sets them."""
    return {
        "bos_token_id": args.text_bos_token_id,
        "eos_token_id": tokenizer.special.eot,
        "pad_token_id": args.pad_token_id,
        "ras_win_len": 7,
        "ras_win_max_num_repeat": 2,
    }


def processor_config(args: HiggsAudioModelArgs, audio_tokenizer: str) -> dict[str, Any]:
    """transformers' ``processor_config.json`` of a HiggsAudioV2Processor (DAC feature extractor, audio
    tokenizer referenced by path or hub id, Boson's special tokens and stream ids)."""
    return {
        "processor_class": "HiggsAudioV2Processor",
        "audio_token": "<|AUDIO_OUT|>",
        "audio_bos_token": "<|audio_out_bos|>",
        "audio_eos_token": "<|audio_eos|>",
        "audio_delay_token": AUDIO_DELAY_TOKEN,
        "audio_stream_bos_id": args.audio_stream_bos_id,
        "audio_stream_eos_id": args.audio_stream_eos_id,
        "audio_tokenizer": {
            "audio_tokenizer_class": "HiggsAudioV2TokenizerModel",
            "audio_tokenizer_name_or_path": audio_tokenizer,
        },
        "feature_extractor": {
            "feature_extractor_type": "DacFeatureExtractor",
            "feature_size": 1,
            "hop_length": 1,
            "padding_side": "right",
            "padding_value": 0.0,
            "return_attention_mask": True,
            "sampling_rate": 24000,
        },
    }


def write_transformers_side_files(
    output_dir: Path,
    args: HiggsAudioModelArgs,
    tokenizer_dir: Path,
    dtype: str,
    audio_tokenizer: str = DEFAULT_AUDIO_TOKENIZER,
) -> None:
    """Write everything of a transformers HiggsAudioV2 directory except the weights.

    ``config.json``, ``generation_config.json``, ``processor_config.json``, ``chat_template.jinja`` and the
    tokenizer files of ``tokenizer_dir`` (``tokenizer_config.json`` gains the pad token and the processor
    class, as transformers' conversion sets them).

    Raises:
        FileNotFoundError: ``tokenizer_dir`` holds no ``tokenizer.json``.
        TransformersLayoutError: ``args`` not expressible (:func:`check_expressible`).
    """
    tokenizer = HiggsTokenizer.from_path(tokenizer_dir)
    config = transformers_config(args, tokenizer, dtype)
    (output_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (output_dir / "generation_config.json").write_text(
        json.dumps(generation_config(args, tokenizer), indent=2) + "\n"
    )
    (output_dir / "processor_config.json").write_text(
        json.dumps(processor_config(args, audio_tokenizer), indent=2) + "\n"
    )
    (output_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file() and name != "tokenizer_config.json":
            shutil.copyfile(tokenizer_dir / name, output_dir / name)
    tokenizer_config_path = tokenizer_dir / "tokenizer_config.json"
    tokenizer_config = (
        json.loads(tokenizer_config_path.read_text()) if tokenizer_config_path.is_file() else {}
    )
    tokenizer_config.setdefault("bos_token", "<|begin_of_text|>")
    tokenizer_config.setdefault("eos_token", "<|end_of_text|>")
    tokenizer_config["pad_token"] = tokenizer_config["eos_token"]
    tokenizer_config["processor_class"] = "HiggsAudioV2Processor"
    tokenizer_config.pop("chat_template", None)  # the processor's chat_template.jinja is the one
    (output_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def weight_dtype_name(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"bfloat16"`` etc. of the first tensor (the dtype config.json records)."""
    return str(next(iter(state_dict.values())).dtype).removeprefix("torch.")
