"""Architecture arguments of Higgs Audio v2 and their mapping to Boson's ``config.json``.

:class:`HiggsAudioModelArgs` holds everything the model math needs (docs/higgs_audio_v2.md §1.1). It is read from and
written to the ``config.json`` of Boson's released checkpoints (``model_type: higgs_audio`` with a nested
Llama ``text_config``), so an exported directory loads with ``HiggsAudioModel.from_pretrained``.

Options of Boson's config that this implementation does not compute (Whisper tower, audio
self-attention, audio-out projector, stacked decoder projector, RQ transformer, ...) are refused with an
error naming the option, never silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ADAPTER_TYPES = ("dual_ffn", "dual_ffn_fast_forward", "stack")
ATTENTION_BACKENDS = ("sdpa", "flex")

# Defaults of transformers' LlamaConfig for text_config keys a config.json may omit.
_LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "head_dim": None,
}


class UnsupportedConfigError(ValueError):
    """A Higgs Audio config option that this implementation does not compute."""


@dataclass
class HiggsAudioModelArgs:
    """Sizes and token ids of a Higgs Audio v2 model (docs/higgs_audio_v2.md §1.1; defaults = the released 3B).

    Text backbone (Llama-3 style): ``hidden_size`` H, ``num_layers``, ``num_heads`` / ``num_kv_heads``
    (GQA), ``head_dim``, ``intermediate_size`` of both the text and the audio SwiGLU FFN, ``vocab_size`` V,
    RoPE ``rope_theta`` with optional ``rope_scaling`` (``{"rope_type": "llama3", "factor", ...}``).

    Audio: ``num_codebooks`` K, ``codebook_size`` (payload codes; the model's per-codebook vocabulary is
    ``codebook_size + 2`` with stream BOS/EOS), ``audio_adapter_type`` and ``audio_dual_ffn_layers``
    (layers with the audio FFN; with ``dual_ffn_fast_forward`` the other layers skip audio positions,
    with ``dual_ffn`` they are plain Llama layers for every position), ``audio_embed_avg`` (mean instead
    of sum of the K codebook embeddings).

    ``attention`` selects the attention backend (``"sdpa"`` or ``"flex"``); it is not part of the HF
    config.
    """

    vocab_size: int = 128256
    hidden_size: int = 3072
    num_layers: int = 28
    num_heads: int = 24
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    )
    max_position_embeddings: int = 131072
    text_bos_token_id: int = 128000
    text_eos_token_id: int = 128001
    tie_word_embeddings: bool = True  # recorded for the round trip; the Higgs text head is never tied
    num_codebooks: int = 8
    codebook_size: int = 1024
    audio_stream_bos_id: int = 1024
    audio_stream_eos_id: int = 1025
    audio_adapter_type: str = "dual_ffn_fast_forward"
    audio_dual_ffn_layers: tuple[int, ...] | None = tuple(range(28))
    audio_embed_avg: bool = False
    audio_ffn_hidden_size: int = 3072  # recorded only: Boson's module code sizes audio_mlp from text_config
    audio_ffn_intermediate_size: int = 8192  # recorded only (see above)
    use_delay_pattern: bool = True
    encode_audio_in_tokens: bool = True
    pad_token_id: int = 128001
    audio_in_token_id: int = 128015
    audio_out_token_id: int = 128016
    audio_out_bos_token_id: int = 128013
    audio_eos_token_id: int = 128012
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if self.audio_dual_ffn_layers is not None:
            self.audio_dual_ffn_layers = tuple(int(i) for i in self.audio_dual_ffn_layers)
        self.validate()

    @property
    def codebook_vocab_size(self) -> int:
        """Per-codebook vocabulary inside the model: payload codes + stream BOS + stream EOS."""
        return self.codebook_size + 2

    def layer_kinds(self) -> list[str]:
        """Kind of each decoder layer: ``"dual_ffn"``, ``"fast_forward"`` or ``"text_only"``."""
        if self.audio_adapter_type == "stack":
            return ["text_only"] * self.num_layers
        dual = set(self.audio_dual_ffn_layers or ())
        other = "fast_forward" if self.audio_adapter_type == "dual_ffn_fast_forward" else "text_only"
        return ["dual_ffn" if i in dual else other for i in range(self.num_layers)]

    def validate(self) -> None:
        """Raise ``ValueError`` / :class:`UnsupportedConfigError` naming the offending field."""
        if self.audio_adapter_type not in ADAPTER_TYPES:
            raise UnsupportedConfigError(
                f"audio_adapter_type={self.audio_adapter_type!r} is not one of {ADAPTER_TYPES}"
            )
        if self.audio_adapter_type.startswith("dual_ffn"):
            if self.audio_dual_ffn_layers is None:
                raise ValueError(
                    f"audio_adapter_type={self.audio_adapter_type!r} needs audio_dual_ffn_layers"
                )
            bad = [i for i in self.audio_dual_ffn_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"audio_dual_ffn_layers {bad} outside 0..{self.num_layers - 1}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_BACKENDS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ("llama3", "default"):
                raise UnsupportedConfigError(
                    f"rope_scaling rope_type={rope_type!r}: only 'llama3' is implemented"
                )
        special = {
            "pad_token_id": self.pad_token_id,
            "audio_in_token_id": self.audio_in_token_id,
            "audio_out_token_id": self.audio_out_token_id,
            "audio_out_bos_token_id": self.audio_out_bos_token_id,
            "audio_eos_token_id": self.audio_eos_token_id,
        }
        bad_ids = {k: v for k, v in special.items() if not 0 <= v < self.vocab_size}
        if bad_ids:
            raise ValueError(f"token ids outside the vocabulary of {self.vocab_size}: {bad_ids}")
        for name in ("audio_stream_bos_id", "audio_stream_eos_id"):
            if not 0 <= getattr(self, name) < self.codebook_vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} outside 0..{self.codebook_vocab_size - 1}")

    def replace(self, **changes: Any) -> HiggsAudioModelArgs:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], **overrides: Any) -> HiggsAudioModelArgs:
        """Build from Boson's ``config.json`` content (``model_type: higgs_audio``).

        Raises:
            UnsupportedConfigError: options this implementation does not compute (listed in the message).
            ValueError: not a higgs_audio config.
        """
        if config.get("model_type") != "higgs_audio":
            raise ValueError(f"expected model_type 'higgs_audio', got {config.get('model_type')!r}")
        text = dict(_LLAMA_DEFAULTS)
        text.update(config.get("text_config") or {})
        if text.get("model_type", "llama") != "llama":
            raise UnsupportedConfigError(
                f"text_config model_type={text['model_type']!r}: only 'llama' is implemented"
            )

        # Boson's HiggsAudioConfig defaults, for keys a config.json may omit.
        def top(key: str, default: Any) -> Any:
            return config.get(key, default)

        problems = []
        if not top("skip_audio_tower", False):
            problems.append("skip_audio_tower=False (Whisper audio tower)")
        if top("encode_whisper_embed", True):
            problems.append("encode_whisper_embed=True (Whisper features for audio-in)")
        for key in ("use_audio_out_self_attention", "use_audio_out_embed_projector", "use_rq_transformer"):
            if top(key, False):
                problems.append(f"{key}={top(key, False)!r}")
        if top("audio_decoder_proj_num_layers", 0):
            problems.append(f"audio_decoder_proj_num_layers={top('audio_decoder_proj_num_layers', 0)} > 0")
        if text["hidden_act"] != "silu":
            problems.append(f"text_config.hidden_act={text['hidden_act']!r} (only 'silu')")
        for key in ("attention_bias", "mlp_bias"):
            if text[key]:
                problems.append(f"text_config.{key}=True")
        if text["attention_dropout"]:
            problems.append(
                f"text_config.attention_dropout={text['attention_dropout']} (no dropout implemented)"
            )
        if problems:
            raise UnsupportedConfigError("unsupported Higgs Audio config options: " + "; ".join(problems))

        num_heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        num_kv = text["num_key_value_heads"] if text["num_key_value_heads"] is not None else num_heads
        head_dim = text["head_dim"] if text["head_dim"] is not None else hidden // num_heads
        rope_scaling = text["rope_scaling"]
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            if rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
                rope_scaling = None
        dual = top("audio_dual_ffn_layers", None)
        args = dict(
            vocab_size=int(text["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(text["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(num_kv),
            head_dim=int(head_dim),
            intermediate_size=int(text["intermediate_size"]),
            rms_norm_eps=float(text["rms_norm_eps"]),
            rope_theta=float(text["rope_theta"]),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(text["max_position_embeddings"]),
            text_bos_token_id=text.get("bos_token_id", 128000),
            text_eos_token_id=text.get("eos_token_id", 128001),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", True)),
            num_codebooks=int(top("audio_num_codebooks", 12)),
            codebook_size=int(top("audio_codebook_size", 1024)),
            audio_stream_bos_id=int(top("audio_stream_bos_id", 1024)),
            audio_stream_eos_id=int(top("audio_stream_eos_id", 1025)),
            audio_adapter_type=top("audio_adapter_type", "stack"),
            audio_dual_ffn_layers=tuple(dual) if dual is not None else None,
            audio_embed_avg=bool(top("audio_embed_avg", False)),
            audio_ffn_hidden_size=int(top("audio_ffn_hidden_size", 4096)),
            audio_ffn_intermediate_size=int(top("audio_ffn_intermediate_size", 14336)),
            use_delay_pattern=bool(top("use_delay_pattern", False)),
            encode_audio_in_tokens=bool(top("encode_audio_in_tokens", False)),
            pad_token_id=int(top("pad_token_id", 128001)),
            audio_in_token_id=int(top("audio_in_token_idx", 128015)),
            audio_out_token_id=int(top("audio_out_token_idx", 128016)),
            audio_out_bos_token_id=int(top("audio_out_bos_token_id", 128013)),
            audio_eos_token_id=int(top("audio_eos_token_id", 128012)),
        )
        args.update(overrides)
        return cls(**args)

    def to_hf_config(self) -> dict[str, Any]:
        """Boson's ``config.json`` content; ``HiggsAudioConfig(**d)`` accepts it."""
        text_config = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling is not None else None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "use_cache": True,
            "bos_token_id": self.text_bos_token_id,
            "eos_token_id": self.text_eos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "bfloat16",
        }
        return {
            "model_type": "higgs_audio",
            "architectures": ["HiggsAudioModel"],
            "text_config": text_config,
            "audio_adapter_type": self.audio_adapter_type,
            "audio_dual_ffn_layers": list(self.audio_dual_ffn_layers)
            if self.audio_dual_ffn_layers is not None
            else None,
            "audio_embed_avg": self.audio_embed_avg,
            "audio_ffn_hidden_size": self.audio_ffn_hidden_size,
            "audio_ffn_intermediate_size": self.audio_ffn_intermediate_size,
            "audio_decoder_proj_num_layers": 0,
            "encode_whisper_embed": False,
            "encode_audio_in_tokens": self.encode_audio_in_tokens,
            "use_delay_pattern": self.use_delay_pattern,
            "skip_audio_tower": True,
            "use_audio_out_embed_projector": False,
            "use_audio_out_self_attention": False,
            "use_rq_transformer": False,
            "audio_num_codebooks": self.num_codebooks,
            "audio_codebook_size": self.codebook_size,
            "audio_stream_bos_id": self.audio_stream_bos_id,
            "audio_stream_eos_id": self.audio_stream_eos_id,
            "audio_in_token_idx": self.audio_in_token_id,
            "audio_out_token_idx": self.audio_out_token_id,
            "audio_out_bos_token_id": self.audio_out_bos_token_id,
            "audio_eos_token_id": self.audio_eos_token_id,
            "pad_token_id": self.pad_token_id,
            "hidden_size": self.hidden_size,
            "torch_dtype": "bfloat16",
        }
