"""recipes/higgs_finetune end to end through the `tune` command, as a user types it (CPU, tiny model)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from boson_codec import SMALL_CONFIG, boson_serve_engine, write_boson_codec
from recipe_testing import (
    ENV,
    REPO,
    TUNE,
    losses_by_step,
    read_metrics,
    recipe_command,
    records_all,
    run_recipe,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from higgs_tune.data.document import AudioLayout
from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.generation import GenerationTokens, build_prompt, generate
from higgs_tune.models.audio_decoder import AudioCodecDecoder
from higgs_tune.models.higgs_audio.builders import from_checkpoint_dir
from higgs_tune.models.higgs_audio.checkpoint import read_hf_config

CODEBOOK_LOSS_KEYS = (
    "loss",
    "text_loss",
    "audio_loss",
    "codebook_loss",
    "codebook_accuracy",
    "text_accuracy",
)

pytestmark = pytest.mark.slow


def test_trains_logs_and_exports_a_boson_loadable_model(tmp_path: Path, synthetic: Path):
    out = tmp_path / "run"
    # Boson's audio tokenizer (random weights, written by Boson's code), small: hop 8 at 200 Hz.
    codec = tmp_path / "audio_tokenizer"
    write_boson_codec(codec, SMALL_CONFIG)
    run_recipe(
        out,
        synthetic,
        "max_steps=40",
        "batch_size=2",
        "optimizer.lr=0.01",
        "lr_scheduler.num_warmup_steps=5",
        "eval_every_n_steps=20",
        "generation.num_prompts=2",
        "generation.max_new_columns=40",
        "generation.every_n_steps=20",
        f"generation.audio_decoder={codec}",
    )
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 41))
    for key in (
        *CODEBOOK_LOSS_KEYS,
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "data_time_share",
        "skipped_samples",
        "peak_memory_gib",
    ):
        assert key in records[-1], key
    assert len(records[-1]["codebook_loss"]) == 8
    chance = math.log(1026)
    first, last = records[0], records[-1]
    assert first["audio_loss"] > 0.8 * chance  # an untrained head starts near chance: no target leak
    assert last["audio_loss"] < 0.75 * first["audio_loss"]
    assert last["loss"] < first["loss"]
    assert list((out / "logs").glob("events.out.tfevents.*"))
    assert (out / "config.yaml").is_file()
    validation = [r for r in records_all(out) if "val_loss" in r]
    assert [r["step"] for r in validation] == [20, 40]  # every eval_every_n_steps and at the end
    assert len(validation[-1]["val_codebook_accuracy"]) == 8
    generation = [r for r in records_all(out) if "generation_code_accuracy" in r]
    assert [r["step"] for r in generation] == [20, 40]  # every generation.every_n_steps and at the end
    assert len(generation[-1]["generation_code_accuracy_per_prompt"]) == 2
    for step in (20, 40):
        assert len(list((out / "generations" / f"step_{step:08d}").glob("sample_*.npy"))) == 2
    check_speech_logged(out, codec, num_prompts=2, steps=[20, 40])
    # the first held-out prompt (plain TTS), which the model above answered with speech
    first_val = json.loads((synthetic / "val.jsonl").read_text().splitlines()[0])
    check_boson_serve_engine(out / "hf", codec, first_val["messages"][:2])

    # The export loads unchanged in Boson's own model class, with no missing or unexpected keys.
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    model, info = HiggsAudioModel.from_pretrained(str(out / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert (out / "hf" / "tokenizer.json").is_file()
    with torch.no_grad():
        exported = dict(model.named_parameters())["audio_codebook_embeddings.weight"]
    assert torch.isfinite(exported).all()


def check_speech_logged(out: Path, codec: Path, num_prompts: int, steps: list[int]) -> None:
    """With ``generation.audio_decoder``: at every generation step, every generated and reference answer
    is a wav file and a TensorBoard audio record, and the generated one is the decoder's waveform of the
    saved codes."""
    decoder = AudioCodecDecoder.from_pretrained(codec)
    events = EventAccumulator(str(out / "logs"), size_guidance={"audio": 0})
    events.Reload()
    for index in range(num_prompts):
        for kind in ("generated", "reference"):
            records = events.Audio(f"generation/{index:03d}_{kind}")
            assert [record.step for record in records] == steps
            for step, record in zip(steps, records):
                folder = out / "generations" / f"step_{step:08d}"
                assert record.sample_rate == 200 and record.content_type == "audio/wav"
                with wave.open(str(folder / f"sample_{index:03d}_{kind}.wav")) as f:
                    assert f.getframerate() == 200 and f.getnframes() == record.length_frames
                    pcm = np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16)
                if kind == "generated":
                    codes = torch.from_numpy(np.load(folder / f"sample_{index:03d}.npy").astype(np.int64))
                    assert len(pcm) == codes.shape[1] * 8 > 0
                    expected = (decoder(codes[None])[0].clamp(-1, 1) * 32767).to(torch.int16).numpy()
                    assert np.abs(pcm.astype(np.int32) - expected).max() <= 1


def check_boson_serve_engine(export: Path, codec: Path, messages: list[dict]) -> None:
    """Boson's serve engine loads the export and the audio tokenizer folder unchanged; its greedy speech
    for ``messages`` (repetition-aware sampling off) has exactly the codes of our generation, and its
    waveform is our decoder's."""
    from boson_multimodal.data_types import ChatMLSample, Message
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

    engine = boson_serve_engine(export, codec)
    response = engine.generate(
        chat_ml_sample=ChatMLSample(messages=[Message(**m) for m in messages]),
        max_new_tokens=30,
        temperature=0.0,
        force_audio_gen=True,
        ras_win_len=None,
    )
    # The serve engine's own decode input: delay reverted, clipped, stream BOS/EOS columns dropped.
    codes = revert_delay_pattern(torch.as_tensor(response.generated_audio_tokens)).clip(0, 1023)[:, 1:-1]
    model = from_checkpoint_dir(export, dtype="fp32", device="cpu").eval()
    tokenizer = HiggsTokenizer.for_checkpoint(export, None)
    prompt = build_prompt(
        messages, tokenizer, AudioLayout.from_model_config(read_hf_config(export)), [], force_audio=True
    )
    ours = generate(model, prompt, GenerationTokens.from_tokenizer(tokenizer, model.args), max_new_columns=30)
    assert codes.shape[1] > 0 and torch.equal(ours.audio_codes[0], codes.to(ours.audio_codes[0].dtype))
    assert response.sampling_rate == 200
    waveform = AudioCodecDecoder.from_pretrained(codec)(codes[None].long())[0]
    torch.testing.assert_close(waveform, torch.from_numpy(response.audio), rtol=0, atol=1e-5)


def test_sampled_generation_during_training_leaves_the_training_unchanged(tmp_path: Path, synthetic: Path):
    """Generation every 2 steps, sampled from its own seeded generator, between the steps of the run: the
    loss curve is exactly the one of a run that never generates (CPU eager)."""
    common = ("max_steps=4", "batch_size=2", "generation.max_new_columns=20")
    run_recipe(tmp_path / "quiet", synthetic, *common)
    run_recipe(
        tmp_path / "speaking",
        synthetic,
        *common,
        "generation.num_prompts=1",
        "generation.every_n_steps=2",
        "generation.sampling={greedy: false, temperature: 1.0, top_k: 20}",
    )
    assert losses_by_step(tmp_path / "speaking") == losses_by_step(tmp_path / "quiet")
    generation = [r for r in records_all(tmp_path / "speaking") if "generation_code_accuracy" in r]
    assert [r["step"] for r in generation] == [2, 4]
    for step in (2, 4):
        codes = np.load(tmp_path / "speaking" / "generations" / f"step_{step:08d}" / "sample_000.npy")
        assert codes.shape[0] == 8 and codes.min() >= 0 and codes.max() < 1024


def test_sigkill_and_resume_continues_the_loss_curve_exactly(tmp_path: Path, synthetic: Path):
    """Kill -9 after the step-4 checkpoint; resume; per-step losses equal an uninterrupted run's (CPU eager:
    identical values, compared exactly)."""
    common = ("max_steps=16", "batch_size=2", "save_every_n_steps=4", "keep_last_n_checkpoints=2")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_recipe(reference, synthetic, *common)

    process = subprocess.Popen(
        recipe_command(killed, synthetic, *common),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while not (killed / "checkpoints" / "step_00000004").is_dir():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    logged_before_kill = max(losses_by_step(killed))
    assert logged_before_kill < 16, "the kill came too late to test anything"

    run_recipe(killed, synthetic, *common, "resume_from_checkpoint=true")
    expected, resumed = losses_by_step(reference), losses_by_step(killed)
    assert sorted(resumed) == list(range(1, 17))
    assert resumed == expected  # exact


def test_a_user_copy_of_recipe_and_config_runs_after_editing(tmp_path: Path, synthetic: Path):
    """How users work: `tune cp` the recipe and a config, edit them, run the copy."""
    work = tmp_path / "my_project"
    work.mkdir()
    for name, dest in (("higgs_finetune", "my_finetune.py"), ("cpu_tiny", "my_config.yaml")):
        copied = subprocess.run([TUNE, "cp", name, dest], cwd=work, env=ENV, capture_output=True, text=True)
        assert copied.returncode == 0, copied.stderr
    config = (work / "my_config.yaml").read_text()
    # another LR schedule: torchtune's constant schedule with warm-up instead of the cosine one
    config = config.replace(
        "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
        "torch.optim.lr_scheduler.ConstantLR",
    ).replace("  num_warmup_steps: 20", "  factor: 0.5\n  total_iters: 2")
    (work / "my_config.yaml").write_text(config)
    recipe = (work / "my_finetune.py").read_text()
    recipe = recipe.replace(
        "cfg.lr_scheduler, self.optimizer, num_training_steps=self.total_steps",
        "cfg.lr_scheduler, self.optimizer",
    )
    (work / "my_finetune.py").write_text(recipe)

    out = work / "out"
    args = recipe_command(out, synthetic, "max_steps=3", "batch_size=2")
    args[args.index("recipes/higgs_finetune")] = "my_finetune.py"
    args[args.index("configs/cpu_tiny.yaml")] = "my_config.yaml"
    tokenizer = REPO / "higgs_tune" / "assets" / "tiny_tokenizer" / "tokenizer.json"
    result = subprocess.run(
        [*args, f"tokenizer.path={tokenizer}"], cwd=work, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lrs = [record["lr"] for record in read_metrics(out)]
    assert lrs == pytest.approx([1.5e-3, 1.5e-3, 3.0e-3])  # ConstantLR: halved for 2 steps, then full


def test_optimizer_in_backward_with_bf16_moments_trains_and_resumes_exactly(tmp_path: Path, synthetic: Path):
    """The memory-saving optimizer from YAML: the recipe picks the optimizer_in_backward step; its
    per-parameter state goes through the DCP checkpoint and the run resumes with identical losses."""
    common = (
        "max_steps=6",
        "batch_size=2",
        "save_every_n_steps=3",
        "optimizer.in_backward=true",
        "optimizer.moment_dtype=bf16",
        "optimizer.lr_as_tensor=false",
        "max_grad_norm=null",
    )
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_recipe(reference, synthetic, *common, "keep_last_n_checkpoints=3")
    expected = losses_by_step(reference)
    assert sorted(expected) == list(range(1, 7)) and expected[6] < expected[1]
    step_3 = reference / "checkpoints" / "step_00000003"
    shutil.copytree(step_3, resumed / "checkpoints" / step_3.name)
    run_recipe(resumed, synthetic, *common, "resume_from_checkpoint=true")
    assert losses_by_step(resumed) == {s: expected[s] for s in (4, 5, 6)}  # exact
