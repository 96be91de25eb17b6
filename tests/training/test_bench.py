"""tools/bench.py --small runs its sides (ours, ours with text weight 0, Boson's reference step) on the
same samples and reports every figure (the numbers themselves are not asserted: CI machines vary); the
batches it hands transformers' port hold exactly our positions and targets (the port itself needs a
virtualenv with transformers>=5.3: skipped without one)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from training_testing import load_tool

# The port's virtualenv as tools/bench.py documents it (or HIGGS_TUNE_HF_PYTHON).
REPO = Path(__file__).resolve().parents[2]
HF_PYTHON = os.environ.get("HIGGS_TUNE_HF_PYTHON", str(REPO / ".venv-hf" / "bin" / "python"))


def test_bench_small_reports_every_side(capsys):
    bench = load_tool("bench")
    result = bench.main(["--small", "--audio-only"])
    for side in ("reference", "ours", "ours_audio"):
        figures = result[side]
        assert figures["step_s"] > 0 and math.isfinite(figures["tokens_per_s"])
        assert len(figures["step_times"]) == 2  # --small: 1 warm-up + 2 timed steps, interleaved
        assert figures["peak_rss_gib"] > 0
        assert all(math.isfinite(loss) for loss in figures["losses"])
        # The same samples on both sides: the first losses of two random models agree to within a few nats.
        assert 5.0 < figures["losses"][0] < 30.0
    # Counted independently (our num_tokens vs Boson's merged length): both sides see the same positions.
    assert result["ours"]["tokens_per_step"] == result["reference"]["tokens_per_step"]
    assert set(result["ratio"]) == {"tokens_per_s", "step_time", "peak_memory"}
    # Text weight 0 trains on the audio loss alone: its loss is below the text + audio loss.
    assert result["ours_audio"]["losses"][0] < result["ours"]["losses"][0]
    output = capsys.readouterr().out
    assert "| ours / reference |" in output and "| ours, `loss.text_weight=0` |" in output


def test_port_batches_hold_our_documents_positions_and_targets(tmp_path):
    bench = load_tool("bench")
    cfg = bench.CONFIGS["small"]
    args = bench.model_args(cfg)
    dataset, _ = bench.build_rows(cfg, tmp_path, args)
    (ours,) = bench.our_batches(dataset, bench.step_rows(dataset, 1, cfg.batch_size))
    port = bench.port_inputs(ours, args.codebook_size, args.audio_out_token_id, args.pad_token_id)
    documents = sum(len(ours["doc_ids"][r, : int(n)].unique()) for r, n in enumerate(ours["num_tokens"]))
    assert port["input_ids"].shape[0] == documents  # one whole sample per row, right-padded
    assert int(port["attention_mask"].sum()) == int(ours["num_tokens"].sum())
    audio_columns = int((ours["audio_in_mask"] | ours["audio_out_mask"]).sum())
    assert int(port["audio_input_ids_mask"].sum()) == audio_columns
    placeholders = (port["input_ids"] == args.audio_out_token_id) & (port["attention_mask"] == 1)
    assert int(placeholders.sum()) == audio_columns
    # The port shifts labels inside its loss: its labels at t+1 are our targets at t, all of them.
    assert int((port["labels"] != -100).sum()) == int(ours["num_text_targets"].sum())
    assert int((port["audio_labels"] != -100).sum()) == int(ours["num_audio_targets"].sum())
    assert int(port["audio_labels"].max()) < args.codebook_size


@pytest.mark.slow
@pytest.mark.skipif(not Path(HF_PYTHON).is_file(), reason=f"no transformers>=5.3 virtualenv at {HF_PYTHON}")
def test_bench_small_runs_transformers_port(capsys):
    bench = load_tool("bench")
    result = bench.main(["--small", "--hf-python", HF_PYTHON])
    for side in ("port", "port_audio"):
        assert result[side]["peak_rss_gib"] > 0 and math.isfinite(result[side]["tokens_per_s"])
        assert all(math.isfinite(loss) for loss in result[side]["losses"])
    assert result["port"]["losses"][0] > result["port_audio"]["losses"][0]  # + the text loss
    assert {"ratio_ours_port", "ratio_ours_audio_port_audio"} <= set(result)
    assert "| ours text_weight=0 / port audio only |" in capsys.readouterr().out
    assert torch.isfinite(torch.tensor(result["ours_audio"]["losses"])).all()


@pytest.mark.slow
def test_bench_small_runs_optimizer_in_backward_with_bf16_moments(capsys):
    bench = load_tool("bench")
    result = bench.main(["--small", "--mode", "optimizer_in_backward", "--our-optimizer", "adamw_bf16"])
    assert result["settings"]["mode"] == "optimizer_in_backward"
    assert result["settings"]["our_optimizer"] == "adamw_bf16"
    ours = result["ours"]
    assert ours["peak_rss_gib"] > 0 and math.isfinite(ours["tokens_per_s"])
    assert len(ours["losses"]) == 3 and all(math.isfinite(loss) for loss in ours["losses"])
    assert abs(ours["losses"][0] - result["reference"]["losses"][0]) < 5.0  # same samples, same init scale
    assert "`optimizer_in_backward` with adamw_bf16" in capsys.readouterr().out
