"""tools/bench.py --small runs both sides (ours and Boson's reference step) on the same samples and
reports every figure (the numbers themselves are not asserted: CI machines vary)."""

from __future__ import annotations

import math

import pytest
from training_testing import load_tool


def test_bench_small_reports_both_sides(capsys):
    bench = load_tool("bench")
    result = bench.main(["--small"])
    for side in ("reference", "ours"):
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
    assert "| ours / reference |" in capsys.readouterr().out


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
