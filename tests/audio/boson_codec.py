"""Boson's audio tokenizer (``HiggsAudioTokenizer``), the oracle of the audio-decoder tests.

Boson's module cannot be imported as it is on this torch: it imports torchaudio (no release for torch
2.13), descript-audiotools (needs torchaudio) and descript-audio-codec's package ``__init__`` (needs
audiotools), and its constructor downloads HuBERT. None of these is on the decode path, so this module
stands in for them before importing Boson's code:

- ``torchaudio``: a module whose ``functional.resample`` is torchaudio's own, executed from its released
  source (``torchaudio_oracle.py``; Boson uses torchaudio only there, to resample for HuBERT in ``encode``);
- ``audiotools``: ``AudioSignal`` and ``ml.BaseModel`` names (the DAC file's base classes for its own
  save/load and ``compress``; Boson builds only the DAC ``Encoder``/``Decoder``, plain ``nn.Module``s);
- ``dac``: the installed descript-audio-codec package without running its ``__init__`` (so
  ``dac.nn.layers``/``dac.nn.quantize``, the real Snake and weight-norm convolutions, load as they are);
- ``vector_quantize_pytorch.ResidualFSQ``: only for FSQ quantizers, which the released tokenizer is not;
- ``AutoModel.from_pretrained("bosonai/hubert_base")``: a small random HuBERT of HuBERT-base's layout (the
  same convolutional front end, 20 ms frames at 16 kHz, and hidden size 768, which Boson's tokenizer
  hard-codes; two transformer layers instead of twelve), saved by :func:`write_hubert_folder` as a
  stand-in for a local ``bosonai/hubert_base``.

Everything else (the DAC encoder and decoder, the semantic encoder, RVQ, ``fc_prior``/``fc_post2``,
``encode``/``decode`` themselves and ``load_higgs_audio_tokenizer``) is Boson's and descript's code,
unchanged; so is Boson's serve engine (:func:`boson_serve_engine`), which imports the tokenizer module.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from unittest import mock

import torch
import torchaudio_oracle
from torch import nn

# Boson's released config.json (bosonai/higgs-audio-v2-tokenizer).
RELEASED_CONFIG = {
    "n_filters": 32,
    "D": 256,
    "codebook_dim": 64,
    "target_bandwidths": [0.5, 1, 1.5, 2, 4],
    "ratios": [8, 5, 4, 2, 3],
    "sample_rate": 24000,
    "bins": 1024,
    "n_q": 8,
    "semantic_techer": "hubert_base_general",
    "semantic_sample_rate": 16000,
}

# The same architecture, small and fast for end-to-end tests: hop 8 at 200 Hz (still 25 frames/s).
SMALL_CONFIG = {**RELEASED_CONFIG, "D": 32, "codebook_dim": 8, "ratios": [4, 2], "sample_rate": 200}


def _import_shims() -> dict[str, types.ModuleType]:
    """Stand-in modules by name (see the module docstring)."""
    audiotools = types.ModuleType("audiotools")
    ml = types.ModuleType("audiotools.ml")

    class BaseModel(nn.Module):
        INTERN: list[str] = []
        EXTERN: list[str] = []

    ml.BaseModel = BaseModel
    audiotools.ml = ml
    audiotools.AudioSignal = type("AudioSignal", (), {})
    torchaudio = types.ModuleType("torchaudio")
    torchaudio.functional = types.SimpleNamespace(resample=torchaudio_oracle.resample)
    shims = {"torchaudio": torchaudio, "audiotools": audiotools, "audiotools.ml": ml}
    spec = importlib.util.find_spec("dac")
    if spec is None or spec.origin is None:
        raise ImportError("descript-audio-codec is not installed (README: the test install line)")
    root = Path(spec.origin).parent
    for name, folder in (("dac", root), ("dac.nn", root / "nn")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        shims[name] = package
    vqp = types.ModuleType("vector_quantize_pytorch")
    vqp.ResidualFSQ = type("ResidualFSQ", (), {})
    shims["vector_quantize_pytorch"] = vqp
    return shims


@functools.cache
def _import_with_shims(name: str) -> types.ModuleType:
    """Import module ``name`` with the stand-ins of the module docstring; they (and the modules imported
    meanwhile) are in ``sys.modules`` only during this import, so no other test sees them."""
    # Boson's model, data and collator modules need no stand-in: imported first, they stay shared.
    import boson_multimodal.data_collator.higgs_audio_collator  # noqa: F401
    import boson_multimodal.dataset.chatml_dataset  # noqa: F401
    import boson_multimodal.model.higgs_audio  # noqa: F401
    import transformers  # noqa: F401  (before the torchaudio stand-in: it probes for torchaudio)

    with mock.patch.dict(sys.modules, _import_shims()):
        return importlib.import_module(name)


def boson_tokenizer_module() -> types.ModuleType:
    """``boson_multimodal.audio_processing.higgs_audio_tokenizer`` (see the module docstring)."""
    return _import_with_shims("boson_multimodal.audio_processing.higgs_audio_tokenizer")


def boson_serve_engine(model_dir: Path, audio_tokenizer_dir: Path):
    """Boson's ``HiggsAudioServeEngine`` on CPU in fp32, as its users build it: the model folder (with its
    tokenizer files) and the audio tokenizer folder."""
    module = _import_with_shims("boson_multimodal.serve.serve_engine")
    with mock.patch("transformers.AutoModel.from_pretrained", _tiny_hubert):
        return module.HiggsAudioServeEngine(
            str(model_dir),
            str(audio_tokenizer_dir),
            device="cpu",
            torch_dtype=torch.float32,
            kv_cache_lengths=[1024],
        )


def _tiny_hubert(*args, **kwargs) -> nn.Module:
    from transformers import HubertConfig, HubertModel

    config = HubertConfig(
        hidden_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=16,
    )
    return HubertModel(config)


def write_hubert_folder(folder: Path) -> Path:
    """The stand-in HuBERT (random weights) saved as a local ``bosonai/hubert_base`` folder would be."""
    _tiny_hubert().save_pretrained(folder)
    return folder


def write_boson_codec(folder: Path, config: dict | None = None, seed: int = 0) -> nn.Module:
    """Build Boson's ``HiggsAudioTokenizer`` with random weights and save it as Boson publishes it
    (``config.json`` + ``model.pth``, the full state dict) in ``folder``; returns the model.

    The RVQ codebooks start at zero in Boson's code (k-means initialisation at the first batch it
    quantizes, unless ``inited`` is set), so they are drawn at random and marked initialised here, as a
    trained checkpoint has them; otherwise every code would decode to the same sound.
    """
    module = boson_tokenizer_module()
    config = dict(RELEASED_CONFIG if config is None else config)
    torch.manual_seed(seed)
    with mock.patch("transformers.AutoModel.from_pretrained", _tiny_hubert):
        model = module.HiggsAudioTokenizer(**config, device="cpu")
    with torch.no_grad():
        for layer in model.quantizer.vq.layers:
            layer._codebook.embed.normal_()
            layer._codebook.inited.fill_(1.0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), folder / "model.pth")
    return model.eval()


def load_boson_codec(folder: Path) -> nn.Module:
    """Boson's own loader (``load_higgs_audio_tokenizer``) on ``folder``, on CPU."""
    module = boson_tokenizer_module()
    with mock.patch("transformers.AutoModel.from_pretrained", _tiny_hubert):
        return module.load_higgs_audio_tokenizer(str(folder), device="cpu")
