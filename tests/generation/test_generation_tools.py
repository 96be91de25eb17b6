"""tools/evaluate.py and tools/generate.py on a tiny random checkpoint and a small synthetic manifest.

evaluate.py's numbers must equal Boson's reference loss formula (``higgs_tune.loss.reference``) computed
from Boson's model outputs on the same documents, one document at a time, aggregated as token means over
the manifest (sum of per-document CE sums / total counts).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from boson_codec import SMALL_CONFIG, write_boson_codec

from higgs_tune import boson_reference as reference
from higgs_tune.data.batch import IGNORE_INDEX, PackingSpec
from higgs_tune.data.dataset import build_dataloader, build_higgs_dataset
from higgs_tune.data.document import AudioLayout
from higgs_tune.data.manifest import read_codes, resolve_codes_path
from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.evaluation import evaluate
from higgs_tune.loss import AlignedLoss
from higgs_tune.loss.reference import reference_loss
from higgs_tune.models.audio_decoder import AudioCodecDecoder
from higgs_tune.models.higgs_audio.builders import from_checkpoint_dir, higgs_audio_tiny
from higgs_tune.models.higgs_audio.checkpoint import save_model

pytest.importorskip("transformers")
pytest.importorskip("boson_multimodal")
from boson_multimodal.model.higgs_audio import HiggsAudioModel as BosonModel  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
TINY_TOKENIZER = REPO / "higgs_tune" / "assets" / "tiny_tokenizer"
SHARPNESS = 20.0
BOSON_TOKENIZER = reference.boson_tokenizer(TINY_TOKENIZER / "tokenizer.json")


def load_tool(name: str):
    """Import tools/<name>.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synthetic manifest (every sample kind), a tiny random checkpoint with its tokenizer, Boson's copy."""
    root = tmp_path_factory.mktemp("tools")
    counts = load_tool("make_synthetic").make_synthetic(root / "data", num_samples=10, num_val=5, seed=8)
    assert all(counts.values()), counts  # seed 8: every sample kind among the 10
    torch.manual_seed(0)
    model = higgs_audio_tiny(dtype=torch.float32)
    with torch.no_grad():  # sharp heads: per-token CE spreads widely, so a wrong aggregation shows
        model.audio_decoder_proj.text_lm_head.weight.mul_(SHARPNESS)
        model.audio_decoder_proj.audio_lm_head.weight.mul_(SHARPNESS)
    checkpoint = save_model(model, root / "ckpt")
    shutil.copy(TINY_TOKENIZER / "tokenizer.json", checkpoint / "tokenizer.json")
    boson = BosonModel.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    return root, checkpoint, boson


def boson_collator(model):
    config = model.config
    return reference.boson_training_collator(
        audio_in_token_id=config.audio_in_token_idx,
        audio_out_token_id=config.audio_out_token_idx,
        pad_token_id=config.pad_token_id,
        layout=AudioLayout.from_model_config(config.to_dict()),
    )


def audio_paths(sample: dict) -> list[str]:
    """The ``audio_codes`` paths of a sample's audio items, in order of appearance."""
    return [
        item["audio_codes"]
        for message in sample["messages"]
        for item in (message["content"] if isinstance(message["content"], list) else [message["content"]])
        if isinstance(item, dict) and item.get("type") == "audio"
    ]


def boson_reference_totals(boson, manifest: Path) -> dict:
    """Per-document reference loss on Boson's outputs, turned into CE sums and counts, summed over documents."""
    collator = boson_collator(boson)
    num_codebooks = boson.config.audio_num_codebooks
    text_sum, text_count = 0.0, 0
    audio_sum, audio_count = np.zeros(num_codebooks), np.zeros(num_codebooks, dtype=np.int64)
    for line in manifest.read_text().splitlines():
        sample = json.loads(line)
        codes = [
            read_codes(resolve_codes_path(manifest, path)).astype(np.int64) for path in audio_paths(sample)
        ]
        batch = collator([reference.boson_dataset_sample(sample, codes, BOSON_TOKENIZER, num_codebooks)])
        with torch.no_grad():
            out = boson(**reference.boson_model_inputs(batch))
        # A document without audio-out (transcription) gets an empty [0, 0] label tensor from Boson's collator
        label_audio_ids = batch.label_audio_ids.reshape(num_codebooks, -1)
        ref = reference_loss(
            out.logits,
            out.expanded_labels,
            out.audio_logits,
            label_audio_ids,
            batch.audio_out_ids_start,
        )
        n_text = int((out.expanded_labels[:, 1:] != IGNORE_INDEX).sum())
        labels = label_audio_ids.clone()
        labels[:, batch.audio_out_ids_start] = IGNORE_INDEX
        n_audio = (labels[:, 1:] != IGNORE_INDEX).sum(1).numpy()
        text_sum += float(ref.text_loss) * n_text
        text_count += n_text
        audio_sum += ref.codebook_losses.double().numpy() * n_audio
        audio_count += n_audio
    codebook_losses = audio_sum / audio_count
    return {
        "text_loss": text_sum / text_count,
        "codebook_losses": codebook_losses,
        "audio_loss": codebook_losses.mean(),
        "n_text": text_count,
        "n_audio": audio_count,
    }


@pytest.mark.parametrize("batch_size,seq_len", [(1, 160), (2, 200)])
def test_evaluate_equals_boson_reference_loss_over_the_manifest(setup, capsys, batch_size, seq_len):
    root, checkpoint, boson = setup
    manifest = root / "data" / "train.jsonl"
    options = f"--batch-size {batch_size} --seq-len {seq_len} --device cpu".split()
    load_tool("evaluate").main(["--checkpoint", str(checkpoint), "--data", str(manifest), *options])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for (
        key
    ) in "text_loss audio_loss codebook_losses text_accuracy codebook_accuracies n_text n_audio".split():
        assert key in result
    assert len(result["codebook_losses"]) == len(result["codebook_accuracies"]) == 8
    assert result["num_documents"] == 10

    expected = boson_reference_totals(boson, manifest)
    assert result["n_text"] == expected["n_text"]
    assert result["n_audio"] == expected["n_audio"].tolist()
    assert result["text_loss"] == pytest.approx(expected["text_loss"], abs=1e-4)
    assert result["audio_loss"] == pytest.approx(expected["audio_loss"], abs=1e-4)
    np.testing.assert_allclose(result["codebook_losses"], expected["codebook_losses"], atol=1e-4)
    assert result["loss"] == pytest.approx(expected["text_loss"] + expected["audio_loss"], abs=1e-4)
    assert result["num_batches"] > 1  # the global token mean spans several batches
    assert 0.0 <= result["text_accuracy"] <= 1.0
    assert all(0.0 <= a <= 1.0 for a in result["codebook_accuracies"])


def test_evaluate_refuses_documents_longer_than_seq_len(setup):
    root, checkpoint, _ = setup
    with pytest.raises(Exception, match="does not fit in one row"):
        load_tool("evaluate").main(
            ["--checkpoint", str(checkpoint), "--data", str(root / "data" / "train.jsonl"), "--seq-len", "16"]
        )


def test_generate_tool_runs_as_a_script(setup, tmp_path):
    root, checkpoint, _ = setup
    out = tmp_path / "codes.npy"
    command = [sys.executable, str(TOOLS / "generate.py"), "--checkpoint", str(checkpoint), "--out", str(out)]
    command += ["--text", "the red cat", *"--max-new-columns 14 --device cpu".split()]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["stopped_by"] == "max_new_columns" and summary["num_steps"] == 14
    # forced speech: the first step is the all-BOS column, then 13 sampled columns -> 13 - 8 codes so far
    assert summary["generated_text_ids"] == [784]  # <|AUDIO_OUT|>, one per segment
    assert summary["segments"] == [[8, 14 - 8 - 1]]
    codes = np.load(out)
    assert codes.shape == (8, 5) and codes.min() >= 0 and codes.max() < 1024
    assert summary["wav"] is None


def test_generate_tool_writes_the_waveform_with_an_audio_decoder(setup, tmp_path):
    root, checkpoint, _ = setup
    codec = tmp_path / "audio_tokenizer"
    write_boson_codec(codec, SMALL_CONFIG)  # Boson's format and code, random weights, hop 8 at 200 Hz
    out = tmp_path / "codes.npy"
    summary = load_tool("generate").main(
        ["--checkpoint", str(checkpoint), "--out", str(out), "--text", "the red cat"]
        + ["--max-new-columns", "14", "--device", "cpu", "--audio-decoder", str(codec)]
    )
    assert summary["wav"] == str(tmp_path / "codes.wav")
    codes = torch.from_numpy(np.load(out).astype(np.int64))
    with wave.open(summary["wav"]) as f:
        assert (f.getframerate(), f.getnframes()) == (200, codes.shape[1] * 8)
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16).astype(np.int32)
    waveform = AudioCodecDecoder.from_pretrained(codec)(codes[None])[0]
    assert np.abs(pcm - (waveform.clamp(-1, 1) * 32767).to(torch.int16).numpy()).max() <= 1
    with pytest.raises(SystemExit, match="--audio-decoder: .*config.json not found"):
        load_tool("generate").main(
            ["--checkpoint", str(checkpoint), "--text", "x", "--audio-decoder", str(tmp_path / "none")]
        )


def test_decode_codes_tool(tmp_path):
    codec = tmp_path / "audio_tokenizer"
    write_boson_codec(codec, SMALL_CONFIG)
    codes = np.random.default_rng(0).integers(0, 1024, size=(2, 8, 5)).astype(np.int16)
    for i in range(2):
        np.save(tmp_path / f"c{i}.npy", codes[i])
    summary = load_tool("decode_codes").main(
        [str(tmp_path / "c0.npy"), str(tmp_path / "c1.npy"), "--audio-decoder", str(codec)]
        + ["--out-dir", str(tmp_path / "wav")]
    )
    assert summary["wav"] == [str(tmp_path / "wav" / "c0.wav"), str(tmp_path / "wav" / "c1.wav")]
    decoder = AudioCodecDecoder.from_pretrained(codec)
    for i, path in enumerate(summary["wav"]):
        with wave.open(path) as f:
            assert (f.getframerate(), f.getnframes()) == (200, 5 * 8)
            pcm = np.frombuffer(f.readframes(40), dtype=np.int16).astype(np.int32)
        waveform = decoder(torch.from_numpy(codes[i].astype(np.int64))[None])[0]
        assert np.abs(pcm - (waveform.clamp(-1, 1) * 32767).to(torch.int16).numpy()).max() <= 1
    np.save(tmp_path / "bad.npy", np.full((8, 3), 1025, dtype=np.int16))  # stream EOS ids left in
    with pytest.raises(SystemExit, match="bad.npy: code values span 1025..1025"):
        load_tool("decode_codes").main([str(tmp_path / "bad.npy"), "--audio-decoder", str(codec)])


def test_generate_tool_from_a_manifest_voice_clone_prompt(setup, tmp_path, capsys):
    root, checkpoint, _ = setup
    manifest = root / "data" / "val.jsonl"  # val sample 2 is a voice_clone sample (kinds cycle)
    sample = json.loads(manifest.read_text().splitlines()[2])
    assert sample["misc"]["kind"] == "voice_clone"
    out = tmp_path / "clone.npy"
    paths = ["--checkpoint", str(checkpoint), "--tokenizer", str(TINY_TOKENIZER), "--manifest", str(manifest)]
    options = "--index 2 --temperature 0.9 --top-k 40 --top-p 0.9 --max-new-columns 12 --device cpu".split()
    summary = load_tool("generate").main([*paths, *options, "--text", "one blue fish", "--out", str(out)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert summary["segments"] == [[8, 12 - 8 - 1]] and np.load(out).shape == (8, 3)
    # the prompt holds the reference exchange (system, user, assistant audio) and the new user text
    reference_columns = read_codes(
        resolve_codes_path(manifest, sample["messages"][2]["content"]["audio_codes"])
    )
    assert summary["prompt_positions"] > reference_columns.shape[1] + 8


def packed_loader(root: Path, seq_len: int = 200):
    """The synthetic training manifest as evaluation batches (one row each, every row once, in order)."""
    dataset, _, _ = build_higgs_dataset(
        HiggsTokenizer.from_path(TINY_TOKENIZER),
        path=str(root / "data" / "train.jsonl"),
        seq_len=seq_len,
        batch_size=1,
        too_long="error",
    )
    spec = PackingSpec(seq_len=seq_len, batch_size=1)
    return build_dataloader(dataset, spec, seed=0, shuffle=False, num_workers=0, drop_last=False)


def test_evaluate_with_a_process_group_and_a_loader_that_does_not_replay(setup, tmp_path):
    root, checkpoint, _ = setup
    model = from_checkpoint_dir(checkpoint, dtype=torch.float32)
    alone = evaluate(model, packed_loader(root), AlignedLoss(), "cpu")
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        grouped = evaluate(model, packed_loader(root), AlignedLoss(), "cpu", torch.distributed.group.WORLD)
    finally:
        torch.distributed.destroy_process_group()
    assert grouped == alone

    class ShrinkingLoader:
        """Yields one batch fewer on every new pass (a loader that does not replay the same rows)."""

        def __init__(self, batches):
            self.batches = list(batches)

        def __iter__(self):
            batches, self.batches = self.batches, self.batches[:-1]
            return iter(batches)

    with pytest.raises(ValueError, match="two passes over the loader saw different targets"):
        evaluate(model, ShrinkingLoader(packed_loader(root)), AlignedLoss(), "cpu")


def test_generate_tool_batches_several_manifest_samples(setup, tmp_path):
    """``--indices``: several samples in batches of ``--batch-size``, each exactly as generated alone with
    the seed of its rank in the list (its own generator; repetition-aware sampling on by default)."""
    root, checkpoint, _ = setup
    manifest = root / "data" / "val.jsonl"
    common = ["--checkpoint", str(checkpoint), "--manifest", str(manifest), "--device", "cpu"]
    common += ["--max-new-columns", "16"]
    indices = [0, 2, 3]
    summary = load_tool("generate").main(
        [*common, "--indices", *map(str, indices), "--batch-size", "2", "--out", str(tmp_path / "batch")]
    )
    assert [r["index"] for r in summary["results"]] == indices
    for rank, (index, result) in enumerate(zip(indices, summary["results"])):
        assert result["codes_files"][0] == str(tmp_path / "batch" / f"sample_{index}.npy")
        alone = load_tool("generate").main(
            [
                *common,
                "--index",
                str(index),
                "--seed",
                str(rank),
                "--out",
                str(tmp_path / f"alone_{index}.npy"),
            ]
        )
        assert {k: v for k, v in result.items() if k not in ("index", "codes_files")} == {
            k: v for k, v in alone.items() if k != "codes_files"
        }
        assert np.array_equal(np.load(result["codes_files"][0]), np.load(alone["codes_files"][0]))
