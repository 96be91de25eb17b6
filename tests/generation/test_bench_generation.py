"""tools/bench_generation.py runs (tiny architecture, a few columns) and its sides agree on the codes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def test_bench_generation_smoke():
    spec = importlib.util.spec_from_file_location("tool_bench_generation", TOOLS / "bench_generation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    results = module.main(
        "--config small --columns 12 --prompt-positions 120 --batch-sizes 1 2 --sides reference cached".split()
        + ["--repeats", "1"]
    )
    assert [(r["side"], r["batch_size"]) for r in results] == [
        ("reference", 1),
        ("cached", 1),
        ("reference", 2),
        ("cached", 2),
    ]
    for r in results:
        assert r["prompt_positions"] == 120 and r["columns"] == 12 and r["columns_per_s"] > 0
        # "seconds" is rounded to 1 ms and the factor to 1e-4: allow exactly those roundings.
        rounding = 25 * 0.0005 / r["columns"] + 0.00005
        assert r["real_time_factor"] == pytest.approx(r["seconds"] * 25 / r["columns"], abs=rounding)
    assert all(r["same_codes_as_reference"] for r in results if r["side"] == "cached")
