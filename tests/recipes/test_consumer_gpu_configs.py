"""configs/rtx24gb_lora.yaml (bf16 LoRA) and configs/rtx16gb_qlora.yaml (QLoRA, NF4 base): bad QLoRA
settings are config errors (`tune validate` of every shipped config: tests/cli/test_tune_command.py);
each config runs on CPU with the tiny model through `tune run` (its own settings otherwise: bf16, LoRA
targets and rank, activation checkpointing, NF4 options), resumes exactly and exports for Boson; the
memory estimate and the GPU check's consumer section."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from boson_multimodal.model.higgs_audio import HiggsAudioModel as BosonModel
from recipe_testing import ENV, REPO, TUNE, losses_by_step
from safetensors import safe_open

from higgs_tune.config import ConfigError, load_config, validate_config
from higgs_tune.models.higgs_audio.builders import higgs_audio_tiny
from higgs_tune.models.higgs_audio.lora import apply_lora, set_trainable
from higgs_tune.models.higgs_audio.qlora import quantize_lora_base_, quantized_modules

CONFIGS = ("rtx24gb_lora", "rtx16gb_qlora")
TOKENIZER = REPO / "higgs_tune" / "assets" / "tiny_tokenizer" / "tokenizer.json"
LORA_TARGET_WEIGHTS = ("self_attn.q_proj.weight", "mlp.down_proj.weight", "audio_mlp.gate_proj.weight")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune.mode=full"], "needs finetune.mode=lora"),
        (["finetune.quantize_base.block_size=0"], "block_size must be a positive int"),
        (["finetune.quantize_base.bits=4"], "unexpected keyword argument 'bits'"),
    ],
)
def test_bad_quantize_base_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(load_config(REPO / "configs" / "rtx16gb_qlora.yaml", overrides))


def tiny_run(name: str, output_dir: Path, synthetic: Path, *extra: str, nproc: int = 1) -> None:
    """Run the config on CPU with the tiny random model, short rows, eager steps, every step logged;
    assert that it succeeded (stderr's tail in the message)."""
    args = [
        TUNE,
        "run",
        *(["--nproc_per_node", str(nproc)] if nproc > 1 else []),
        "recipes/higgs_finetune",
        "--config",
        f"configs/{name}.yaml",
        f"output_dir={output_dir}",
        "device=cpu",
        "checkpointer.checkpoint_dir=null",
        "model=higgs_tune.models.higgs_audio.builders.higgs_audio_tiny",
        f"tokenizer.path={TOKENIZER}",
        f"dataset.path={synthetic / 'train.jsonl'}",
        "seq_len=256",
        "dataset.text_ffn_capacity=128",
        "dataset.audio_ffn_capacity=256",
        "dataset.text_target_capacity=64",
        "dataset.audio_target_capacity=256",
        "batch_size=2",
        "gradient_accumulation_steps=2",
        "num_workers=0",
        "compile=false",
        "log_every_n_steps=1",
        "optimizer.lr=1e-2",
        "lr_scheduler.num_warmup_steps=2",
        *(["finetune.quantize_base.scaler_block_size=16"] if "qlora" in name else []),
        *extra,
    ]
    result = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_trains_on_cpu_resumes_exactly_and_exports_for_boson(name, tmp_path, synthetic):
    common = ("max_steps=6", "save_every_n_steps=3", "keep_last_n_checkpoints=3")
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    tiny_run(name, reference, synthetic, *common)
    expected = losses_by_step(reference)
    assert sorted(expected) == list(range(1, 7)) and expected[6] < expected[1]

    step_3 = reference / "checkpoints" / "step_00000003"
    shutil.copytree(step_3, resumed / "checkpoints" / step_3.name)
    tiny_run(name, resumed, synthetic, *common, "resume_from_checkpoint=true")
    assert losses_by_step(resumed) == {s: expected[s] for s in (4, 5, 6)}  # exact

    # LoRA and QLoRA checkpoints hold only what trains: no base weight under an adapter (the base
    # loads from the config again on resume, the NF4 one is quantized again).
    keys = set(dcp.FileSystemReader(str(step_3)).read_metadata().state_dict_metadata)
    base_keys = {f"model.layers.0.{w}" for w in LORA_TARGET_WEIGHTS}
    assert {f"model.layers.0.{w.replace('.weight', '.lora_a.weight')}" for w in LORA_TARGET_WEIGHTS} <= keys
    assert not base_keys & keys, sorted(base_keys & keys)

    # The export: merged, bf16, Boson's keys; Boson's own loader finds nothing missing or unexpected.
    export = reference / "hf"
    for shard in sorted(export.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                assert "lora" not in key and f.get_slice(key).get_dtype() == "BF16", key
    _, info = BosonModel.from_pretrained(export, output_loading_info=True, attn_implementation="eager")
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert (reference / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.slow
def test_qlora_refuses_torchrun(tmp_path, synthetic):
    """QLoRA is single-process: with torchrun the recipe stops at model set-up, saying so."""
    with pytest.raises(AssertionError, match="QLoRA"):
        tiny_run("rtx16gb_qlora", tmp_path / "out", synthetic, "max_steps=1", nproc=2)


# ------------------------------------------------------------------------- tools/memory_estimate.py
def _estimate_tool():
    spec = importlib.util.spec_from_file_location("memory_estimate", REPO / "tools" / "memory_estimate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_memory_estimate_fits_each_config_on_its_card_with_margin(capsys):
    tool = _estimate_tool()
    lora = tool.main(["--config", "configs/rtx24gb_lora.yaml", "--card", "rtx24gb", "--json"])
    qlora = tool.main(["--config", "configs/rtx16gb_qlora.yaml", "--card", "rtx16gb", "--json"])
    capsys.readouterr()
    assert lora["headroom_gib"] > 2.0 and qlora["headroom_gib"] > 2.0
    assert qlora["setup_headroom_gib"] > 1.0  # the bf16 checkpoint fits before it is quantized
    # the NF4 bases: about a quarter of the same weights in bf16
    bf16_of_quantized = (
        lora["static"]["frozen/base weights (model dtype)"]
        - qlora["static"]["frozen/base weights (model dtype)"]
    )
    assert 0.25 < qlora["static"]["NF4 base weights"] / bf16_of_quantized < 0.27
    assert lora["trained_parameters"] == qlora["trained_parameters"] == 39_452_672  # r=16, 196 modules
    longer = tool.main(["--config", "configs/rtx16gb_qlora.yaml", "--json", "seq_len=8192"])
    capsys.readouterr()
    assert longer["peak_allocated"] > qlora["peak_allocated"]
    tool.main(["--config", "configs/rtx16gb_qlora.yaml", "--card", "rtx16gb"])
    assert "rtx16gb (16.0 GiB): headroom" in capsys.readouterr().out


def test_memory_estimate_counts_the_bytes_a_real_qlora_model_holds():
    """The static part of the estimate against the tensors of the same (tiny) model, built for real."""
    tool = _estimate_tool()
    overrides = [
        "model=higgs_tune.models.higgs_audio.builders.higgs_audio_tiny",
        "checkpointer.checkpoint_dir=null",
        "finetune.quantize_base.scaler_block_size=16",
    ]
    cfg = load_config(REPO / "configs" / "rtx16gb_qlora.yaml", overrides)
    static = tool.estimate(cfg)["static"]
    model = higgs_audio_tiny(dtype=torch.bfloat16)
    apply_lora(model, list(cfg.finetune.lora.targets), rank=cfg.finetune.lora.rank, alpha=16.0)
    quantize_lora_base_(model, **cfg.finetune.quantize_base)
    set_trainable(model, "lora")
    nf4 = 0
    for module in quantized_modules(model).values():
        weight = module.weight
        inner = (
            weight.quantized_data,
            weight.quantized_scalers,
            weight.quantization_factor,
            weight.scaler_mean,
        )
        nf4 += sum(t.numel() * t.element_size() for t in (*inner, weight.nf4))
    params = dict(model.named_parameters())
    assert static["NF4 base weights"] == nf4
    assert static["LoRA adapters"] == sum(p.numel() * 2 for n, p in params.items() if "lora_" in n)
    assert static["frozen/base weights (model dtype)"] == sum(
        p.numel() * 2 for n, p in params.items() if "lora_" not in n
    )
    assert static["gradients"] == sum(p.numel() * 2 for p in params.values() if p.requires_grad)


@pytest.mark.slow
def test_gpu_check_consumer_section_runs_both_configs_on_cpu(tmp_path):
    """tools/gpu_check.py's consumer-config section (CUDA: 3B, 20 steps), here with the tiny model on CPU."""
    out = tmp_path / "gpu_check.md"
    command = [sys.executable, "tools/gpu_check.py", "--device", "cpu", "--only-consumer"]
    command += ["--consumer-size", "tiny", "--consumer-steps", "2", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| rtx")]
    assert [row.split(" | ")[0] for row in rows] == ["| rtx24gb_lora", "| rtx16gb_qlora"]
    assert not any("FAILED" in row for row in rows), rows
