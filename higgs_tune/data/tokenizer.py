"""The text tokenizer: a ``tokenizer.json`` (Llama-3 layout) with the Higgs Audio special tokens looked up by name.

No special-token id is hard-coded anywhere in higgs_tune: ids come from the tokenizer by name
(:class:`SpecialTokens`) and are checked against the model's ``config.json``
(:meth:`HiggsTokenizer.check_against_model_config`), README "Your data".
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from higgs_tune.errors import InvalidInputError, MissingInputError

# Token names of the fields of SpecialTokens (docs/higgs_audio_v2.md §1.2).
SPECIAL_TOKEN_NAMES = {
    "begin_of_text": "<|begin_of_text|>",
    "end_of_text": "<|end_of_text|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "eom": "<|eom_id|>",
    "eot": "<|eot_id|>",
    "audio_bos": "<|audio_bos|>",
    "audio_eos": "<|audio_eos|>",
    "audio_out_bos": "<|audio_out_bos|>",
    "audio_in": "<|AUDIO|>",
    "audio_out": "<|AUDIO_OUT|>",
    "recipient": "<|recipient|>",
}

# Values a Higgs Audio ``config.json`` implies when it omits a key: transformers' ``save_pretrained`` drops
# keys equal to the class defaults, so these are HiggsAudioConfig's constructor defaults (docs/higgs_audio_v2.md §1.1).
HIGGS_AUDIO_TOKEN_ID_DEFAULTS = {
    "audio_in_token_idx": 128015,
    "audio_out_token_idx": 128016,
    "audio_out_bos_token_id": 128013,
    "audio_eos_token_id": 128012,
    "pad_token_id": 128001,
}

# config.json key -> SpecialTokens field that must hold the same id.
_CONFIG_KEY_TO_SPECIAL = {
    "audio_in_token_idx": "audio_in",
    "audio_out_token_idx": "audio_out",
    "audio_out_bos_token_id": "audio_out_bos",
    "audio_eos_token_id": "audio_eos",
    "pad_token_id": "pad",
}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens the data layout uses, looked up by name (docs/higgs_audio_v2.md §1.2).

    ``pad`` is ``<|end_of_text|>``, the model's ``pad_token_id`` (Llama-3 has no pad token).
    """

    begin_of_text: int
    end_of_text: int
    start_header: int
    end_header: int
    eom: int
    eot: int
    audio_bos: int
    audio_eos: int
    audio_out_bos: int
    audio_in: int
    audio_out: int
    recipient: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, source: str = "tokenizer") -> SpecialTokens:
        """Look every token up by name; raises ``KeyError`` naming all missing tokens."""
        ids = {}
        missing = []
        for field_name, token in SPECIAL_TOKEN_NAMES.items():
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                missing.append(token)
            else:
                ids[field_name] = token_id
        if missing:
            raise KeyError(f"{source} has no special token(s) {', '.join(missing)}")
        return cls(**ids, pad=ids["end_of_text"])


class HiggsTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` loaded from a Llama-3-style ``tokenizer.json``.

    ``encode`` adds no special tokens of its own, but special-token strings inside the text ARE
    recognised as single tokens, exactly like ``PreTrainedTokenizerFast.encode(text,
    add_special_tokens=False)`` which Boson's ``prepare_chatml_sample`` calls.
    """

    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer"):
        self._tokenizer = tokenizer
        self.source = source
        self.special = SpecialTokens.from_tokenizer(tokenizer, source)

    @classmethod
    def from_path(cls, path: str | Path) -> HiggsTokenizer:
        """Load a ``tokenizer.json`` file, or a directory holding one."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise MissingInputError(f"no tokenizer.json at {path}")
        return cls(Tokenizer.from_file(str(file)), source=str(file))

    @classmethod
    def for_checkpoint(
        cls, checkpoint_dir: str | Path, tokenizer: str | Path | None = None
    ) -> HiggsTokenizer:
        """``tokenizer`` (a file or folder) if given, else the ``tokenizer.json`` an export keeps next to its
        weights; ``FileNotFoundError`` naming the path otherwise."""
        if tokenizer is not None:
            return cls.from_path(tokenizer)
        try:
            return cls.from_path(checkpoint_dir)
        except FileNotFoundError:
            raise MissingInputError(
                f"no tokenizer.json at {checkpoint_dir}; the checkpoint directory holds none, pass --tokenizer PATH"
            ) from None

    def fingerprint(self) -> str:
        """SHA-256 of the tokenizer's serialized form (vocabulary, merges, special tokens): names it in caches."""
        return hashlib.sha256(self._tokenizer.to_str().encode("utf-8")).hexdigest()

    @property
    def vocab_size(self) -> int:
        """Number of ids including the added special tokens (1024 for the tiny tokenizer, 128256 for Llama-3)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no BOS added; special-token strings in the text become their ids."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (special tokens kept by default, so layouts stay readable)."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """Id of one token by name; ``KeyError`` naming it when absent."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{self.source} has no token {token}")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        token = self._tokenizer.id_to_token(int(token_id))
        if token is None:
            raise KeyError(f"{self.source} has no id {token_id} (vocab size {self.vocab_size})")
        return token

    def check_against_model_config(self, hf_config: Mapping) -> None:
        """Check that a Higgs Audio ``config.json`` (as a dict) agrees with this tokenizer.

        Compares ``audio_in_token_idx``, ``audio_out_token_idx``, ``audio_out_bos_token_id``,
        ``audio_eos_token_id`` and ``pad_token_id`` with the ids looked up by name (a key the config
        omits means HiggsAudioConfig's default, see :data:`HIGGS_AUDIO_TOKEN_ID_DEFAULTS`), and requires
        ``vocab_size <= text_config.vocab_size``.

        Raises:
            ValueError: naming every mismatch at once.
        """
        problems = []
        for key, field_name in _CONFIG_KEY_TO_SPECIAL.items():
            config_id = hf_config.get(key, HIGGS_AUDIO_TOKEN_ID_DEFAULTS[key])
            token_id = getattr(self.special, field_name)
            if config_id != token_id:
                origin = "" if key in hf_config else " (absent, HiggsAudioConfig default)"
                token = SPECIAL_TOKEN_NAMES["end_of_text" if field_name == "pad" else field_name]
                problems.append(f"{key}={config_id}{origin} but the tokenizer has {token}={token_id}")
        text_config = hf_config.get("text_config")
        if not isinstance(text_config, Mapping) or "vocab_size" not in text_config:
            problems.append("text_config.vocab_size is missing")
        elif self.vocab_size > text_config["vocab_size"]:
            problems.append(
                f"tokenizer vocab size {self.vocab_size} exceeds the model's text_config.vocab_size="
                f"{text_config['vocab_size']}"
            )
        if problems:
            raise InvalidInputError(
                f"tokenizer {self.source} does not match the model config: " + "; ".join(problems)
            )
