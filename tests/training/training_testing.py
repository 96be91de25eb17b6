"""Test helpers for the training step: real packed batches of a tiny synthetic TTS set, tiny models,
the loss, and optimizers that every step mode accepts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from higgs_tune.data.dataset import build_dataloader, build_higgs_dataset
from higgs_tune.data.document import AudioLayout
from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.loss import aligned_loss
from higgs_tune.models.higgs_audio.builders import higgs_audio_tiny

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_PATH = REPO / "higgs_tune" / "assets" / "tiny_tokenizer" / "tokenizer.json"
SEQ_LEN = 256
BATCH_SIZE = 2


def load_tool(name: str):
    """Import tools/<name>.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_manifest(root: Path, num_samples: int = 48, seed: int = 0) -> Path:
    """A synthetic TTS manifest (tools/make_synthetic.py) under ``root``; returns train.jsonl."""
    load_tool("make_synthetic").make_synthetic(root, num_samples=num_samples, num_val=2, seed=seed)
    return root / "train.jsonl"


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return higgs_audio_tiny(**overrides)


def real_batches(manifest: Path, model: torch.nn.Module, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` packed micro-batches [B=2, L=256] from the real data pipeline, in file order."""
    tokenizer = HiggsTokenizer.from_path(str(TOKENIZER_PATH))
    layout = AudioLayout.from_model_config(model.args.to_hf_config())
    train, _, _ = build_higgs_dataset(
        tokenizer, path=str(manifest), seq_len=SEQ_LEN, batch_size=BATCH_SIZE, audio_layout=layout
    )
    loader = build_dataloader(train, train.spec, seed=0, shuffle=False, num_workers=0)
    batches = [batch for _, batch in zip(range(count), loader)]
    if len(batches) < count:
        raise ValueError(f"{manifest} gives {len(batches)} batches, the test needs {count}")
    return batches


def transform_safe_loss(**kwargs) -> aligned_loss.AlignedLoss:
    """AlignedLoss usable under torch.func (no activation checkpoint, so no saved-tensor hooks)."""
    return aligned_loss.AlignedLoss(checkpoint_text_chunks=False, **kwargs)
